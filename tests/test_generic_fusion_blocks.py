"""Published multi-branch blocks, written without fusion methods, fused by the generic pass.

For each block: no BatchNorm and no branch addition is left, each region became one conv,
the fused net matches the training form (fp32 normalized error <= 1e-6, fp64 <= 1e-12), and
all three formats export and verify.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import paper_blocks as pb
import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import deployplug as dp
from deployplug.reparam import LinearRegionWarning, ReparamReport, reparameterize
from deployplug.reparam.report import count_ops
from deployplug.testing import normalized_error, randomize_batchnorm

# name -> (builder, regions the net holds, input shape)
NETS: dict[str, tuple[Callable[[], nn.Module], int, tuple[int, ...]]] = {
    "repvgg": (lambda: nn.Sequential(pb.RepVGGPlain(3, 8, 2), pb.RepVGGPlain(8, 8),
                                     pb.RepVGGPlain(8, 8, groups=2)), 3, (2, 3, 13, 11)),
    "repvgg_dilated": (lambda: nn.Sequential(pb.RepVGGPlain(3, 6), pb.RepVGGPlain(
        6, 6, dilation=2)), 2, (1, 3, 12, 12)),
    "acb": (lambda: nn.Sequential(pb.ACB(3, 8), nn.ReLU(), pb.ACB(8, 8, 2), nn.ReLU()), 2,
            (2, 3, 12, 13)),
    "dbb": (lambda: nn.Sequential(pb.DBB(3, 8), nn.ReLU(), pb.DBB(8, 8, 3, 2, 2), nn.ReLU(),
                                  pb.DBB(8, 8, 5), nn.ReLU()), 3, (2, 3, 14, 12)),
    "dbb_depthwise": (lambda: nn.Sequential(pb.DBB(4, 4, 3, 1, 4), nn.ReLU()), 1,
                      (1, 4, 9, 9)),
    "mobileone": (lambda: nn.Sequential(pb.MobileOneBlock(3, 8, 2), pb.MobileOneBlock(8, 8)),
                  4, (2, 3, 12, 12)),
    "yolov7_repconv": (lambda: nn.Sequential(pb.RepConv(3, 8, 2), pb.RepConv(8, 8)), 2,
                       (1, 3, 12, 10)),
    "yolov6_repvgg": (lambda: nn.Sequential(pb.RepConv(3, 8, 1, nn.ReLU),
                                            pb.RepConv(8, 8, 1, nn.ReLU)), 2, (1, 3, 10, 10)),
    "repvit_repvggdw": (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), pb.RepVGGDW(8),
                                              nn.ReLU()), 1, (2, 3, 9, 9)),
    "qarepvgg": (lambda: nn.Sequential(pb.QARepVGG(3, 8, 2), pb.QARepVGG(8, 8)), 2,
                 (2, 3, 12, 12)),
    "repvgg_se": (lambda: nn.Sequential(pb.RepVGGSE(3, 8, 2), pb.RepVGGSE(8, 8)), 2,
                  (2, 3, 12, 12)),
    "orepa": (lambda: nn.Sequential(pb.OREPA(3, 8), pb.OREPA(8, 8, 3, 2)), 2, (2, 3, 12, 12)),
}


def build(name: str) -> tuple[nn.Module, int, torch.Tensor]:
    builder, regions, shape = NETS[name]
    torch.manual_seed(0)
    net = pb.randomize_scales(randomize_batchnorm(builder(), seed=1), seed=2).eval()
    return net, regions, torch.randn(*shape)


def convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


@pytest.mark.parametrize("name", sorted(NETS))
def test_block_collapses_exactly(name):
    net, regions, x = build(name)
    report = ReparamReport()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearRegionWarning)
        fused = reparameterize(net, report=report)
    assert [r.reason for r in report.left_alone] == []
    assert len(report.collapsed) == regions
    assert not any(isinstance(m, _BatchNorm) for m in fused.modules())
    counts = count_ops(fused)
    assert counts["add"] == 0 and counts["batch_norm"] == 0
    assert report.op_counts()["after"] == counts
    assert report.op_counts()["before"]["add"] > 0
    # one conv per region, plus the convs that were never in a region (SE, stems)
    outside = sum(2 for m in net.modules() if isinstance(m, pb.SqueezeExcite))
    outside += sum(1 for m in net.children() if isinstance(m, nn.Conv2d))
    assert convs(fused) == regions + outside
    for region in report.collapsed:
        conv = fused.get_submodule(region.conv_path)
        assert isinstance(conv, nn.Conv2d) and conv.bias is not None
        assert list(conv.weight.shape[2:]) == region.conv["kernel_size"]
        # float32 constants (a pad value torch.fx computes at trace time) limit the check
        assert region.check_error <= 2e-6
    with torch.no_grad():
        assert normalized_error(fused(x), net(x)) <= 1e-6
        net64 = copy.deepcopy(net).double()
        report64 = ReparamReport()
        fused64 = reparameterize(net64, report=report64)
        assert normalized_error(fused64(x.double()), net64(x.double())) <= 1e-12
    assert len(report64.collapsed) == regions
    assert all(r.check_error <= 1e-12 for r in report64.collapsed)


@pytest.mark.parametrize("name", sorted(NETS))
def test_block_is_a_normal_module_tree(name):
    """Collapsed in place: the blocks keep their paths, no GraphModule where a block alone
    held the region, batch size stays free, and a second pass changes nothing."""
    net, _, x = build(name)
    fused = reparameterize(net)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in fused.modules())
    assert [n for n, _ in net.named_children()] == [n for n, _ in fused.named_children()]
    again_report = ReparamReport()
    again = reparameterize(fused, report=again_report)
    assert again_report.collapsed == [] and again_report.left_alone == []
    assert again_report.folded == [] and again_report.protocol == []
    assert again.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 fused.state_dict().values()))
    with torch.no_grad():
        big = torch.cat([x, x.flip(0), x * 2])
        assert normalized_error(fused(big), net(big)) <= 1e-6


def test_se_stays_and_branches_go():
    net, _, x = build("repvgg_se")
    fused = reparameterize(net)
    for i in range(2):
        block = fused[i]
        assert isinstance(block.se, pb.SqueezeExcite)
        assert isinstance(block.reparam, nn.Conv2d)
        assert not hasattr(block, "dense") and not hasattr(block, "pointwise")


def test_yolov7_method_is_not_needed():
    net, _, x = build("yolov7_repconv")
    fused = reparameterize(net)  # RepConv.fuse_repvgg_block raises if anything calls it
    assert isinstance(fused[0], nn.Sequential)
    assert [type(m) for m in fused[0]] == [nn.Conv2d, nn.SiLU]


def test_mobileone_stages_stay_depthwise_and_pointwise():
    net, _, _ = build("mobileone")
    fused = reparameterize(net)
    dw, pw = fused[1].dw.reparam, fused[1].pw.reparam
    assert dw.groups == 8 and dw.kernel_size == (3, 3)
    assert pw.groups == 1 and pw.kernel_size == (1, 1)


@pytest.mark.parametrize("name", sorted(NETS))
def test_block_exports_all_formats(name, tmp_path):
    net, _, x = build(name)
    x = x[:1]
    manifest = dp.export(net, x, tmp_path / "e", formats=("onnx", "caffe", "msnhnet"))
    assert manifest.passed
