"""Command line: `python -m looplm generate "prompt"` (and `python -m looplm demo`)."""

from __future__ import annotations

import argparse
import ast
import sys

MODES = ("full", "speculative", "anytime")  # looplm.decoding.MODES, without importing torch for --help
# generate()'s own arguments, which have their own flags: an -o copy would reach generate twice
_FLAGGED = {"temperature", "top_k", "top_p", "seed", "stop", "max_new_tokens", "mode", "prompt"}


class UsageError(Exception):
    """A command-line mistake: printed as one `error: ...` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse whose errors raise UsageError (one line, no usage block) instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    if key in _FLAGGED:
        raise argparse.ArgumentTypeError(f"{key} has its own flag: use --{key.replace('_', '-')}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {n}")
    return n


def _parser() -> Parser:
    parser = Parser(prog="python -m looplm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    gen = sub.add_parser("generate", help="generate text and show how many loops each token used",
                         description="Generates a continuation and prints each token with the loops it used.")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Ouro checkpoint directory (default: the bundled model)")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=48, help="new tokens (default: %(default)s)")
    gen.add_argument("--mode", default="full", choices=MODES, help="decoder (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)")
    gen.add_argument("--top-k", type=int, default=None, help="sample from the k likeliest tokens (default: all)")
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: 1)")
    gen.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    gen.add_argument("--stop", action="append", default=None,
                     help="stop string, repeatable (default: the checkpoint's end-of-sequence ids only)")
    gen.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                     help="weights' dtype (default: float32 on the CPU, the checkpoint's elsewhere)")
    gen.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    gen.add_argument("--threads", type=_positive_int, default=None,
                     help="torch intra-op threads (default: $LOOPLM_THREADS, else chosen from the model's size)")
    gen.add_argument("--tp", type=_positive_int, default=1,
                     help="tensor parallelism over N processes, launched here (under torchrun: its "
                          "--nproc-per-node N) (default: %(default)s)")
    gen.add_argument("--no-warmup", action="store_true",
                     help="time the first call, one-time warm-up included (default: a short warm-up call first)")
    gen.add_argument("-o", "--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                     help="option of the mode, repeatable, e.g. -o draft_loop=2 (speculative), -o exit=q_exit "
                          "(anytime), -o kv=last (any mode) (default: the checkpoint's recommendation)")
    # add_help=False: `demo --help` reaches the demo's own parser
    demo = sub.add_parser("demo", help="start the Gradio demo (python -m looplm demo --help)", add_help=False)
    demo.add_argument("args", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server (python -m looplm serve --help)", add_help=False)
    serve.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (2 for any user error, printed as one line)."""
    try:
        return _main(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    try:
        args, unknown = parser.parse_known_args(argv)  # REMAINDER misses leading options ("demo --port 1")
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.command == "demo":
        from demo.__main__ import main as demo_main

        return demo_main(unknown + args.args)
    if args.command == "serve":
        try:
            from looplm.serve.cli import main as serve_main
        except ImportError as e:
            raise UsageError(f"{e.name} is missing: pip install 'looplm[serve]'") from None

        return serve_main(unknown + args.args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    import os

    import looplm

    if args.tp > 1 and "RANK" not in os.environ:
        return _launch_tp(args, argv)
    try:
        engine = looplm.load(args.model, dtype=args.dtype, device=args.device, threads=args.threads,
                             tp=args.tp if args.tp > 1 else None)
        stop = None if args.stop is None else args.stop + engine.default_stop_ids()
        request = dict(mode=args.mode, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, stop=stop, **dict(args.option))
        if not args.no_warmup:  # the first call pays one-time costs (allocation, kernel selection)
            engine.generate(args.prompt, max_new_tokens=2, **request)
        result = engine.generate(args.prompt, max_new_tokens=args.max_new_tokens, **request)
    except (ValueError, OSError) as e:
        raise UsageError(_one_line(e)) from None
    print(args.prompt + result.text)
    print()
    print(f"{'#':>4}  {'loops':>5}  {'exit':>4}  {'ms':>7}  token")
    for step in result.steps:
        print(f"{step.index:>4}  {step.loops:>5}  {step.exit_loop:>4}  {step.latency_ms:>7.1f}  {step.text!r}")
    s = result.stats
    import torch

    timing = "includes the first call's warm-up" if args.no_warmup else "after a warm-up call"
    threads = torch.get_num_threads()
    T = engine.config.total_ut_steps
    # exit loop: the loop whose head chose a token; loops computed: every loop run per token, prefill
    # included (anytime's skip="exact" finishes skipped loops later, so it can exceed the exit loop)
    print(f"\n{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s ({timing}; {threads} torch thread{'s' * (threads > 1)}), "
          f"mean exit loop {s['mean_exit_loop']:.2f} of {T}, loops computed per token {s['loops_computed_per_token']:.2f}, "
          f"finish: {result.finish_reason}")
    if "token_acceptance" in s:  # speculative: how often a loop-k draft passed full-depth verification
        how = "pipelined" if s.get("pipeline") else f"draft length {s['draft_len']}"
        how += {"map": ", fitted draft map", "extrapolate": f", extrapolated c={s.get('extrapolate', 0):g}"}.get(s.get("draft"), "")
        where = f"loop {s['draft_loop']}"
        if "loop_switches" in s:  # draft_loop="adaptive": the loops it drafted from, in order
            where = "loops " + " -> ".join(str(k) for _, k in s["loop_switches"])
            how = f"adaptive, call cost {s['call_cost']:g}"
        print(f"drafts from {where} ({how}): {100 * s['token_acceptance']:.0f}% of tested drafts "
              f"accepted, {s['loops_per_token']:.2f} loops computed per token")
    return 0


def _launch_tp(args, argv: list[str] | None) -> int:
    """Runs this command in args.tp processes on this machine (rank 0 prints); returns rank 0's status."""
    import socket

    import torch.multiprocessing as mp

    from looplm import checkpoint, tp
    from looplm.api import DEFAULT_MODEL

    try:  # checked once here, not printed by every rank
        tp.check_divisible(checkpoint.read_config(args.model or DEFAULT_MODEL), args.tp)
    except (ValueError, OSError) as e:
        raise UsageError(_one_line(e)) from None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = sys.argv[1:] if argv is None else argv
    from looplm.__main__ import _tp_rank as rank_main  # by module name: `python -m looplm` runs this file as __main__
    try:
        mp.start_processes(rank_main, args=(args.tp, port, argv), nprocs=args.tp, start_method="spawn")
    except mp.ProcessExitedException as e:
        return e.exit_code if e.error_index == 0 else 1
    return 0


def _tp_rank(rank: int, world: int, port: int, argv: list[str]) -> None:
    """One rank of `--tp`: the same command under torchrun's environment variables."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    code = main(argv)  # ranks > 0 serve rank 0 inside looplm.load and exit there
    from looplm import tp

    tp.stop()  # rank 0: tell the other ranks to exit
    if code:
        sys.exit(code)


def _one_line(e: Exception) -> str:
    """The exception's message on one line."""
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
