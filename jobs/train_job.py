"""What one stage's run is: the `TrainJob` the driver plans and every Ray Train worker receives."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class TrainJob:
    """One stage's run. The stage's builder fills the first fields (`jobs.masked.build`,
    `jobs.vqgan`, `jobs.decoder`); `jobs.fit.fit_stage` adds the run's own when it starts the trainer,
    which hands it to each worker as its train_loop_config (`as_config`: Ray Train keeps that a dict)."""

    root: str  # the model root the run exports into (local or s3://)
    component: str  # the root's component it exports: base, superres, vqgan_lo, vqgan_hi
    stage: str = ""  # its config section, which --set names (vqgan for either tokenizer); "": the component's
    model_config: dict[str, Any] = field(default_factory=dict)  # the architecture, as its config's dict
    model_kind: str | None = None  # the config class, where not the stage's own (an imported U-ViT)
    data_meta: dict[str, Any] = field(default_factory=dict)  # the token shards' facts: text_dim, text_storage
    init_from: str | None = None  # a component whose weights the run starts from
    codes: str | None = None  # a transformer's: which tokenizers' codes it learns (`jobs.root_fit.codes_version`)
    lora_rank: int | None = None  # LoRA adapters of this rank on frozen weights
    tokens_from: str | None = None  # the decoder fine-tune's: the token version the decoder reads
    notes: tuple[str, ...] = ()  # what the run will do, said once it is not refused
    samples_dir: str | None = None  # where sample grids go; default ROOT/samples/<run name>
    # Set by fit_stage when the trainer starts:
    worker: str = ""  # the StageWorker's import path
    section: dict[str, Any] = field(default_factory=dict)  # the stage's config section, as a dict
    run_name: str = ""
    run_dir: str = ""  # the run's folder under run.storage_path: checkpoints, markers
    identity: dict[str, str] | None = None  # `jobs.preflight.run_identity`, kept in every checkpoint
    cached_rows: int | None = None  # rows of data cached in the object store: an epoch's length
    progress_board: Any = None  # the driver's progress board (an actor); None: verbose, workers print

    @property
    def section_name(self) -> str:
        """The config section: what --set names."""
        return self.stage or self.component

    def as_config(self) -> dict[str, Any]:
        """The fields as a dict, shallow (the board's actor handle stays one), for Ray Train."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> TrainJob:
        return cls(**config)
