"""`neodeploy serve` as a real subprocess on 127.0.0.1, driven by the official openai client and raw HTTP.

One server for the module (a tiny GPT-NeoX with the real GPT-NeoX-20B tokenizer and a chat template, 2048
positions so long streams take seconds); a second process only for the drifted artifact, which must never
become ready; the SIGTERM drain runs last, on the module's server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import drifted_copy, serving, start_server, wait_ready
from neodeploy.runtime import load

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

KEY = "sk-test-123"
PROMPTS = ["Hello there", "The capital of", "def fib(n):", "Once upon a time", "1, 2, 3,", "naïve café", "Q: why?",
           "import numpy"]


def _start(artifact, *flags):
    return start_server(artifact, KEY, *flags)


def _wait_ready(proc, url, timeout=120):
    return wait_ready(proc, url, timeout)


@pytest.fixture(scope="module")
def artifact(serve_artifact):
    return serve_artifact


@pytest.fixture(scope="module")
def server(artifact):
    with serving(artifact, KEY, "--max-running", "4", "--max-waiting", "4", "--grace-period", "20") as started:
        yield started


@pytest.fixture(scope="module")
def model(artifact):
    return load(artifact)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, max_retries=0)


def test_16_requests_from_8_clients_equal_model_generate_alone(client, model):
    jobs = [(PROMPTS[i % 8], 4 + 3 * i) for i in range(16)]

    def one(job):
        prompt, n = job
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, r.usage.prompt_tokens

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, jobs))
    for (prompt, n), (text, finish, completion, prompt_tokens) in zip(jobs, got):
        want = model.generate(prompt, max_new_tokens=n)[0]
        assert text == want.text
        assert finish == ("length" if want.finish_reason == "length" else "stop")
        assert completion == len(want.output_ids) and prompt_tokens == len(want.prompt_ids)


def test_streaming_seeded_sampling_token_prompts_and_logprobs(client, model):
    stream = client.completions.create(model="tiny", prompt="Hello there", max_tokens=24, temperature=0.8, seed=5,
                                       stream=True)
    chunks = list(stream)
    want = model.generate("Hello there", max_new_tokens=24, temperature=0.8, seed=5)[0]
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("length", "stop") and len(chunks) > 2
    ids = model.encode("The capital of")
    r = client.completions.create(model="tiny", prompt=[ids, ids], max_tokens=5, temperature=0, logprobs=2, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert len({c.text for c in r.choices}) == 1 and r.usage.prompt_tokens == 2 * len(ids)
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == r.usage.completion_tokens // 4
    assert all(t <= 0 for t in lp.token_logprobs) and all(len(top) >= 1 for top in lp.top_logprobs)
    echoed = client.completions.create(model="tiny", prompt="Hello there", max_tokens=3, temperature=0, echo=True)
    assert echoed.choices[0].text == "Hello there" + model.generate("Hello there", max_new_tokens=3)[0].text


def test_chat_renders_the_template_as_transformers_does(client, model, artifact):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    rendered = AutoTokenizer.from_pretrained(str(artifact)).apply_chat_template(messages, tokenize=False,
                                                                                add_generation_prompt=True)
    want = model.generate(rendered, max_new_tokens=10)[0]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.output_ids)


def test_errors_surface_as_the_clients_exception_types(client, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"best_of": 2})
    assert "best_of" in str(bad.value)
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, top_p=0)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="hi " * 2000, max_tokens=100)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=4)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server[1]}/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_raw_http_statuses_sse_framing_429_and_dropped_connections(server):
    _, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": "hot"}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    nope = httpx.post(f"{url}/v1/completions", content=b"{nope", headers={**auth, "Content-Type": "application/json"})
    assert nope.status_code == 400 and "not valid JSON" in nope.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"}, headers=auth).status_code == 404
    assert httpx.get(f"{url}/health").json()["check"]["passed"] is True

    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 1500, "temperature": 0, "stream": True}
    clients = [httpx.Client(timeout=30) for _ in range(8)]
    streams = []
    try:
        for c in clients:  # 4 running + 4 waiting: the server's limits
            s = c.stream("POST", f"{url}/v1/completions", json=body, headers=auth)
            streams.append((s, s.__enter__()))
        first = streams[0][1]
        lines = first.iter_lines()
        arrived = []
        for line in lines:
            if line:
                arrived.append((time.monotonic(), line))
            if len(arrived) == 3:
                break
        assert all(line.startswith("data: {") for _, line in arrived)
        assert json.loads(arrived[0][1][6:])["object"] == "text_completion"
        over = httpx.post(f"{url}/v1/completions", json=body, headers=auth)
        assert over.status_code == 429 and over.headers["retry-after"] == "1"
        assert "max_waiting" in over.json()["error"]["message"]
        metrics = httpx.get(f"{url}/metrics").text
        assert "neodeploy_running_requests 4.0" in metrics and "neodeploy_waiting_requests 4.0" in metrics
    finally:
        for s, _ in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = httpx.get(f"{url}/metrics").text
        if "neodeploy_running_requests 0.0" in metrics and "neodeploy_waiting_requests 0.0" in metrics:
            break
        time.sleep(0.1)
    assert "neodeploy_running_requests 0.0" in metrics, "dropped connections must free their slots"
    assert 'neodeploy_requests_total{outcome="cancelled"}' in metrics
    assert 'neodeploy_requests_total{outcome="rejected_overloaded"} 1.0' in metrics
    assert "neodeploy_time_to_first_token_seconds_count" in metrics and "neodeploy_batch_size_bucket" in metrics

    # A short stream, read to the end: every event is `data: …` and the last is [DONE].
    short = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 5}, headers=auth)
    events = [e for e in short.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert short.headers["content-type"].startswith("text/event-stream")


def test_503_while_loading_and_json_errors_in_process(artifact):
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    options = ServeOptions(artifact, "tiny")
    state = ServerState(options)  # its load() never runs here: the app stays "loading"
    app = create_app(options, state)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.get("/health"), await c.get("/v1/models")

    health, models = asyncio.run(go())
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert models.status_code == 503 and models.headers["retry-after"] == "1"
    assert models.json()["error"]["type"] == "service_unavailable"


def test_every_error_is_openai_json_and_oversized_prompts_are_refused_before_tokenizing(artifact):
    """In process: unknown routes and methods answer OpenAI's error body, not FastAPI's {"detail"}; another
    model's name is a 404 even where this one has no chat template; a prompt far beyond the context is a 400 from
    its length alone (the tokenizer holds the GIL: 10 MB of text stalled every client for 13 s); a body over the
    limit is a 413."""
    from neodeploy.serve.app import ServeOptions, ServerState, create_app
    from neodeploy.serve.handlers import MAX_BODY

    options = ServeOptions(artifact, "tiny", skip_check=True)
    state = ServerState(options)
    state.load()
    state.chat = None  # as for a tokenizer that ships no chat template
    app = create_app(options, state)
    chat = {"messages": [{"role": "user", "content": "hi"}]}

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            return [await c.post("/v1/chat/completions", json={"model": "other", **chat}),
                    await c.post("/v1/chat/completions", json={"model": "tiny", **chat}),
                    await c.get("/v1/completions"),
                    await c.post("/v1/nothing", json={}),
                    await c.post("/v1/completions", json={"model": "tiny", "prompt": "a" * (3 * 2048 * 512)}),
                    await c.post("/v1/completions", content=b" " * (MAX_BODY + 1),
                                 headers={"Content-Type": "application/json"}),
                    await c.post("/v1/completions", json={"model": "tiny", "prompt": "Once", "max_tokens": 2})]

    try:
        other, no_template, method, route, huge, body, fine = asyncio.run(go())
    finally:
        state.engine.close()
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]
    assert method.status_code == 405 and method.json()["error"]["code"] == "method_not_allowed"
    assert route.status_code == 404 and route.json()["error"]["type"] == "invalid_request_error"
    assert huge.status_code == 400 and "far longer than the context" in huge.json()["error"]["message"]
    assert body.status_code == 413 and body.json()["error"]["code"] == "payload_too_large"
    assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 2


def test_a_drifted_artifact_never_becomes_ready(artifact, tmp_path):
    """Weights perturbed after export, with the sha256 updated so the artifact loads: the golden check catches it."""
    drifted = drifted_copy(artifact, tmp_path / "drifted")
    proc, url = _start(drifted)
    try:
        seen, code = _wait_ready(proc, url)
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 200 not in seen and code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("neodeploy: error:")]
    assert len(errors) == 1 and "golden check failed" in errors[0] and "Traceback" not in stderr


def test_sigterm_drains_in_flight_requests_and_exits_0(server):
    """Runs last: it stops the module's server."""
    proc, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 300, "temperature": 0}
    result = {}

    def call():
        result["response"] = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=60)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 10
    while "neodeploy_running_requests 1.0" not in httpx.get(f"{url}/metrics").text and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    caller.join(60)
    assert proc.wait(60) == 0
    response = result["response"]
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] > 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/health", timeout=2)
