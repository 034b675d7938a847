"""Cross-attention context: what a transformer's image tokens attend to, encoded once per request.

`Context` holds one (keys, values) pair per block, already expanded to every query head, and the key
mask. When no key is masked (no padding), attention runs without a mask, which lets
`scaled_dot_product_attention` pick its fused kernels. A model with adaptive norms (aMUSEd's U-ViT)
also keeps one conditioning vector per row (`adaptive`), computed with the K/V. `ContextStack` puts
contexts of different lengths on top of each other along the batch without padding: classifier-free
guidance runs the conditional rows and the unconditional ones (a single null token) as one forward,
and each block's cross-attention attends each part to its own keys (`CrossAttention.forward`); a
model that attends all rows at once reads the stack as one padded Context (`ContextStack.flat`).
`NullContextCache` keeps a model's unconditional context from one request to the next.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class Context:
    """Per-request cross-attention keys/values, one (k, v) pair per block, and the key mask."""

    keys: list[torch.Tensor]  # each (B, H, L, Dh)
    values: list[torch.Tensor]  # each (B, H, L, Dh)
    mask: torch.Tensor  # (B, L) bool, True = attend
    input_bias: torch.Tensor | None = None  # (B, N, C) added to the token embeddings (super-res lo_skip)
    adaptive: torch.Tensor | None = None  # (B, D) conditioning of adaptive norms (U-ViT: pooled text + micro-conds)
    prior_pixels: torch.Tensor | None = None  # (B, N, D) the super-res pixel prior's upsampled low-res pixels

    _dense: bool | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def dense(self) -> bool:
        """No key is masked, so attention needs no mask. Read once, on first use: a host sync, which
        contexts only built on the way to another (repeat, index, cat) never pay. Cached in a plain
        field, not a functools.cached_property, whose lock torch.compile cannot trace: every block
        would become a graph of its own (`resolve` reads it before a compiled step)."""
        if self._dense is None:
            self._dense = bool(self.mask.all())
        return self._dense

    def resolve(self) -> Context:
        """Read what is read lazily (`dense`), so that a compiled step finds it as a constant."""
        _ = self.dense
        return self

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    def attend(self, layer: int, q: torch.Tensor, dropout: float = 0.0) -> torch.Tensor:
        """Attention of queries q (B, H, N, Dh) over this context's keys of block `layer`."""
        k, v = self.keys[layer], self.values[layer]
        if k.shape[0] != q.shape[0]:  # a one-row context (the null text) serves every row
            k, v = k.expand(q.shape[0], -1, -1, -1), v.expand(q.shape[0], -1, -1, -1)
        mask = None if self.dense else self.mask[:, None, None, :]
        if mask is not None and mask.shape[0] != q.shape[0]:
            mask = mask.expand(q.shape[0], -1, -1, -1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)

    def repeat(self, n: int) -> Context:
        """Each request repeated n times in a row (for n images per prompt)."""
        rep = lambda t: None if t is None else t.repeat_interleave(n, dim=0)  # noqa: E731
        return Context([rep(k) for k in self.keys], [rep(v) for v in self.values], rep(self.mask),
                       rep(self.input_bias), rep(self.adaptive), rep(self.prior_pixels))

    def index(self, idx: torch.Tensor | slice) -> Context:
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return Context([k[idx] for k in self.keys], [v[idx] for v in self.values], self.mask[idx],
                       pick(self.input_bias), pick(self.adaptive), pick(self.prior_pixels))

    @staticmethod
    def cat(contexts: list[Context]) -> Context:
        """Stack contexts along the batch, padding the key length (padded keys are masked out).
        `ContextStack` does the same without padding."""
        length = max(c.mask.shape[1] for c in contexts)

        def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
            missing = length - t.shape[dim]
            if missing == 0:
                return t
            shape = list(t.shape)
            shape[dim] = missing
            return torch.cat([t, t.new_zeros(shape)], dim=dim)

        n_blocks = len(contexts[0].keys)
        keys = [torch.cat([pad(c.keys[i], 2) for c in contexts]) for i in range(n_blocks)]
        values = [torch.cat([pad(c.values[i], 2) for c in contexts]) for i in range(n_blocks)]
        rows = lambda name: None if getattr(contexts[0], name) is None else torch.cat(  # noqa: E731
            [getattr(c, name) for c in contexts])
        return Context(keys, values, torch.cat([pad(c.mask, 1) for c in contexts]), rows("input_bias"),
                       rows("adaptive"), rows("prior_pixels"))


class ContextStack:
    """Contexts stacked along the batch, each serving `rows` consecutive rows (a one-row context
    may serve many: it is broadcast, never copied). Cross-attention runs per part, so parts of
    different lengths need no padding and a dense part keeps the unmasked kernels."""

    def __init__(self, parts: list[Context], rows: list[int] | None = None):
        self.parts = list(parts)
        self.rows = [c.batch_size for c in self.parts] if rows is None else list(rows)
        for c, n in zip(self.parts, self.rows):
            if c.batch_size not in (1, n):
                raise ValueError(f"a context of {c.batch_size} rows cannot serve {n}")
        self.input_bias, self.prior_pixels = self._rows("input_bias"), self._rows("prior_pixels")

    def _rows(self, name: str) -> torch.Tensor | None:
        """A per-row (B, N, D) field of every part, stacked (a one-row part broadcast over its rows)."""
        values = [getattr(c, name) for c in self.parts]
        if any(v is None for v in values) != all(v is None for v in values):
            raise ValueError(f"either every stacked context has an {name} or none has")
        return None if values[0] is None else torch.cat([v.expand(n, -1, -1) for v, n in zip(values, self.rows)])

    @property
    def batch_size(self) -> int:
        return sum(self.rows)

    def resolve(self) -> ContextStack:
        for part in self.parts:
            part.resolve()
        return self

    @functools.cached_property
    def flat(self) -> Context:
        """The parts as one Context of `batch_size` rows (one-row parts repeated, key lengths padded
        and masked), built once per stack: for models that attend every row in one call."""
        parts = [c.repeat(n) if c.batch_size == 1 and n > 1 else c for c, n in zip(self.parts, self.rows)]
        return parts[0] if len(parts) == 1 else Context.cat(parts)


class NullContextCache:
    """A model's unconditional context, encoded once and reused by every request until the weights
    change. The key is the autocast state (a context encoded under bf16 autocast is bf16) and each
    weight's storage and version: an in-place update or a training step bumps a version, and a module
    swapped for another (LoRA added or merged) brings other storages. Loading weights
    (`load_state_dict`, also with assign=True, whose fresh tensors start at version 0 again) empties
    the cache. Writes through `.data` bypass versions: call `forget_null()` after them."""

    def init_null_cache(self) -> None:
        self._null: tuple[tuple, Context] | None = None
        self.register_load_state_dict_post_hook(_forget_null)

    def forget_null(self) -> None:
        self._null = None

    def cached_null(self, encode: Callable[[], Context]) -> Context:
        tensors = [*self.parameters(), *self.buffers()]
        device = tensors[0].device
        autocast = (torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type))
        # Inference tensors keep no version, and change in place only under inference mode.
        key = (device, autocast, tuple((t.data_ptr(), t.dtype, -1 if t.is_inference() else t._version)
                                       for t in tensors))
        if self._null is None or self._null[0] != key:
            with torch.no_grad():
                self._null = (key, encode())
        return self._null[1]


def _forget_null(module: NullContextCache, incompatible_keys) -> None:
    module._null = None
