"""Typed configuration for every Muse component, the named presets, and YAML override loading.

Every component is a frozen dataclass. YAML files hold only what differs from the defaults:
`load(Cls, path, overrides)` starts from the dataclass (or a named preset), applies the YAML, then
`key.sub=value` overrides, and rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

# The warning for the old name of MaskGIT's choice temperature (muse.sampling, serve.config).
RENAMED_TEMPERATURE = ("`temperature` is the choice temperature of MaskGIT's re-masking noise, not a softmax "
                       "temperature; it is now called `choice_temperature`")



@dataclass(frozen=True)
class SamplingDefaults:
    """Every sampling default, for the library, the CLIs and the server alike (Muse: 24 base and 8
    super-res steps; mask-free editing, §3.3: ~100 iterations resampling ~8% of the tokens)."""

    steps: int = 24
    superres_steps: int = 8
    guidance_scale: float = 4.0
    choice_temperature: float = 4.5  # MaskGIT's annealed Gumbel noise on the re-masking confidence
    edit_iterations: int = 100
    edit_fraction: float = 0.08


SAMPLING = SamplingDefaults()


@dataclass(frozen=True)
class VQGANConfig:
    """Convolutional VQGAN (Esser et al.) with an l2-normalised, factorised codebook (ViT-VQGAN).

    `form` "patch" (the tiny presets) reads each f x f patch on its own: a patchifying conv and 1x1
    layers of width base_channels (num_res_blocks hidden ones), no spatial mixing; channel_mult then
    only sets f."""

    resolution: int = 256  # image side the tokenizer is trained at
    form: str = "conv"  # "conv" (ResNet or plain strided conv stacks) | "patch"
    in_channels: int = 3
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one downsample between levels: f = 2**(len-1)
    num_res_blocks: int = 2  # per level; 0 = plain strided convs (conv -> GroupNorm -> SiLU) between levels
    mid_block: bool = True  # ResBlock-attention-ResBlock at the lowest resolution (Esser et al.)
    z_channels: int = 256
    codebook_size: int = 8192
    codebook_dim: int = 32  # low-dimensional lookup space; all codes stay in use (Yu et al. 2022)
    commitment_weight: float = 0.25
    dead_code_threshold: float = 1e-3  # EMA usage under which a code is restarted from the batch
    # A restarted code has ~ln(1/threshold)/(1-0.99) steps to be picked: 690 at 1e-3, 120 at 0.3.
    # Decoder-only widening/deepening for the decoder fine-tune stage (Muse §2.5); None = as encoder.
    decoder_base_channels: int | None = None
    decoder_num_res_blocks: int | None = None
    disc_channels: int = 64
    disc_layers: int = 3

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def tokens_per_side(self) -> int:
        return self.resolution // self.downsample_factor


@dataclass(frozen=True)
class TextEncoderConfig:
    """A T5-family encoder. `name_or_path` loads a Hugging Face model (local dir or s3://, never a
    download); None builds a small T5 encoder from these numbers with the tokenizer `tokenizer` names:
    "byt5", the byte-level ByT5 tokenizer (one token per UTF-8 byte, no vocabulary files), or "bpe", a
    byte-level BPE vocabulary of at most `vocab_size` fitted to the corpus's captions when the model
    root's text encoder is made (`muse.text.fit_bpe_tokenizer`): a token per word or word piece, so
    captions are ~5x shorter than in bytes and a random encoder hands each word a vector of its own."""

    name_or_path: str | None = None
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_kv: int = 16
    d_ff: int = 256
    vocab_size: int = 384  # ByT5: 3 specials + 256 bytes + 125 extra ids; "bpe": the most it fits
    max_length: int = 128  # tokens kept per caption (bytes for ByT5)
    dtype: str = "auto"  # "float32" | "bfloat16" | "auto" (bfloat16 on a GPU, float32 on a CPU); never float16
    tokenizer: str = "byt5"  # "byt5" | "bpe" (built encoders only; a pretrained one brings its own)

    def __post_init__(self):
        if self.tokenizer not in ("byt5", "bpe"):
            raise ValueError(f"text encoder tokenizer must be 'byt5' or 'bpe', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 259:
            raise ValueError(f"a byte-level BPE vocabulary holds 3 specials and 256 bytes before any merge: "
                             f"vocab_size must be >= 259, got {self.vocab_size}")


@dataclass(frozen=True)
class BaseTransformerConfig:
    """Base masked transformer over low-res image tokens (Muse §2.2)."""

    codebook_size: int = 8192
    tokens_per_side: int = 16
    hidden: int = 2048
    layers: int = 48
    heads: int = 32
    mlp: int = 8192
    text_dim: int = 4096  # T5-XXL width, projected linearly into `hidden`
    kv_heads: int | None = None  # cross-attention K/V heads (grouped-query); None = heads
    dropout: float = 0.0
    # Not in the paper: trainable self-attention layers over the projected text, for text encoders
    # that carry no meaning of their own (the random offline T5 of the tiny preset). 0 = the paper.
    text_layers: int = 0
    # Not in the paper: "sinusoidal" adds fixed positions to the projected text before those layers
    # (TextProjection), so they can tell which group of a caption a word belongs to. "none" = the paper.
    text_positions: str = "none"
    # Not in the paper (aMUSEd-512 does it): p x p tokens share one trunk position (TokenPatches). 1 = Muse.
    token_patch: int = 1
    # Not in the paper: every position also reads how many times each code is visible on the canvas
    # (TokenEmbedding). Attention averages, so "two of the three squares are drawn" reaches a position
    # only weakly; the tiny base then leaves room for the shapes still missing (benchmarks/RESULTS.md).
    canvas_counts: bool = False
    # Not in the paper: > 0 reads codes through the tokenizer's code vectors of this width, held in the
    # model, instead of a free embedding and logit row per code (TokenEmbedding), so that codes no
    # caption's image used (held-out colour-shape pairings) compose from the codes they resemble.
    code_dim: int = 0
    # What those vectors are: "codebook", the quantizer's unit code vectors; "pixels", the patch each code
    # decodes to and its outline (patch-form tokenizers: (in_channels + 1) * f * f wide,
    # code_vectors.pixel_code_vectors), in which a colour and a shape are nearly separate parts.
    code_vectors: str = "codebook"

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_side**2


@dataclass(frozen=True)
class SuperResTransformerConfig:
    """Super-res transformer (Muse §2.3): low-res tokens encoded by their own layers; high-res tokens
    cross-attend to the text and the low-res encoding."""

    lo_codebook_size: int = 8192
    hi_codebook_size: int = 8192
    lo_tokens_per_side: int = 16
    hi_tokens_per_side: int = 64
    hidden: int = 1024
    lo_layers: int = 16
    hi_layers: int = 32
    heads: int = 16
    mlp: int = 4096
    text_dim: int = 4096
    kv_heads: int | None = None
    dropout: float = 0.0
    text_layers: int = 0  # as BaseTransformerConfig.text_layers
    text_positions: str = "none"  # as BaseTransformerConfig.text_positions
    token_patch: int = 1  # as BaseTransformerConfig.token_patch, over the high-res grid
    canvas_counts: bool = False  # as BaseTransformerConfig.canvas_counts, over the high-res tokens
    code_dim: int = 0  # as BaseTransformerConfig.code_dim, for the high-res tokens (embedding and logits)
    lo_code_dim: int = 0  # the same for the low-res tokens it reads
    code_vectors: str = "codebook"  # as BaseTransformerConfig.code_vectors, for both
    # Not in the paper: also add each low-res token's encoding to the high-res positions it covers, so
    # the spatial alignment need not be learned through cross-attention alone (for short CPU runs).
    lo_skip: bool = False
    # Not in the paper: each high-res code's logit also scores how well its patch matches the upsampled
    # low-res image there (muse/code_vectors.PixelPrior; patch-form tokenizers, code_vectors "pixels").
    pixel_prior: bool = False

    @property
    def num_tokens(self) -> int:
        return self.hi_tokens_per_side**2


# ---------------------------------------------------------------------------------------------
# The aMUSEd family (imported from diffusers checkpoints by `muse import amused`; muse/amused.py).


@dataclass(frozen=True)
class CLIPTextConfig:
    """A CLIP text encoder with its projection (aMUSEd: CLIP-L/14). Its architecture is saved beside
    the weights (clip_config.json); these fields are what the rest of the model root reads."""

    name_or_path: str | None = None  # where it was imported from (informational)
    hidden: int = 768  # width of the hidden states (and of the pooled projection: one sequence holds both)
    max_length: int = 77  # prompts are padded to this many tokens, as aMUSEd does


@dataclass(frozen=True)
class VQConfig:
    """diffusers' `VQModel` (taming-style conv encoder/decoder, codebook lookup), as aMUSEd uses it:
    images in [0, 1] at the model's boundary, ids from the nearest code."""

    resolution: int = 256
    in_channels: int = 3
    out_channels: int = 3
    channels: tuple[int, ...] = (128, 256, 256, 512, 768)  # one 2x downsample between levels
    layers_per_block: int = 2  # res blocks per encoder level (decoder: one more)
    groups: int = 32  # GroupNorm groups
    latent_channels: int = 64
    codebook_size: int = 8192
    codebook_dim: int | None = None  # None = latent_channels
    mid_attention: bool = False  # aMUSEd's VQ has none

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @property
    def tokens_per_side(self) -> int:
        return self.resolution // self.downsample_factor


@dataclass(frozen=True)
class UViTConfig:
    """aMUSEd's U-ViT (diffusers `UVit2DModel`): conv stages of ConvNeXt blocks with cross-attention
    around a transformer of RMSNorm / adaLN / GEGLU layers; amused-256 by default."""

    codebook_size: int = 8192
    vocab_size: int = 8256  # embedding rows (codebook + [MASK], rounded up)
    mask_token_id: int = 8255  # aMUSEd's: the last row
    tokens_per_side: int = 16
    hidden: int = 1024
    layers: int = 22
    heads: int = 16
    mlp: int = 2816  # GEGLU inner width
    embed_dim: int = 768  # token embedding width (diffusers' in_channels)
    conv_channels: int = 768  # width of the conv stages (block_out_channels)
    res_blocks: int = 3  # per conv stage
    conv_heads: int = 12
    downsample: bool = False  # amused-512: 2x2 stride-2 conv before the transformer ...
    upsample: bool = False  # ... and a transposed conv after it
    text_dim: int = 768  # CLIP hidden width; the text input is [pooled ; hidden states]
    text_len: int = 77  # CLIP tokens per prompt
    micro_cond_dim: int = 256  # sinusoidal width of each micro-condition
    # [orig_width, orig_height, crop_top, crop_left, aesthetic]: aMUSEd's default is [res, res, 0, 0, 6]
    micro_conds: tuple[float, ...] = (256, 256, 0, 0, 6)
    bias: bool = False
    eps: float = 1e-6
    affine: bool = True  # RMSNorm / LayerNorm weights
    dropout: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.tokens_per_side**2


@dataclass(frozen=True)
class MuseConfig:
    """Everything in a model root: one config per component."""

    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vqgan_lo: VQGANConfig = field(default_factory=VQGANConfig)
    vqgan_hi: VQGANConfig = field(default_factory=VQGANConfig)
    base: BaseTransformerConfig = field(default_factory=BaseTransformerConfig)
    superres: SuperResTransformerConfig = field(default_factory=SuperResTransformerConfig)


# ---------------------------------------------------------------------------------------------
# Presets. Paper sizes follow Muse (arXiv 2301.00704) Table/§4; `tiny` trains on 2 CPU cores.

T5_XXL_DIM = 4096

# The tiny transformers read the random offline T5 through trainable text layers (text_layers); the
# tiny base reads how many of each code its canvas shows (canvas_counts) and where in its caption a
# word is (text_positions: which group of a two-group caption it belongs to); both put 2x2 tokens on
# one trunk position (token_patch): 2.2x cheaper steps for the base, a third of the step time for the
# super-res model. Measured on the demo's corpus in benchmarks/RESULTS.md, "One image per caption".
_BASE_TINY = BaseTransformerConfig(
    codebook_size=512, tokens_per_side=8, hidden=128, layers=4, heads=4, mlp=512, text_dim=64, text_layers=2,
    canvas_counts=True, text_positions="sinusoidal", token_patch=2,
)
_SUPERRES_TINY = SuperResTransformerConfig(
    lo_codebook_size=512, hi_codebook_size=512, lo_tokens_per_side=8, hi_tokens_per_side=16,
    hidden=128, lo_layers=2, hi_layers=3, heads=4, mlp=512, text_dim=64, lo_skip=True, text_layers=1,
    token_patch=2,
)

PRESETS: dict[str, Any] = {
    # Tokenizers
    "vqgan-f16-8192": VQGANConfig(resolution=256, channel_mult=(1, 1, 2, 2, 4)),
    "vqgan-f8-8192": VQGANConfig(resolution=512, channel_mult=(1, 2, 2, 4)),
    # The tiny tokenizers (benchmarks/vqgan_recipe.py, RESULTS.md): the patch form, each 8x8 patch read
    # and drawn on its own through one hidden 1x1 layer of width 256, with quick dead-code restarts
    # drawn by misfit (threshold 0.3). On the demo's grid corpus a shape is one token at 64 px and 2x2
    # at 128 px, and this form gives it its own code within a few hundred steps, where the plain
    # strided conv stacks (whose tokens also see the neighbouring cells) were still far off after
    # 2,000. The 128 px tokenizer has the 16x16 grid, the paper's base grid, that the full chain is
    # drawn from.
    "vqgan-tiny": VQGANConfig(
        resolution=64, form="patch", base_channels=256, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
        mid_block=False, z_channels=64, codebook_size=512, codebook_dim=16, dead_code_threshold=0.3,
        disc_channels=32, disc_layers=2,
    ),
    "vqgan-hi-tiny": VQGANConfig(
        resolution=128, form="patch", base_channels=256, channel_mult=(1, 2, 2, 4), num_res_blocks=1,
        mid_block=False, z_channels=64, codebook_size=512, codebook_dim=16, dead_code_threshold=0.3,
        disc_channels=32, disc_layers=2,
    ),
    # Text encoders
    "t5-tiny": TextEncoderConfig(),
    # The same encoder over a BPE vocabulary fitted to the corpus's captions (configs/demo.yaml):
    # 14 tokens for a two-group caption where ByT5 has 75, so its base steps are ~1.4x faster and
    # learn the prompts in about half the steps (benchmarks/RESULTS.md).
    "t5-tiny-bpe": TextEncoderConfig(vocab_size=1024, tokenizer="bpe"),
    "t5-xxl": TextEncoderConfig(name_or_path="google/t5-v1_1-xxl", d_model=T5_XXL_DIM),
    # Transformers
    "base-632m": BaseTransformerConfig(hidden=1280, layers=24, heads=20, mlp=5120),
    "base-3b": BaseTransformerConfig(hidden=2048, layers=48, heads=32, mlp=8192, kv_heads=8),
    "base-tiny": _BASE_TINY,
    # The demo's: the same, reading codes through the tokenizers' code vectors (code_dim, set from the
    # tokenizers when trained), so that a pairing the captioned corpus holds out can still be drawn.
    "base-tiny-codes": replace(_BASE_TINY, code_dim=256, code_vectors="pixels"),
    "superres-268m": SuperResTransformerConfig(hidden=640, lo_layers=16, hi_layers=32, heads=10, mlp=2048),
    "superres-tiny": _SUPERRES_TINY,
    "superres-tiny-codes": replace(_SUPERRES_TINY, code_dim=256, lo_code_dim=256, code_vectors="pixels",
                                   pixel_prior=True),
}

# aMUSEd (import the released weights with `muse import amused`; these list their architectures).
AMUSED_PRESETS: dict[str, Any] = {
    "clip-vit-l-14": CLIPTextConfig(name_or_path="openai/clip-vit-large-patch14"),
    "vq-amused-f16": VQConfig(),
    "uvit-amused-256": UViTConfig(),
    "uvit-amused-512": UViTConfig(tokens_per_side=32, downsample=True, upsample=True, micro_conds=(512, 512, 0, 0, 6)),
}
AMUSED_MODELS: dict[str, dict[str, str]] = {
    "amused-256": {"text_encoder": "clip-vit-l-14", "vqgan_lo": "vq-amused-f16", "base": "uvit-amused-256"},
    "amused-512": {"text_encoder": "clip-vit-l-14", "vqgan_lo": "vq-amused-f16", "base": "uvit-amused-512"},
}
PRESETS.update(AMUSED_PRESETS)

# Whole model roots by name: component preset names.
MODEL_PRESETS: dict[str, dict[str, str]] = {
    "tiny": {
        "text_encoder": "t5-tiny", "vqgan_lo": "vqgan-tiny", "vqgan_hi": "vqgan-hi-tiny",
        "base": "base-tiny", "superres": "superres-tiny",
    },
    "muse-632m": {
        "text_encoder": "t5-xxl", "vqgan_lo": "vqgan-f16-8192", "vqgan_hi": "vqgan-f8-8192",
        "base": "base-632m", "superres": "superres-268m",
    },
    "muse-3b": {
        "text_encoder": "t5-xxl", "vqgan_lo": "vqgan-f16-8192", "vqgan_hi": "vqgan-f8-8192",
        "base": "base-3b", "superres": "superres-268m",
    },
}


def preset(name: str) -> Any:
    """A component preset by name."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def model_preset(name: str) -> MuseConfig:
    """A whole model root's config by name ("tiny", "muse-632m", "muse-3b")."""
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
    return MuseConfig(**{part: preset(p) for part, p in MODEL_PRESETS[name].items()})


# ---------------------------------------------------------------------------------------------
# Dict / YAML conversion with strict keys.


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return json_ready(dataclasses.asdict(cfg))


def json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def from_dict(cls: type[T], data: dict[str, Any], base: T | None = None, where: str | None = None) -> T:
    """Build `cls` from `data` on top of `base` (or the defaults); unknown keys and bad values raise
    ValueError naming `where`: the section's path from the top (`TrainConfig.base.run`)."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.init}
    if unknown := sorted(set(data) - set(known)):
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    current = base if base is not None else cls()
    changes = {key: _coerce(hints[key], value, getattr(current, key), f"{where}.{key}") for key, value in data.items()}
    try:
        return replace(current, **changes)
    except ValueError as e:  # the section's own checks (__post_init__), which do not know where it sits
        raise ValueError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def _coerce(hint: Any, value: Any, current: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if is_dataclass(hint):
        return from_dict(hint, value, current if is_dataclass(current) else None, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, current, where)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(elem, v, None, where) for v in value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{where}: expected a bool, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}")
        try:
            out = hint(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
            raise ValueError(f"{where}: expected {hint.__name__}, got {value!r}") from None
        if hint is int and isinstance(value, float) and value != out:
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return out
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """["a.b=3", "c=[1,2]"] -> {"a": {"b": 3}, "c": [1, 2]} (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = _yaml(raw, f"override {item!r}") if raw.strip() else ""
    return out


def _yaml(text: str, where: str) -> Any:
    """YAML, or a ValueError naming `where` (what every command line turns into one usage line)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Deep merge of b onto a."""
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
         base: T | None = None) -> T:
    """Config of type `cls`: `base` (or defaults) <- YAML file at `path` <- `overrides`."""
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"config file {path}: {'a directory, not a file' if Path(path).is_dir() else 'no such file'}")
        loaded = _yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: the top level must be a mapping of keys to values")
        data = loaded
    data = merge(data, parse_overrides(list(overrides)))
    return from_dict(cls, data, base)
