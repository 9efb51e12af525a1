"""The `neodeploy` command as a user runs it: outputs, exit statuses, one-line errors."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli, hf_load, tiny_neox


run = functools.partial(cli, check=True)  # these tests expect success unless they say check=False


def test_make_checkpoint_and_reference_match_transformers_generate(tmp_path):
    out = tmp_path / "ckpt"
    run("make-checkpoint", "--preset", "pythia-70m", out, "--layers", 2, "--hidden", 64, "--heads", 4,
        "--vocab", 512, "--seed", 7)
    config = json.loads((out / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 256)
    result = json.loads(run("reference", out, "Hello there", "--max-new-tokens", 8, "--json").stdout)
    prompt = torch.tensor([result["prompt_ids"]])
    want = hf_load(out).generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, pad_token_id=0)
    assert result["output_ids"] == want[0, prompt.shape[1]:].tolist()
    assert len(result["prompt_ids"]) == len("Hello there".encode())


def test_inspect_and_presets():
    text = run("inspect", "--preset", "pythia-160m").stdout
    assert "162.3M (162,322,944)" in text and "16 of 64 dims" in text
    spec = json.loads(run("inspect", "--preset", "gpt-neo-125m", "--json").stdout)
    assert spec["num_parameters"] == 125_198_592 and spec["window_size"] == 256
    listing = run("presets").stdout
    assert listing.count("\n") == 14 and "gpt-neox-20b" in listing and "82.22 GB" in listing



def test_make_checkpoint_with_a_gpt_neo_vocabulary_prints_two_lines(tmp_path):
    """The built-in byte tokenizer at GPT-Neo's vocabulary (ids 256-50255 unused) made the tokenizers library
    print a ~340 KB "OrderedVocab ... contains holes" warning on stdout (Rust's println!, not stderr)."""
    proc = run("make-checkpoint", "--preset", "gpt-neo-125m", tmp_path / "neo", "--layers", 1, "--hidden", 64,
               "--heads", 4)
    assert "holes" not in proc.stdout + proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and len(proc.stdout) < 400 and proc.stderr == "", proc.stdout[:300]


def test_tokenizer_json_of_a_vocabulary_with_holes_is_silent(capfd):
    from neodeploy.core.tokenizer import builtin_byte_tokenizer, tokenizer_json

    text = tokenizer_json(builtin_byte_tokenizer(50256, 50257))  # what structured output hands llguidance
    assert json.loads(text)["model"]["vocab"]["<|endoftext|>"] == 50256
    out, err = capfd.readouterr()
    assert out == "" and err == "", out[:200]


@pytest.mark.slow
def test_demo_trains_a_model_that_writes_words_and_keeps_only_what_it_is_told(tmp_path):
    import ast
    import stat

    from neodeploy.reference.train import stdlib_docstrings

    # The default: the shipped model, made by the demo's own training for a fixed, seeded step count.
    from neodeploy.demo import SHIPPED, TRAIN_STEPS

    assert json.loads((SHIPPED / "training.json").read_text())["steps"] == TRAIN_STEPS
    out = run("demo", "--workdir", tmp_path, timeout=600).stdout
    assert "the shipped byte-level GPT-NeoX" in out
    assert "demo complete" in out and f"kept in {tmp_path}" in out
    assert "validate passed" in out and out.count(" ok") >= 6  # export verification + check tables
    greedy = ast.literal_eval(re.search(r"^   greedy     ('.*')  \(", out, re.M).group(1))
    words = re.findall(r"[A-Za-z]+", greedy)[:-1]  # the last may be cut off by max_new_tokens
    corpus = set(re.findall(r"[A-Za-z]+", stdlib_docstrings(1_000_000)))
    known = [w for w in words if w in corpus]
    assert len(words) >= 4 and len(known) >= 0.8 * len(words), (greedy, set(words) - corpus)
    assert re.search(r"[a-z]{2,} +[a-z]{2,}", greedy), greedy  # words and spaces, not noise
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "checkpoint").iterdir()}
    assert len(set(modes.values())) == 1, modes  # safetensors' 0600 normalised like the rest
    # Random weights on a preset, in a temporary folder the demo removes and says so.
    out = run("demo", "--preset", "pythia-14m", "--max-new-tokens", 4).stdout
    workdir = re.search(r"(\S*neodeploy-demo-\w+)/checkpoint written", out).group(1)
    assert "temporary folder removed" in out and not Path(workdir).exists()


def test_the_demo_model_is_the_same_on_every_run(tmp_path):
    """Seeded, one training thread, a step count: two trainings give the same bytes (a few steps stand in for all)."""
    from neodeploy.demo import train_demo_model

    first, second = tmp_path / "a", tmp_path / "b"
    for out in (first, second):
        stats = train_demo_model(out, steps=6, echo=lambda line: None)
        assert stats["steps"] == 6
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_every_option_has_help_with_its_default():
    import argparse

    from neodeploy.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        text = parser.format_help()
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.default is not None and action.default is not False and action.default != []:
                assert "default" in parser._get_formatter()._get_help_string(action), (name, action.option_strings)
        assert "TODO" not in text and "XXX" not in text


def test_a_missing_extra_is_one_line_naming_it(tmp_path, exported):
    """A base install without torch: the export stages say which extra to install (imports blocked here)."""
    code = (
        "import builtins, sys\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in ('torch', 'onnx', 'onnxscript', 'onnxslim', 'safetensors'):\n"
        "        raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from neodeploy.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    ckpt, art = (str(p) for p in exported("rt-gpt_neox", tiny_neox()))
    for args in (["make-checkpoint", "--preset", "pythia-14m", str(tmp_path / "c")], ["export", ckpt, str(tmp_path / "o")],
                 ["demo", "--preset", "pythia-14m"], ["validate", art, "--reference", ckpt], ["lint", art]):
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'neodeploy[export]'" in lines[0] and "Traceback" not in proc.stderr, lines


def test_generate_labels_rows_and_inspect_reads_an_artifact(exported):
    _, art = exported("rt-gpt_neox", tiny_neox())
    out = run("generate", art, "first prompt", "second", "--max-new-tokens", 3).stdout
    assert out.startswith("--- [1/2] 'first prompt'") and "--- [2/2] 'second'" in out
    text = run("inspect", art).stdout
    for field in ("dtype", "quantisation", "target", "KV cache", "max context", "verification at export", "TensorRT engine"):
        assert field in text, field
    assert "fp32" in text and "portable" in text


def test_generate_takes_the_sampling_and_structured_output_options(exported, tmp_path):
    pytest.importorskip("llguidance")
    _, art = exported("rt-gpt_neox", tiny_neox())
    out = run("generate", art, "hi", "--regex", "[0-9]{2}-[a-f]{3}", "--temperature", "1", "--seed", "3").stdout
    assert re.fullmatch(r"[0-9]{2}-[a-f]{3}", out.strip())
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                                  "additionalProperties": False}))
    row = json.loads(run("generate", art, "hi", "--json-schema", schema, "--json", "--frequency-penalty", "0.5",
                         "--presence-penalty", "0.2", "--min-p", "0.1").stdout)
    assert isinstance(json.loads(row["text"])["ok"], bool) and row["finish_reason"] == "stop"
    row = json.loads(run("generate", art, "hi", "--logit-bias", "42=100", "--max-new-tokens", "3", "--json").stdout)
    assert row["output_ids"] == [42, 42, 42]
    for bad, message in ((["--regex", "("], "regex does not compile"), (["--logit-bias", "x"], "ID=BIAS"),
                         (["--logit-bias", "99999=1"], "outside the vocabulary"), (["--min-p", "2"], "min_p")):
        r = run("generate", art, "hi", *bad, check=False)
        assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _broken(tmp_path, kind):
    from neodeploy.reference import make_checkpoint

    spec = tiny_neox()
    path = make_checkpoint(spec, tmp_path / kind, file_format="bin" if kind == "bin-object" else "safetensors")
    config = json.loads((path / "config.json").read_text())
    if kind == "no-config":
        (path / "config.json").unlink()
    elif kind == "model-type":
        (path / "config.json").write_text(json.dumps({**config, "model_type": "bloom"}))
    elif kind == "mismatch":
        (path / "config.json").write_text(json.dumps({**config, "hidden_size": 128}))
    elif kind == "rope":
        (path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic", "factor": 2}}))
    elif kind == "bin-object":
        state = torch.load(path / "pytorch_model.bin", weights_only=True)
        torch.save({**state, "optimizer": {"lr": 0.1}}, path / "pytorch_model.bin")
    elif kind == "truncated":
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:-100])
    return path


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("no-config", "has no config.json"),
        ("model-type", "model_type 'bloom' is not supported"),
        ("mismatch", "config.json does not match the weights"),
        ("rope", "rope scaling 'dynamic'"),
        ("bin-object", "non-tensor object under 'optimizer'"),
        ("truncated", "truncated"),
    ],
)
def test_bad_checkpoints_give_one_line_and_exit_2(tmp_path, kind, message):
    path = tmp_path / "nowhere" if kind == "missing" else _broken(tmp_path, kind)
    proc = run("reference", path, "--ids", "1 2 3", check=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_bad_arguments_exit_2_and_lose_nothing(tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run("make-checkpoint", "--preset", "pythia-14m", out, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1
    for args, message in (
        (("make-checkpoint", "--preset", "pythia-99m", tmp_path / "x"), "unknown preset"),
        (("make-checkpoint", "--preset", "pythia-14m", tmp_path / "y", "--heads", 5), "not divisible"),
        (("make-checkpoint", "--preset", "pythia-14m", tmp_path / "z", "--window", 8), "GPT-Neo presets only"),
        (("inspect",), "either a CHECKPOINT"),
        (("reference", tmp_path, "--ids", "a b"), "--ids expects integers"),
        (("reference", tmp_path, "hi", "--max-new-tokens", 0), "at least 1"),
        (("bogus-command",), "invalid choice"),
    ):
        proc = run(*args, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_reference_refuses_prompts_it_cannot_run(tmp_path):
    from neodeploy.reference import make_checkpoint

    path = make_checkpoint(tiny_neox(), tmp_path / "c")
    proc = run("reference", path, "--ids", "1 2 999", check=False)
    assert proc.returncode == 2 and "token id 999 is outside the vocabulary" in proc.stderr
    proc = run("reference", path, "--ids", "1 2", "--max-new-tokens", 200, check=False)
    assert proc.returncode == 2 and "exceeds the model's 128 positions" in proc.stderr


def _on_a_terminal(*args) -> str:
    """Run the CLI with a pseudo-terminal as its stdout and stderr (120 columns); returns what it printed."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI, on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "neodeploy", *map(str, args)])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.waitpid(pid, 0)
    return b"".join(chunks).decode(errors="replace")


def test_progress_is_live_on_a_terminal_only(tmp_path):
    shown = _on_a_terminal("make-checkpoint", "--preset", "pythia-70m", tmp_path / "a")
    assert "make-checkpoint: " in shown and " tensors [" in shown
    assert " tensors [" not in _on_a_terminal("make-checkpoint", "--preset", "pythia-70m", tmp_path / "b", "--quiet")
    piped = run("make-checkpoint", "--preset", "pythia-70m", tmp_path / "c")
    assert " tensors [" not in piped.stderr + piped.stdout and (tmp_path / "c" / "model.safetensors").is_file()
