"""Which package may import which: every import statement of every module, those inside functions and under
`if TYPE_CHECKING:` included (a lazy import is still a dependency), read from the source without running it.

    core       the torch-free contract (spec, manifest, tokenizer files, errors, files, progress, tolerances)
    runtime    core                         (numpy + onnxruntime; never the reference or the export)
    serve      core, runtime
    reference  core                         (PyTorch)
    profiles   core
    export     core, reference, runtime, profiles
    cli, validate, speed, __main__: anything

The top-level package itself (`from neodeploy import __version__`) holds only the version and core's errors, and
every module may import it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "core": {"core"},
    "runtime": {"core", "runtime"},
    "serve": {"core", "runtime", "serve"},
    "reference": {"core", "reference"},
    "profiles": {"core", "profiles"},
    "export": {"core", "reference", "runtime", "profiles", "export"},
}
ANYTHING = {"cli", "validate", "speed", "demo", "__main__"}  # workflows over every stage
ROOT_NAMES = {"__version__"}  # names of the top-level package itself, not of a sub-package


def _modules() -> list[Path]:
    skip = {"tests", "scripts", ".venv", "build", "docs"}
    return sorted(p for p in ROOT.rglob("*.py") if p.relative_to(ROOT).parts[0] not in skip
                  and not any(part.startswith(".") for part in p.relative_to(ROOT).parts))


def _package(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported(source: str, rel: Path) -> list[tuple[int, str]]:
    """(line, our sub-package) for every import of ours anywhere in a module's source; rel is its path in the
    repository, against which relative imports resolve."""
    found = []
    for node in ast.walk(ast.parse(source, str(rel))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = ["neodeploy", *rel.parent.parts[: len(rel.parent.parts) - node.level + 1]]
            names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module != "neodeploy" else [f"neodeploy.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            parts = (name or "").split(".")
            if parts[0] == "neodeploy" and len(parts) > 1 and parts[1] not in ROOT_NAMES:
                found.append((node.lineno, parts[1]))
    return found


def _imports_of(path: Path) -> list[tuple[int, str]]:
    return _imported(path.read_text(encoding="utf-8"), path.relative_to(ROOT))


def test_every_package_imports_only_what_its_layer_allows():
    wrong = []
    packages = set()
    for path in _modules():
        package = _package(path)
        packages.add(package)
        if package in ANYTHING or package == "__init__":
            continue
        assert package in ALLOWED, f"{path.relative_to(ROOT)}: a package this test has no rule for; add one"
        for line, target in _imports_of(path):
            if target not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({package}) imports neodeploy.{target}")
    assert not wrong, "imports across layers:\n" + "\n".join(wrong)
    assert {"core", "runtime", "serve", "reference", "export"} <= packages  # the walk found the tree


def test_the_top_level_package_imports_only_core():
    assert {target for _, target in _imports_of(ROOT / "__init__.py")} == {"core"}


def test_lazy_relative_and_type_checking_imports_count():
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from neodeploy.reference import ModelSpec\n"
              "def f():\n    from neodeploy.export.pipeline import export\n    import neodeploy.serve.app\n"
              "    from .. import reference\n    from ..core.spec import preset\n"
              "from neodeploy import __version__, validate\n")
    assert sorted(_imported(source, Path("runtime/probe.py"))) == [
        (3, "reference"), (5, "export"), (6, "serve"), (7, "reference"), (8, "core"), (9, "validate")]


@pytest.mark.parametrize("module", ["neodeploy.runtime", "neodeploy.serve", "neodeploy.core.manifest"])
def test_serving_imports_leave_torch_out(module):
    code = f"import sys, {module}\nprint('torch' in sys.modules)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False"]
