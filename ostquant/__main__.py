"""``python -m ostquant``: see :mod:`ostquant.cli`."""
import sys

from ostquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
