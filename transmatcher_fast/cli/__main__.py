"""``python -m transmatcher_fast.cli <command>`` (what torchrun runs): the same as ``transmatcher-fast``."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
