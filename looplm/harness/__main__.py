"""lm-eval's command line with the "looplm" model registered: `python -m looplm.harness run --model looplm ...`.

lm-eval releases up to 0.4.13 find models only in their own registry (the "lm_eval.models" entry
points that pyproject.toml declares are read by later releases, where plain `lm_eval --model looplm`
works); this imports looplm.harness.model, whose decorator registers the class, then hands the
arguments to lm-eval's own CLI unchanged.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    from lm_eval.__main__ import cli_evaluate

    from . import model  # noqa: F401  (registers "looplm")

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    sys.argv[0] = "python -m looplm.harness"
    cli_evaluate()


if __name__ == "__main__":
    main()
