"""Scale-out on Ray Serve: the same app, 2 replicas behind Serve's proxy, answers equal to Model.generate alone.

One local Ray instance for the whole test (2 CPUs, no dashboard, 127.0.0.1, usage stats off, its own temporary
folder and HOME), inside a network namespace of its own when run as root (Serve replicas open a gRPC server on all
interfaces). Deselect with `-m "not ray"`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import drifted_copy, tiny_neox
from neodeploy.runtime import load

pytestmark = [pytest.mark.ray, pytest.mark.slow]
pytest.importorskip("ray.serve")

DRIVER = Path(__file__).with_name("ray_driver.py")


def test_two_replicas_serve_what_model_generate_returns(exported, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="nd-ray-"))  # Ray's unix sockets need a short path (107 bytes)
    _, artifact = exported("rt-gpt_neox", tiny_neox())
    model = load(artifact)
    jobs = [[[5 + i, 17, 33, 2 * i + 1], 3 + i % 6, i % 3 == 0] for i in range(16)]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_TMPDIR": str(ray_tmp), "RAY_DEDUP_LOGS": "0"}
    namespaced = os.geteuid() == 0 and shutil.which("unshare") is not None
    drifted = drifted_copy(artifact, tmp_path / "drifted")
    command = [sys.executable, str(DRIVER), str(artifact), str(tmp_path / "jobs.json"), "1" if namespaced else "0",
               str(drifted)]
    if namespaced:
        command = ["unshare", "-n", *command]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (prompt, n, _), answer in zip(jobs, report["answers"]):
        assert answer["text"] == model.generate(prompt, max_new_tokens=n)[0].text
    replicas = {a["replica"] for a in report["answers"]}
    assert len(replicas) == 2 and None not in replicas, replicas
    assert report["bad_status"] == 400 and report["bad_param"] == "best_of"
    assert report["page"] == [200, True, 200]
    # Ray's metrics export carries each replica's generated-token count, and they add up to what was served.
    assert set(report["exported_tokens"]) == replicas
    served = sum(len(model.generate(p, max_new_tokens=n)[0].output_ids) for p, n, _ in jobs)
    assert sum(report["exported_tokens"].values()) == served
    assert report["pids"], "the driver saw no Ray processes"
    error = report["drift_error"]
    assert error and error.startswith("a replica could not start: golden check failed") and "\n" not in error
    deadline = time.monotonic() + 30
    alive = [p for p in report["pids"] if Path(f"/proc/{p}").exists()]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [p for p in alive if Path(f"/proc/{p}").exists() and "Z" not in _state(p)]
    assert not alive, f"Ray processes left behind: {alive}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
