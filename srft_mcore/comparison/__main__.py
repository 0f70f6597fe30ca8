"""``python -m srft_mcore.comparison``: the same as ``srft-compare``."""
import sys

from srft_mcore.comparison.cli import main

sys.exit(main())
