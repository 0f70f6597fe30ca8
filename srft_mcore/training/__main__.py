"""One trainer rank: ``python -m srft_mcore.training [--config FILE] [--resume] [a.b=c ...]``
(what ``srft-train --nproc-per-node N`` has torchrun start on each of its ranks)."""
import sys

from srft_mcore.training.trainer import main

if __name__ == "__main__":
    sys.exit(main())
