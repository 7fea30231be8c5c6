"""Resume checkpoints (`RUN_DIR/checkpoints/last.pt`) and the run directory's bookkeeping.

A checkpoint holds only plain tensors, dicts, lists, numbers and strings, so it loads with
`torch.load(weights_only=True)`: nothing in it is unpickled as code. RNG states (torch, CUDA,
numpy, python) are converted to tensors. Everything is written atomically, so a crash while
saving leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import pickle
import random
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslctl import console
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


def gather_rng_states(world: int) -> list[dict[str, Any]]:
    """Every rank's RNG states in rank order. Collective: every rank must call it."""
    if world == 1:
        return [rng_state()]
    states: list = [None] * world
    torch.distributed.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states: list[dict[str, Any]], rank: int, world: int, warn: bool) -> None:
    """This rank's RNG states from a checkpoint written by `len(states)` processes."""
    if len(states) != world and warn:
        console.warn(
            f"the checkpoint was written by {len(states)} processes, this run has {world}: training continues, "
            "but not bit-for-bit as the original run would have"
        )
    set_rng_state(states[rank % len(states)])


# ---------------------------------------------------------------- save / load


def save(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write `state` (plus the format tag) with torch.save."""
    with atomic_path(path) as tmp:
        torch.save({"format": FORMAT, "version": VERSION, **state}, tmp)
    return Path(path)


def _without_advice(err: Exception) -> str:
    """torch's message without its advice to turn the weights_only check off (sslctl never
    suggests loading a file that way): for a refused file, what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    detail = [line for line in lines if "weights_only" not in line and not line.startswith(("Weights only load failed", "Check the"))]
    return detail[0] if detail else type(err).__name__


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a truncated, foreign or hostile file: the user can delete it or pick another run
        if isinstance(err, pickle.UnpicklingError) and "unsupported GLOBAL" in str(err):  # torch's words for a refused object
            what = (f"not an sslctl checkpoint: it holds Python objects other than tensors and plain values "
                    f"({_without_advice(err)}), and loading those could run code, which sslctl never does")
        else:
            what = f"cannot read the checkpoint ({type(err).__name__}: {_without_advice(err)})"
        raise UserError(f"{path}: {what}; delete it to start over, or pass --resume never with a new --out") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{path}: not an sslctl checkpoint (format={state.get('format') if isinstance(state, dict) else None!r})")
    return state


# ---------------------------------------------------------------- resuming a run


def state_to_resume(run_dir: Path, resume: str, recipe_text: str, recipe_file: str,
                    implied: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The checkpoint of RUN_DIR to continue (None: a fresh start). UserError (exit 2) when
    resume is "never" and there is one, or when it was trained with another recipe."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        return None
    if resume == "never":
        raise UserError(f"{run_dir} already holds a run ({path}); pass --resume auto to continue it or choose a new --out")
    state = load(path)
    check_same_recipe(state["recipe"], recipe_text, Path(run_dir) / "recipe.toml", recipe_file, implied=implied)
    return state




def first_difference(a: Any, b: Any, prefix: str = "", implied: dict[str, Any] | None = None) -> tuple[str, Any, Any] | None:
    """The first dotted key (sorted order) where two parsed recipes differ, with both values. A key
    absent from `a` (the saved recipe) counts as `implied[key]` when `implied` lists it: the
    method's default for a key added after the run was saved (methods.method_defaults)."""
    implied = implied or {}
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            dotted = f"{prefix}.{key}" if prefix else key
            if key not in a and key in b and dotted in implied:
                if b[key] == implied[dotted]:
                    continue
                return dotted, f"<absent: the default {implied[dotted]!r}, saved before the key existed>", b[key]
            if key not in a or key not in b:
                return dotted, a.get(key, "<absent>"), b.get(key, "<absent>")
            found = first_difference(a[key], b[key], dotted, implied)
            if found:
                return found
        return None
    return None if a == b else (prefix, a, b)


def check_same_recipe(saved_text: str, current_text: str, saved_file: Path, current_file: str,
                      implied: dict[str, Any] | None = None) -> None:
    """UserError (exit 2) naming both recipe files and the first differing key (`implied`: as
    for `first_difference`)."""
    diff = first_difference(tomllib.loads(saved_text), tomllib.loads(current_text), implied=implied)
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
