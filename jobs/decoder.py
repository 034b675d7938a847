"""Stage `decoder`: decoder fine-tuning (Muse §2.5).

    muse train decoder --config configs/train_tiny.yaml --data CORPUS --output ROOT
    python -m jobs.decoder ...

Loads ROOT/vqgan_hi (or vqgan_lo; `decoder.component`), replaces its decoder by a wider/deeper one
(`muse.vqgan.widen_decoder`: encoder and codebook copied, so images map to exactly the same token
ids and the transformers stay valid), freezes everything else (`freeze_for_decoder_finetune`) and
trains the new decoder with the VQGAN stage's reconstruction + adversarial losses. The transformers
are not involved at all, so they are frozen by construction. Sample grids show image | old decoder |
new decoder; the export replaces the component in the root (config.json records decoder_finetuned).
"""

from __future__ import annotations

import torch

from jobs.config import DecoderStage
from jobs.vqgan import VQGANWorker
from muse import checkpoint
from muse.vqgan import VQGAN, freeze_for_decoder_finetune, widen_decoder


class DecoderWorker(VQGANWorker):
    config_class = DecoderStage
    stage = "decoder"

    def build_vqgan(self) -> VQGAN:
        uri = checkpoint.component_uri(self.root, self.component)
        self.original = checkpoint.load_component(uri, expect_kind="vqgan")
        wide = widen_decoder(self.original, self.section.decoder_base_channels, self.section.decoder_num_res_blocks)
        if wide.config != self.vq_config:
            raise ValueError(f"{uri} changed since the run started: its widened config {wide.config} differs "
                             f"from the run's {self.vq_config}")
        self.original = self.original.to(self.env.device) if self.env.is_main else None
        return freeze_for_decoder_finetune(wide)

    def reconstructions(self, model: VQGAN, images: torch.Tensor) -> list[torch.Tensor]:
        ids = model.encode(images)
        old = [self.original.decode(ids)] if self.original is not None else []
        return old + [model.decode(ids)]

    def export_extra(self, step: int) -> dict:
        return super().export_extra(step) | {"decoder_finetuned": True}


def widened_config(root: str, component: str, section: DecoderStage):
    """The config of ROOT/<component> with the decoder widths of `section` (computed on the driver)."""
    from dataclasses import replace

    kind, cfg = checkpoint.read_component_config(checkpoint.component_uri(root, component))
    if kind != "vqgan":
        raise ValueError(f"{root}/{component} is a {kind!r} component, not a VQGAN")
    return replace(cfg, decoder_base_channels=section.decoder_base_channels,
                   decoder_num_res_blocks=section.decoder_num_res_blocks)


def main(argv: list[str] | None = None) -> None:
    from jobs.stages import stage_main

    stage_main("decoder", argv)


if __name__ == "__main__":
    main()
