"""The ``[train]`` (node side: where training is offloaded) and ``[trainer]`` (build peer) config sections."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

MiB = 1024 * 1024


class TrainConfig(BaseModel):
    """Node side: how a `train` job finds and watches its build peer."""

    model_config = ConfigDict(extra="forbid")

    build_peer: Optional[str] = Field(
        None, description="Peer id of the build system that trains for this node; `*`: any peer, through the "
        "shared training queue (the broker balances); empty: the first peer advertising `role=build` over mDNS.")
    grace_period_s: float = Field(
        60.0, gt=0, description="How long a build peer may be offline (or silent before answering) during a "
        "`train` job before the job fails; if it comes back in time with the job still running, the node "
        "reattaches.")
    discovery_timeout_s: float = Field(
        3.0, gt=0, le=60, description="How long to browse mDNS for `role=build` peers when no `build_peer` is set.")

    @field_validator("build_peer")
    @classmethod
    def _peer(cls, v: Optional[str]) -> Optional[str]:
        from agent.config import SAFE_TOKEN_RE

        if v in (None, "", "*"):
            return v or None
        if not SAFE_TOKEN_RE.match(v):
            raise ValueError("must be a peer id (letters, digits, '.', '_' or '-') or '*'")
        return v


class TrainerConfig(BaseModel):
    """Build peer side (`cv-worker trainer`): its queue, its artifact server, its data and its device."""

    model_config = ConfigDict(extra="forbid")

    peer_id: Optional[str] = Field(
        None, description="This build peer's id in topics and mDNS; default `<node_id>-build`, so a node and a "
        "trainer can share one machine and one config file.")
    state_dir: Optional[Path] = Field(
        None, description="Durable state of the build peer (its jobs and outbox); default `<state_dir>/trainer`.")
    group: str = Field(
        "trainers", description="Shared-subscription group on `{prefix}/trainers/jobs/+/request`: peers of one "
        "group share the queue (each job goes to one of them).")
    data_dirs: list[Path] = Field(
        default_factory=list, description="Directories that annotation CSVs and images named by a local path may "
        "come from (relative paths are taken from the first). Empty: only http(s) URLs.")
    work_dir: Optional[Path] = Field(None, description="Scratch space of running jobs; default `<state_dir>/training`.")
    artifacts_dir: Optional[Path] = Field(
        None, description="Where finished model packages are kept and served; default `<state_dir>/artifacts`.")
    keep_artifacts: int = Field(20, ge=1, description="Finished packages kept; older ones are deleted.")
    http_host: str = Field("0.0.0.0", description="Address the read-only artifact server listens on.")
    http_port: int = Field(8765, ge=0, le=65535, description="Port of the artifact server; 0: any free port.")
    public_url: Optional[str] = Field(
        None, pattern=r"^https?://", description="Base URL under which nodes reach the artifact server; default "
        "`http://<first address of this host>:<port>`.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train: `auto` uses the GPU when torch sees one, else the CPU.")
    threads: int = Field(0, ge=0, le=256, description="CPU threads torch may use; 0: torch's default (all cores).")
    max_images: int = Field(200_000, ge=1, description="Most annotation rows one job may have.")
    max_image_bytes: int = Field(32 * MiB, ge=1024, description="Largest image file (or download) accepted.")
    max_csv_bytes: int = Field(64 * MiB, ge=1024, description="Largest annotations CSV accepted.")
    download_timeout_s: float = Field(60.0, gt=0, description="Limit for one download (CSV or image).")
    upload_timeout_s: float = Field(300.0, gt=0, description="Limit for the PUT of a finished package.")
    status_timeout_s: float = Field(10.0, gt=0, description="Limit for one progress POST to a job's `status` URL.")
    status_interval_s: float = Field(
        1.0, ge=0, description="Least time between two progress POSTs (epoch ends and the end are always sent).")

    @field_validator("group", "peer_id")
    @classmethod
    def _token(cls, v: Optional[str]) -> Optional[str]:
        from agent.config import SAFE_TOKEN_RE

        if v is not None and not SAFE_TOKEN_RE.match(v):
            raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        return v

    def resolve_peer_id(self, node_id: str) -> str:
        return self.peer_id or f"{node_id[:122]}-build"

    def resolve_state_dir(self, state_dir: Path) -> Path:
        return self.state_dir if self.state_dir is not None else state_dir / "trainer"

    def resolve_work_dir(self, state_dir: Path) -> Path:
        return self.work_dir if self.work_dir is not None else state_dir / "training"

    def resolve_artifacts_dir(self, state_dir: Path) -> Path:
        return self.artifacts_dir if self.artifacts_dir is not None else state_dir / "artifacts"
