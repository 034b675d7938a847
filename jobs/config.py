"""Typed configuration of every training stage (`muse train ... --config YAML`).

One `TrainConfig` covers the whole staged recipe; each stage reads its own section, so the same YAML
drives `muse train base` and `muse train all`. YAML files hold only what differs from these defaults
(`configs/train_*.yaml`); unknown keys are rejected with the list of valid ones. The defaults are the
paper's cluster recipe (Muse arXiv 2301.00704 §4: lr 1e-4, 5000 warm-up steps, cosine decay,
weight decay 0.045, β = (0.9, 0.96)); `configs/demo.yaml` shrinks it to 2 CPU cores.

Model architectures are preset names (`muse.config.PRESETS`). The root decides: a transformer stage
without a preset (`model: null`, the default) continues the component already in the model root, in
its architecture and from its weights, and refuses tokens that do not fit it; a root without one gets
the paper's preset. The VQGAN stage does the same with `lo_model` / `hi_model` "auto" (the default). A named preset trains from scratch and replaces the root's component (a run of the
same name, root and preset resumes its checkpoints instead: `jobs.preflight`). A preset's
codebook size, token grid and text width are taken from the tokens and the root's VQGAN and text
encoder, so it never disagrees with the tokens it is trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from muse.config import PRESETS, BaseTransformerConfig, SuperResTransformerConfig, TextEncoderConfig, VQGANConfig
from muse.config import load
from muse.root_sampling import RootSampling
from pipelines.config import TokenizeConfig

STRATEGIES = ("ddp", "fsdp")
# Every stage, in recipe order: stage X is defined in the module jobs.X (its `STAGE`, see jobs.stages)
# and configured by the TrainConfig section X below.
STAGES = ("vqgan", "base", "superres", "decoder")
PAPER_PRESETS = {"base": "base-632m", "superres": "superres-268m"}  # for a root without that component
DECODER_COMPONENTS = ("auto", "vqgan_lo", "vqgan_hi")

DEFAULT_PROMPTS = (
    "a red circle",
    "two blue squares",
    "three green triangles",
    "a yellow square on the left and a purple circle on the right",
)


AUTO = "auto"  # a VQGAN model chosen by the root (jobs.vqgan.tokenizer_config)
PAPER_VQGANS = {"vqgan_lo": "vqgan-f16-8192", "vqgan_hi": "vqgan-f8-8192"}


def _check_preset(name: str | None, kind: type, where: str) -> None:
    if name is None or name == AUTO:
        return
    if name not in PRESETS or not isinstance(PRESETS[name], kind):
        known = sorted(k for k, v in PRESETS.items() if isinstance(v, kind))
        raise ValueError(f"{where}: {name!r} is not a {kind.__name__} preset; known: {known}")


@dataclass(frozen=True)
class ScalingSettings:
    """Ray Train workers. `cpus_per_worker` may be fractional (tests, small machines)."""

    num_workers: int = 1
    # Elastic training: with min_workers set, Ray Train runs with any number of workers in
    # [min_workers, num_workers] that fits, and regrows toward num_workers as nodes return, so a lost
    # node no longer stalls the run. Each rank's checkpoint shards reshard on load (jobs/checkpointing.py),
    # so a run resumes on any worker count; the batch per worker stays, so the global batch follows it.
    min_workers: int | None = None
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only with use_gpu
    # "ddp": DistributedDataParallel through ray.train.torch.prepare_model. "fsdp": FSDP2
    # (torch fully_shard) per attention/MLP module, parameters, gradients and optimizer state
    # sharded over the workers: the option for base-3b. Works on CPU (gloo) as well as GPU.
    strategy: str = "ddp"

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError("scaling.num_workers must be >= 1 (Ray Train V2 does not persist checkpoints "
                             "with num_workers=0)")
        if self.min_workers is not None and not 1 <= self.min_workers <= self.num_workers:
            raise ValueError(f"scaling.min_workers must be in [1, num_workers={self.num_workers}] or null, "
                             f"got {self.min_workers}")
        if self.cpus_per_worker <= 0 or (self.use_gpu and self.gpus_per_worker <= 0):
            raise ValueError("scaling.cpus_per_worker and scaling.gpus_per_worker must be > 0")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"scaling.strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def workers(self) -> int | tuple[int, int]:
        """ScalingConfig.num_workers: a fixed count, or (min, max) for elastic training."""
        return self.num_workers if self.min_workers is None else (self.min_workers, self.num_workers)

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


@dataclass(frozen=True)
class OptimSettings:
    """AdamW with linear warm-up and cosine decay, gradient clipping, EMA of the weights."""

    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.96)
    weight_decay: float = 0.045  # not applied to biases, norms, embeddings and positions
    warmup_steps: int = 5000
    final_lr_fraction: float = 0.0  # the cosine ends at lr * this
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.9999  # 0 = no EMA (the raw weights are exported)

    def __post_init__(self):
        if self.lr <= 0 or len(self.betas) != 2 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("lr > 0, two betas, warmup_steps >= 0 and grad_clip >= 0 are required")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError("optim.ema_decay must be in [0, 1) and final_lr_fraction in [0, 1]")


@dataclass(frozen=True)
class RunSettings:
    """Steps, batches, checkpoints, samples and failure handling of one Ray Train run."""

    max_steps: int = 100_000
    batch_size: int = 32  # per worker
    seed: int = 0
    log_every: int = 50  # print a metrics line and ray.train.report the metrics
    checkpoint_every: int = 1000  # report a checkpoint (and always at the last step)
    sample_every: int = 1000  # a sample grid PNG to ROOT/samples/<run>/ (or <storage_path>/<run>/samples/); 0: never
    keep_checkpoints: int = 2
    # Worker-group restarts from the last checkpoint before the run fails (-1 = no limit). Weeks on
    # many nodes see many node losses; a crash that repeats at once still ends the run after this many.
    max_failures: int = 100
    storage_path: str | None = None  # Ray Train storage, local or s3://; None = ROOT/runs
    name: str | None = None  # run name under storage_path; None = the stage's component name
    bf16: bool = True  # mixed precision on GPU
    # bf16 autocast on CPU: ~1.4x faster transformer steps where the CPU has AVX512-BF16/AMX (weights,
    # optimizer and loss stay fp32). Ignored on CPUs without them, which emulate bf16 10-15x slower.
    cpu_bf16: bool = False
    # Rows in each worker's local shuffle buffer (0 = no shuffle): thousands, so rows of several files mix
    # (token rows are a few KB; with text_storage: embeddings a row is up to ~1 MB, so lower it there).
    shuffle_buffer: int = 4096
    # Read (and decode) the data once, on the driver, into Ray's object store instead of streaming it
    # from storage every epoch: for data that fits in memory (the tiny demo), where reading dominates.
    # Refused past 4 GiB (jobs.data.CACHE_MAX_BYTES).
    cache_data: bool = False
    peak_tflops: float | None = None  # accelerator peak for MFU; None = by GPU name, no MFU on CPU
    progress: bool = True  # the live progress line (off: the notes and summary lines only)
    # Fault injection, for checking recovery end to end: the last worker exits (os._exit) once when
    # it reaches this step; a marker file in the run directory keeps it from firing again.
    fail_at_step: int | None = None

    def __post_init__(self):
        positive = (self.max_steps, self.batch_size, self.log_every, self.checkpoint_every, self.keep_checkpoints)
        if min(positive) < 1:
            raise ValueError("run: max_steps, batch_size, log_every, checkpoint_every and keep_checkpoints "
                             "must be >= 1")
        if self.sample_every < 0 or self.max_failures < -1 or self.shuffle_buffer < 0:
            raise ValueError("run: sample_every >= 0, max_failures >= -1 and shuffle_buffer >= 0 are required")


@dataclass(frozen=True)
class TransformerStage:
    """Base or super-res: masked-token training on token shards (Muse §2.2–2.4)."""

    # None: the architecture of the component already in the model root, fine-tuned from its weights
    # (the root decides), or the paper's preset for an empty root. A preset name replaces it, as asked.
    model: str | None = None
    # None: Muse's 0.1, or 0 for a model that reads codes through code vectors (the tiny ones, trained
    # with 0.1, drew noise: benchmarks/RESULTS.md, "Super-res that reads the low-res image").
    label_smoothing: float | None = None
    text_dropout: float = 0.1  # share of samples whose text is dropped (mask all False), for CFG; <= 0.5
    sample_prompts: tuple[str, ...] = DEFAULT_PROMPTS  # base sample grids; super-res uses data rows
    sample_steps: int = 12
    sample_guidance: float = 3.0
    # LoRA fine-tuning (muse.lora) of the root's own component: rank r adapters on the attention
    # projections, every other weight frozen; the export folds them in. 0 = train every weight.
    lora_rank: int = 0
    lora_alpha: float | None = None  # None = lora_rank (scale 1)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0 (0 = no LoRA), got {self.lora_rank}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha scales the adapters by alpha / rank: it must be > 0 (null: the rank), "
                             f"got {self.lora_alpha}")
        if not 0.0 <= self.text_dropout <= 0.5:
            raise ValueError(f"text_dropout is the share of samples whose text is dropped (Muse: 0.1); "
                             f"{self.text_dropout} would train mostly unconditionally (a keep rate?): use [0, 0.5]")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError("label_smoothing must be in [0, 1), or null for the model's default")
        if self.sample_steps < 1:
            raise ValueError("sample_steps must be >= 1")


@dataclass(frozen=True)
class GANSettings:
    """Reconstruction + codebook/commitment, then a hinge PatchGAN with the adaptive weight of
    Esser et al.; an LPIPS-style perceptual term only when VGG16 weights are supplied."""

    disc_start: int = 20_000  # steps before the adversarial loss (and the discriminator) start
    disc_weight: float = 0.1  # times the adaptive weight
    disc_lr: float | None = None  # None = optim.lr
    perceptual_weights: str | None = None  # VGG16 (+ LPIPS heads) .safetensors; None = no perceptual loss
    perceptual_weight: float = 1.0


def _refuse_fsdp(scaling: ScalingSettings, stage: str) -> None:
    """The VQGAN and decoder stages are small: every worker holds the whole model and the gradients are
    averaged over the workers. Sharding them would only add communication, so fsdp is refused rather
    than silently ignored."""
    if scaling.strategy != "ddp":
        raise ValueError(f"{stage}.scaling.strategy: {scaling.strategy!r} is for the transformer stages; the "
                         f"{stage} stage replicates its model on every worker: use 'ddp'")


def _vqgan_optim() -> OptimSettings:
    return OptimSettings(lr=1e-4, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=1000, ema_decay=0.0)


@dataclass(frozen=True)
class VQGANStage:
    """Trains the low-res (f16) and high-res (f8) tokenizers on raw images, one run each."""

    # "auto": the root decides, as for the transformers: a root that holds the tokenizer continues it
    # (its architecture and weights); an empty one gets the paper's (PAPER_VQGANS). A preset name trains
    # that architecture from scratch and replaces the root's when done.
    lo_model: str = AUTO
    hi_model: str | None = AUTO  # None = no high-res tokenizer (and no super-res)
    # Start the high-res tokenizer from the trained ROOT/vqgan_lo (the two presets must differ only in
    # resolution; the VQGAN is convolutional): fine-tuning at the higher resolution costs far less
    # than training from scratch, and both tokenizers share a codebook.
    hi_init_from_lo: bool = False
    # Steps of the high-res run (e.g. a short fine-tune); None = run.max_steps. `--max-steps N` on the
    # command line sets both (a smoke run stays short); `--set vqgan.hi_max_steps=...` after it still wins.
    hi_max_steps: int | None = None
    # Steps run as a plain autoencoder (no quantizer) before the codebook is seeded by k-means++ from
    # their latents (muse.vqgan.VectorQuantizer.seed); 0 = quantize from the first step.
    quantizer_warmup_steps: int = 0
    sample_images: int = 8  # reconstructions in each sample grid
    gan: GANSettings = field(default_factory=GANSettings)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    optim: OptimSettings = field(default_factory=_vqgan_optim)
    run: RunSettings = field(default_factory=lambda: RunSettings(batch_size=8))

    def __post_init__(self):
        if self.hi_max_steps is not None and self.hi_max_steps < 1:
            raise ValueError("vqgan.hi_max_steps must be >= 1 (or null)")
        if self.quantizer_warmup_steps < 0:
            raise ValueError("vqgan.quantizer_warmup_steps must be >= 0")
        _check_preset(self.lo_model, VQGANConfig, "vqgan.lo_model")
        _refuse_fsdp(self.scaling, "vqgan")
        _check_preset(self.hi_model, VQGANConfig, "vqgan.hi_model")


@dataclass(frozen=True)
class DecoderStage:
    """Muse §2.5: a wider/deeper VQGAN decoder fine-tuned with encoder, codebook and transformers frozen."""

    component: str = "auto"  # "auto" = vqgan_hi when the root has one (the decoder images come from), else vqgan_lo
    decoder_base_channels: int = 256
    decoder_num_res_blocks: int = 4
    sample_images: int = 8
    gan: GANSettings = field(default_factory=lambda: GANSettings(disc_start=0))
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    optim: OptimSettings = field(default_factory=_vqgan_optim)
    run: RunSettings = field(default_factory=lambda: RunSettings(batch_size=8, max_steps=20_000))

    def __post_init__(self):
        if self.component not in DECODER_COMPONENTS:
            raise ValueError(f"decoder.component must be one of {DECODER_COMPONENTS}, got {self.component!r}")
        if self.decoder_base_channels < 1 or self.decoder_num_res_blocks < 1:
            raise ValueError("decoder.decoder_base_channels and decoder_num_res_blocks must be >= 1")
        _refuse_fsdp(self.scaling, "decoder")


@dataclass(frozen=True)
class TrainConfig:
    text_encoder: str = "t5-xxl"  # preset written to ROOT/text_encoder by `train all` when missing
    vqgan: VQGANStage = field(default_factory=VQGANStage)
    base: TransformerStage = field(default_factory=TransformerStage)
    superres: TransformerStage = field(default_factory=lambda: TransformerStage(sample_steps=8))
    decoder: DecoderStage = field(default_factory=DecoderStage)
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    concurrent: bool = True  # `train all`: base and super-res at once when the cluster has room for both
    # How long `train all` (on a cluster, RAY_ADDRESS set) waits for the autoscaler to add room for both
    # trainers before training them one after the other.
    concurrent_wait_s: float = 600.0
    stages: tuple[str, ...] = STAGES  # what `train all` runs (e.g. without "decoder": no decoder fine-tune)
    # The sampling this recipe's model draws well with, recorded in ROOT/sampling.json when a transformer
    # stage or `train all` finishes: `muse generate` and `muse serve` take it for what they leave out.
    sampling: RootSampling = field(default_factory=RootSampling)

    def __post_init__(self):
        unknown = sorted(set(self.stages) - set(STAGES))
        if unknown:
            raise ValueError(f"stages: unknown {unknown}; stages are {list(STAGES)}")
        _check_preset(self.text_encoder, TextEncoderConfig, "text_encoder")
        _check_preset(self.base.model, BaseTransformerConfig, "base.model")
        _check_preset(self.superres.model, SuperResTransformerConfig, "superres.model")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Defaults <- YAML at `path` <- `key.sub=value` overrides; unknown keys raise ValueError."""
    return load(TrainConfig, path, overrides)
