"""`python -m elastic ...` is the `elastic` command."""
import sys

from elastic.entrypoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
