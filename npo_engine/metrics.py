"""What a run shows while it trains and leaves behind: progress bar, `metrics.jsonl`, `events.jsonl`,
TensorBoard scalars (optional), and PNG curves.

Files, in the run directory (see DESIGN.md, "Run directory"):

- `metrics.jsonl`: one JSON object per logged step,
  `{"step": 12, "time": <unix seconds>, "reward/mean": 0.41, ...}`. Values are numbers; NaN and infinities
  are written as `null`, so every line is strict JSON.
- `events.jsonl`: one JSON object per event, `{"time": ..., "step": 12, "kind": "rollback", ...fields}`:
  interventions, AutoNPO decisions, skipped non-finite losses, warnings.
- `tensorboard/` (when enabled) and `plots/*.png` (from `plot_run`, also `npo plot`).

Each line is flushed as it is written, so a crash loses at most the line being written; readers skip a
truncated last line. A run resumed at step k first drops the metric lines with step >= k (rewriting the file
through a temporary and `os.replace`), so replayed steps are not logged twice. Only the main rank writes.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
PLOTS_DIR = "plots"
TENSORBOARD_DIR = "tensorboard"

# Progress-bar fields: (metric, label, format). acc/eval comes at eval steps only; the bar keeps the last.
_BAR_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"),
    ("acc/train", "acc", "{:.3f}"),
    ("acc/eval", "eval", "{:.3f}"),
    ("time/step", "s/step", "{:.2f}"),
)
# Keys every metrics line carries itself; log() refuses metrics of the same name rather than overwrite them.
_RESERVED = ("step", "time")


class MetricsLogger:
    """Writes metrics and events of one run; a no-op on every rank but the main one.

    Args:
        run_dir: the run directory (`runs/<name>`); created if missing.
        total_steps: the number of the run's last step, for the progress bar and its ETA. Steps are numbered
            by the optimizer steps completed, so the first logged step is 1 and the bar stands at `step`.
        is_main: whether this process writes (rank 0); the others only keep the call sites uniform.
        tensorboard: also write TensorBoard scalars to `run_dir/tensorboard` (needs `tensorboard` installed).
        progress: show the progress bar and print events to the console.
        start_step: the first step this process will log; lines of `metrics.jsonl` with step >= start_step,
            left by an earlier process of the same run, are dropped (0 starts the file afresh).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        is_main: bool = True,
        tensorboard: bool = False,
        progress: bool = True,
        start_step: int = 0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.metrics_path = self.run_dir / METRICS_FILE
        self.events_path = self.run_dir / EVENTS_FILE
        self._console = progress and is_main
        self._bar_values: dict[str, str] = {}
        self._metrics_file = self._events_file = None
        self._tensorboard = None
        self._bar = None
        if not is_main:
            return

        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.metrics_path.exists():
            # Rows count by every optimizer step spent (`total_steps`, which rollbacks never take back), or by
            # `step` in rows that carry no total.
            _rewrite_jsonl(self.metrics_path,
                           keep=lambda record: record.get("total_steps", record.get("step", -1)) < start_step)
        if self.events_path.exists() and not _ends_with_newline(self.events_path):
            _rewrite_jsonl(self.events_path, keep=lambda record: True)  # drop the line a crash cut short
        self._metrics_file = open(self.metrics_path, "a", encoding="utf-8")
        self._events_file = open(self.events_path, "a", encoding="utf-8")
        if tensorboard:
            self._tensorboard = _summary_writer(self.run_dir / TENSORBOARD_DIR, start_step)
        if self._console:
            self._bar = tqdm(total=total_steps, initial=max(start_step - 1, 0), unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: Mapping[str, float | int | torch.Tensor]) -> None:
        """Append `{"step", "time", **metrics}` to metrics.jsonl and advance the progress bar to `step`.

        Args:
            metrics: slash-namespaced names (`reward/mean`, `loss/pg`) to numbers or one-element tensors.
        """
        if not self.is_main:
            return
        values = {}
        for name, value in metrics.items():
            if name in _RESERVED:
                raise ValueError(f"metric name {name!r} is reserved for the line's own field; rename it.")
            values[name] = _to_number(name, value)
        record = {"step": step, "time": time.time(), **values}
        _append(self._metrics_file, record)

        if self._tensorboard is not None:
            for name, value in values.items():
                if value is not None:
                    self._tensorboard.add_scalar(name, float(value), step)
        if self._bar is not None:
            for name, label, fmt in _BAR_FIELDS:
                if values.get(name) is not None:
                    self._bar_values[label] = fmt.format(values[name])
            self._bar.update(max(0, step - self._bar.n))
            ordered = {
                label: self._bar_values[label] for _, label, _ in _BAR_FIELDS if label in self._bar_values
            }
            self._bar.set_postfix(ordered, refresh=True)

    def event(self, kind: str, step: int | None = None, **fields: Any) -> None:
        """Append `{"time", "step", "kind", **fields}` to events.jsonl and print a one-line summary.

        Args:
            kind: what happened, e.g. `rollback`, `guide_cache`, `nonfinite_loss`, `warning`.
            fields: details; tensors and numpy values become numbers or lists, NaN and infinities null, and
                anything else that JSON cannot hold its `str()`.
        """
        if not self.is_main:
            return
        if "time" in fields:
            raise ValueError("event field 'time' is reserved for the line's own timestamp; rename it.")
        details = {name: _jsonable(value) for name, value in fields.items()}
        record = {"time": time.time(), "step": step, "kind": kind, **details}
        _append(self._events_file, record)
        if self._console:
            where = "" if step is None else f" step {step}"
            summary = " ".join(f"{name}={value}" for name, value in details.items())
            tqdm.write(f"[{kind}]{where} {summary}".rstrip())

    def close(self) -> None:
        for handle in (self._metrics_file, self._events_file):
            if handle is not None and not handle.closed:
                os.fsync(handle.fileno())
                handle.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a `.jsonl` file; a truncated last line (a write cut short by a crash) is skipped."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(
                f"{path}:{number} is not valid JSON ({err}); only the last line may be truncated."
            ) from err
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} holds a {type(record).__name__}, expected a JSON object.")
        records.append(record)
    return records


# Plot panels: (file stem, title, y label, metrics drawn as lines).
_PANELS = (
    ("reward", "Reward", "reward/mean", ("reward/mean",)),
    ("accuracy", "Accuracy", "accuracy", ("acc/train", "acc/eval")),
    ("entropy", "Policy entropy", "entropy/mean", ("entropy/mean",)),
    ("times", "Time per phase", "seconds", ("time/rollout", "time/train", "time/sync", "time/step")),
    ("loss", "Policy-gradient loss", "loss/pg", ("loss/pg",)),
)


def plot_run(run_dir: Path) -> list[Path]:
    """Draw the run's curves from `run_dir/metrics.jsonl` into `run_dir/plots/<panel>.png`.

    One PNG per panel (reward, accuracy, entropy, times, loss) of the final trajectory against `step`, and the
    accuracy against `total_steps` (every optimizer step spent, with the discarded segments of NPO's
    interventions in gray); a panel none of whose metrics were logged is skipped, and a series is drawn only at
    the steps where it has a finite value (e.g. `acc/eval`).
    Returns the PNG paths written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if not metrics_path.is_file():
        raise FileNotFoundError(
            f"{metrics_path} does not exist; plot_run needs the metrics.jsonl a training run writes."
        )
    records = read_jsonl(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} holds no metric lines yet; plot after the run has logged a step.")

    # The final trajectory: rows of segments a rollback undid (scouts, train-ahead) are kept in the file, marked
    # `discarded`, and drawn only against total_steps, where they show what the run spent.
    # A rollback can also undo rows written as kept (AutoNPO decides after the fact), so the final trajectory
    # is the last row of each step.
    last_of_step = {r["step"]: i for i, r in enumerate(records)}
    for i, r in enumerate(records):
        if last_of_step[r["step"]] != i:
            r["discarded"] = 1.0
    final = [r for r in records if not r.get("discarded")]
    panels = [(stem, title, ylabel, names, "step", final) for stem, title, ylabel, names in _PANELS]
    if any("total_steps" in r for r in records):
        panels.append(("accuracy_vs_total_steps", "Accuracy against every optimizer step spent", "accuracy",
                       ("acc/train", "acc/eval"), "total_steps", records))
    out_dir = run_dir / PLOTS_DIR
    written = []
    for stem, title, ylabel, names, axis, rows in panels:
        kept = [r for r in rows if not r.get("discarded")]
        series = {name: _series(kept, name, axis) for name in names}
        series = {name: xy for name, xy in series.items() if xy[0]}
        if not series:
            continue
        # Figure + Agg canvas, not pyplot: no global figure state, no GUI backend, safe off the main thread.
        figure = Figure(figsize=(7, 4), dpi=100)
        FigureCanvasAgg(figure)
        axes = figure.add_subplot()
        for name, (steps, values) in series.items():
            sparse = len(steps) < len(kept) / 2  # e.g. eval every k steps: mark the points
            axes.plot(steps, values, label=name, marker="o" if sparse else None, markersize=3, linewidth=1.2)
        discarded = [r for r in rows if r.get("discarded")]
        if discarded:
            xs, ys = _series(discarded, names[0], axis)
            axes.scatter(xs, ys, s=6, color="gray", label=f"{names[0]} (discarded segments)", zorder=3)
        axes.set(title=title, xlabel=axis, ylabel=ylabel)
        axes.grid(alpha=0.3)
        if len(series) > 1 or discarded:
            axes.legend()
        figure.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{stem}.png"
        figure.savefig(path)
        written.append(path)
    return written


# ---- helpers -------------------------------------------------------------------------------------------


def _to_number(name: str, value: Any) -> int | float | bool | None:
    """A JSON number for a metric value; NaN and infinities become None (written as null)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"metric {name!r} is a tensor of shape {tuple(value.shape)}; log a scalar (e.g. .mean())."
            )
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(
        f"metric {name!r} is a {type(value).__name__}; metrics are numbers or one-element tensors."
    )


def _jsonable(value: Any) -> Any:
    """An event field as plain JSON: arrays as (nested) lists, NaN/inf as None, unknown objects as str()."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        value = value.tolist()  # a Python number for one element, nested lists otherwise
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(item) for item in value]
    return str(value)


def _append(handle, record: dict[str, Any]) -> None:
    # allow_nan=False: a non-finite value that escaped conversion fails here instead of writing invalid JSON.
    handle.write(json.dumps(record, allow_nan=False) + "\n")
    handle.flush()


def _series(records: list[dict[str, Any]], name: str, axis: str = "step") -> tuple[list[int], list[float]]:
    points = [(r[axis], r[name]) for r in records if isinstance(r.get(name), (int, float)) and axis in r]
    return [step for step, _ in points], [value for _, value in points]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return True
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _rewrite_jsonl(path: Path, keep: Callable[[dict[str, Any]], bool]) -> None:
    """Keep the records `keep` accepts (and drop a truncated last line): write a temporary, then replace."""
    records = [record for record in read_jsonl(path) if keep(record)]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _summary_writer(log_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "tensorboard=True needs the tensorboard package: pip install 'npo_engine[tensorboard]', "
            "or turn TensorBoard logging off."
        ) from err
    # purge_step hides events at steps >= start_step that an earlier process of this run wrote.
    return SummaryWriter(log_dir=str(log_dir), purge_step=start_step if start_step > 0 else None)
