"""neodeploy.runtime: torch-free generation, batching, sampling, streaming, check, bad input, threads."""

from __future__ import annotations

import functools

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import ROOT, cli, tiny_neo, tiny_neox
from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.runtime import load
from neodeploy.runtime.model import Model, SamplingParams, sampling_distribution
from neodeploy.core.tokenizer import Tokenizer

PROMPTS = [[5, 17, 33, 2, 250, 9, 100, 64, 3, 7, 11], [42, 8], [300, 1, 2, 3, 4, 5]]


@pytest.fixture(scope="module", params=["gpt_neo", "gpt_neox"])
def pair(request, exported):
    spec = tiny_neo() if request.param == "gpt_neo" else tiny_neox()
    return exported(f"rt-{request.param}", spec)


def test_batched_greedy_equals_reference_and_each_prompt_alone(pair):
    from neodeploy.reference import load_checkpoint
    from neodeploy.reference.generate import greedy_generate

    ckpt, art = pair
    model = load(art)
    reference = load_checkpoint(ckpt)
    batch = model.generate(PROMPTS, max_new_tokens=12)
    for prompt, result in zip(PROMPTS, batch):
        alone = model.generate(prompt, max_new_tokens=12)[0]
        want = greedy_generate(reference, prompt, 12, eos_token_id=model.eos_token_id).output_ids
        assert result.output_ids == alone.output_ids == [t for t in want if t != model.eos_token_id]
        assert result.prompt_ids == prompt and result.finish_reason in ("length", "eos")


def test_generation_runs_without_torch(pair):
    _, art = pair
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise ImportError('torch is forbidden in the serving process')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import sys\n"
        "from neodeploy.runtime import load\n"
        f"m = load({str(art)!r})\n"
        "out = m.generate(['Hello world', 'Hi'], max_new_tokens=5)\n"
        "print(len(out), len(out[0].output_ids), 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "5", "False"]


def test_sampling_is_seeded_and_filters_like_transformers(pair):
    import torch
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    _, art = pair
    model = load(art)
    opts = dict(max_new_tokens=10, temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.3)
    first = model.generate(PROMPTS, seed=7, **opts)
    assert [g.output_ids for g in first] == [g.output_ids for g in model.generate(PROMPTS, seed=7, **opts)]
    assert [g.output_ids for g in first] != [g.output_ids for g in model.generate(PROMPTS, seed=8, **opts)]
    assert model.generate(PROMPTS, top_k=1, temperature=1.5, seed=3)[0].output_ids == \
        model.generate(PROMPTS, max_new_tokens=32)[0].output_ids
    # The filtered distribution against transformers' own processors on the same logits.
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 320)) * 3
    history = [[1, 2, 3, 3], [10, 200]]
    params = SamplingParams(temperature=0.7, top_k=50, top_p=0.8, repetition_penalty=1.2)
    ours = sampling_distribution(logits, history, params)
    scores = torch.tensor(logits)
    ids = torch.tensor([[1, 2, 3, 3], [10, 200, 200, 200]])
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(50),
                 TopPLogitsWarper(0.8)):
        scores = proc(ids, scores)
    theirs = torch.softmax(scores, -1).numpy()
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-9)


def test_sampler_draws_what_the_whole_vocabulary_distribution_draws():
    """The sampler filters and draws over candidates only (runtime/sampling.py); it must pick exactly the token
    rng.choice picks from sampling_distribution with the same seed, ties at the top-k / top-p edge included, and
    report the same top log-probabilities as a full stable sort."""
    from neodeploy.runtime.sampling import Sampler

    rng = np.random.default_rng(0)
    draws = 0
    for trial in range(240):
        vocab = int(rng.integers(2, 3000))
        logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 8)).astype(np.float32)
        if trial % 3 == 0:
            logits = np.round(logits)  # many ties, at every edge
        params = SamplingParams(temperature=float(rng.uniform(0.2, 2)), top_k=int(rng.choice([0, 1, 5, 50, 5000])),
                                top_p=float(rng.choice([1.0, 0.5, 0.9, 0.999])), seed=trial, logprobs=3,
                                repetition_penalty=float(rng.choice([1.0, 1.3])))
        history = [int(t) for t in rng.integers(0, vocab, 20)]
        sampler, expected_rng, seen = Sampler(params, history), np.random.default_rng(trial), [list(history)]
        for _ in range(4):
            sample = sampler(logits)
            want = int(expected_rng.choice(vocab, p=sampling_distribution(logits[None], seen, params)[0]))
            seen[0].append(want)
            assert sample.token == want
            shifted = logits.astype(np.float64) - logits.max()
            logp = shifted - np.log(np.exp(shifted).sum())
            assert [i for i, _ in sample.top] == [int(i) for i in np.argsort(-logp, kind="stable")[:3]]
            draws += 1
    assert draws == 960
    greedy = Sampler(SamplingParams(), [])
    tied = np.array([1.0, 3.0, 3.0, -2.0], np.float32)
    assert greedy(tied).token == 1  # the first of equal maxima, as argmax


def test_sampler_at_a_denormal_temperature_and_on_non_finite_logits():
    """A temperature the API allows (0 < T <= 2) but near the float minimum is greedy, not NaN; a NaN or inf in
    the logits is a typed error naming the fix, never a silent token 0; a masked (-inf) token never reaches the
    reported log-probabilities (JSON has no -inf)."""
    from neodeploy.core.errors import ModelOutputError
    from neodeploy.runtime.sampling import Sampler

    logits = np.array([1.0, 2.0, 3.0, 0.5], np.float32)
    for params in (SamplingParams(temperature=1e-310, seed=1), SamplingParams(temperature=1e-310, top_p=0.5, seed=2),
                   SamplingParams(temperature=1e-300, top_k=2, seed=3)):
        assert [Sampler(params, [])(logits).token for _ in range(3)] == [2, 2, 2]
        np.testing.assert_array_equal(sampling_distribution(logits[None], [[]], params)[0], [0, 0, 1, 0])
    for bad in ([1.0, np.nan, 3.0], [1.0, np.inf, 3.0], [-np.inf, -np.inf, -np.inf], [np.nan] * 3):
        row = np.array(bad, np.float32)
        for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0), SamplingParams(temperature=0.7, top_p=0.9),
                       SamplingParams(temperature=0.7, top_k=2, logprobs=2)):
            with pytest.raises(ModelOutputError, match="not finite.*neodeploy check"):
                Sampler(params, [])(row)
    masked = np.array([-np.inf, 2.0, 1.0, -np.inf], np.float32)
    sample = Sampler(SamplingParams(logprobs=4), [])(masked)
    assert sample.token == 1 and [i for i, _ in sample.top] == [1, 2] and all(np.isfinite(v) for _, v in sample.top)


def test_stop_ids_and_finish_reasons(pair):
    _, art = pair
    model = load(art)
    free = model.generate(PROMPTS[0], max_new_tokens=8)[0]
    assert free.finish_reason == "length" and len(free.output_ids) == 8
    stop_at = free.output_ids[3]
    stopped = model.generate(PROMPTS[0], max_new_tokens=8, stop=[stop_at])[0]
    assert stopped.output_ids == free.output_ids[: free.output_ids.index(stop_at)]
    assert stopped.finish_reason == "stop"


class ScriptedBackend:
    """Emits a fixed token script (one-hot logits): streaming and stop strings tested on exact text."""

    name = "scripted"
    max_batch = max_prompt = max_context = None
    exclusive = joinable = in_place = aligned = False
    lock = kernel_rotary = None

    def __init__(self, script, vocab):
        self.script, self.vocab = script, vocab

    def _logits(self, batch, step):
        logits = np.zeros((batch, self.vocab), np.float32)
        logits[:, self.script[min(step, len(self.script) - 1)]] = 10.0
        return logits

    def prefill(self, ids, mask, pos, capacity=None):
        return self._logits(len(ids), 0), 1

    def decode(self, ids, mask, pos, step):
        return self._logits(len(ids), step), step + 1


def _scripted_model(tmp_path, text):
    from neodeploy.core.tokenizer import builtin_byte_tokenizer

    tk = builtin_byte_tokenizer(0, 257)
    tk.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(tmp_path)
    script = tokenizer.encode(text) + [0]  # then eos
    from neodeploy.core.spec import PRESETS
    from neodeploy.core.manifest import FORMAT, FORMAT_VERSION, Manifest

    spec = PRESETS["pythia-14m"].replace(vocab_size=257, eos_token_id=0, bos_token_id=0)
    manifest = Manifest.from_dict({"format": FORMAT, "format_version": FORMAT_VERSION, "spec": spec.to_dict(),
                                   "dtype": "fp32", "max_context": 512, "files": {},
                                   "onnx": {"file": "model.onnx", "external_data": "model.onnx.data"}}, tmp_path)
    return Model(tmp_path, manifest, ScriptedBackend(script, 257), tokenizer), script


def test_streaming_never_splits_a_utf8_character(tmp_path):
    text = "naïve café — 東京 🚀 done"
    model, script = _scripted_model(tmp_path, text)
    assert len(script) - 1 > len(text)  # multi-byte characters really span several tokens
    pieces = list(model.stream([5], max_new_tokens=100))
    assert "".join(pieces) == text == model.generate([5], max_new_tokens=100)[0].text
    assert all("\ufffd" not in p for p in pieces) and len(pieces) > 10
    result = model.generate([5], max_new_tokens=100)[0]
    assert result.finish_reason == "eos" and 0 not in result.output_ids


def test_stop_strings_cut_text_and_stream(tmp_path):
    model, _ = _scripted_model(tmp_path, "alpha beta STOP gamma")
    result = model.generate([5], max_new_tokens=100, stop=["STOP"])[0]
    assert result.text == "alpha beta " and result.finish_reason == "stop"
    assert "".join(model.stream([5], max_new_tokens=100, stop=["STOP"])) == "alpha beta "
    # A partial match ("ST" of "STAR") must not leak before it is known not to be a stop.
    model, _ = _scripted_model(tmp_path, "one ST two STAR three")
    assert "".join(model.stream([5], max_new_tokens=100, stop=["STAR"])) == "one ST two "


def test_bad_input_is_refused_and_the_model_stays_usable(pair):
    _, art = pair
    model = load(art)
    before = model.generate(PROMPTS[1], max_new_tokens=4)[0].output_ids
    for kwargs, message in (
        (dict(prompts=""), "empty"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[1, 999]]), "token id 999 is outside the vocabulary"),
        (dict(prompts=[1, 2], top_p=0.0), "top_p must be in"),
        (dict(prompts=[1, 2], top_p=1.5), "top_p must be in"),
        (dict(prompts=[1, 2], temperature=-1.0), "temperature must be >= 0"),
        (dict(prompts=[1, 2], max_new_tokens=0), "max_new_tokens"),
        (dict(prompts=[1] * 100, max_new_tokens=100), "exceeds the artifact's context of 128"),
    ):
        with pytest.raises(UsageError, match=message):
            model.generate(**kwargs)
    assert model.generate(PROMPTS[1], max_new_tokens=4)[0].output_ids == before


def test_corrupt_missing_or_foreign_artifacts_are_refused(pair, tmp_path):
    _, art = pair
    copy = tmp_path / "copy"
    shutil.copytree(art, copy)
    data = bytearray((copy / "model.onnx.data").read_bytes())
    data[1000] ^= 0xFF
    (copy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its sha256"):
        load(copy)
    (copy / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        load(copy)
    manifest = json.loads((art / "neodeploy.json").read_text())
    (copy / "neodeploy.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format version 99"):
        load(copy)
    with pytest.raises(ArtifactError, match="does not exist"):
        load(tmp_path / "nothing")


def test_one_model_serves_four_threads(pair):
    _, art = pair
    model = load(art)
    jobs = [dict(prompts=PROMPTS, max_new_tokens=10), dict(prompts=PROMPTS[0], max_new_tokens=10, temperature=0.8, seed=1),
            dict(prompts=PROMPTS[1:], max_new_tokens=6, top_p=0.5, temperature=1.0, seed=2),
            dict(prompts=PROMPTS[2], max_new_tokens=10)]
    serial = [[g.output_ids for g in model.generate(**job)] for job in jobs]
    results: dict[int, list] = {}

    def work(i):
        for _ in range(3):
            results.setdefault(i, []).append([g.output_ids for g in model.generate(**jobs[i])])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert results[i] == [serial[i]] * 3


def _perturb_weight(art, dest):
    """Corrupt one weight the way a bad build would (and re-hash it, so only the numbers can tell)."""
    from neodeploy.core.manifest import file_hashes

    shutil.copytree(art, dest)
    data = np.fromfile(dest / "model.onnx.data", dtype=np.float32)
    data[: data.size // 8] *= 1.5
    data.tofile(dest / "model.onnx.data")
    manifest = json.loads((dest / "neodeploy.json").read_text())
    manifest["files"] = file_hashes(dest)
    (dest / "neodeploy.json").write_text(json.dumps(manifest))


def test_check_passes_then_catches_a_perturbed_weight(pair, tmp_path):
    from neodeploy.runtime.check import run_check

    _, art = pair
    assert all(r.passed for r in run_check(load(art)))
    _perturb_weight(art, tmp_path / "bad")
    results = run_check(load(tmp_path / "bad"))
    assert not all(r.passed for r in results)
    assert any("max |Δlogit|" in f for r in results for f in r.failures)


_cli = functools.partial(cli, timeout=120)


def test_cli_generate_check_and_reports(pair, tmp_path):
    ckpt, art = pair
    proc = _cli("generate", art, "Hello world", "Hi", "--json", "--max-new-tokens", 5)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello world", "Hi"]
    assert set(rows[0]) == {"prompt", "prompt_ids", "output_ids", "text", "finish_reason"}
    model = load(art)
    assert rows[1]["output_ids"] == model.generate("Hi", max_new_tokens=5)[0].output_ids
    piped = _cli("generate", art, "-", "--json", "--max-new-tokens", 5, stdin="Hello world\nHi\n")
    assert [json.loads(line) for line in piped.stdout.splitlines()] == rows
    ok = _cli("check", art, "--report", tmp_path / "r.json", "--junit", tmp_path / "r.xml")
    assert ok.returncode == 0 and "check passed" in ok.stdout
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is True
    assert 'failures="0"' in (tmp_path / "r.xml").read_text()
    _perturb_weight(art, tmp_path / "bad")
    bad = _cli("check", tmp_path / "bad", "--junit", tmp_path / "bad.xml")
    assert bad.returncode == 1 and "check FAILED" in bad.stdout
    assert "<failure" in (tmp_path / "bad.xml").read_text()
    for args, message in (
        (("generate", art, "x", "--top-p", "0"), "top_p must be in"),
        (("generate", art, "x", "--temperature", "-1"), "temperature must be >= 0"),
        (("generate", tmp_path / "none", "x"), "does not exist"),
        (("check", ckpt), "no neodeploy.json"),
    ):
        proc = _cli(*args)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_special_token_stop_strings_and_numpy_inputs(tmp_path):
    model, script = _scripted_model(tmp_path, "alpha beta gamma")
    eot = model.tokenizer.token_to_id("<|endoftext|>")
    model.backend.script = model.tokenizer.encode("Sure.") + [eot] + model.tokenizer.encode(" more")
    model.eos_token_id = None  # so only the stop string can end it
    result = model.generate(np.array([5]), max_new_tokens=30, stop=["<|endoftext|>"])[0]
    assert result.text == "Sure." and result.finish_reason == "stop"
    assert model.generate([5], max_new_tokens=30, stop=np.int64(eot))[0].text == "Sure."
    # Two stop strings: a tail that can only start one of them is held back only for that one.
    model, _ = _scripted_model(tmp_path, "xa tail")
    assert "".join(model.stream([5], max_new_tokens=30, stop=["ab", "xz"])) == "xa tail"


def test_portable_last_position_logits_generate_check_and_validate_like_all_positions(pair, exported):
    """--logits last (what a TensorRT prefill wants) changes what the graph returns, not what generation sees."""
    import onnx

    from neodeploy.runtime.check import run_check
    from neodeploy.validate import validate

    ckpt, full = pair
    family = json.loads((full / "neodeploy.json").read_text())["spec"]["family"]
    _, last = exported(f"rt-{family}", tiny_neo() if family == "gpt_neo" else tiny_neox(), logits="last")
    manifest = json.loads((last / "neodeploy.json").read_text())
    assert manifest["onnx"]["target"] == "portable" and manifest["onnx"]["logits"] == "last"
    logits = onnx.load(str(last / "model.onnx"), load_external_data=False).graph.output[0]
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1
    ours, theirs = load(last), load(full)
    assert ([g.output_ids for g in ours.generate(PROMPTS, max_new_tokens=12)]
            == [g.output_ids for g in theirs.generate(PROMPTS, max_new_tokens=12)])
    assert all(r.passed for r in run_check(ours))
    proc = _cli("check", last)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = np.array([PROMPTS[0]], np.int64)
    with pytest.raises(UsageError, match="last-position logits only .* needs an export with --logits all"):
        ours.backend.score(ids, np.ones_like(ids), np.arange(ids.shape[1])[None])
    # validate needs every position only for perplexity, which it then gets one cached step per token.
    report, baseline = (validate(m, ckpt, steps=8, echo=lambda s: None) for m in (ours, theirs))
    assert report.passed, report.failures
    assert report.perplexity["ratio"] == pytest.approx(baseline.perplexity["ratio"], abs=1e-5)


def test_tie_rule_shared_by_export_check_and_the_gpu_test():
    from neodeploy.runtime.check import clear_preference

    # tolerance 3e-2 of a logit scale of 10: the reference must prefer its token by more than 0.3
    assert not clear_preference(5.0, 4.75, 3e-2, 10.0) and clear_preference(5.0, 4.65, 3e-2, 10.0)
    assert clear_preference(5.0, -np.inf, 3e-2, 10.0)  # a token outside the reference's top-k
    np.testing.assert_array_equal(clear_preference(np.array([1.0, 1.0]), np.array([0.9, 0.0]), 1e-3, 100.0),
                                  [False, True])


class _OwnedLock:
    def __init__(self):
        self._lock, self.owner = threading.Lock(), None

    def __enter__(self):
        self._lock.acquire()
        self.owner = threading.get_ident()

    def __exit__(self, *exc):
        self.owner = None
        self._lock.release()


class OneBufferBackend:
    """onnxruntime behind TensorRT's contract: exclusive, with one cache for every caller (as its device buffers
    are), so an unguarded caller decodes on whichever prefill ran last. Records steps taken without the lock."""

    name = "one-buffer"
    max_batch = max_prompt = max_context = None
    exclusive, joinable, in_place, aligned, kernel_rotary = True, False, False, False, None

    def __init__(self, inner):
        self.inner, self.lock, self.unlocked, self.cache = inner, _OwnedLock(), [], None

    def _enter(self, what):
        if self.lock.owner != threading.get_ident():
            self.unlocked.append(what)

    def prefill(self, ids, mask, pos, capacity=None):
        self._enter("prefill")
        logits, self.cache = self.inner.prefill(ids, mask, pos, capacity)
        return logits, None

    def decode(self, ids, mask, pos, state):
        self._enter("decode")
        logits, self.cache = self.inner.decode(ids, mask, pos, self.cache)
        return logits, None


def test_check_beside_a_generation_holds_an_exclusive_backends_lock(pair):
    from neodeploy.runtime.check import run_check

    _, art = pair
    model = load(art)
    want = [g.output_ids for g in model.generate(PROMPTS, max_new_tokens=10)]
    model.backend = shared = OneBufferBackend(model.backend)
    generated, checked, errors, done = [], [], [], threading.Event()

    def generate():  # for as long as the checks run, so the two overlap
        try:
            while not done.is_set() or not generated:
                generated.append([g.output_ids for g in model.generate(PROMPTS, max_new_tokens=10)])
        except Exception as exc:  # a step on another caller's cache can fail outright (shapes no longer fit)
            errors.append(exc)

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        for _ in range(3):
            checked.append(run_check(model))
    finally:
        done.set()
        thread.join()
    assert shared.unlocked == []  # fails every time without the lock; the overlap below only when the threads interleave
    assert not errors and generated and all(out == want for out in generated)
    assert all(r.passed for results in checked for r in results)


def test_check_skips_cases_outside_an_engine_profile(pair):
    from neodeploy.runtime.check import check_table, run_check

    _, art = pair
    model = load(art)
    model.backend.max_prompt = 50  # as a TensorRT engine built for short prompts would declare
    results = {r.case: r for r in run_check(model)}
    assert results["long"].skipped and "prompt" in results["long"].skipped
    assert results["short"].skipped is None and all(r.passed for r in results.values())
    assert "skipped: outside the engine's profile" in check_table(list(results.values()))


CHURN = """
import resource, sys
import numpy as np
from neodeploy.runtime.allocator import retain_freed_memory
tuned = retain_freed_memory() if sys.argv[1] == "tuned" else None
faults = []
for n in range(5):  # requests' own KV caches (pythia-160m, 1 row x ~530 tokens, each a little longer): made,
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt  # written and freed
    arrays = [np.zeros((1, 12, 529 + 8 * n, 64), np.float32) for _ in range(24)]
    for a in arrays:
        a.fill(1)
    del arrays
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, *faults)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_serve_keeps_freed_cache_memory_instead_of_faulting_it_in_for_every_request():
    """glibc hands each ~1.6 MB array back to the kernel when freed (and maps the next, a little larger, anew), so
    every request's cache faulted its ~9,500 pages in again; tuned as `serve` tunes it, later caches reuse the
    freed memory."""
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
        tuned, *counts = out.stdout.split()
        return tuned, [int(c) for c in counts]

    _, plain = faults("plain")
    tuned, after = faults("tuned")
    if tuned == "False":
        pytest.skip("this C library is not glibc: nothing to tune")
    assert min(plain[1:]) > 5000  # every round faults the whole cache in again
    assert max(after[1:]) < 1500  # reused: at most the few pages by which a cache outgrows the last
