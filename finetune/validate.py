"""`python -m finetune.validate [arguments]`: the same as `finetune validate` (the table of commands: finetune/cli/commands.py)."""

import sys

from finetune.cli.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("validate", sys.argv[1:]))
