"""The ``[accelerators]`` section of the agent configuration."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from accelerators.base import BackendConfig
from accelerators.litert_backend import LiteRTConfig
from accelerators.opencv_backend import OpenCVConfig
from accelerators.openvino_backend import OpenVINOConfig

# Fastest first: a dedicated accelerator beats a CPU runtime; OpenCV DNN is the fallback.
DEFAULT_PREFERENCE = [
    "litert:EDGETPU",
    "openvino:NPU",
    "openvino:GPU",
    "openvino:MYRIAD",
    "litert:CPU",
    "openvino:CPU",
    "opencv:CPU",
]


class AcceleratorsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sysfs_root: Path = Field(Path("/sys"), description="Where sysfs is mounted (tests point it at a fabricated tree).")
    dev_root: Path = Field(Path("/dev"), description="Where device nodes live (/dev/apex_N for Coral PCIe/M.2).")
    proc_root: Path = Field(Path("/proc"), description="Where procfs is mounted (/proc/device-tree/model on a Pi).")
    preference: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PREFERENCE),
        description="backend:DEVICE pairs in order of preference, used when a model names none of its own.",
    )
    openvino: OpenVINOConfig = Field(default_factory=OpenVINOConfig)
    litert: LiteRTConfig = Field(default_factory=LiteRTConfig)
    opencv: OpenCVConfig = Field(default_factory=OpenCVConfig)

    @field_validator("preference")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        for item in v:
            backend, _, device = item.partition(":")
            if not backend or not device:
                raise ValueError(f"{item!r} must be backend:DEVICE, e.g. openvino:CPU or litert:EDGETPU")
        return v

    def backend_config(self, name: str) -> BackendConfig:
        cfg = getattr(self, name, None)
        return cfg if isinstance(cfg, BackendConfig) else BackendConfig()
