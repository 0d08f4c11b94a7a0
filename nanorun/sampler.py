"""Turn the logits of one iteration into one token per sampling sequence."""

from __future__ import annotations

import torch

from .request import Request


class SamplingError(RuntimeError):
    """One row could not be sampled (its probabilities were not a distribution)."""


class Sampler:
    """Greedy rows are an argmax over the whole batch; the others are sampled one by one.

    A request with a seed draws from its own generator; the rest share the engine's, seeded
    once from the engine's `seed`, so a run is reproducible end to end.

    A row that cannot be sampled is reported, not raised: one request's bad logits must not
    stop the step for everyone else in the batch.
    """

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor,
                 requests: list[Request]) -> tuple[list[int], dict[int, str]]:
        """logits [N, V] float32, one row per request in `requests`. Returns one token per row
        and, for the rows that failed, row -> what went wrong (their token is meaningless)."""
        tokens = logits.argmax(dim=-1).tolist()
        errors: dict[int, str] = {}
        for row, request in enumerate(requests):
            if request.sampling_params.greedy:
                continue
            try:
                tokens[row] = self._sample(logits[row], request)
            except (RuntimeError, ValueError) as e:
                errors[row] = f"sampling failed: {e}"
        return tokens, errors

    def _sample(self, logits: torch.Tensor, request: Request) -> int:
        sp = request.sampling_params
        logits = logits.float().cpu() / sp.temperature
        if sp.top_k > 0 and sp.top_k < logits.numel():
            kth = torch.topk(logits, sp.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if sp.top_p < 1.0:
            probs = _top_p_filter(probs, sp.top_p)
        # Checked before the draw, so a bad row never advances its generator.
        if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0.0:
            raise SamplingError("the probabilities are not finite (NaN or inf logits)")
        generator = request.generator or self.generator
        return int(torch.multinomial(probs, 1, generator=generator))


def _top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    sorted_probs, order = probs.sort(descending=True)
    mass_before = sorted_probs.cumsum(0) - sorted_probs
    sorted_probs[mass_before >= top_p] = 0.0
    kept = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return kept / kept.sum()
