"""The client libraries people point at an OpenAI server, unmodified, against one `neodeploy serve` process:
openai, langchain-openai, instructor, pydantic-ai and openai-agents. Each call the compatibility issue listed
returns, and structured output and tool calls come back as validated objects (a random-weight model: the grammar,
not the model, makes them valid; every string is bounded so each answer ends).

The server serves the built-in ChatML template (`--chat-template chatml`), which renders tools and tool calls.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Annotated, Literal

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field

from conftest import cli, serving

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

KEY = "sk-clients"
CLOSERS = {"3": 10.0, "94": 10.0, "986": 10.0}  # '"', '}', '"}' in the GPT-NeoX tokenizer: a random model ends JSON


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    role: Literal["admin", "user"]


@pytest.fixture(scope="module")
def server(serve_artifact):
    with serving(serve_artifact, KEY, "--chat-template", "chatml", "--max-running", "8") as (_, url):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def test_openai_neutral_values_content_parts_and_tokenize(server, client):
    r = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0, frequency_penalty=0,
                                  presence_penalty=0, logit_bias={}, best_of=1, n=1)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    plain = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi there"}],
                                           max_tokens=6, temperature=0)
    parts = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text",
                                                                                          "text": "there"}]}],
        max_tokens=6, temperature=0, store=False, response_format={"type": "text"}, frequency_penalty=0,
        presence_penalty=None, parallel_tool_calls=False, tools=[], logit_bias={})
    joined = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi\nthere"}],
                                            max_tokens=6, temperature=0)
    assert parts.choices[0].message.content == joined.choices[0].message.content  # text parts joined by newlines
    assert plain.choices[0].message.content != "" and plain.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="tiny", max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}])
    with pytest.raises(openai.BadRequestError, match="store"):
        client.chat.completions.create(model="tiny", max_tokens=2, store=True, messages=[{"role": "user",
                                                                                          "content": "x"}])
    auth = {"Authorization": f"Bearer {KEY}"}
    tokens = httpx.post(f"{server}/tokenize", json={"model": "tiny", "prompt": "Hello world"}, headers=auth).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2 and tokens["max_model_len"] == 2048
    text = httpx.post(f"{server}/detokenize", json={"model": "tiny", "tokens": tokens["tokens"]}, headers=auth).json()
    assert text == {"prompt": "Hello world"}
    many = httpx.post(f"{server}/detokenize", json={"model": "tiny", "tokens": [1] * 9000}, headers=auth)
    assert many.status_code == 400 and many.json()["error"]["param"] == "tokens"


def test_openai_structured_output_tool_calls_and_a_streamed_json_object(client):
    parsed = client.chat.completions.parse(model="tiny", messages=[{"role": "user", "content": "A person"}],
                                           response_format=Person, max_tokens=60, temperature=1.0, seed=2)
    assert isinstance(parsed.choices[0].message.parsed, Person)

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["C", "F"]}}}}}
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                           tools=[weather], tool_choice=choice, max_tokens=60, temperature=1.0, seed=3)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        import jsonschema

        jsonschema.validate(json.loads(call.function.arguments), weather["function"]["parameters"])
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Weather?"}],
                                            tools=[weather], tool_choice="required", max_tokens=60, stream=True)
    deltas = [c.choices[0] for c in stream if c.choices]
    calls = [d.delta.tool_calls[0] for d in deltas if d.delta.tool_calls]
    assert deltas[-1].finish_reason == "tool_calls" and calls[0].function.name == "get_weather"
    json.loads("".join(c.function.arguments for c in calls))

    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                            response_format={"type": "json_object"}, max_tokens=300, temperature=1.0,
                                            seed=1, logit_bias=CLOSERS, stream=True)
    chunks = [c for c in stream if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)


def test_langchain(server):
    from langchain_openai import ChatOpenAI, OpenAI

    llm = OpenAI(model="tiny", base_url=f"{server}/v1", api_key=KEY, max_tokens=5, temperature=0, max_retries=0)
    assert isinstance(llm.invoke("Hello"), str)  # it always sends frequency_penalty 0 and presence_penalty 0
    chat = ChatOpenAI(model="tiny", base_url=f"{server}/v1", api_key=KEY, max_tokens=60, temperature=1.0, seed=4,
                      frequency_penalty=0.0, max_retries=0)
    assert isinstance(chat.invoke("Hi").content, str)
    for method in ("json_schema", "function_calling"):
        person = chat.with_structured_output(Person, method=method).invoke("Make a person")
        assert isinstance(person, Person), method


def test_instructor(server):
    import instructor

    base = openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)
    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(base, mode=mode)
        person = client.chat.completions.create(model="tiny", response_model=Person, max_retries=0, max_tokens=80,
                                                temperature=1.0, seed=5,
                                                messages=[{"role": "user", "content": "Make a person"}])
        assert isinstance(person, Person), mode

    class Note(BaseModel):  # JSON mode constrains to any object: a model every object satisfies
        model_config = ConfigDict(extra="allow")

    client = instructor.from_openai(base, mode=instructor.Mode.JSON)
    note = client.chat.completions.create(model="tiny", response_model=Note, max_retries=0, max_tokens=300,
                                          temperature=1.0, seed=6, logit_bias=CLOSERS,
                                          messages=[{"role": "user", "content": "A note"}])
    assert isinstance(note, Note)


def test_pydantic_ai(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    model = OpenAIChatModel("tiny", provider=OpenAIProvider(base_url=f"{server}/v1", api_key=KEY))
    agent = Agent(model, output_type=Person, model_settings={"max_tokens": 80, "temperature": 1.0, "seed": 7})
    assert isinstance(agent.run_sync("Make a person").output, Person)


def test_openai_agents_function_tools(server):
    from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)

    @function_tool
    def get_weather(city: Annotated[str, Field(max_length=10)]) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    model = OpenAIChatCompletionsModel(model="tiny", openai_client=openai.AsyncOpenAI(base_url=f"{server}/v1",
                                                                                       api_key=KEY, max_retries=0))
    agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather], model=model,
                  model_settings=ModelSettings(tool_choice="required", frequency_penalty=0.0, max_tokens=60,
                                               temperature=1.0),
                  tool_use_behavior="stop_on_first_tool")
    result = Runner.run_sync(agent, "Weather in Oslo?")
    assert str(result.final_output).startswith("sunny in ")


def test_a_chat_template_is_shipped_by_export_and_named_where_it_is_missing(serve_artifact, tmp_path):
    """export --chat-template chatml writes chat_template.jinja (listed with its sha256); inspect says where the
    template is; an artifact without one says so at start, and its chat 400 names both options."""
    from neodeploy.export import export
    from neodeploy.core.files import sha256
    from neodeploy.core.manifest import read_manifest
    from neodeploy.core.tokenizer import CHATML
    from neodeploy.serve.app import ServeOptions, ServerState, create_app

    art = export(serve_artifact.parent / "ckpt", tmp_path / "chatml", chat_template=CHATML, echo=lambda s: None)
    manifest = read_manifest(art)
    assert manifest.files["chat_template.jinja"] == sha256(art / "chat_template.jinja")
    assert (art / "chat_template.jinja").read_text() == CHATML
    inspect = cli("inspect", art)
    assert "yes (chat_template.jinja)" in inspect.stdout

    bare = tmp_path / "bare"
    shutil.copytree(serve_artifact, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    data = json.loads((bare / "neodeploy.json").read_text())
    data["files"]["tokenizer_config.json"] = sha256(bare / "tokenizer_config.json")
    (bare / "neodeploy.json").write_text(json.dumps(data))
    inspect = cli("inspect", bare)
    assert "none: /v1/chat/completions answers 400" in inspect.stdout

    options = ServeOptions(bare, "tiny", skip_check=True)
    state = ServerState(options)
    state.load()
    assert state.chat is None

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(options, state)),
                                     base_url="http://test") as c:
            return await c.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                             "content": "hi"}]})

    try:
        r = asyncio.run(go())
    finally:
        state.engine.close()
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and "export it with --chat-template" in message and "serve it with" in message
