"""Speculative decoding is exact: with prompt lookup or a draft model, greedy and seeded sampled outputs are token for
token the ones plain decoding gives, on both families and both graph kinds (the portable graph's logits at every
position; the CPU target's in-place cache rolled back and its num_logits tail), alone and in the engine; the
rejection rule keeps the sampling distribution (checked on scripted logits); a drafter that is never right costs a
bounded number of wide calls; and what cannot speculate is refused in one line."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import cli, tiny_neo, tiny_neox
from neodeploy.core.errors import UsageError
from neodeploy.runtime import load
from neodeploy.runtime.batch import DecodeBatch
from neodeploy.runtime.check import run_engine_check
from neodeploy.runtime.engine import Engine, EngineConfig, EngineObserver
from neodeploy.runtime.sampling import SamplingParams
from neodeploy.runtime.sequence import Sequence
from neodeploy.runtime.speculate import MAX_REST, NgramDrafter, Speculator, shared_vocabulary

FAMILIES = {"gpt_neox": tiny_neox, "gpt_neo": tiny_neo}
KINDS = [("gpt_neox", "portable"), ("gpt_neox", "cpu"), ("gpt_neo", "portable"), ("gpt_neo", "cpu")]


@pytest.fixture(scope="module", params=KINDS, ids=lambda p: "-".join(p))
def artifact(request, exported):
    family, target = request.param
    return exported(f"prefix-{family}", FAMILIES[family](), target=target)[1]  # the prefix tests' exports


def _repetitive_prompts(seed=0, count=5):
    """Prompts that quote themselves (a phrase three times, then its start), so prompt lookup has drafts to offer."""
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        phrase = rng.integers(1, 300, int(rng.integers(5, 14))).tolist()
        prompts.append(phrase * 3 + phrase[:2])
    return prompts


def _params(i):
    return SamplingParams(max_new_tokens=24 + i % 7, temperature=0.0 if i % 2 == 0 else 0.9, seed=i, top_k=0 if i % 4 else 40)


def test_prompt_lookup_gives_plain_decodings_tokens_greedy_and_sampled(artifact):
    plain, fast = load(artifact), load(artifact, speculate="ngram", speculate_tokens=3)
    for i, prompt in enumerate(_repetitive_prompts()):
        want, got = plain.generate(prompt, _params(i))[0], fast.generate(prompt, _params(i))[0]
        assert got.output_ids == want.output_ids and got.finish_reason == want.finish_reason, i
        stream = fast.stream(prompt, _params(i))
        assert "".join(stream) == want.text and stream.generation.output_ids == want.output_ids
    # The engine: alone it speculates; several at once decode as a batch, and the last one left speculates again.
    observer = _Counting()
    engine = Engine(plain, EngineConfig(max_running=3, speculate="ngram", speculate_tokens=3), observer)
    try:
        prompts = _repetitive_prompts(seed=1)
        for i, prompt in enumerate(prompts):
            assert engine.generate(prompt, _params(i)).output_ids == plain.generate(prompt, _params(i))[0].output_ids
        handles = [engine.submit(p, _params(i)) for i, p in enumerate(prompts)]
        for i, (prompt, handle) in enumerate(zip(prompts, handles)):
            assert handle.result(60).output_ids == plain.generate(prompt, _params(i))[0].output_ids
        stats = engine.speculator.stats
        assert stats.drafted > stats.accepted > 0  # drafts were offered and some taken (or this proves nothing)
        assert (observer.drafted, observer.accepted) == (stats.drafted, stats.accepted)
        assert run_engine_check(plain, engine) == []  # the serve gate runs the golden prompts through it, alone
    finally:
        engine.close()


@pytest.fixture(scope="module", params=[("gpt_neox", "cpu"), ("gpt_neo", "portable")], ids=lambda p: "-".join(p))
def pair(request, exported):
    """A target and a one-layer draft of the same family, sharing the built-in tokenizer (different weights)."""
    family, target = request.param
    make = FAMILIES[family]
    big = exported(f"prefix-{family}", make(), target=target)[1]
    small = exported(f"draft-{family}", make(num_layers=1), target="portable")[1]
    return big, small


def test_a_draft_model_gives_plain_decodings_tokens(pair):
    big, small = pair
    plain = load(big)
    for draft, tokens in ((small, 4), (big, 5)):  # a weak draft (some accepted) and the target as its own (all)
        fast = load(big, speculate=str(draft), speculate_tokens=tokens)
        engine = Engine(plain, EngineConfig(max_running=1, speculate=str(draft), speculate_tokens=tokens))
        try:
            for i, prompt in enumerate(_repetitive_prompts(seed=2, count=4)):
                want = plain.generate(prompt, _params(i))[0].output_ids
                assert fast.generate(prompt, _params(i))[0].output_ids == want, (draft, i)
                assert engine.generate(prompt, _params(i)).output_ids == want, (draft, i)
            stats = engine.speculator.stats
            assert stats.drafted > 0  # (random weights: the one-layer draft rarely agrees, and need not)
            if draft == big:  # its own draft: a greedy step takes its drafts. The request bans ids 257..319 (the
                # random embedding's padding rows), which a draft may never propose. One step, not the engine's
                # clock-driven choice of when to try.
                prompt = _repetitive_prompts(seed=4, count=1)[0]
                banned = {i: -100.0 for i in range(257, 320)}
                sequence = plain.sequence(prompt, SamplingParams(max_new_tokens=30, logit_bias=banned))
                batch = DecodeBatch(plain.backend)
                sequence.feed(batch.prefill([prompt], plain.pad_token_id, capacity=len(prompt) + 30)[0])
                _, drafted, accepted = plain.speculation(str(big), tokens)().step(batch, sequence)
                assert drafted == tokens and accepted >= tokens - 1  # (rounding may flip a near tie)
        finally:
            engine.close()


def test_a_draft_with_another_tokenizer_or_a_last_only_graph_is_refused(pair, exported):
    big, small = pair
    other = load(small)
    assert shared_vocabulary(load(big), other) == 257  # the byte tokenizer's ids; 257..319 pad the embedding
    other.manifest.files["tokenizer.json"] = "0" * 64  # as if its tokenizer.json differed
    with pytest.raises(UsageError, match="does not share"):
        shared_vocabulary(load(big), other)
    last = exported("prefix-gpt_neox", tiny_neox(), logits="last")[1]
    with pytest.raises(UsageError, match="last-position logits only"):
        load(last, speculate="ngram")
    with pytest.raises(UsageError, match="--speculate-tokens"):
        EngineConfig(speculate="ngram", speculate_tokens=0)


# ----------------------------------------------------------------------------------------- scripted logits


class _Batch:
    """A batch-1 stand-in whose verification returns the same scripted logits row at every position, costing
    `cost` seconds on a fake clock."""

    def __init__(self, row, cost=1.5):
        self.row, self.cost, self.calls, self.rolled, self.now = row, cost, 0, 0, 0.0

    def clock(self):
        return self.now

    def verify(self, tokens):
        self.calls += 1
        self.now += self.cost
        return np.tile(self.row, (len(tokens), 1))

    def rollback(self, count):
        self.rolled += count


class _Fixed:
    def __init__(self, draft):
        self.draft_tokens = draft

    def draft(self, context, k):
        return self.draft_tokens[:k]


def _sequence(params, vocab=6):
    class Tok:  # text is not the point here: every token decodes to one letter
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=False):
            return "".join(chr(97 + i) for i in ids)

    return Sequence([1, 2], params, Tok(), set(), [], None)


def test_the_rejection_rule_keeps_the_sampling_distribution():
    """A draft that proposes token 3: the first output token is still distributed as softmax(logits / T), and with
    the same seed it is the token plain sampling draws (same uniform, same order)."""
    logits = np.log(np.array([0.05, 0.1, 0.15, 0.4, 0.2, 0.1], np.float32))
    counts = np.zeros(6)
    draws = 4000
    for seed in range(draws):
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed)
        spec, plain = _sequence(params), _sequence(params)
        deltas, drafted, accepted = Speculator(_Fixed([3, 3, 3]), 3).step(_Batch(logits), spec)
        assert [d.token for d in deltas] == [plain.feed(logits).token for _ in deltas]
        matched = 0
        for delta in deltas[:3]:
            if delta.token != 3:
                break
            matched += 1
        assert (drafted, accepted) == (3, matched) and len(deltas) == matched + 1
        counts[deltas[0].token] += 1
    expected = np.exp(logits) / np.exp(logits).sum() * draws
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001


def _decode(speculator, batch, sequence, logits, steps=500, plain_seconds=1.0):
    """The caller's loop: a speculative step where the speculator takes one, else a plain step it reports."""
    for _ in range(steps):
        if speculator.step(batch, sequence) is None:
            sequence.feed(logits)
            batch.now += plain_seconds
            speculator.plain_step(plain_seconds)


def test_a_drafter_that_is_never_right_rests_between_tries():
    logits = np.zeros(6, np.float32)
    logits[0] = 10.0  # greedy always picks 0; the drafter always says 5
    batch = _Batch(logits)
    speculator = Speculator(_Fixed([5, 5, 5, 5]), 4, clock=batch.clock)
    _decode(speculator, batch, _sequence(SamplingParams(max_new_tokens=1000)), logits)
    # One token in 1.5 s against 1 a second plainly: tries at 0, 2, 5, 10, 19, 36, 69, then one in 65 steps.
    assert batch.calls <= 7 + (500 - 69) // (MAX_REST + 1) + 1
    assert batch.rolled == 4 * batch.calls  # every drafted token forgotten
    assert speculator.stats.accepted == 0 and speculator.stats.drafted == 4 * batch.calls


def test_speculation_rests_when_it_accepts_too_little_for_its_cost_and_not_when_it_pays():
    logits = np.zeros(6, np.float32)
    logits[0] = 10.0
    # One of four drafts taken (two tokens a step) but a step costs 2.5 plain steps (a costly draft model): it rests.
    batch = _Batch(logits, cost=2.5)
    speculator = Speculator(_Fixed([0, 5, 5, 5]), 4, clock=batch.clock)
    _decode(speculator, batch, _sequence(SamplingParams(max_new_tokens=1000)), logits)
    assert 0 < batch.calls <= 15 and speculator.stats.accepted == batch.calls
    # Every draft taken (five tokens for 1.5 plain steps' time): it speculates on every step but the one that measures.
    batch = _Batch(logits)
    speculator = Speculator(_Fixed([0, 0, 0, 0]), 4, clock=batch.clock)
    sequence = _sequence(SamplingParams(max_new_tokens=1000))
    _decode(speculator, batch, sequence, logits, steps=100)
    assert batch.calls >= 99 and speculator.stats.rate == 1.0


def test_prompt_lookup_drafts_the_continuation_of_the_latest_longest_match():
    drafter = NgramDrafter(longest=3, shortest=2)
    assert drafter.draft([1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 1, 2, 3], 3) == [7, 7, 1]  # the later of two matches
    assert drafter.draft([5, 1, 2, 8, 4, 1, 2], 2) == [8, 4]  # a 2-gram where no 3-gram matches
    assert drafter.draft([1, 2, 3, 4], 4) == []  # nothing repeats
    assert drafter.draft([4, 4], 2) == []  # too short for a 2-gram with a continuation


def test_the_cli_speculates_and_refuses_a_bad_count(exported):
    art = exported("prefix-gpt_neox", tiny_neox(), target="cpu")[1]
    prompt = " ".join(str(t) for t in _repetitive_prompts(seed=3, count=1)[0])

    def generate(*flags):
        return cli("generate", art, prompt, "--ids", "--max-new-tokens", 20, *flags, timeout=120)

    plain, fast = generate(), generate("--speculate", "ngram", "--speculate-tokens", "3")
    assert plain.returncode == fast.returncode == 0 and fast.stdout == plain.stdout and plain.stdout.strip()
    bad = generate("--speculate", "ngram", "--speculate-tokens", "99")
    assert bad.returncode == 2 and "--speculate-tokens must be an integer from 1 to 16" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


class _Counting(EngineObserver):
    def __init__(self):
        self.drafted = self.accepted = 0

    def speculated(self, drafted, accepted):
        self.drafted += drafted
        self.accepted += accepted
