"""`python -m translate ...`: the `translate` command."""

from translate.cli import run

if __name__ == "__main__":  # importing the module (pkgutil walks, docs tools) runs nothing
    run()
