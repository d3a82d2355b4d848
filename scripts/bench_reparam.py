"""What re-parameterization buys: RepVGG-A0 latency in training form, fused, and as a plain VGG.

Measures, in one run, on batch 1 x 3 x 224 x 224:

* correctness: fused vs training form (fp32), plain vs fused, onnxruntime vs PyTorch;
* PyTorch eager latency of the three forms (train/fused, fused/plain ratios);
* onnxruntime latency of the three exported forms (train/fused, fused/plain ratios);
* the time ``deployplug.reparam.reparameterize`` takes for the whole model;
* the generic linear-region pass: RepVGG-A0 written *without* fusion methods (every block a
  subclass with them removed) fused by the generic pass, against the same model fused by the
  blocks' own methods (both times and their ratio, with and without the deep copy), and where
  each path spends its time (median per phase: copy, block methods, trace, classify, find
  regions, compose, build conv, structure key, float64 check, conv->BN fold, other);
* onnxruntime latency of small ACB / DBB / MobileOne nets (blocks from
  ``tests/paper_blocks.py``, no fusion methods) after the generic pass, against the same
  convolutions rebuilt by hand as a plain ``nn.Sequential``.

Method (the machine is usually shared, so noise control matters more than raw speed):

* each comparison group is timed interleaved: round-robin, the start rotated each round,
  after warm-up calls; cells give median [p25-p75] (n) and ratios are given both as the ratio
  of medians and as the median of per-round paired ratios;
* foreign CPU use (from /proc/stat, minus this process and its children) is measured around
  every group; before a group the script waits for a quiet moment, and it re-runs a group when
  other processes used more than ``--max-load`` cores (the least loaded attempt is kept and
  its load is printed);
* interleaved ORT sessions run with ``session.intra_op.allow_spinning=0``: idle spinning
  workers of one session would otherwise steal a core from the session being timed. Each
  ORT session is also timed alone with default (spinning) threads for absolute numbers.

Usage: python scripts/bench_reparam.py [--rounds 30] [--json out.json] [--workdir DIR]
       [--only generic]   (just the generic-pass sections)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx.numpy_helper
import onnxruntime as ort
import torch
from timing import (
    Times,
    alone,
    cell,
    interleaved,
    least_loaded,
    median_ms,
    ort_session,
    ratio,
    ratio_text,
)
from torch import nn

from deployplug import models
from deployplug.blocks import RepVGGBlock
from deployplug.reparam import ReparamReport, generic, passes, reparameterize
from deployplug.reparam.report import count_ops
from deployplug.testing import normalized_error, randomize_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import paper_blocks  # noqa: E402  - third-party-style blocks without fusion methods

# ------------------------------------------------------------------------------ models

def plain_vgg(fused: nn.Module) -> nn.Module:
    """The deploy form rebuilt by hand: Conv2d+ReLU pairs carrying the fused weights."""
    layers: list[nn.Module] = []
    for block in fused.modules():
        if isinstance(block, RepVGGBlock):
            src = block.reparam
            conv = nn.Conv2d(src.in_channels, src.out_channels, src.kernel_size, src.stride,
                             src.padding, src.dilation, src.groups, bias=True)
            conv.weight.data.copy_(src.weight.data)
            conv.bias.data.copy_(src.bias.data)
            layers += [conv, nn.ReLU()]
    head = nn.Linear(fused.linear.in_features, fused.linear.out_features)
    head.load_state_dict(fused.linear.state_dict())
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), head]
    return nn.Sequential(*layers).eval()


class MethodlessRepVGGBlock(RepVGGBlock):
    """The same block with its fusion method removed, as third-party code would ship it."""

    reparameterize = None
    fusion_reads_only = False  # no method reads the branches, so a copy must own them


def without_methods(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose RepVGG blocks have no fusion method."""
    copy_ = copy.deepcopy(model)
    for module in copy_.modules():
        if isinstance(module, RepVGGBlock):
            module.__class__ = MethodlessRepVGGBlock
    return copy_


def plain_from(fused: nn.Module) -> nn.Module:
    """The convs and ReLUs of a fused chain of blocks, copied into a plain nn.Sequential."""
    layers: list[nn.Module] = []
    for module in fused.modules():
        if isinstance(module, nn.Conv2d):
            conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                             module.stride, module.padding, module.dilation, module.groups,
                             bias=True)
            conv.load_state_dict(module.state_dict())
            layers.append(conv)
        elif isinstance(module, nn.ReLU):
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def block_nets(width: int) -> dict[str, nn.Module]:
    """Small nets of third-party-style blocks (training form, random BN statistics)."""
    pb = paper_blocks

    def acb() -> nn.Module:
        layers: list[nn.Module] = [pb.ACB(3, width, 2), nn.ReLU()]
        for _ in range(3):
            layers += [pb.ACB(width, width), nn.ReLU()]
        return nn.Sequential(*layers)

    def dbb() -> nn.Module:
        layers: list[nn.Module] = [pb.DBB(3, width, 3, 2), nn.ReLU()]
        for _ in range(3):
            layers += [pb.DBB(width, width), nn.ReLU()]
        return nn.Sequential(*layers)

    def mobileone() -> nn.Module:
        return nn.Sequential(pb.MobileOneBlock(3, width, 2),
                             *[pb.MobileOneBlock(width, width) for _ in range(3)])

    torch.manual_seed(0)
    return {name: randomize_batchnorm(build(), seed=1).eval()
            for name, build in (("ACB", acb), ("DBB", dbb), ("MobileOne", mobileone))}


def same_onnx(a: Path, b: Path) -> str:
    """Whether two ONNX files run the same ops with the same attributes and weights (then any
    latency difference between them is measurement noise)."""
    ga, gb = onnx.load(str(a)).graph, onnx.load(str(b)).graph

    def ops(g: onnx.GraphProto) -> list[tuple[str, list[bytes]]]:
        return [(n.op_type, sorted(att.SerializeToString() for att in n.attribute))
                for n in g.node]

    def weights(g: onnx.GraphProto) -> list[bytes]:
        return sorted(onnx.numpy_helper.to_array(t).tobytes() for t in g.initializer)

    if ops(ga) != ops(gb):
        return "different ops or attributes"
    return "identical ops, attributes and weights" if weights(ga) == weights(gb) else (
        "same ops and attributes, different weights")


def export(model: nn.Module, x: torch.Tensor, path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"])
    elapsed = time.perf_counter() - t0
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    desc = f"{sum(ops.values())} nodes: " + ", ".join(f"{k} {v}" for k, v in ops.most_common())
    return elapsed, desc


# -------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-load", type=float, default=0.3)
    ap.add_argument("--attempts", type=int, default=4)
    ap.add_argument("--fusion-runs", type=int, default=10)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--only", choices=("all", "generic"), default="all")
    ap.add_argument("--block-width", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=112)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows: list[tuple[str, str]] = []
    raw: dict[str, object] = {}

    def add(metric: str, value: str) -> None:
        rows.append((metric, value))
        print(f"{metric}: {value}", flush=True)

    add("machine", f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"onnxruntime {ort.__version__}, onnx {onnx.__version__}")
    add("threads", f"torch {args.threads} intra-op; ORT intra_op_num_threads={args.threads}, "
        "inter_op 1, sequential")

    train = randomize_batchnorm(models.build("repvgg_a0"), seed=0).eval()
    x = torch.randn(1, 3, 224, 224)
    checks: list[tuple[str, bool]] = []
    generic_section(args, train, x, add, raw, checks)
    if args.only == "generic":
        return finish(args, rows, raw, checks, add)

    # ---- fusion time
    def fuse_copy() -> None:
        reparameterize(train)

    fusion = interleaved({"reparameterize(model)": fuse_copy}, args.fusion_runs, 2,
                         args.max_load, args.attempts)
    add("fusion time, whole A0, reparameterize(model) (copy + blocks + conv/BN pass)",
        f"{cell(fusion.times['reparameterize(model)'])}; {fusion.load_text()}")

    def fuse_inplace() -> Times:  # the copy is not timed, so interleaved() does not fit
        times = []
        for _ in range(args.fusion_runs):
            victim = copy.deepcopy(train)
            t0 = time.perf_counter()
            reparameterize(victim, inplace=True)
            times.append(time.perf_counter() - t0)
        return {"inplace": times}

    inplace = least_loaded(fuse_inplace, args.max_load, args.attempts)
    inplace_times = inplace.times["inplace"]
    add("fusion time, whole A0, reparameterize(model, inplace=True) (copy not timed)",
        f"{cell(inplace_times)}; other processes {inplace.others:.2f} cores")
    raw["fusion_s"] = fusion.times["reparameterize(model)"]
    raw["fusion_inplace_s"] = inplace_times

    fused = reparameterize(train)
    plain = plain_vgg(fused)
    n_train = sum(p.numel() for p in train.parameters())
    n_fused = sum(p.numel() for p in fused.parameters())
    add("params train / fused", f"{n_train / 1e6:.2f}M / {n_fused / 1e6:.2f}M")

    # ---- correctness
    with torch.no_grad():
        y_train, y_fused, y_plain = train(x), fused(x), plain(x)
        train64 = copy.deepcopy(train).double()
        y_train64 = train64(x.double())
        y_fused64 = reparameterize(train64)(x.double())
    add("fp32 normalized error |fused - train| / max|train|",
        f"{normalized_error(y_fused, y_train):.3e} (max|logit| {y_train.abs().max():.1f})")
    add("fp64 normalized error |fused - train|", f"{normalized_error(y_fused64, y_train64):.3e}")
    add("fp32 train vs fp64 train (the model's own fp32 noise)",
        f"{normalized_error(y_train, y_train64):.3e}")
    add("|plain - fused| max abs", f"{(y_plain - y_fused).abs().max().item():.3e}")

    # ---- PyTorch eager latency: under no_grad (typical eval code) and inference_mode (lower
    # per-op overhead, which favours the training form's many small ops)
    def runner(model: nn.Module, mode: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            with mode():
                return model(x)
        return run

    forms = {"train": train, "fused": fused, "plain": plain}
    pts = {}
    for label, mode in (("no_grad", torch.no_grad), ("inference_mode", torch.inference_mode)):
        pt = interleaved({n: runner(m, mode) for n, m in forms.items()},
                         args.rounds, args.warmup, args.max_load, args.attempts)
        pts[label] = pt
        add(f"PyTorch [{label}] group load", pt.load_text())
        for name in forms:
            add(f"PyTorch [{label}] eager latency {name}", cell(pt.times[name]))
        add(f"PyTorch [{label}] ratio train/fused", ratio_text(pt, "train", "fused"))
        add(f"PyTorch [{label}] ratio fused/plain", ratio_text(pt, "fused", "plain"))
        raw[f"pytorch_{label}_s"] = pt.times
    pt = pts["no_grad"]

    # ---- ONNX + onnxruntime
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory()
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    paths = {name: workdir / f"a0_{name}.onnx" for name in ("train", "fused", "plain")}
    for name, model in (("train", train), ("fused", fused), ("plain", plain)):
        secs, desc = export(model, x, paths[name])
        add(f"ONNX {name} (dynamo=False, opset 17)", f"export {secs:.2f} s; {desc}")
    feed = {"x": x.numpy()}
    sessions = {n: ort_session(p, args.threads, spinning=False) for n, p in paths.items()}
    for name, sess in sessions.items():
        y = sess.run(None, feed)[0]
        ref = {"train": y_train, "fused": y_fused, "plain": y_plain}[name]
        add(f"ORT vs PyTorch ({name}) normalized", f"{normalized_error(y, ref):.3e}")
    add("ORT fused vs PyTorch train-form normalized",
        f"{normalized_error(sessions['fused'].run(None, feed)[0], y_train):.3e}")

    ortg = interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                       args.rounds, args.warmup, args.max_load, args.attempts)
    add("ORT group load (interleaved, spinning off)", ortg.load_text())
    for name in ("train", "fused", "plain"):
        add(f"ORT latency {name}", cell(ortg.times[name]))
    add("ORT ratio train/fused", ratio_text(ortg, "train", "fused"))
    add("ORT ratio fused/plain", ratio_text(ortg, "fused", "plain"))
    raw["ort_s"] = ortg.times
    del sessions

    spin = {n: ort_session(p, args.threads, spinning=True) for n, p in paths.items()}
    lone = alone({n: (lambda s=s: s.run(None, feed)) for n, s in spin.items()},
                 args.rounds, args.warmup, args.max_load, args.attempts)
    add("ORT sessions-alone load (default spinning threads)", lone.load_text())
    for name in ("train", "fused", "plain"):
        add(f"ORT latency {name}, session alone, default spinning", cell(lone.times[name]))
    add("ORT (alone) ratio train/fused",
        f"{median_ms(lone.times['train']) / median_ms(lone.times['fused']):.2f}x")
    add("ORT (alone) ratio fused/plain",
        f"{median_ms(lone.times['fused']) / median_ms(lone.times['plain']):.2f}x")
    raw["ort_alone_s"] = lone.times
    if tmp is not None:
        tmp.cleanup()

    # ---- summary
    fusion_ms = median_ms(fusion.times["reparameterize(model)"])
    checks += [
        ("PyTorch [no_grad] train/fused >= 1.5", ratio(pt, "train", "fused")[0] >= 1.5),
        ("ORT fused/plain <= 1.05", ratio(ortg, "fused", "plain")[0] <= 1.05),
        ("fusion < 50 ms", fusion_ms < 50),
    ]
    return finish(args, rows, raw, checks, add)


def finish(args: argparse.Namespace, rows: list[tuple[str, str]], raw: dict[str, object],
           checks: list[tuple[str, bool]], add: Callable[[str, str], None]) -> int:
    for text, ok in checks:
        add(f"target {text}", "met" if ok else "NOT met")

    print("\n| metric | value |\n|---|---|")

    def md(text: str) -> str:
        return text.replace("|", r"\|")

    for metric, value in rows:
        print(f"| {md(metric)} | {md(value)} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "raw": raw}, indent=1))
    return 0


# Where reparameterize spends its time: (label, module, function). Each is timed around its
# outermost call, so recursion is not counted twice.
PHASES = (("copy", passes, "_deploy_copy"), ("block methods", passes, "_convert_blocks"),
          ("trace", generic, "_trace_tree"), ("classify", generic, "classify"),
          ("find regions", generic, "find_regions"), ("compose", generic, "compose"),
          ("build conv", generic, "make_conv"), ("structure key", generic, "structure_key"),
          ("float64 check", generic, "exact_check"), ("conv->BN fold", passes, "_fold_all"))


def phase_times(model: nn.Module, runs: int) -> Times:
    """Per-phase wall time of ``reparameterize(model)`` over ``runs`` calls (the rest is
    ``other``). The functions are wrapped for the measurement only and restored after."""
    times: Times = {label: [] for label, _, _ in PHASES}
    times["other"] = []
    times["total"] = []
    current: dict[str, float] = {}
    depth: Counter[str] = Counter()
    originals = []

    def timed(label: str, fn: Callable[..., object]) -> Callable[..., object]:
        def wrapper(*a: object, **k: object) -> object:
            depth[label] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[label] -= 1
                if not depth[label]:
                    current[label] = current.get(label, 0.0) + time.perf_counter() - t0
        return wrapper

    for label, module, name in PHASES:
        originals.append((module, name, getattr(module, name)))
        setattr(module, name, timed(label, getattr(module, name)))
    try:
        reparameterize(model)  # warm
        for _ in range(runs):
            current.clear()
            t0 = time.perf_counter()
            reparameterize(model)
            total = time.perf_counter() - t0
            for label, _, _ in PHASES:
                times[label].append(current.get(label, 0.0))
            times["other"].append(total - sum(current.values()))
            times["total"].append(total)
    finally:
        for module, name, fn in originals:
            setattr(module, name, fn)
    return times


def generic_section(args: argparse.Namespace, train: nn.Module, x: torch.Tensor,
                    add: Callable[[str, str], None], raw: dict[str, object],
                    checks: list[tuple[str, bool]]) -> None:
    """The generic linear-region pass: its cost on A0, and what its output costs in ORT."""
    methodless = without_methods(train)
    report = ReparamReport()
    fused_generic = reparameterize(methodless, report=report)
    fused_protocol = reparameterize(train)
    counts = report.op_counts()
    add("generic pass on A0 without methods: regions collapsed / left alone",
        f"{len(report.collapsed)} / {len(report.left_alone)}; op counts before "
        f"{counts['before']}, after {counts['after']}")
    with torch.no_grad():
        y_train = train(x)
        err = normalized_error(fused_generic(x), y_train)
        agree = normalized_error(fused_generic(x), fused_protocol(x))
    add("generic-fused A0 vs training form (fp32, normalized)", f"{err:.3e}")
    add("generic-fused A0 vs protocol-fused A0 (fp32, normalized)", f"{agree:.3e}")

    group = interleaved({"protocol": lambda: reparameterize(train),
                         "generic": lambda: reparameterize(methodless)},
                        args.fusion_runs, 2, args.max_load, args.attempts)
    add("A0 reparameterize(model), protocol path (blocks' own methods)",
        f"{cell(group.times['protocol'])}; {group.load_text()}")
    add("A0 reparameterize(model), generic pass (no methods)", cell(group.times["generic"]))
    add("A0 generic/protocol time ratio", ratio_text(group, "generic", "protocol"))
    raw["generic_vs_protocol_s"] = group.times

    def inplace_pair() -> Times:  # the deep copy is not timed
        times: Times = {"protocol": [], "generic": []}
        for r in range(args.fusion_runs):
            for name in (("protocol", "generic") if r % 2 == 0 else ("generic", "protocol")):
                victim = copy.deepcopy(train if name == "protocol" else methodless)
                t0 = time.perf_counter()
                reparameterize(victim, inplace=True)
                times[name].append(time.perf_counter() - t0)
        return times

    inplace = least_loaded(inplace_pair, args.max_load, args.attempts)
    add("A0 reparameterize(inplace=True), protocol path (copy not timed)",
        f"{cell(inplace.times['protocol'])}; other processes {inplace.others:.2f} cores")
    add("A0 reparameterize(inplace=True), generic pass (copy not timed)",
        cell(inplace.times["generic"]))
    add("A0 generic/protocol time ratio, inplace",
        f"{median_ms(inplace.times['generic']) / median_ms(inplace.times['protocol']):.2f}x")
    raw["generic_vs_protocol_inplace_s"] = inplace.times
    for name, model in (("generic", methodless), ("protocol", train)):
        phases = least_loaded(lambda m=model: phase_times(m, args.fusion_runs), args.max_load,
                              args.attempts)
        add(f"A0 {name} path, median ms per phase (other processes {phases.others:.2f} cores)",
            ", ".join(f"{k} {median_ms(v):.2f}" for k, v in phases.times.items()))
        raw[f"phases_{name}_s"] = phases.times
    generic_ms = median_ms(group.times["generic"])
    protocol_ms = median_ms(group.times["protocol"])
    checks += [("generic/protocol <= 2x", generic_ms / protocol_ms <= 2.0),
               ("generic pass < 50 ms", generic_ms < 50),
               ("protocol path < 50 ms", protocol_ms < 50)]

    # ---- ORT: generically fused third-party blocks vs the same convs as a plain net
    tmp = tempfile.TemporaryDirectory()
    workdir = Path(tmp.name) if args.workdir is None else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    xb = torch.randn(1, 3, args.block_size, args.block_size)
    for name, net in block_nets(args.block_width).items():
        report = ReparamReport()
        fused = reparameterize(net, report=report)
        plain = plain_from(fused)
        left = count_ops(fused)
        with torch.no_grad():
            y = net(xb)
            err_fused = normalized_error(fused(xb), y)
            err_plain = normalized_error(plain(xb), fused(xb))
        paths = {"fused": workdir / f"{name}_fused.onnx", "plain": workdir / f"{name}_plain.onnx"}
        descs = {k: export(m, xb, paths[k])[1] for k, m in (("fused", fused), ("plain", plain))}
        sessions = {k: ort_session(p, args.threads, spinning=False) for k, p in paths.items()}
        feed = {"x": xb.numpy()}
        err_ort = normalized_error(sessions["fused"].run(None, feed)[0], y)
        add(f"{name} net: regions collapsed, ops left",
            f"{len(report.collapsed)} regions, {len(report.left_alone)} left alone; "
            f"after: {left}; ONNX fused {descs['fused']}; plain {descs['plain']}")
        add(f"{name} net errors (fused vs train, plain vs fused, ORT fused vs train)",
            f"{err_fused:.2e}, {err_plain:.2e}, {err_ort:.2e}")
        add(f"{name} net ONNX graphs fused vs plain", same_onnx(paths["fused"], paths["plain"]))
        res = interleaved({k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()},
                          args.rounds, args.warmup, args.max_load, args.attempts)
        add(f"{name} net ORT latency fused", f"{cell(res.times['fused'])}; {res.load_text()}")
        add(f"{name} net ORT latency plain", cell(res.times["plain"]))
        add(f"{name} net ORT ratio fused/plain", ratio_text(res, "fused", "plain"))
        raw[f"ort_{name}_s"] = res.times
        checks.append((f"{name} ORT fused/plain <= 1.02", ratio(res, "fused", "plain")[0] <= 1.02))
    tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
