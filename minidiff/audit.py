"""`python -m minidiff.audit FILE`: what a LoRA file holds. The command's home is minidiff/eval/audit.py; this alias
keeps the spelling the docs and earlier issues use."""

import sys

from .eval.audit import main

if __name__ == "__main__":
    sys.exit(main())
