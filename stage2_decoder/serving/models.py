"""The web service's answers as Pydantic models: what `/openapi.json` documents and every reply follows."""
from __future__ import annotations

from pydantic import BaseModel, Field


class ScoredCaption(BaseModel):
    caption: str
    score: float = Field(description="The beam's score: sum of the words' log-probabilities / length ** "
                                     "length_penalty; higher is better.")


class CaptionResult(BaseModel):
    filename: str = Field(description="The file's name as uploaded (images[i] when it has none).")
    caption: str = Field(description="The best caption: captions[0].caption.")
    captions: list[ScoredCaption] = Field(description="num_captions distinct captions, best first.")


class CaptionResponse(BaseModel):
    results: list[CaptionResult] = Field(description="One per uploaded file, in the order sent.")


class ErrorResponse(BaseModel):
    error: str = Field(description="One sentence naming the file, field or limit at fault.")


class Health(BaseModel):
    status: str = "ok"
    checkpoint: str = Field(description="The run folder and file served (RUN/best.pt).")


class Stats(BaseModel):
    requests: int = Field(description="Requests answered by the model since start.")
    model_calls: int
    images: int
    largest_batch: int
    refused: int = Field(description="Requests refused with 503 because the queue was full.")
    dropped: int = Field(description="Requests dropped before the model saw them (client gone, deadline passed).")
    retried_batches: int = Field(description="Batches that failed and were run again one request at a time.")
    queued_images: int = Field(description="Images accepted and not yet answered, now.")
    batching: bool
    max_batch: int
    max_wait_ms: float
    max_queue: int


ERRORS = {
    400: "A form field out of range or not a number; no file in `images`; a malformed form.",
    413: "A file over --max-upload-mb, an image over --max-pixels, a request over --max-request-pixels, "
         "more than --max-files files, or a body over their sum.",
    415: "Not multipart/form-data; a file that is not an image, or a format this server cannot decode.",
    422: "An image whose data is damaged or incomplete; an empty file.",
    503: "The queue is full, the request waited past --request-timeout-s while queued, or the GPU ran out of "
         "memory for its batch: try again after the Retry-After header's seconds. Without Retry-After: the "
         "server's GPU failed and the server must be restarted.",
    504: "The model took longer than --request-timeout-s for this request.",
}
ERROR_RESPONSES = {status: {"model": ErrorResponse, "description": text} for status, text in ERRORS.items()}
