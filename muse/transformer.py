"""Muse's masked image transformers (arXiv 2301.00704 §2.2–2.3).

The base model sees a grid of VQGAN token ids in which some are replaced by a [MASK] id and predicts
the original id at every position, conditioned on text:

    tokens (B, N) ──embed + 2D positions──▶ x (B, N, C)
    for each block:  x += SelfAttn(LN(x))              image tokens attend to each other
                     x += CrossAttn(LN(x), context)     ... and to the projected text
                     x += MLP(LN(x))
    logits = Linear(LN(x))  (B, N, codebook_size)

The text side of cross-attention does not change while an image is decoded, so its keys and values
are computed once per request by `encode_context` and reused at every sampling step. A learned "null"
context token is always present: dropping the text for classifier-free guidance means masking out
every text position, which leaves the null token (no empty-softmax NaNs, no extra encoder call).
The sampler's unconditional branch is that null token alone (`null_context`, cached per model).
Shared by both models (`TokenTransformer`); `forward(..., select=mask)` computes logits only at the
selected positions, which is all the sampler needs.

The super-res model (§2.3) first encodes the low-res token grid with its own self-attention layers;
high-res tokens then cross-attend to the concatenation [text ; low-res encoding]. Models that read codes
through code vectors, and super-res's pixel prior over the upsampled low-res image, are in
muse/code_vectors.py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from muse.code_vectors import CODE_VECTORS, PixelPrior, code_classes, pixel_patch_side
from muse.config import BaseTransformerConfig, SuperResTransformerConfig
from muse.context import Context, ContextStack, NullContextCache

AnyContext = Context | ContextStack


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, C); mask (B, N) bool, True = may be attended to (None = all)."""
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, N, C))  # (B, N, C)


class CrossAttention(nn.Module):
    """Queries from image tokens; keys/values from the context, precomputed once per request by `kv`
    (grouped K/V heads are expanded there, once, not at every decoding step)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, dropout: float):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.q = nn.Linear(hidden, hidden, bias=False)
        self.k = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(hidden, kv_heads * self.head_dim, bias=False)
        self.out = nn.Linear(hidden, hidden, bias=False)
        self.dropout = dropout

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L, _ = context.shape
        k = self.k(context).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(context).view(B, L, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        return k, v  # (B, H, L, Dh)

    def forward(self, x: torch.Tensor, context: AnyContext, layer: int) -> torch.Tensor:
        if isinstance(context, ContextStack):  # each part of the batch attends to its own context
            return torch.cat([self(part, c, layer) for part, c in zip(x.split(context.rows), context.parts)])
        B, N, C = x.shape
        v = context.values[layer]
        if not self.training and v.shape[2] == 1 and context.dense:
            # One key (the null context): attention returns its value whatever the query, so the
            # query projection and the attention are skipped: exact, and ~1/14 of a guided base step.
            return self.out(v.transpose(1, 2).reshape(v.shape[0], 1, C)).expand(B, N, C)
        q = self.q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, H, N, Dh)
        y = context.attend(layer, q, self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, hidden: int, mlp: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(hidden, mlp)
        self.down = nn.Linear(mlp, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer block; cross-attention is optional (the low-res encoder has none)."""

    def __init__(self, hidden: int, heads: int, mlp: int, dropout: float, kv_heads: int | None = None,
                 cross: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, dropout)
        self.cross = CrossAttention(hidden, heads, kv_heads or heads, dropout) if cross else None
        self.norm2 = nn.LayerNorm(hidden) if cross else None
        self.norm3 = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden, mlp, dropout)

    def forward(self, x: torch.Tensor, context: AnyContext | None = None, layer: int = 0,
                self_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), self_mask)
        if self.cross is not None:
            x = x + self.cross(self.norm2(x), context, layer)
        return x + self.mlp(self.norm3(x))


SAME_CODE_COSINE = 0.99  # code vectors this close are one code to a model that reads codes through them
UNDRAWN_LOGIT = -1.0e4  # the logit of a code that is not drawn: exp() of it is 0 in every float type


class TokenEmbedding(nn.Module):
    """Token ids (codebook + one [MASK] id) to vectors, plus learned 2D (row + column) positions.

    With `canvas_counts`, every position also gets a learned map of how many times each code is
    visible (not [MASK]) in its image: a sum over the canvas, where attention only averages. Zero at
    initialisation, so the model starts as the paper's.

    With `code_dim` > 0, codes are read through the tokenizer's code vectors (`code_vectors`, (K, d),
    fixed, saved with the model; `set_code_vectors`) instead of a free row per code: a code's
    embedding and canvas count are learned linear maps of what the code looks like, and
    `TokenTransformer` does the same for its logits. A code that no training target used (a
    colour-shape pairing held out of the captioned corpus, which the tokenizer learnt from other
    images) then still has an embedding and a logit that compose from the pairings it shares a colour
    or a shape with (benchmarks/RESULTS.md, "Codes read as the patches they draw")."""

    def __init__(self, codebook_size: int, side: int, hidden: int, canvas_counts: bool = False, code_dim: int = 0):
        super().__init__()
        self.side, self.codebook_size, self.code_dim = side, codebook_size, code_dim
        if code_dim:
            self.register_buffer("code_vectors", torch.zeros(codebook_size, code_dim))
            # Each code's class: the first code whose vector it matches (set_code_vectors).
            self.register_buffer("code_class", torch.arange(codebook_size))
            self.code_in = nn.Linear(code_dim, hidden)
            self.mask_embedding = nn.Parameter(torch.empty(hidden).normal_(std=0.02))
        else:
            self.tokens = nn.Embedding(codebook_size + 1, hidden)
        self.rows = nn.Parameter(torch.zeros(side, 1, hidden))
        self.cols = nn.Parameter(torch.zeros(1, side, hidden))
        nn.init.normal_(self.rows, std=0.02)
        nn.init.normal_(self.cols, std=0.02)
        # A parameter, not an nn.Linear, so that the models' weight init leaves it at zero.
        self.counts = nn.Parameter(torch.zeros(code_dim or codebook_size, hidden)) if canvas_counts else None

    @torch.no_grad()
    def set_code_vectors(self, vectors: torch.Tensor, same_by: torch.Tensor | None = None) -> None:
        """The tokenizer's code vectors (codebook_size, code_dim), e.g. `VectorQuantizer.codes()` or
        `pixel_code_vectors(VQGAN.code_pixels())`.

        Codes whose `same_by` vectors (default: `vectors`) match (cosine > SAME_CODE_COSINE) are one
        class (with the codes those match, and so on): each maps to the first of them (`code_class`), and
        only that one gets a logit. A codebook kept in use by dead-code restarts holds many copies of each
        kind of patch (the tiny tokenizers: 512 codes, ~20 kinds), and logits that are maps of the vectors
        could not tell the copies apart.
        Copies are told by the codebook: their decoded patches differ by a little noise."""
        if not self.code_dim:
            raise ValueError("this model reads codes through a free embedding (code_dim 0): it holds no code vectors")
        if tuple(vectors.shape) != tuple(self.code_vectors.shape):
            raise ValueError(f"code vectors must be {tuple(self.code_vectors.shape)} (codebook_size, code_dim), "
                             f"got {tuple(vectors.shape)}")
        if same_by is not None and len(same_by) != len(vectors):
            raise ValueError(f"same_by must give one vector per code ({len(vectors)}), got {len(same_by)}")
        self.code_vectors.copy_(vectors.to(self.code_vectors))
        unit = F.normalize((self.code_vectors if same_by is None else same_by.to(self.code_vectors)).float(),
                           dim=-1)
        self.code_class.copy_(code_classes(unit, SAME_CODE_COSINE))

    def undrawn(self) -> torch.Tensor | None:
        """(K,) bool: the codes that are not the first of their class, whose logits are floored."""
        if not self.code_dim:
            return None
        return self.code_class != torch.arange(self.codebook_size, device=self.code_class.device)

    def classes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (any shape, [MASK] allowed) -> the id of each code's class; identity without code vectors."""
        if not self.code_dim:
            return ids
        return torch.where(ids < self.codebook_size, self.code_class[ids.clamp(max=self.codebook_size - 1)], ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = (self.rows + self.cols).view(self.side * self.side, -1)  # (N, C)
        if self.code_dim:
            table = torch.cat([self.code_in(self.code_vectors.to(self.code_in.weight.dtype)),
                               self.mask_embedding[None].to(self.code_in.weight.dtype)])
            x = F.embedding(ids, table) + pos
        else:
            x = self.tokens(ids) + pos  # (B, N, C)
        if self.counts is None:
            return x
        codes = self.codebook_size
        # [MASK], the one id past the codebook, is counted in a last column and dropped.
        counts = x.new_zeros(ids.shape[0], codes + 1).scatter_add_(1, ids, x.new_ones(ids.shape))[:, :codes]
        if self.code_dim:  # the sum of the visible codes' vectors, mapped
            counts = counts @ self.code_vectors.to(counts.dtype)
        # Counted in grid rows (/ side), so that a few shapes give inputs below 1 at any grid size.
        return x + ((counts / self.side) @ self.counts)[:, None]  # (B, 1, C): the same for every position


class TokenPatches(nn.Module):
    """p x p neighbouring tokens share one trunk position: (B, side², C) -> (B, (side/p)², C) before
    the blocks and back after them, through linear maps. The down/upsample aMUSEd-512 puts around its
    transformer; Muse has none (p = 1). It cuts the trunk's work by p² while every token keeps its own
    embedding and logits, which is what lets the tiny preset train a 16x16 grid on a CPU."""

    def __init__(self, side: int, p: int, hidden: int):
        super().__init__()
        if side % p:
            raise ValueError(f"token_patch {p} does not divide the {side}x{side} token grid")
        self.side, self.p = side, p
        self.down = nn.Linear(p * p * hidden, hidden)
        self.up = nn.Linear(hidden, p * p * hidden)
        self.norm = nn.LayerNorm(hidden)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        s, p = self.side // self.p, self.p
        x = x.view(B, s, p, s, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, s * s, p * p * C)
        return self.down(x)  # (B, s², C)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        B, _, C = x.shape
        s, p = self.side // self.p, self.p
        x = self.up(x).view(B, s, s, p, p, C).permute(0, 1, 3, 2, 4, 5).reshape(B, s * p * s * p, C)
        return self.norm(x)  # (B, side², C)


TEXT_POSITIONS = ("none", "sinusoidal")


def sinusoidal(values: torch.Tensor, dim: int) -> torch.Tensor:
    """values (M,) -> (M, dim) as [cos ; sin] of values·10000^(-i/(dim/2)): positions of "Attention is
    all you need", aMUSEd's micro-conditioning (muse.uvit)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    angles = values.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TextProjection(nn.Module):
    """Text embeddings (B, L, D_text) -> (B, 1 + L, C) with the learned null token in front.

    With `layers` > 0 a small trainable self-attention trunk runs over [null ; text] (padding masked
    out, so a prompt's context never depends on what it is batched with). Not in the paper, whose T5
    is pretrained and carries meaning; a randomly initialised frozen T5 (the offline tiny preset) only
    carries byte identity and position, and the trunk learns to read the words from them.

    `positions` "sinusoidal" adds fixed sine/cosine positions to [null ; text] before the trunk (no
    parameters, any length): the random T5's own sense of order is too weak for the trunk to tell the
    first group of a caption from the second. It teaches the tiny base the sides of two-group scenes in
    ~4,500 steps, longer than the demo trains (benchmarks/RESULTS.md, "Fixed sinusoidal positions")."""

    def __init__(self, text_dim: int, hidden: int, layers: int = 0, heads: int = 4, mlp: int | None = None,
                 positions: str = "none"):
        super().__init__()
        if positions not in TEXT_POSITIONS or (positions == "sinusoidal" and hidden % 2):
            raise ValueError(f"text positions {positions!r} at width {hidden}: expected one of "
                             f"{TEXT_POSITIONS}, sinusoidal at an even width")
        self.positions = positions
        self.proj = nn.Linear(text_dim, hidden)
        self.null = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.normal_(self.null, std=0.02)
        self.layers = nn.ModuleList(
            Block(hidden, heads, mlp or 4 * hidden, 0.0, cross=False) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(hidden) if layers else None

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B = text.shape[0]
        x = torch.cat([self.null.expand(B, -1, -1), self.proj(text)], dim=1)  # (B, 1+L, C)
        if self.positions == "sinusoidal":
            x = x + sinusoidal(torch.arange(x.shape[1], device=x.device), x.shape[2]).to(x.dtype)
        mask = torch.cat([text_mask.new_ones(B, 1), text_mask], dim=1).bool()
        for layer in self.layers:
            x = layer(x, self_mask=mask)
        return (x if self.norm is None else self.norm(x)), mask


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


class StepCompiler:
    """`compile_step` for a model whose per-step work is `features(ids, context)`: the base and
    super-res transformers here, and aMUSEd's U-ViT (muse/uvit.py)."""

    def compile_step(self, mode: str | None = None) -> StepCompiler:
        """Run `features` through `torch.compile` from now on (mode None: "reduce-overhead", i.e. CUDA
        graphs, on a GPU; inductor's default on CPU). The first decode compiles for its shapes; a
        size that later changes (batch, prompt length, the other stage's grid) is compiled once more
        as a free size, so serving's changing batches and prompts stop compiling after a few requests
        (CUDA graphs still record once per shape). If compiling or running the compiled step fails,
        the model warns once and runs eagerly: the compiled path is never needed for correctness. Out of
        memory is the request's failure, not the compiler's: it is raised, and the compiled step stays.
        Compiled at the first decode on each device: `compile_step()`, then `.to("cuda")`, gets graphs."""
        self._step_mode, self._compiled, self._compiled_on = mode or "auto", None, None
        return self

    def _compiled_step(self, device: torch.device) -> Callable | None:
        mode = getattr(self, "_step_mode", None)
        if mode is not None and self._compiled_on != device.type:
            if mode == "auto":
                mode = "reduce-overhead" if device.type == "cuda" else "default"
            self._compiled, self._compiled_on = torch.compile(self.features, mode=mode, dynamic=None), device.type
        return self._compiled if mode is not None else None

    def _features(self, ids: torch.Tensor, context: AnyContext) -> torch.Tensor:
        compiled = None if torch.is_grad_enabled() else self._compiled_step(ids.device)
        if compiled is None:
            return self.features(ids, context)
        try:
            return compiled(ids, context.resolve())
        except torch.OutOfMemoryError:  # this request's size, not the compiler: eager would not fit either
            raise
        except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the eager step
            warnings.warn(f"the compiled step failed ({type(e).__name__}: {str(e)[:200]}); running eagerly",
                          RuntimeWarning, stacklevel=3)
            self._step_mode = self._compiled = None
            return self.features(ids, context)


class TokenTransformer(StepCompiler, nn.Module):
    """What the base and super-res models share: token embedding, the text projection, the
    cross-attending blocks and the logits head.

        ids (B, N) ──embed (+ input_bias)──▶ [fold patches] ──blocks(context)──▶ norm ──▶ [unfold] ──head──▶ logits

    A subclass builds its `Context` in `encode_context`; `forward` is the same for both."""

    def __init__(self, config, codebook_size: int, tokens_per_side: int, layers: int):
        super().__init__()
        c = config
        if min(c.hidden, c.heads, 1 if c.kv_heads is None else c.kv_heads) < 1:
            raise ValueError(f"hidden {c.hidden}, heads {c.heads} and kv_heads {c.kv_heads} must be >= 1")
        if c.hidden % c.heads or (c.kv_heads and c.heads % c.kv_heads):
            raise ValueError(f"hidden {c.hidden} / heads {c.heads} / kv_heads {c.kv_heads} do not divide")
        if c.code_vectors not in CODE_VECTORS:
            raise ValueError(f"code_vectors {c.code_vectors!r}: expected one of {CODE_VECTORS}")
        self.config = c
        self.codebook_size = codebook_size
        self.mask_token_id = codebook_size  # one id past the codebook
        self.num_tokens = tokens_per_side**2
        self.embed = TokenEmbedding(codebook_size, tokens_per_side, c.hidden, c.canvas_counts, c.code_dim)
        self.text_proj = TextProjection(c.text_dim, c.hidden, c.text_layers, c.heads, c.mlp, c.text_positions)
        self.blocks = nn.ModuleList(Block(c.hidden, c.heads, c.mlp, c.dropout, c.kv_heads) for _ in range(layers))
        self.norm = nn.LayerNorm(c.hidden)
        self.patches = TokenPatches(tokens_per_side, c.token_patch, c.hidden) if c.token_patch > 1 else None
        # With code vectors, each code's logit weights and bias are a linear map of its vector.
        self.head = nn.Linear(c.code_dim, c.hidden + 1) if c.code_dim else nn.Linear(c.hidden, codebook_size)
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def _context(self, vectors: torch.Tensor, mask: torch.Tensor, input_bias: torch.Tensor | None = None) -> Context:
        """K/V of every block over context vectors (B, L, C)."""
        kvs = [block.cross.kv(vectors) for block in self.blocks]
        return Context([k for k, _ in kvs], [v for _, v in kvs], mask, input_bias)

    def _empty_text(self) -> tuple[torch.Tensor, torch.Tensor]:
        """No text at all: (1, 0, D_text) and its (1, 0) mask. Encodes the same context as any text
        whose positions are all masked out, with nothing to mask."""
        p = self.text_proj.proj.weight
        return p.new_zeros(1, 0, self.config.text_dim), torch.zeros(1, 0, dtype=torch.bool, device=p.device)

    def forward(self, ids: torch.Tensor, context: AnyContext, select: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, N) with [MASK] = codebook_size -> logits (B, N, codebook_size); with `select`
        ((B, N) bool), only the selected positions' logits (M, codebook_size), in row-major order:
        the head's matmul and the logits' memory are spent only where a token is still to be drawn."""
        x = self._features(ids, context)
        prior = context.prior_pixels
        if select is not None:
            x, prior = x[select], None if prior is None else prior[select]
        return self.logits(x, prior)

    def logits(self, x: torch.Tensor, prior_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Normed token vectors (..., C) -> logits over the codebook (..., K); plus the pixel prior's
        where the context carries upsampled low-res pixels (super-res with `pixel_prior`)."""
        if not self.config.code_dim:
            return self.head(x)
        w = self.head(self.embed.code_vectors.to(self.head.weight.dtype)).to(x.dtype)  # (K, C + 1)
        logits = torch.addmm(w[:, -1], x.reshape(-1, x.shape[-1]), w[:, :-1].t()).view(*x.shape[:-1], w.shape[0])
        if prior_pixels is not None:
            logits = self.pixel_prior(logits, prior_pixels)
        # Only the first code of each class is ever drawn (TokenEmbedding.set_code_vectors). A finite
        # floor, not -inf: guidance mixes two such logits, and -inf - -inf is NaN.
        return logits.masked_fill(self.embed.undrawn(), UNDRAWN_LOGIT)

    def features(self, ids: torch.Tensor, context: AnyContext) -> torch.Tensor:
        """The fixed-shape part of a step: ids (B, N) -> normed token vectors (B, N, C)."""
        x = self.embed(ids)
        if context.input_bias is not None:
            x = x + context.input_bias
        if self.patches is not None:
            x = self.patches.fold(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, context, layer)
        x = self.norm(x)
        return x if self.patches is None else self.patches.unfold(x)


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before the text projection was named `text_proj` call it `text`."""
    for key in [k for k in state_dict if k.startswith(prefix + "text.")]:
        state_dict[prefix + "text_proj." + key[len(prefix) + 5:]] = state_dict.pop(key)


class MaskedTransformer(NullContextCache, TokenTransformer):
    """The base model: predicts low-res VQGAN token ids from partially masked ids and text."""

    def __init__(self, config: BaseTransformerConfig):
        super().__init__(config, config.codebook_size, config.tokens_per_side, config.layers)
        self.init_null_cache()
        self.apply(_init_weights)

    def encode_context(self, text: torch.Tensor, text_mask: torch.Tensor) -> Context:
        """Cross-attention K/V for every block, once per request. text (B, L, D_text), mask (B, L).
        A request whose mask is all False is unconditional (only the null token remains)."""
        return self._context(*self.text_proj(text, text_mask))  # over (B, 1+L, C)

    def null_context(self) -> Context:
        """The unconditional context (the null token alone, one row, no mask), cached
        (`NullContextCache`): computed once per set of weights, not once per request."""
        return self.cached_null(lambda: self.encode_context(*self._empty_text()))


class SuperResTransformer(TokenTransformer):
    """Predicts high-res token ids from masked high-res ids, text, and the low-res token grid."""

    def __init__(self, config: SuperResTransformerConfig):
        c = config
        super().__init__(c, c.hi_codebook_size, c.hi_tokens_per_side, c.hi_layers)
        self.lo_embed = TokenEmbedding(c.lo_codebook_size, c.lo_tokens_per_side, c.hidden, code_dim=c.lo_code_dim)
        self.lo_blocks = nn.ModuleList(
            Block(c.hidden, c.heads, c.mlp, c.dropout, cross=False) for _ in range(c.lo_layers)
        )
        self.lo_norm = nn.LayerNorm(c.hidden)
        self.lo_skip = nn.Linear(c.hidden, c.hidden) if c.lo_skip else None
        self.pixel_prior = None
        if c.pixel_prior:
            if c.code_vectors != "pixels" or not c.code_dim or not c.lo_code_dim:
                raise ValueError("pixel_prior reads the codes' pixels: it needs code_vectors 'pixels' and both "
                                 "code_dim and lo_code_dim")
            self.pixel_prior = PixelPrior(c.lo_codebook_size, c.lo_tokens_per_side, pixel_patch_side(c.lo_code_dim),
                                          c.hi_codebook_size, c.hi_tokens_per_side, pixel_patch_side(c.code_dim))
        self.apply(_init_weights)
        if self.lo_skip is not None:  # starts as the paper's model; the skip grows in as it helps
            nn.init.zeros_(self.lo_skip.weight)

    def encode_context(self, text: torch.Tensor, text_mask: torch.Tensor, lo_ids: torch.Tensor) -> Context:
        """Encode the low-res grid (B, n_lo) and build K/V over [null ; text ; low-res] once per request.
        The low-res encoding stays visible when the text is dropped: guidance acts on the text only."""
        lo = self.lo_embed(lo_ids.reshape(lo_ids.shape[0], -1))
        for block in self.lo_blocks:
            lo = block(lo)
        lo = self.lo_norm(lo)  # (B, n_lo, C)
        txt, txt_mask = self.text_proj(text.expand(lo.shape[0], -1, -1), text_mask.expand(lo.shape[0], -1))
        ctx = torch.cat([txt, lo], dim=1)
        mask = torch.cat([txt_mask, txt_mask.new_ones(lo.shape[:2])], dim=1)
        context = self._context(ctx, mask, self.lo_skip_bias(lo))
        if self.pixel_prior is not None:
            context.prior_pixels = self.pixel_prior.prior_pixels(lo_ids)  # float32: the prior adds in float32
        return context

    def null_context(self, lo_ids: torch.Tensor) -> Context:
        """The unconditional context for each low-res grid: [null ; low-res], with no mask."""
        return self.encode_context(*self._empty_text(), lo_ids)

    def lo_skip_bias(self, lo: torch.Tensor) -> torch.Tensor | None:
        """Low-res encodings (B, n_lo, C) -> (B, N_hi, C): each one copied to the high-res positions
        it covers, through `lo_skip`; None without it."""
        if self.lo_skip is None:
            return None
        c = self.config
        grid = lo.transpose(1, 2).reshape(lo.shape[0], lo.shape[2], c.lo_tokens_per_side, c.lo_tokens_per_side)
        up = F.interpolate(grid, size=(c.hi_tokens_per_side, c.hi_tokens_per_side), mode="nearest")
        return self.lo_skip(up.flatten(2).transpose(1, 2))
