"""The `nanorun` command."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from importlib.metadata import entry_points

from .benchmark.cli import add_parser as _add_bench
from .options import add_engine_arguments, check_vllm_flags, engine_kwargs
from .server.cli import add_parser as _add_serve

# EngineConfig fields `nanorun generate` does not take, and why.
GENERATE_ABSENT = {"role": "a prefill or decode engine needs a KV connector: "
                           "`python -m nanorun.disagg` runs such pairs"}


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line that says where the help is, not the whole usage block (the
    subcommands' parsers are of this class too)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """The `nanorun` command's parser, every subcommand in it."""
    from . import __version__

    parser = _Parser(prog="nanorun", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nanorun {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_installed_commands(sub)
    _add_bench(sub)
    _add_serve(sub)
    return parser


def _add_installed_commands(sub) -> None:
    """The subcommands installed packages register under the `nanorun.commands` entry point
    (pyproject.toml): nanorun's own offline search adds tune, plan, profile and provision
    this way, since the runtime never imports the search (docs/architecture.md)."""
    for command in sorted(entry_points(group="nanorun.commands"), key=lambda e: e.name):
        command.load()(sub)


def main(argv: list[str] | None = None) -> int:
    check_vllm_flags(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError, OSError) as e:
        print(f"nanorun {args.command}: error: {e}", file=sys.stderr)
        return 2


def _add_generate(sub) -> None:
    p = sub.add_parser(
        "generate", help="run the engine on prompts and report tokens/s",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Run prompts through the engine and print throughput and the first output. "
                    "Without a prompt, a batch of random prompts. Defaults: the tiny preset "
                    "with random weights, on the CPU.")
    p.add_argument("model", nargs="?", default="tiny-llama",
                   help="preset name (nanorun.models.list_presets()), a Hugging Face model "
                        "directory, a GGUF file or a Hugging Face Hub id (org/name)")
    p.add_argument("--model", dest="model_flag", default=None, help=argparse.SUPPRESS)
    p.add_argument("--revision", default=None,
                   help="branch, tag or commit of a Hub id (default: main)")
    p.add_argument("--tokenizer", default=None,
                   help="directory, GGUF file or Hub id whose tokenizer to use instead")
    p.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                   help="a text prompt (repeat for several): print what the model writes "
                        "after it, instead of timing random prompts")
    p.add_argument("--chat", action="store_true",
                   help="with --prompt: send each prompt as a user message through the "
                        "model's chat template")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="with --prompt: sampling temperature (0: greedy)")
    p.add_argument("--prompt-token-ids", default=None, metavar="IDS",
                   help="one prompt as comma-separated token ids, instead of random prompts")
    p.add_argument("--num-prompts", type=int, default=32, help="random prompts to run")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per random prompt")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per prompt")
    engine = p.add_argument_group("engine options (EngineConfig's fields; --seed also seeds "
                                  "the random prompts)")
    add_engine_arguments(engine, absent=GENERATE_ABSENT)
    p.set_defaults(func=_generate)


def _generate(args) -> int:
    from . import LLM

    llm = LLM(args.model_flag or args.model, tokenizer=args.tokenizer, revision=args.revision,
              **engine_kwargs(args, absent=GENERATE_ABSENT))
    try:
        return _write(llm, args) if args.prompt else _report(llm, args)
    finally:
        llm.shutdown()


def _report(llm, args) -> int:
    """Generate on every rank (they work in lockstep); only the driver prints."""
    import torch

    from . import SamplingParams

    vocab = llm.engine.model_config.vocab_size
    if args.prompt_token_ids is not None:
        prompts = [_parse_ids(args.prompt_token_ids)]
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = torch.randint(0, vocab, (args.num_prompts, args.prompt_len),
                                generator=g).tolist()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up (JIT)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=sys.stderr.isatty() and llm.is_driver)
    elapsed = time.perf_counter() - start
    if not llm.is_driver:
        return 0
    n_in = sum(len(o.prompt_token_ids) for o in outputs)
    n_out = sum(len(o.token_ids) for o in outputs)
    e = llm.engine
    tp = f", {e.tensor_parallel.size} tensor-parallel ranks" if e.tensor_parallel.size > 1 else ""
    print(f"model {e.model_config.name} on {e.device} ({e.dtype}){tp}, layout "
          f"{e.executor.layout_name}, dense batch {e.config.max_batch_tokens} tokens")
    print(f"{len(outputs)} requests, {n_in} prompt + {n_out} output tokens in {elapsed:.2f} s")
    print(f"throughput: {(n_in + n_out) / elapsed:,.0f} tokens/s total, "
          f"{n_out / elapsed:,.0f} output tokens/s")
    print(f"first request's output: {outputs[0].token_ids[:12]}"
          f"{' ...' if len(outputs[0].token_ids) > 12 else ''}")
    return 0


def _write(llm, args) -> int:
    """--prompt: each text prompt and what the model writes after it (or answers, --chat)."""
    from . import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            seed=args.seed)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params,
                           use_tqdm=False)
    else:
        outputs = llm.generate(args.prompt, params, use_tqdm=False)
    if llm.is_driver:
        for prompt, out in zip(args.prompt, outputs):
            completion = out.outputs[0]
            print(f"prompt: {prompt!r}\noutput: {completion.text!r} "
                  f"({len(completion.token_ids)} tokens, {completion.finish_reason})")
    return 0


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-token-ids must be comma-separated integers, got "
                         f"{text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
