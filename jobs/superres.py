"""Stage `superres`: the super-res transformer on low-res + high-res token shards (Muse §2.3).

    muse train superres --config configs/demo.yaml --tokens TOKENS --checkpoint ROOT
    python -m jobs.superres ...

The same masked-token recipe as `base` (jobs.masked) on `tokens_hi`, conditioned on the text and the
sample's `tokens_lo`. Sample grids take a few fixed training rows and show, per row, the low-res
image, the generated high-res image and the real high-res tokens decoded (ROOT/vqgan_lo, vqgan_hi).
Exports the EMA weights to ROOT/superres/.
"""

from __future__ import annotations

import torch
from torch import nn

from jobs import masked
from jobs.common import image_grid
from jobs.masked import MaskedWorker
from jobs.stage import Stage, transformer_finished
from muse.config import SuperResTransformerConfig
from muse.data.images import tensor_to_pil

SAMPLE_ROWS = 4


class SuperResWorker(MaskedWorker):
    target = "tokens_hi"
    kind = "superres"

    def config_type(self) -> type:
        return SuperResTransformerConfig

    def code_vector_sources(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(model.embed, "vqgan_hi"), (model.lo_embed, "vqgan_lo")]

    def lo_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["tokens_lo"].to(self.env.device)  # (B, n_lo)

    def flops_per_sample(self, text_len: int) -> float:
        c = self.model_config
        n_lo, n_hi = c.lo_tokens_per_side ** 2, c.num_tokens
        ctx = text_len + 1 + n_lo  # null + text + low-res encoding

        def tokens_for(name: str) -> int:
            if name.startswith("lo_blocks."):
                return n_lo
            if name.startswith("text."):
                return text_len
            return ctx if ".cross.k" in name or ".cross.v" in name else n_hi

        attention = 12.0 * c.hidden * (c.lo_layers * n_lo * n_lo + c.hi_layers * n_hi * (n_hi + ctx))
        return self.matmul_flops(tokens_for) + attention

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, float]:
        if self.env.is_main and not hasattr(self, "_sample_rows"):
            self._sample_rows = {k: v[:SAMPLE_ROWS].clone() for k, v in batch.items()}  # fixed rows for grids
        return super().train_step(batch, step)

    @torch.no_grad()
    def sample_grid(self, step: int):
        from muse.token_stages import TextCondition, superres_tokens

        model = self.eval_model()
        if model is None or not hasattr(self, "_sample_rows"):
            return None
        vq_lo, vq_hi = self.vqgan("vqgan_lo"), self.vqgan("vqgan_hi")
        if vq_hi is None or (self.uses_ids and self.sampling_text_encoder() is None):
            return None
        rows = self._sample_rows
        c = self.model_config
        lo = rows["tokens_lo"].to(self.env.device).view(-1, c.lo_tokens_per_side, c.lo_tokens_per_side)
        emb, mask = self.text_condition(rows)
        gens = [torch.Generator(self.env.device).manual_seed(i) for i in range(lo.shape[0])]
        hi = superres_tokens(model, TextCondition(emb, mask), lo, steps=self.section.sample_steps,
                             guidance_scale=self.section.sample_guidance, generator=gens)  # (K, H, W)
        real = rows["tokens_hi"].to(self.env.device).view_as(hi)
        columns = [vq_hi.decode(hi), vq_hi.decode(real)]
        if vq_lo is not None:
            columns.insert(0, vq_lo.decode(lo))
        grid = [[tensor_to_pil(col[i]) for col in columns] for i in range(lo.shape[0])]
        labels = ["low-res | generated | real" if vq_lo is not None else "generated | real"] * len(grid)
        return image_grid(grid, labels)


STAGE = Stage(
    name="superres",
    summary="train the super-res transformer on token shards with tokens_hi",
    worker=SuperResWorker,
    build=lambda cfg, data, root, component, format: masked.build("superres", SuperResWorker, cfg, data, root),
    data="tokens",
    data_help="token shards with tokens_hi written by `muse tokenize` (local or s3://)",
    add_args=masked.model_arg("superres"),
    finished=transformer_finished("superres"),
    preflight=lambda cfg, data, root: masked.preflight("superres", cfg, data, root),
)


def main(argv: list[str] | None = None) -> None:
    STAGE.main(argv)


if __name__ == "__main__":
    main()
