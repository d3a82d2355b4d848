"""The callback's folder of exports: tags, ownership and the checkpoint each export came from.

A DeployCallback writes one sub-folder per export (``final``, or a checkpoint's stem) under
one root. It may later delete an export whose checkpoint ModelCheckpoint deleted, and skip
one it already wrote, and both decisions are read from the export's own ``manifest.json``,
never from memory alone: a folder is deleted only when its manifest says this callback wrote
it from that checkpoint and it holds nothing but the files the manifest lists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from deployplug.errors import OutputDirectoryError

FINAL_TAG = "final"
_MANIFEST_CAP = 16 << 20


def checkpoint_tag(path: str) -> str:
    """The export folder name of a checkpoint: its stem, kept apart from the final export."""
    stem = Path(path).stem
    return stem if stem != FINAL_TAG else f"{FINAL_TAG}-checkpoint"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` as a dict, or None when it is missing, oversized or not JSON."""
    from deployplug.manifest import MANIFEST_FILE

    path = folder / MANIFEST_FILE
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MANIFEST_CAP:
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def passed_export_of(folder: Path, tag: str, sha256: str) -> dict[str, Any] | None:
    """The manifest of ``folder`` when it is a passed export of exactly this checkpoint."""
    manifest = read_manifest(folder) or {}
    extra = manifest.get("extra") or {}
    if manifest.get("passed") is not True or extra.get("checkpoint_sha256") != sha256 \
            or extra.get("tag") != tag:
        return None
    return manifest


def owned_export(folder: Path, source: str, tag: str) -> bool:
    """Whether ``folder`` is an export written from ``source`` under ``tag``, and nothing else."""
    from deployplug.manifest import MANIFEST_FILE

    if folder.is_symlink() or not folder.is_dir():
        return False
    manifest = read_manifest(folder)
    extra = (manifest or {}).get("extra") or {}
    if manifest is None or extra.get("source_checkpoint") != source or extra.get("tag") != tag:
        return False
    listed = {f.get("name") for f in manifest.get("files", []) if isinstance(f, dict)}
    present = {p.name for p in folder.iterdir()}
    return present <= listed | {MANIFEST_FILE}


def require_writable_folder(root: Path) -> None:
    """``root`` (the folder of exports) is a writable directory or can be created as one."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if root.is_symlink() or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "a file" if existing.exists() and not existing.is_dir() else "not writable"
        raise OutputDirectoryError(
            f"DeployCallback cannot write its exports under {root}: {existing} is {what}. "
            "Pass a writable DeployCallback(dirpath=...) or fix the permissions")
