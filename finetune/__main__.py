"""`python -m finetune <command> [arguments]`: the same as the `finetune` command (finetune/cli/main.py)."""

import sys

from finetune.cli.main import main

sys.exit(main())
