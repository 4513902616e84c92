"""What both workers share: the step protocol with the driver, and memory readings from /proc.

Protocol (one JSON object per line): the worker builds its trainer, prints {"event": "ready", ...}, then
waits for a line on stdin: "step" runs one optimizer step and answers {"event": "step", "seconds", "tokens",
"rss_bytes"}; "quit" answers {"event": "done", "peak_rss_bytes"} and exits. The driver sends "step" to one
worker at a time, so the two engines alternate step by step and never compete for the cores.

Peak memory is the process's resident high-water mark (VmHWM) over the steps: reset (`clear_refs`) after the
trainer is built, read at the end. It counts everything resident (Python, libraries, weights, optimizer state,
activations, allocator slack), as a user's `top` would show. Where the kernel cannot reset it (some sandboxes),
the reading is the peak since the process started (`peak_since` says which).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys

import torch

MARK = "@@e2e "  # prefix of protocol lines on stdout (libraries print too)


def worker_args() -> argparse.Namespace:
    """The command line every worker takes from the driver; sets the torch thread count it names."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--checkpointing", choices=["default", "on", "off"], default="default",
                        help="activation (gradient) checkpointing: the engine's own default, or set")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def send(**record) -> None:
    sys.stdout.write(MARK + json.dumps(record) + "\n")
    sys.stdout.flush()


def wait_command() -> str:
    line = sys.stdin.readline()
    return line.strip() or "quit"


def status_bytes(field: str) -> int:
    """A /proc/self/status size field in bytes (VmRSS, VmHWM); the rusage peak if the field is missing."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> str:
    """Reset the high-water mark; returns what the final peak reading covers: "steps" or "start"."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "steps"
    except OSError:
        return "start"
