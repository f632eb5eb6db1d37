"""`python -m launch ...`: the same command line as the `kdslim` script (`launch.cli.main`)."""

import sys

from launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
