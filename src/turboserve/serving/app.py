"""The HTTP + WebSocket API (FastAPI).

In: a `ServingRuntime` (the live cluster, or anything keeping its protocol) and the
`TurboConfig`. Out: an ASGI app serving
  POST /v1/sessions, GET|DELETE /v1/sessions/{id}, POST /v1/sessions/{id}/{prompt,pause,resume},
  WS /v1/sessions/{id}/stream?format=fmp4|jpeg&from_chunk=K, GET /v1/cluster,
  GET /metrics, /healthz, /readyz, the web page at / and OpenAPI at /docs and /openapi.json.
Per-session endpoints need the session's token (`Authorization: Bearer T` or `?token=T`).
Stream protocol (per WebSocket): `{"type": "init", ...}` (+ the fMP4 init segment as one
binary message), then per chunk `{"type": "chunk", "index", "frames", "latency_ms",
"worker"}` + one binary message (an fMP4 media segment, or the chunk's JPEG frames
concatenated, their byte sizes in `sizes`), `{"type": "gap", "first", "last"}` for chunks
the replay buffer no longer holds, and `{"type": "end", "state", "chunks"}` at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import uuid
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Header, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from ..cluster.runtime import (CapacityError, ServingRuntime, SessionConflict, SpecError,
                               UnknownSession)
from ..config import TurboConfig
from ..types import SessionState
from .metrics import CONTENT_TYPE, ServingMetrics
from .schemas import (RANGES, ApiError, CreateSession, Resume, SessionCreated, SetPrompt,
                      allowed_for, from_validation_errors)
from .streams import StreamChunk, StreamEnd, StreamGap, StreamHub

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
TERMINAL = (SessionState.CLOSED, SessionState.FAILED)


class _Registry:
    """Tokens and idempotency keys of the sessions this server created."""

    MAX_KEYS = 100_000  # idempotency keys remembered (oldest forgotten first)

    def __init__(self):
        self.tokens: dict[str, str] = {}  # session id -> token
        self.by_key: OrderedDict[str, tuple[str, str, dict]] = OrderedDict()  # key -> (fingerprint, sid, response)
        self.key_locks: dict[str, asyncio.Lock] = {}  # keys with a creation in progress

    def remember(self, key: str, entry: tuple[str, str, dict]) -> None:
        self.by_key[key] = entry
        while len(self.by_key) > self.MAX_KEYS:
            self.by_key.popitem(last=False)


def create_app(runtime: ServingRuntime, config: TurboConfig | None = None, *,
               encoder_factory=None, manage_runtime: bool = True) -> FastAPI:
    """`manage_runtime`: start the runtime on startup and stop it on shutdown."""
    config = config or TurboConfig()
    reg = _Registry()
    state: dict = {}

    def slo_ms_of(session_id: str) -> float:
        spec = state.get("specs", {}).get(session_id)
        if config.slo.slo_ms:
            return config.slo.slo_ms
        return 1000.0 * spec.chunk_seconds if spec else float("inf")

    metrics = ServingMetrics(runtime.cluster, slo_ms_of)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        hub = StreamHub(loop, replay_chunks=config.serve.replay_chunks,
                        storage_dir=config.serve.storage_dir, encoder_factory=encoder_factory)
        state["hub"] = hub
        state["specs"] = {}

        def on_chunk(d):
            metrics.on_chunk(d)
            hub.on_chunk(d)

        runtime.add_listener(on_chunk, hub.on_end)
        if manage_runtime:
            await asyncio.to_thread(runtime.start)
        try:
            yield
        finally:
            if manage_runtime:
                await asyncio.to_thread(runtime.stop)
            await asyncio.to_thread(hub.close)

    app = FastAPI(title="turboserve", version="0.1.0", lifespan=lifespan,
                  description="Streaming video generation: sessions, live streams, cluster state.")
    app.state.runtime = runtime
    app.state.metrics = metrics
    app.state.streams = state

    # -- errors ---------------------------------------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        err = from_validation_errors(list(e.errors()))
        body = err.body()
        body["error"]["details"] = [
            {"field": ".".join(str(p) for p in x.get("loc", ()) if p != "body"), "message": x.get("msg", "")}
            for x in e.errors()
        ]
        return JSONResponse(body, status_code=err.status)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": {"code": "internal", "message": "internal error; see server log"}},
                            status_code=500)

    def authorize(session_id: str, authorization: str | None, token: str | None) -> None:
        expected = reg.tokens.get(session_id)
        if expected is None:
            raise ApiError(404, "not_found", f"no session {session_id!r}", field="id")
        given = token
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value:
                raise ApiError(401, "unauthorized", "Authorization must be 'Bearer <token>'",
                               field="Authorization")
            given = value.strip()
        if not given:
            raise ApiError(401, "unauthorized",
                           "missing session token: send 'Authorization: Bearer <token>' or ?token=",
                           field="token")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise ApiError(403, "forbidden", "wrong token for this session", field="token")

    def session_body(session_id: str) -> dict:
        try:
            info = runtime.session(session_id)
        except UnknownSession:
            raise ApiError(404, "not_found", f"no session {session_id!r}", field="id") from None
        body = info.to_dict()
        stream = state["hub"].get(session_id)
        if stream is not None:
            body["recording"] = str(stream.recording) if stream.recording else None
            body["stream_chunks"] = stream.next_index
        return body

    async def runtime_call(fn, *args, **kwargs):
        # Off the event loop: the call waits for the controller, streams must not.
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except UnknownSession:
            raise ApiError(404, "not_found", f"no session {args[0]!r}", field="id") from None
        except SessionConflict as e:
            raise ApiError(409, "conflict", str(e)) from None

    # -- sessions -------------------------------------------------------------------------
    @app.post("/v1/sessions", status_code=201, response_model=SessionCreated,
              responses={422: {"description": "invalid field"}, 503: {"description": "no capacity"}})
    async def create_session(body: CreateSession, request: Request,
                             idempotency_key: str | None = Header(None, alias="Idempotency-Key")):
        fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
        if idempotency_key is not None and not (1 <= len(idempotency_key) <= 200):
            raise ApiError(422, "invalid_field", "Idempotency-Key must be 1..200 characters",
                           field="Idempotency-Key", allowed="1..200 characters")
        lock = None
        if idempotency_key:
            lock = reg.key_locks.setdefault(idempotency_key, asyncio.Lock())
            await lock.acquire()
        try:
            if idempotency_key and idempotency_key in reg.by_key:
                prior_fp, _, response = reg.by_key[idempotency_key]
                if prior_fp != fingerprint:
                    raise ApiError(409, "idempotency_conflict",
                                   "this Idempotency-Key was used with a different body",
                                   field="Idempotency-Key")
                return JSONResponse(response, status_code=201, headers={"Idempotent-Replayed": "true"})
            try:
                spec = await asyncio.to_thread(runtime.resolve_spec, body.spec_fields())
            except SpecError as e:  # the model's own limits: its message says what it takes
                raise ApiError(422, "invalid_field", e.message, field=e.field) from None
            # Staged: the id, token and stream exist only here until the runtime admits the
            # session; a refusal leaves nothing behind.
            session_id = uuid.uuid4().hex[:16]
            token = secrets.token_urlsafe(24)
            hub: StreamHub = state["hub"]
            hub.open(session_id, spec.width, spec.height, spec.fps)
            state["specs"][session_id] = spec
            try:
                info = await asyncio.to_thread(runtime.create_session, session_id, spec, body.prompt,
                                               max_chunks=body.max_chunks, chunks=body.chunks)
            except CapacityError as e:
                hub.forget(session_id)
                state["specs"].pop(session_id, None)
                metrics.sessions_rejected.labels("capacity").inc()
                raise ApiError(503, "no_capacity", str(e)) from None
            if info.state is SessionState.FAILED:  # the scheduler refused it on admission
                hub.forget(session_id)
                state["specs"].pop(session_id, None)
                metrics.sessions_rejected.labels("refused").inc()
                raise ApiError(503, "refused", f"the scheduler cannot admit this session: {info.error}")
            reg.tokens[session_id] = token
            metrics.sessions_created.inc()
            base = str(request.base_url).rstrip("/")
            ws_base = base.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
            response = {"id": session_id, "token": token,
                        "status_url": f"{base}/v1/sessions/{session_id}",
                        "stream_url": f"{ws_base}/v1/sessions/{session_id}/stream"}
            if idempotency_key:
                reg.remember(idempotency_key, (fingerprint, session_id, response))
            return JSONResponse(response, status_code=201)
        finally:
            if lock is not None:
                lock.release()
                if not lock.locked() and not getattr(lock, "_waiters", None):
                    reg.key_locks.pop(idempotency_key, None)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, authorization: str | None = Header(None),
                          token: str | None = None):
        authorize(session_id, authorization, token)
        return await asyncio.to_thread(session_body, session_id)

    @app.post("/v1/sessions/{session_id}/prompt")
    async def set_prompt(session_id: str, body: SetPrompt, authorization: str | None = Header(None),
                         token: str | None = None):
        authorize(session_id, authorization, token)
        await runtime_call(runtime.set_prompt, session_id, body.prompt)
        return await asyncio.to_thread(session_body, session_id)

    @app.post("/v1/sessions/{session_id}/pause")
    async def pause(session_id: str, authorization: str | None = Header(None), token: str | None = None):
        authorize(session_id, authorization, token)
        await runtime_call(runtime.pause, session_id)
        return await asyncio.to_thread(session_body, session_id)

    @app.post("/v1/sessions/{session_id}/resume")
    async def resume(session_id: str, request: Request, authorization: str | None = Header(None),
                     token: str | None = None):
        authorize(session_id, authorization, token)
        raw = await request.body()
        try:
            body = Resume.model_validate_json(raw) if raw.strip() else Resume()
        except Exception as e:  # pydantic ValidationError: same 422 shape as the others
            errors = getattr(e, "errors", lambda: [])()
            raise from_validation_errors([{**x, "loc": ("body", *x.get("loc", ()))} for x in errors]) from None
        await runtime_call(runtime.resume, session_id, chunks=body.chunks)
        return await asyncio.to_thread(session_body, session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def close(session_id: str, authorization: str | None = Header(None), token: str | None = None):
        authorize(session_id, authorization, token)
        await runtime_call(runtime.close, session_id)
        return await asyncio.to_thread(session_body, session_id)

    # -- stream ---------------------------------------------------------------------------
    @app.websocket("/v1/sessions/{session_id}/stream")
    async def stream(ws: WebSocket, session_id: str):
        q = ws.query_params
        try:
            authorize(session_id, ws.headers.get("authorization"), q.get("token"))
        except ApiError as e:
            # Closing before accept refuses the handshake (HTTP 403): nothing is streamed.
            await ws.close(code=1008, reason=e.message[:120])
            return
        await ws.accept()
        fmt = q.get("format", "fmp4")
        problem = None
        if fmt not in ("fmp4", "jpeg"):
            problem = ApiError(422, "invalid_field", f"format must be fmp4 or jpeg (got {fmt!r})",
                               field="format", allowed=["fmp4", "jpeg"])
        try:
            from_chunk = int(q.get("from_chunk", "0"))
            lo, hi = RANGES["from_chunk"]
            if not lo <= from_chunk <= hi:
                raise ValueError
        except ValueError:
            problem = problem or ApiError(422, "invalid_field", "from_chunk must be an integer "
                                          f"in {allowed_for('from_chunk')}", field="from_chunk",
                                          allowed=allowed_for("from_chunk"))
        hub_stream = state["hub"].get(session_id)
        if hub_stream is None:
            problem = problem or ApiError(404, "not_found", f"no stream for session {session_id!r}")
        if problem is not None:
            await ws.send_json({"type": "error", **problem.body()["error"]})
            await ws.close(code=1008)
            return
        sender = asyncio.create_task(_send_stream(ws, hub_stream, fmt, from_chunk))
        receiver = asyncio.create_task(_drain_client(ws))
        done, pending = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for task in done:
            exc = task.exception()
            if exc and not isinstance(exc, (WebSocketDisconnect, RuntimeError)):
                log.warning("stream %s: %r", session_id, exc)
        with contextlib.suppress(Exception):
            await ws.close()

    # -- cluster, health, metrics, page ---------------------------------------------------
    @app.get("/v1/models")
    async def models():
        """The served model and the spec a session gets when it asks for nothing."""
        spec = await asyncio.to_thread(runtime.resolve_spec, {})
        return {"models": [{"name": spec.model, "default_spec": spec.to_dict(),
                            "chunk_seconds": spec.chunk_seconds}]}

    @app.get("/v1/cluster")
    async def cluster():
        return (await asyncio.to_thread(runtime.cluster)).to_dict()

    @app.get("/metrics")
    async def prometheus():
        return Response(await asyncio.to_thread(metrics.exposition), media_type=CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if runtime.ready():
            return {"status": "ready"}
        return JSONResponse({"status": "not ready", "reason": "no worker accepts sessions yet"},
                            status_code=503)

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _send_stream(ws: WebSocket, stream, fmt: str, from_chunk: int) -> None:
    init = await stream.wait_init()
    header = {"type": "init", "format": fmt, "session_id": stream.session_id,
              "width": stream.width, "height": stream.height, "fps": stream.fps,
              "from_chunk": from_chunk}
    if fmt == "fmp4":
        header["mime"] = stream.mime
    await ws.send_text(json.dumps(header))
    if fmt == "fmp4" and init is not None:
        await ws.send_bytes(init)
    async for item in stream.chunks(from_chunk):
        if isinstance(item, StreamChunk):
            msg = {"type": "chunk", "index": item.index, "frames": item.frame_count,
                   "latency_ms": round(item.latency_ms, 3), "worker": item.worker}
            if fmt == "fmp4":
                payload = item.fmp4
            else:
                jpegs = await asyncio.to_thread(item.jpeg_frames)
                msg["sizes"] = [len(j) for j in jpegs]
                payload = b"".join(jpegs)
            await ws.send_text(json.dumps(msg))
            await ws.send_bytes(payload)
        elif isinstance(item, StreamGap):
            await ws.send_text(json.dumps({"type": "gap", "first": item.first, "last": item.last}))
        elif isinstance(item, StreamEnd):
            await ws.send_text(json.dumps({"type": "end", "state": item.state, "chunks": item.chunks,
                                           "reason": item.reason}))
            return


async def _drain_client(ws: WebSocket) -> None:
    """Reads (and ignores) client messages until it disconnects, so a vanished client stops
    its sender at once instead of at the next chunk."""
    while True:
        msg = await ws.receive()
        if msg.get("type") == "websocket.disconnect":
            return
