"""The benchmark harness's step loop and the workloads whose prompts share prefixes (issue 26's
one loop; issue 28's multi-turn conversations and shared system prompt), on a stand-in engine
that answers instantly and on the real tiny engine through `nanorun bench`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nanorun.benchmark.loop import (
    ScheduledSource,
    StepClock,
    Submission,
    run_requests,
    step_until_done,
)
from nanorun.benchmark.metrics import RequestResult, compute_metrics
from nanorun.benchmark.runner import drive
from nanorun.benchmark.traces import Trace
from nanorun.benchmark.workload import Prefixes, Workload, greedy
from nanorun.cli import main
from nanorun.outputs import CompletionOutput, RequestMetrics, RequestOutput

VOCAB = 1000


class StandIn:
    """An engine with Engine's four calls: each step gives every running request one token
    (its id: 7 * prompt length + output position, so answers differ by context), and finishes
    those at max_tokens. Refuses prompts longer than `max_len`; raises on step `fail_at`."""

    def __init__(self, max_len: int = 10_000, fail_at: int | None = None) -> None:
        self.running: dict[str, tuple[list[int], object, list[int], float]] = {}
        self.added: list[tuple[str, list[int], float | None]] = []
        self.max_len, self.fail_at, self.steps = max_len, fail_at, 0

    def add_request(self, rid, prompt, params, arrival_time=None):
        if len(prompt) > self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens is too long")
        self.added.append((rid, list(prompt), arrival_time))
        self.running[rid] = (list(prompt), params, [], arrival_time or 0.0)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running)

    def abort_request(self, ids):
        for rid in ids:
            self.running.pop(rid, None)

    def step(self) -> list[RequestOutput]:
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("device lost")
        outs = []
        for rid, (prompt, params, tokens, arrival) in list(self.running.items()):
            tokens.append(7 * len(prompt) + len(tokens))
            done = len(tokens) == params.max_tokens
            if done:
                del self.running[rid]
            outs.append(RequestOutput(rid, None, prompt, None, [CompletionOutput(
                0, "", list(tokens), None, None, "length" if done else None)], done,
                RequestMetrics(arrival_time=arrival)))
        return outs


def _trace(prompts, outputs, name="t") -> Trace:
    return Trace(name, np.array(prompts), np.array(outputs), None, "test")


def test_the_loop_sends_each_request_when_due_and_records_refusals():
    engine = StandIn(max_len=5)
    subs = [Submission("a", [1, 2], greedy(3), 0.0), Submission("b", [1] * 9, greedy(2), 0.0),
            Submission("c", [3], greedy(1), 0.02)]
    done = run_requests(engine, ScheduledSource(subs))
    assert done.token_ids() == {"a": [14, 15, 16], "c": [7]}
    assert "too long" in done.errors["b"] and done.stopped is None
    # c was due 20 ms after the start and was added only then, with that as its arrival.
    assert [rid for rid, _, _ in engine.added] == ["a", "c"] and done.wall_s >= 0.02


def test_a_failing_step_ends_the_loop_and_fails_what_is_in_flight():
    engine = StandIn(fail_at=2)
    done = run_requests(engine, ScheduledSource([Submission("a", [1], greedy(5), 0.0)]))
    assert done.errors == {"a": done.stopped} and "device lost" in done.stopped
    assert not engine.running


def test_the_step_clock_skips_idle_time_to_the_next_due_step():
    engine, clock = StandIn(), StepClock()
    seen = []
    run_requests(engine, ScheduledSource([Submission("a", [1], greedy(2), 0.0),
                                          Submission("b", [1], greedy(1), 4.5)]),
                 on_output=lambda out: seen.append((out.request_id, clock.step)), clock=clock)
    # a: steps 1 and 2; idle until step 5 (4.5 rounded up), then b in step 6.
    assert seen == [("a", 1), ("a", 2), ("b", 6)] and engine.added[1][2] is None


def test_step_until_done_steps_what_was_added():
    engine = StandIn()
    engine.add_request("x", [5, 5], greedy(3))
    done = step_until_done(engine)
    assert done.steps == 3 and done.token_ids() == {"x": [14, 15, 16]}


def test_a_shared_system_prompt_starts_every_prompt():
    trace = _trace([3, 5, 2], [2, 2, 2])
    w = Workload.fit_limits(trace, 100, VOCAB, 0, "", Prefixes(system_prompt_len=8))
    assert list(w.trace.prompt_lens) == [11, 13, 10] and len(w.system_prompt) == 8
    for p, n in zip(w.prompts, (3, 5, 2)):
        assert list(p[:8]) == list(w.system_prompt) and len(p) == 8 + n
    assert len({tuple(p[8:]) for p in w.prompts}) == 3


def test_conversations_resend_everything_so_far_after_the_answer_and_a_think_time():
    # Two conversations of three turns: user messages 3, 4, 2 and 5, 1, 1; answers 2, 3, 1 ...
    trace = _trace([3, 4, 2, 5, 1, 1], [2, 3, 1, 1, 2, 2])
    prefixes = Prefixes(system_prompt_len=4, turns=3, think_time=0.01)
    w = Workload.fit_limits(trace, 100, VOCAB, 0, "", prefixes)
    # Turn k sends the system prompt, every earlier message and answer, and its own message.
    assert list(w.trace.prompt_lens) == [7, 4 + 5 + 4, 4 + 5 + 7 + 2, 9, 4 + 6 + 1, 4 + 6 + 3 + 1]
    assert w.num_conversations == 2 and len(w.starts()) == 2
    assert w.think_times[0] == w.think_times[3] == 0 and w.think_times[1] > 0
    engine = StandIn()
    run = drive(engine, w, np.zeros(2))
    assert all(r.success for r in run.results)
    sent = {rid: (prompt, t) for rid, prompt, t in engine.added}
    for c in range(2):
        context = list(w.system_prompt)
        for turn in range(3):
            row = 3 * c + turn
            prompt, _ = sent[str(row)]
            assert prompt == context + w.prompts[row].tolist()
            assert len(prompt) == w.trace.prompt_lens[row] == run.results[row].prompt_len
            answer = [7 * len(prompt) + j for j in range(int(w.trace.output_lens[row]))]
            context = prompt + answer
    # A later turn is sent only once the previous one's answer is in, its think time later.
    order = [rid for rid, _, _ in engine.added]
    assert order.index("1") > order.index("0") and order.index("4") > order.index("3")
    assert sent["1"][1] - sent["0"][1] >= w.think_times[1]


def test_a_failed_turn_ends_its_conversation():
    trace = _trace([3, 30, 2, 3, 1, 1], [2, 2, 2, 2, 2, 2])
    w = Workload.fit_limits(trace, 100, VOCAB, 0, "", Prefixes(turns=3))
    run = drive(StandIn(max_len=20), w, np.zeros(2))
    assert [r.success for r in run.results] == [True, False, False, True, True, True]
    assert "too long" in run.results[1].error and "earlier turn" in run.results[2].error


def test_conversations_that_cannot_fit_are_skipped_whole():
    trace = _trace([3, 4, 50, 60, 1, 1, 2], [2, 2, 2, 2, 2, 2, 2])
    w = Workload.fit_limits(trace, 40, VOCAB, 0, "too long", Prefixes(turns=2))
    # Rows 2-3 (one conversation) outgrow 40 tokens; row 6 is no whole conversation.
    assert list(w.trace.output_lens) == [2, 2, 2, 2] and w.num_skipped == 2
    assert list(w.trace.prompt_lens) == [3, 3 + 2 + 4, 1, 1 + 2 + 1]


@pytest.mark.parametrize("bad, named", [(dict(turns=0), "turns"),
                                        (dict(system_prompt_len=-1), "system_prompt_len"),
                                        (dict(think_time=1.0), "turns > 1"),
                                        (dict(turns=2, think_time=-1.0), "think_time")])
def test_bad_prefix_options_say_what_to_change(bad, named):
    with pytest.raises(ValueError, match=named):
        Prefixes(**bad)


def test_the_hit_rate_is_cached_prompt_tokens_over_prompt_tokens():
    done = [RequestResult(100, 4, 0.1, 0.2, cached_tokens=64),
            RequestResult(50, 4, 0.1, 0.2, cached_tokens=0)]
    m = compute_metrics(done + [RequestResult(70, 0, error="x")], 1.0)
    assert m["total_cached_tokens"] == 64 and m["prompt_tokens_computed"] == 86
    assert m["prefix_cache_hit_rate"] == pytest.approx(64 / 150)
    unknown = compute_metrics([RequestResult(10, 2, 0.1, 0.2)], 1.0)
    assert unknown["prefix_cache_hit_rate"] is None and unknown["prompt_tokens_computed"] is None


@pytest.mark.slow
def test_nanorun_bench_runs_conversations_and_reports_the_prefixes(tmp_path, capsys):
    out = tmp_path / "conv.json"
    assert main(["bench", "tiny-llama", "--trace", "lmsys", "--num-requests", "6", "--turns",
                 "3", "--think-time", "0.01", "--system-prompt-len", "16", "--layout",
                 "sequential", "--repeats", "1", "--filter", "64,16,80", "--no-progress",
                 "--max-batch-tokens", "64", "--request-rate", "inf", "1000",
                 "--result-json", str(out)]) == 0
    report = json.loads(out.read_text())
    head, run = report["nanorun"], report["runs"][0]
    # Each rate's run starts from a cold cache: the second finds no more cached than the first
    # (up to the system prompt's page, which the order of the first turns decides), where a
    # warm one would find nearly all of its prompts.
    second = report["runs"][1]
    assert 0 < second["total_cached_tokens"] <= run["total_cached_tokens"] + 16 * 2
    assert second["total_cached_tokens"] < 0.8 * second["total_input_tokens"]
    assert head["prefixes"] == {"system_prompt_len": 16, "turns": 3, "think_time_s": 0.01}
    assert head["num_conversations"] == 2 and run["completed"] == 6
    lens = run["input_lens"]
    assert lens[1] > lens[0] + run["output_lens"][0] and lens[2] > lens[1]
    assert "prefix_cache_hit_rate" in run and "2 conversations of 3 turns" in \
        capsys.readouterr().out
