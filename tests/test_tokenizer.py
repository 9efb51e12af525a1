"""The tokenizer wrapper on the real GPT-NeoX-20B and GPT-2 tokenizers (known encodings from shared/data)."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_neo, tiny_neox, tokenizer_dir
from neodeploy.core.errors import TokenizerError
from neodeploy.core.tokenizer import Tokenizer, builtin_byte_tokenizer

TEXT = "Hello world, naïve café — 東京 🚀 <|endoftext|>"


def test_gpt_neox_20b_tokenizer_known_encodings():
    tok = Tokenizer.from_dir(tokenizer_dir("gpt-neox-20b"))
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.encode(" Hello world") == [24387, 1533]
    assert tok.encode("<|endoftext|>hi") == [0, 5801]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (0, 1, 0)
    assert tok.vocab_size == 50277


@pytest.mark.parametrize("files", [("tokenizer.json",), ("vocab.json", "merges.txt")], ids=["json", "vocab+merges"])
def test_gpt2_tokenizer_from_either_file_set(files, tmp_path):
    for name in files:
        shutil.copy(tokenizer_dir("gpt2") / name, tmp_path / name)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" Hello world") == [18435, 995]
    assert tok.encode("<|endoftext|>hi") == [50256, 5303]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == (50256, 50256, 50256)


def test_tokenizer_eos_beats_a_wrong_config(tmp_path):
    """gpt-neox-20b's config says eos 2; the tokenizer's <|endoftext|> (0) is what the model emits."""
    shutil.copy(tokenizer_dir("gpt-neox-20b") / "tokenizer.json", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "bos_token_id": 0}))
    assert Tokenizer.from_dir(tmp_path).eos_token_id == 0
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|padding|>"}}))
    assert Tokenizer.from_dir(tmp_path).eos_token_id == 1


def test_make_checkpoint_copies_a_real_tokenizer(make):
    path = make(tiny_neox(vocab_size=50304), tokenizer_dir=tokenizer_dir("gpt-neox-20b"))
    assert Tokenizer.from_dir(path).encode("Hello world") == [12092, 1533]
    with pytest.raises(TokenizerError, match="has 50257 tokens but the model's vocabulary is 320"):
        make(tiny_neo(), "small", tokenizer_dir=tokenizer_dir("gpt2"))


@pytest.mark.parametrize("spec", [tiny_neox(), tiny_neo(vocab_size=50257)], ids=["eos0", "eos50256"])
def test_builtin_byte_tokenizer_round_trips_and_keeps_eos(spec, make):
    path = make(spec)
    tok = Tokenizer.from_dir(path)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert ids[-1] == spec.eos_token_id == tok.eos_token_id
    assert all(0 <= i < spec.vocab_size for i in ids)
    assert len(set(ids[:-1])) > 10 and spec.eos_token_id not in ids[:-1]
    assert builtin_byte_tokenizer(0, 200) is None
    # Byte order, shifted past eos: stable across processes (ByteLevel.alphabet() alone is unordered).
    offset = 1 if spec.eos_token_id == 0 else 0
    assert tok.encode("Hi é") == [72 + offset, 105 + offset, 32 + offset, 0xC3 + offset, 0xA9 + offset]


def test_missing_or_broken_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="has no tokenizer"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{ broken")
    with pytest.raises(TokenizerError, match="cannot read the tokenizer"):
        Tokenizer.from_dir(tmp_path)
