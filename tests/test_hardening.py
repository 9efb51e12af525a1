"""Bad input as a hostile user gives it: typed errors from the API, one line and exit 2 from the CLI, and nothing
read from outside the artifact folder."""

from __future__ import annotations

import functools

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import alive, cli, cmdline, descendants, tiny_neox
from neodeploy.core.errors import ArtifactError, UsageError
from neodeploy.core.files import sha256
from neodeploy.runtime import load


@pytest.fixture
def artifact_copy(exported, tmp_path):
    _, art = exported("rt-gpt_neox", tiny_neox())
    copy = tmp_path / "art"
    shutil.copytree(art, copy)
    return copy


def _edit(art, change):
    manifest = json.loads((art / "neodeploy.json").read_text())
    change(manifest)
    (art / "neodeploy.json").write_text(json.dumps(manifest))


def test_every_file_the_runtime_reads_is_confined_to_the_artifact(artifact_copy, tmp_path):
    art = artifact_copy
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(art / "model.onnx", outside / "model.onnx")

    def absolute(m):  # an absolute graph path with a matching sha256 must not load a model from elsewhere
        m["onnx"]["file"] = str(outside / "model.onnx")
        m["files"][str(outside / "model.onnx")] = sha256(outside / "model.onnx")

    _edit(art, absolute)
    for verify in (True, False):
        with pytest.raises(ArtifactError, match="not a plain file name"):
            load(art, verify=verify)
    _edit(art, lambda m: m["onnx"].update(file="model.onnx"))
    _edit(art, lambda m: m["files"].update({"../../x": "0" * 64}))  # a listed escape is checked, not skipped
    with pytest.raises(ArtifactError, match="not a plain file name"):
        load(art)
    _edit(art, lambda m: m["files"].pop("../../x"))
    _edit(art, lambda m: m["files"].pop(str(outside / "model.onnx")))
    (art / "tokenizer.json").rename(outside / "tokenizer.json")
    os.symlink(outside / "tokenizer.json", art / "tokenizer.json")
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        load(art)


def test_a_corrupt_graph_is_an_artifact_error_even_unverified(artifact_copy):
    data = (artifact_copy / "model.onnx").read_bytes()
    (artifact_copy / "model.onnx").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="sha256"):
        load(artifact_copy)
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        load(artifact_copy, verify=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=[3.7]), "token ids must be integers"),
    (dict(prompts=[True, 2]), "token ids must be integers"),
    (dict(prompts="bad \ud800 text"), "lone surrogate"),
    (dict(prompts=[1, 2], stop=[10_000]), "stop id 10000 is outside"),
    (dict(prompts=[1, 2], stop=[""]), "empty stop string"),
    (dict(prompts=[1, 2], seed=-1), "seed"),
    (dict(prompts=[1, 2], seed="x"), "seed"),
    (dict(prompts=[1, 2], temperature=math.inf), "temperature"),
    (dict(prompts=[1, 2], repetition_penalty=math.nan), "repetition_penalty"),
    (dict(prompts=[1, 2], max_new_tokens=True), "max_new_tokens"),
    (dict(prompts=[1, 2], top_k=2.5), "top_k"),
    (dict(prompts=[1, 2], colour="blue"), "unknown generation option"),
])
def test_generation_inputs_are_refused_not_coerced(exported, kwargs, match):
    model = load(exported("rt-gpt_neox", tiny_neox())[1])
    with pytest.raises(UsageError, match=match):
        model.generate(**kwargs)
    assert model.generate(np.array([1, 2]), max_new_tokens=2)[0].output_ids  # still usable


_cli = functools.partial(cli, timeout=120)


def test_cli_noise_pipes_and_files_where_folders_belong(exported, tmp_path):
    _, art = exported("rt-gpt_neox", tiny_neox())
    # A reader that leaves early (`| head -1`): no BrokenPipeError traceback.
    proc = subprocess.Popen([sys.executable, "-m", "neodeploy", "inspect", str(art)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err
    a_file = tmp_path / "model.onnx"
    a_file.write_text("not a folder")
    result = _cli("generate", a_file, "hi")
    assert result.returncode == 2 and "is a file" in result.stderr and len(result.stderr.splitlines()) == 1


def test_output_paths_stdin_and_lint_are_checked_up_front(exported, tmp_path):
    _, art = exported("rt-gpt_neox", tiny_neox())
    missing = tmp_path / "no-such-folder" / "report.json"
    result = _cli("check", art, "--report", missing)
    assert result.returncode == 2 and "does not exist" in result.stderr and not missing.parent.exists()
    a_file = tmp_path / "file"
    a_file.write_text("x")
    result = _cli("demo", "--workdir", a_file)
    assert result.returncode == 2 and "is a file" in result.stderr and a_file.read_text() == "x"
    proc = subprocess.run([sys.executable, "-m", "neodeploy", "generate", str(art), "-"], input=b"caf\xe9\n",
                          capture_output=True, timeout=120)
    assert proc.returncode == 2 and b"not UTF-8" in proc.stderr and b"Traceback" not in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    broken = tmp_path / "broken"
    shutil.copytree(art, broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:100])
    result = _cli("lint", broken)
    assert result.returncode == 2 and "sha256" in result.stderr and len(result.stderr.splitlines()) == 1


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_a_killed_export_leaves_no_worker_and_its_temp_folder_goes_next_time(exported, tmp_path):
    import signal
    import time

    ckpt, _ = exported("rt-gpt_neox", tiny_neox())
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "neodeploy", "export", str(ckpt), str(out), "--quiet",
                             "--no-reference-cache"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    workers = []
    while time.monotonic() < deadline and not workers:  # the trace worker (multiprocessing spawn) is running
        workers = [c for c in descendants(proc.pid) if "spawn_main" in cmdline(c)]
        time.sleep(0.05)
    assert workers, "the export never started its trace worker"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(w) for w in workers), "the trace worker outlived its parent"
    assert list(tmp_path.glob(".out.*.tmp")), "the killed export's work folder should be there to clean up"
    assert not out.exists()
    export_again = _cli("export", ckpt, out, "--quiet")
    assert export_again.returncode == 0, export_again.stderr
    assert not list(tmp_path.glob(".out.*.tmp")) and (out / "neodeploy.json").is_file()


@pytest.mark.parametrize("change, match", [
    ({"vocab_size": [1]}, "'vocab_size' must be an integer"),
    ({"eos_token_id": "eos"}, "'eos_token_id' must be a non-negative token id"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be an integer"),
    ({"num_hidden_layers": 2.5}, "'num_hidden_layers' must be an integer"),
    ({"hidden_size": "64"}, "'hidden_size' must be an integer"),
    ({"layer_norm_eps": float("nan")}, "'layer_norm_eps' must be a finite number"),
    ({"layer_norm_eps": -1e-5}, "epsilon must be a finite number > 0"),
    ({"rotary_emb_base": -5}, "rotary base"),
    ({"vocab_size": 1 << 40}, "beyond"),
    ({"use_parallel_residual": "yes"}, "'use_parallel_residual' must be true or false"),
    ({"eos_token_id": 999}, "outside the vocabulary"),
    ({"num_hidden_layers": 1 << 40}, "beyond"),  # refused before ("global",) * layers fills memory
])
def test_config_json_is_checked_by_type_and_range(change, match):
    from neodeploy.core.errors import ConfigError
    from neodeploy.core.spec import hf_config, spec_from_config

    cfg = {**hf_config(tiny_neox()), **change}
    with pytest.raises(ConfigError, match=match):
        spec_from_config(cfg)
    assert spec_from_config({**hf_config(tiny_neox()), "max_position_embeddings": 128.0}).max_positions == 128


def test_make_checkpoint_options_are_checked(tmp_path):
    for flags, match in ((["--max-shard-size", "0"], "max-shard-size"), (["--seed", "-3"], "seed")):
        result = _cli("make-checkpoint", "--preset", "pythia-14m", tmp_path / "c", *flags)
        assert result.returncode == 2 and match in result.stderr and not (tmp_path / "c").exists()


def test_a_hand_edited_manifest_is_one_artifact_error(artifact_copy):
    for change, match in ((lambda m: m["spec"].pop("num_layers"), "not a valid ModelSpec"),
                          (lambda m: m.update(onnx="model.onnx"), "onnx must be an object"),
                          (lambda m: m.update(dtype="int3"), "dtype must be"),
                          (lambda m: m.update(quantization={"method": "int2"}), "quantization.method must be"),
                          (lambda m: m.update(max_context=-1), "max_context must be a positive integer"),
                          (lambda m: m["onnx"].update(kv_cache="sideways"), "onnx.kv_cache"),
                          (lambda m: m["files"].update({"model.onnx": "abc"}), "sha256 hex digest"),
                          (lambda m: m["spec"].update(hidden_size="64"), "hidden_size must be a positive integer")):
        original = (artifact_copy / "neodeploy.json").read_text()
        _edit(artifact_copy, change)
        with pytest.raises(ArtifactError, match=match):
            load(artifact_copy)
        (artifact_copy / "neodeploy.json").write_text(original)
    assert load(artifact_copy).generate([1, 2], max_new_tokens=2)[0].output_ids


def test_mutated_manifests_load_or_raise_the_typed_error(artifact_copy):
    """Property: whatever a field is changed to (any JSON value, or removed), load succeeds or raises ArtifactError."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    original = json.loads((artifact_copy / "neodeploy.json").read_text())
    paths = [(k,) for k in original] + [("spec", k) for k in original["spec"]] + [("onnx", k) for k in original["onnx"]]
    values = st.recursive(st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats(allow_nan=True) |
                          st.text(max_size=8), lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)

    @hypothesis.settings(max_examples=60, deadline=None, database=None, derandomize=True)
    @hypothesis.given(path=st.sampled_from(paths), value=values | st.just("<removed>"))
    def check(path, value):
        manifest = json.loads(json.dumps(original))
        node = manifest
        for key in path[:-1]:
            node = node[key]
        if value == "<removed>":
            node.pop(path[-1])
        else:
            node[path[-1]] = value
        (artifact_copy / "neodeploy.json").write_text(json.dumps(manifest))
        try:
            load(artifact_copy, verify=False)
        except ArtifactError:
            pass

    check()


def test_mutated_configs_parse_or_raise_config_error():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from neodeploy.core.errors import ConfigError
    from neodeploy.core.spec import hf_config, spec_from_config

    bases = [hf_config(tiny_neox()), hf_config(tiny_neox().replace(rotary_pct=1.0))]
    from conftest import tiny_neo

    bases.append(hf_config(tiny_neo()))
    values = st.none() | st.booleans() | st.integers(-3, 1 << 40) | st.floats(allow_nan=True, allow_infinity=True) | \
        st.text(max_size=6) | st.lists(st.integers(-2, 300), max_size=3) | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)

    @hypothesis.settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @hypothesis.given(base=st.sampled_from(bases), data=st.data())
    def check(base, data):
        cfg = dict(base)
        key = data.draw(st.sampled_from(sorted(cfg) + ["rope_scaling", "rope_parameters", "rotary_emb_base"]))
        value = data.draw(values | st.just("<removed>"))
        if value == "<removed>":
            cfg.pop(key, None)
        else:
            cfg[key] = value
        try:
            spec_from_config(cfg)
        except ConfigError:
            pass

    check()
