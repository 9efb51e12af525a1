"""The sampler's OpenAI penalties, logit_bias and min_p against numpy statements of the formulas, and structured
output by llguidance: every seeded sample parses and validates (jsonschema is the oracle), regexes fullmatch, and
a constrained request in a batch gets what it gets alone. Both families, random weights, real tokenizers."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from conftest import tiny_neo, tiny_neox, tokenizer_dir
from neodeploy.core.errors import UsageError
from neodeploy.runtime.sampling import Sampler, SamplingParams, sampling_distribution

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")


# ------------------------------------------------------------------------------------------------- the formulas

def test_penalties_and_logit_bias_follow_openai_and_transformers_formulas():
    """OpenAI: mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty over the generated tokens, then
    the bias; transformers' repetition penalty over prompt and output before them. Greedy picks the argmax of it."""
    from neodeploy.runtime.sampling import adjusted

    rng = np.random.default_rng(1)
    logits = rng.standard_normal(64).astype(np.float32) * 3
    prompt, outputs = [1, 2, 3], [5, 5, 7, 5, 9]
    params = SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4, repetition_penalty=1.3,
                            logit_bias={"11": 4.5, 3: -100})
    want = logits.astype(np.float64)
    for j in set(prompt + outputs):  # transformers: divide positive logits, multiply negative ones
        want[j] = want[j] / 1.3 if want[j] > 0 else want[j] * 1.3
    for j in set(outputs):
        want[j] -= outputs.count(j) * 0.7 + (-0.4)
    want[11] += 4.5
    want[3] -= 100
    np.testing.assert_allclose(adjusted(logits, prompt + outputs, outputs, params), want, rtol=0, atol=1e-12)

    sampler = Sampler(params, prompt)  # greedy through the sampler, which tracks the outputs itself
    for token in outputs:
        sampler.history[0].append(token)
    assert sampler(logits).token == int(np.argmax(want))


def test_min_p_keeps_tokens_within_its_share_of_the_likeliest():
    logits = np.log(np.array([0.5, 0.3, 0.1, 0.06, 0.04]))[None]
    probs = sampling_distribution(logits, [[]], SamplingParams(temperature=1.0, min_p=0.15))[0]
    assert list(probs > 0) == [True, True, True, False, False]  # 0.075 is the cut: 0.1 stays, 0.06 goes
    np.testing.assert_allclose(probs[:3], np.array([0.5, 0.3, 0.1]) / 0.9)


def test_the_sampler_draws_what_the_distribution_draws_with_every_adjustment():
    """As tests/test_runtime.py holds the plain filters: the candidate-only draw picks exactly rng.choice's token
    from the whole-vocabulary distribution, now with penalties, logit_bias, min_p and a grammar's mask."""
    rng = np.random.default_rng(7)
    for trial in range(120):
        vocab = int(rng.integers(8, 2000))
        logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 6)).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)
        bias = {int(t): float(rng.uniform(-100, 100)) for t in rng.integers(0, vocab, 3)}
        params = SamplingParams(temperature=float(rng.uniform(0.3, 1.8)), top_k=int(rng.choice([0, 3, 50])),
                                top_p=float(rng.choice([1.0, 0.8])), min_p=float(rng.choice([0.0, 0.05, 0.3])),
                                frequency_penalty=float(rng.uniform(-2, 2)), presence_penalty=float(rng.uniform(-2, 2)),
                                repetition_penalty=float(rng.choice([1.0, 1.2])), logit_bias=bias, seed=trial)
        allowed = rng.random(vocab) < 0.7 if trial % 2 else None
        if allowed is not None:
            allowed[int(rng.integers(vocab))] = True
        prompt = [int(t) for t in rng.integers(0, vocab, 10)]
        sampler, expected = Sampler(params, prompt), np.random.default_rng(trial)
        outputs: list[int] = []
        for _ in range(4):
            token = sampler(logits, allowed).token
            p = sampling_distribution(logits[None], [prompt + outputs], params, [outputs],
                                      None if allowed is None else allowed[None])[0]
            assert token == int(expected.choice(vocab, p=p))
            assert allowed is None or allowed[token]
            outputs.append(token)


def test_bad_sampling_options_are_refused_by_name():
    for options, match in ((dict(frequency_penalty=3), "frequency_penalty"), (dict(presence_penalty=float("nan")),
                           "presence_penalty"), (dict(min_p=1.5), "min_p"), (dict(logit_bias={1: 101}), "logit_bias"),
                           (dict(logit_bias={"x": 1}), "logit_bias"), (dict(response_format={"type": "xml"}),
                           "response_format type")):
        with pytest.raises(UsageError, match=match):
            SamplingParams(**options)


# ------------------------------------------------------------------------------------------------- on models

@pytest.fixture(scope="module", params=["gpt_neox", "gpt_neo"])
def model(request, tmp_path_factory):
    """A random-weight model of each family with its real tokenizer (GPT-NeoX-20B's, GPT-2's)."""
    from neodeploy.export import export
    from neodeploy.reference import make_checkpoint
    from neodeploy.runtime import load

    family = request.param
    root = tmp_path_factory.mktemp(f"structured-{family}")
    tok = root / "tok"
    shutil.copytree(tokenizer_dir("gpt-neox-20b" if family == "gpt_neox" else "gpt2"), tok)
    spec = (tiny_neox(vocab_size=50304, max_positions=512) if family == "gpt_neox"
            else tiny_neo(vocab_size=50257, max_positions=512))
    ckpt = make_checkpoint(spec, root / "ckpt", seed=4, init_std=0.1, tokenizer_dir=tok)
    art = export(ckpt, root / "art", target="cpu" if family == "gpt_neox" else "portable", echo=lambda s: None)
    return load(art)


SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "active"],
               "properties": {"user": {"type": "object", "additionalProperties": False, "required": ["id", "name"],
                                       "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 999},
                                                      "name": {"type": "string", "maxLength": 8}}},
                              "active": {"type": "boolean"}}},
    "array": {"type": "object", "additionalProperties": False, "required": ["tags"],
              "properties": {"tags": {"type": "array", "minItems": 2, "maxItems": 4,
                                      "items": {"type": "string", "maxLength": 5}}}},
    "enum": {"type": "object", "additionalProperties": False, "required": ["color", "size"],
             "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"type": "integer", "minimum": -5,
                                                                                  "maximum": 40}}},
    "optional": {"type": "object", "additionalProperties": False, "required": ["a"],
                 "properties": {"a": {"type": "string", "maxLength": 4}, "b": {"type": "boolean"},
                                "c": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 9}}}},
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fifty_seeded_samples_each_validate_against_the_schema(model, name):
    from neodeploy.runtime.engine import Engine, EngineConfig

    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    engine = Engine(model, EngineConfig(max_running=8, max_waiting=64))
    try:
        handles = [engine.submit("Data:", SamplingParams(max_new_tokens=200, temperature=1.0, seed=seed,
                                                          response_format=fmt)) for seed in range(50)]
        results = [h.result(120) for h in handles]
    finally:
        engine.close()
    for r in results:
        assert r.finish_reason in ("eos", "stop"), (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), schema)
    assert len({r.text for r in results}) > 10  # sampled, not one answer fifty times


@pytest.mark.slow
def test_regex_outputs_fullmatch_and_a_bad_grammar_says_why(model):
    for pattern in (r"[0-9]{3}-[a-z]{2,4}", r"(yes|no|maybe)!?", r"[0-9]{1,5}(\.[0-9]{1,2})? (EUR|USD)"):
        for seed in range(10):
            r = model.generate("Answer:", max_new_tokens=30, temperature=1.0, seed=seed,
                               response_format={"type": "regex", "regex": pattern})[0]
            assert re.fullmatch(pattern, r.text), (pattern, r.text, r.finish_reason)
    with pytest.raises(UsageError, match="grammar does not compile"):
        model.generate("x", max_new_tokens=2, response_format={"type": "grammar", "grammar": "start: foo("})
    lark = 'start: "Answer: " ANSWER "."\nANSWER: "yes" | "no"\n'
    r = model.generate("Q", max_new_tokens=20, temperature=1.0, seed=1, response_format={"type": "grammar", "grammar": lark})[0]
    assert r.text in ("Answer: yes.", "Answer: no.") and r.finish_reason == "stop"


@pytest.mark.slow
def test_greedy_with_a_bias_of_100_yields_only_that_token(model):
    r = model.generate("Hello", max_new_tokens=6, logit_bias={1000: 100})[0]
    assert r.output_ids == [1000] * 6


@pytest.mark.slow
def test_constrained_and_free_requests_in_one_batch_each_get_what_they_get_alone(model):
    from neodeploy.runtime.engine import Engine, EngineConfig

    fmt = {"type": "json_schema", "json_schema": {"name": "e", "schema": SCHEMAS["enum"]}}
    jobs = [SamplingParams(max_new_tokens=24, temperature=t, seed=s, response_format=f, frequency_penalty=fp)
            for t, s, f, fp in ((0, None, fmt, 0), (0.9, 3, None, 0.5), (1.0, 4, fmt, 0), (0, None, None, 1.5),
                                (0.7, 5, {"type": "regex", "regex": "[a-z]{3,9}"}, 0), (1.2, 6, None, 0))]
    prompts = ["Give JSON:", "Once upon", "Data", "The", "word:", "import"]
    engine = Engine(model, EngineConfig(max_running=4))
    try:
        handles = [engine.submit(p, params) for p, params in zip(prompts, jobs)]
        together = [h.result(120) for h in handles]
    finally:
        engine.close()
    for prompt, params, got in zip(prompts, jobs, together):
        alone = model.generate(prompt, params)[0]
        assert got.output_ids == alone.output_ids and got.finish_reason == alone.finish_reason


def test_tool_calls_are_read_only_where_the_grammar_constrained_them():
    """auto: only an answer that begins with the marker is a call (a leading space makes the rest free text), and
    only a call to an offered tool; pydantic's $defs in a tool's parameters compile; a malformed tool_choice is a
    400 naming it."""
    from neodeploy.serve.protocol import BadRequest
    from neodeploy.serve.tools import parse_tools

    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "required": ["a"], "properties": {"a": {"$ref": "#/$defs/A"}},
        "$defs": {"A": {"type": "object", "properties": {"x": {"type": "integer"}}}}}}}
    auto = parse_tools([tool], "auto")
    call = '<tool_call>{"name":"f","arguments":{"a":{"x":1}}}</tool_call>'
    assert auto.read(call)["function"] == {"name": "f", "arguments": '{"a": {"x": 1}}'}
    assert auto.read(" " + call) is None and auto.read(call.replace('"f"', '"g"')) is None
    assert auto.may_be_call("<tool") and not auto.may_be_call(" <tool_call>")
    from neodeploy.runtime.grammar import Grammars
    from neodeploy.core.tokenizer import Tokenizer

    grammars = Grammars(Tokenizer.from_dir(tokenizer_dir("gpt-neox-20b")), 50304, 0)
    for choice in ("auto", "required", {"type": "function", "function": {"name": "f"}}):
        grammars.matcher(parse_tools([tool], choice).grammar)  # compiles: the $ref points at the hoisted $defs
    for bad in ({"type": "function", "function": "f"}, {"type": "function", "function": ["f"]}, "sometimes"):
        with pytest.raises(BadRequest) as refused:
            parse_tools([tool], bad)
        assert refused.value.param == "tool_choice"
