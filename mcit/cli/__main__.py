"""`python -m mcit.cli VERB ...`, the same as the `mcit` command."""

import sys

from mcit.cli import main

if __name__ == "__main__":
    sys.exit(main())
