"""What a normal (non-editable) install puts in site-packages, and the torch-free runtime import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_only_the_neodeploy_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("neodeploy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"neodeploy", next(t for t in top if t.endswith(".dist-info"))}
    for module in ("__init__.py", "cli.py", "core/errors.py", "core/spec.py", "core/manifest.py", "core/tokenizer.py",
                   "reference/gpt_neo.py", "reference/gpt_neox.py", "export/__init__.py", "profiles/__init__.py"):
        assert f"neodeploy/{module}" in names, module
    assert not [n for n in names if "/tests/" in n or n.startswith("neodeploy/tests")]
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "neodeploy = neodeploy.cli:main" in entry


def test_runtime_and_spec_import_without_torch():
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'torch' or name.startswith('torch.'):\n"
        "        raise ImportError('torch is not allowed in the runtime')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import neodeploy.runtime, neodeploy.reference\n"
        "from neodeploy.reference import preset, ModelSpec\n"
        "print(preset('pythia-160m').num_parameters(), 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["162322944", "False"]
