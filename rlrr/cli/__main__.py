"""``python -m rlrr.cli``."""
import sys

from . import main

if __name__ == "__main__":  # not when a spawned worker imports this module
    sys.exit(main())
