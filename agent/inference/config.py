"""The ``[inference]`` section of the agent configuration (batch ``infer`` jobs)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

MiB = 1024 * 1024

# The smallest batch that starts an inference process (runtime_mode "auto"): below it, loading a second copy of the
# model costs more than the batch could gain.
RUNTIME_START_IMAGES = 32


class InferenceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_dirs: list[Path] = Field(
        default_factory=list,
        description="Directories whose files `infer` jobs may read by `path` (symlinks are resolved first, so a "
        "link pointing outside is refused). Empty: `path` sources are refused.",
    )
    max_image_bytes: int = Field(16 * MiB, ge=1024, description="Largest encoded image accepted from any source.")
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="Largest decoded image (width x height), a guard against decompression bombs."
    )
    chunk_size: int = Field(
        32, ge=1, le=1000, description="Images per result message; each chunk is also a resume checkpoint."
    )
    chunk_max_s: float = Field(
        2.0, gt=0, description="A chunk is sent after this long even when not full, so slow sources still stream."
    )
    decode_workers: int = Field(
        0, ge=0, le=32,
        description="Threads (or processes, see `decode_mode`) that fetch, decode and preprocess images ahead of "
        "inference; 0: one fewer than the CPU cores (at least 1), leaving a core to the inference runtime.",
    )
    decode_mode: Literal["auto", "threads", "processes"] = Field(
        "auto",
        description="Where the decode workers run. `processes`: worker processes (started at the first `infer` job, "
        "kept for the next) that share no GIL with the inference runtime and the job's thread; a worker that "
        "crashes on an image is replaced and the image reported as `decode_crashed`. `threads`: threads of the "
        "agent. `auto`: processes on a machine with at least 2 cores. Jobs with `annotate` (they need the full "
        "decoded image) and a job running while another holds the processes decode in threads.",
    )
    runtime_mode: Literal["auto", "thread", "process"] = Field(
        "auto",
        description="Where the model runs in a batch whose images are decoded in processes. `process`: in an "
        "inference process of its own (one, kept for the next job of the same model version, replaced for another; "
        "it holds a second copy of the model in memory), so the runtime never waits for the agent's Python; the "
        "job waits for the model to load there. `auto`: the same, but a job does not wait: the first job of at "
        f"least {RUNTIME_START_IMAGES} images starts the load and runs in the agent meanwhile, later jobs use the "
        "process once it is ready. `thread`: always in the agent's process. Only models on a CPU device: an "
        "EdgeTPU or a Movidius stick is opened by the agent alone. An inference process that crashes is replaced; "
        "the image it was on is retried once, then reported as `inference_crashed`.",
    )
    pipeline_depth: int = Field(
        8, ge=1, le=256,
        description="Images decoded ahead of inference at most (bounds memory: about depth x one decoded image).",
    )
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between two progress updates of an `infer` job (processed, images/s, ETA)."
    )
    download_timeout_s: float = Field(30.0, gt=0, description="Whole-download limit for one `url` image.")
    connect_timeout_s: float = Field(5.0, gt=0, description="TCP connect limit for `url` images and uploads.")
    upload_timeout_s: float = Field(60.0, gt=0, description="Limit for one HTTP PUT to `upload_url`.")
    outputs_dir: Optional[Path] = Field(
        None, description="Where annotated images and output files are written; default `<state_dir>/outputs`."
    )

    def resolve_outputs_dir(self, state_dir: Path) -> Path:
        return self.outputs_dir if self.outputs_dir is not None else state_dir / "outputs"

    def use_processes(self) -> bool:
        import os

        if self.decode_mode == "auto":
            return (os.cpu_count() or 1) >= 2
        return self.decode_mode == "processes"

    def workers(self) -> int:
        import os

        return self.decode_workers or max(1, (os.cpu_count() or 2) - 1)
