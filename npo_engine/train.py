"""Entry point for `python -m npo_engine.train` and `torchrun --nproc_per_node=N -m npo_engine.train`.

Takes the same arguments as `npo train`; the loop itself lives in trainer.py.
"""

import sys

from npo_engine.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main(prog="python -m npo_engine.train"))
