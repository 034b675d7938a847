"""Ray Train stages for Muse: vqgan -> (tokenize) -> base, superres -> decoder.

Each stage is a thin Ray layer over `muse/`: `jobs.<stage>` builds a `TorchTrainer` from
`jobs.config.TrainConfig`, its per-worker step calls `muse` models and losses, and at the end it
exports its component(s) into the model root that `MusePipeline.from_pretrained` loads.
`jobs.all` chains the stages; `jobs.cli.main` is `muse train ...`.
"""
