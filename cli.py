"""`python cli.py ...` from a clone: the `translate` command (translate/cli.py) without
installing the package."""

from translate.cli import run

if __name__ == "__main__":
    run()
