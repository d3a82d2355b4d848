"""Publish a small fake export with :class:`deployplug.outdir.ArtifactWriter`, for kill tests.

Usage: ``python outdir_kill_worker.py OUT_DIR LABEL N_FILES STEP [--two-step]``

``STEP`` names a writer step at which the worker prints ``PAUSED <step>`` and waits to be
killed; ``none`` runs to the end. The worker prints ``GO`` once imports are done, so a parent
can time a kill from there. ``--two-step`` makes RENAME_EXCHANGE look unsupported, as on a
filesystem without it, so the fallback scheme runs.
"""

from __future__ import annotations

import errno
import hashlib
import json
import sys
import time
from pathlib import Path

from deployplug import outdir


def export_files(label: str, count: int) -> dict[str, bytes]:
    """The files (besides the manifest) of export ``label``; sizes differ per file."""
    return {f"part{i}.bin": f"{label}:{i};".encode() * (50 * (i + 1)) for i in range(count)}


def write_export(directory: Path, label: str, count: int) -> None:
    """Write export ``label`` into ``directory``, manifest last, the way the pipeline does."""
    files = export_files(label, count)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    records = [{"name": n, "bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()}
               for n, d in files.items()]
    manifest = {"formats": {"fake": {"files": sorted(files)}}, "files": records, "label": label}
    (directory / outdir.MANIFEST_FILE).write_text(json.dumps(manifest))


def _unsupported_exchange(a: Path, b: Path) -> None:
    raise OSError(errno.EINVAL, "RENAME_EXCHANGE is not supported here", str(a))


def main(argv: list[str]) -> int:
    out_dir, label, count, step = argv[0], argv[1], int(argv[2]), argv[3]
    if "--two-step" in argv[4:]:
        outdir._rename_exchange = _unsupported_exchange

    def hook(reached: str) -> None:
        if reached == step:
            print(f"PAUSED {reached}", flush=True)
            time.sleep(600)

    print("GO", flush=True)
    with outdir.ArtifactWriter(out_dir, _hook=hook) as writer:
        write_export(writer.staging, label, count)
        writer.publish()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
