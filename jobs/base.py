"""Stage `base`: the base masked transformer on low-res token shards (Muse §2.2).

    muse train base --config configs/demo.yaml --tokens TOKENS --checkpoint ROOT
    python -m jobs.base ...            (the same, for `ray job submit --working-dir . -- python -m jobs.base ...`)

Reads token shards written by `muse tokenize`, re-encodes their text ids with ROOT/text_encoder,
trains with the masked-token recipe of `jobs.masked`, writes sample grids of the fixed prompts
(decoded with ROOT/vqgan_lo) to ROOT/samples/base/, and exports the EMA weights to ROOT/base/.
"""

from __future__ import annotations

import torch

from jobs import masked
from jobs.common import image_grid
from jobs.masked import MaskedWorker
from jobs.stage import Stage, transformer_finished
from muse.config import BaseTransformerConfig
from muse.data.images import tensor_to_pil

SAMPLES_PER_PROMPT = 2


class BaseWorker(MaskedWorker):
    target = "tokens_lo"
    kind = "base"

    def config_type(self) -> type:
        return BaseTransformerConfig

    def flops_per_sample(self, text_len: int) -> float:
        c = self.model_config
        n, ctx = c.num_tokens, text_len + 1  # + the null token

        def tokens_for(name: str) -> int:
            return ctx if name.startswith("text.") or ".cross.k" in name or ".cross.v" in name else n

        attention = 12.0 * c.layers * c.hidden * n * (n + ctx)  # scores and weighted sums, fwd + bwd
        return self.matmul_flops(tokens_for) + attention

    @torch.no_grad()
    def sample_grid(self, step: int):
        from muse.token_stages import TextCondition, base_tokens

        model = self.eval_model()
        if model is None:
            return None
        vqgan, encoder = self.vqgan("vqgan_lo"), self.sampling_text_encoder()
        if vqgan is None or encoder is None:
            return None
        prompts = list(self.section.sample_prompts)
        emb, mask = encoder(prompts)
        gens = [torch.Generator(self.env.device).manual_seed(i) for i in range(len(prompts) * SAMPLES_PER_PROMPT)]
        ids = base_tokens(model, TextCondition(emb.float(), mask), num_images=SAMPLES_PER_PROMPT,
                          steps=self.section.sample_steps, guidance_scale=self.section.sample_guidance,
                          generator=gens)  # (P·n, h, w)
        images = vqgan.decode(ids)
        rows = [[tensor_to_pil(images[i * SAMPLES_PER_PROMPT + j]) for j in range(SAMPLES_PER_PROMPT)]
                for i in range(len(prompts))]
        return image_grid(rows, prompts)


STAGE = Stage(
    name="base",
    summary="train the base transformer on token shards",
    worker=BaseWorker,
    build=lambda cfg, data, root, component, format: masked.build("base", BaseWorker, cfg, data, root),
    data="tokens",
    data_help="token shards written by `muse tokenize` (local or s3://)",
    add_args=masked.model_arg("base"),
    finished=transformer_finished("base"),
    preflight=lambda cfg, data, root: masked.preflight("base", cfg, data, root),
)


def main(argv: list[str] | None = None) -> None:
    STAGE.main(argv)


if __name__ == "__main__":
    main()
