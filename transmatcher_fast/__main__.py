"""``python -m transmatcher_fast <command>``: the same as the ``transmatcher-fast`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
