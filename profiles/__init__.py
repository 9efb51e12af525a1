"""Deployment profiles: batch, prompt and context ranges for a deployment target, shipped as TOML package
data (chat, batch, edge) or given as a path. From a profile and an artifact's spec and context, `trt_profiles`
derives the two TensorRT optimisation profiles: context (past = 0) and generation (seq = 1)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from neodeploy.core.errors import UsageError

if TYPE_CHECKING:
    from neodeploy.core.spec import ModelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class ProfileError(UsageError):
    """A deployment profile that is malformed or does not fit the model."""


@dataclass(frozen=True)
class Range:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class DeploymentProfile:
    name: str
    description: str
    batch: Range
    prompt: Range
    context: Range  # context.min is implied: the shortest cache during generation is 1 prompt token


def shipped() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files(__package__).iterdir() if p.name.endswith(".toml"))


def _range(data: dict, key: str, source: str, default_min: int | None = None) -> Range:
    section = data.get(key)
    if not isinstance(section, dict):
        raise ProfileError(f"profile {source} has no [{key}] table with min/opt/max")
    try:
        values = [section.get("min", default_min), section["opt"], section["max"]]
    except KeyError as exc:
        raise ProfileError(f"profile {source}: [{key}] lacks {exc.args[0]!r}") from exc
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ProfileError(f"profile {source}: [{key}] min/opt/max must be integers, got {values}")
    low, opt, high = values
    if not 1 <= low <= opt <= high:
        raise ProfileError(f"profile {source}: [{key}] needs 1 <= min <= opt <= max, got {low}/{opt}/{high}")
    return Range(low, opt, high)


def load_profile(name_or_path: str | Path) -> DeploymentProfile:
    """A shipped profile by name (chat, batch, edge) or a TOML file of the same form."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ProfileError(f"profile file {path} does not exist")
        text, source = path.read_text(encoding="utf-8"), str(path)
    else:
        names = shipped()
        if str(name_or_path) not in names:
            raise ProfileError(f"unknown profile {name_or_path!r}; choose one of {', '.join(names)} or pass a .toml file")
        text = resources.files(__package__).joinpath(f"{name_or_path}.toml").read_text(encoding="utf-8")
        source = str(name_or_path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source} is not valid TOML: {exc}") from exc
    prompt = _range(data, "prompt", source)
    context = _range(data, "context", source, default_min=prompt.min + 1)
    profile = DeploymentProfile(str(data.get("name", path.stem)), str(data.get("description", "")),
                                _range(data, "batch", source), prompt, context)
    if context.opt <= prompt.min:
        raise ProfileError(f"profile {source}: context opt {context.opt} must exceed prompt min {prompt.min}")
    if prompt.max >= context.max:
        raise ProfileError(f"profile {source}: prompt max {prompt.max} leaves no room to generate within "
                           f"context max {context.max}")
    return profile


Shape = tuple[int, ...]


def trt_profiles(profile: DeploymentProfile, spec: ModelSpec, max_context: int) -> dict[str, dict[str, tuple[Shape, Shape, Shape]]]:
    """The two optimisation profiles as {profile: {input name: (min, opt, max) shapes}}.

    context: past = 0, seq over the prompt range, mask = seq. generation: seq = 1, past over
    1 .. context.max - 1, mask = past + 1. Every (min, opt, max) triple keeps mask = past + seq.
    """
    if profile.context.max > max_context:
        raise ProfileError(
            f"profile {profile.name!r} needs a context of {profile.context.max} tokens but the artifact serves at "
            f"most {max_context} (its --max-context / the model's positions); use a smaller profile"
        )
    heads, head_dim, layers = spec.num_heads, spec.head_dim, spec.num_layers
    b = profile.batch

    def shapes(seq: Range, past: Range) -> dict[str, tuple[Shape, Shape, Shape]]:
        triple = lambda f: tuple(f(bb, s, p) for bb, s, p in zip((b.min, b.opt, b.max), (seq.min, seq.opt, seq.max),  # noqa: E731
                                                                 (past.min, past.opt, past.max)))
        out = {
            "input_ids": triple(lambda bb, s, p: (bb, s)),
            "attention_mask": triple(lambda bb, s, p: (bb, p + s)),
            "position_ids": triple(lambda bb, s, p: (bb, s)),
        }
        for i in range(layers):
            for kind in ("key", "value"):
                out[f"past_key_values.{i}.{kind}"] = triple(lambda bb, s, p: (bb, heads, p, head_dim))
        return out

    context = shapes(profile.prompt, Range(0, 0, 0))
    generation = shapes(Range(1, 1, 1), Range(profile.prompt.min, profile.context.opt - 1, profile.context.max - 1))
    return {"context": context, "generation": generation}
