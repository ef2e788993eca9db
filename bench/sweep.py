"""The sweep from a checkout: `fp4ccl-run -n 4 bench/sweep.py -b 1K -e 1G ...` (see docs/SWEEP.md)."""
import os
import sys

# Run from a checkout without installing: the package sits one level up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fp4ccl.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
