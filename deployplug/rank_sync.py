"""Rank-zero work that the other ranks wait for without timing out.

Under DDP, rank zero exports while the other ranks wait for its outcome. Waiting on the
training process group is a trap: its timeout (30 minutes by default, often set lower) is
shorter than an export plus validation parity on a real validation set, so the waiting ranks
give up and the launcher kills rank zero mid-export. The waiting therefore happens on a
dedicated gloo group created for it, with its own, long timeout.

The group must be created by every rank, collectively and in the same order, which is why
:meth:`ExportSync.open` is called from a Lightning hook that all ranks run (``setup``).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch.distributed as dist


def distributed_world() -> int:
    """The number of processes in the default group (1 when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class ExportSync:
    """Broadcasts rank zero's verdicts on a group whose timeout outlasts any export."""

    def __init__(self, timeout_s: float):
        if not timeout_s > 0:
            raise ValueError(f"export_timeout must be a positive number of seconds, got "
                             f"{timeout_s}")
        self.timeout = timedelta(seconds=float(timeout_s))
        self.group: Any = None

    def open(self) -> None:
        """Create the waiting group (collective: every rank must call this)."""
        if self.group is None and distributed_world() > 1:
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)

    def close(self) -> None:
        if self.group is not None:
            group, self.group = self.group, None
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group(group)

    def broadcast(self, obj: Any, fallback: Any = None) -> Any:
        """Rank zero's ``obj`` on every rank.

        ``fallback`` (``strategy.broadcast``) serves single-process runs and runs whose group
        was never opened (a hook that ran outside ``fit``).
        """
        if self.group is None:
            return obj if fallback is None else fallback(obj, src=0)
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
