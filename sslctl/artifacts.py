"""Atomic writes, hashes, provenance, and reading an input path from stdin (DESIGN.md §1).

Every artifact is written to a temp file in the same directory, fsynced, then renamed over
the target, so a crash never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from sslctl import __version__
from sslctl.errors import UserError


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; on success fsync it and rename it over `target`.

    For writers that want a path (torch.save, safetensors.save_file, tarfile)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    # mkstemp creates 0600; artifacts get the permissions of an ordinary file (0666 & ~umask).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temp files `atomic_path` leaves in `directory` when its process is killed
    mid-write (.NAME.XXXXXXXX.tmp: a checkpoint's is as large as the checkpoint). Only for a
    directory this process alone writes to (a run directory under its lock)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(target: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def atomic_write_text(target: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(target: str | os.PathLike, tensors: dict, metadata: dict[str, str]) -> Path:
    """safetensors' save_file, atomic and byte-deterministic. safetensors writes its metadata map
    in an order that changes from process to process, so identical features would hash apart;
    the header is rewritten with the metadata keys sorted (the same bytes in another order, so
    its length and the tensor offsets after it stand)."""
    from safetensors.torch import save_file

    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "r+b") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
            text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
            if len(text) <= size:  # padding: safetensors reads trailing spaces as part of the header
                f.seek(8)
                f.write(text.ljust(size))
    return Path(target)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def provenance(inputs: dict[str, str | os.PathLike] | None = None) -> dict[str, Any]:
    """What every artifact records about its making: sslctl version, command line, input hashes.

    `inputs` maps a role ("shards", "encoder") to a file; its sha256 is recorded. For a
    directory input pass its manifest/encoder file, not the directory."""
    record: dict[str, Any] = {
        "sslctl_version": __version__,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    if inputs:
        record["inputs"] = {
            role: {"path": str(Path(p).resolve()), "sha256": sha256_file(p)} for role, p in inputs.items()
        }
    return record


def path_from_stdin_or_arg(arg: str | None, what: str) -> Path:
    """Pipes: when the input argument is omitted or '-', read the path from stdin's first line.

    This is what makes `sslctl embed RUN SHARDS | sslctl knn` work."""
    if arg not in (None, "-"):
        return Path(arg)
    if sys.stdin is None or sys.stdin.isatty():
        raise UserError(f"no {what} given: pass it as an argument or pipe its path on stdin")
    line = sys.stdin.readline().strip()
    if not line:
        raise UserError(f"no {what} given: stdin was empty (the upstream stage printed no path?)")
    # A result line or a path: take the path. Upstream stages print exactly one path.
    return Path(line)
