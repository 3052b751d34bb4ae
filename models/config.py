"""The ``[models]`` section of the agent configuration."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


def _default_models_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0]) / "models"
    if os.geteuid() == 0:
        return Path("/var/lib/cv-worker/models")
    return Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "cv-worker" / "models"


class ModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dir: Optional[Path] = Field(
        None, description="Model store directory; empty: <state_dir>/models (/var/lib/cv-worker/models as root)."
    )
    max_download_bytes: int = Field(
        512 * 1024 * 1024, ge=1024, description="Largest model archive accepted from a URL (refused before download)."
    )
    max_unpacked_bytes: int = Field(
        2 * 1024 * 1024 * 1024, ge=1024, description="Largest total size of a package's files (guards tar bombs)."
    )
    download_timeout_s: float = Field(60.0, gt=0, description="Connect/read timeout for downloads, seconds.")
    keep_versions: int = Field(
        2, ge=1, le=100, description="Installed versions kept per model (the active one always stays)."
    )
    smoke_test: bool = Field(True, description="Load and run a new version once before activating it.")
    preload: list[str] = Field(default_factory=list, description="Models loaded when the agent starts.")

    def resolve_dir(self, state_dir: Optional[Path] = None) -> Path:
        if self.dir is not None:
            return self.dir
        return (state_dir / "models") if state_dir is not None else _default_models_dir()
