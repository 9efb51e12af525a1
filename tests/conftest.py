"""Shared fixtures: tiny real-architecture specs, checkpoint makers, the transformers oracle."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from neodeploy.reference import preset
from processes import alive, cli, cmdline, descendants, free_port  # noqa: F401 - shared with the tests

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZERS = ROOT.parent / "shared" / "data" / "tokenizers"


def tiny_neox(**changes):
    spec = preset("pythia-14m").replace(
        num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=320, max_positions=128
    )
    return spec.replace(**changes) if changes else spec


def tiny_neo(**changes):
    spec = preset("gpt-neo-125m").replace(
        num_layers=3, hidden_size=64, num_heads=4, intermediate_size=128, vocab_size=320, max_positions=128,
        window_size=4,
    )
    return spec.replace(**changes) if changes else spec


@pytest.fixture
def make(tmp_path):
    """make(spec, name, **kw) -> checkpoint folder. init_std 0.1 keeps logits O(1) so errors show."""
    from neodeploy.reference import make_checkpoint

    def _make(spec, name="ckpt", **kw):
        kw.setdefault("init_std", 0.1)
        return make_checkpoint(spec, tmp_path / name, **kw)

    return _make


def hf_load(path, dtype=None):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), attn_implementation="eager", dtype=dtype or torch.float32
    ).eval()


def tokenizer_dir(name: str) -> Path:
    path = SHARED_TOKENIZERS / name
    if not path.is_dir():
        pytest.skip(f"real tokenizer files not found at {path} (the ../shared/data folder is absent)")
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """exported(name, spec, precision, target, logits) -> (checkpoint, artifact), each exported once per test session."""
    from neodeploy.export import export
    from neodeploy.reference import make_checkpoint

    root = tmp_path_factory.mktemp("exported")
    made: dict = {}

    def _get(name, spec, precision="fp32", target="portable", logits=None):
        key = (name, precision, target, logits)
        if key not in made:
            ckpt = root / name
            if not ckpt.exists():
                make_checkpoint(spec, ckpt, seed=5, init_std=0.1)
            folder = root / "-".join([name, precision, target] + ([f"logits-{logits}"] if logits else []))
            made[key] = (ckpt, export(ckpt, folder, precision=precision, target=target, logits=logits,
                                      echo=lambda s: None))
        return made[key]

    return _get


FIXTURE_STEPS = 120


@pytest.fixture(scope="session")
def trained():
    """trained(family) -> checkpoint folder of a tiny model trained on stdlib docstrings with the real tokenizer.

    Cached by the hash of the training script and tokenizer under $NEODEPLOY_CACHE (default
    ~/.cache/neodeploy), so a machine trains each once; built in a temporary folder and renamed into place.
    """
    import hashlib
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    script = ROOT / "scripts" / "train_fixture.py"
    trainer = ROOT / "reference" / "train.py"
    cache = Path(os.environ.get("NEODEPLOY_CACHE", Path.home() / ".cache" / "neodeploy")) / "fixtures"

    def _get(family: str) -> Path:
        tok = tokenizer_dir("gpt-neox-20b" if family == "gpt_neox" else "gpt2")
        digest = hashlib.sha256(script.read_bytes() + trainer.read_bytes() + (tok / "tokenizer.json").read_bytes()
                                + str(FIXTURE_STEPS).encode()).hexdigest()[:16]
        out = cache / f"{family}-{digest}"
        if not (out / "training.json").is_file():
            cache.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=cache))
            try:
                subprocess.run([sys.executable, str(script), family, str(tok), str(tmp), "--steps", str(FIXTURE_STEPS)],
                               check=True, capture_output=True, timeout=900)
                if out.exists():
                    shutil.rmtree(out)
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return out

    return _get


def drifted_copy(artifact: Path, dest: Path) -> Path:
    """The artifact with its weights scaled after export and the sha256 updated, so it loads but has drifted."""
    import json
    import shutil

    import numpy as np

    from neodeploy.core.files import sha256

    shutil.copytree(artifact, dest)
    data = dest / "model.onnx.data"
    weights = np.fromfile(data, dtype=np.float32)
    weights[: weights.size // 2] *= 1.05
    weights.tofile(data)
    manifest = json.loads((dest / "neodeploy.json").read_text())
    manifest["files"]["model.onnx.data"] = sha256(data)
    (dest / "neodeploy.json").write_text(json.dumps(manifest))
    return dest


# ------------------------------------------------------------------ processes, for the kill tests (Linux /proc)

# ------------------------------------------------------------------ the served artifact (tests/test_serve*.py)

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def serve_artifact(tmp_path_factory):
    """A tiny GPT-NeoX with the real GPT-NeoX-20B tokenizer and a chat template, 2048 positions so long streams
    take seconds; exported once for every server test."""
    import json
    import shutil

    from neodeploy.export import export
    from neodeploy.reference import make_checkpoint

    root = tmp_path_factory.mktemp("serve")
    tok = root / "tokenizer"
    tok.mkdir()
    shutil.copy(tokenizer_dir("gpt-neox-20b") / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>",
                                                           "tokenizer_class": "PreTrainedTokenizerFast"}))
    spec = tiny_neox(vocab_size=50304, max_positions=2048)
    ckpt = make_checkpoint(spec, root / "ckpt", seed=11, init_std=0.1, tokenizer_dir=tok)
    return export(ckpt, root / "art", target="cpu", echo=lambda s: None)


@pytest.fixture(scope="session")
def wide_artifact(tmp_path_factory):
    """serve_artifact's GPT-NeoX at hidden 256, so a 2,000-token generation takes seconds (for the tests that must
    act while one runs: abandoning, stopping, draining)."""
    import json
    import shutil

    from neodeploy.export import export
    from neodeploy.reference import make_checkpoint

    root = tmp_path_factory.mktemp("wide")
    tok = root / "tokenizer"
    tok.mkdir()
    shutil.copy(tokenizer_dir("gpt-neox-20b") / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "eos_token": "<|endoftext|>"}))
    spec = tiny_neox(vocab_size=50304, max_positions=2048, hidden_size=256, intermediate_size=512)
    ckpt = make_checkpoint(spec, root / "ckpt", seed=3, init_std=0.1, tokenizer_dir=tok)
    return export(ckpt, root / "art", target="cpu", echo=lambda s: None)


@contextlib.contextmanager
def serving(artifact, key, *flags):
    """A ready `neodeploy serve ARTIFACT` subprocess: (proc, url); killed by its pid at the end."""
    proc, url = start_server(artifact, key, *flags)
    try:
        _, code = wait_ready(proc, url)
        assert code is None, proc.stderr.read()
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def start_server(artifact, key, *flags):
    """`neodeploy serve ARTIFACT` as a subprocess on a free loopback port, model name "tiny", API key `key`."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "NEODEPLOY_API_KEY": key}
    proc = subprocess.Popen([sys.executable, "-m", "neodeploy", "serve", str(artifact), "--port", str(port),
                             "--model-name", "tiny", *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_ready(proc, url, timeout=120):
    """(health statuses seen, exit code if the process ended first, else None)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return seen, proc.returncode
        try:
            r = httpx.get(f"{url}/health", timeout=2)
            seen.append(r.status_code)
            if r.status_code == 200:
                return seen, None
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready within {timeout} s: {seen[-3:]}")


def plain_and_fused(spec, dtype=None, **fused_options):
    """Two copies of one random model (seed 0, std 0.1): the reference as it is, and one whose attention is the fused
    op the CPU and CUDA targets export (use_fused_attention(max_positions, **fused_options))."""
    import torch

    from neodeploy.reference import build_model

    torch.manual_seed(0)
    plain = build_model(spec).eval()
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.1)
    fused = build_model(spec).eval()
    fused.load_state_dict(plain.state_dict())
    if dtype is not None:
        plain, fused = plain.to(dtype), fused.to(dtype)
    fused.use_fused_attention(spec.max_positions, **fused_options)
    return plain, fused


@contextlib.contextmanager
def call_log(backend, *methods: str, hook=None):
    """(method, input shape) of the backend's calls that succeeded while the block runs, in order (instance
    attributes wrap the methods; removed after): which calls the engine batched, and in what order. hook(method,
    shape), if given, runs after each call, in the engine's thread (to submit a request at an exact point)."""
    log = []

    def wrap(method, real):
        def counted(ids, *args, **kwargs):
            out = real(ids, *args, **kwargs)
            log.append((method, ids.shape))
            if hook is not None:
                hook(method, ids.shape)
            return out
        return counted

    for method in methods:
        setattr(backend, method, wrap(method, getattr(backend, method)))
    try:
        yield log
    finally:
        for method in methods:
            backend.__dict__.pop(method, None)


@contextlib.contextmanager
def calls_of(backend, method: str):
    """The input shapes of one backend method's calls that succeeded while the block runs."""
    shapes = []
    with call_log(backend, method, hook=lambda _, shape: shapes.append(shape)):
        yield shapes
