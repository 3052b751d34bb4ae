"""The ``[http]`` section of the agent configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_PORT = 8780
TOKEN_FILE_NAME = "http-token"


class HttpConfig(BaseModel):
    """Local HTTP API and web console. On by default on every interface, always behind a bearer token: a node is
    usable from a browser or ``curl`` right after install, and nothing but ``/healthz`` and ``/metrics`` answers
    without the token. Bind ``127.0.0.1`` to keep the API on the node itself."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve the HTTP API and the web console.")
    bind: str = Field("0.0.0.0", min_length=1, description="Address to listen on: `0.0.0.0` every IPv4 interface, "
                      "`::` IPv6 (and IPv4 where the system allows), `127.0.0.1` this machine only.")
    port: int = Field(DEFAULT_PORT, ge=1, le=65535, description="TCP port; advertised in the mDNS TXT entry `http`.")
    token_file: Optional[Path] = Field(
        None, description="File holding the bearer token (first line). Default: `<state_dir>/http-token`, created "
        "with a random token (mode 0600) at the first start. The token is never logged or advertised.")
    tls_cert: Optional[Path] = Field(None, description="Certificate (PEM, with its chain); serves HTTPS when set.")
    tls_key: Optional[Path] = Field(None, description="Private key of `tls_cert` (PEM).")
    max_body_bytes: Optional[int] = Field(
        None, ge=1024, description="Largest request body; default `jobs.max_payload_bytes` (the MQTT limit). Image "
        "uploads to `/v1/predict` may be `inference.max_image_bytes` plus 64 KiB of multipart framing.")
    wait_max_s: float = Field(60.0, gt=0, le=3600, description="Longest a `?wait=true` request blocks; after it the "
                              "answer is 202 with the job's status URL.")
    mjpeg_max_fps: float = Field(10.0, gt=0, le=60, description="Highest frame rate of `/v1/streams/{id}/mjpeg`.")

    @model_validator(mode="after")
    def _tls_pair(self) -> "HttpConfig":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def resolve_token_file(self, state_dir: Path) -> Path:
        return self.token_file if self.token_file is not None else state_dir / TOKEN_FILE_NAME
