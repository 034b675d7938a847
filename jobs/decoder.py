"""Stage `decoder`: decoder fine-tuning (Muse §2.5).

    muse train decoder --config configs/demo.yaml --corpus CORPUS --checkpoint ROOT
    python -m jobs.decoder ...

Loads ROOT/vqgan_hi (or vqgan_lo; `decoder.component`), replaces its decoder by a wider/deeper one
(`muse.vqgan.widen_decoder`: encoder and codebook copied, so images map to exactly the same token
ids and the transformers stay valid), freezes everything else (`freeze_for_decoder_finetune`) and
trains the new decoder with the VQGAN stage's reconstruction + adversarial losses. The transformers
are not involved at all, so they are frozen by construction. Sample grids show image | old decoder |
new decoder (image | new decoder when a finished run goes on: the root then holds its own export, not
the old decoder); the export replaces the component in the root (config.json records decoder_finetuned).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from jobs.config import DecoderStage, TrainConfig
from jobs.fit import fit_stage, run_dir
from jobs.preflight import RunRefused
from jobs.stage import Stage, finished
from jobs.train_job import TrainJob
from jobs.vqgan import CORPUS_HELP, VQGAN_COMPONENTS, VQGANWorker, corpus_args
from muse import checkpoint
from muse.components import TOKENS_FROM, token_version
from muse.config import to_dict
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
        own_export = checkpoint.component_extra(uri).get("run") == self.job.run_name
        if own_export and self.env.is_main:  # a finished run continued: the old decoder is gone from the root
            print(f"[{self.job.run_name}] {uri} holds this run's own export: the sample grids show the "
                  "new decoder only", flush=True)
        self.original = self.original.to(self.env.device) if self.env.is_main and not own_export else None
        return freeze_for_decoder_finetune(wide)

    def quantizer_warmup_steps(self) -> int:
        return 0  # the encoder and codebook are frozen: tokens must not change

    def reconstructions(self, model: VQGAN, images: torch.Tensor) -> list[torch.Tensor]:
        ids = model.encode(images)
        old = [self.original.decode(ids)] if self.original is not None else []
        return old + [model.decode(ids)]

    def export_extra(self, step: int) -> dict:
        # The encoder and codebook are frozen: its tokens are those of the tokenizer it started from.
        return super().export_extra(step) | {"decoder_finetuned": True, TOKENS_FROM: self.job.tokens_from}


def widened_config(root: str, component: str, section: DecoderStage):
    """The config of ROOT/<component> with the decoder widths of `section` (computed on the driver)."""
    kind, cfg = checkpoint.read_component_config(checkpoint.component_uri(root, component))
    if kind != "vqgan":
        raise RunRefused(f"{root}/{component} is a {kind!r} component, not a VQGAN")
    return replace(cfg, decoder_base_channels=section.decoder_base_channels,
                   decoder_num_res_blocks=section.decoder_num_res_blocks)


def decoder_component(root: str, component: str) -> str:
    if component == "auto":
        return "vqgan_hi" if checkpoint.has_component(root, "vqgan_hi") else "vqgan_lo"
    return component


def build(cfg: TrainConfig, data: str, root: str, component: str | None, format: str) -> list[Any]:
    from jobs.data import run_images
    from jobs.perceptual import check_weights

    section = cfg.decoder
    check_weights(section.gan.perceptual_weights)
    component = decoder_component(root, component or section.component)
    if not checkpoint.has_component(root, component):
        raise RunRefused(f"the model root {root} has no {component}/ to fine-tune the decoder of")
    wide = widened_config(root, component, section)
    job = TrainJob(root=root, component=component, stage="decoder", model_config=to_dict(wide),
                   tokens_from=token_version(checkpoint.component_uri(root, component)))
    section = replace(section, run=decoder_run(section, component))
    with run_images(data, wide.resolution, cfg.tokenize, format, section.run.cache_data,
                    run_dir(root, section.run, component), section.run.seed) as dataset:
        return [fit_stage(DecoderWorker, section, job, dataset)]


def decoder_run(section: DecoderStage, component: str):
    """The fine-tune's run settings, named: `run.name`, else `decoder_<component>`."""
    return replace(section.run, name=section.run.name or f"decoder_{component}")


def decoder_finished(cfg: TrainConfig, root: str, component: str) -> bool:
    """Whether ROOT/<component> holds the export of this config's fine-tune run (its name and max_steps)."""
    return finished(root, component, "decoder", decoder_run(cfg.decoder, component))


STAGE = Stage(
    name="decoder",
    summary="fine-tune a wider/deeper VQGAN decoder (encoder, codebook, transformers frozen)",
    worker=DecoderWorker,
    build=build,
    data="corpus",
    data_help=CORPUS_HELP,
    add_args=corpus_args(("auto",) + VQGAN_COMPONENTS, "which tokenizer's decoder (default: decoder.component; "
                                                       "auto = vqgan_hi when the root has one)"),
)


def main(argv: list[str] | None = None) -> None:
    STAGE.main(argv)


if __name__ == "__main__":
    main()
