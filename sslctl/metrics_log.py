"""What a training run says about itself: RUN_DIR/metrics.jsonl and the progress lines on stderr.

Every `log_every` steps (and at each epoch end) the means of the step's scalars since the last
line go out as one JSON line {"step", "epoch", "loss", ..., "lr", "images_per_s",
"data_wait_pct"} and one progress line. The window of sums is checkpointed, so a resumed run
writes exactly the lines an uninterrupted one would. Only rank 0 writes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from sslctl import checkpoint as ckpt
from sslctl import console

_KNOWN = ("step", "epoch", "loss", "lr", "images_per_s", "data_wait_pct")  # shown in the line's fixed part


class Window:
    """Sums over the steps since the last metrics line. Losses are summed as Python floats so a
    window restored from a checkpoint continues with exactly the same arithmetic."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.n = int(state.get("n", 0))
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.wait = self.busy = 0.0  # seconds blocked on the loader / whole steps (not checkpointed)
        self.steps_timed = 0

    def add(self, scalars: dict[str, float], wait: float, busy: float) -> None:
        self.n += 1
        for key, value in scalars.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.wait, self.busy, self.steps_timed = self.wait + wait, self.busy + busy, self.steps_timed + 1

    def state(self) -> dict:
        return {"n": self.n, "sums": dict(self.sums)}


def fmt_time(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLog:
    def __init__(self, path: Path, main: bool):
        self.path, self.main = path, main
        self.window = Window()

    def restart_at(self, step: int) -> None:
        """Drop the lines logged after `step` (the checkpoint a run resumes from)."""
        if self.main:
            ckpt.truncate_metrics(self.path, step)

    def write(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def flush(self, *, step: int, epoch: int, lr: float, batch: int, epochs: int, last_step: int,
              extra: dict[str, Any] | None = None) -> None:
        """The window's means (and `extra`'s entries) as one metrics line and one progress line;
        a new window starts."""
        w = self.window
        step_time = w.busy / max(1, w.steps_timed)
        record: dict[str, Any] = {"step": step, "epoch": epoch}
        record.update({key: value / w.n for key, value in w.sums.items()})
        record["lr"] = lr
        record["images_per_s"] = round(batch / step_time, 2) if step_time > 0 else None
        record["data_wait_pct"] = round(100.0 * w.wait / w.busy, 2) if w.busy > 0 else None
        record.update(extra or {})
        self.write(record)
        self.window = Window()
        if self.main:
            extras = "".join(f" {k} {v:.4g}" for k, v in record.items() if k not in _KNOWN)
            console.log(
                f"epoch {epoch + 1}/{epochs} step {step}/{last_step} loss {record['loss']:.4f} "
                f"lr {lr:.4g}{extras} {record['images_per_s'] or 0:,.0f} img/s data-wait "
                f"{record['data_wait_pct'] or 0:.1f}% ETA {fmt_time(step_time * (last_step - step))}"
            )
