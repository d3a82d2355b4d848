"""Hostile and damaged artifact directories: verification must stay typed and bounded.

One genuine export (ONNX, Caffe and MsnhNet of a tiny conv net) is damaged in every way the
corpus in ``hostile_corpus.py`` knows. Each case runs ``deployplug.verify`` in its own forked
process (``hostile_runner.py``) and must end in a failed report or a ``DeployError`` that
says why, in under 5 s and 1 GiB of resident memory. A sample also goes through the
``deployplug verify`` command, which must exit 1 (integrity or comparison failed) or 2 (the
directory could not be checked) with a one-line message.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hostile_corpus import CASES, build_case
from torch import nn

import deployplug as dp

MAX_SECONDS = 5.0
MAX_RSS = 1 << 30
RUNNER = Path(__file__).with_name("hostile_runner.py")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 2, 3)).eval()
    base = root / "base"
    manifest = dp.export(net, torch.randn(1, 3, 8, 8), base,
                         formats=("onnx", "caffe", "msnhnet"))
    assert manifest.passed, str(manifest.verification)
    assert dp.verify(base).passed
    return {case.name: build_case(base, root / "cases", case) for case in CASES}


@pytest.fixture(scope="module")
def results(corpus, tmp_path_factory) -> dict[str, dict]:
    listing = tmp_path_factory.mktemp("runner") / "cases.json"
    listing.write_text(json.dumps([{"name": n, "dir": str(d)} for n, d in corpus.items()]))
    proc = subprocess.run([sys.executable, str(RUNNER), str(listing)], capture_output=True,
                          text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {row["name"]: row for row in rows}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_directory_is_refused_within_bounds(case, results):
    got = results[case.name]
    assert not got["timed_out"] and got["seconds"] < MAX_SECONDS, got
    assert got["max_rss_bytes"] < MAX_RSS, got
    assert got["kind"] in ("report", "error"), got  # the child did not crash
    if got["kind"] == "error":
        assert got["deploy_error"], f"untyped {got['type']}: {got['message']}"
    if case.expect == "integrity":
        assert got["kind"] == "report" and not got["passed"], got
        assert got["comparisons"] == 0, "an artifact ran although integrity failed"
        assert any(case.match in problem for problem in got["integrity"]), got["integrity"]
    elif case.expect == "error":
        assert got["kind"] == "error", got
        assert case.match in got["message"], got["message"]
    else:
        assert got["kind"] == "report" and not got["passed"], got
        assert not got["integrity"], got["integrity"]
        assert case.match in got["failures"].get(case.fmt, ""), got["failures"]


CLI_SAMPLE = {
    "manifest_tolerance_string": 2,
    "npz_huge_sample_key/rehashed": 2,
    "symlink_dev_zero_manifest": 2,
    "fifo_for_model": 1,
    "onnx_truncated/integrity": 1,
    "msnhnet_padding_100000/rehashed": 1,
}


def test_cli_exit_codes_and_one_line_errors(corpus):
    procs = {
        name: subprocess.Popen([sys.executable, "-m", "deployplug.cli", "verify",
                                str(corpus[name])], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO)
        for name in CLI_SAMPLE
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == CLI_SAMPLE[name], (name, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert "Traceback" not in err
