"""tests/tokens.py, the cross-batch token comparison: it accepts a difference only at a
near-tie of the reference logits, and fails on a wrong token where the logits have a clear
winner (what a real bug produces)."""

from __future__ import annotations

import math

import pytest
import torch
from tokens import TOL, assert_same_tokens, first_divergence

from nanorun import Engine, SamplingParams
from nanorun.request import Request
from nanorun.sampler import Sampler, seed_key, uniform

PROMPT = [5, 1, 7]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
FAILED = pytest.fail.Exception


def _fixed(row: list[float]):
    """logits_of for a row that does not depend on the prefix."""
    return lambda ids: torch.tensor(row)


def _sampled(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=4, temperature=1.0, ignore_eos=True, **kw)


def _seed_with_u_above(bound: float, position: int) -> int:
    return next(s for s in range(1000) if uniform(seed_key(s), position) > bound)


def _draw(row: list[float], params: SamplingParams, outputs: list[int]) -> int:
    """What the sampler draws from `row` for the request after `outputs`."""
    request = Request("r", tuple(PROMPT), params, 0.0, (), sampling_key=seed_key(params.seed))
    request.output_token_ids = list(outputs)
    return Sampler()(torch.tensor([row]), [request]).tokens[0]


def test_equal_sequences_and_prefixes_are_not_checked():
    fail = lambda ids: pytest.fail("no logits are needed")    # noqa: E731
    same = dict(prompt=PROMPT, params=GREEDY, logits_of=fail)
    assert first_divergence([1, 2, 3], [1, 2, 3], **same) is None
    assert first_divergence([1, 2], [1, 2, 3], **same) is None     # an aborted run's prefix
    assert assert_same_tokens([1, 2, 3], [1, 2, 3], **same) is None
    with pytest.raises(AssertionError, match="2 tokens where the reference has 3"):
        assert_same_tokens([1, 2], [1, 2, 3], **same)


def test_greedy_near_tie_is_explained_and_ends_the_comparison():
    row = [0.1, 1.0, 0.3, 1.0 - TOL / 10, -0.5]
    # Diverged at 1: what follows (3 then 0, or 4) is not compared.
    assert first_divergence([2, 3, 0], [2, 1, 4], prompt=PROMPT, params=GREEDY,
                            logits_of=_fixed(row)) == 1


@pytest.mark.parametrize("gap", [0.3, 3 * TOL])
def test_greedy_wrong_token_with_a_clear_winner_fails(gap):
    row = [0.1, 1.0, 0.3, 1.0 - gap, -0.5]
    with pytest.raises(FAILED, match=r"token 3 at position 1 where the reference has 1, and "
                                     r"that is not a near-tie.*below the top one's"):
        first_divergence([2, 3], [2, 1], prompt=PROMPT, params=GREEDY, logits_of=_fixed(row),
                         what="r0")


def test_the_reference_token_must_be_what_the_logits_give():
    row = [0.1, 1.0, 0.3, 0.2, -0.5]
    with pytest.raises(FAILED, match="reference token 3 at position 0 is not what"):
        first_divergence([1], [3], prompt=PROMPT, params=GREEDY, logits_of=_fixed(row))


def test_penalties_are_applied_as_the_sampler_applies_them():
    """Token 5 is in the prompt: repetition_penalty 2 halves its logit 1.0, so 6 (0.8) wins.
    A run that dropped the penalty would give 5: a real bug, not a tie."""
    params = SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=2.0)
    row = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.8, 0.0]
    with pytest.raises(FAILED, match="not a near-tie"):
        first_divergence([5], [6], prompt=PROMPT, params=params, logits_of=_fixed(row))
    tied = [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.5 - TOL / 10, 0.0]
    assert first_divergence([5], [6], prompt=PROMPT, params=params, logits_of=_fixed(tied)) == 0


def test_sampled_row_near_a_cdf_boundary_is_explained_and_far_from_it_fails():
    """Tokens 0-3 hold a hair less than u of the mass, so u lands at the start of 4's
    interval: 3 is a rounding away, 6 is not."""
    seed = 11
    params = _sampled(seed=seed)
    u = uniform(seed_key(seed), 0)
    below = u - 1e-6
    row = [math.log(below / 4)] * 4 + [math.log((1 - below) / 4)] * 4
    assert _draw(row, params, []) == 4
    assert first_divergence([3], [4], prompt=PROMPT, params=params, logits_of=_fixed(row)) == 0
    with pytest.raises(FAILED, match=r"not a near-tie: the logits would have to move by "
                                     r"more than .*; u = "):
        first_divergence([6], [4], prompt=PROMPT, params=params, logits_of=_fixed(row))


def test_sampled_row_whose_top_k_set_is_ambiguous_is_explained():
    """top_k 2: token 6 is within a rounding of 5 for second place; with u past token 2's
    share the draw is whichever of them is kept."""
    seed = _seed_with_u_above(0.8, 0)
    params = _sampled(seed=seed, top_k=2)
    row = [-3.0, -3.0, 1.0, -3.0, -3.0, 0.5, 0.5 - TOL / 10, -3.0]
    assert _draw(row, params, []) == 5
    assert first_divergence([6], [5], prompt=PROMPT, params=params, logits_of=_fixed(row)) == 0
    clear = [-3.0, -3.0, 1.0, -3.0, -3.0, 0.5, 0.4, -3.0]
    with pytest.raises(FAILED, match="not a near-tie"):
        first_divergence([6], [5], prompt=PROMPT, params=params, logits_of=_fixed(clear))


def test_sampled_row_at_the_top_p_edge_is_explained():
    """top_p 0.5: token 2 holds a hair more than half the mass, so it is kept alone; a hair
    less and 5 is kept too, and a u past 0.5 draws it."""
    seed = _seed_with_u_above(0.6, 0)
    params = _sampled(seed=seed, top_p=0.5)
    share = 0.5 + 1e-6
    row = [math.log(1e-9)] * 8
    row[2], row[5] = math.log(share), math.log(1 - share)
    assert _draw(row, params, []) == 2
    assert first_divergence([5], [2], prompt=PROMPT, params=params, logits_of=_fixed(row)) == 0


def test_a_sampled_request_without_a_seed_needs_its_key():
    with pytest.raises(ValueError, match="pass key="):
        first_divergence([1], [2], prompt=PROMPT, params=_sampled(), logits_of=_fixed([0.0] * 8))


# -- on a real engine --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    return Engine("tiny-llama", weights="random", kv_cache_tokens=512, max_batch_tokens=128)


def _generate(engine: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    engine.add_request("g", prompt, params)
    out = None
    while engine.has_unfinished_requests():
        out = next((o for o in engine.step() if o.finished), out)
    return out.token_ids


def test_other_batch_shapes_pass_and_a_planted_wrong_token_fails(engine):
    prompt = list(range(40, 77))
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    want = _generate(engine, prompt, params)
    chunked = Engine("tiny-llama", weights="random", kv_cache_tokens=512, max_batch_tokens=5)
    got = _generate(chunked, prompt, params)
    same = dict(prompt=prompt, params=params, logits_of=engine.prompt_logits)
    k = assert_same_tokens(got, want, **same)
    assert k is None or k < len(want)
    # A wrong token where the reference logits have a clear winner.
    logits = engine.prompt_logits(prompt + want[:-1])[len(prompt) - 1:]     # [12, V]
    top2 = logits.topk(2, dim=-1)
    gaps = top2.values[:, 0] - top2.values[:, 1]
    at = int(gaps.argmax())
    assert gaps[at] > 100 * TOL
    planted = want[:at] + [int(top2.indices[at, 1])] + want[at + 1:]
    with pytest.raises(FAILED, match=f"at position {at} where the reference has {want[at]}"):
        assert_same_tokens(planted, want, **same)


def test_a_planted_wrong_sampled_token_fails(engine):
    prompt = list(range(300, 340))
    params = SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=4, ignore_eos=True)
    want = _generate(engine, prompt, params)
    wrong = next(t for t in range(2048) if t not in want)
    same = dict(prompt=prompt, params=params, logits_of=engine.prompt_logits)
    assert assert_same_tokens(want, want, **same) is None
    with pytest.raises(FAILED, match="at position 3 where the reference has"):
        assert_same_tokens(want[:3] + [wrong] + want[4:], want, **same)
