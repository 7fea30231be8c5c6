"""Resume checkpoints (`RUN_DIR/checkpoints/last.pt`) and the run directory's bookkeeping.

A checkpoint holds only plain tensors, dicts, lists, numbers and strings, so it loads with
`torch.load(weights_only=True)`: nothing in it is unpickled as code. RNG states (torch, CUDA,
numpy, python) are converted to tensors. Everything is written atomically, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import random
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslctl.artifacts import atomic_path, atomic_write_text
from sslctl.errors import UserError

FORMAT = "sslctl-checkpoint"
VERSION = 1


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.pt"


# ---------------------------------------------------------------- RNG states as tensors


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA, numpy, python) as weights_only-safe values."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
        "python_version": int(py_version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": py_gauss,  # None or a float
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        ("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
         state["numpy_has_gauss"], state["numpy_gauss"])
    )
    random.setstate((state["python_version"], tuple(state["python_state"].tolist()), state["python_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


# ---------------------------------------------------------------- save / load


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus the format tag) with torch.save."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return Path(path)


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated or foreign file: the user can delete it or pick another run
        raise UserError(
            f"{path}: cannot read the checkpoint ({type(err).__name__}: {err}); "
            "delete it to start over, or pass --resume never with a new --out"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an sslctl checkpoint (format={state.get('format') if isinstance(state, dict) else None!r})")
    return state


# ---------------------------------------------------------------- recipe comparison


# Recipe keys added after runs had been saved without them, each with the behaviour the code had
# before the key existed. A run saved without such a key resumes when the recipe given now keeps
# that behaviour; with the other value it is a different recipe and is refused. A new recipe key
# whose default is not the old behaviour must be listed here.
ADDED_KEYS: dict[str, Any] = {
    "method.fused_views": True,  # SimCLR (v1, v2), 2026-11-26: both views were always one batch
    "method.sync_bn": False,  # SwAV, 2026-11-25: BN was per process before
}


def first_difference(a: Any, b: Any, prefix: str = "", implied: dict[str, Any] | None = None) -> tuple[str, Any, Any] | None:
    """The first dotted key (sorted order) where two parsed recipes differ, with both values. A key
    absent from `a` (the saved recipe) counts as `implied[key]` when `implied` lists it."""
    implied = implied or {}
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            dotted = f"{prefix}.{key}" if prefix else key
            if key not in a and key in b and dotted in implied:
                if b[key] == implied[dotted]:
                    continue
                return dotted, f"<absent: {implied[dotted]!r} before the key existed>", b[key]
            if key not in a or key not in b:
                return dotted, a.get(key, "<absent>"), b.get(key, "<absent>")
            found = first_difference(a[key], b[key], dotted, implied)
            if found:
                return found
        return None
    return None if a == b else (prefix, a, b)


def check_same_recipe(saved_text: str, current_text: str, saved_file: Path, current_file: str) -> None:
    """UserError (exit 2) naming both recipe files and the first differing key."""
    diff = first_difference(tomllib.loads(saved_text), tomllib.loads(current_text), implied=ADDED_KEYS)
    if diff is None:
        return
    key, was, now = diff
    raise UserError(
        f"cannot resume: the run's recipe {saved_file} and the recipe given now ({current_file}) "
        f"differ at '{key}': {was!r} in the run vs {now!r} now. Resume with the same recipe, "
        "--variant and --set flags, or start a new run with another --out (or --resume never)"
    )


# ---------------------------------------------------------------- metrics.jsonl


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the entries logged after `step`, so a resumed run's file equals an uninterrupted one's."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut short by a kill: everything from here on is past the checkpoint
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))
