"""Worker for test_checkpoint.py::test_sigkill_during_save: `python <this> <root>` saves until killed.

Before saving step s it sets every weight to s, prints `saving s` and flushes, so the parent can time a
SIGKILL to land inside a save, then check that whatever `latest()` returns is a whole checkpoint of one step.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from npo_engine.checkpoint import CheckpointManager

# About 4 MB of weights plus 8 MB of AdamW moments: a save takes long enough for a kill to land inside it.
_WIDTH = 512
_LAYERS = 4


def main(root: Path) -> None:
    model = torch.nn.Sequential(*[torch.nn.Linear(_WIDTH, _WIDTH) for _ in range(_LAYERS)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.ones(1, _WIDTH)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(root, keep_last=2)
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            for param in model.parameters():
                param.fill_(float(step))
        print(f"saving {step}", flush=True)
        manager.save(step, model, optimizer, extra={"step": step})


if __name__ == "__main__":
    main(Path(sys.argv[1]))
