"""The service's request and response bodies (pydantic), so the OpenAPI schema documents
itself."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class PixelsRequest(BaseModel):
    """Images as pixels in [0, 1]: one ``(H, W)`` grey image, one ``(C, H, W)`` image or a batch
    ``(N, C, H, W)``, of the model's size (raw pixels are never resized)."""

    model_config = ConfigDict(extra="forbid")
    images: list[Any] = Field(description="nested lists of pixel values in [0, 1]")


class ImageResult(BaseModel):
    name: str | None = Field(None, description="the upload's file name")
    class_: int | None = Field(alias="class", description="the model's predicted class (null "
                                                         "for a flagged input under serve "
                                                         "--no-flagged-class)")
    label: str | None = Field(None, description="the predicted class's name, where the model "
                                                "knows its classes' names (an image folder's)")
    verdict: str = Field(description="trusted or flagged")
    unlike_training: bool | None = Field(
        None, description="farther from every training image than held-out images are "
                          "(flagged); null for guards fitted without a distance limit")
    confidence: float | None = Field(
        None, description="the predicted class's probability (serve --outputs top1)")
    probabilities: list[float] | None = Field(
        None, description="every class's probability (serve --outputs probabilities)")
    score: float | None = Field(None, description="kNN score of the predicted class, in "
                                                  "[0, 1] (--outputs probabilities)")
    threshold: float | None = Field(None, description="scores below it are flagged "
                                                      "(--outputs probabilities)")
    converted: list[str] = Field(default_factory=list,
                                 description="conversions applied to fit the model's input")


class ClientState(BaseModel):
    client: str
    requests: int
    flagged: int
    window: int
    window_flagged: int
    window_mean_score: float | None = Field(
        None, description="mean kNN score of the window (answered with --outputs "
                          "probabilities only)")
    recent_flagged: int = Field(description="flagged images within the policy's window_s")
    recent_repeats: int | None = Field(
        None, description="queries within window_s that were near-copies of the client's "
                          "earlier ones or of other keys' recent ones (with --outputs "
                          "probabilities only, and to admins)")
    queries: int | None = Field(None, description="queries in the client's history (with "
                                                  "--outputs probabilities only, and to admins)")
    denied_until: float | str | None
    reason: str | None
    denials: int
    last_seen: float | None
    linked: list[str] | None = Field(None, description="other keys its detections linked it "
                                                       "to, within window_s (admins, and "
                                                       "--outputs probabilities)")
    recent_flips: int | None = Field(
        None, description="queries within window_s the model gave another class than an "
                          "earlier query they were taken for or lay beside (admins, and "
                          "--outputs probabilities)")


class PredictResponse(BaseModel):
    client: str
    results: list[ImageResult]
    status: ClientState


class StoreState(BaseModel):
    kind: str = Field(description="sqlite or redis")
    ok: bool = Field(description="whether the client state can be read and written")
    detail: str | None = Field(None, description="the last error, while there is one")


class Health(BaseModel):
    status: str = Field(description="ok, or degraded while the client state is unusable")
    dataset: str
    input_shape: list[int]
    classes: int
    threshold: float
    detector: str = Field(description="the registered detector (knn, the paper's, by default)")
    layers: list[str] = Field(description="the model's layers it reads")
    settings: dict[str, Any] = Field(description="the detector's options")
    outputs: str = Field(description="what answers reveal: label, top1 or probabilities")
    query_watch: bool = Field(description="whether query-based attacks are watched for")
    store: StoreState
