"""Opening shards wherever they are: local files, URLs and `pipe:` commands, with retries.

    shard_samples(location, start, stop)   a shard's samples (shardfmt.read_samples), local or remote
    ShardStream(location)    a buffered binary stream (read / skip / tell) over one shard, with retries
    expand(spec)             a brace pattern or '::'-joined list -> the shard locations it names
    list_tars(url)           the *.tar files under a directory URL (s3://bucket/prefix/)

Local paths open as files (seekable: skipping samples seeks). `pipe:CMD` runs CMD in a shell
and reads its stdout (webdataset's opener). Any other scheme goes through fsspec: http(s)://
(aiohttp), s3:// (s3fs), gs:// (gcsfs), and whatever else fsspec knows; a missing backend is a
UserError that says what to install. HTTP is read as one stream (no range requests needed).

Transient failures (a dropped connection, a timeout, a 5xx) are retried with exponential
back-off, resuming at the byte where the stream broke (seeking where the store allows it,
else re-reading and dropping the bytes already delivered); what stays broken, or fails for
good (404, 403), raises ShardError naming the location. Environment knobs (they reach loader
workers and ranks): SSLCTL_IO_RETRIES (default 4), SSLCTL_IO_BACKOFF (first wait, 0.5 s),
SSLCTL_IO_TIMEOUT (seconds a connect or read may stall, 60).
"""

from __future__ import annotations

import math
import os
import time

from sslctl import console
from sslctl.errors import UserError
from sslctl.shardfmt import ShardError, is_url, read_samples

CHUNK = 1 << 20  # bytes per read from a remote stream
_BACKENDS = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}
_EXTRAS = {"aiohttp": "http", "s3fs": "s3", "gcsfs": "gcs"}


def _knob(name: str, default: float) -> float:
    try:
        return float(os.environ.get(name, default))
    except ValueError:
        raise UserError(f"{name}={os.environ[name]!r}: expected a number") from None


def retries() -> int:
    return int(_knob("SSLCTL_IO_RETRIES", 4))


def expand(spec: str) -> list[str]:
    """'data/train-{000000..000099}.tar' -> the 100 names; 'a.tar::b.tar' -> both (webdataset's rules)."""
    import braceexpand

    return [url for part in spec.split("::") if part for url in braceexpand.braceexpand(part)]


# ---------------------------------------------------------------- what is transient

def _permanent(err: BaseException) -> bool:
    """Errors that a retry cannot fix: missing, forbidden, a client error (4xx but 408/429)."""
    if isinstance(err, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UserError)):
        return True
    status = getattr(err, "status", None) or getattr(err, "code", None)
    return isinstance(status, int) and 400 <= status < 500 and status not in (408, 429)


def _reason(err: BaseException) -> str:
    if isinstance(err, FileNotFoundError):
        return "not found (404 or no such file)"
    if isinstance(err, PermissionError):
        return "access denied"
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text}" if type(err).__name__ not in text else text


# ---------------------------------------------------------------- openers

def _open_raw(location: str):
    """An unbuffered binary file object for `location` (may raise anything the backend raises)."""
    if location.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(location, "rb")
    if not is_url(location):
        return open(location, "rb", buffering=0)
    scheme = location.split("://", 1)[0].lower()
    if scheme == "file":
        return open(location[len("file://"):], "rb", buffering=0)
    import fsspec

    backend = _BACKENDS.get(scheme)
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as err:
        extra = _EXTRAS.get(backend)
        hint = f"pip install 'sslctl[{extra}]' (or pip install {backend})" if extra else f"install fsspec's backend for {scheme}://"
        raise UserError(f"{location}: reading {scheme}:// needs {backend or 'a backend'} ({err}); {hint}") from None
    timeout = _knob("SSLCTL_IO_TIMEOUT", 60)
    fs_options, block_size = {}, 8 * CHUNK  # object stores: 8 MiB ranged reads, read ahead
    if scheme in ("http", "https"):
        import aiohttp

        # One GET streamed from the start: plain servers (http.server, many CDNs' origins) ignore ranges.
        fs_options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)}}
        block_size = 0
    elif scheme == "s3":
        fs_options = {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout}}
    fs, path = fsspec.core.url_to_fs(location, **fs_options)
    return fs.open(path, "rb", block_size=block_size)


class ShardStream:
    """A shard as a buffered stream with retries: read(n), skip(n), tell(), close().

    Reads reach the backend in CHUNK-sized pieces (a request or a thread hop per 512-byte tar
    header would be far slower). A transient error while opening or reading reopens the
    location after a back-off and continues at the same byte."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self._raw, self._buf, self._off = None, b"", 0  # _buf[_off:]: bytes read ahead
        self._pos = 0  # bytes handed out
        self._retry(lambda: None)  # open, with retries
        self.size = getattr(self._raw, "size", None)
        if not isinstance(self.size, int):
            self.size = None

    def _reopen(self) -> None:
        """(Re)open the backend at byte _pos: a seek where it can, else reading up to it."""
        self._close_raw()
        self._raw, self._buf, self._off = _open_raw(self.location), b"", 0
        if not self._pos:
            return
        if self._seekable():
            self._raw.seek(self._pos)
            return
        left = self._pos
        while left:
            got = self._raw.read(min(CHUNK, left))
            if not got:
                raise ShardError(self.location, f"ends at byte {self._pos - left:,}, before byte {self._pos:,} "
                                 "where reading had reached (it changed while being read?)")
            left -= len(got)

    def _seekable(self) -> bool:
        try:
            return bool(self._raw.seekable()) and not isinstance(self._raw, _unseekable_types())
        except (AttributeError, ValueError, OSError):
            return False

    def _retry(self, action):
        attempts, wait = retries(), _knob("SSLCTL_IO_BACKOFF", 0.5)
        for attempt in range(attempts + 1):
            try:
                if self._raw is None:
                    self._reopen()
                return action()
            except ShardError:
                raise
            except Exception as err:  # noqa: BLE001 - every backend raises its own types
                self._close_raw()
                if _permanent(err) or attempt == attempts:
                    tried = f" (tried {attempt + 1} times)" if attempt else ""
                    raise ShardError(self.location, _reason(err) + tried) from None
                console.warn(f"{self.location}: {_reason(err)}; retrying in {wait:.1f} s ({attempt + 1}/{attempts})")
                time.sleep(wait)
                wait *= 2

    def read(self, n: int) -> bytes:
        if len(self._buf) - self._off < n:
            self._fill(n)
        out = self._buf[self._off : self._off + n]
        self._off += len(out)
        self._pos += len(out)
        return out

    def _fill(self, n: int) -> None:
        """Read ahead until n bytes are buffered (fewer at the end of the stream)."""
        parts = [self._buf[self._off :]]
        have = len(parts[0])
        while have < n:
            got = self._retry(lambda: self._raw.read(max(CHUNK, n - have)))
            if not got:
                break
            parts.append(got)
            have += len(got)
        self._buf, self._off = b"".join(parts), 0

    def skip(self, n: int) -> None:
        """Move n bytes on without returning them: a seek where the backend can."""
        ahead = len(self._buf) - self._off
        if n <= ahead:
            self._off += n
            self._pos += n
            return
        if self._seekable():
            self._buf, self._off = b"", 0
            self._pos += n

            def jump():
                self._raw.seek(self._pos)
            self._retry(jump)
            return
        while n:
            got = len(self.read(min(n, CHUNK)))
            if not got:
                return
            n -= got

    def tell(self) -> int:
        return self._pos

    def _close_raw(self) -> None:
        raw, self._raw = self._raw, None
        if raw is not None:
            try:
                raw.close()
            except Exception:  # noqa: BLE001 - e.g. a pipe closed early exits on SIGPIPE
                pass

    def close(self) -> None:
        self._close_raw()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shard_samples(location, start: int = 0, stop: float = math.inf, load=None):
    """shardfmt.read_samples over a shard wherever it is (a local path or a URL); a local file
    that cannot be opened is a ShardError like a URL's."""
    if is_url(location):
        with ShardStream(location) as f:
            yield from read_samples(f, start, stop, location=location, load=load)
        return
    try:
        f = open(location, "rb")
    except OSError as err:
        raise ShardError(location, _reason(err)) from None
    with f:
        yield from read_samples(f, start, stop, location=str(location), load=load)


def list_tars(url: str) -> list[str]:
    """The .tar files directly under a directory URL (s3://bucket/prefix/, an HTTP index page)."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        names = sorted(n for n in fs.ls(path, detail=False) if n.endswith(".tar"))
    except Exception as err:  # noqa: BLE001 - every backend raises its own types
        raise UserError(f"{url}: cannot list the directory ({_reason(err)})") from None
    if not names:
        raise UserError(f"{url}: no .tar shards listed here")
    scheme = url.split("://", 1)[0]
    return [n if is_url(n) else f"{scheme}://{n.lstrip('/')}" for n in names]


def _unseekable_types() -> tuple:
    try:
        from fsspec.implementations.http import HTTPStreamFile

        return (HTTPStreamFile,)
    except ImportError:
        return ()
