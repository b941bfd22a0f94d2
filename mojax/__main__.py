"""``python -m mojax``: the command line of :mod:`mojax.cli`."""

import sys

from mojax.cli import main

if __name__ == "__main__":
    sys.exit(main())
