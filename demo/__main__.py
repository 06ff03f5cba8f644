"""Command line: `python -m demo [--model PATH] [--port N] [--concurrency N]` serves on 127.0.0.1."""

from __future__ import annotations

import os
import sys

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def main(argv: list[str] | None = None) -> int:
    """Loads the model, builds the app and serves it until interrupted; returns the exit status
    (2, with one `error: ...` line, for a user error)."""
    from looplm.__main__ import UsageError

    try:
        return _serve(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


def _serve(argv: list[str] | None) -> int:
    from looplm.__main__ import Parser, UsageError

    parser = Parser(prog="python -m demo", description=__doc__)
    parser.add_argument("--model", default=None, help="Ouro checkpoint directory with tokenizer.json (default: the bundled model)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests decoded at once, batched by the engine (default: %(default)s)")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="weights' dtype (default: float32 on the CPU, the checkpoint's elsewhere)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: $LOOPLM_THREADS, else chosen from the model's size)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must lie in 1..65535, got {args.port}")

    import looplm

    try:
        engine = looplm.load(args.model, dtype=args.dtype, device=args.device, threads=args.threads)
        from .app import build_app, launch

        app = build_app(engine, concurrency=args.concurrency)
        launch(app, args.port)
    except (ValueError, OSError) as e:  # a bad checkpoint or device; OSError: e.g. the port is taken
        raise UsageError(" ".join(str(e).split())) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
