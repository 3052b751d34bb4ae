"""The training messages: what a `train` job asks for, the progress it reports, and what it returns."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

MODEL_NAME = r"^[a-z0-9][a-z0-9._-]{0,63}$"
MODEL_VERSION = r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$"


class TrainRequest(BaseModel):
    """Params of `train` on a build peer (the training queue)."""

    model_config = ConfigDict(extra="forbid")

    annotations: str = Field(
        min_length=1, max_length=4096,
        description="http(s) URL or path (under `trainer.data_dirs` of the peer) of a CSV with rows "
        "`image,x,y,width,height,class` (a header row naming these columns, in any order, is allowed). Image "
        "names are taken relative to the CSV's own location.")
    model: Optional[str] = Field(
        None, pattern=r"^https?://", max_length=4096,
        description="http(s) URL the finished package (.tar.gz) is PUT to. Empty: the peer's artifact server "
        "serves it.")
    status: Optional[str] = Field(
        None, pattern=r"^https?://", max_length=4096,
        description="http(s) URL that receives progress as JSON POSTs (TrainProgress), and a last POST when the "
        "job ends.")
    plugin: str = Field("classifier", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                        description="Trainer plugin (entry point group `cv_worker.trainer_plugins`).")
    epochs: int = Field(10, ge=1, le=10_000, description="Passes over the training set.")
    batch_size: int = Field(32, ge=1, le=4096, description="Samples per optimisation step.")
    name: str = Field("trained", pattern=MODEL_NAME, description="Name of the model package produced.")
    version: Optional[str] = Field(
        None, pattern=MODEL_VERSION, description="Version of the package; default a UTC timestamp.")
    validation_split: float = Field(
        0.2, ge=0, le=0.9, description="Share of the samples held out for validation metrics (stratified by class).")
    seed: int = Field(0, description="Seed of the shuffles and of the weight initialisation (reproducible runs).")
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="Plugin options, checked by the plugin (see docs/training.md).")


class TrainParams(TrainRequest):
    """Params of `train` on a node: the training request, plus where it runs and what happens to the result."""

    deploy: bool = Field(True, description="Install the trained model on this node (as `model.deploy` does: "
                         "download, sha256 check, atomic install, hot swap).")
    peer: Optional[str] = Field(
        None, pattern=r"^(\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127})$",
        description="Build peer id, or `*` for the shared queue; default `train.build_peer`, else mDNS.")
    grace_period_s: Optional[float] = Field(
        None, gt=0, le=7 * 24 * 3600, description="Override of `train.grace_period_s` for this job.")
    smoke_test: Optional[bool] = Field(None, description="Smoke-test the model when deploying; default from config.")

    def request(self) -> TrainRequest:
        return TrainRequest.model_validate(self.model_dump(include=set(TrainRequest.model_fields)))


class TrainProgress(BaseModel):
    """Training progress: in the `details` of the job's status (peer and node) and POSTed to `status`."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    state: str = Field(description="IN_PROGRESS while training; the job's final state on the last POST.")
    phase: Literal["loading", "training", "exporting", "uploading", "done", "failed"]
    progress: float = Field(ge=0, le=1, description="0.0-1.0 over the whole job.")
    epoch_current: int = Field(0, ge=0, description="1-based epoch being trained (0 before the first).")
    epoch_total: int = Field(ge=0)
    step_current: int = Field(0, ge=0, description="1-based step within the epoch.")
    step_total: int = Field(0, ge=0, description="Steps per epoch.")
    classification_loss: Optional[float] = Field(None, description="Mean training loss of the epoch so far.")
    val_loss: Optional[float] = Field(None, description="Validation loss of the last finished epoch.")
    val_accuracy: Optional[float] = Field(None, description="Validation accuracy (0-1) of the last finished epoch.")
    device: Optional[str] = Field(None, description="`cpu` or `cuda:N` (with the GPU name in `device_name`).")
    error: Optional[dict[str, str]] = Field(None, description="On the last POST of a failed job: code and message.")
    model: Optional[dict[str, Any]] = Field(None, description="On the last POST of a finished job: TrainedModel.")


class TrainedModel(BaseModel):
    """The `model` of a `train` job's final result (and of its last status and POST): the finished package."""

    name: str
    version: str
    url: str = Field(description="Where the package (.tar.gz) is: the PUT target, or the peer's artifact server.")
    sha256: str
    size: int
    formats: list[str]
    skipped_formats: dict[str, str] = Field(default_factory=dict, description="Formats not produced, and why.")
    labels: list[str]
    artifact_url: Optional[str] = Field(None, description="The copy on the peer's artifact server.")
