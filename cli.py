"""`python cli.py ...` from a clone: the `translate` command (translate/cli.py) without
installing the package."""

import sys

from translate.cli import main

if __name__ == "__main__":
    sys.exit(main())
