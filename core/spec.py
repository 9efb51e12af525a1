"""ModelSpec: the one normalised view of a GPT-Neo / GPT-NeoX config.json.

Torch-free on purpose: the runtime reads the spec back from the manifest without PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neodeploy.core.errors import ConfigError

FAMILIES = ("gpt_neo", "gpt_neox")
# Three different formulas, plus torch's tanh gelu which some derivatives name explicitly.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")
ATTENTION_KINDS = ("global", "local")
ROPE_TYPES = ("default", "linear")


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int
    activation: str
    layer_norm_eps: float
    # GPT-Neo: "global" | "local" per layer; GPT-NeoX: all "global".
    attention_layers: tuple[str, ...]
    window_size: int | None = None
    # GPT-NeoX rotary embedding; rope_scaling_factor is 1.0 unless rope_scaling_type is "linear".
    rotary_pct: float = 0.0
    rotary_base: float = 10000.0
    rope_scaling_type: str | None = None
    rope_scaling_factor: float = 1.0
    parallel_residual: bool = False
    attention_bias: bool = True
    tied_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, limit in (("num_layers", MAX_LAYERS), ("hidden_size", MAX_WIDTH), ("num_heads", MAX_WIDTH),
                            ("intermediate_size", 4 * MAX_WIDTH), ("max_positions", MAX_POSITIONS)):
            if getattr(self, name) > limit:
                raise ConfigError(f"{name} {getattr(self, name)} is beyond {limit}; fix the config")
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(f"vocab_size {self.vocab_size} is beyond {MAX_VOCAB} (an embedding that size does not fit "
                              "in memory); fix the config")
        if not (isinstance(self.layer_norm_eps, float) and math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ConfigError(f"the layer-norm epsilon must be a finite number > 0, got {self.layer_norm_eps!r}")
        if self.family == "gpt_neox" and not (math.isfinite(self.rotary_base) and self.rotary_base > 0):
            raise ConfigError(f"the rotary base (rotary_emb_base / rope_theta) must be > 0, got {self.rotary_base!r}")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size):
                raise ConfigError(f"{name} {value!r} is outside the vocabulary (0..{self.vocab_size - 1}); fix the config")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}; fix the config"
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation {self.activation!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        if len(self.attention_layers) != self.num_layers:
            raise ConfigError(
                f"{len(self.attention_layers)} attention layer kinds given for {self.num_layers} layers; "
                "attention_types must cover every layer"
            )
        bad = sorted(set(self.attention_layers) - set(ATTENTION_KINDS))
        if bad:
            raise ConfigError(f"attention kind {bad[0]!r} is not supported (supported: global, local)")
        if self.family == "gpt_neox" and "local" in self.attention_layers:
            raise ConfigError("GPT-NeoX has no local attention layers")
        if "local" in self.attention_layers and (not self.window_size or self.window_size <= 0):
            raise ConfigError("local attention layers need a positive window_size")
        if self.family == "gpt_neox":
            if not 0.0 < self.rotary_pct <= 1.0:
                raise ConfigError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
            if self.rotary_dims % 2:
                raise ConfigError(
                    f"rotary dims int({self.head_dim} * {self.rotary_pct}) = {self.rotary_dims} is odd; "
                    "rotary embeddings rotate pairs of dims"
                )
        if self.rope_scaling_type not in (None, "linear"):
            raise ConfigError(f"rope scaling {self.rope_scaling_type!r} is not supported (supported: linear)")
        if self.rope_scaling_type == "linear" and not self.rope_scaling_factor > 0:
            raise ConfigError(f"linear rope scaling needs a positive factor, got {self.rope_scaling_factor}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        # The same truncation transformers applies: int(head_dim * rotary_pct).
        return int(self.head_dim * self.rotary_pct) if self.family == "gpt_neox" else 0

    @property
    def kv_values_per_token(self) -> int:
        """Cached values per token: a key and a value of hidden_size for every layer (times the element size)."""
        return 2 * self.num_layers * self.hidden_size

    @property
    def rotary_in_kernel(self) -> bool:
        """Whether the CPU export rotates inside onnxruntime's GroupQueryAttention: its kernel takes the cos / sin
        table width rotary_dims / 2 only as a multiple of 8, and rotates only heads whose width is a multiple of 16
        (Pythia 70m..12b; not 14m or gpt-neox-20b, nor head width 24 with rotary 16, which keep rotary in the
        graph)."""
        return self.family == "gpt_neox" and self.rotary_dims // 2 % 8 == 0 and self.head_dim % 16 == 0

    def num_parameters(self) -> int:
        """Parameter count of the causal LM, counting a tied lm_head once."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        if self.family == "gpt_neo":
            attn = 3 * h * h + h * h + h
        else:
            attn = 3 * h * h + h * h + (4 * h if self.attention_bias else 0)
        per_layer = attn + 2 * h * i + i + h + 4 * h
        total = v * h + self.num_layers * per_layer + 2 * h
        if self.family == "gpt_neo":
            total += self.max_positions * h
        if not self.tied_embeddings:
            total += v * h
        return total

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_layers"] = list(self.attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown ModelSpec field {unknown[0]!r}; this spec was written by a newer neodeploy")
        d = dict(d)
        d["attention_layers"] = tuple(d.get("attention_layers", ()))
        return cls(**d)

    def replace(self, **changes: Any) -> ModelSpec:
        """dataclasses.replace that keeps the derived per-layer pattern consistent with num_layers."""
        if "vocab_size" in changes:
            # A shrunken vocabulary (tests, capacity planning) cannot keep special ids past its end.
            last = changes["vocab_size"] - 1
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                value = changes.get(key, getattr(self, key))
                if value is not None and value > last:
                    changes[key] = last
        if "num_layers" in changes and "attention_layers" not in changes:
            n = changes["num_layers"]
            pattern = self.attention_layers or ("global",)
            changes["attention_layers"] = tuple(pattern[k % len(pattern)] for k in range(n))
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------- config.json

def _expand_attention_types(types: Any) -> tuple[str, ...]:
    """GPT-Neo's `attention_types`: [[["global", "local"], 12]] -> ("global", "local", ...) * 12."""
    try:
        out: list[str] = []
        for kinds, repeat in types:
            if isinstance(repeat, bool) or not isinstance(repeat, int) or not isinstance(kinds, list):
                raise TypeError("each entry is [[kinds...], repeat count]")
            if len(out) + repeat * len(kinds) > MAX_LAYERS:  # before expanding: a huge count must not fill memory
                raise ConfigError(f"attention_types describes more than {MAX_LAYERS} layers; fix config.json")
            for _ in range(repeat):
                out.extend(str(k) for k in kinds)
        return tuple(out)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"attention_types {types!r} is not of the form [[[kinds...], repeat], ...]") from exc


def _rope_from_config(cfg: dict[str, Any]) -> tuple[float, float, str | None, float]:
    """(rotary_pct, base, scaling type, factor) from either the v4 or the v5 spelling."""
    params = cfg.get("rope_parameters")
    scaling = cfg.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"rope_scaling must be an object, got {scaling!r}")
    params = dict(params or {})
    merged = {**(scaling or {}), **params}
    pct = merged.get("partial_rotary_factor", cfg.get("rotary_pct", cfg.get("partial_rotary_factor", 0.25)))
    base = merged.get("rope_theta", cfg.get("rotary_emb_base", cfg.get("rope_theta", 10000.0)))
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in ROPE_TYPES:
        if rope_type == "dynamic":
            raise ConfigError(
                "rope scaling 'dynamic' (NTK) is not supported: its frequencies change with the sequence "
                "length at run time, which a fixed KV-cache graph cannot reproduce; use a checkpoint without it"
            )
        raise ConfigError(
            f"rope type {rope_type!r} is not supported (supported: default, linear); "
            "refusing rather than ignoring it, since it changes the model's maths"
        )
    known = {"rope_type", "type", "factor", "rope_theta", "partial_rotary_factor"}
    extra = sorted(set(merged) - known)
    if extra:
        raise ConfigError(f"rope parameter {extra[0]!r} is not supported; refusing rather than ignoring it")
    factor = merged.get("factor", 1.0)
    pct = _float({"rotary_pct": pct}, "rotary_pct", 0.25)
    base = _float({"rotary_emb_base": base}, "rotary_emb_base", 10000.0)
    if rope_type == "linear":
        if factor is None:
            raise ConfigError("linear rope scaling needs a 'factor'")
        return pct, base, "linear", _float({"factor": factor}, "factor", 1.0)
    if factor not in (None, 1, 1.0):
        raise ConfigError(f"rope 'factor' {factor} given without a scaling type; set rope_type to 'linear'")
    return pct, base, None, 1.0


MAX_VOCAB = 1 << 24  # 16.7M ids: far beyond any published vocabulary, well within int64 and memory
# Bounds far beyond any published model (gpt-neox-20b: 44 layers, 6144 hidden, 24576 intermediate), checked before
# anything is sized from them, so a hostile config cannot make us allocate terabytes.
MAX_LAYERS, MAX_WIDTH, MAX_POSITIONS = 1 << 12, 1 << 20, 1 << 24


def _type_error(name: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config.json field {name!r} must be {expected}, got {value!r}; fix config.json")


def _int(cfg: dict[str, Any], name: str, default: Any = None) -> Any:
    """An integer field, never coerced: true, 12.5 or "12" are refused rather than read as 1, 12 or 12."""
    value = cfg.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)  # 2048.0 in a hand-written config is still 2048
        raise _type_error(name, "an integer", value)
    return value


def _float(cfg: dict[str, Any], name: str, default: float) -> float:
    value = cfg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(name, "a finite number", value)
    return float(value)


def _bool(cfg: dict[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name, default)
    if not isinstance(value, bool):
        raise _type_error(name, "true or false", value)
    return value


def _str(cfg: dict[str, Any], name: str, default: str) -> str:
    value = cfg.get(name, default)
    if not isinstance(value, str):
        raise _type_error(name, "a string", value)
    return value


def _first_id(cfg: dict[str, Any], name: str) -> int | None:
    value = cfg.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _type_error(name, "a non-negative token id (or a list of them)", cfg.get(name))
    return value


def _bounded(fields: dict[str, Any]) -> dict[str, Any]:
    limits = {"num_layers": MAX_LAYERS, "num_hidden_layers": MAX_LAYERS, "hidden_size": MAX_WIDTH,
              "max_positions": MAX_POSITIONS, "vocab_size": MAX_VOCAB}
    for name, value in fields.items():
        if name in limits and isinstance(value, int) and value > limits[name]:
            raise ConfigError(f"config.json field {name!r} = {value} is beyond {limits[name]}; fix config.json")
    return fields


def _require(cfg: dict[str, Any], *names: str) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return _int(cfg, name)
    raise ConfigError(f"config.json has no {names[0]!r}; it is not a complete {cfg.get('model_type')} config")


def spec_from_config(cfg: dict[str, Any]) -> ModelSpec:
    """Normalise a Hugging Face config.json dict (transformers v4 or v5 spelling) into a ModelSpec."""
    if not isinstance(cfg, dict):
        raise ConfigError("config.json must hold a JSON object")
    if cfg.get("auto_map"):
        raise ConfigError(
            "config.json has an 'auto_map': this checkpoint needs its own Python code to run, "
            "which neodeploy never executes; use a standard GPT-Neo or GPT-NeoX checkpoint"
        )
    model_type = cfg.get("model_type")
    if model_type not in FAMILIES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; neodeploy handles 'gpt_neo' and 'gpt_neox' checkpoints"
        )
    common = dict(
        vocab_size=_require(cfg, "vocab_size"),
        hidden_size=_require(cfg, "hidden_size"),
        max_positions=_int(cfg, "max_position_embeddings", 2048),
        bos_token_id=_first_id(cfg, "bos_token_id"),
        eos_token_id=_first_id(cfg, "eos_token_id"),
        pad_token_id=_first_id(cfg, "pad_token_id"),
    )
    _bounded(common)
    if model_type == "gpt_neo":
        num_layers = _bounded({"num_layers": _require(cfg, "num_layers")})["num_layers"]
        if cfg.get("attention_types") is not None:
            layers = _expand_attention_types(cfg["attention_types"])
        elif cfg.get("attention_layers") is not None:
            layers = tuple(cfg["attention_layers"])
        else:
            layers = ("global", "local") * (num_layers // 2) + ("global",) * (num_layers % 2)
        inter = _int(cfg, "intermediate_size") or 4 * common["hidden_size"]
        return ModelSpec(
            family="gpt_neo",
            num_layers=num_layers,
            num_heads=_require(cfg, "num_heads"),
            intermediate_size=inter,
            activation=_str(cfg, "activation_function", "gelu_new"),
            layer_norm_eps=_float(cfg, "layer_norm_epsilon", 1e-5),
            attention_layers=layers,
            window_size=_int(cfg, "window_size", 256),
            tied_embeddings=_bool(cfg, "tie_word_embeddings", True),
            **common,
        )
    num_layers = _bounded({"num_hidden_layers": _require(cfg, "num_hidden_layers")})["num_hidden_layers"]
    pct, base, scaling, factor = _rope_from_config(cfg)
    return ModelSpec(
        family="gpt_neox",
        num_layers=num_layers,
        num_heads=_require(cfg, "num_attention_heads"),
        intermediate_size=_require(cfg, "intermediate_size"),
        activation=_str(cfg, "hidden_act", "gelu"),
        layer_norm_eps=_float(cfg, "layer_norm_eps", 1e-5),
        attention_layers=("global",) * num_layers,
        rotary_pct=pct,
        rotary_base=base,
        rope_scaling_type=scaling,
        rope_scaling_factor=factor,
        parallel_residual=_bool(cfg, "use_parallel_residual", True),
        attention_bias=_bool(cfg, "attention_bias", True),
        tied_embeddings=_bool(cfg, "tie_word_embeddings", False),
        **common,
    )


def load_spec(checkpoint: str | Path) -> ModelSpec:
    """Read CHECKPOINT/config.json into a ModelSpec, with one-line errors for a bad folder or file."""
    path = Path(checkpoint)
    if not path.exists():
        raise ConfigError(f"checkpoint folder {str(path)!r} does not exist; pass a Hugging Face checkpoint folder")
    if not path.is_dir():
        raise ConfigError(f"{str(path)!r} is a file, not a folder; pass the checkpoint folder that holds config.json")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{str(path)!r} has no config.json; pass a Hugging Face checkpoint folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{cfg_path} is not valid JSON ({exc}); restore the file from its source") from exc
    return spec_from_config(cfg)


def hf_config(spec: ModelSpec, dtype: str = "float32") -> dict[str, Any]:
    """A config.json that transformers v4 and v5 both load as this exact architecture."""
    base: dict[str, Any] = {
        "model_type": spec.family,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "max_position_embeddings": spec.max_positions,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "tie_word_embeddings": spec.tied_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if spec.pad_token_id is not None:
        base["pad_token_id"] = spec.pad_token_id
    if spec.family == "gpt_neo":
        # Compress the per-layer kinds back into GPT-Neo's run-length form.
        types: list[list[Any]] = []
        pattern = list(spec.attention_layers[:2]) if len(set(spec.attention_layers)) > 1 else [spec.attention_layers[0]]
        reps, rem = divmod(spec.num_layers, len(pattern))
        if tuple(pattern * reps) == spec.attention_layers and rem == 0:
            types = [[pattern, reps]]
        else:
            types = [[[kind], 1] for kind in spec.attention_layers]
        base.update(
            architectures=["GPTNeoForCausalLM"],
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            intermediate_size=spec.intermediate_size,
            activation_function=spec.activation,
            layer_norm_epsilon=spec.layer_norm_eps,
            attention_types=types,
            window_size=spec.window_size,
            embed_dropout=0.0,
            attention_dropout=0.0,
            resid_dropout=0.0,
            initializer_range=0.02,
        )
        return base
    base.update(
        architectures=["GPTNeoXForCausalLM"],
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        hidden_act=spec.activation,
        layer_norm_eps=spec.layer_norm_eps,
        rotary_pct=spec.rotary_pct,
        rotary_emb_base=spec.rotary_base,
        use_parallel_residual=spec.parallel_residual,
        attention_bias=spec.attention_bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
    )
    if spec.rope_scaling_type == "linear":
        base["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": spec.rope_scaling_factor}
    return base


# --------------------------------------------------------------------------------------------- presets

def _pythia(hidden: int, layers: int, heads: int) -> ModelSpec:
    # EleutherAI/pythia-*/config.json: vocab 50304 (6.9b: 50432, 12b: 50688), rotary_pct 0.25, base 10000, parallel residual,
    # gelu (erf), untied embed_out, bos = eos = 0.
    return ModelSpec(
        family="gpt_neox", vocab_size=50304, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=4 * hidden, max_positions=2048, activation="gelu", layer_norm_eps=1e-5,
        attention_layers=("global",) * layers, rotary_pct=0.25, rotary_base=10000.0,
        parallel_residual=True, tied_embeddings=False, bos_token_id=0, eos_token_id=0,
    )


def _gpt_neo(hidden: int, layers: int, heads: int) -> ModelSpec:
    # EleutherAI/gpt-neo-*/config.json: attention_types [[["global", "local"], layers/2]], window 256,
    # gelu_new, vocab 50257, tied lm_head, bos = eos = 50256, intermediate_size null (= 4 * hidden).
    return ModelSpec(
        family="gpt_neo", vocab_size=50257, hidden_size=hidden, num_layers=layers, num_heads=heads,
        intermediate_size=4 * hidden, max_positions=2048, activation="gelu_new", layer_norm_eps=1e-5,
        attention_layers=("global", "local") * (layers // 2), window_size=256,
        tied_embeddings=True, bos_token_id=50256, eos_token_id=50256,
    )


PRESETS: dict[str, ModelSpec] = {
    "pythia-14m": _pythia(128, 6, 4),
    "pythia-70m": _pythia(512, 6, 8),
    "pythia-160m": _pythia(768, 12, 12),
    "pythia-410m": _pythia(1024, 24, 16),
    "pythia-1b": _pythia(2048, 16, 8),
    "pythia-1.4b": _pythia(2048, 24, 16),
    "pythia-2.8b": _pythia(2560, 32, 32),
    # The two largest Pythia models pad their embeddings further (tensor-parallel training).
    "pythia-6.9b": _pythia(4096, 32, 32).replace(vocab_size=50432),
    "pythia-12b": _pythia(5120, 36, 40).replace(vocab_size=50688),
    # EleutherAI/gpt-neox-20b/config.json. Its eos_token_id is 2, but the tokenizer's <|endoftext|> is 0
    # and that is what the model emits; the tokenizer wrapper resolves EOS from the tokenizer for that reason.
    "gpt-neox-20b": _pythia(6144, 44, 64).replace(
        vocab_size=50432, activation="gelu_fast", eos_token_id=2, intermediate_size=24576
    ),
    "gpt-neo-125m": _gpt_neo(768, 12, 12),
    "gpt-neo-1.3B": _gpt_neo(2048, 24, 16),
    "gpt-neo-2.7B": _gpt_neo(2560, 32, 20),
}


def preset(name: str) -> ModelSpec:
    """A named published architecture; case-insensitive, with or without the 'EleutherAI/' prefix."""
    key = name.split("/")[-1].lower()
    for preset_name, spec in PRESETS.items():
        if preset_name.lower() == key:
            return spec
    raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def human_count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.1f}K" if n >= 1e3 else str(n)

