"""Command line: `python -m demo [--model PATH] [--port N] [--concurrency N]` serves on 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import sys

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def main(argv: list[str] | None = None) -> int:
    """Loads the model, builds the app and serves it until interrupted; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--model", default=None, help="Ouro checkpoint directory with tokenizer.json (default: the bundled model)")
    parser.add_argument("--port", type=int, default=None, help="port on 127.0.0.1 (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests decoded at once (the engine batches them)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be >= 1")

    import looplm

    try:
        engine = looplm.load(args.model, dtype=args.dtype, device=args.device)
        from .app import build_app, launch

        app = build_app(engine, concurrency=args.concurrency)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        launch(app, args.port)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
