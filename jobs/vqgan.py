"""Stage `vqgan`: the low-res (f16) and high-res (f8) image tokenizers, trained on raw images.

    muse train vqgan --config configs/demo.yaml --corpus CORPUS --checkpoint ROOT [--component vqgan_lo]
    python -m jobs.vqgan ...

Images come through the tokenization pipeline's readers and preprocessing (`jobs.data.image_dataset`).
Per step (Esser et al. 2021, Muse §2.1):

    recon, codebook, commitment = vqgan(images)
    nll = L1 + L2 (+ w_p · LPIPS when perceptual weights are supplied)
    loss = nll + codebook + commitment                     (+ λ · hinge_g after gan.disc_start, with
                                                              λ = disc_weight · |∇nll| / |∇g| at the
                                                              decoder's last layer)
    discriminator (after disc_start): hinge_d(D(images), D(recon))

With `vqgan.quantizer_warmup_steps` the first steps train a plain autoencoder (the decoder reads the
unit-norm latents) and the codebook is then seeded by k-means++ from the latents of the last of them.

Gradients are averaged over the workers explicitly (jobs.parallel.allreduce_grads): two models and
the adaptive weight's autograd.grad do not fit DDP's one-forward-one-backward contract. Sample grids
pair fixed images with their reconstructions; the component is exported to ROOT/vqgan_lo or vqgan_hi.
"""

from __future__ import annotations

import argparse
import math
from collections import deque
from dataclasses import replace
from typing import Any

import torch

from jobs.common import EMA, build_optimizer, build_scheduler, clip_grad_norm, export_state, image_grid
from jobs.config import AUTO, PAPER_VQGANS, TrainConfig, VQGANStage
from jobs.data import collate_images
from jobs.fit import fit_stage, run_dir
from jobs.loop import StageWorker, finished_extra
from jobs.parallel import WorkerEnv, allreduce_grads
from jobs.preflight import RunRefused
from jobs.progress import say
from jobs.stage import Stage, add_format_arg, finished
from jobs.train_job import TrainJob
from muse import checkpoint
from muse.config import VQGANConfig, from_dict, preset, to_dict
from muse.data.images import tensor_to_pil
from muse.losses import adaptive_disc_weight, hinge_d_loss, hinge_g_loss, reconstruction_loss
from muse.vqgan import VQGAN, PatchDiscriminator, grow


SEED_CANDIDATES_PER_CODE = 32


class VQGANWorker(StageWorker):
    config_class = VQGANStage
    stage = "vqgan"
    console_metrics = ("loss", "psnr")

    def __init__(self, section, job: TrainJob, env: WorkerEnv):
        super().__init__(section, job, env)
        self.root, self.component = job.root, job.component
        self.vq_config = from_dict(VQGANConfig, job.model_config)
        self.size = self.vq_config.resolution
        self.vqgan = self.build_vqgan().to(env.device).train()
        self.disc = PatchDiscriminator(self.vq_config).to(env.device).train()
        gan, optim, steps = section.gan, section.optim, section.run.max_steps
        self.perceptual = None
        if gan.perceptual_weights:
            from jobs.perceptual import load_perceptual

            self.perceptual = load_perceptual(gan.perceptual_weights, env.device)
        self.trainable = [p for p in self.vqgan.parameters() if p.requires_grad]
        self.modules = {"vqgan": self.vqgan, "disc": self.disc}
        self.optimizers = {"vqgan": build_optimizer(self.vqgan, optim, env),
                           "disc": build_optimizer(self.disc, optim, env, lr=gan.disc_lr)}
        self.schedulers = {"vqgan": build_scheduler(self.optimizers["vqgan"], optim, steps),
                           "disc": build_scheduler(self.optimizers["disc"], optim, max(1, steps - gan.disc_start))}
        self.ema = EMA(self.vqgan, optim.ema_decay) if optim.ema_decay > 0 else None
        # Latents of the last autoencoder steps, enough for SEED_CANDIDATES_PER_CODE per code.
        self.seed_latents: deque[torch.Tensor] = deque()
        self.seed_rows = 0
        self.seed_step: int | None = None  # set at the first step (`seeding_step`)

    def build_vqgan(self) -> VQGAN:
        model = VQGAN(self.vq_config)
        if self.job.init_from:  # vqgan.hi_init_from_lo (a resumed run then loads its checkpoint)
            lo = checkpoint.load_component(self.job.init_from, expect_kind="vqgan")
            if lo.config.tokens_per_side == self.vq_config.tokens_per_side and lo.config != self.vq_config:
                return grow(lo)  # one more level at twice the resolution (checked by the driver)
            model.load_state_dict(lo.state_dict())
        return model

    def collate(self, batch: dict) -> dict[str, torch.Tensor]:
        return collate_images(batch, self.size)

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        gan, env = self.section.gan, self.env
        images = batch["images"].to(env.device)  # (B, 3, H, W)
        if env.is_main and not hasattr(self, "_sample_images"):
            self._sample_images = images[: self.section.sample_images].clone()
        adversarial = step >= gan.disc_start
        if self.seed_step is None:
            self.seed_step = self.seeding_step(step)
        warming = step <= self.seed_step
        with env.autocast():
            out = self.vqgan(images, quantize=not warming)
        recon = out.recon.float()
        rec = reconstruction_loss(images, recon)
        nll = rec
        metrics = {}
        if self.perceptual is not None:
            perceptual = self.perceptual(images, recon)
            nll = nll + gan.perceptual_weight * perceptual
            metrics["perceptual"] = perceptual.detach()
        loss = nll + out.codebook_loss + out.commitment_loss
        if adversarial:
            self.disc.requires_grad_(False)
            with env.autocast():
                g_loss = hinge_g_loss(self.disc(out.recon).float())
            weight = gan.disc_weight * adaptive_disc_weight(nll, g_loss, self.vqgan.decoder_last_layer_weight())
            loss = loss + weight * g_loss
            self.disc.requires_grad_(True)
            metrics |= {"g_loss": g_loss.detach(), "disc_weight": torch.as_tensor(weight).detach()}
        loss.backward()
        allreduce_grads(self.trainable, env)
        metrics["grad_norm"] = clip_grad_norm(self.vqgan, self.section.optim.grad_clip)
        self._step("vqgan")
        if warming:
            self.keep_for_seeding(out.latents)
            if step == self.seed_step:
                self.seed_codebook()
        if self.ema is not None:
            self.ema.update(step)
        if adversarial:
            with env.autocast():
                d_loss = hinge_d_loss(self.disc(images).float(), self.disc(out.recon.detach()).float())
            d_loss.backward()
            allreduce_grads(list(self.disc.parameters()), env)
            clip_grad_norm(self.disc, self.section.optim.grad_clip)
            self._step("disc")
            metrics["d_loss"] = d_loss.detach()
        mse = torch.mean((recon.detach().clamp(-1, 1) - images) ** 2)
        # Metrics stay on the device (0-d tensors): the loop syncs them only when it logs.
        h, w = out.ids.shape[1:]
        return metrics | {
            "loss": loss.detach(), "rec": rec.detach(), "codebook": out.codebook_loss.detach(),
            "commit": out.commitment_loss.detach(), "perplexity": out.perplexity.detach(),
            "psnr": 10 * torch.log10(4.0 / mse.clamp_min(1e-10)),
            "tokens": float(images.shape[0] * h * w), "samples": float(images.shape[0]),
        }

    def quantizer_warmup_steps(self) -> int:
        return self.section.quantizer_warmup_steps

    def seeding_step(self, first: int) -> int:
        """The step whose end seeds the codebook, for a run whose first step here is `first`: the
        warm-up's last. A run resumed inside the warm-up starts with no latents kept (they are not
        in the checkpoint), so it warms up until it holds as many as an uninterrupted run would have
        (the same on every rank: from the configured batch). -1: no warm-up, or it is over."""
        warmup = self.quantizer_warmup_steps()
        if first >= warmup:
            return -1
        rows = self.section.run.batch_size * self.vq_config.tokens_per_side**2  # latents kept per step
        needed = min(warmup, math.ceil(SEED_CANDIDATES_PER_CODE * self.vq_config.codebook_size / rows))
        return max(warmup - 1, first + needed - 1)

    def keep_for_seeding(self, latents: torch.Tensor) -> None:
        self.seed_latents.append(latents.flatten(0, 2).float())
        self.seed_rows += self.seed_latents[-1].shape[0]
        cap = SEED_CANDIDATES_PER_CODE * self.vq_config.codebook_size
        while self.seed_rows - self.seed_latents[0].shape[0] >= cap:  # the oldest batch is not needed
            self.seed_rows -= self.seed_latents.popleft().shape[0]

    def seed_codebook(self) -> None:
        """k-means++ codes from the warm-up's last latents; the EMA copy (if any) takes them too."""
        quantizer = self.vqgan.quantizer
        quantizer.seed(torch.cat(list(self.seed_latents)))
        self.seed_latents.clear()
        self.seed_rows = 0
        if self.ema is not None:
            self.ema.copy_from_weights("quantizer.codebook")
        if self.env.is_main:
            print(f"[{self.job.run_name}] seeded {quantizer.codebook_size} codes by k-means++ at step "
                  f"{self.seed_step + 1} (autoencoder warm-up: {self.quantizer_warmup_steps()} steps)", flush=True)

    def _step(self, name: str) -> None:
        opt = self.optimizers[name]
        opt.step()
        self.schedulers[name].step()
        opt.zero_grad(set_to_none=True)

    def eval_vqgan(self) -> VQGAN | None:
        """A plain VQGAN with the exported weights (EMA when on), on rank 0."""
        state = export_state(self.vqgan, self.ema, self.env)
        if state is None:
            return None
        model = VQGAN(self.vqgan.config).to(self.env.device)
        model.load_state_dict(state)
        return model.eval()

    @torch.no_grad()
    def sample_grid(self, step: int):
        model = self.eval_vqgan()
        if model is None or not hasattr(self, "_sample_images"):
            return None
        images = self._sample_images
        columns = [images] + self.reconstructions(model, images)
        rows = [[tensor_to_pil(col[i]) for col in columns] for i in range(images.shape[0])]
        return image_grid(rows)

    def reconstructions(self, model: VQGAN, images: torch.Tensor) -> list[torch.Tensor]:
        return [model.decode(model.encode(images))]

    def export(self, step: int) -> None:
        model = self.eval_vqgan()
        if model is None:
            return
        uri = checkpoint.component_uri(self.root, self.component)
        checkpoint.save_component(model.cpu(), uri, extra=self.export_extra(step))
        print(f"[{self.job.run_name}] exported {self.component} at step {step} to {uri}", flush=True)

    def export_extra(self, step: int) -> dict:
        return finished_extra(self.stage, step, self.job.run_name)


# ---------------------------------------------------------------------------------------------
# Driver side.

VQGAN_COMPONENTS = ("vqgan_lo", "vqgan_hi")


def vqgan_components(cfg: TrainConfig, component: str | None) -> list[str]:
    wanted = list(VQGAN_COMPONENTS) if component in (None, "both") else [component]
    if "vqgan_hi" in wanted and cfg.vqgan.hi_model is None:
        if component == "vqgan_hi":
            raise RunRefused("vqgan.hi_model is null: there is no high-res tokenizer to train")
        wanted.remove("vqgan_hi")
    return wanted


def build(cfg: TrainConfig, data: str, root: str, component: str | None, format: str) -> list[Any]:
    """One run per tokenizer asked for (both by default), low-res first."""
    return [_build_one(cfg, data, root, c, format) for c in vqgan_components(cfg, component)]


def component_run(section, component: str):
    """The run settings of one tokenizer's run: named `<run.name>_<component>` (else after the
    component), and vqgan_hi's to `hi_max_steps` when that is set."""
    run = replace(section.run, name=f"{section.run.name}_{component}") if section.run.name else section.run
    if component == "vqgan_hi" and section.hi_max_steps:  # `--max-steps` sets it too (jobs.stage.cli_overrides)
        run = replace(run, max_steps=section.hi_max_steps)
    return run


def _build_one(cfg: TrainConfig, data: str, root: str, component: str, format: str):
    from jobs.data import run_images
    from jobs.perceptual import check_weights

    section = cfg.vqgan
    check_weights(section.gan.perceptual_weights)
    vq_cfg, continued = tokenizer_config(root, component, section.lo_model if component == "vqgan_lo"
                                         else section.hi_model)
    uri = checkpoint.component_uri(root, component)
    if continued and checkpoint.component_extra(uri).get("stage"):
        # A trained codebook: no autoencoder warm-up that would seed it anew (a `muse init` root's
        # random one, which no run exported, gets the warm-up).
        section = replace(section, quantizer_warmup_steps=0)
    section = replace(section, run=component_run(section, component))
    warmup, steps = section.quantizer_warmup_steps, section.run.max_steps
    if warmup and steps <= warmup:
        inside = steps < warmup
        say(f"[{component}] warning: {steps} steps end {'inside' if inside else 'with'} the autoencoder warm-up "
            f"(vqgan.quantizer_warmup_steps={warmup}), so no step trains through the codebook"
            f"{', which is never seeded' if inside else ''}: the exported tokenizer is not a trained one "
            "(raise --max-steps, or lower the warm-up)")
    init_from = (checkpoint.component_uri(root, component) if continued
                 else lo_for_hi_init(root, vq_cfg) if component == "vqgan_hi" and section.hi_init_from_lo else None)
    job = TrainJob(root=root, component=component, stage="vqgan", model_config=to_dict(vq_cfg), init_from=init_from)
    with run_images(data, vq_cfg.resolution, cfg.tokenize, format, section.run.cache_data,
                    run_dir(root, section.run, component), section.run.seed) as dataset:
        try:
            return fit_stage(VQGANWorker, section, job, dataset)
        except RunRefused as e:
            if continued and checkpoint.component_extra(job.init_from).get("decoder_finetuned"):
                raise RunRefused(f"{e}. Note: {root}/{component} is the decoder fine-tune's export, whose "
                                 "decoder is wider than the one this VQGAN run trained") from None
            raise


def tokenizer_config(root: str, component: str, model: str) -> tuple[VQGANConfig, bool]:
    """(the architecture to train, whether it continues the root's own tokenizer from its weights).
    "auto": the root's component when it has one, else the paper's preset; a preset name trains that
    from scratch, said out loud when it will replace what the root holds."""
    uri = checkpoint.component_uri(root, component)
    existing = checkpoint.read_component_config(uri)[1] if checkpoint.has_component(root, component) else None
    if model == AUTO and existing is not None:
        say(f"[{component}] continues the model root's {component} ({existing.resolution} px, "
            f"{existing.codebook_size} codes) from its weights")
        return existing, True
    cfg = preset(PAPER_VQGANS[component] if model == AUTO else model)
    if existing is not None and existing != cfg:
        say(f"[{component}] trains {model} ({cfg.resolution} px, {cfg.codebook_size} codes) from scratch; it "
            f"replaces the root's {component} when done")
    return cfg, False


def lo_for_hi_init(root: str, hi_cfg) -> str:
    """ROOT/vqgan_lo, checked to fit the high-res tokenizer: the same architecture at another
    resolution (its weights are copied), or lo grown by one level (`muse.vqgan.grow`)."""
    from muse.vqgan import grown_config

    uri = checkpoint.component_uri(root, "vqgan_lo")
    if not checkpoint.has_component(root, "vqgan_lo"):
        raise RunRefused(f"vqgan.hi_init_from_lo: the model root {root} has no vqgan_lo/ to start vqgan_hi from")
    lo_cfg = checkpoint.read_component_config(uri)[1]
    same = replace(lo_cfg, resolution=hi_cfg.resolution) == hi_cfg
    if not same and (lo_cfg.form != "conv" or grown_config(lo_cfg) != hi_cfg):
        raise RunRefused("vqgan.hi_init_from_lo needs vqgan.hi_model to be vqgan.lo_model at another resolution, "
                         f"or grown by one level at twice the resolution; got {lo_cfg} and {hi_cfg}")
    return uri


CORPUS_HELP = "image-caption corpus (Parquet, image folder or WebDataset; local, file:// or s3://)"


def corpus_args(components: tuple[str, ...], help: str):
    """--format and --component, for the stages that train a tokenizer on a corpus."""
    def add(parser: argparse.ArgumentParser) -> None:
        add_format_arg(parser)
        parser.add_argument("--component", choices=components, help=help)
    return add


def tokenizers_finished(cfg: TrainConfig, root: str, component: str | None = None) -> bool:
    """Whether the root holds the finished exports of every tokenizer run asked for (or the decoder
    fine-tune built on one), as `train all` checks before training them."""
    return all(finished(root, c, "vqgan", component_run(cfg.vqgan, c), later=("decoder",))
               for c in vqgan_components(cfg, component))


STAGE = Stage(
    name="vqgan",
    summary="train the low-res and high-res VQGAN tokenizers on raw images",
    worker=VQGANWorker,
    build=build,
    data="corpus",
    data_help=CORPUS_HELP,
    add_args=corpus_args(("both",) + VQGAN_COMPONENTS, "which tokenizer (default: both, low-res first)"),
    finished=tokenizers_finished,
)


def main(argv: list[str] | None = None) -> None:
    STAGE.main(argv)


if __name__ == "__main__":
    main()
