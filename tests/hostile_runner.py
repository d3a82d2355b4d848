"""Run ``deployplug.verify`` on many directories, each in its own forked process.

Used by ``test_hostile_files.py``: importing torch, onnxruntime and OpenCV takes seconds, so
this process imports them once and forks one child per case. Each child gets a hard address
space cap (so a regression fails with MemoryError instead of exhausting the machine) and a
wall-clock deadline; its peak RSS comes from ``wait4`` and its wall time is measured here, so
every case gets its own numbers.

Usage: ``python hostile_runner.py CASES.json`` where the file lists ``{"name", "dir"}``
objects; one JSON result per case is printed on its own line.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEADLINE_S = 30.0
HEADROOM_BYTES = 4 << 30


def _warm_imports() -> None:
    import cv2  # noqa: F401
    import onnxruntime  # noqa: F401

    import deployplug.exporters.caffe  # noqa: F401
    import deployplug.exporters.msnhnet  # noqa: F401
    import deployplug.exporters.onnx  # noqa: F401
    import deployplug.runtimes.opencv_caffe  # noqa: F401
    import deployplug.verification  # noqa: F401


def _vm_size() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _child(directory: str, out: str) -> None:
    from deployplug.errors import DeployError
    from deployplug.verification import verify

    limit = _vm_size() + HEADROOM_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        report = verify(directory)
        result = {"kind": "report", "passed": report.passed,
                  "integrity": getattr(report, "integrity", []),
                  "failures": report.failures, "comparisons": len(report.comparisons)}
    except DeployError as exc:
        result = {"kind": "error", "type": type(exc).__name__, "deploy_error": True,
                  "message": str(exc)}
    except BaseException as exc:  # recorded, so the test can say what escaped
        result = {"kind": "error", "type": type(exc).__name__, "deploy_error": False,
                  "message": f"{exc}\n{traceback.format_exc()}"}
    Path(out).write_text(json.dumps(result))


def run_case(name: str, directory: str) -> dict:
    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            _child(directory, out)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    status, usage, timed_out = 0, None, False
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > DEADLINE_S:
            os.kill(pid, signal.SIGKILL)
            _, status, usage = os.wait4(pid, 0)
            timed_out = True
            break
        time.sleep(0.005)
    elapsed = time.monotonic() - start
    text = Path(out).read_text()
    os.unlink(out)
    result = json.loads(text) if text else {"kind": "crash", "status": status}
    result.update(name=name, seconds=elapsed, max_rss_bytes=usage.ru_maxrss * 1024,
                  timed_out=timed_out)
    return result


def main(argv: list[str]) -> int:
    cases = json.loads(Path(argv[1]).read_text())
    _warm_imports()
    for case in cases:
        print(json.dumps(run_case(case["name"], case["dir"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
