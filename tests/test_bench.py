"""`neodeploy bench`: the report's schema, the alternation over systems, skipping what is not installed.
No timing assertions: speed claims come from bench runs, not tests."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import cli, tiny_neox
from neodeploy import speed as bench_module
from neodeploy.core.errors import UsageError


@pytest.fixture(scope="module")
def pair(exported):
    return exported("bench-neox", tiny_neox())


def test_bench_report_schema_and_skips(pair, monkeypatch, tmp_path):
    ckpt, art = pair

    def not_installed(*args, **kwargs):
        raise ImportError("No module named 'optimum' (simulated)")

    monkeypatch.setattr(bench_module, "OptimumRunner", not_installed)
    # Measured before, once per repeat of each batch and after: the roof takes the median (one fast or slow moment
    # must not move it).
    measured = iter([10.0, 50.0, 20.0, 20.0, 30.0, 90.0])
    monkeypatch.setattr(bench_module, "read_bandwidth_gbs", lambda: next(measured))
    report = bench_module.bench(art, compare=["reference", "transformers", "optimum"], batches=[1, 2], prompt=8,
                                new_tokens=4, repeat=2, echo=lambda s: None)
    assert report.machine.read_bandwidth_samples_gbs == [10.0, 50.0, 20.0, 20.0, 30.0, 90.0]
    assert report.machine.read_bandwidth_gbs == 25.0
    assert report.weights.roof_ms_per_token == pytest.approx(report.weights.bytes_per_token / 25e9 * 1e3)
    assert report.checkpoint == str(ckpt)
    assert report.skipped == [bench_module.Skipped("optimum", "No module named 'optimum' (simulated)")]
    systems = [(r.system, r.batch) for r in report.results]
    assert sorted(systems) == sorted((s, b) for s in ("neodeploy", "reference", "transformers") for b in (1, 2))
    for r in report.results:
        for spread in (r.prefill_ms, r.decode_ms_per_token):
            assert 0 < spread.min <= spread.median <= spread.max
        assert r.tokens_per_s == pytest.approx(r.batch * 1000 / r.decode_ms_per_token.median)
        assert r.decode_x_roof > 0 and r.roof_ms_per_token > 0
    assert set(report.ratios_vs_peers) == {"reference", "transformers"}
    assert set(report.ratios_vs_peers["reference"]) == {"1", "2"}
    assert report.machine.read_bandwidth_gbs > 0.1
    from neodeploy.reference import ModelSpec

    # Every fp32 parameter but the input embedding (a Gather reads one row per token), from the spec alone.
    spec = ModelSpec.from_dict(json.loads((art / "neodeploy.json").read_text())["spec"])
    expected = (spec.num_parameters() - spec.vocab_size * spec.hidden_size) * 4
    assert report.weights.bytes_per_token == pytest.approx(expected, rel=0.01)
    peers = {r.system: r.weight_bytes_per_token for r in report.results if r.batch == 1}
    assert peers["reference"] == peers["transformers"] == bench_module.checkpoint_bytes_per_token(spec) == expected
    bench_module.plot(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = bench_module.speed_table(report)
    bench_module.write_json(tmp_path / "report.json", report)  # the typed report keeps the JSON's shape
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["machine"]["read_bandwidth_gbs"] == 25.0 and written["skipped"][0]["system"] == "optimum"
    assert written["results"][0]["decode_ms_per_token"]["median"] == report.results[0].decode_ms_per_token.median
    assert written["ratios_vs_peers"]["reference"]["1"]["decode_speedup"] > 0
    assert "neodeploy vs reference, batch 2" in text and "skipped optimum" in text


def test_bench_cli_writes_json_and_refuses_bad_arguments(pair, tmp_path):
    _, art = pair
    proc = cli("bench", art, "--compare", "reference", "--prompt", 8, "--new-tokens", 3, "--repeat", 1,
               "--json", tmp_path / "b.json", timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b.json").read_text())["config"] == {"batches": [1], "prompt": 8, "new_tokens": 3,
                                                                       "repeat": 1, "threads": bench_module.cores()}
    for kwargs, message in ((dict(compare=["vllm"]), "unknown system 'vllm'"),
                            (dict(prompt=200), "exceeds the artifact's context"),
                            (dict(new_tokens=1), "--new-tokens >= 2"),
                            (dict(threads=0), "--threads must be at least 1")):
        with pytest.raises(UsageError, match=message):
            bench_module.bench(art, echo=lambda s: None, **kwargs)


def test_llama_cpp_peer_runs_batch_one_in_the_alternation_and_skips_cleanly(pair, tmp_path, monkeypatch):
    """llama.cpp's side is llama-cpp-python's high-level API (reset / eval / scores / n_tokens); a stand-in with
    that API and the reference's logits checks the runner, the batch-1 limit and the per-row roof without the
    20-minute build. Without the package, the row is skipped with the reason."""
    import types

    import numpy as np

    ckpt, art = pair
    with pytest.raises(UsageError, match="--gguf"):
        bench_module.bench(art, compare=["llama.cpp"], prompt=8, new_tokens=3, repeat=1, echo=lambda s: None)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    report = bench_module.bench(art, compare=["llama.cpp"], gguf=gguf, prompt=8, new_tokens=3, repeat=1,
                                echo=lambda s: None)
    assert report.skipped[0].system == "llama.cpp" and "llama-cpp-python is not installed" in report.skipped[0].reason

    from neodeploy.reference import load_checkpoint

    reference = load_checkpoint(ckpt)
    calls = []

    class Llama:
        def __init__(self, model_path, n_ctx, n_batch, n_threads, n_threads_batch, logits_all, verbose):
            calls.append(("init", n_ctx, n_threads))
            self.n_tokens, self.ids = 0, []
            self.scores = np.zeros((n_batch, reference.spec.vocab_size), np.float32)

        def reset(self):
            self.n_tokens, self.ids = 0, []

        def eval(self, tokens):
            import torch

            assert all(isinstance(t, int) for t in tokens)
            self.ids += tokens
            with torch.inference_mode():
                logits = reference(torch.tensor([self.ids]))[0][0, -1].numpy()
            self.n_tokens = len(self.ids)
            self.scores[self.n_tokens - 1] = logits

    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=Llama))
    monkeypatch.setattr(bench_module, "gguf_bytes_per_token", lambda path: 123_000_000)
    report = bench_module.bench(art, compare=["llama.cpp"], gguf=gguf, batches=[1, 2], prompt=8, new_tokens=3,
                                repeat=1, threads=2, echo=lambda s: None)
    assert calls[0] == ("init", 11, 2)  # context prompt + new tokens, the same thread count as ours
    rows = {(r.system, r.batch): r for r in report.results}
    assert set(rows) == {("neodeploy", 1), ("neodeploy", 2), ("llama.cpp", 1)}
    assert bench_module.Skipped("llama.cpp", "batch 2: runs batch 1 only") in report.skipped
    assert rows[("llama.cpp", 1)].weight_bytes_per_token == 123_000_000
    roof = 123_000_000 / (report.machine.read_bandwidth_gbs * 1e9) * 1e3
    assert rows[("llama.cpp", 1)].roof_ms_per_token == pytest.approx(roof)
    assert "llama.cpp" in report.ratios_vs_peers and "1" in report.ratios_vs_peers["llama.cpp"]
    bench_module.plot(report, tmp_path / "three.png")  # llama.cpp has no batch-2 bar
    assert (tmp_path / "three.png").read_bytes()[:4] == b"\x89PNG"
    # Its greedy tokens are the reference's (the stand-in computes them): the runner reads the last row.
    runner = bench_module.LlamaCppRunner(gguf, 11, 2)
    ids = np.array([[5, 17, 33, 2, 9, 11, 4, 8]])
    runner.prefill(ids)
    first = runner.token
    runner.step()
    from neodeploy.reference.generate import greedy_generate

    assert [first, runner.token] == greedy_generate(reference, ids[0].tolist(), 2).output_ids


def test_optimum_int8_peer_runs_optimums_own_quantised_export(pair):
    """`--compare optimum-int8`: Optimum's export quantised by Optimum's ORTQuantizer (dynamic int8 per channel),
    with its weight bytes read from that graph."""
    pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx is not installed")
    _, art = pair
    report = bench_module.bench(art, compare=["optimum-int8"], batches=[1], prompt=8, new_tokens=3, repeat=1,
                                echo=lambda s: None)
    rows = {r.system: r for r in report.results}
    assert set(rows) == {"neodeploy", "optimum-int8"} and not report.skipped
    fp32 = rows["neodeploy"].weight_bytes_per_token  # this artifact is fp32: int8 weights are ~1/4 of it
    assert rows["optimum-int8"].weight_bytes_per_token < 0.5 * fp32
    assert rows["optimum-int8"].decode_ms_per_token.median > 0
    assert "optimum-int8" in report.ratios_vs_peers
