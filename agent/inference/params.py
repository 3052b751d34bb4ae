"""The ``infer`` and ``job.result`` requests, and the shape of what ``infer`` streams back."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Item ids name output files (annotated/<id>.jpg) and CSV rows, so they must be safe as a file name.
ITEM_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageItem(_Strict):
    id: str = Field(pattern=ITEM_ID_PATTERN, description="Your id for this image; results carry it back.")
    url: Optional[str] = Field(None, pattern=r"^https?://", max_length=4096,
                               description="An http(s) URL the node downloads the image from.")
    path: Optional[str] = Field(None, min_length=1, max_length=4096,
                                description="A file on the node under one of `inference.input_dirs` (relative "
                                "paths are taken from the first of them).")
    data: Optional[str] = Field(None, min_length=1, description="The encoded image itself (JPEG, PNG...), base64.")

    @model_validator(mode="after")
    def _one_source(self) -> "ImageItem":
        given = [k for k in ("url", "path", "data") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"image {self.id!r} must have exactly one of url, path or data (has "
                             f"{', '.join(given) or 'none'})")
        return self

    @property
    def source(self) -> str:
        """How the image is named in CSV rows: its URL or path, else its id."""
        return self.url or self.path or self.id


class InferParams(_Strict):
    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$", description="Installed model name.")
    version: Optional[str] = Field(None, description="Model version; default the active one.")
    images: list[ImageItem] = Field(min_length=1, max_length=100_000, description="The batch, in order.")
    threshold: Optional[float] = Field(None, ge=0, le=1,
                                       description="Least score kept; default the model's own threshold.")
    top_k: Optional[int] = Field(None, ge=1, le=1000, description="Classifiers: the k best classes per image.")
    max_detections: Optional[int] = Field(None, ge=0, le=10_000,
                                          description="Keep at most this many detections (best first) per image.")
    classes: Optional[list[str]] = Field(None, description="Keep only these labels.")
    annotate: bool = Field(False, description="Draw the results onto copies of the images (JPEG), saved under "
                           "the node's outputs directory or PUT to `upload_url`.")
    output: Literal["json", "vott-csv"] = Field(
        "json", description="`json`: items in result chunks. `vott-csv`: also `url,x,y,width,height,class` rows "
        "(pre-annotations an annotation tool imports), per chunk and as one results.csv at the end.")
    upload_url: Optional[str] = Field(
        None, pattern=r"^https?://", description="Base URL the outputs are PUT to: `{upload_url}/results.json` or "
        "`results.csv`, and `{upload_url}/annotated/{id}.jpg`.")

    @field_validator("images")
    @classmethod
    def _unique_ids(cls, v: list[ImageItem]) -> list[ImageItem]:
        seen: set[str] = set()
        for item in v:
            if item.id in seen:
                raise ValueError(f"image id {item.id!r} appears more than once; ids must be unique in a batch")
            seen.add(item.id)
        return v


class JobResultParams(_Strict):
    job_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="The job whose results to send.")
    from_seq: int = Field(0, ge=0, description="Re-publish only result messages with this seq or later.")


class ItemError(_Strict):
    code: str
    message: str


class ItemResult(BaseModel):
    """One image in a result chunk. ``ok`` false: ``error`` says why, the batch went on."""

    id: str
    ok: bool
    width: Optional[int] = None
    height: Optional[int] = None
    detections: Optional[list[dict[str, Any]]] = None
    classes: Optional[list[dict[str, Any]]] = None
    mask: Optional[dict[str, Any]] = None
    inference_ms: Optional[float] = None
    annotated: Optional[str] = Field(None, description="Where the annotated copy went (a local path or a URL).")
    annotate_error: Optional[str] = Field(None, description="Why the annotated copy could not be saved/uploaded.")
    error: Optional[ItemError] = None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
