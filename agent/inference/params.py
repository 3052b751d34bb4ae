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
    mask_png: bool = Field(
        True, description="Segmentation models: also write each image's mask as a PNG the size of the image, saved "
        "under the node's outputs directory or PUT to `upload_url` (false: the per-class summary only).")
    upload_url: Optional[str] = Field(
        None, pattern=r"^https?://", description="Base URL the outputs are PUT to: `{upload_url}/results.json` or "
        "`results.csv`, `{upload_url}/annotated/{id}.jpg` and `{upload_url}/masks/{id}.png`.")

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
    max_chunks: Optional[int] = Field(None, ge=1, le=100000, description="Re-publish at most this many chunks (a "
                                      "page); the final message's `next_seq` says where the next page starts.")


class ItemError(_Strict):
    code: str
    message: str


class ItemResult(BaseModel):
    """One image in a result chunk. ``ok`` false: ``error`` says why, the batch went on."""

    id: str = Field(description="The image's id from the request.")
    ok: bool = Field(description="False: `error` says why this image failed; the batch went on.")
    width: Optional[int] = Field(None, description="Width of the original image in pixels.")
    height: Optional[int] = Field(None, description="Height of the original image in pixels.")
    detections: Optional[list[dict[str, Any]]] = Field(
        None, description="Detection models: `label`, `score`, `box` [x1, y1, x2, y2] in original-image pixels, "
        "`keypoints` [[x, y], ...] where the model gives them; best first.")
    classes: Optional[list[dict[str, Any]]] = Field(
        None, description="Classifiers: `label`, `score`; best first.")
    mask: Optional[dict[str, Any]] = Field(
        None, description="Segmentation: `width`, `height` (of the model's output map), `classes` (`class_id`, "
        "`label`, `pixels`, `fraction` of the image area) and `png_kind` when a mask PNG is made.")
    inference_ms: Optional[float] = Field(None, description="Time in the runtime for this image.")
    annotated: Optional[str] = Field(None, description="Where the annotated copy went (a local path or a URL).")
    annotate_error: Optional[str] = Field(None, description="Why the annotated copy could not be saved/uploaded.")
    mask_png: Optional[str] = Field(
        None, description="Segmentation: where the mask PNG went (a local path under the job's outputs directory, "
        "or its URL under `upload_url`). 8-bit grayscale, the size of the original image; a pixel is the "
        "probability x 255 for probability maps (`mask.png_kind` `probability`, e.g. ppocr-det) or the class id "
        "(`class_ids`).")
    mask_png_error: Optional[str] = Field(None, description="Why the mask PNG could not be saved/uploaded.")
    error: Optional[ItemError] = None

    def dump(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)
