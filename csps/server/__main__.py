"""`python -m csps.server MODEL [flags]`: the same as `csps serve MODEL [flags]`."""

import sys

from csps.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
