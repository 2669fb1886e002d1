"""``python -m vlsparse``: the command line (so that ``torchrun ... -m vlsparse`` works too)."""

from vlsparse.cli import main

main()
