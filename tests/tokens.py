"""Comparing the tokens one request got under two batch shapes, layouts or ranks.

Float results differ with batch shape, thread count and CPU (a GEMM's reduction order): the
same request's logits differ by about 1e-6 with what it is batched with, so two runs that do
not do the same arithmetic may pick different tokens where two of them are nearly tied. Such a
comparison is exact up to the first differing position k, and there it must be explained from
the reference logits at k (the caller's, e.g. `Engine.prompt_logits(prompt + want[:k])`, whose
last row is position k's): both tokens must be what nanorun.sampler draws from those logits
moved by at most `tol` each. After k the two sequences have diverged and are not compared.

How a difference is explained: the sampler itself (stop masks, penalties, temperature, min_p,
top_k, top_p, and the inverse-CDF draw with the request's own u = uniform(key, k)) is run on
the reference row under moves of its logits by +-tol, and must give both tokens. A greedy row's
token changes when another's logit comes within 2 tol of the top one's ("t up": t raised by
tol, every other token lowered by tol). A sampled row's token changes where a boundary moves
past u: a boundary of the vocabulary-order CDF (moved farthest by raising the tokens on one
side of it and lowering those on the other: a split at either token, both ways) or the edge of
the kept set (the same split in rank order, at each rank top_k allows). A difference no such
move explains fails the test, with the smallest move that would explain it.

TOL, 1e-4, is about 100 times the differences measured here (max |logit| about 1.5 for the
tiny presets): 1.2e-6 between prompt_logits at max_batch_tokens 1, 5, 16, 32 and 128, 8e-7
between the logits a soak's batched steps sampled from and the solo prompt_logits (1 and 2
threads, both layouts), against 5e-7 on the machine that reported issue 25; against
transformers (the MoE presets at initializer_range 0.1, max |logit| about 5.4), 7.4e-6. The
price is the rows it calls ambiguous: about 1 row in 200 of the tiny presets has its top two
logits within 2e-4; a bug that changes tokens changes them where the logits have a clear
winner.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

from nanorun import SamplingParams
from nanorun.request import Request
from nanorun.sampler import Sampler, apply_penalties, seed_key, uniform

TOL = 1e-4
_CHUNK = 64                # perturbed rows per sampler call


def first_divergence(got: Sequence[int], want: Sequence[int], *, prompt: Sequence[int],
                     params: SamplingParams, logits_of: Callable[[list[int]], torch.Tensor],
                     key: int | None = None, eos_token_ids: Sequence[int] = (),
                     tol: float = TOL, what: str = "") -> int | None:
    """None where got and want (the reference run's tokens of the same request) agree over
    their common length; else the first position k where they differ, once the reference
    logits at k, logits_of(prompt + want[:k]) ([V], or [T, V] and its last row), show it is a
    near-tie (see the module docstring). Fails the test otherwise.

    key: the request's sampling key, for a sampled request without a seed (a seeded one's is
    seed_key(params.seed); a sequence i of n > 1 has seed + i). eos_token_ids: what the
    request stops on; it matters only below min_tokens, where the sampler masks them."""
    k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if k is not None:
        request = _request(prompt, params, _key(params, key), want[:k], eos_token_ids)
        row = logits_of(list(prompt) + list(want[:k]))
        row = (row[-1] if row.dim() == 2 else row).detach().float().cpu()
        _explain(row, request, want[k], got[k], tol, f"{what}: " if what else "")
    return k


def assert_same_tokens(got: Sequence[int], want: Sequence[int], **request) -> int | None:
    """got == want, or a difference first_divergence explains (whose position it returns:
    the lengths and finish reasons of diverged sequences cannot be compared)."""
    k = first_divergence(got, want, **request)
    if k is None:
        assert len(got) == len(want), (f"{request.get('what', '')}: {len(got)} tokens where "
                                       f"the reference has {len(want)}, the same up to there")
    return k


def assert_same_logprobs(got: dict, want: dict, tol: float = TOL, what: str = "") -> None:
    """Two {token: Logprob} dicts of one position (a sampled token and the most likely ones)
    from runs that do not do the same arithmetic: the same tokens with logprobs within tol,
    except where the last places of the top list are a near-tie, so that each run lists
    another token there with a logprob within tol of the other's."""
    for t in got.keys() & want.keys():
        assert abs(got[t].logprob - want[t].logprob) <= tol, (
            f"{what}: token {t}'s logprob {got[t].logprob} where the reference has "
            f"{want[t].logprob}")
    mine = sorted(got[t].logprob for t in got.keys() - want.keys())
    theirs = sorted(want[t].logprob for t in want.keys() - got.keys())
    assert len(mine) == len(theirs) and all(abs(a - b) <= tol for a, b in zip(mine, theirs)), (
        f"{what}: tokens {sorted(got.keys() - want.keys())} where the reference has "
        f"{sorted(want.keys() - got.keys())}, not a near-tie ({mine} vs {theirs})")


def hf_logits_of(model) -> Callable[[list[int]], torch.Tensor]:
    """logits_of for a Hugging Face causal LM (the reference of a parity test): its float32
    logits [V] at the last position of the ids, from one forward pass over all of them."""
    def logits_of(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0, -1].float()
    return logits_of


def _key(params: SamplingParams, key: int | None) -> int:
    if key is not None:
        return key
    if params.seed is not None:
        return seed_key(params.seed)
    if params.greedy:
        return 0
    raise ValueError("a sampled request without a seed draws with a key its engine gave it: "
                     "pass key=")


def _request(prompt, params, key, outputs, eos_token_ids) -> Request:
    """The request as the sampler saw it at position len(outputs)."""
    request = Request("tokens-check", tuple(prompt), params, 0.0, tuple(eos_token_ids),
                      sampling_key=key)
    request.output_token_ids = list(outputs)
    return request


def _explain(row: torch.Tensor, request: Request, want: int, got: int, tol: float,
             what: str) -> None:
    k = request.num_output_tokens
    reached = _reached(row, request, (want, got), tol)
    if want not in reached:
        pytest.fail(f"{what}the reference token {want} at position {k} is not what the "
                    f"reference logits give (moved by up to {tol:g}): they are not this "
                    f"request's logits (prompt, params, key?) or differ from its run by more "
                    f"than {tol:g}")
    if got not in reached:
        pytest.fail(f"{what}token {got} at position {k} where the reference has {want}, and "
                    f"that is not a near-tie: {_margin(row, request, want, got, tol)}")


def _reached(row: torch.Tensor, request: Request, tokens: tuple[int, int],
             tol: float) -> set[int]:
    """Which of `tokens` the sampler draws from `row` moved by up to tol (see the module
    docstring for the moves tried)."""
    reached: set[int] = set()
    moves = list(_moves(row, request, tokens, tol))
    for start in range(0, len(moves), _CHUNK):
        batch = row + torch.stack(moves[start:start + _CHUNK])          # [M, V]
        out = Sampler()(batch, [request] * len(batch))
        reached.update(t for i, t in enumerate(out.tokens)
                       if t in tokens and i not in out.errors)
        if reached == set(tokens):
            break
    return reached


def _moves(row: torch.Tensor, request: Request, tokens: tuple[int, int],
           tol: float) -> Iterator[torch.Tensor]:
    """[V] moves of the logits by +-tol: none, each token up, the vocabulary-order splits at
    each token's interval (for a sampled row) and the rank-order splits at each rank the kept
    set may end at (for a sampled row that filters)."""
    V = row.numel()
    yield torch.zeros(V)
    for t in tokens:
        yield torch.full((V,), -tol).index_fill_(0, torch.tensor([t]), tol)
    sp = request.sampling_params
    if sp.greedy:
        return
    for c in sorted({c for t in tokens for c in (t, t + 1) if c < V}):
        yield from _split(torch.arange(V) >= c, tol)
    if 0 < sp.top_k < V or sp.top_p < 1.0 or sp.min_p > 0.0:
        z = apply_penalties(row.clone()[None], [request])[0]
        rank = torch.empty(V, dtype=torch.long).index_copy_(
            0, z.argsort(descending=True), torch.arange(V))
        for r in range(1, min(sp.top_k if sp.top_k > 0 else V, V - 1) + 1):
            yield from _split(rank < r, tol)


def _split(side: torch.Tensor, tol: float) -> Iterator[torch.Tensor]:
    """One side up by tol and the other down, both ways."""
    up = torch.where(side, tol, -tol)
    yield up
    yield -up


def _margin(row: torch.Tensor, request: Request, want: int, got: int, tol: float) -> str:
    """How far the logits would have to move for the sampler to give `got`, and the row's
    figures that say why."""
    sp = request.sampling_params
    if sp.greedy:
        z = apply_penalties(row.clone()[None], [request])[0]
        top = int(z.argmax())
        detail = (f"after any penalties its logit is {float(z[top] - z[got]):.3g} below the top "
                  f"one's (token {top}, {float(z[top]):.6g}; the reference token's "
                  f"{float(z[want]):.6g})")
    else:
        detail = f"u = {uniform(request.sampling_key, request.num_output_tokens):.9f}"
    move = tol
    while move < 100.0:
        move *= 2
        if got in _reached(row, request, (want, got), move):
            return (f"the logits would have to move by more than {move / 2:.3g} (tol "
                    f"{tol:g}; {move:.3g} does it); {detail}")
    return f"no move of the logits by up to 100 gives it; {detail}"
