"""`neodeploy bench`: the report's schema, the alternation over systems, skipping what is not installed.
No timing assertions: speed claims come from bench runs, not tests."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import tiny_neox
from neodeploy import bench as bench_module
from neodeploy.errors import UsageError


@pytest.fixture(scope="module")
def pair(exported):
    return exported("bench-neox", tiny_neox())


def test_bench_report_schema_and_skips(pair, monkeypatch, tmp_path):
    ckpt, art = pair

    def not_installed(*args, **kwargs):
        raise ImportError("No module named 'optimum' (simulated)")

    monkeypatch.setattr(bench_module, "OptimumRunner", not_installed)
    report = bench_module.bench(art, compare=["reference", "transformers", "optimum"], batches=[1, 2], prompt=8,
                                new_tokens=4, repeat=2, echo=lambda s: None)
    assert report["checkpoint"] == str(ckpt)
    assert report["skipped"] == [{"system": "optimum", "reason": "No module named 'optimum' (simulated)"}]
    systems = [(r["system"], r["batch"]) for r in report["results"]]
    assert sorted(systems) == sorted((s, b) for s in ("neodeploy", "reference", "transformers") for b in (1, 2))
    for r in report["results"]:
        for key in ("prefill_ms", "decode_ms_per_token"):
            assert 0 < r[key]["min"] <= r[key]["median"] <= r[key]["max"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1000 / r["decode_ms_per_token"]["median"])
        assert r["decode_x_floor"] > 0
    assert set(report["ratios_vs_peers"]) == {"reference", "transformers"}
    assert set(report["ratios_vs_peers"]["reference"]) == {"1", "2"}
    assert report["machine"]["copy_bandwidth_gbs"] > 0.1
    from neodeploy.reference import ModelSpec

    # Every fp32 parameter but the input embedding (a Gather reads one row per token), from the spec alone.
    spec = ModelSpec.from_dict(json.loads((art / "neodeploy.json").read_text())["spec"])
    expected = (spec.num_parameters() - spec.vocab_size * spec.hidden_size) * 4
    assert report["weights"]["bytes_per_token"] == pytest.approx(expected, rel=0.01)
    bench_module.plot(report, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = bench_module.table(report)
    assert "neodeploy vs reference, batch 2" in text and "skipped optimum" in text


def test_bench_cli_writes_json_and_refuses_bad_arguments(pair, tmp_path):
    _, art = pair
    proc = subprocess.run([sys.executable, "-m", "neodeploy", "bench", str(art), "--compare", "reference",
                           "--prompt", "8", "--new-tokens", "3", "--repeat", "1", "--json", str(tmp_path / "b.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "b.json").read_text())["config"] == {"batches": [1], "prompt": 8, "new_tokens": 3,
                                                                       "repeat": 1}
    for kwargs, message in ((dict(compare=["vllm"]), "unknown system 'vllm'"),
                            (dict(prompt=200), "exceeds the artifact's context"),
                            (dict(new_tokens=1), "--new-tokens >= 2")):
        with pytest.raises(UsageError, match=message):
            bench_module.bench(art, echo=lambda s: None, **kwargs)
