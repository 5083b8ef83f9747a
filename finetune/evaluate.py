"""`python -m finetune.evaluate [arguments]`: the same as `finetune evaluate` (the table of commands: finetune/cli/commands.py)."""

import sys

from finetune.cli.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("evaluate", sys.argv[1:]))
