"""Artifact directories that are never lost, never half-written and never someone else's.

An export can run for minutes inside a training job that may be killed at any instant, and
its destination is often a directory that also holds other things (a run's checkpoints, a
source tree). Each step below exists for one of those facts:

* **Ownership first** (:func:`check_output_dir`). deployplug writes only to a path that does
  not exist, an empty directory, or a directory holding nothing but one of its own exports
  (a ``manifest.json`` with deployplug's keys plus the files that manifest lists). Anything
  else is refused before any work starts, and refused again right before publishing, because
  the directory may change during a long export. Replacing a directory deletes what it held,
  so "ours" has to be proven, not assumed.
* **A lock** (``.<name>.deployplug.lock`` beside the destination, ``flock``): two exports to
  one path (two runs, a run and the CLI) take turns instead of interleaving renames. The lock
  file is removed by its last holder; a waiter that wakes up on a removed file tries again.
* **Staging beside the destination** (``.<name>.deployplug-staging-<token>``): the same
  directory means the same filesystem, so the final step is a rename, which is atomic.
* **A marker** (``.<name>.deployplug-marker-<token>``: pid, process start time, host,
  time), written before the staging directory is made. It is the only licence to delete a
  leftover: a later export removes staging or swapped-out directories whose marker names a
  process that is gone (on this host) or that is older than :data:`STALE_AFTER_S`. An entry
  without a readable marker is never removed.
* **Permissions**: files are created privately while they are written; before publishing,
  directories get ``0o777 & ~umask`` and files ``0o666 & ~umask``, like any other tool's
  output, so teammates can read the export.
* **fsync** of every file and of the staging directory before the swap, and of the parent
  after it: a rename is only as durable as the data it points to.
* **Atomic swap**: ``renameat2(RENAME_EXCHANGE)`` swaps staging and destination in one step,
  so at every instant the destination holds the old export or the new one, complete. What was
  swapped out is checked to be ours once more, then deleted. A missing destination is created
  with ``renameat2(RENAME_NOREPLACE)``, which never clobbers.
* **Fallback** for filesystems without ``RENAME_EXCHANGE`` (EINVAL/ENOSYS/ENOTSUP): the old
  export is renamed to ``.<name>.deployplug-old-<token>``, then staging to the destination.
  Between those two renames **the destination does not exist**. If the process dies in that
  window, the next export to the path, or :func:`check_output_dir`, renames the old export
  back (when its lock is free) before doing anything else.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deployplug.errors import OutputDirectoryError

MANIFEST_FILE = "manifest.json"
#: keys every deployplug manifest has; a ``manifest.json`` without them is someone else's
MANIFEST_KEYS = ("formats", "files")
#: leftovers whose owner cannot be checked (another host) are removed after this long
STALE_AFTER_S = 24 * 3600

_MAX_MANIFEST_BYTES = 16 << 20
_MAX_MARKER_BYTES = 4096
_MAX_ENTRIES = 1000  # an export holds a handful of files; more means it is not one
_SHOWN_ENTRIES = 5
_NAME_MAX = 255  # bytes in one path component on every common Linux filesystem
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK  # a FIFO must not block a check
_LEFTOVER = re.compile(r"(?P<kind>staging|old|marker)-(?P<token>[0-9a-f]{16})")
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP}
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100
_ADVICE = "Nothing was changed. Choose a new or empty directory, or move those files yourself."

Hook = Callable[[str], None]


# ----------------------------------------------------------------------------- ownership

def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling and one rename.

    Readers see the old file or the new one, never half of either; the temporary file is
    removed when writing fails.
    """
    import tempfile

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Return ``out_dir`` as an absolute path, or raise if deployplug may not write there.

    Allowed: a path that does not exist (missing parents are created later), an empty
    directory, or a directory holding a previous deployplug export and nothing else. A file,
    a symbolic link or any other directory raises :class:`OutputDirectoryError` naming what
    is there. Nothing is created, moved or deleted, with one exception: if an earlier export
    died between the two renames of the fallback scheme (see the module docstring), its old
    export is renamed back into place first.
    """
    path = _absolute(out_dir)
    if not os.path.lexists(path):
        _restore_interrupted(path)
    _require_ours(path)
    return path


def _absolute(out_dir: str | os.PathLike[str]) -> Path:
    path = Path(os.path.abspath(os.fspath(out_dir)))
    if not path.name:
        raise OutputDirectoryError(
            f"output directory {os.fspath(out_dir)!r} resolves to {path}, which has no name "
            "(the filesystem root): deployplug replaces a directory by renaming beside it. "
            "Pass a sub-directory such as ./deploy."
        )
    if len(os.fsencode(_leftover(path, "staging", "0" * 16).name)) > _NAME_MAX:
        raise OutputDirectoryError(
            f"output directory name {path.name!r} is too long: deployplug needs room for "
            f"'.<name>.deployplug-staging-<token>' beside it. Use a shorter name.")
    try:
        return path.parent.resolve() / path.name
    except (OSError, RuntimeError) as exc:
        raise OutputDirectoryError(f"cannot resolve {path.parent}: {exc}") from exc


def _require_ours(path: Path) -> None:
    reason = _refusal(path)
    if reason is not None:
        raise OutputDirectoryError(f"deployplug will not write to {path}: {reason}. {_ADVICE}")


def _refusal(path: Path) -> str | None:
    """Why deployplug may not write to ``path``, or None when it may."""
    ancestor = path.parent
    while not os.path.exists(ancestor):  # parents are created later; the first real one counts
        ancestor = ancestor.parent
    if not os.path.isdir(ancestor):
        return f"it cannot be created because {ancestor} is a file, not a writable directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return f"{ancestor} is not writable"
    if ancestor != path.parent or not os.path.lexists(path):
        return None
    return _content_refusal(path)


def _content_refusal(path: Path) -> str | None:
    """Why the existing entry ``path`` is not deployplug's to replace, or None."""
    try:
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            return f"it is a symbolic link (to {os.readlink(path)})"
        if not stat.S_ISDIR(mode):
            return "it is a file, not a directory"
        return _directory_refusal(path)
    except OSError as exc:
        return f"it cannot be inspected ({exc.strerror})"


def _directory_refusal(path: Path) -> str | None:
    entries: dict[str, os.DirEntry[str]] = {}
    with os.scandir(path) as it:
        for entry in it:
            entries[entry.name] = entry
            if len(entries) > _MAX_ENTRIES:
                return f"it holds more than {_MAX_ENTRIES} entries ({_show(entries)})"
    if not entries:
        return None
    if MANIFEST_FILE not in entries:
        return f"it is not empty and has no {MANIFEST_FILE}; it holds {_show(entries)}"
    listed, problem = _manifest_names(path / MANIFEST_FILE)
    if listed is None:
        return f"its {MANIFEST_FILE} is not a deployplug manifest ({problem}); " \
               f"it holds {_show(entries)}"
    extra = [name for name, entry in entries.items() if name != MANIFEST_FILE
             and (name not in listed or not entry.is_file(follow_symlinks=False))]
    if extra:
        return f"besides a deployplug export it holds entries its manifest does not list: " \
               f"{_show(extra)}"
    return None


def _manifest_names(path: Path) -> tuple[set[str] | None, str]:
    """The file names a deployplug ``manifest.json`` lists, or None and why it is not one.

    Reads at most :data:`_MAX_MANIFEST_BYTES` and never follows a symbolic link.
    """
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        return None, "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            return None, "not a regular file"
        if info.st_size > _MAX_MANIFEST_BYTES:
            return None, f"{info.st_size} bytes, more than any manifest"
        raw = fh.read(_MAX_MANIFEST_BYTES + 1)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(data, dict) or any(key not in data for key in MANIFEST_KEYS):
        return None, f"not a JSON object with keys {', '.join(MANIFEST_KEYS)}"
    files = data["files"]
    if not isinstance(files, list) or not all(
            isinstance(f, dict) and isinstance(f.get("name"), str) for f in files):
        return None, "its 'files' is not a list of {'name': ...} records"
    return {f["name"] for f in files}, ""


def _show(names: Any) -> str:
    shown = sorted(names)[:_SHOWN_ENTRIES]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more > 0 else "")


# ----------------------------------------------------------------------------- writer

class ArtifactWriter:
    """Staging and atomic publication of one export to ``out_dir``.

    Construction checks ``out_dir``, takes its lock (waiting for another export to the same
    path to finish), cleans up after exports that were killed, and creates :attr:`staging`.
    Write the export there, ``manifest.json`` last, then call :meth:`publish` (or
    :meth:`publish_to` for a sibling such as ``<out_dir>.failed``) or :meth:`discard`; either
    releases the lock. As a context manager, leaving the block unpublished discards.

    ``_hook`` is for tests: it is called with the name of each step (``"marker-written"``,
    ``"staging-created"``, ``"before-swap"``, ``"moved-aside"``, ``"swapped"``,
    ``"old-removed"``) so a test can stop or kill the process there.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, _hook: Hook | None = None):
        self.out_dir = check_output_dir(out_dir)
        self._hook = _hook or (lambda step: None)
        self._token = secrets.token_hex(8)
        self._done = False
        self._made_staging = False
        self._marker = _leftover(self.out_dir, "marker", self._token)
        self.staging = _leftover(self.out_dir, "staging", self._token)
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputDirectoryError(
                f"cannot create {self.out_dir.parent}: {exc.strerror}. {_ADVICE}") from exc
        self._lock = _Lock(self.out_dir)
        try:
            _recover(self.out_dir)
            _require_ours(self.out_dir)  # another export may have landed while we waited
            _write_marker(self._marker, self.out_dir.name)
            self._hook("marker-written")
            os.mkdir(self.staging, 0o700)
            self._made_staging = True
            _fsync(self.out_dir.parent)
        except OSError as exc:
            self.discard()
            raise OutputDirectoryError(f"cannot stage an export beside {self.out_dir}: "
                                       f"{exc}. {_ADVICE}") from exc
        except BaseException:
            self.discard()
            raise
        self._hook("staging-created")

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.discard()

    def publish(self) -> Path:
        """Make ``out_dir`` hold exactly the staging directory's content; return ``out_dir``.

        A process whose working directory *is* ``out_dir`` (``export(..., ".")``) would be
        left in the swapped-out, deleted directory; it is moved into the new one.
        """
        inside = _is_cwd(self.out_dir)
        published = self._publish(self.out_dir)
        if inside:
            os.chdir(published)
        return published

    def publish_to(self, destination: str | os.PathLike[str]) -> Path:
        """Publish to a sibling of ``out_dir`` instead, under the same ownership rules."""
        self._require_open()
        dest = check_output_dir(destination)
        if dest.parent != self.out_dir.parent or dest == self.out_dir:
            raise OutputDirectoryError(
                f"cannot publish to {dest}: only a sibling of {self.out_dir} (such as "
                f"{self.out_dir.name}.failed) is on the staging directory's filesystem")
        lock = _Lock(dest)
        try:
            marker = _leftover(dest, "marker", self._token)
            staging = _leftover(dest, "staging", self._token)
            try:
                _recover(dest)
                _write_marker(marker, dest.name)
                os.rename(self.staging, staging)
            except OSError as exc:
                _unlink(marker)
                raise OutputDirectoryError(f"cannot stage an export for {dest}: {exc}") from exc
            _unlink(self._marker)
            self.staging, self._marker = staging, marker
            return self._publish(dest)
        finally:
            lock.release()

    def discard(self) -> None:
        """Delete the staging directory and marker (nothing else); a no-op once published."""
        if self._done:
            return
        try:
            if self._made_staging and os.path.isdir(self.staging) \
                    and not os.path.islink(self.staging):
                shutil.rmtree(self.staging, ignore_errors=True)
            if not os.path.lexists(self.staging):
                _unlink(self._marker)
        finally:
            self._finish()

    # -- steps

    def _publish(self, dest: Path) -> Path:
        try:
            return self._check_and_swap(dest)
        except OSError as exc:
            raise OutputDirectoryError(
                f"publishing {self.staging} to {dest} failed: {exc}. {dest} holds either its "
                "previous content or the new export, complete.") from exc

    def _check_and_swap(self, dest: Path) -> Path:
        """Check, seal, swap. A failure before the swap leaves staging for :meth:`discard`."""
        self._require_open()
        reason = _refusal(dest)
        if reason is not None:
            raise self._kept(f"{dest} changed during the export: {reason}")
        problem = _directory_refusal(self.staging) or _incomplete(self.staging)
        if problem is not None:
            raise OutputDirectoryError(
                f"refusing to publish {self.staging}: {problem}. Only a complete export "
                f"(every file listed in {MANIFEST_FILE}, nothing else) can be published.")
        _seal(self.staging, _umask())
        self._hook("before-swap")
        try:
            if os.path.lexists(dest):
                self._replace(dest)
            else:
                try:
                    _rename_noreplace(self.staging, dest)
                except OSError as exc:
                    raise self._kept(f"{dest} could not be created ({exc.strerror})"
                                     ) from exc
                self._done = True
                _fsync(dest.parent)
                self._hook("swapped")
            self._hook("old-removed")
            _unlink(self._marker)
            _fsync(dest.parent)
        finally:
            if self._done:
                self._finish()
        return dest

    def _replace(self, dest: Path) -> None:
        """Swap staging in for ``dest``; delete what was there once it is proven ours."""
        try:
            _rename_exchange(self.staging, dest)
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:
                raise
            self._replace_in_two_steps(dest)
            return
        self._done = True  # from here on staging holds what dest held: never discard it
        _fsync(dest.parent)
        self._hook("swapped")
        reason = _content_refusal(self.staging)
        if reason is not None:  # changed between the check and the swap: give it back
            _unlink(self._marker)
            _rename_exchange(self.staging, dest)
            _fsync(dest.parent)
            raise self._kept(f"{dest} changed during the export: {reason}")
        _remove_tree(self.staging)

    def _replace_in_two_steps(self, dest: Path) -> None:
        old = _leftover(dest, "old", self._token)
        os.rename(dest, old)
        self._done = True
        _fsync(dest.parent)
        self._hook("moved-aside")
        reason = _content_refusal(old)
        if reason is not None:
            _unlink(self._marker)
            os.rename(old, dest)
            raise self._kept(f"{dest} changed during the export: {reason}")
        try:
            _rename_noreplace(self.staging, dest)
        except OSError as exc:
            _unlink(self._marker)  # keep both: nothing here may be deleted automatically
            raise OutputDirectoryError(
                f"{dest} appeared while it was being replaced ({exc.strerror}); the previous "
                f"export is at {old} and the new one at {self.staging}.") from exc
        _fsync(dest.parent)
        self._hook("swapped")
        _remove_tree(old)

    def _kept(self, reason: str) -> OutputDirectoryError:
        """Stop publishing but keep the export: drop the marker so no cleanup deletes it."""
        _unlink(self._marker)
        self._done = True
        self._finish()
        return OutputDirectoryError(
            f"{reason}. Nothing there was touched; the new export was kept at {self.staging}. "
            "Move it where you want it, or export again to a new or empty directory.")

    def _require_open(self) -> None:
        if self._done:
            raise OutputDirectoryError(f"the export to {self.out_dir} was already published "
                                       "or discarded")

    def _finish(self) -> None:
        self._done = True
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.release()


def _incomplete(directory: Path) -> str | None:
    """Why ``directory`` is not a complete export: a manifest and every file it lists."""
    listed, problem = _manifest_names(directory / MANIFEST_FILE)
    if listed is None:
        return f"it has no valid {MANIFEST_FILE} ({problem})"
    missing = [name for name in listed if not os.path.isfile(directory / name)]
    return f"files its manifest lists are missing: {_show(missing)}" if missing else None


# ----------------------------------------------------------------------------- leftovers

def _leftover(path: Path, kind: str, token: str) -> Path:
    return path.with_name(f".{path.name}.deployplug-{kind}-{token}")


def _recover(path: Path, *, restore_only: bool = False) -> None:
    """Clean up after killed exports to ``path``; call with ``path``'s lock held.

    Only entries with a readable marker whose owner is gone are touched: an old export moved
    aside by the fallback scheme goes back to ``path`` if ``path`` is missing and is deleted
    otherwise; staging directories are deleted. ``restore_only`` does the first part only.
    """
    prefix = f".{path.name}.deployplug-"
    groups: dict[str, set[str]] = {}
    with os.scandir(path.parent) as it:
        for entry in it:
            match = _LEFTOVER.fullmatch(entry.name[len(prefix):]) \
                if entry.name.startswith(prefix) else None
            if match:
                groups.setdefault(match["token"], set()).add(match["kind"])
    for token, kinds in groups.items():
        marker_path = _leftover(path, "marker", token)
        marker = _read_marker(marker_path, path.name)
        if marker is None:
            if kinds == {"marker"} and not restore_only and _is_empty_file(marker_path):
                _unlink(marker_path)  # killed between creating the marker and writing it
            continue
        if not _is_stale(marker):
            continue
        old = _leftover(path, "old", token)
        if "old" in kinds and not os.path.lexists(path):
            _rename_noreplace(old, path)
            _fsync(path.parent)
            kinds.discard("old")
        if restore_only or ("old" in kinds and _content_refusal(old) is not None):
            continue
        removed = all(_remove_tree(_leftover(path, kind, token))
                      for kind in ("old", "staging") if kind in kinds)
        if removed:
            _unlink(marker_path)


def _restore_interrupted(path: Path) -> None:
    """Put back an old export that a killed fallback swap left aside (see module docstring)."""
    prefix = f".{path.name}.deployplug-old-"
    try:
        if not os.path.isdir(path.parent) or not any(
                name.startswith(prefix) for name in os.listdir(path.parent)):
            return
        try:
            lock = _Lock(path, blocking=False)
        except BlockingIOError:
            return  # an export holds the lock: it is in the middle of the swap
        try:
            _recover(path, restore_only=True)
        finally:
            lock.release()
    except OSError as exc:
        raise OutputDirectoryError(
            f"cannot restore the previous export of {path} from {prefix}*: {exc}") from exc


def _write_marker(path: Path, target: str) -> None:
    pid = os.getpid()
    record = {"kind": "deployplug-staging", "target": target, "pid": pid,
              "start": _start_time(pid), "host": socket.gethostname(), "created": time.time()}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        os.write(fd, json.dumps(record).encode())  # one small write: all of it or nothing
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)


def _read_marker(path: Path, target: str) -> dict[str, Any] | None:
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            return None
        raw = fh.read(_MAX_MARKER_BYTES + 1)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not (isinstance(data, dict) and data.get("kind") == "deployplug-staging"
            and data.get("target") == target and type(data.get("pid")) is int
            and 0 < data["pid"] < 1 << 31
            and isinstance(data.get("host"), str)
            and isinstance(data.get("created"), (int, float))):
        return None
    return data


def _is_stale(marker: dict[str, Any]) -> bool:
    """Whether a leftover's owner is gone; the caller holds the destination's lock."""
    if time.time() - marker["created"] > STALE_AFTER_S:
        return True
    if marker["host"] != socket.gethostname():
        return False
    if marker["pid"] == os.getpid() and marker.get("start") == _start_time(os.getpid()):
        return True  # a writer of ours that let go of the lock will not touch it again
    return not _process_alive(marker["pid"], marker.get("start"))


def _process_alive(pid: int, start: object) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields[0] in (b"Z", b"X"):  # killed, waiting to be reaped
        return False
    return start is None or int(fields[19]) == start  # another start time: a reused pid


def _start_time(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return None if fields is None else int(fields[19])


def _proc_stat(pid: int) -> list[bytes] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state first, start time at index 19), if any."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 and fields[19].isdigit() else None


# ----------------------------------------------------------------------------- primitives

class _Lock:
    """``flock`` on ``.<name>.deployplug.lock`` beside ``path``, removed by its holder.

    A waiter may wake up holding a file its previous holder has just removed; it then
    compares the file it locked with the one at the path and tries again.
    """

    def __init__(self, path: Path, *, blocking: bool = True):
        self.path = path.with_name(f".{path.name}.deployplug.lock")
        self._file: Any = None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            except OSError as exc:
                raise OutputDirectoryError(
                    f"cannot open the lock file {self.path}: {exc.strerror}") from exc
            handle = os.fdopen(fd, "r+b", buffering=0)  # closed (and unlocked) if dropped
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
                current = os.stat(self.path, follow_symlinks=False)
            except FileNotFoundError:
                handle.close()
                continue
            except BaseException:
                handle.close()
                raise
            if os.path.samestat(os.fstat(fd), current):
                self._file = handle
                return
            handle.close()

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is None:
            return
        try:
            if os.fstat(handle.fileno()).st_size == 0:  # never remove a file that is not ours
                _unlink(self.path)
        finally:
            handle.close()


def _seal(directory: Path, umask: int) -> None:
    """Give the staged files the user's default permissions and push them to disk."""
    with os.scandir(directory) as it:
        for entry in it:
            _chmod_and_fsync(Path(entry.path), 0o666 & ~umask)
    _chmod_and_fsync(directory, 0o777 & ~umask)


def _chmod_and_fsync(path: Path, mode: int) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask, read without changing it (os.umask would race other threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _is_empty_file(path: Path) -> bool:
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(info.st_mode) and info.st_size == 0


def _remove_tree(path: Path) -> bool:
    """Delete a directory of ours; False (and the marker stays for a later try) on failure."""
    try:
        if os.path.islink(path) or not os.path.isdir(path):
            return not os.path.lexists(path)
        shutil.rmtree(path)
    except OSError:
        return False
    return True


@functools.cache
def _renameat2() -> Any:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


def _is_cwd(path: Path) -> bool:
    try:
        return os.path.samefile(os.getcwd(), path)
    except OSError:
        return False


def _rename(src: Path, dst: Path, flags: int) -> None:
    func = _renameat2()
    if func is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available", str(src))
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_exchange(a: Path, b: Path) -> None:
    """Swap two paths in one step (Linux 3.15+, most local filesystems)."""
    _rename(a, b, _RENAME_EXCHANGE)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing if ``dst`` exists.

    Without RENAME_NOREPLACE support, ``os.rename`` after an existence check: in the moment
    between the two it could replace only an *empty* directory (POSIX refuses the rest).
    """
    try:
        _rename(src, dst, _RENAME_NOREPLACE)
        return
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)
