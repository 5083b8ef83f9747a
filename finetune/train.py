"""`python -m finetune.train [arguments]`: the same as `finetune train` (the table of commands: finetune/cli/commands.py)."""

import sys

from finetune.cli.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("train", sys.argv[1:]))
