"""Artifact directories: ownership, atomic replacement, leftovers, permissions, durability."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from outdir_kill_worker import export_files, write_export

from deployplug import outdir
from deployplug.errors import OutputDirectoryError
from deployplug.outdir import ArtifactWriter, check_output_dir

WORKER = Path(__file__).with_name("outdir_kill_worker.py")


# ----------------------------------------------------------------------------- helpers

def tree(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def assert_is_export(path: Path, label: str, count: int) -> None:
    """``path`` holds exactly export ``label``: same names, same bytes, nothing else."""
    got = tree(path)
    manifest = json.loads(got.pop(outdir.MANIFEST_FILE))
    assert manifest["label"] == label
    assert got == export_files(label, count)


def which_export(path: Path, options: dict[str, int]) -> str:
    """The label of the one complete export at ``path`` (fails on a mix or nothing)."""
    assert path.is_dir(), f"{path} holds no export"
    label = json.loads((path / outdir.MANIFEST_FILE).read_text())["label"]
    assert label in options
    assert_is_export(path, label, options[label])
    return label


def publish(out: str | Path, label: str, count: int = 3, **kwargs) -> Path:
    with ArtifactWriter(out, **kwargs) as writer:
        write_export(writer.staging, label, count)
        return writer.publish()


def siblings(out: Path) -> list[str]:
    """deployplug's own entries beside ``out`` (staging, markers, old exports, lock)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file()}


@pytest.fixture
def run_worker():
    """Start ``outdir_kill_worker.py``; any worker still running at teardown is killed."""
    started: list[subprocess.Popen] = []

    def start(out: Path, label: str, count: int, step: str, *extra: str) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, str(WORKER), str(out), label, str(count),
                                 step, *extra], stdout=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def wait_for(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdout is not None
    for got in proc.stdout:
        if got.startswith(line):
            return
    raise AssertionError(f"worker exited ({proc.wait()}) before printing {line!r}")


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)  # reaped: its pid is gone, as after a real crash


# ----------------------------------------------------------------------------- ownership

def test_refuses_a_directory_with_user_files(tmp_path):
    out = tmp_path / "myproject"
    (out / "src").mkdir(parents=True)
    (out / "src" / "train.py").write_text("print('mine')\n")
    (out / "notes.txt").write_text("do not delete\n")
    before = snapshot(out)
    with pytest.raises(OutputDirectoryError, match=r"myproject.*notes\.txt, src") as err:
        check_output_dir(out)
    assert "new or empty directory" in str(err.value)
    with pytest.raises(OutputDirectoryError, match="not empty"):
        publish(out, "A")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["myproject"]


def test_refuses_a_run_directory_that_holds_checkpoints(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"\x00weights")
    before = snapshot(out)
    with pytest.raises(OutputDirectoryError, match="checkpoints"):
        publish(out, "A")
    assert snapshot(out) == before


def test_refuses_a_file_at_the_path(tmp_path):
    out = tmp_path / "art"
    out.write_text("a file\n")
    with pytest.raises(OutputDirectoryError, match=r"art: it is a file"):
        publish(out, "A")
    assert out.read_text() == "a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_refuses_a_symlink_even_to_an_empty_directory(tmp_path):
    (tmp_path / "real").mkdir()
    out = tmp_path / "link"
    out.symlink_to(tmp_path / "real")
    with pytest.raises(OutputDirectoryError, match="symbolic link"):
        publish(out, "A")
    assert out.is_symlink() and list((tmp_path / "real").iterdir()) == []


@pytest.mark.parametrize("content", [
    b"not json", b"[1, 2]", b'{"name": "my project", "version": "1.0"}',
    b'{"formats": {}, "files": "model.onnx"}', b'{"formats": {}, "files": [3]}',
    b"[" * 100_000,
])
def test_refuses_a_manifest_that_is_not_deployplugs(tmp_path, content):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "manifest.json").write_bytes(content)
    with pytest.raises(OutputDirectoryError, match="not a deployplug manifest"):
        check_output_dir(out)
    assert (out / "manifest.json").read_bytes() == content


def test_refuses_an_oversized_or_linked_manifest(tmp_path, monkeypatch):
    out = tmp_path / "big"
    out.mkdir()
    write_export(out, "A", 1)
    monkeypatch.setattr(outdir, "_MAX_MANIFEST_BYTES", 16)
    with pytest.raises(OutputDirectoryError, match="more than any manifest"):
        check_output_dir(out)
    monkeypatch.undo()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "manifest.json").symlink_to(out / "manifest.json")
    with pytest.raises(OutputDirectoryError, match="symbolic link"):
        check_output_dir(linked)


def test_a_fifo_named_manifest_is_refused_without_blocking(tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    os.mkfifo(out / "manifest.json")
    with pytest.raises(OutputDirectoryError, match="not a regular file"):
        check_output_dir(out)


def test_a_name_too_long_for_the_staging_names_is_refused_up_front(tmp_path):
    with pytest.raises(OutputDirectoryError, match="too long"):
        check_output_dir(tmp_path / ("n" * 240))
    assert list(tmp_path.iterdir()) == []


def test_refuses_an_export_that_also_holds_user_files(tmp_path):
    out = publish(tmp_path / "art", "A")
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(OutputDirectoryError, match="does not list: my_notes.txt"):
        publish(out, "B")
    assert (out / "my_notes.txt").read_text() == "mine"
    assert json.loads((out / "manifest.json").read_text())["label"] == "A"


def test_accepts_missing_empty_and_previous_export(tmp_path):
    missing = tmp_path / "a" / "b" / "c"
    assert check_output_dir(missing) == missing
    assert not (tmp_path / "a").exists()  # checking creates nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_output_dir(empty) == empty
    previous = tmp_path / "prev"
    previous.mkdir()
    write_export(previous, "A", 2)
    assert check_output_dir(previous) == previous
    assert publish(missing, "B") == missing
    assert_is_export(missing, "B", 3)
    assert publish(previous, "C", 1) == previous
    assert_is_export(previous, "C", 1)


@pytest.mark.parametrize("spelling", [".", "./", "../here", "../here/", "../here//"])
def test_relative_paths_dot_and_trailing_slashes(tmp_path, monkeypatch, spelling):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert check_output_dir(spelling) == here
    assert publish(spelling, "A") == here
    # the old working directory was swapped out and deleted: the process is moved along
    assert os.path.samefile(os.getcwd(), here) and Path("manifest.json").is_file()
    assert_is_export(here, "A", 3)
    assert publish(spelling, "B") == here and Path("manifest.json").is_file()
    assert siblings(here) == []


@pytest.mark.parametrize("path", ["/", "/..", "//"])
def test_filesystem_root_is_refused_clearly(path):
    with pytest.raises(OutputDirectoryError, match="has no name.*sub-directory"):
        check_output_dir(path)


def test_parent_that_is_a_file_is_named(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    with pytest.raises(OutputDirectoryError, match=r"blocker is a file, not a writable"):
        check_output_dir(blocker / "sub" / "art")


def test_manifest_file_name_matches_the_manifest_module():
    from deployplug.manifest import MANIFEST_FILE

    assert outdir.MANIFEST_FILE == MANIFEST_FILE


# ----------------------------------------------------------------------------- publishing

def test_recheck_before_publish_keeps_both_the_users_files_and_the_export(tmp_path):
    out = tmp_path / "art"
    writer = ArtifactWriter(out)
    write_export(writer.staging, "B", 2)
    out.mkdir()
    (out / "report.docx").write_bytes(b"someone else's")
    with pytest.raises(OutputDirectoryError, match="changed during the export") as err:
        writer.publish()
    writer.discard()  # what a caller's cleanup does; must not delete the kept export
    assert tree(out) == {"report.docx": b"someone else's"}
    kept = Path(str(err.value).split("kept at ")[1].split(". ")[0])
    assert_is_export(kept, "B", 2)
    assert not (tmp_path / ".art.deployplug.lock").exists()
    publish(tmp_path / "other", "C")  # the kept export has no marker: cleanup leaves it
    assert kept.is_dir()


@pytest.mark.parametrize("two_step", [False, True])
def test_a_change_right_before_the_swap_is_swapped_back(tmp_path, monkeypatch, two_step):
    if two_step:
        monkeypatch.setattr(outdir, "_rename_exchange", _no_exchange)
    out = publish(tmp_path / "art", "A")

    def intrude(step: str) -> None:
        if step == "before-swap":
            (out / "intruder.txt").write_text("arrived after the check")

    with pytest.raises(OutputDirectoryError, match="intruder.txt") as err:
        publish(out, "B", _hook=intrude)
    assert (out / "intruder.txt").read_text() == "arrived after the check"
    assert json.loads((out / "manifest.json").read_text())["label"] == "A"
    assert "kept at" in str(err.value)


def _no_exchange(a: Path, b: Path) -> None:
    raise OSError(22, "Invalid argument", str(a))


def test_publish_to_a_sibling_for_failed_exports(tmp_path):
    out = tmp_path / "art"
    failed = tmp_path / "art.failed"
    publish(failed, "old-failure", 1)
    with ArtifactWriter(out) as writer:
        write_export(writer.staging, "F", 2)
        assert writer.publish_to(failed) == failed
    assert_is_export(failed, "F", 2)
    assert not out.exists()
    assert siblings(out) == [] and siblings(failed) == []
    with ArtifactWriter(out) as writer, pytest.raises(OutputDirectoryError, match="sibling"):
        writer.publish_to(tmp_path / "elsewhere" / "art.failed")
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.csv").write_text("1,2\n")
    with ArtifactWriter(out) as writer, pytest.raises(OutputDirectoryError, match="data.csv"):
        write_export(writer.staging, "G", 1)
        writer.publish_to(tmp_path / "user")
    assert tree(tmp_path / "user") == {"data.csv": b"1,2\n"}
    assert siblings(out) == []


def test_only_a_complete_export_is_published(tmp_path):
    out = tmp_path / "art"
    with ArtifactWriter(out) as writer:
        (writer.staging / "model.onnx").write_bytes(b"onnx")
        with pytest.raises(OutputDirectoryError, match="has no manifest.json"):
            writer.publish()
    with ArtifactWriter(out) as writer, pytest.raises(OutputDirectoryError,
                                                       match="no valid manifest.json"):
        writer.publish()  # an empty staging directory is no export either
    with ArtifactWriter(out) as writer:
        write_export(writer.staging, "A", 2)
        (writer.staging / "part1.bin").unlink()
        with pytest.raises(OutputDirectoryError, match="lists are missing: part1.bin"):
            writer.publish()
    with ArtifactWriter(out) as writer:
        write_export(writer.staging, "A", 1)
        (writer.staging / ".onnx").mkdir()  # a stray working directory
        with pytest.raises(OutputDirectoryError, match=r"does not list: \.onnx"):
            writer.publish()
    assert not out.exists() and siblings(out) == []


def test_discard_removes_only_what_it_created(tmp_path):
    out = publish(tmp_path / "art", "A")
    writer = ArtifactWriter(out)
    write_export(writer.staging, "B", 2)
    writer.discard()
    writer.discard()
    assert_is_export(out, "A", 3)
    assert siblings(out) == []
    with pytest.raises(OutputDirectoryError, match="already published or discarded"):
        writer.publish()


def test_a_lock_file_deployplug_did_not_write_stays(tmp_path):
    lock = tmp_path / ".art.deployplug.lock"
    lock.write_text("someone's notes")
    publish(tmp_path / "art", "A")
    assert lock.read_text() == "someone's notes"


# ----------------------------------------------------------------------------- permissions

@pytest.mark.parametrize("mask", [0o022, 0o027, 0o077], ids=oct)
def test_permissions_follow_the_umask(tmp_path, mask):
    previous = os.umask(mask)
    try:
        assert outdir._umask() == mask
        out = publish(tmp_path / "new" / "art", "A")
        publish(out, "B")  # the replacing path too
    finally:
        os.umask(previous)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o777 & ~mask
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}


def test_umask_read_falls_back_when_proc_is_missing(monkeypatch):
    real_open = open

    def no_proc(path, *args, **kwargs):
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr("builtins.open", no_proc)
        assert outdir._umask() == 0o027
        assert os.umask(0o027) == 0o027  # and it was left as it was
    finally:
        os.umask(previous)


# ----------------------------------------------------------------------------- durability

def test_every_file_and_directory_is_fsynced_before_the_swap(tmp_path, monkeypatch):
    out = publish(tmp_path / "art", "A")
    events: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        events.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def at(step: str) -> None:
        events.append(f"<{step}>")

    monkeypatch.setattr(os, "fsync", recording_fsync)
    with ArtifactWriter(out, _hook=at) as writer:
        staging = str(writer.staging)
        write_export(writer.staging, "B", 4)
        names = sorted(p.name for p in writer.staging.iterdir())
        writer.publish()
    sealed, swapped = events.index("<before-swap>"), events.index("<swapped>")
    assert {f"{staging}/{n}" for n in names} | {staging} <= set(events[:sealed])
    assert str(tmp_path) in events[sealed:swapped]  # the rename itself, made durable
    assert_is_export(out, "B", 4)


# ----------------------------------------------------------------------------- crashes

EXCHANGE_STEPS = ["marker-written", "staging-created", "before-swap", "swapped", "old-removed"]
TWO_STEP_STEPS = ["before-swap", "moved-aside", "swapped", "old-removed"]
OLD_AT = {"marker-written", "staging-created", "before-swap", "moved-aside"}


@pytest.mark.parametrize(("step", "two_step"),
                         [(s, False) for s in EXCHANGE_STEPS] + [(s, True) for s in TWO_STEP_STEPS])
def test_kill_at_each_step_leaves_one_complete_export(tmp_path, run_worker, step, two_step):
    out = publish(tmp_path / "art", "A", 3)
    proc = run_worker(out, "B", 5, step, *(["--two-step"] if two_step else []))
    wait_for(proc, f"PAUSED {step}")
    kill(proc)
    if step == "moved-aside":  # the documented window of the fallback: nothing at out_dir
        assert not out.exists()
        assert check_output_dir(out) == out  # ... until the recovery step puts A back
    assert which_export(out, {"A": 3, "B": 5}) == ("A" if step in OLD_AT else "B")
    publish(out, "C", 2)
    assert_is_export(out, "C", 2)
    assert siblings(out) == []


@pytest.mark.parametrize("two_step", [False, True])
def test_kill_at_random_instants_leaves_one_complete_export(tmp_path, run_worker, two_step):
    extra = ["--two-step"] if two_step else []
    out = publish(tmp_path / "art", "A", 3)
    calibration = run_worker(tmp_path / "calibration", "B", 40, "none", *extra)
    wait_for(calibration, "GO")
    go = time.monotonic()
    wait_for(calibration, "DONE")
    span = time.monotonic() - go
    assert calibration.wait(timeout=30) == 0
    rng = random.Random(1234)
    for _ in range(20):
        proc = run_worker(out, "B", 40, "none", *extra)
        wait_for(proc, "GO")
        time.sleep(rng.uniform(0, span * 1.2))
        kill(proc)
        check_output_dir(out)  # restores the old export if the fallback was cut short
        which_export(out, {"A": 3, "B": 40})
        publish(out, "A", 3)  # also cleans up after the killed worker
        assert siblings(out) == []


# ----------------------------------------------------------------------------- leftovers

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _leftover(out: Path, token: str, **fields) -> Path:
    staging = out.with_name(f".{out.name}.deployplug-staging-{token}")
    staging.mkdir()
    (staging / "partial.bin").write_bytes(b"half an export")
    record = {"kind": "deployplug-staging", "target": out.name, "pid": os.getpid(),
              "start": outdir._start_time(os.getpid()), "host": socket.gethostname(),
              "created": time.time(), **fields}
    out.with_name(f".{out.name}.deployplug-marker-{token}").write_text(json.dumps(record))
    return staging


def test_leftovers_are_removed_only_with_a_marker_and_a_gone_owner(tmp_path):
    out = tmp_path / "art"
    day_ago = time.time() - outdir.STALE_AFTER_S - 60
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _check_leftover_rules(out, day_ago, other.pid)
    finally:
        other.kill()
        other.wait()


def _check_leftover_rules(out: Path, day_ago: float, live_pid: int) -> None:
    dead = _leftover(out, "0" * 16, pid=_dead_pid())
    reused = _leftover(out, "1" * 16, pid=live_pid, start=-1)  # that pid, another process
    old = _leftover(out, "2" * 16, pid=live_pid, start=outdir._start_time(live_pid),
                    created=day_ago)
    far_old = _leftover(out, "3" * 16, host="elsewhere", created=day_ago)
    live = _leftover(out, "4" * 16, pid=live_pid, start=outdir._start_time(live_pid))
    far_live = _leftover(out, "5" * 16, host="elsewhere")
    ours = _leftover(out, "9" * 16)  # this process, which holds no writer for it any more
    other_target = _leftover(out, "6" * 16, target="art2", pid=_dead_pid())
    unmarked = out.with_name(f".{out.name}.deployplug-staging-{'7' * 16}")
    unmarked.mkdir()
    (unmarked / "keep.txt").write_text("no marker")
    empty_marker = out.with_name(f".{out.name}.deployplug-marker-{'8' * 16}")
    empty_marker.touch()
    odd = [_leftover(out, "a" * 16, pid=1 << 70), _leftover(out, "b" * 16, pid=True)]
    nested = _leftover(out, "c" * 16)
    out.with_name(f".{out.name}.deployplug-marker-{'c' * 16}").write_text("[" * 4000)
    publish(out, "A")
    for gone in (dead, reused, old, far_old, ours):
        assert not gone.exists()
        assert not Path(str(gone).replace("-staging-", "-marker-")).exists()
    for kept in (live, far_live, other_target, unmarked, nested, *odd):
        assert kept.is_dir() and any(kept.iterdir())
    assert not empty_marker.exists()  # killed between creating the marker and writing it


def test_a_killed_fallback_is_restored_by_the_next_export(tmp_path, run_worker):
    out = publish(tmp_path / "art", "A", 3)
    proc = run_worker(out, "B", 5, "moved-aside", "--two-step")
    wait_for(proc, "PAUSED moved-aside")
    kill(proc)
    assert not out.exists()
    with ArtifactWriter(out) as writer:  # recovery runs before the new export starts
        assert_is_export(out, "A", 3)
        writer.discard()
    assert_is_export(out, "A", 3)
    assert siblings(out) == []


# ----------------------------------------------------------------------------- concurrency

def test_two_threads_publish_one_after_the_other(tmp_path):
    out = tmp_path / "art"
    events: list[tuple[str, str]] = []
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(label: str) -> None:
        try:
            barrier.wait()
            with ArtifactWriter(out) as writer:
                events.append(("locked", label))
                time.sleep(0.2)  # hold the lock while the other thread is waiting for it
                write_export(writer.staging, label, 4)
                writer.publish()
                events.append(("published", label))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(label,)) for label in ("X", "Y")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    first, second = events[0][1], events[2][1]
    assert events == [("locked", first), ("published", first),
                      ("locked", second), ("published", second)]
    assert_is_export(out, second, 4)
    assert siblings(out) == []


def test_two_processes_publish_one_after_the_other(tmp_path, run_worker):
    out = tmp_path / "art"
    procs = [run_worker(out, label, 30, "none") for label in ("X", "Y")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    which_export(out, {"X": 30, "Y": 30})
    assert siblings(out) == []


def test_replace_file_is_whole_or_untouched(tmp_path, monkeypatch):
    """A file deployplug rewrites in place is the old one or the new one, never a mix, and a
    failed write leaves no temporary file behind."""
    import os

    from deployplug.outdir import replace_file

    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")
    replace_file(target, b"new")
    assert target.read_bytes() == b"new"

    def refuse(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        replace_file(target, b"newer")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]
