"""The HTTP/WebSocket contract against a real server (uvicorn on loopback) whose engines run
a fake generator through the real controller, policy, EngineCores and TorchExecutors."""

from __future__ import annotations

import io
import json
import time

import av
import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from serving_helpers import FakeGenerator, level_of, tiny_latency_model
from turboserve.config import TurboConfig
from turboserve.serving.app import create_app
from turboserve.serving.embedded import build_runtime
from turboserve.serving.server import ServerThread

STATES = {"queued", "active", "idle", "offloaded", "migrating", "closed", "failed"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    storage = tmp_path_factory.mktemp("recordings")
    cfg = TurboConfig().with_overrides([f"serve.storage_dir='{storage}'", "serve.replay_chunks=8",
                                        "offload.grace_s=0.3"])
    runtime = build_runtime(cfg, generator_factory=lambda device: FakeGenerator(device, delay_s=0.01),
                            latency_model=tiny_latency_model(), workers=2)
    with ServerThread(create_app(runtime, cfg)) as srv:
        srv.storage = storage
        srv.runtime = runtime
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=30) as c:
        yield c


def create(http, **body):
    body.setdefault("prompt", "a fox in the snow")
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    d = r.json()
    return d["id"], d["token"], {"Authorization": f"Bearer {d['token']}"}


def ws_url(server, sid, token, **params):
    q = "&".join(f"{k}={v}" for k, v in {"token": token, **params}.items())
    return f"ws://{server.host}:{server.port}/v1/sessions/{sid}/stream?{q}"


def read_stream(ws, max_chunks=None, timeout=30.0):
    """(init header, init bytes, [(header, payload)], end or None)"""
    init = json.loads(ws.recv(timeout=timeout))
    assert init["type"] == "init"
    init_bytes = ws.recv(timeout=timeout) if init["format"] == "fmp4" else None
    chunks, end = [], None
    while max_chunks is None or len(chunks) < max_chunks:
        msg = ws.recv(timeout=timeout)
        assert isinstance(msg, str), "a binary message must follow its JSON header"
        head = json.loads(msg)
        if head["type"] == "end":
            end = head
            break
        assert head["type"] == "chunk", head
        payload = ws.recv(timeout=timeout)
        assert isinstance(payload, bytes)
        chunks.append((head, payload))
    return init, init_bytes, chunks, end


def decode_levels(data: bytes) -> list[int]:
    """Mean grey level of every decoded frame of an MP4 byte string."""
    with av.open(io.BytesIO(data)) as c:
        return [int(round(f.to_ndarray(format="rgb24").mean())) for f in c.decode(video=0)]


def chunk_indices_from_levels(levels: list[int], frames_per_chunk: int) -> list[int]:
    assert len(levels) % frames_per_chunk == 0
    out = []
    for i in range(0, len(levels), frames_per_chunk):
        lv = int(np.median(levels[i:i + frames_per_chunk]))
        out.append(min(range(8), key=lambda k: abs(level_of(k) - lv)))
    return out


# ----------------------------------------------------------------------------- REST
def test_create_and_inspect(server, http):
    sid, token, auth = create(http, max_chunks=3, seed=7)
    body = http.get(f"/v1/sessions/{sid}", headers=auth).json()
    assert body["id"] == sid and body["state"] in STATES
    assert body["spec"]["seed"] == 7 and body["spec"]["width"] == 32
    r = http.post("/v1/sessions", json={"prompt": "x"})
    assert r.json()["stream_url"].startswith("ws://") and r.json()["status_url"].endswith(r.json()["id"])


@pytest.mark.parametrize("body, field, status", [
    ({"prompt": "x", "width": 5}, "width", 422),
    ({"prompt": "x", "fps": 0}, "fps", 422),
    ({"prompt": "x", "steps": 1000}, "steps", 422),
    ({"prompt": "x", "max_chunks": -1}, "max_chunks", 422),
    ({"prompt": ""}, "prompt", 422),
    ({}, "prompt", 422),
    ({"prompt": "x", "widht": 64}, "widht", 422),
    ({"prompt": "x", "model": "wan14b"}, "model", 422),
    ({"prompt": "x", "width": 64}, "width", 422),  # in range, but this model renders 32x32
    ({"prompt": "x", "seed": "abc"}, "seed", 422),
])
def test_invalid_input_names_the_field(http, body, field, status):
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field
    assert field in err["message"] or "required" in err["message"] or "serves" in err["message"]
    assert "Traceback" not in r.text


def test_range_errors_say_the_allowed_range(http):
    err = http.post("/v1/sessions", json={"prompt": "x", "width": 5}).json()["error"]
    assert err["allowed"] == "16..4096" and "16..4096" in err["message"]


def test_malformed_body_is_a_clear_4xx(http):
    r = http.post("/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["field"] == "body"


def test_idempotency_key(http):
    key = {"Idempotency-Key": "abc-123"}
    a = http.post("/v1/sessions", json={"prompt": "same"}, headers=key)
    b = http.post("/v1/sessions", json={"prompt": "same"}, headers=key)
    assert a.status_code == b.status_code == 201
    assert a.json() == b.json()
    c = http.post("/v1/sessions", json={"prompt": "different"}, headers=key)
    assert c.status_code == 409 and c.json()["error"]["field"] == "Idempotency-Key"
    d = http.post("/v1/sessions", json={"prompt": "same"}, headers={"Idempotency-Key": "other"})
    assert d.json()["id"] != a.json()["id"]


def test_concurrent_creations_with_one_key_make_one_session(server):
    from concurrent.futures import ThreadPoolExecutor

    def post(_):
        with httpx.Client(base_url=server.base_url, timeout=30) as c:
            return c.post("/v1/sessions", json={"prompt": "racing", "max_chunks": 1},
                          headers={"Idempotency-Key": "race-1"})
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(post, range(6)))
    assert {r.status_code for r in responses} == {201}
    assert len({r.json()["id"] for r in responses}) == 1


def test_token_auth(server, http):
    sid, token, auth = create(http, max_chunks=2)
    assert http.get(f"/v1/sessions/{sid}").status_code == 401
    assert http.get(f"/v1/sessions/{sid}", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert http.get(f"/v1/sessions/{sid}", headers={"Authorization": "Basic x"}).status_code == 401
    assert http.get(f"/v1/sessions/{sid}", params={"token": token}).status_code == 200
    assert http.post(f"/v1/sessions/{sid}/pause", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert http.get("/v1/sessions/nosuch", headers=auth).status_code == 404
    with pytest.raises(InvalidStatus) as e:
        connect(ws_url(server, sid, "wrong"), open_timeout=10)
    assert e.value.response.status_code == 403


def wait_state(http, sid, auth, states, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/v1/sessions/{sid}", headers=auth).json()
        if body["state"] in states:
            return body
        time.sleep(0.05)
    raise AssertionError(f"session {sid} never reached {states}; last: {body}")


def wait_stream(http, sid, auth, chunks, timeout=20.0):
    """Until the session's stream has encoded `chunks` chunks (encoding trails the engine)."""
    deadline = time.monotonic() + timeout
    while (body := http.get(f"/v1/sessions/{sid}", headers=auth).json())["stream_chunks"] < chunks:
        assert time.monotonic() < deadline, f"session {sid}'s stream never encoded {chunks} chunks; last: {body}"
        time.sleep(0.05)


def test_lifecycle_pause_resume_prompt_close(http, server):
    sid, token, auth = create(http)
    wait_state(http, sid, auth, {"active"})
    r = http.post(f"/v1/sessions/{sid}/pause", headers=auth)
    assert r.status_code == 200 and r.json()["state"] in ("idle", "offloaded")
    # an idle session goes to host memory after offload.grace_s
    wait_state(http, sid, auth, {"offloaded"})
    before = http.get(f"/v1/sessions/{sid}", headers=auth).json()["chunks_generated"]
    assert http.post(f"/v1/sessions/{sid}/prompt", json={"prompt": "now a wolf"}, headers=auth).json()["prompt"] == "now a wolf"
    r = http.post(f"/v1/sessions/{sid}/resume", headers=auth, json={"chunks": 3})
    assert r.status_code == 200 and r.json()["state"] in ("queued", "active", "idle")
    body = wait_state(http, sid, auth, {"idle", "offloaded"})
    assert body["chunks_generated"] == before + 3  # exactly the chunks asked for, then idle by itself
    bad = http.post(f"/v1/sessions/{sid}/resume", headers=auth, json={"chunks": -2})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "chunks"
    assert http.delete(f"/v1/sessions/{sid}", headers=auth).json()["state"] == "closed"
    assert http.post(f"/v1/sessions/{sid}/resume", headers=auth).status_code == 409
    cl = http.get("/v1/cluster").json()
    assert cl["counters"]["offloads"] >= 1 and cl["counters"]["resumes"] >= 1


# --------------------------------------------------------------------------- stream
def test_stream_protocol_and_fmp4_decodes(server, http):
    sid, token, auth = create(http, max_chunks=6)
    with connect(ws_url(server, sid, token, format="fmp4"), max_size=None) as ws:
        init, init_bytes, chunks, end = read_stream(ws)
    assert init["mime"].startswith('video/mp4; codecs="avc1.')
    assert [h["index"] for h, _ in chunks] == list(range(6))
    assert all(h["frames"] == 4 and h["latency_ms"] >= 0 and h["worker"].startswith("w") for h, _ in chunks)
    assert end == {"type": "end", "state": "closed", "chunks": 6, "reason": "max_chunks reached"}
    levels = decode_levels(init_bytes + b"".join(p for _, p in chunks))
    assert chunk_indices_from_levels(levels, 4) == [i % 8 for i in range(6)]
    # the recording of the finished session decodes to the same video
    rec = wait_rec(http, sid, auth)
    assert chunk_indices_from_levels(decode_levels(open(rec, "rb").read()), 4) == [i % 8 for i in range(6)]


def wait_rec(http, sid, auth, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = http.get(f"/v1/sessions/{sid}", headers=auth).json().get("recording")
        if rec:
            return rec
        time.sleep(0.05)
    raise AssertionError("no recording")


def test_reconnect_from_chunk_no_gaps_no_duplicates(server, http):
    sid, token, auth = create(http, max_chunks=12)
    with connect(ws_url(server, sid, token), max_size=None) as ws:
        _, init_bytes, first, _ = read_stream(ws, max_chunks=5)
    resume_at = first[-1][0]["index"] + 1
    with connect(ws_url(server, sid, token, from_chunk=resume_at), max_size=None) as ws:
        init2, init_bytes2, rest, end = read_stream(ws)
    indices = [h["index"] for h, _ in first + rest]
    assert indices == list(range(12))  # every chunk once, in order
    assert init2["from_chunk"] == resume_at and end["chunks"] == 12
    # the replayed segments continue the same video: decoding all of them gives every chunk
    levels = decode_levels(init_bytes + b"".join(p for _, p in first + rest))
    assert chunk_indices_from_levels(levels, 4) == [i % 8 for i in range(12)]


def test_from_chunk_beyond_replay_buffer_reports_a_gap(server, http):
    sid, token, auth = create(http, max_chunks=14)  # replay buffer holds 8
    wait_state(http, sid, auth, {"closed"})
    # encoding runs on its own threads and can trail the engine under load: until it has
    # encoded all 14, the buffer still holds earlier chunks and the gap is shorter
    wait_stream(http, sid, auth, 14)
    with connect(ws_url(server, sid, token, from_chunk=0), max_size=None) as ws:
        ws.recv(timeout=10), ws.recv(timeout=10)  # init
        gap = json.loads(ws.recv(timeout=10))
        assert gap == {"type": "gap", "first": 0, "last": 5}
        heads = []
        while True:
            h = json.loads(ws.recv(timeout=10))
            if h["type"] == "end":
                break
            ws.recv(timeout=10)
            heads.append(h["index"])
    assert heads == list(range(6, 14))


def test_jpeg_format(server, http):
    from PIL import Image

    sid, token, auth = create(http, max_chunks=2)
    with connect(ws_url(server, sid, token, format="jpeg"), max_size=None) as ws:
        init, _, chunks, end = read_stream(ws)
    assert init["format"] == "jpeg" and len(chunks) == 2
    for head, payload in chunks:
        assert sum(head["sizes"]) == len(payload) and len(head["sizes"]) == 4
        off = 0
        for n in head["sizes"]:
            img = Image.open(io.BytesIO(payload[off:off + n]))
            assert img.size == (32, 32)
            assert abs(np.asarray(img).mean() - level_of(head["index"])) < 6
            off += n


def test_bad_stream_parameters(server, http):
    sid, token, auth = create(http, max_chunks=1)
    with connect(ws_url(server, sid, token, format="gif")) as ws:
        err = json.loads(ws.recv(timeout=10))
    assert err["type"] == "error" and err["field"] == "format"
    with connect(ws_url(server, sid, token, from_chunk=-3)) as ws:
        err = json.loads(ws.recv(timeout=10))
    assert err["field"] == "from_chunk"


SLOW_CHUNKS = 100  # of random 128x128 JPEG frames: ~15 MB, far more than socket buffers hold


def test_slow_client_never_stalls_other_sessions(server, http):
    """A client that stops reading fills its socket; its session and the others go on."""
    # Random frames make megabytes of JPEGs, far beyond the socket buffers; with
    # max_queue=1 the client stops reading from the socket after one message.
    slow_sid, slow_token, slow_auth = create(http, max_chunks=SLOW_CHUNKS, prompt="NOISE",
                                             width=128, height=128)
    with connect(ws_url(server, slow_sid, slow_token, format="jpeg"), max_size=None,
                 max_queue=1) as stalled:
        fast_sid, fast_token, _ = create(http, max_chunks=30)
        t0 = time.monotonic()
        with connect(ws_url(server, fast_sid, fast_token), max_size=None) as ws:
            _, _, chunks, end = read_stream(ws, timeout=20)
        assert [h["index"] for h, _ in chunks] == list(range(30)) and end["state"] == "closed"
        assert time.monotonic() - t0 < 20
        # the stalled client's session kept generating: its producer never waits for it
        body = wait_state(http, slow_sid, slow_auth, {"closed"}, timeout=60)
        assert body["chunks_generated"] == SLOW_CHUNKS
        # encoding trails generation under load: read only once every chunk is encoded, so
        # the blocked sender is then far behind the replay buffer
        wait_stream(http, slow_sid, slow_auth, SLOW_CHUNKS, timeout=60)
        # Reading now: the server's sender for this client was blocked (its cursor fell
        # behind the 8-chunk replay buffer), so it says which chunks it skipped, then
        # continues in order with nothing twice.
        seen, gaps = [], []
        while True:
            msg = stalled.recv(timeout=20)
            if isinstance(msg, bytes):
                continue
            head = json.loads(msg)
            if head["type"] == "chunk":
                seen.append(head["index"])
            elif head["type"] == "gap":
                gaps.append((head["first"], head["last"]))
            elif head["type"] == "end":
                break
    assert gaps, "the stalled client never fell behind: the test did not stall it"
    covered = sorted(seen + [i for a, b in gaps for i in range(a, b + 1)])
    assert covered == list(range(SLOW_CHUNKS))


def test_failing_session_does_not_harm_others(server, http):
    ok_sid, ok_token, ok_auth = create(http, max_chunks=20)
    bad_sid, bad_token, bad_auth = create(http, prompt="FAIL")
    body = wait_state(http, bad_sid, bad_auth, {"failed"})
    assert "asked to fail" in body["error"]
    body = wait_state(http, ok_sid, ok_auth, {"closed"}, timeout=30)
    assert body["chunks_generated"] == 20
    with connect(ws_url(server, bad_sid, bad_token)) as ws:
        init = json.loads(ws.recv(timeout=10))
        assert init["type"] == "init"
        end = json.loads(ws.recv(timeout=10))
    assert end["type"] == "end" and end["state"] == "failed"


# ------------------------------------------------------------------ cluster, metrics, misc
def test_cluster_metrics_health(server, http):
    sid, token, auth = create(http, max_chunks=4)
    wait_state(http, sid, auth, {"closed"})
    cl = http.get("/v1/cluster").json()
    assert cl["policy"] == "turboserve" and cl["gpus_provisioned"] >= 1
    assert {w["device"] for w in cl["workers"]} == {"cpu"}
    for w in cl["workers"]:
        assert {"id", "device", "state", "load_ms", "batch", "sessions"} <= set(w)
    text = http.get("/metrics").text
    for name in ("turboserve_chunk_latency_ms_bucket", "turboserve_slo_misses_total",
                 "turboserve_sessions{state=\"active\"}", "turboserve_worker_load_ms",
                 "turboserve_worker_batch", "turboserve_migrations_total", "turboserve_offloads_total",
                 "turboserve_gpus_provisioned", "turboserve_cost_usd_total"):
        assert name in text, name
    count = [line for line in text.splitlines() if line.startswith("turboserve_chunks_total")]
    assert sum(float(line.split()[-1]) for line in count) >= 4
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").status_code == 200
    spec = http.get("/openapi.json").json()
    assert "/v1/sessions" in spec["paths"] and "/v1/cluster" in spec["paths"]
    assert "turboserve" in http.get("/").text
    models = http.get("/v1/models").json()["models"]
    assert models[0]["default_spec"]["frames_per_chunk"] == 4
