"""``python -m srft_mcore.evaluation``: the ``srft-eval`` command."""
import sys

from srft_mcore.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
