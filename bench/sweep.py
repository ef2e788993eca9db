"""The sweep from a checkout: `fp4ccl-run -n 4 bench/sweep.py -b 1K -e 1G ...` (see docs/SWEEP.md)."""
import os
import sys

# Run from a checkout without installing (_setup puts the package one level up first), NVLink
# multicast off as on the bench machines.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _setup  # noqa: E402,F401

from fp4ccl.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
