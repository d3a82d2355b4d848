"""Latency of the Conv3d and InstanceNorm decompositions in onnxruntime (2 threads).

Compares, on the shapes of docs/benchmarks-decompose.md:

* Conv3d(2->16, k=(8,3,3), s=(8,1,1), p=(0,1,1)) on 1x2x64x92x164: native ONNX Conv (3-D),
  ``decompose``'s Conv2d form for the caffe target, and the naive
  one-Conv2d-per-channel-pair form.
* InstanceNorm2d(64, affine) on 1x64x128x128: native InstanceNormalization, the Caffe form
  (``decompose(..., "caffe")``: global pooling, the mean spread by a broadcasting product,
  per-channel scale), the pool-and-upsample form, and the om form (``decompose(..., "om")``:
  the same with global pooling staged into windows <= 32).

Method: every group is timed interleaved (round-robin, start rotated each round) after a
warm-up, with ``session.intra_op.allow_spinning=0`` so idle sessions do not steal a core.
Foreign CPU use is read from /proc/stat around each group (minus this process); a group is
re-run (up to 4 attempts) when other processes used more than 0.3 cores, and the attempt
with the least foreign load is reported. Run: ``python scripts/bench_decompose.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn.functional as F
from timing import GroupResult, interleaved, ort_session, quartiles_ms, ratio
from torch import nn

from deployplug.capture import Graph, Node
from deployplug.decompositions import decompose
from deployplug.profiles import TargetProfile, get_target
from deployplug.testing import normalized_error

# --- reference constructions (for comparison only) -------------------------------------


class NaiveConv3d(nn.Module):
    """One Conv2d per (input, output) channel pair; depth taps feed its channels."""

    def __init__(self, conv: nn.Conv3d, depth: int):
        super().__init__()
        o, c, kd, kh, kw = conv.weight.shape
        self.kd, self.sd = kd, conv.stride[0]
        self.out_depth = (depth - kd) // self.sd + 1
        self.convs = nn.ModuleList()
        for i in range(c):
            row = nn.ModuleList()
            for j in range(o):
                m = nn.Conv2d(kd, 1, (kh, kw), padding=conv.padding[1:], bias=i == 0)
                m.weight.data = conv.weight.data[j:j + 1, i]
                if i == 0:
                    m.bias.data = conv.bias.data[j:j + 1]
                row.append(m)
            self.convs.append(row)

    def forward(self, x):
        outs = []
        for j in range(len(self.convs[0])):
            per_input = []
            for i, row in enumerate(self.convs):
                taps = [row[j](x[:, i, d * self.sd:d * self.sd + self.kd])
                        for d in range(self.out_depth)]
                per_input.append(torch.cat(taps, dim=1))
            outs.append(torch.stack(per_input, 0).sum(0).unsqueeze(1))
        return torch.cat(outs, dim=1)


class PoolUpsampleInstanceNorm(nn.Module):
    """Statistics by global pooling, upsampled back to H x W before the arithmetic."""

    def __init__(self, norm: nn.InstanceNorm2d):
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().view(1, -1, 1, 1).clone())
        self.bias = nn.Parameter(norm.bias.detach().view(1, -1, 1, 1).clone())
        self.eps = norm.eps

    def forward(self, x):
        size = x.shape[2:]
        mean = F.interpolate(F.adaptive_avg_pool2d(x, 1), size=size)
        centred = x - mean
        var = F.interpolate(F.adaptive_avg_pool2d(centred * centred, 1), size=size)
        return centred / torch.sqrt(var + self.eps) * self.weight + self.bias


# --- target profiles used to drive decompose -------------------------------------------


def _profile(name: str, om: bool) -> TargetProfile:
    """The registered ``caffe``/``om`` profile; a minimal stand-in if it is not available."""
    try:
        return get_target(name)
    except ValueError:
        pass

    def refuse(node: Node, graph: Graph) -> str | None:
        return f"{name} has no {node.op}"

    def window(node: Node, graph: Graph) -> str | None:
        return "window over 32" if max(node.args["kernel_size"]) > 32 else None

    def gap(node: Node, graph: Graph) -> str | None:
        big = max(graph.shape_of(node.inputs[0])[2:]) > 32
        return "global pooling over a map > 32" if big else None

    ops = {"conv3d": refuse, "instance_norm": refuse}
    if om:
        ops.update({"avg_pool2d": window, "max_pool2d": window, "adaptive_avg_pool2d": gap})
    return TargetProfile(name, "caffe", "benchmark profile", ops=ops, accepts_everything=True)


def _export(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    return path


def _node_counts(path: Path) -> str:
    from collections import Counter

    import onnx

    counts = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return f"{sum(counts.values())}: " + ", ".join(f"{k} {v}" for k, v in counts.most_common())


def run_group(title: str, models: dict[str, nn.Module], x: torch.Tensor, workdir: Path,
              rounds: int, warmup: int, baseline: str) -> GroupResult:
    """Export each variant, check it in onnxruntime against ``baseline``, time and print them."""
    paths = {k: _export(m, x, workdir / f"{title}_{k}.onnx") for k, m in models.items()}
    sessions = {k: ort_session(p, 2, spinning=False, log_severity=3) for k, p in paths.items()}
    with torch.no_grad():
        ref = models[baseline](x).numpy()
    xn = x.numpy()
    runs = {k: (lambda s=s: s.run(None, {s.get_inputs()[0].name: xn}))
            for k, s in sessions.items()}
    errors = {k: normalized_error(run()[0], ref) for k, run in runs.items()}
    res = interleaved(runs, rounds, warmup, quiet_timeout_s=20.0)
    print(f"\n## {title}  (foreign load {res.others:.2f} cores, attempt {res.attempt}, "
          f"{rounds} rounds)")
    print(f"| variant | median ms | p25-p75 ms | vs {baseline} (paired) | ORT err | ONNX nodes |")
    print("|---|---|---|---|---|---|")
    for k in models:
        p25, med, p75 = quartiles_ms(res.times[k])
        paired = ratio(res, k, baseline)[1]
        print(f"| {k} | {med:.2f} | {p25:.2f}-{p75:.2f} | {paired:.2f}x | "
              f"{errors[k]:.1e} | {_node_counts(paths[k])} |")
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    print(f"# decomposition benchmark  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}; ORT 2 intra-op threads, "
          "no spinning, interleaved")

    depth, hw = (16, (23, 41)) if args.quick else (64, (92, 164))
    conv = nn.Conv3d(2, 16, (8, 3, 3), stride=(8, 1, 1), padding=(0, 1, 1)).eval()
    x3 = torch.randn(1, 2, depth, *hw)
    caffe, om = _profile("caffe", om=False), _profile("om", om=True)
    conv_models = {"native": conv, "decomposed": decompose(conv, caffe, x3),
                   "naive": NaiveConv3d(conv, depth).eval()}
    side = 32 if args.quick else 128
    norm = nn.InstanceNorm2d(64, affine=True).eval()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.2)
    x2 = torch.randn(1, 64, side, side) * 2 + 0.5
    norm_models = {"native": norm, "caffe form": decompose(norm, caffe, x2),
                   "pool+upsample": PoolUpsampleInstanceNorm(norm).eval(),
                   "om form": decompose(norm, om, x2)}
    rounds = 8 if args.quick else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        conv3d = run_group("Conv3d", conv_models, x3, work, rounds, args.warmup, "native")
        inorm = run_group("InstanceNorm2d", norm_models, x2, work, rounds, args.warmup,
                          "native")
    print("\n## goals")
    print(f"- Conv3d decomposed / native = {ratio(conv3d, 'decomposed', 'native')[0]:.2f}x "
          "(goal <= 1.2x)")
    print(f"- Conv3d naive / decomposed = {ratio(conv3d, 'naive', 'decomposed')[0]:.1f}x "
          "(goal >= 10x)")
    print(f"- InstanceNorm caffe form / native = "
          f"{ratio(inorm, 'caffe form', 'native')[0]:.2f}x (goal <= 2.5x)")
    om_vs_pool, paired = ratio(inorm, "om form", "pool+upsample")[:2]
    print(f"- InstanceNorm om form / pool+upsample = "
          f"{om_vs_pool:.2f}x (paired {paired:.2f}x; goal <= 1x)")

if __name__ == "__main__":
    main()
