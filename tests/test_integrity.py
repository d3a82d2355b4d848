"""Verification proves integrity before numbers, with the caller's tolerance.

Each forgery below would pass a purely numeric re-check (several tests show that by
re-recording the hashes, after which the numbers agree); only the manifest's names, sizes and
sha256 catch them, and they must do so before any artifact is run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import deployplug as dp
from deployplug.errors import ArtifactFormatError, IntegrityError, VerificationError
from deployplug.integrity import plain_name_problem, sha256_file
from deployplug.limits import BUDGET_ENV, Limits
from deployplug.manifest import load_manifest
from deployplug.verification import DEFAULT_TOLERANCE

REPO = Path(__file__).resolve().parents[1]


def conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 2, 3)).eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("integrity")
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dp.export(conv_net(0), x, root / "all", formats=("onnx", "caffe", "msnhnet"))
    dp.export(conv_net(0), x, root / "a", formats=("onnx",))
    dp.export(conv_net(1), x, root / "b", formats=("onnx",))
    return {"all": root / "all", "a": root / "a", "b": root / "b"}


@pytest.fixture
def copy_of(exports, tmp_path):
    def make(name: str) -> Path:
        return Path(shutil.copytree(exports[name], tmp_path / name))
    return make


def edit_manifest(d: Path, fn) -> None:
    data = json.loads((d / "manifest.json").read_text())
    fn(data)
    (d / "manifest.json").write_text(json.dumps(data))


def record_hash(d: Path, name: str, path: Path | None = None) -> None:
    """What a forger would do: re-record a file's size and sha256 in the manifest."""
    blob = (path or d / name).read_bytes()

    def fix(data):
        for entry in data["files"]:
            if entry["name"] == name:
                entry.update(bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    edit_manifest(d, fix)


def test_intact_directory_passes_and_keeps_the_callers_tolerance(exports):
    report = dp.verify(exports["all"])
    assert report.passed and report.integrity == []
    assert set(report.formats()) == {"onnx", "caffe", "msnhnet"}
    assert report.tolerance == DEFAULT_TOLERANCE
    assert report.to_dict()["integrity"] == []


def test_edited_prototxt_fails_integrity_and_runs_nothing(copy_of):
    d = copy_of("all")
    with open(d / "model.prototxt", "a") as fh:
        fh.write("# harmless-looking edit\n")
    report = dp.verify(d)
    assert not report.passed
    assert report.comparisons == [] and report.failures == {}
    assert len(report.integrity) == 1 and report.integrity[0].startswith("model.prototxt:")
    assert "integrity FAILED" in str(report) and "model.prototxt" in str(report)
    assert report.to_dict()["passed"] is False
    with pytest.raises(IntegrityError, match="model.prototxt") as info:
        dp.verify(d, raise_on_failure=True)
    assert info.value.report.integrity == report.integrity


def test_onnx_weight_nudged_by_1e6_is_caught_by_sha256(copy_of):
    d = copy_of("all")
    proto = onnx.load(str(d / "model.onnx"))
    weight = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
    array = onnx.numpy_helper.to_array(weight).copy()
    array.flat[0] += np.float32(1e-6)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    (d / "model.onnx").write_bytes(proto.SerializeToString())
    report = dp.verify(d)
    assert not report.passed and report.comparisons == []
    assert any(p.startswith("model.onnx:") and "sha256" in p for p in report.integrity)
    # the nudge is far below the tolerance: only the hash can tell
    record_hash(d, "model.onnx")
    assert dp.verify(d).passed


def test_model_and_reference_swapped_in_from_another_export(copy_of, exports):
    d = copy_of("a")
    for name in ("model.onnx", "reference.npz"):
        shutil.copyfile(exports["b"] / name, d / name)
    report = dp.verify(d)
    assert not report.passed and report.comparisons == []
    named = {p.split(":")[0] for p in report.integrity}
    assert named == {"model.onnx", "reference.npz"}
    assert all("sha256" in p or "size" in p for p in report.integrity)
    # the swapped pair agrees with itself, so a numbers-only check would pass it
    record_hash(d, "model.onnx")
    record_hash(d, "reference.npz")
    assert dp.verify(d).passed


@pytest.mark.parametrize("kind,reason", [
    ("parent", "path separator"), ("absolute", "absolute path"), ("empty", "is empty"),
    ("dotdot", "names a directory"), ("subdir", "path separator"),
])
def test_manifest_names_outside_the_directory_are_refused(copy_of, tmp_path, kind, reason):
    d = copy_of("a")
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(d / "model.onnx", other / "model.onnx")
    name = {"parent": "../other/model.onnx", "absolute": str(other / "model.onnx"),
            "empty": "", "dotdot": "..", "subdir": "other/model.onnx"}[kind]
    blob = (other / "model.onnx").read_bytes()

    def point_outside(data):
        data["formats"]["onnx"]["files"] = [name]
        for entry in data["files"]:
            if entry["name"] == "model.onnx":
                entry.update(name=name, bytes=len(blob), sha256=hashlib.sha256(blob).hexdigest())
    edit_manifest(d, point_outside)
    report = dp.verify(d)
    assert not report.passed and report.comparisons == []
    assert any(reason in p and repr(name) in p for p in report.integrity), report.integrity


def test_manifest_tolerance_never_loosens_the_check(copy_of):
    d = copy_of("a")
    with np.load(d / "reference.npz") as data:
        arrays = {k: (v * 1.01 if "_out" in k else v) for k, v in data.items()}
    np.savez(d / "reference.npz", **arrays)
    record_hash(d, "reference.npz")
    edit_manifest(d, lambda m: m.update(tolerance=1e308))
    report = dp.verify(d)
    assert not report.passed and report.integrity == []
    assert report.tolerance == DEFAULT_TOLERANCE and report.recorded_tolerance == 1e308
    assert "not used" in str(report) and "MISMATCH" in str(report)
    assert not dp.verify(d, tolerance=1e-3).passed  # the caller's, never the file's
    assert dp.verify(d, tolerance=0.05).passed
    with pytest.raises(VerificationError):
        dp.verify(d, raise_on_failure=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1e-5", True])
def test_caller_tolerance_must_be_a_finite_number(exports, bad):
    with pytest.raises(ValueError, match="tolerance"):
        dp.verify(exports["a"], tolerance=bad)


def test_every_used_file_must_be_listed(copy_of):
    d = copy_of("a")
    edit_manifest(d, lambda m: m.update(files=[f for f in m["files"]
                                               if f["name"] != "reference.npz"]))
    report = dp.verify(d)
    assert any(p.startswith("'reference.npz'") and "not listed" in p for p in report.integrity)
    d = copy_of("all")
    shutil.copyfile(d / "model.onnx", d / "other.onnx")
    edit_manifest(d, lambda m: m["formats"]["onnx"].update(files=["other.onnx"]))
    report = dp.verify(d)
    assert any(p.startswith("'other.onnx'") and "not listed" in p for p in report.integrity)
    assert report.comparisons == []


@pytest.mark.parametrize("kind,reason", [
    ("symlink", "symbolic link"), ("directory", "a directory"), ("fifo", "a FIFO"),
    ("missing", "missing"), ("longer", "size"),
])
def test_listed_files_must_be_the_regular_files_recorded(copy_of, tmp_path, kind, reason):
    d = copy_of("a")
    target = d / "model.onnx"
    blob = target.read_bytes()
    target.unlink()
    if kind == "symlink":  # even a link to identical bytes is refused
        (tmp_path / "same.onnx").write_bytes(blob)
        target.symlink_to(tmp_path / "same.onnx")
    elif kind == "directory":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "longer":
        target.write_bytes(blob + b"\0")
    report = dp.verify(d)
    assert not report.passed and report.comparisons == []
    assert report.integrity == [p for p in report.integrity if p.startswith("model.onnx")]
    assert reason in report.integrity[0]


def _finishes(fn, seconds: float = 10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it blocks."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # handed back to the test
            outcome["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked"
    return outcome


def test_hashing_never_blocks_on_a_fifo_swapped_in_after_lstat(tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    outcome = _finishes(lambda: sha256_file(fifo, 10))
    assert isinstance(outcome.get("error"), ArtifactFormatError)
    assert "FIFO" in str(outcome["error"])
    link = tmp_path / "zero"
    link.symlink_to("/dev/zero")
    outcome = _finishes(lambda: sha256_file(link, 10))
    assert isinstance(outcome.get("error"), ArtifactFormatError)


@pytest.fixture(scope="module")
def scratch(exports, tmp_path_factory) -> Path:
    """A private copy the property test damages and restores example by example."""
    return Path(shutil.copytree(exports["all"], tmp_path_factory.mktemp("flip") / "all"))


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_flipped_byte_is_reported_for_its_file(scratch, data):
    d = scratch
    entries = json.loads((d / "manifest.json").read_text())["files"]
    entry = data.draw(st.sampled_from(entries))
    path = d / entry["name"]
    blob = path.read_bytes()
    offset = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    damaged = bytearray(blob)
    damaged[offset] ^= flip
    path.write_bytes(bytes(damaged))
    try:
        report = dp.verify(d)
    finally:
        path.write_bytes(blob)
    assert report.comparisons == [] and not report.passed
    assert [p.split(":")[0] for p in report.integrity] == [entry["name"]]
    assert "sha256" in report.integrity[0]


@given(st.text(min_size=0, max_size=12))
def test_accepted_names_stay_inside_the_directory(name):
    base = Path("/srv/artifacts/run")
    if plain_name_problem(name) is None:
        assert (base / name).parent == base and (base / name).name == name
    else:
        assert name in ("", ".", "..") or "/" in name or "\\" in name or "\x00" in name


def test_an_in_memory_manifest_is_checked_too(tmp_path):
    manifest = dp.export(conv_net(0), torch.randn(1, 3, 8, 8), tmp_path / "m")
    with open(manifest.artifact("onnx"), "ab") as fh:
        fh.write(b"\0")
    report = dp.verify(manifest)
    assert report.integrity and report.integrity[0].startswith("model.onnx")


def test_manifest_fields_are_type_checked_with_the_field_named(copy_of):
    d = copy_of("a")
    edit_manifest(d, lambda m: m.update(tolerance="1e-5"))
    with pytest.raises(ArtifactFormatError) as info:
        load_manifest(d)
    assert str(info.value) == "manifest.json: field 'tolerance' must be a number, got str"
    (d / "manifest.json").write_text('{"tolerance": NaN}')
    with pytest.raises(ArtifactFormatError, match="not valid JSON"):
        dp.verify(d)


def test_tensor_budget_from_argument_and_environment(exports, monkeypatch):
    with pytest.raises(ArtifactFormatError, match="budget"):
        dp.verify(exports["a"], max_bytes=100)
    monkeypatch.setenv(BUDGET_ENV, "100")
    assert Limits.resolve().max_tensor_bytes == 100
    with pytest.raises(ArtifactFormatError, match=BUDGET_ENV):
        dp.verify(exports["a"])
    assert dp.verify(exports["a"], max_bytes=1 << 20).passed  # the argument wins
    monkeypatch.setenv(BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=BUDGET_ENV):
        dp.verify(exports["a"])


def test_cli_integrity_failure_exits_1_with_one_line(copy_of):
    d = copy_of("a")
    with open(d / "reference.npz", "ab") as fh:
        fh.write(b"\0")
    proc = subprocess.run([sys.executable, "-m", "deployplug.cli", "verify", str(d)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("\n") == 1 and "integrity" in proc.stderr
    assert "reference.npz" in proc.stderr and "integrity FAILED" in proc.stdout


def test_cli_tolerance_help_says_the_manifest_value_is_not_used(capsys):
    from deployplug.cli import main

    assert main(["verify", "--help"]) == 0  # help is printed and the command exits cleanly
    text = " ".join(capsys.readouterr().out.split())
    assert "--tolerance" in text and "only reported, never used" in text
    assert "--max-bytes" in text


# ----------------------------------------------------------------------------- telemetry
@pytest.fixture
def session_log(monkeypatch) -> list[str]:
    import onnxruntime as ort

    log: list[str] = []
    real_disable, real_session = ort.disable_telemetry_events, ort.InferenceSession

    def disable():
        log.append("telemetry off")
        real_disable()

    def session(*args, **kwargs):
        log.append("session")
        return real_session(*args, **kwargs)
    monkeypatch.setattr(ort, "disable_telemetry_events", disable)
    monkeypatch.setattr(ort, "InferenceSession", session)
    return log


def test_every_session_starts_with_telemetry_off(exports, session_log):
    from deployplug.runtimes.onnxruntime import make_session, make_session_from_bytes

    path = exports["a"] / "model.onnx"
    make_session(path)
    make_session_from_bytes(path.read_bytes())
    assert dp.verify(exports["a"]).passed
    assert session_log.count("session") >= 3  # the factory's two, and verify's (one per sample)
    assert all(session_log[i - 1] == "telemetry off"
               for i, what in enumerate(session_log) if what == "session")


def test_onnx_parity_session_starts_with_telemetry_off(tmp_path, session_log):
    from deployplug.callback import onnx_parity

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).eval()
    manifest = dp.export(net, torch.randn(2, 1, 6, 6), tmp_path / "p",
                         onnx_options={"dynamic_batch": True})
    session_log.clear()
    loader = [(torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0]))]
    onnx_parity(manifest.artifact("onnx"), net, loader)
    assert session_log[:2] == ["telemetry off", "session"]


def test_only_the_session_factory_creates_onnxruntime_sessions():
    package = REPO / "deployplug"
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if "InferenceSession(" in p.read_text())
    assert users == ["runtimes/onnxruntime.py"]
