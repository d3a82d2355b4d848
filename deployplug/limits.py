"""How much work reading an artifact directory may cost, and bounded file reads.

Artifact directories travel: they are copied between machines, unpacked from archives, and
re-checked long after the export. So every reader treats its input as hostile: the sizes a
file *declares* (tensor shapes, padding, channel counts) are checked against a budget before
anything of that size is allocated, and files are opened so that a FIFO, a device or a symlink
cannot make a read block or run forever.

Two limits, both overridable:

* ``max_tensor_bytes`` -- the total bytes of tensors one verification may allocate (reference
  arrays, weights, layer outputs and work buffers a runtime will need). Default
  :data:`DEFAULT_BUDGET_BYTES` (2 GiB); ``verify(..., max_bytes=)`` or the environment variable
  ``DEPLOYPLUG_MAX_TENSOR_BYTES`` change it.
* ``max_file_bytes`` -- the largest artifact file read at all. Default
  :data:`DEFAULT_MAX_FILE_BYTES` (4 GiB); environment variable ``DEPLOYPLUG_MAX_FILE_BYTES``.
  Text formats (``manifest.json``, ``.prototxt``, ``.msnhnet``) have smaller fixed caps, because
  parsing text costs far more per byte than reading binary weights.

Readers get the limits in force from :func:`current`; :func:`deployplug.verify` installs the
caller's limits for the duration of one verification with :func:`using`. A context variable
(not a module global) carries them, so concurrent verifications do not see each other's.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

from deployplug.errors import ArtifactFormatError

GIB = 1 << 30
MIB = 1 << 20
DEFAULT_BUDGET_BYTES = 2 * GIB
DEFAULT_MAX_FILE_BYTES = 4 * GIB
MAX_MANIFEST_BYTES = 16 * MIB
MAX_TEXT_BYTES = 16 * MIB
BUDGET_ENV = "DEPLOYPLUG_MAX_TENSOR_BYTES"
FILE_SIZE_ENV = "DEPLOYPLUG_MAX_FILE_BYTES"
#: the largest value an int field of a C++ runtime can hold
INT32_MAX = (1 << 31) - 1

_READ_CHUNK = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The budget one verification runs under (see the module docstring)."""

    max_tensor_bytes: int = DEFAULT_BUDGET_BYTES
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_tensor_bytes", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @classmethod
    def resolve(cls, max_bytes: int | None = None) -> Limits:
        """The caller's budget, else the environment's, else the defaults."""
        budget = max_bytes if max_bytes is not None else _env_int(BUDGET_ENV,
                                                                   DEFAULT_BUDGET_BYTES)
        return cls(max_tensor_bytes=budget,
                   max_file_bytes=_env_int(FILE_SIZE_ENV, DEFAULT_MAX_FILE_BYTES))

    def check_tensor(self, shape: Iterable[int], itemsize: int, what: str) -> int:
        """Bytes of a tensor of ``shape``; refuses negative dims and sizes over the budget."""
        nbytes = tensor_bytes(shape, itemsize, what)
        if nbytes > self.max_tensor_bytes:
            raise ArtifactFormatError(
                f"{what}: shape {list(shape)} needs {format_bytes(nbytes)}, over the tensor "
                f"budget of {format_bytes(self.max_tensor_bytes)}; if the file is genuine, raise "
                f"the budget (verify(max_bytes=...) or {BUDGET_ENV})"
            )
        return nbytes

    def check_total(self, nbytes: int, what: str) -> None:
        """Refuse when a running total of tensor bytes passes the budget."""
        if nbytes > self.max_tensor_bytes:
            raise ArtifactFormatError(
                f"{what} needs {format_bytes(nbytes)} of tensors in total, over the budget of "
                f"{format_bytes(self.max_tensor_bytes)}; if the file is genuine, raise the "
                f"budget (verify(max_bytes=...) or {BUDGET_ENV})"
            )


_ACTIVE: ContextVar[Limits | None] = ContextVar("deployplug_limits", default=None)


def current() -> Limits:
    """The limits in force: those installed by :func:`using`, else environment or defaults."""
    active = _ACTIVE.get()
    return active if active is not None else Limits.resolve()


@contextlib.contextmanager
def using(limits: Limits) -> Iterator[Limits]:
    """Make ``limits`` the ones every reader sees inside the ``with`` block."""
    token = _ACTIVE.set(limits)
    try:
        yield limits
    finally:
        _ACTIVE.reset(token)


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a whole number of "
                         "bytes") from None
    if value < 1:
        raise ValueError(f"environment variable {name}={raw!r} must be positive")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def tensor_bytes(shape: Iterable[int], itemsize: int, what: str) -> int:
    """``prod(shape) * itemsize`` in Python ints (no overflow), refusing negative dims."""
    dims = list(shape)
    if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in dims):
        raise ArtifactFormatError(f"{what}: shape {dims} has a negative or non-integer size")
    return math.prod(dims) * itemsize


def checked_int(value: int, what: str, low: int = -INT32_MAX - 1, high: int = INT32_MAX) -> int:
    """``value`` when ``low <= value <= high``, else a typed error naming the field."""
    if not low <= value <= high:
        raise ArtifactFormatError(f"{what} = {value} is outside the range [{low}, {high}]")
    return value


# ----------------------------------------------------------------------------- bounded reads
def file_kind(mode: int) -> str:
    """A human name for what a path is when it is not a regular file."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def open_regular(path: Path, what: str | None = None) -> int:
    """A read-only descriptor on ``path``, which must be a regular file (not a symlink).

    ``O_NOFOLLOW`` refuses a symlink in the last component and ``O_NONBLOCK`` keeps a FIFO
    swapped in after any earlier check from blocking the open; ``fstat`` on the descriptor
    then proves what was actually opened is a regular file.
    """
    label = what or str(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    flags |= getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise ArtifactFormatError(f"{label}: file not found") from None
    except OSError as exc:
        try:
            kind = file_kind(os.lstat(path).st_mode)
        except OSError:
            kind = "unreadable"
        if kind == "a symbolic link":
            raise ArtifactFormatError(f"{label} is a symbolic link; only regular files are "
                                      "read (copy the file itself into the directory)") from None
        raise ArtifactFormatError(f"{label}: cannot open ({kind}): {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactFormatError(f"{label} is {file_kind(mode)}, not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bounded(path: Path, what: str | None = None, max_bytes: int | None = None) -> bytes:
    """The whole content of a regular file of at most ``max_bytes`` bytes.

    The size is checked on the open descriptor before reading, and the read itself stops one
    byte past the cap, so a file that grows while it is read cannot make it unbounded.
    """
    label = what or Path(path).name
    cap = current().max_file_bytes if max_bytes is None else max_bytes
    fd = open_regular(Path(path), label)
    try:
        size = os.fstat(fd).st_size
        if size > cap:
            raise ArtifactFormatError(f"{label}: {size} bytes ({format_bytes(size)}) is over "
                                      f"the {cap}-byte limit for this file")
        chunks, total = [], 0
        while total <= cap:
            chunk = os.read(fd, min(_READ_CHUNK, cap + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > cap:
            raise ArtifactFormatError(f"{label} grew past the {format_bytes(cap)} limit "
                                      "while it was read")
        return b"".join(chunks)
    except OSError as exc:
        raise ArtifactFormatError(f"{label}: read failed: {exc.strerror}") from None
    finally:
        os.close(fd)


def regular_file_size(path: Path, what: str | None = None) -> int:
    """Size of a regular file, refusing symlinks and special files (nothing is read)."""
    fd = open_regular(Path(path), what)
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


__all__ = ["BUDGET_ENV", "DEFAULT_BUDGET_BYTES", "DEFAULT_MAX_FILE_BYTES", "FILE_SIZE_ENV",
           "INT32_MAX", "MAX_MANIFEST_BYTES", "MAX_TEXT_BYTES", "Limits", "checked_int",
           "current", "file_kind", "format_bytes", "open_regular", "read_bounded",
           "regular_file_size", "tensor_bytes", "using"]
