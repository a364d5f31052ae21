"""`python -m translate ...`: the `translate` command."""

import sys

from translate.cli import main

if __name__ == "__main__":  # importing the module (pkgutil walks, docs tools) runs nothing
    sys.exit(main())
