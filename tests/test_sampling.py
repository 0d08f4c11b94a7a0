"""The batched sampler against a plain per-row reference: penalties, min_p, top_k, top_p,
temperature as vLLM defines them, the distribution it draws from (chi-square over many seeds),
rows independent of their neighbours, min_tokens, prompt logprobs under chunking; and every
new SamplingParams field refusing bad values."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokens import assert_same_logprobs, assert_same_tokens

from nanorun import LLM, SamplingParams
from nanorun.request import Request
from nanorun.sampler import Sampler, apply_penalties, seed_key

V = 12
EOS = (V - 1,)


def request(sp: SamplingParams, prompt=(1, 2, 3), outputs=(), key: int | None = None) -> Request:
    r = Request("r", tuple(prompt), sp, 0.0, EOS,
                sampling_key=seed_key(sp.seed or 0) if key is None else key)
    r.output_token_ids = list(outputs)
    return r


# ---- the plain reference: one row at a time, python loops ---------------------------------------
def ref_penalties(row: list[float], sp: SamplingParams, prompt, outputs) -> list[float]:
    z = list(row)
    for t in set(prompt) | set(outputs):
        z[t] = z[t] / sp.repetition_penalty if z[t] > 0 else z[t] * sp.repetition_penalty
    for t in set(outputs):
        z[t] -= sp.frequency_penalty * list(outputs).count(t) + sp.presence_penalty
    return z


def ref_probs(row: list[float], sp: SamplingParams, prompt=(1, 2, 3), outputs=()) -> list[float]:
    """The distribution a row is drawn from."""
    z = ref_penalties(row, sp, prompt, outputs)
    if sp.greedy:
        return [1.0 if i == max(range(V), key=z.__getitem__) else 0.0 for i in range(V)]
    z = [v / sp.temperature for v in z]
    m = max(z)
    p = [math.exp(v - m) for v in z]
    p = [v / sum(p) for v in p]
    if sp.min_p > 0:
        p = [v if v >= sp.min_p * max(p) else 0.0 for v in p]
    order = sorted(range(V), key=lambda i: -p[i])
    if 0 < sp.top_k < V:
        for i in order[sp.top_k:]:
            p[i] = 0.0
    p = [v / sum(p) for v in p]
    if sp.top_p < 1.0:
        mass = 0.0
        for i in order:
            keep = mass < sp.top_p
            mass += p[i]
            if not keep:
                p[i] = 0.0
    return [v / sum(p) for v in p]


CONFIGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=4),
    SamplingParams(temperature=1.3, top_p=0.6),
    SamplingParams(temperature=1.0, min_p=0.15),
    SamplingParams(temperature=1.5, top_k=8, top_p=0.95, min_p=0.02, repetition_penalty=1.3,
                   presence_penalty=0.5, frequency_penalty=0.4),
]
OUTPUTS = (4, 4, 5, 0, 9)


def logits_row(seed: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


def test_penalties_match_the_per_row_reference():
    rng = random.Random(0)
    reqs, rows = [], []
    for i in range(8):
        sp = SamplingParams(repetition_penalty=rng.choice([1.0, 0.7, 1.8]),
                            presence_penalty=rng.uniform(-2, 2),
                            frequency_penalty=rng.choice([0.0, rng.uniform(-2, 2)]))
        prompt = [rng.randrange(V) for _ in range(rng.randrange(1, 6))]
        outputs = [rng.randrange(V) for _ in range(rng.randrange(0, 8))]
        reqs.append(request(sp, prompt, outputs))
        rows.append(logits_row(i))
    got = apply_penalties(torch.stack(rows), reqs)
    for i, r in enumerate(reqs):
        want = ref_penalties(rows[i].tolist(), r.sampling_params, r.prompt_token_ids,
                             r.output_token_ids)
        assert got[i].tolist() == pytest.approx(want, abs=1e-5)


def test_greedy_rows_take_the_argmax_after_penalties():
    sp = SamplingParams(temperature=0, repetition_penalty=3.0, frequency_penalty=2.0)
    rows = [logits_row(i) for i in range(6)]
    reqs = [request(sp, outputs=[int(row.argmax())] * 2) for row in rows]   # penalise the top
    tokens = Sampler()(torch.stack(rows), reqs).tokens
    for row, r, t in zip(rows, reqs, tokens):
        z = ref_penalties(row.tolist(), sp, r.prompt_token_ids, r.output_token_ids)
        assert t == max(range(V), key=z.__getitem__) != int(row.argmax())


def _chi_square_limit(dof: int, z: float = 3.29) -> float:
    """Wilson-Hilferty's chi-square quantile (z = 3.29: p = 0.9995)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def _chi_square(counts: list[int], probs: list[float]) -> tuple[float, int]:
    n = sum(counts)
    for c, p in zip(counts, probs):
        assert p > 0 or c == 0, "drew a token the reference filters out"
    cells = [(c, n * p) for c, p in zip(counts, probs) if p > 0]
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


@pytest.mark.parametrize("config", range(len(CONFIGS)))
def test_batched_draws_follow_the_reference_distribution(config):
    """4000 rows of the same logits, each its own seed: the batch's histogram is the
    reference's distribution (a fixed set of seeds: the test is deterministic)."""
    sp, n = CONFIGS[config], 4000
    row = logits_row(100 + config)
    probs = ref_probs(row.tolist(), sp, outputs=OUTPUTS)
    reqs = [request(sp, outputs=OUTPUTS, key=seed_key(s)) for s in range(n)]
    out = Sampler()(row.expand(n, V).contiguous(), reqs)
    assert not out.errors
    counts = [out.tokens.count(t) for t in range(V)]
    stat, dof = _chi_square(counts, probs)
    assert dof >= 1 and stat < _chi_square_limit(dof), (counts, probs)


def test_a_broken_sampler_fails_the_distribution_test():
    """The chi-square test can fail: off-by-one temperature is caught."""
    sp, n = CONFIGS[0], 4000
    row = logits_row(100)
    reqs = [request(SamplingParams(temperature=1.6), key=seed_key(s)) for s in range(n)]
    tokens = Sampler()(row.expand(n, V).contiguous(), reqs).tokens
    stat, dof = _chi_square([tokens.count(t) for t in range(V)], ref_probs(row.tolist(), sp))
    assert stat > _chi_square_limit(dof)


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0, top_p=0.9, seed=42),
                                SamplingParams(temperature=1.0, seed=42)])  # no filter by rank
def test_seeded_rows_do_not_depend_on_their_neighbours(sp):
    row = logits_row(7)
    alone = Sampler()(row[None], [request(sp)]).tokens[0]
    rng = random.Random(1)
    for trial in range(20):
        others = [request(rng.choice(CONFIGS + [SamplingParams(temperature=0)]),
                          key=rng.getrandbits(64)) for _ in range(rng.randrange(1, 9))]
        at = rng.randrange(len(others) + 1)
        reqs = others[:at] + [request(sp)] + others[at:]
        rows = [logits_row(1000 + trial * 10 + i) for i in range(len(reqs))]
        rows[at] = row
        assert Sampler()(torch.stack(rows), reqs).tokens[at] == alone


@pytest.mark.parametrize("sp", [SamplingParams(temperature=1.0, top_p=0.9),
                                SamplingParams(temperature=0.8, top_k=50),
                                SamplingParams(temperature=1.0, min_p=0.01)])
def test_near_tied_tokens_moved_by_a_rounding_draw_the_same_token(sp):
    """Two tokens tie to 5e-7 at the top, as the same request's logits can differ by with what
    it is batched with (the GEMMs' reduction order); moving them by 1e-6 swaps their rank.
    The draw must not care: a rounding moves a boundary of the CDF by about its own size, so
    not one of 400 seeds draws another token. (Drawn in rank order, the two tokens swapped
    their intervals of [0, 1): 77 of the 400 seeds drew the other one under top_p, 248 under
    top_k.)"""
    z = torch.randn(1000, generator=torch.Generator().manual_seed(5))
    z[10], z[700] = 5.0, 5.0 + 5e-7
    moved = z.clone()
    moved[10] += 1e-6
    assert (z[700] > z[10]) and (moved[10] > moved[700])       # the rank order swaps
    reqs = [request(sp, key=seed_key(s)) for s in range(400)]
    a = Sampler()(z.expand(400, -1).contiguous(), reqs).tokens
    b = Sampler()(moved.expand(400, -1).contiguous(), reqs).tokens
    assert {10, 700} <= set(a)                                  # both are drawn often
    assert a == b


def test_neighbouring_rows_are_statistically_independent():
    """Rows i and i + 1 of a batch, over 3000 seeds: the contingency table of their tokens
    passes a chi-square test of independence."""
    sp, n = SamplingParams(temperature=1.0), 3000
    row = torch.tensor([0.0, 0.3, 0.6, 0.9])
    reqs = [request(sp, key=seed_key(s)) for s in range(2 * n)]
    tokens = Sampler()(row.expand(2 * n, 4).contiguous(), reqs).tokens
    pairs = list(zip(tokens[0::2], tokens[1::2]))
    a = [sum(p[0] == i for p in pairs) for i in range(4)]
    b = [sum(p[1] == j for p in pairs) for j in range(4)]
    stat = sum((sum(p == (i, j) for p in pairs) - a[i] * b[j] / n) ** 2 / (a[i] * b[j] / n)
               for i in range(4) for j in range(4))
    assert stat < _chi_square_limit(9)


def test_draws_depend_on_the_position_not_on_state():
    """The same request at the same output position draws the same token (preemption and
    recompute), and a different position draws anew."""
    sp = SamplingParams(temperature=1.0, seed=3)
    row = torch.zeros(1, 1000)
    first = Sampler()(row, [request(sp, outputs=[5, 6])]).tokens
    assert Sampler()(row, [request(sp, outputs=[5, 6])]).tokens == first
    later = {Sampler()(row, [request(sp, outputs=[5] * k)]).tokens[0] for k in range(10)}
    assert len(later) > 5


def test_min_tokens_masks_eos_and_stop_ids():
    row = torch.zeros(1, V)
    row[0, EOS[0]], row[0, 3] = 10.0, 9.0
    sp = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3], max_tokens=5)
    early = request(sp, outputs=[0])
    assert Sampler()(row, [early]).tokens[0] not in (EOS[0], 3)
    assert Sampler()(row, [request(sp, outputs=[0, 1])]).tokens == [EOS[0]]


# ---- through the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 2048, (37,), generator=torch.Generator().manual_seed(0)).tolist()


def test_prompt_logprobs_do_not_depend_on_chunking_or_preemption(prompt):
    sp = SamplingParams(max_tokens=20, temperature=0.8, seed=9, prompt_logprobs=2, logprobs=1,
                        ignore_eos=True)
    reference = LLM("tiny-llama", max_batch_tokens=512, kv_cache_tokens=2048)
    whole = reference.generate([prompt], sp)[0]
    llm = LLM("tiny-llama", max_batch_tokens=8, kv_cache_tokens=64, page_size=16)
    outs = llm.generate([prompt, prompt[:20]], sp)       # two can't fit: preemption
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    # Chunks of 8 are not one chunk of 37: up to a near-tie of the logits (tests/tokens.py).
    assert_same_tokens(outs[0].token_ids, whole.token_ids, prompt=prompt, params=sp,
                       logits_of=reference.engine.prompt_logits)
    assert len(outs[0].prompt_logprobs) == len(prompt)
    for a, b in zip(outs[0].prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert_same_logprobs(a, b, what="prompt logprobs")



@pytest.mark.parametrize("layout", ["sequential", "overlap"])
@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_prompt_logprobs_beside_sampling_requests_equal_the_solo_run(prompt, layout,
                                                                      async_scheduling):
    """A prompt chunked beside requests that sample (decoding, and a 1-token prompt that
    samples at once) reads its logprobs from its own rows of the iteration's logits. They
    were read one row off when another request's sampled token was still pending: the rows
    must be the ones the iteration was launched with."""
    llm = LLM("tiny-llama", max_batch_tokens=16, layout=layout,
              async_scheduling=async_scheduling)
    want = SamplingParams(max_tokens=1, prompt_logprobs=1)
    solo = llm.generate([prompt], want)[0].prompt_logprobs
    mates = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
             SamplingParams(temperature=0.8, seed=1, max_tokens=6, ignore_eos=True)]
    outs = llm.generate([prompt[:6], [4], prompt], mates + [want])
    mixed = outs[2].prompt_logprobs
    assert len(mixed) == len(solo) == len(prompt) and mixed[0] is None
    for position, (a, b) in enumerate(zip(mixed[1:], solo[1:]), start=1):
        # other batches: the top token may be another one of a near-tie (tests/tokens.py)
        assert_same_logprobs(a, b, what=f"position {position}")

# ---- SamplingParams ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, error, match", [
    ({"n": 0}, ValueError, "n must be"), ({"n": 1.0}, TypeError, "n must be an int"),
    ({"n": True}, TypeError, "n must be"), ({"n": 129}, ValueError, r"n must be in \[1, 128\]"),
    ({"n": 2**31}, ValueError, "n must be in"),
    ({"presence_penalty": 2.5}, ValueError, "presence_penalty"),
    ({"presence_penalty": float("nan")}, ValueError, "presence_penalty must be finite"),
    ({"frequency_penalty": -3}, ValueError, "frequency_penalty"),
    ({"frequency_penalty": "1"}, TypeError, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"repetition_penalty": -1}, ValueError, "repetition_penalty"),
    ({"repetition_penalty": float("inf")}, ValueError, "repetition_penalty"),
    ({"min_p": 1.5}, ValueError, "min_p"), ({"min_p": -0.1}, ValueError, "min_p"),
    ({"min_p": None}, TypeError, "min_p"),
    ({"stop": [""]}, ValueError, "empty"), ({"stop": ""}, ValueError, "empty"),
    ({"stop": [1]}, TypeError, "stop"), ({"stop": b"x"}, TypeError, "stop"),
    ({"stop": 5}, TypeError, "stop"),
    ({"include_stop_str_in_output": 1}, TypeError, "include_stop_str_in_output"),
    ({"skip_special_tokens": "no"}, TypeError, "skip_special_tokens"),
    ({"min_tokens": -1}, ValueError, "min_tokens"),
    ({"min_tokens": 17}, ValueError, "min_tokens"), ({"min_tokens": 1.5}, TypeError, "min_tokens"),
    ({"logprobs": -2}, ValueError, "logprobs"), ({"logprobs": 2.0}, TypeError, "logprobs"),
    ({"prompt_logprobs": -2}, ValueError, "prompt_logprobs"),
    ({"prompt_logprobs": "1"}, TypeError, "prompt_logprobs"),
])
def test_new_fields_refuse_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        SamplingParams(**kwargs)


def test_new_fields_normalised():
    sp = SamplingParams(stop="a", n=2, logprobs=0, min_tokens=16)
    assert sp.stop == ("a",) and SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=None).stop == () and sp.logprobs == 0


@pytest.mark.parametrize("penalty", [1e-50, 1e-300, 1e300])
@pytest.mark.parametrize("temperature", [0.0, 1e-4, 1.0])
def test_extreme_penalties_are_not_broken_rows(penalty, temperature):
    """A masked (-inf) or zero logit times an underflowed or overflowed penalty is not NaN."""
    sp = SamplingParams(repetition_penalty=penalty, temperature=temperature, min_tokens=1,
                        stop_token_ids=[0])
    row = logits_row(5)
    row[2] = 0.0
    out = Sampler()(row[None], [request(sp, prompt=(0, 1, 2))])
    assert not out.errors and out.tokens[0] != 0


def test_logprobs_past_a_small_vocabulary_return_every_token_instead_of_raising():
    from nanorun.sampler import logprob_dicts

    logits = torch.randn(2, 8)
    d0, d1 = logprob_dicts(logits, torch.tensor([3, 5]), [20, 2])
    assert set(d0) == set(range(8)) and len(d1) in (2, 3)
    assert sorted(lp.rank for t, lp in d0.items()) == list(range(1, 9))
