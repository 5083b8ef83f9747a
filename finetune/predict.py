"""`python -m finetune.predict [arguments]`: the same as `finetune predict` (the table of commands: finetune/cli/commands.py)."""

import sys

from finetune.cli.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("predict", sys.argv[1:]))
