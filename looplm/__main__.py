"""Command line: `python -m looplm generate "prompt"` (and `python -m looplm demo`)."""

from __future__ import annotations

import argparse
import ast
import sys


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--option needs key=value, got {text!r}")
    try:
        return key.replace("-", "_"), ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key.replace("-", "_"), value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m looplm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text and show how many loops each token used")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="Ouro checkpoint directory (default: the bundled model)")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.add_argument("--mode", default="full", help="full, speculative or anytime")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    gen.add_argument("--device", default=None)
    gen.add_argument("-o", "--option", type=_option, action="append", default=[], help="mode option key=value, e.g. draft_loop=1")
    demo = sub.add_parser("demo", help="start the Gradio demo")
    demo.add_argument("args", nargs=argparse.REMAINDER)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible HTTP server (python -m looplm serve --help)", add_help=False)
    serve.add_argument("args", nargs=argparse.REMAINDER)
    args, unknown = parser.parse_known_args(argv)  # REMAINDER misses leading options ("demo --port 1")
    if args.command == "demo":
        from demo.__main__ import main as demo_main

        return demo_main(unknown + args.args)
    if args.command == "serve":
        try:
            from looplm.serve.cli import main as serve_main
        except ImportError as e:
            print(f"error: {e.name} is missing: pip install 'looplm[serve]'", file=sys.stderr)
            return 2

        return serve_main(unknown + args.args)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")

    import looplm

    try:
        engine = looplm.load(args.model, dtype=args.dtype, device=args.device)
        stop = None if args.stop is None else args.stop + engine.default_stop_ids()
        result = engine.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, mode=args.mode, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=stop, **dict(args.option),
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + result.text)
    print()
    print(f"{'#':>4}  {'loops':>5}  {'exit':>4}  {'ms':>7}  token")
    for step in result.steps:
        print(f"{step.index:>4}  {step.loops:>5}  {step.exit_loop:>4}  {step.latency_ms:>7.1f}  {step.text!r}")
    s = result.stats
    print(f"\n{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, mean loops {s['mean_loops']:.2f} of "
          f"{engine.config.total_ut_steps}, finish: {result.finish_reason}")
    if "token_acceptance" in s:  # speculative: how often a loop-k draft passed full-depth verification
        how = "pipelined" if s.get("pipeline") else f"draft length {s['draft_len']}"
        how += {"map": ", fitted draft map", "extrapolate": f", extrapolated c={s.get('extrapolate', 0):g}"}.get(s.get("draft"), "")
        print(f"drafts from loop {s['draft_loop']} ({how}): {100 * s['token_acceptance']:.0f}% of tested drafts "
              f"accepted, {s['loops_per_token']:.2f} loops computed per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
