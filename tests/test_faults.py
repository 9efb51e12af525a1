"""The CLI driven as a user drives it, over a matrix of bad inputs and faults: exit 2 (1 only for a failed gate),
at most 3 lines on stderr, never a traceback, and nothing written or lost (every file's sha256 before and after).
Faults: a full filesystem, a read-only one, SIGKILL and Ctrl-C during trace and verify with --overwrite."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import alive, cmdline, descendants, drifted_copy, tiny_neo, tiny_neox
from neodeploy.core.files import publish, recover_interrupted

CLI = [sys.executable, "-m", "neodeploy"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with its sha256 (folders as 'dir'): equal before and after means nothing changed."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def run_cli(*args, stdin: bytes | None = None, cwd: Path | None = None, timeout: float = 120):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, input=stdin, cwd=cwd, timeout=timeout,
                          env={**os.environ, "NEODEPLOY_QUIET": "1"})


@pytest.fixture(scope="module")
def world(exported, tmp_path_factory):
    """A checkpoint, its artifact and the broken variants the cases read; no case may change any of it."""
    ckpt, art = exported("rt-gpt_neox", tiny_neox())
    root = tmp_path_factory.mktemp("world")
    shutil.copytree(ckpt, root / "ckpt")
    shutil.copytree(art, root / "art")
    (root / "a-file").write_text("not a folder\n")
    bad = root / "bad-config"
    shutil.copytree(ckpt, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": [1]}))
    shutil.copytree(ckpt, root / "not-json")
    (root / "not-json" / "config.json").write_text("{ this is not json")
    shutil.copytree(ckpt, root / "no-weights")
    for weights in (root / "no-weights").glob("*.safetensors"):
        weights.unlink()
    shutil.copytree(art, root / "corrupt-graph")
    graph = root / "corrupt-graph" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    shutil.copytree(art, root / "corrupt-golden")
    (root / "corrupt-golden" / "golden.npz").write_bytes(b"PK\x03\x04 truncated")
    shutil.copytree(art, root / "future-format")
    manifest = json.loads((art / "neodeploy.json").read_text())
    (root / "future-format" / "neodeploy.json").write_text(json.dumps({**manifest, "format_version": 99}))
    shutil.copytree(art, root / "truncated-manifest")
    text = (art / "neodeploy.json").read_text()
    (root / "truncated-manifest" / "neodeploy.json").write_text(text[: len(text) // 2])
    drifted_copy(art, root / "drifted")
    (root / "bad-prompts.txt").write_bytes(b"hello\n\xff\xfe not text\n")
    other = exported("rt-gpt_neo", tiny_neo())[0]
    shutil.copytree(other, root / "other-ckpt")
    return root


# (command line with {w} for the world folder, expected exit status, a phrase stderr must contain, stdin)
CASES = [
    # make-checkpoint
    ("make-checkpoint --preset nope {w}/new", 2, "unknown preset", None),
    ("make-checkpoint --preset pythia-14m {w}/new --max-shard-size 0", 2, "max-shard-size", None),
    ("make-checkpoint --preset pythia-14m {w}/new --seed -3", 2, "seed", None),
    ("make-checkpoint --preset pythia-14m {w}/art", 2, "already exists", None),
    ("make-checkpoint --preset pythia-14m {w}/missing/new", 2, "does not exist", None),
    ("make-checkpoint --preset pythia-14m {w}/a-file --overwrite", 2, "not a folder", None),
    ("make-checkpoint --preset pythia-14m {w}/new --dtype int3", 2, "dtype", None),
    ("make-checkpoint --preset pythia-14m {w}/new --layers 0", 2, "layers", None),
    # inspect
    ("inspect {w}/missing", 2, "does not exist", None),
    ("inspect {w}/a-file", 2, "is a file", None),
    ("inspect --preset nope", 2, "unknown preset", None),
    ("inspect {w}/ckpt --preset pythia-14m", 2, "either", None),
    ("inspect {w}/truncated-manifest", 2, "not valid JSON", None),
    ("inspect {w}/bad-config", 2, "vocab_size", None),
    # export
    ("export {w}/missing {w}/new", 2, "does not exist", None),
    ("export {w}/ckpt {w}/art", 2, "already exists", None),
    ("export {w}/ckpt {w}/art --overwrite --precision fp8", 2, "precision", None),
    ("export {w}/ckpt {w}/new --opset 7", 2, "opset", None),
    ("export {w}/ckpt {w}/new --max-context 3", 2, "max-context", None),
    ("export {w}/ckpt {w}/new --quantize int3", 2, "int3", None),
    ("export {w}/ckpt {w}/new --quantize int8 --precision fp16", 2, "fp32", None),
    ("export {w}/ckpt {w}/new --quantize int4 --block-size 48", 2, "block-size", None),
    ("export {w}/ckpt {w}/new --block-size 64", 2, "block-size", None),
    ("export {w}/ckpt {w}/new --max-context 16777217", 2, "max-context", None),
    ("export {w}/ckpt {w}/new --target gpu", 2, "target", None),
    ("export {w}/ckpt {w}/ckpt --overwrite", 2, "checkpoint folder", None),
    ("export {w}/bad-config {w}/new", 2, "vocab_size", None),
    ("export {w}/not-json {w}/new", 2, "config.json", None),
    ("export {w}/no-weights {w}/new", 2, "weights", None),
    ("export {w}/a-file {w}/new", 2, "is a file", None),
    # generate
    ("generate {w}/missing hi", 2, "does not exist", None),
    ("generate {w}/art hi --max-new-tokens 0", 2, "max-new-tokens", None),
    ("generate {w}/art hi --seed -1", 2, "seed", None),
    ("generate {w}/art hi --temperature inf", 2, "temperature", None),
    ("generate {w}/art hi --top-p 2", 2, "top", None),
    ("generate {w}/art -", 2, "UTF-8", b"\xff\xfe not text\n"),
    ("generate {w}/corrupt-graph hi", 2, "sha256", None),
    ("generate {w}/future-format hi", 2, "format version", None),
    ("generate {w}/art --ids 1,x", 2, "ids", None),
    # check
    ("check {w}/missing", 2, "does not exist", None),
    ("check {w}/art --report {w}/missing/report.json", 2, "does not exist", None),
    ("check {w}/corrupt-golden", 2, "sha256", None),
    ("check {w}/drifted", 1, "", None),  # the gate failed: 1, not 2
    # reference
    ("reference {w}/ckpt a\udcffb", 2, "UTF-8", None),  # argv bytes that are not UTF-8 arrive as surrogates
    # validate
    ("validate {w}/art --reference {w}/ckpt --prompts {w}/bad-prompts.txt", 2, "UTF-8", None),
    ("validate {w}/art --reference {w}/missing", 2, "does not exist", None),
    ("validate {w}/art --reference {w}/other-ckpt", 2, "not the checkpoint", None),
    ("validate {w}/art --reference {w}/ckpt --report {w}/missing/r.json", 2, "does not exist", None),
    # lint
    ("lint {w}/missing", 2, "does not exist", None),
    ("lint {w}/corrupt-graph", 2, "sha256", None),
    ("lint {w}/art --profile nope", 2, "profile", None),
    # build-engine
    ("build-engine {w}/art --profile chat", 2, "fp16", None),
    ("build-engine {w}/art --profile nope", 2, "profile", None),
    ("build-engine {w}/missing --profile chat", 2, "does not exist", None),
    # demo
    ("demo --workdir {w}/a-file", 2, "is a file", None),
    ("demo --train-seconds 0", 2, "train-seconds", None),
    ("demo --preset nope", 2, "preset", None),
    # serve
    ("serve {w}/missing", 2, "does not exist", None),
    ("serve {w}/art --port 0", 2, "port", None),
    ("serve {w}/art --kv-budget lots", 2, "kv budget", None),
    ("serve {w}/art --grace-period -1", 2, "grace-period", None),
    # bench, bench-serve
    ("bench {w}/corrupt-graph --compare reference", 2, "sha256", None),
    ("bench {w}/art --checkpoint {w}/missing --prompt 8 --new-tokens 4", 2, "does not exist", None),
    ("bench-serve --url http://127.0.0.1:9 --requests 2 --concurrency 1", 2, "cannot reach", None),
]


def test_bad_inputs_are_one_line_exit_2_and_change_nothing(world, tmp_path):
    assert len(CASES) >= 40
    before = snapshot(world)

    def one(case):
        line, code, phrase, stdin = case
        result = run_cli(*line.format(w=world).split(), stdin=stdin, cwd=tmp_path)
        return case, result

    failures = []
    with ThreadPoolExecutor(2) as pool:  # two cores: two at a time halves the matrix's wall time
        for (line, code, phrase, _), result in pool.map(one, CASES):
            err = result.stderr.decode("utf-8", "replace")
            lines = err.strip().splitlines()
            if result.returncode != code or "Traceback" in err or len(lines) > 3 or phrase.lower() not in err.lower():
                failures.append(f"{line}: exit {result.returncode}, stderr {err.strip()[-400:]!r}")
    assert not failures, "\n".join(failures)
    after = snapshot(world)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"bad inputs changed files: {changed}"
    assert not list(tmp_path.iterdir()), "a failed command wrote into its working folder"


def test_serve_on_a_taken_port_says_so_before_claiming_to_listen(world, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        result = run_cli("serve", world / "art", "--port", held.getsockname()[1], cwd=tmp_path, timeout=60)
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2 and "cannot listen" in err and "choose another --port" in err, err[-800:]
    assert "listening on" not in err and "Traceback" not in err and len(err.strip().splitlines()) <= 3, err[-800:]


# ----------------------------------------------------------------------------------------------- full disks

def _unshare_mount_works() -> bool:
    if not shutil.which("unshare") or not os.path.isdir("/proc"):
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


FULL_DISK_DRIVER = r"""
import hashlib, json, os, subprocess, sys
from pathlib import Path
mnt, old, ckpt, size = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
def snap(root):
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}
subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
subprocess.run(["cp", "-a", str(old), str(mnt / "art")], check=True)
results = {"before": snap(mnt)}
cli = [sys.executable, "-m", "neodeploy"]
for name, args in (("export", ["export", ckpt, str(mnt / "art"), "--overwrite"]),
                   ("make-checkpoint", ["make-checkpoint", "--preset", "pythia-14m", str(mnt / "ckpt")])):
    p = subprocess.run(cli + args, capture_output=True, text=True)
    results[name] = {"rc": p.returncode, "stderr": p.stderr, "after": snap(mnt)}
subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
p = subprocess.run(cli + ["export", ckpt, str(mnt / "fresh")], capture_output=True, text=True)
results["read-only"] = {"rc": p.returncode, "stderr": p.stderr, "after": snap(mnt)}
print(json.dumps(results))
"""


@pytest.mark.skipif(not _unshare_mount_works(), reason="needs to mount a tmpfs in a mount namespace (root, unshare)")
def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_old_artifact(world, tmp_path):
    """A tmpfs with room for the old artifact and a quarter more: --overwrite runs out of space mid-export."""
    old = world / "art"
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in old.iterdir())
    size = used + used // 4  # the old artifact and a quarter of a new one
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.run(["unshare", "-m", sys.executable, "-c", FULL_DISK_DRIVER, str(mnt), str(old),
                           str(world / "ckpt"), str(size)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "NEODEPLOY_QUIET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    for name in ("export", "make-checkpoint", "read-only"):
        r = results[name]
        lines = r["stderr"].strip().splitlines()
        assert r["rc"] == 2 and "Traceback" not in r["stderr"] and len(lines) <= 3, (name, r["stderr"][-1500:])
        assert r["after"] == results["before"], f"{name} left or lost files: {r['after'].keys() ^ results['before'].keys()}"
    assert "cannot write" in results["export"]["stderr"] and "unchanged" in results["export"]["stderr"]
    assert "cannot write" in results["make-checkpoint"]["stderr"]
    assert "writable" in results["read-only"]["stderr"]  # refused up front, before any work


# ------------------------------------------------------------------------------------- killed or interrupted

@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_kill_or_ctrl_c_during_trace_or_verify_keeps_the_old_artifact(world, tmp_path):
    out = tmp_path / "art"
    shutil.copytree(world / "art", out)
    original = snapshot(out)
    for stage in ("trace", "verify"):
        for sig in (signal.SIGKILL, signal.SIGINT):
            # A shell's background job (as CI may start the suite) inherits SIGINT ignored; a terminal's Ctrl-C
            # reaches a process whose SIGINT is the default, so give the export that.
            proc = subprocess.Popen([*CLI, "export", str(world / "ckpt"), str(out), "--overwrite"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                                    env={**os.environ, "NEODEPLOY_QUIET": "1"},
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            deadline, seen = time.monotonic() + 120, False
            while time.monotonic() < deadline:  # the stage lines are printed as each stage starts
                line = proc.stdout.readline()
                if not line:
                    break
                if f"] {stage}:" in line:
                    seen = True
                    break
            assert seen, f"the export never reached {stage}: {proc.stderr.read()[-800:]}"
            if stage == "trace":  # signal once the trace worker runs (a tiny model verifies in ~1 s: no wait)
                while time.monotonic() < deadline and not any(
                        "spawn_main" in cmdline(c) for c in descendants(proc.pid)):
                    time.sleep(0.05)
                time.sleep(0.3)
            family = descendants(proc.pid)
            if sig == signal.SIGINT:
                os.killpg(proc.pid, sig)  # what Ctrl-C in a terminal does: the whole foreground group
            else:
                os.kill(proc.pid, sig)  # kill -9 or the OOM killer: the parent alone
            _, err = proc.communicate(timeout=120)
            assert proc.returncode in ((-9,) if sig == signal.SIGKILL else (130,)), (stage, sig, proc.returncode, err)
            deadline = time.monotonic() + 20
            while any(alive(p) for p in family) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not [p for p in family if alive(p)], f"{stage}/{sig.name}: a worker outlived the export"
            assert snapshot(out) == original, f"{stage}/{sig.name}: the old artifact changed"
            leftovers = [p.name for p in tmp_path.iterdir() if p.name != "art"]
            if sig == signal.SIGINT:
                assert not leftovers, f"Ctrl-C left {leftovers}"
                assert "Traceback" not in err, f"Ctrl-C during {stage} printed a traceback: {err[-800:]}"
    # The next run into the same place removes what the killed ones left and replaces the artifact.
    again = run_cli("export", world / "ckpt", out, "--overwrite", timeout=300)
    assert again.returncode == 0, again.stderr[-800:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert (out / "neodeploy.json").is_file() and snapshot(out).keys() == original.keys()


# ----------------------------------------------------------------------------------------- publishing

def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_publish_swaps_in_one_step_and_recovers_an_interrupted_swap(tmp_path, monkeypatch):
    import neodeploy.core.files as files

    out, new = tmp_path / "out", tmp_path / "new"
    for folder, text in ((out, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    publish(new, out)
    assert (out / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # Where the exchange is not available: two renames, the same result.
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    new.mkdir()
    (new / "f").write_text("newer")
    publish(new, out)
    assert (out / "f").read_text() == "newer" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # A process killed between those two renames left only the old folder aside: it goes back.
    aside = tmp_path / f".out.old-{_dead_pid()}"
    out.rename(aside)
    recover_interrupted(out)
    assert (out / "f").read_text() == "newer" and not aside.exists()
    # Killed after the second rename: the new folder is in, the old one aside is removed.
    aside.mkdir()
    recover_interrupted(out)
    assert not aside.exists() and (out / "f").read_text() == "newer"
    # A live process's folder is never touched.
    live = tmp_path / f".out.old-{os.getpid()}"
    live.mkdir()
    recover_interrupted(out)
    assert live.exists()
