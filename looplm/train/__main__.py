"""`python -m looplm.train [stage1|gate|eval|data|release|kv-eval] ...` (no subcommand means stage1)."""

import sys

COMMANDS = {"stage1": "trainer", "gate": "gate", "eval": "evaluate", "data": "data", "release": "release",
            "kv-eval": "kv_eval"}


def main() -> None:
    argv = sys.argv[1:]
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "stage1"
    module = __import__(f"looplm.train.{COMMANDS[command]}", fromlist=["main"])
    module.main(argv)


if __name__ == "__main__":
    main()
