"""The masked-token recipe shared by the base and super-res stages (Muse §2.2–2.4).

Per step, on each worker:

    tokens (B, N) ──arccos mask rate r_b, mask round(r_b·N) random positions──▶ masked ids
    text ids ──frozen text encoder (loaded once per worker)──▶ emb (B, L, D), mask (B, L)
    text dropout: for each sample with probability p (0.1) the text mask becomes all False
                  (only the learned null token remains: the unconditional branch of CFG)
    logits = model(masked ids, encode_context(emb, mask[, low-res ids]))       (B, N, K)
    loss = label-smoothed cross-entropy on masked positions; AdamW, warm-up + cosine, grad clipping,
           EMA of the weights (the exported component holds the EMA weights)

bf16 autocast on GPU (DDP) or FSDP's bf16 parameters; CPU runs fp32 unless run.cpu_bf16. Metrics:
loss, masked-token accuracy, share of samples whose text was dropped, tokens/s and (GPU) MFU from
6·params·tokens.

The driver half (`build`, `transformer_config`) picks the architecture, which the root decides (see
jobs.config), and makes the token dataset; base and super-res differ only in `hi`.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from jobs.common import EMA, build_optimizer, build_scheduler, clip_grad_norm, export_state
from jobs.config import PAPER_PRESETS, TrainConfig, TransformerStage
from jobs.data import collate_tokens
from jobs.fit import check_run, fit_stage, run_location
from jobs.loop import StageWorker, finished_extra
from jobs.parallel import WorkerEnv, transformer_fsdp_units, wrap
from jobs.preflight import RunRefused
from jobs.root_fit import (_ids_difference, _tokenize_spec, codes_version, foreign_tokens_problem, stale_tokens_problem,
                           transformer_config)
from jobs.stage import named_run
from jobs.train_job import TrainJob
from pipelines.job_spec import text_ids_mismatch
from muse import checkpoint, storage
from muse.components import family_of_config
from muse.config import from_dict, preset, to_dict
from muse.lora import add_lora, merge_lora
from muse.losses import masked_token_accuracy, masked_token_loss
from muse.masking import mask_tokens, sample_mask_rates
from muse.meta import meta_device
from muse.code_vectors import pixel_code_vectors


class TrainWrapper(nn.Module):
    """One forward from (masked ids, text) to logits, so DDP/FSDP see the context encoder run
    inside the wrapped module's forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                lo_ids: torch.Tensor | None = None) -> torch.Tensor:
        if lo_ids is None:
            ctx = self.model.encode_context(text, text_mask)
        else:
            ctx = self.model.encode_context(text, text_mask, lo_ids)
        return self.model(ids, ctx)  # (B, N, K)


def drop_text(text_mask: torch.Tensor, p: float, generator: torch.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance dropout: each row's mask becomes all False with probability p.
    Returns (new mask (B, L), dropped (B,) bool)."""
    dropped = torch.rand(text_mask.shape[0], generator=generator, device=text_mask.device) < p
    return text_mask & ~dropped[:, None], dropped


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def linear_flops(model: nn.Module, tokens_for) -> float:
    """6 · Σ_linear params · tokens that pass through it (forward + backward)."""
    return sum(6.0 * m.weight.numel() * tokens_for(name)
               for name, m in model.named_modules() if isinstance(m, nn.Linear))


class MaskedWorker(StageWorker):
    """Shared by BaseWorker and SuperResWorker; they set `target` and the few hooks below."""

    config_class = TransformerStage
    console_metrics = ("loss", "acc")
    target = "tokens_lo"  # the token column the model predicts
    kind = "base"

    def __init__(self, section: TransformerStage, job: TrainJob, env: WorkerEnv):
        super().__init__(section, job, env)
        self.root = job.root
        self.text_dim = job.data_meta.get("text_dim")
        self.uses_ids = job.data_meta.get("text_storage", "ids") != "embeddings"
        self.text_encoder = self._load_text_encoder() if self.uses_ids else None
        # The root's component may be of another family (an imported aMUSEd U-ViT fills the base slot).
        config_type = checkpoint.config_class(job.model_kind) if job.model_kind else self.config_type()
        self.model_config = from_dict(config_type, job.model_config)
        if job.init_from:  # the root's own component, continued (a resumed run then loads its checkpoint)
            model = checkpoint.load_component(job.init_from, expect_kind=self.kind).train()
        elif section.lora_rank:  # the driver refuses this first (`lora_problem`); kept for direct callers
            raise ValueError(lora_problem(self.kind, self.root, section.model))
        else:
            model = checkpoint.build_component(self.kind, self.model_config)
            self.set_code_vectors(model)
        if section.lora_rank:
            add_lora(model, section.lora_rank, section.lora_alpha)
        self.mask_id = model.mask_token_id
        # Code classes (muse.transformer.TokenEmbedding) when the model reads codes through their vectors.
        self.code_embedding = model.embed if getattr(self.model_config, "code_dim", 0) else None
        self.label_smoothing = label_smoothing(self.model_config, section.label_smoothing)
        self.wrapper = wrap(TrainWrapper(model), env, transformer_fsdp_units(model))
        self.modules = {"model": self.wrapper}
        self.optimizers = {"model": build_optimizer(self.wrapper, section.optim, env)}
        self.schedulers = {"model": build_scheduler(self.optimizers["model"], section.optim, section.run.max_steps)}
        self.ema = EMA(self.wrapper, section.optim.ema_decay) if section.optim.ema_decay > 0 else None
        self._eval_model: nn.Module | None = None

    # -- hooks for the two stages ----------------------------------------------------------------
    def config_type(self) -> type:
        raise NotImplementedError

    def lo_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        return None

    def code_vector_sources(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """(token embedding, the root's tokenizer whose codes it reads) for a fresh model."""
        return [(model.embed, "vqgan_lo")]

    def set_code_vectors(self, model: nn.Module) -> None:
        """A fresh model that reads codes through code vectors (`code_dim`) gets the root's tokenizers'."""
        pixels = {}
        for embed, name in self.code_vector_sources(model):
            if not getattr(embed, "code_dim", 0):
                continue
            if not checkpoint.has_component(self.root, name):
                raise ValueError(f"{self.kind}: the model reads codes through its tokenizer's code vectors "
                                 f"(code_dim), but the model root {self.root} has no {name}/ to take them from")
            vq = checkpoint.load_component(checkpoint.component_uri(self.root, name))
            codebook = vq.quantizer.codes().detach()
            if model.config.code_vectors == "pixels":
                pixels[name] = vq.code_pixels()
                embed.set_code_vectors(pixel_code_vectors(pixels[name], vq.config.in_channels), same_by=codebook)
            else:
                embed.set_code_vectors(codebook)
        if getattr(model, "pixel_prior", None) is not None:
            model.pixel_prior.set_code_pixels(pixels["vqgan_lo"], pixels["vqgan_hi"])

    def flops_per_sample(self, text_len: int) -> float:
        raise NotImplementedError

    def matmul_flops(self, tokens_for) -> float:
        """6 · Σ_linear params · tokens through it, counted once on a meta-device copy of the model."""
        if not hasattr(self, "_flops_model"):
            with meta_device():
                self._flops_model = checkpoint.build_component(self.kind, self.model_config)
        return linear_flops(self._flops_model, tokens_for)

    # -- shared ------------------------------------------------------------------------------------
    def _load_text_encoder(self) -> nn.Module:
        if not checkpoint.has_component(self.root, "text_encoder"):
            raise ValueError(f"the model root {self.root} has no text_encoder/: the shards hold text ids, "
                             "which the frozen text encoder of the root turns into embeddings")
        enc = checkpoint.load_component(checkpoint.component_uri(self.root, "text_encoder"), device=self.env.device,
                                        expect_kind="text_encoder")
        for p in enc.parameters():
            p.requires_grad_(False)
        return enc.eval()

    def collate(self, batch: dict) -> dict[str, torch.Tensor]:
        return collate_tokens(batch, self.text_dim)

    @torch.no_grad()
    def text_condition(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["text_mask"].to(self.env.device)
        if "text_emb" in batch:
            return batch["text_emb"].to(self.env.device), mask
        with self.env.autocast():
            emb = self.text_encoder.encode_ids(batch["text_ids"].to(self.env.device), mask)
        if emb.shape[1] != mask.shape[1]:
            # An encoder that pads to its own length and prepends a pooled vector (CLIP, as aMUSEd
            # trains it) attends to every position it returns.
            mask = torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)
        return emb.float(), mask

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        s, env = self.section, self.env
        ids = batch[self.target].to(env.device)  # (B, N)
        if self.code_embedding is not None:
            ids = self.code_embedding.classes(ids)
        B, N = ids.shape
        emb, text_mask = self.text_condition(batch)  # (B, L, D), (B, L)
        text_mask, dropped = drop_text(text_mask, s.text_dropout, self.generator)
        rates = sample_mask_rates(B, generator=self.generator, device=env.device)  # (B,)
        masked_ids, mask = mask_tokens(ids, rates, self.mask_id, generator=self.generator)
        lo = self.lo_ids(batch)
        with env.autocast():
            logits = self.wrapper(masked_ids, emb, text_mask, lo)  # (B, N, K)
        undrawn = self.code_embedding.undrawn() if self.code_embedding is not None else None
        loss = masked_token_loss(logits, ids, mask, label_smoothing=self.label_smoothing, undrawn=undrawn)
        loss.backward()
        grad_norm = clip_grad_norm(self.wrapper, s.optim.grad_clip)
        opt = self.optimizers["model"]
        opt.step()
        self.schedulers["model"].step()
        opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step)
        acc = masked_token_accuracy(logits.detach(), ids, mask)
        # Metrics stay on the device: the loop syncs them only when it logs.
        return {"loss": loss.detach(), "acc": acc.detach(), "grad_norm": grad_norm,
                "text_dropped": dropped.float().mean(), "mask_rate": mask.float().mean(),
                "tokens": float(B * N), "samples": float(B), "flops": B * self.flops_per_sample(emb.shape[1])}

    def eval_model(self) -> nn.Module | None:
        """The EMA (or raw) weights in a plain model on rank 0; None elsewhere. Every rank calls it."""
        state = export_state(self.wrapper, self.ema, self.env)
        if state is None:
            return None
        if self.section.lora_rank:  # the adapters folded into plain weights: the root's keys and modules
            model = checkpoint.build_component(self.kind, self.model_config).to(self.env.device)
            add_lora(model, self.section.lora_rank, self.section.lora_alpha)
            model.load_state_dict(strip_prefix(state))
            return merge_lora(model).eval()
        if self._eval_model is None:
            self._eval_model = checkpoint.build_component(self.kind, self.model_config).to(self.env.device)
        self._eval_model.load_state_dict(strip_prefix(state))
        return self._eval_model.eval()

    def export(self, step: int) -> None:
        model = self.eval_model()
        if model is None:
            return
        uri = checkpoint.component_uri(self.root, self.kind)
        extra = finished_extra(self.kind, step, self.job.run_name, self.job.codes) | {"model": self.section.model}
        checkpoint.save_component(model.cpu(), uri, extra=extra)
        print(f"[{self.job.run_name}] exported {'EMA ' if self.ema else ''}weights at step {step} to {uri}",
              flush=True)

    def vqgan(self, name: str) -> nn.Module | None:
        """A VQGAN of the root for decoding sample grids (rank 0), or None when the root has none."""
        cache = getattr(self, "_vqgans", {})
        self._vqgans = cache
        if name not in cache:
            cache[name] = (checkpoint.load_component(checkpoint.component_uri(self.root, name), device=self.env.device)
                           if checkpoint.has_component(self.root, name) else None)
        return cache[name]

    def sampling_text_encoder(self) -> nn.Module | None:
        if self.text_encoder is None and checkpoint.has_component(self.root, "text_encoder"):
            self.text_encoder = self._load_text_encoder()
        return self.text_encoder


# ---------------------------------------------------------------------------------------------
# Driver side.


def build(stage: str, worker: type[MaskedWorker], cfg: TrainConfig, data: str, root: str) -> list[Any]:
    """The architecture for `stage` ("base" or "superres") and its token dataset, then its run. What the
    shards' metadata and the root refuse is refused before any shard is read (or loaded, cache_data)."""
    from jobs.data import data_order_seed, token_dataset, token_rows

    section, job = planned_job(stage, cfg, data, root)
    storage_uri, name = run_location(root, section.run, stage)
    seed = data_order_seed(section.run.seed, storage.join(storage_uri, name))
    dataset, info = token_dataset(data, hi=stage == "superres", cache=section.run.cache_data, shuffle_seed=seed)
    return [fit_stage(worker, section, replace(job, data_meta=info), dataset, rows=token_rows(data))]


def preflight(stage: str, cfg: TrainConfig, data: str, root: str) -> None:
    """Raise RunRefused where `build` would refuse the run, reading only the shards' metadata: `train
    all` asks this of super-res before base trains, which took hours to reach the refusal."""
    from jobs.data import token_rows

    section, job = planned_job(stage, cfg, data, root)
    check_run(section, job, token_rows(data), streamed=not section.run.cache_data)


def planned_job(stage: str, cfg: TrainConfig, data: str, root: str) -> tuple[Any, dict]:
    """`stage`'s config section and its job (the architecture, where it starts from, its notes), once
    nothing the shards' metadata and the root say refuses it."""
    from pipelines import shards

    section = named_run(getattr(cfg, stage), stage)
    info = shards.shard_info(data)
    if info.get("text_storage", "ids") != "embeddings" and not checkpoint.has_component(root, "text_encoder"):
        raise RunRefused(f"the token shards hold text ids but the model root {root} has no text_encoder/ to "
                         "encode them (write one with `muse init` or train with `muse train all`)")
    made_by = _tokenize_spec(data)
    text_uri = checkpoint.component_uri(root, "text_encoder")
    mismatch = text_ids_mismatch(made_by, text_uri)
    if mismatch:
        raise RunRefused(f"the token shards under {data} hold caption ids of another tokenizer than the model root's "
                         f"text encoder ({_ids_difference(made_by, text_uri, mismatch)}): the model would learn "
                         "other words than its prompts give; tokenize the corpus with this root (a new --output)")
    problem = foreign_tokens_problem(stage, root, data, made_by) or stale_tokens_problem(stage, root, data, made_by)
    if problem:
        raise RunRefused(problem)
    uri = checkpoint.component_uri(root, stage)
    if section.lora_rank and (not checkpoint.has_component(root, stage) or section.model is not None and
                              family_of_config(preset(section.model))
                              != family_of_config(checkpoint.read_component_config(uri)[1])):
        # Nothing to adapt, or a preset of another family, which is never the root's architecture.
        raise RunRefused(lora_problem(stage, root, section.model))
    # What the choice of architecture says is printed once nothing below refuses the run.
    notes: list[str] = []
    model_cfg, init_from = transformer_config(stage, section.model, root, data, info, notes=notes)
    if (section.lora_rank and init_from is None and section.model is not None and checkpoint.has_component(root, stage)
            and checkpoint.read_component_config(uri)[1] == model_cfg):
        init_from = uri  # the preset (a config's default) names the root's own architecture: adapt that
    if section.lora_rank and init_from is None:
        raise RunRefused(lora_problem(stage, root, section.model))
    said = [w for w in (*notes, label_smoothing_warning(stage, model_cfg, section.label_smoothing)) if w]
    return section, TrainJob(root=root, component=stage, stage=stage, model_config=to_dict(model_cfg), data_meta=info,
                             init_from=init_from, model_kind=checkpoint.kind_of_config(model_cfg),
                             lora_rank=section.lora_rank, codes=codes_version(stage, root),
                             notes=tuple(said))  # said by fit_stage once its resume checks pass, never before a refusal


def lora_rank(text: str) -> int:
    """--lora-rank's value: 0 would train every weight, which leaving the flag out already says."""
    rank = int(text)
    if rank < 1:
        raise argparse.ArgumentTypeError(f"a LoRA rank is at least 1, got {rank}: leave the flag out to train "
                                         "every weight")
    return rank


def lora_problem(stage: str, root: str, model: str | None = None) -> str:
    """Why a LoRA run has nothing to adapt: a preset asked for (a new model), or a root without one."""
    if model:
        return (f"{stage}.lora_rank: LoRA adapts the component already in the model root, but --model / "
                f"{stage}.model asks for a new {model}: leave it unset (after --config: --set {stage}.model=null)")
    return f"{stage}.lora_rank: LoRA adapts the component already in the model root, and {root} has no {stage}/"


MUSE_LABEL_SMOOTHING = 0.1


def label_smoothing(model_cfg, configured: float | None) -> float:
    """The stage's label smoothing: as configured, else Muse's 0.1, or 0 for a model that reads codes
    through code vectors (trained with 0.1, the tiny ones drew noise: the sampler draws the smoothed
    tail, which such a model spreads over codes that look alike)."""
    if configured is not None:
        return configured
    return 0.0 if getattr(model_cfg, "code_dim", 0) else MUSE_LABEL_SMOOTHING


def label_smoothing_warning(stage: str, model_cfg, label_smoothing: float | None) -> str | None:
    """A console warning for label smoothing set on a model that reads codes through code vectors."""
    if not getattr(model_cfg, "code_dim", 0) or not label_smoothing:
        return None
    return (f"[{stage}] warning: label_smoothing {label_smoothing:g} with a model that reads codes through code "
            f"vectors: the tiny ones trained so drew noise (base 0.17, super-res 0.03 seen whole scenes; "
            f"benchmarks/RESULTS.md); leave {stage}.label_smoothing unset (0 for such a model) or set it to 0")


def model_arg(stage: str):
    """The `--model` flag of a transformer stage."""
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--model", help=f"{stage} preset to train instead of the root's {stage}, which it "
                                            "replaces when the run ends (default: continue the root's "
                                            f"{stage}, or {PAPER_PRESETS[stage]} in a root without one). It starts "
                                            "from scratch unless the run name (run.name, default "
                                            f"'{stage}') has checkpoints of this preset on this root: then it "
                                            "resumes them; checkpoints of another architecture or root are "
                                            f"refused. For a fresh start: --set {stage}.run.name=NEW")
        parser.add_argument("--lora-rank", type=lora_rank, help=f"fine-tune the root's {stage} through rank-r "
                                                                "LoRA adapters (r >= 1), its weights frozen "
                                                                "(exported merged); without it every weight trains")
    return add
