"""`python -m csps serve ...`: the same entry point as the `csps` console script."""

import sys

from csps.cli import main

sys.exit(main())
