"""``python -m srft_mcore.planning``: the same as ``srft-plan``."""
import sys

from srft_mcore.planning.cli import main

sys.exit(main())
