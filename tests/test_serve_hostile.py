"""`neodeploy serve` attacked as a hostile client would (issue 23): each fault a test that failed before the fix.

One server process for the module, with an API key, small limits and short timeouts, on a GPT-NeoX wide enough
(hidden 256, the real 50k vocabulary) that a 2,000-token generation takes seconds; in-process apps (httpx's ASGI
transport) where a test needs another configuration. The SIGTERM test runs last: it stops the module's server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import socket
import threading
import time
from collections import Counter

import httpx
import pytest

from conftest import serving

pytestmark = pytest.mark.slow

KEY = "sk-hostile"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG = 2040  # new tokens: prompt + LONG fills the 2048-token context


@pytest.fixture(scope="module")
def artifact(wide_artifact):
    return wide_artifact


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, KEY, "--max-running", "2", "--max-waiting", "2", "--grace-period", "0", "--header-timeout",
                 "1", "--body-timeout", "1", "--max-connections", "24") as started:
        yield started


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _idle(url: str, timeout: float = 10) -> float:
    """Seconds until nothing runs or waits (raises if that takes longer than timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if _metric(url, "neodeploy_running_requests") == 0 and _metric(url, "neodeploy_waiting_requests") == 0:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"requests still in flight after {timeout} s")


def _post(url, body, headers=AUTH, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, headers=headers, **kw)


def _assert_openai_error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    return error


# ------------------------------------------------------------------------------------------------- 1. abandoned

def test_an_abandoned_non_streaming_request_frees_its_slots(server):
    _, url = server
    cancelled = 'neodeploy_requests_total{outcome="cancelled"}'
    before, length_before = _metric(url, cancelled), _metric(url, 'neodeploy_requests_total{outcome="length"}')
    with pytest.raises(httpx.ReadTimeout):  # the client gives up; n=4 fills both slots and the queue
        _post(url, {"model": "tiny", "prompt": "hi", "max_tokens": LONG, "n": 4, "temperature": 0}, timeout=0.5)
    assert _idle(url) < 3  # four generations of 2,040 tokens would take far longer
    assert _metric(url, cancelled) == before + 4
    assert _metric(url, 'neodeploy_requests_total{outcome="length"}') == length_before


# ------------------------------------------------------------------------------------------------- 2. and 9. hosts

def test_the_host_header_can_neither_spoof_the_key_check_nor_rebind(server, artifact):
    _, url = server
    for host in ("x/y", "a?", "a#", "evil.example", "evil.example:80"):
        for path in ("/v1/models", "/v1/completions"):
            r = httpx.request("GET" if path.endswith("models") else "POST", url + path, headers={"Host": host},
                              json={"model": "tiny", "prompt": "hi", "max_tokens": 1})
            assert _assert_openai_error(r, 400)["code"] == "invalid_host", (host, path)
    assert httpx.get(f"{url}/v1/models", headers={"Host": "localhost", **AUTH}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Host": "[::1]:1", **AUTH}).status_code == 200

    # Where every host is allowed (behind a proxy, on Ray), the key is still checked on the raw path.
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    options = ServeOptions(artifact, "tiny", api_key=KEY)
    app = create_app(options, ServerState(options))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.get("/v1/models", headers={"Host": host}) for host in ("x/y", "a?", "a#", "health#")]

    for r in asyncio.run(go()):
        assert _assert_openai_error(r, 401)["code"] == "invalid_api_key"

    options = ServeOptions(artifact, "tiny", api_key="ключ-1")  # a non-ASCII key works as clients send it (UTF-8)
    app = create_app(options, ServerState(options))

    async def utf8():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.get("/v1/models", headers={"Authorization": value}) for value in
                    ("Bearer ключ-1".encode(), "Bearer ключ-2".encode())]

    right, wrong = asyncio.run(utf8())
    assert right.status_code == 503 and wrong.status_code == 401  # past the key: the model is not loaded here


def test_cross_site_posts_and_cors(server, artifact):
    _, url = server
    body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1})
    simple = httpx.post(f"{url}/v1/completions", content=body, headers={**AUTH, "Content-Type": "text/plain"})
    assert _assert_openai_error(simple, 415)["code"] == "unsupported_media_type"
    form = httpx.post(f"{url}/v1/completions", content=body,
                      headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert httpx.post(f"{url}/v1/completions", content=body,
                      headers={**AUTH, "Content-Type": "Application/JSON; charset=utf-8"}).status_code == 200
    preflight = httpx.options(f"{url}/v1/completions", headers={"Origin": "http://evil.example",
                                                               "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers  # CORS is off by default

    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    options = ServeOptions(artifact, "tiny", api_key=KEY, cors_origins=("http://ui.example",))
    app = create_app(options, ServerState(options))

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.options("/v1/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                               "Access-Control-Request-Headers": "authorization"})
                    for origin in ("http://ui.example", "http://evil.example")]

    allowed, refused = asyncio.run(go())
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ui.example"
    assert "access-control-allow-origin" not in refused.headers


# ------------------------------------------------------------------------------------------------- 3. the event loop

def test_tokenising_a_huge_prompt_never_stalls_other_clients(server):
    _, url = server
    prompt = "The quick brown fox jumps over the lazy dog; " * 40_000  # 1.8 M characters, under the length bound
    result = {}

    def big():
        start = time.monotonic()
        result["response"] = _post(url, {"model": "tiny", "prompt": prompt, "max_tokens": 1}, timeout=60)
        result["seconds"] = time.monotonic() - start

    caller = threading.Thread(target=big)
    caller.start()
    gaps = []
    while caller.is_alive():
        start = time.monotonic()
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        gaps.append(time.monotonic() - start)
        time.sleep(0.02)
    caller.join()
    assert result["seconds"] > 0.4 and len(gaps) >= 5  # the tokenizer did work while /health was asked
    assert max(gaps) < 0.3, f"/health waited {max(gaps):.2f} s while a prompt was tokenised"
    assert "exceeds the artifact's context" in _assert_openai_error(result["response"], 400)["message"]
    whole = _post(url, {"model": "tiny", "prompt": [prompt[:1_500_000]] * 2, "max_tokens": 1})
    assert "several requests" in _assert_openai_error(whole, 400)["message"]


# ------------------------------------------------------------------------------------------------- 4. and 5. 400s

@pytest.mark.parametrize("body, param", [
    ('{"model": "tiny", "prompt": "hi", "temperature": 1' + "0" * 400 + "}", "temperature"),
    ('{"model": "tiny", "prompt": "hi", "top_p": 1' + "0" * 400 + "}", "top_p"),
    ('{"model": "tiny", "prompt": "hi", "repetition_penalty": 1' + "0" * 400 + "}", "repetition_penalty"),
    ("[" * 1200 + "]" * 1200, None),
    ('{"model": "tiny", "prompt": ' + "[" * 5000 + "1" + "]" * 5000 + "}", None),
    ('{"model": "tiny", "prompt": ["a", "b", "c"], "n": 2}', "n"),
])
def test_request_data_is_a_400_never_a_500(server, body, param):
    _, url = server
    r = httpx.post(f"{url}/v1/completions", content=body, headers={**AUTH, "Content-Type": "application/json"})
    error = _assert_openai_error(r, 400)
    assert error["param"] == param and len(error["message"]) < 300
    assert httpx.get(f"{url}/health").status_code == 200


def test_an_internal_error_gives_a_request_id_and_logs_once(artifact, caplog):
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    options = ServeOptions(artifact, "tiny", skip_check=True)
    state = ServerState(options)
    state.load()

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    state.engine.submit = broken
    app = create_app(options, state)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return await c.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})

    try:
        with caplog.at_level(logging.ERROR, logger="neodeploy.serve"):
            r = asyncio.run(go())
    finally:
        state.engine.close()
    error = _assert_openai_error(r, 500)
    assert "secret" not in r.text and error["code"] == "internal_error"
    request_id = re.search(r"request (\w+)", error["message"]).group(1)
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])


# ------------------------------------------------------------------------------------------------- 6. and 7. bodies

def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return data


def test_a_chunked_upload_is_cut_off_at_the_limit(server):
    proc, url = server
    rss = _rss_kb(proc.pid)
    sock = _connect(url)
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    chunk = b"%x\r\n" % (1 << 20) + b" " * (1 << 20) + b"\r\n"
    sent = 0
    try:
        for _ in range(256):  # up to 256 MiB; the server stops reading after 16
            sock.sendall(chunk)
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_all(sock, 5)
    sock.close()
    assert sent < 256 and reply.startswith(b"HTTP/1.1 413"), (sent, reply[:100])
    assert (_rss_kb(proc.pid) - rss) < 100_000  # kB: it did not hold 256 MiB
    assert httpx.get(f"{url}/health").status_code == 200


def test_slow_clients_are_timed_out_and_connections_are_capped(server):
    _, url = server
    silent, trickle, short_body = _connect(url), _connect(url), _connect(url)
    trickle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the blank line
    short_body.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ".encode())
    start = time.monotonic()
    replies = [_read_all(s, 5) for s in (silent, trickle, short_body)]
    assert time.monotonic() - start < 4.5  # each closed within its 1 s timeout, not held open
    assert replies[0].startswith(b"HTTP/1.1 408") and replies[1].startswith(b"HTTP/1.1 408")
    assert replies[2].startswith(b"HTTP/1.1 408") and b"request_timeout" in replies[2]
    for s in (silent, trickle, short_body):
        s.close()

    held = [_connect(url) for _ in range(24)]  # the cap; each says nothing (and would time out in 1 s)
    try:
        over = _connect(url)
        reply = _read_all(over, 2)
        over.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"too_many_connections" in reply
    finally:
        for s in held:
            s.close()
    time.sleep(0.2)
    assert httpx.get(f"{url}/health").status_code == 200


# ------------------------------------------------------------------------------------------------- 10. smaller

def test_auth_and_unknown_routes_are_counted_and_bearer_is_case_insensitive(server):
    _, url = server
    unauthorized = 'neodeploy_requests_total{outcome="rejected_unauthorized"}'
    not_found = 'neodeploy_requests_total{outcome="rejected_not_found"}'
    u, n = _metric(url, unauthorized), _metric(url, not_found)
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/nothing", headers=AUTH).status_code == 404
    assert _post(url, {"model": "gpt-4", "prompt": "hi"}).status_code == 404
    assert _metric(url, unauthorized) == u + 1 and _metric(url, not_found) == n + 2
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200


def test_a_template_that_overflows_is_a_400_and_health_hides_paths(artifact, tmp_path):
    from neodeploy.serve.app import ServeOptions, ServerState, create_app
    from neodeploy.serve.chat import ChatTemplate

    options = ServeOptions(artifact, "tiny", skip_check=True)
    state = ServerState(options)
    state.load()
    state.chat = ChatTemplate("{% for i in range(100001) %}x{% endfor %}", None, None)
    missing = ServeOptions(tmp_path / "secret-folder" / "art", "tiny")
    failed = ServerState(missing)
    failed.load()

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(options, state)),
                                     base_url="http://test") as c:
            chat = await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                             "content": "hi"}]})
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(missing, failed)),
                                     base_url="http://test") as c:
            return chat, await c.get("/health"), await c.get("/v1/models")

    try:
        chat, health, models = asyncio.run(go())
    finally:
        state.engine.close()
    assert "chat template" in _assert_openai_error(chat, 400)["message"]
    assert health.status_code == 503 and health.json()["status"] == "failed"
    assert "secret-folder" not in health.text and "secret-folder" not in models.text
    assert "secret-folder" in failed.error  # the log keeps the reason


# ------------------------------------------------------------------------------------------------- the schema, fuzzed

def test_openapi_describes_exactly_the_fields_the_parser_takes(server):
    from neodeploy.serve.protocol import CHAT_FIELDS, COMPLETION_FIELDS

    _, url = server
    doc = httpx.get(f"{url}/openapi.json").json()
    schemas = doc["components"]["schemas"]
    assert set(schemas["CompletionRequest"]["properties"]) == COMPLETION_FIELDS
    assert set(schemas["ChatCompletionRequest"]["properties"]) == CHAT_FIELDS
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(doc["paths"])
    assert httpx.get(f"{url}/docs").status_code == 200


def test_fuzzing_from_the_schema_finds_no_5xx(server):
    """Schemathesis generates valid and invalid bodies from /openapi.json; every answer is below 500, every error
    an OpenAI-style body, and the server is healthy after. Generation is capped at 8 tokens (time, not coverage)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core import NOT_SET
    from schemathesis.generation import GenerationMode

    _, url = server
    schema = schemathesis.openapi.from_dict(httpx.get(f"{url}/openapi.json").json())
    statuses: Counter = Counter()
    deadline = time.monotonic() + 50
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

                @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def fuzz(case):
                    if time.monotonic() > deadline:
                        return
                    body = case.body if isinstance(case.body, dict) else None
                    if body is not None:
                        if mode is GenerationMode.POSITIVE:
                            body["model"] = "tiny"  # the one id GET /v1/models lists: past the 404, into the engine
                        for name in ("max_tokens", "max_completion_tokens"):
                            if isinstance(body.get(name), int) and body[name] > 8:
                                body[name] = 8
                        if "messages" in body and "max_tokens" not in body and "max_completion_tokens" not in body:
                            body["max_tokens"] = 8
                    if case.body is NOT_SET:
                        kwargs = {}
                    elif isinstance(case.body, (bytes, str)):  # negative cases send raw bytes too
                        kwargs = {"content": case.body, "headers": {"Content-Type": "application/json"}}
                    else:
                        kwargs = {"json": case.body}
                    r = client.request(case.method, case.formatted_path, **kwargs)
                    statuses[r.status_code] += 1
                    assert r.status_code < 500, (case.method, case.path, case.body, r.text)
                    if r.status_code >= 400:
                        _assert_openai_error(r, r.status_code)

                try:
                    fuzz()
                except Unsatisfiable:  # nothing invalid to send to a route without a body or parameters
                    assert mode is GenerationMode.NEGATIVE and operation.method == "get"
    print(f"fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 100 and statuses[200] >= 10 and statuses[400] >= 10
    assert httpx.get(f"{url}/health").status_code == 200 and _idle(url) < 10


# ------------------------------------------------------------------------------------------------- 8. SIGTERM, last

def test_sigterm_past_the_grace_period_ends_streams_cleanly(server):
    """--grace-period 0: at SIGTERM two running streams end with finish_reason "cancelled" and [DONE], a queued
    non-streaming request gets a 503 JSON, a queued stream an error event; the log counts them; exit 0."""
    proc, url = server
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": LONG, "temperature": 0}
    clients = [httpx.Client(timeout=60) for _ in range(3)]
    contexts, results = [], {}
    try:
        streams = []
        for c in clients[:2]:
            ctx = c.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH)
            contexts.append(ctx)
            lines = ctx.__enter__().iter_lines()
            assert next(line for line in lines if line).startswith("data: {")  # running: its first token is out
            streams.append(lines)

        def queued():
            results["plain"] = _post(url, body, timeout=60)

        waiter = threading.Thread(target=queued)
        waiter.start()
        ctx = clients[2].stream("POST", f"{url}/v1/completions", json={**body, "stream": True}, headers=AUTH)
        contexts.append(ctx)
        queued_stream = ctx.__enter__()
        deadline = time.monotonic() + 5
        while _metric(url, "neodeploy_waiting_requests") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _metric(url, "neodeploy_running_requests") == 2 and _metric(url, "neodeploy_waiting_requests") == 2
        proc.send_signal(signal.SIGTERM)
        for lines in streams:
            events = [line for line in lines if line]
            assert events[-1] == "data: [DONE]"
            assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "cancelled"
        queued_events = [line for line in queued_stream.iter_lines() if line]
        assert json.loads(queued_events[-1][6:])["error"]["type"] == "service_unavailable"
        waiter.join(30)
        assert _assert_openai_error(results["plain"], 503)["type"] == "service_unavailable"
    finally:
        for ctx in contexts:
            ctx.__exit__(None, None, None)
        for c in clients:
            c.close()
    assert proc.wait(30) == 0
    stderr = proc.stderr.read()
    assert "cancelled 2 running and 2 queued request(s)" in stderr and "Traceback" not in stderr
