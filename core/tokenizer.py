"""A thin wrapper over Hugging Face `tokenizers`: loading from a checkpoint or artifact folder, and
resolving eos / pad / bos ids. Torch-free: the runtime uses it in serving processes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from neodeploy.core.errors import TokenizerError, UsageError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file for a template kept apart from tokenizer_config
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
                   CHAT_TEMPLATE_FILE)
# `--chat-template chatml`: ChatML turns (<|im_start|>role ... <|im_end|>), tools listed in a system turn and calls
# written <tool_call>{...}</tool_call> (the Hermes / Qwen convention serve/tools.py reads back).
CHATML = """{%- if tools %}<|im_start|>system
You can call one of these functions. To call one, reply with only <tool_call>{"name": <function name>, \
"arguments": <arguments object>}</tool_call>.
{% for tool in tools %}{{ tool.function | tojson }}
{% endfor %}<|im_end|>
{% endif %}
{%- for message in messages %}<|im_start|>{{ message.role }}
{% if message.content is not none %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}<tool_call>{"name": {{ call.function.name | tojson }}, \
"arguments": {{ call.function.arguments | tojson }}}</tool_call>{% endfor %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def chat_template_source(folder: Path) -> str | None:
    """Where a folder's chat template is: its chat_template.jinja, else tokenizer_config.json's chat_template (the
    "default" one of transformers' named templates), else None."""
    return CHAT_TEMPLATE_FILE if (Path(folder) / CHAT_TEMPLATE_FILE).is_file() else \
        ("tokenizer_config.json" if _config_template(Path(folder)) else None)


def read_chat_template(folder: Path) -> str | None:
    folder = Path(folder)
    if (folder / CHAT_TEMPLATE_FILE).is_file():
        return (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    return _config_template(folder)


def _config_template(folder: Path) -> str | None:
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):  # transformers' named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def chat_template_option(value: str) -> str:
    """The text of `--chat-template FILE|chatml`."""
    if value == "chatml":
        return CHATML
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"--chat-template {value!r} is neither a file nor 'chatml'; give a Jinja template file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --chat-template {value}: {exc}") from exc
    if not text.strip():
        raise UsageError(f"--chat-template {value} is empty")
    return text
EOT = "<|endoftext|>"
PADDING = "<|padding|>"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}); restore it from its source") from exc
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


class Tokenizer:
    """Text <-> token ids, plus the special ids generation needs."""

    def __init__(self, tokenizer: Any, eos_token_id: int | None, pad_token_id: int | None, bos_token_id: int | None):
        self.backend = tokenizer
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id if pad_token_id is not None else eos_token_id
        self.bos_token_id = bos_token_id

    @classmethod
    def from_dir(cls, folder: str | Path) -> Tokenizer:
        """Load tokenizer.json, or vocab.json + merges.txt (GPT-2 style byte-level BPE), from a folder."""
        from tokenizers import Tokenizer as HFTokenizer

        folder = Path(folder)
        try:
            if (folder / "tokenizer.json").is_file():
                tk = HFTokenizer.from_file(str(folder / "tokenizer.json"))
            elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                tk = _byte_level_bpe(folder / "vocab.json", folder / "merges.txt")
            else:
                raise TokenizerError(
                    f"{folder} has no tokenizer (tokenizer.json, or vocab.json + merges.txt); "
                    "copy the model's tokenizer files into it"
                )
        except TokenizerError:
            raise
        except Exception as exc:  # tokenizers raises plain Exceptions for malformed files
            raise TokenizerError(f"cannot read the tokenizer in {folder}: {str(exc).splitlines()[0]}") from exc
        return cls(tk, *resolve_special_ids(tk, folder))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # tokenizers' own error for it is a TypeError about its types
            raise UsageError(f"the prompt is not valid text (a lone surrogate, or a byte that is not UTF-8, at "
                             f"character {exc.start}); pass UTF-8 text") from exc
        # encode_batch releases the GIL and encode does not: a long prompt tokenised in a worker thread (the server
        # does) leaves the other threads, the event loop among them, running (3 MB: 2.7 s frozen vs none).
        return list(self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters in the vocabulary's longest entry: no token decodes to more (byte-level entries spell one
        byte per character), so a text of N characters has at least N / longest_token tokens."""
        return max((len(t) for t in self.backend.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def _byte_level_bpe(vocab: Path, merges: Path) -> Any:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    # GPT-2's files: byte-level BPE, no prefix space, <|endoftext|> special. The BPE reader skips the
    # "#version ..." header line whatever follows it on that line.
    tk = HFTokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if tk.token_to_id(EOT) is not None:
        tk.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tk


def resolve_special_ids(tk: Any, folder: Path) -> tuple[int | None, int | None, int | None]:
    """(eos, pad, bos): the tokenizer's own special tokens first, then config.json.

    The tokenizer wins because some configs are wrong in practice: gpt-neox-20b's config says eos 2 while
    its <|endoftext|> (what the model emits) is 0.
    """
    names: dict[str, str] = {}
    for meta in ("special_tokens_map.json", "tokenizer_config.json"):
        data = _read_json(folder / meta)
        for key in ("eos_token", "pad_token", "bos_token"):
            content = _token_content(data.get(key))
            if content is not None:
                names.setdefault(key, content)
    config = _read_json(folder / "config.json")

    def lookup(token: str | None) -> int | None:
        return tk.token_to_id(token) if token else None

    def first(*candidates: int | None) -> int | None:
        return next((c for c in candidates if c is not None), None)

    eos = first(lookup(names.get("eos_token")), lookup(EOT), _config_id(config.get("eos_token_id")))
    bos = first(lookup(names.get("bos_token")), _config_id(config.get("bos_token_id")), lookup(EOT))
    pad = first(lookup(names.get("pad_token")), lookup(PADDING), _config_id(config.get("pad_token_id")), eos)
    return eos, pad, bos


def _byte_chars() -> list[str]:
    """The byte-level alphabet in byte order (GPT-2's bytes_to_unicode): printable bytes stand for themselves,
    the rest map to code points from 256 up. ByteLevel.alphabet() has no stable order, so we rebuild it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def builtin_byte_tokenizer(eos_token_id: int | None, vocab_size: int) -> Any | None:
    """A byte-level tokenizer (one token per byte + <|endoftext|>) for checkpoints made without real tokenizer
    files, so the offline demo can run on text. None when the vocabulary is too small to hold it."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    eos = eos_token_id if eos_token_id is not None else vocab_size - 1
    if vocab_size < 257 or not 0 <= eos < vocab_size:
        return None
    free = (i for i in range(vocab_size) if i != eos)
    vocab = {char: next(free) for char in _byte_chars()}
    vocab[EOT] = eos
    tk = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    return tk


def tokenizer_json(tk: Any, pretty: bool = False) -> str:
    """The tokenizer's JSON (`tokenizers.Tokenizer.to_str()`), without the library's "holes" warning.

    A vocabulary with unused ids (the built-in byte tokenizer at a GPT-Neo-sized vocabulary: bytes at 0-255,
    <|endoftext|> at 50256) makes the Rust library print "The OrderedVocab you are attempting to save contains
    holes for indices [256, 257, ...]" on standard output, once per call: ~340 KB. The holes are by design (ids
    the byte tokenizer never produces decode to nothing), so only that case runs with file descriptor 1 pointed
    at /dev/null; any other tokenizer is serialised untouched."""
    vocab = tk.get_vocab(with_added_tokens=True)
    if len(vocab) == max(vocab.values(), default=-1) + 1:
        return tk.to_str(pretty)
    with _fd_silenced(1):
        return tk.to_str(pretty)


@contextlib.contextmanager
def _fd_silenced(fd: int):
    """A file descriptor to /dev/null for a moment: the warning comes from Rust's println!, not from Python."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def write_tokenizer_files(dest: Path, spec: Any, tokenizer_dir: str | Path | None) -> bool:
    """Copy a tokenizer's files into dest, or write the built-in byte tokenizer. True when dest has one."""
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        if not src.is_dir():
            raise TokenizerError(f"tokenizer folder {src} does not exist")
        tokenizer = Tokenizer.from_dir(src)
        if tokenizer.vocab_size > spec.vocab_size:
            raise TokenizerError(
                f"the tokenizer in {src} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
                f"{spec.vocab_size}; use a larger --vocab or the model's own tokenizer"
            )
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, dest / name)
        return True
    tk = builtin_byte_tokenizer(spec.eos_token_id, spec.vocab_size)
    if tk is None:
        return False
    (dest / "tokenizer.json").write_text(tokenizer_json(tk, pretty=True), encoding="utf-8")
    (dest / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": EOT, "bos_token": EOT, "model_max_length": spec.max_positions,
                    "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n"
    )
    return True
