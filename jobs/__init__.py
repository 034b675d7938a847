"""Ray Train stages for Muse: vqgan -> (tokenize) -> base, superres -> decoder.

Each stage is a thin Ray layer over `muse/`, defined in one module: `jobs.<stage>.STAGE` (a
`jobs.stage.Stage`) holds its per-worker class, whose step calls `muse` models and losses, its
driver builder, which makes the dataset and the `TorchTrainer` from `jobs.config.TrainConfig`, and its
command line; at the end a run exports its component(s) into the model root that
`MusePipeline.from_pretrained` loads. `jobs.stages` is the registry, `jobs.all` chains the stages and
`jobs.cli.main` is `muse train ...`.
"""
