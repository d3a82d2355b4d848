"""Does a directory still hold exactly the files its manifest vouches for?

Checked before any artifact is run, because numbers computed from files nobody can vouch for
prove nothing: an edited prototxt, a re-saved ONNX file, or a model and ``reference.npz``
swapped in from another export would otherwise be compared against each other and pass.

For every entry of the manifest's ``files`` list the name must be a plain file name inside
the directory, the path a regular file (``lstat``: no symlink, FIFO, device or directory), and
size and sha256 must be the recorded ones. Every file a format uses and ``reference.npz`` must
be listed. Hashing opens each file with ``O_NOFOLLOW | O_NONBLOCK`` and re-checks the open
descriptor, so a FIFO swapped in after the ``lstat`` cannot block, and reads stop at the
recorded size plus one byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from deployplug.errors import ArtifactFormatError
from deployplug.limits import current, file_kind, format_bytes, open_regular

_CHUNK = 1 << 20
_VOUCHED: ContextVar[frozenset[str] | None] = ContextVar("deployplug_vouched", default=None)


def plain_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a plain file name inside a directory (None when it is)."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not a file name"
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL byte"
    if os.path.isabs(name) or name.startswith(("/", "\\")):
        return "is an absolute path"
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if any(sep in name for sep in separators):
        return "contains a path separator"
    if name in (".", ".."):
        return "names a directory"
    return None


def sha256_file(path: Path, expected_size: int | None = None, what: str | None = None) -> str:
    """sha256 of a regular file, reading at most ``expected_size + 1`` bytes when given.

    A file longer than expected is reported by the caller through the size; stopping early
    keeps a file that grows (or a device) from making the hash unbounded.
    """
    label = what or Path(path).name
    limit = current().max_file_bytes if expected_size is None else expected_size + 1
    digest = hashlib.sha256()
    fd = open_regular(Path(path), label)
    try:
        left = limit
        while left > 0:
            chunk = os.read(fd, min(_CHUNK, left))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise ArtifactFormatError(f"{label}: read failed: {exc.strerror}") from None
    finally:
        os.close(fd)
    return digest.hexdigest()


def _file_problem(directory: Path, entry: Mapping[str, Any]) -> str | None:
    name = entry.get("name")
    why = plain_name_problem(name)
    if why is not None:
        return (f"{name!r}: the manifest lists a name that {why}; only plain file names "
                "inside the artifact directory are allowed")
    path = directory / str(name)  # a plain name: a str
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return f"{name}: missing (the manifest lists it)"
    except OSError as exc:
        return f"{name}: cannot be inspected: {exc.strerror}"
    if not stat.S_ISREG(info.st_mode):
        return f"{name}: is {file_kind(info.st_mode)}, not a regular file"
    size, recorded = info.st_size, entry.get("bytes")
    if size != recorded:
        return f"{name}: size {size} bytes, the manifest records {recorded}"
    cap = current().max_file_bytes
    if size > cap:
        return f"{name}: {format_bytes(size)} is over the {format_bytes(cap)} file size limit"
    try:
        digest = sha256_file(path, size, name)
    except ArtifactFormatError as exc:
        return str(exc)
    if digest != entry.get("sha256"):
        return f"{name}: sha256 {digest} differs from the recorded {entry.get('sha256')}"
    return None


def check_directory(directory: Path, files: Sequence[Mapping[str, Any]],
                    required: Iterable[str] = ()) -> list[str]:
    """Every way ``directory`` departs from the manifest's ``files`` list (empty: intact).

    ``required`` names files something will read (the formats' files, ``reference.npz``);
    each must be listed, since an unlisted file is one nobody vouched for.
    """
    directory = Path(directory)
    problems: list[str] = []
    seen: set[str] = set()
    for entry in files:
        name = entry.get("name")
        if isinstance(name, str) and name in seen:
            problems.append(f"{name}: listed twice in the manifest")
            continue
        if isinstance(name, str):
            seen.add(name)
        problem = _file_problem(directory, entry)
        if problem:
            problems.append(problem)
    for name in dict.fromkeys(required):
        if name not in seen:
            why = plain_name_problem(name)
            detail = f" (and the name {why})" if why else ""
            problems.append(f"{name!r}: used by the artifacts but not listed in the manifest's "
                            f"files, so nothing vouches for it{detail}")
    return problems


def vouched_names() -> frozenset[str] | None:
    """Names the running verification proved against the manifest (None outside one)."""
    return _VOUCHED.get()


@contextlib.contextmanager
def vouching(names: Iterable[str]) -> Iterator[None]:
    """Tell readers which file names were checked (ONNX external data must be among them)."""
    token = _VOUCHED.set(frozenset(names))
    try:
        yield
    finally:
        _VOUCHED.reset(token)


__all__ = ["check_directory", "plain_name_problem", "sha256_file", "vouched_names", "vouching"]
