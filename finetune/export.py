"""`python -m finetune.export [arguments]`: the same as `finetune export` (the table of commands: finetune/cli/commands.py)."""

import sys

from finetune.cli.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("export", sys.argv[1:]))
