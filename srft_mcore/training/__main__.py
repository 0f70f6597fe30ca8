"""One trainer rank: ``python -m srft_mcore.training [--config FILE] [--resume] [a.b=c ...]``
(what ``srft-train --nproc-per-node N`` has torchrun start on each of its ranks)."""
import gc
import sys

from srft_mcore.training.trainer import main

if __name__ == "__main__":
    rc = main()
    # what is left lives until the process exits: keep it out of the interpreter's final
    # full garbage collection (seconds over a trainer's heap)
    gc.freeze()
    sys.exit(rc)
