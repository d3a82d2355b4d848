"""Latency measurement for the benchmark scripts on a machine shared with other jobs.

Other processes on the same few cores move absolute latencies by tens of percent from one
minute to the next, so the numbers are made robust rather than fast:

* variants of one comparison are timed interleaved (round-robin, start rotated each round), so
  a disturbance hits all of them alike, and paired per-round ratios cancel what they share;
* the CPU time other processes used is read from /proc/stat around every group; before a group
  we wait for a quiet moment, and a group that still saw too much foreign load is re-run,
  keeping the least loaded attempt and reporting its load next to its numbers;
* cells report median and p25-p75 instead of a mean that one preempted call can drag.

Times are kept in seconds; the text helpers print milliseconds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

HZ = os.sysconf("SC_CLK_TCK")

Times = dict[str, list[float]]


# ------------------------------------------------------------------------------ load probe


def _machine_jiffies() -> tuple[int, int]:
    """(busy, steal) jiffies of the whole machine since boot.

    Busy excludes idle, iowait and steal: steal is time the hypervisor gave to other guests,
    which slows us down like foreign load but is not a process here, so it is reported apart.
    """
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return user + nice + system + irq + softirq, steal


def _own_cpu() -> float:
    """CPU seconds of this process and its children: subtracted so only *others* count."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadProbe:
    """Context manager: cores used by other processes (and stolen) over the ``with`` block."""

    others: float = 0.0
    steal: float = 0.0

    def __enter__(self) -> LoadProbe:
        self.busy0, self.steal0 = _machine_jiffies()
        self.own0, self.wall0 = _own_cpu(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        busy, steal = _machine_jiffies()
        wall = max(time.perf_counter() - self.wall0, 1e-9)
        own = _own_cpu() - self.own0
        self.others = max(0.0, ((busy - self.busy0) / HZ - own) / wall)
        self.steal = (steal - self.steal0) / HZ / wall


def wait_for_quiet(max_load: float, quiet_s: float = 2.0, timeout_s: float = 300.0) -> float:
    """Block until others used <= ``max_load`` cores for ``quiet_s``; return seconds waited.

    Starting a group in a quiet moment makes a clean attempt likelier than retrying blindly;
    the timeout keeps a machine that is never quiet from stalling the run (the group is then
    timed anyway and its load reported).
    """
    start = time.perf_counter()
    while time.perf_counter() - start < timeout_s:
        with LoadProbe() as probe:
            time.sleep(quiet_s)
        if probe.others <= max_load:
            break
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------- groups


@dataclass
class GroupResult:
    """Per-variant call times (s) of one group and the load of the attempt that was kept."""

    times: Times
    others: float
    steal: float
    attempt: int
    waited: float

    def load_text(self) -> str:
        """The load line printed next to a group, so a reader can judge its numbers."""
        return (f"other processes {self.others:.2f} cores, steal {self.steal:.2f}, "
                f"attempt {self.attempt}, waited {self.waited:.0f} s for quiet")


def least_loaded(measure: Callable[[], Times], max_load: float = 0.3, attempts: int = 4,
                 warm: Callable[[], object] | None = None,
                 quiet_timeout_s: float = 300.0) -> GroupResult:
    """Run ``measure`` under a load probe until others used <= ``max_load`` cores.

    Each attempt first waits for quiet, then calls ``warm`` (outside the probe: only the timed
    calls should be judged by the load they saw), then ``measure``. When every attempt was
    loaded, the least loaded one is returned rather than failing, with its load on record.
    """
    best: GroupResult | None = None
    for attempt in range(1, attempts + 1):
        waited = wait_for_quiet(max_load, timeout_s=quiet_timeout_s)
        if warm is not None:
            warm()
        with LoadProbe() as probe:
            times = measure()
        res = GroupResult(times, probe.others, probe.steal, attempt, waited)
        if best is None or res.others < best.others:
            best = res
        if res.others <= max_load:
            break
    assert best is not None
    return best


def _timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
                max_load: float = 0.3, attempts: int = 4,
                quiet_timeout_s: float = 300.0) -> GroupResult:
    """Round-robin timing with the start rotated each round, after ``warmup`` rounds.

    Rotating the start keeps any variant from always running first (cold caches) or right
    after the same neighbour; the times of round ``r`` line up across variants for pairing.
    """
    names = list(fns)

    def warm() -> None:
        for _ in range(warmup):
            for n in names:
                fns[n]()

    def measure() -> Times:
        times: Times = {n: [] for n in names}
        for r in range(rounds):
            for i in range(len(names)):
                n = names[(r + i) % len(names)]
                times[n].append(_timed(fns[n]))
        return times

    return least_loaded(measure, max_load, attempts, warm, quiet_timeout_s)


def alone(fns: dict[str, Callable[[], object]], rounds: int, warmup: int,
          max_load: float = 0.3, attempts: int = 4,
          quiet_timeout_s: float = 300.0) -> GroupResult:
    """Each function timed in its own block, in the order A B C C B A (half the rounds each).

    For absolute numbers of configurations that disturb each other when interleaved (e.g.
    spinning thread pools); the mirrored order spreads slow drift evenly over the variants.
    """
    names = list(fns)

    def measure() -> Times:
        times: Times = {n: [] for n in names}
        for n in names + names[::-1]:
            for _ in range(warmup):
                fns[n]()
            for _ in range(max(1, rounds // 2)):
                times[n].append(_timed(fns[n]))
        return times

    return least_loaded(measure, max_load, attempts, quiet_timeout_s=quiet_timeout_s)


# ---------------------------------------------------------------------------------- report


def quartiles_ms(ts: list[float]) -> tuple[float, float, float]:
    """(p25, median, p75) in ms: the spread tells whether a difference is noise."""
    p25, p50, p75 = np.percentile(np.array(ts) * 1e3, [25, 50, 75])
    return float(p25), float(p50), float(p75)


def cell(ts: list[float]) -> str:
    """``median ms [p25-p75] (n=N)``."""
    p25, p50, p75 = quartiles_ms(ts)
    return f"{p50:.2f} ms [{p25:.2f}-{p75:.2f}] (n={len(ts)})"


def median_ms(ts: list[float]) -> float:
    """Median of call times in ms."""
    return statistics.median(ts) * 1e3


def ratio(res: GroupResult, a: str, b: str) -> tuple[float, float, float, float]:
    """(ratio of medians, paired median, paired p25, paired p75) of a / b.

    Paired ratios divide times of the same round, so load that hit both calls cancels; the
    ratio of medians is the plain summary. Both are given because they disagree under noise.
    """
    paired = np.array(res.times[a]) / np.array(res.times[b])
    p25, p50, p75 = np.percentile(paired, [25, 50, 75])
    return median_ms(res.times[a]) / median_ms(res.times[b]), float(p50), float(p25), float(p75)


def ratio_text(res: GroupResult, a: str, b: str) -> str:
    """``R.RRx (paired M.MMx [p25-p75])``."""
    r, p50, p25, p75 = ratio(res, a, b)
    return f"{r:.2f}x (paired {p50:.2f}x [{p25:.2f}-{p75:.2f}])"


# ------------------------------------------------------------------------------ onnxruntime


def ort_session(path: Path, threads: int = 2, spinning: bool = False,
                log_severity: int | None = None) -> ort.InferenceSession:
    """A CPU session with a fixed thread setup, so runs on different days compare.

    ``spinning=False`` sets ``session.intra_op.allow_spinning=0``: idle workers of one session
    would otherwise busy-wait and take a core from the session being timed next to it.
    ``log_severity`` 3 hides onnxruntime's warnings; ``None`` keeps its default.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if log_severity is not None:
        opts.log_severity_level = log_severity
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
