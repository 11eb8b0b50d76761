"""Request and response bodies of the HTTP API, and how invalid input is reported.

In: JSON bodies and query parameters. Out: validated pydantic models, or an `ApiError`
that the app renders as `{"error": {"code", "field", "message", "allowed"}}` with a 4xx
status: every rejection names the field to fix and what it accepts, never a traceback.
Unknown fields are rejected too, so a typo never silently does nothing.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# field -> (min, max): the generic bounds the API enforces before the model's own checks
# (a model may accept less, e.g. only its trained resolutions; it then names what it takes).
RANGES: dict[str, tuple[float, float]] = {
    "width": (16, 4096),  # pixels
    "height": (16, 4096),  # pixels
    "fps": (1, 120),  # playback frames per second
    "frames_per_chunk": (1, 256),
    "steps": (1, 64),  # denoising steps per chunk
    "seed": (0, 2**31 - 1),
    "max_chunks": (0, 1_000_000),  # 0 = until closed
    "chunks": (0, 1_000_000),  # chunks in this active period, then idle; 0 = until paused
    "from_chunk": (0, 2**31 - 1),
}
PROMPT_MAX_CHARS = 4000


def _bounded(name: str, kind=int, default: Any = None, description: str = ""):
    lo, hi = RANGES[name]
    return Field(default, ge=kind(lo), le=kind(hi), description=f"{description} [{lo}, {hi}]".strip())


class CreateSession(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS, description="text prompt")
    model: str | None = Field(None, description="model config; the server's model when absent")
    width: int | None = _bounded("width", description="video width in pixels; model default when absent")
    height: int | None = _bounded("height", description="video height in pixels")
    fps: float | None = _bounded("fps", float, description="playback frames per second")
    frames_per_chunk: int | None = _bounded("frames_per_chunk", description="video frames per chunk")
    steps: int | None = _bounded("steps", description="denoising steps per chunk")
    seed: int | None = _bounded("seed", description="random seed of the session")
    max_chunks: int = _bounded("max_chunks", default=0, description="close after this many chunks; 0 = until closed")
    chunks: int = _bounded("chunks", default=0, description="chunks before idling by itself; 0 = until paused")

    def spec_fields(self) -> dict:
        names = ("model", "width", "height", "fps", "frames_per_chunk", "steps", "seed")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class SetPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=PROMPT_MAX_CHARS)


class Resume(BaseModel):
    model_config = ConfigDict(extra="forbid")

    chunks: int = _bounded("chunks", default=0, description="chunks before idling by itself; 0 = until paused")


class SessionCreated(BaseModel):
    id: str
    token: str
    status_url: str
    stream_url: str


class ApiError(Exception):
    """A client error: `field` names what to fix, `allowed` what it accepts."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 allowed: Any = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.field, self.allowed = field, allowed

    def body(self) -> dict:
        err = {"code": self.code, "message": self.message}
        if self.field is not None:
            err["field"] = self.field
        if self.allowed is not None:
            err["allowed"] = self.allowed
        return {"error": err}


def allowed_for(field: str) -> str | None:
    if field in RANGES:
        lo, hi = RANGES[field]
        return f"{lo}..{hi}"
    if field == "prompt":
        return f"1..{PROMPT_MAX_CHARS} characters"
    return None


def from_validation_errors(errors: list[dict]) -> ApiError:
    """The first pydantic/FastAPI error as an ApiError naming its field (`body.width` ->
    `width`), with every error listed under `details`."""
    if not errors:
        return ApiError(422, "invalid_request", "invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    field = ".".join(loc) or "body"
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"unknown field {field!r}"
        allowed = None
    elif kind == "missing":
        message = f"{field} is required"
        allowed = allowed_for(field)
    elif kind in ("json_invalid", "model_attributes_type", "dict_type"):
        field, message, allowed = "body", "the body must be a JSON object", None
    else:
        got = first.get("input")
        got_text = f" (got {got!r})" if got is not None and len(repr(got)) < 80 else ""
        message = f"{field}: {first.get('msg', 'invalid value')}{got_text}"
        allowed = allowed_for(field)
        if allowed:
            message += f"; allowed: {allowed}"
    return ApiError(422, "invalid_field", message, field=field, allowed=allowed)
