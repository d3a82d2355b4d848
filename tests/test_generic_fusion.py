"""The generic linear-region pass: refusals with reasons, warnings, the report, rewrites.

The block zoo is in ``test_generic_fusion_blocks.py`` and the random families in
``test_generic_fusion_properties.py``; this file pins the behaviour around them.
"""

from __future__ import annotations

import copy
import json
import warnings

import paper_blocks as pb
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from deployplug.blocks import RepVGGBlock
from deployplug.errors import ReparameterizationError
from deployplug.reparam import LinearRegionWarning, ReparamReport, reparameterize
from deployplug.reparam import generic as generic_pass
from deployplug.reparam.affine_form import AffineForm, Refused
from deployplug.reparam.report import count_ops
from deployplug.testing import normalized_error, randomize_batchnorm


@pytest.fixture(autouse=True)
def seeded():
    """The same inputs on every run, so a result reflects the code and not the draw."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def fused_and_report(model: nn.Module, **kwargs) -> tuple[nn.Module, ReparamReport]:
    report = ReparamReport()
    return reparameterize(model, report=report, **kwargs), report


def same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor, tol: float = 1e-6) -> bool:
    with torch.no_grad():
        return normalized_error(a(x), b(x)) <= tol


def ready(model: nn.Module) -> nn.Module:
    return pb.randomize_scales(randomize_batchnorm(model, seed=4), seed=5).eval()


# ----------------------------------------------------------------------------- refusals

def test_dbb_zero_padding_of_biased_intermediate_is_refused_and_warned():
    net = ready(nn.Sequential(pb.DBB(3, 6, pad_with_bias=False), nn.ReLU()))
    x = torch.randn(2, 3, 9, 9)
    with pytest.warns(LinearRegionWarning, match=r"'0'.*bias") as caught:
        fused, report = fused_and_report(net)
    assert len(caught) == 1
    (skipped,) = report.left_alone
    assert skipped.owner == "0" and skipped.multi_branch
    assert "zero padding" in skipped.reason and "bias" in skipped.reason
    assert "0.seq_kxk.0" in skipped.reason  # names the conv whose padding is the problem
    assert report.collapsed == []
    assert count_ops(fused)["add"] == 3  # still multi-branch, and says so
    assert same_outputs(fused, net, x)


def test_nonlinearity_inside_a_branch_is_left_alone_without_warning():
    class Residual(nn.Module):  # a ResNet block: not one linear map
        def __init__(self):
            super().__init__()
            self.a = pb.conv_bn(4, 4, 3, 1, 1)
            self.b = pb.conv_bn(4, 4, 3, 1, 1)

        def forward(self, x):
            return torch.relu(x + self.b(torch.relu(self.a(x))))

    net = ready(nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), Residual()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearRegionWarning)
        fused, report = fused_and_report(net)
    (skipped,) = report.left_alone
    assert "2 different tensors" in skipped.reason and not skipped.multi_branch
    assert len(report.folded) == 2  # the conv->BN pass still folds both branches' pairs
    assert same_outputs(fused, net, torch.randn(1, 3, 8, 8))


def test_intermediate_used_outside_is_refused():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            y = self.a(x)
            return torch.sigmoid(y) * (y + self.b(x))

    net = Tap().eval()
    with pytest.warns(LinearRegionWarning, match="also used outside"):
        fused, report = fused_and_report(net)
    assert "'a'" in report.left_alone[0].reason
    assert same_outputs(fused, net, torch.randn(1, 3, 6, 6))


def test_strides_that_do_not_compose_are_refused():
    # a stride-2 2x2 conv then a padded conv: for odd sizes the last window of the first
    # conv stops before the border, so its padding is not the input's padding
    net = nn.Sequential(nn.Conv2d(3, 4, 2, 2, bias=False), nn.Conv2d(4, 4, 3, 1, 1),
                        nn.ReLU()).eval()
    fused, report = fused_and_report(net)
    (skipped,) = report.left_alone
    assert "right/bottom" in skipped.reason
    for size in (7, 8):
        assert same_outputs(fused, net, torch.randn(1, 3, size, size))


def test_non_zero_padding_mode_in_the_middle_is_refused():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False),
                        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()).eval()
    fused, report = fused_and_report(net)
    assert "'reflect' padding in the middle" in report.left_alone[0].reason
    assert same_outputs(fused, net, torch.randn(1, 3, 7, 7))


def test_reflect_padding_of_centre_tap_branches_is_kept():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
            self.one = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.dense(x) + self.one(x) + self.bn(x)

    net = ready(nn.Sequential(Block(), nn.ReLU()))
    fused, report = fused_and_report(net)
    assert isinstance(fused[0], nn.Conv2d) and fused[0].padding_mode == "reflect"
    assert same_outputs(fused, net, torch.randn(2, 4, 6, 7))


def test_average_pool_dividing_by_valid_pixels_is_refused_with_its_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.pool = nn.AvgPool2d(3, 1, 1, count_include_pad=False)

        def forward(self, x):
            return self.conv(x) + self.pool(x)

    net = Branchy().eval()
    with pytest.warns(LinearRegionWarning, match="count_include_pad=False"):
        fused, report = fused_and_report(net)
    assert report.collapsed == []
    assert same_outputs(fused, net, torch.randn(1, 3, 5, 5))


def test_asymmetric_composed_padding_is_refused():
    net = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    fused, report = fused_and_report(net)
    assert "asymmetric padding" in report.left_alone[0].reason
    assert same_outputs(fused, net, torch.randn(1, 3, 6, 6))


def test_refusal_algebra_directly():
    form = AffineForm.identity(2, 2).affine(torch.tensor([1.0, 2.0], dtype=torch.float64),
                                            torch.tensor([0.5, 0.0], dtype=torch.float64))
    with pytest.raises(Refused, match="carries a bias"):
        form.padded((1, 1), (1, 1))
    padded = form.padded((1, 1), (1, 1), torch.tensor([0.5, 0.0], dtype=torch.float64))
    assert padded.pad_left == (1, 1) and padded.pad_right == (1, 1)
    with pytest.raises(Refused, match="different output sizes"):
        form.combined(padded, 1.0, 1.0)


# ----------------------------------------------------------------------------- what it fuses

def test_functional_ops_and_learned_parameters_fuse():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w3 = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.w1 = nn.Parameter(torch.randn(4, 3, 1, 1))
            self.b = nn.Parameter(torch.randn(4))
            self.log_scale = nn.Parameter(torch.randn(4) * 0.1)
            self.register_buffer("mean", torch.randn(4))
            self.register_buffer("var", torch.rand(4) + 0.5)

        def forward(self, x):
            y = F.conv2d(x, self.w3, self.b, padding=1)
            y = y - F.conv2d(x, self.w1) * 0.5
            y = F.batch_norm(y, self.mean, self.var, training=False) / 3
            return torch.tanh(y * self.log_scale.exp().view(1, -1, 1, 1) + 1.0)

    net = Functional().eval()
    fused, report = fused_and_report(net)
    (region,) = report.collapsed
    assert region.ops == {"conv": 2, "add": 1, "batch_norm": 1, "scale_shift": 4}
    assert isinstance(fused, torch.fx.GraphModule)  # tanh is code, not a child module
    assert same_outputs(fused, net, torch.randn(2, 3, 7, 5))


def test_region_spanning_modules_becomes_a_graph_module_of_their_parent():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = pb.conv_bn(3, 4, 3, 1, 1)
            self.right = pb.conv_bn(3, 4, 1)
            self.head = nn.Conv2d(4, 2, 1)
            self.num_classes = 2  # read by code outside forward: kept

        def forward(self, x):
            y = self.left(x) + self.right(x)
            return self.head(F.relu(y))

    net = ready(nn.Sequential(Parent()))
    fused, report = fused_and_report(net)
    (region,) = report.collapsed
    assert region.owner == "0" and region.replaced_by == "graph_module"
    assert isinstance(fused[0], torch.fx.GraphModule)
    assert isinstance(fused[0].reparam, nn.Conv2d) and isinstance(fused[0].head, nn.Conv2d)
    assert fused[0].num_classes == 2
    assert region.modules == ("0.left.0", "0.left.1", "0.right.0", "0.right.1")
    x = torch.randn(3, 3, 6, 6)
    assert same_outputs(fused, net, x)
    assert same_outputs(fused, net, torch.randn(1, 3, 9, 4))  # nothing shape-specialised


def test_sequence_inside_a_container_collapses_to_one_conv():
    net = ready(nn.Sequential(nn.Sequential(nn.Conv2d(3, 6, 1, bias=False),
                                            nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3, 2)),
                              nn.ReLU()))
    fused, report = fused_and_report(net)
    assert isinstance(fused[0], nn.Conv2d) and fused[0].kernel_size == (3, 3)
    assert fused[0].stride == (2, 2)
    assert same_outputs(fused, net, torch.randn(2, 3, 9, 8))


def test_parametrized_and_subclassed_convs():
    class PlusOne(nn.Conv2d):  # its forward is not the plain conv: traced, not trusted
        def forward(self, x):
            return super().forward(x) + 1

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = weight_norm(nn.Conv2d(3, 4, 3, padding=1))
            self.b = PlusOne(3, 4, 1)

        def forward(self, x):
            return self.a(x) + self.b(x)

    net = nn.Sequential(Block(), nn.ReLU()).eval()
    fused, report = fused_and_report(net)
    assert len(report.collapsed) == 1 and isinstance(fused[0], nn.Conv2d)
    assert same_outputs(fused, net, torch.randn(1, 3, 5, 5))
    assert isinstance(net[0].a.weight, torch.Tensor)  # the original is untouched


def test_one_and_three_spatial_dims():
    for conv, bn, shape in ((nn.Conv1d, nn.BatchNorm1d, (2, 3, 11)),
                            (nn.Conv3d, nn.BatchNorm3d, (1, 3, 5, 6, 4))):
        class Block(nn.Module):
            def __init__(self, conv=conv, bn=bn):
                super().__init__()
                self.k = nn.Sequential(conv(3, 3, 3, padding=1), bn(3))
                self.one = conv(3, 3, 1)
                self.id = bn(3)

            def forward(self, x):
                return self.k(x) + self.one(x) + self.id(x)

        net = ready(nn.Sequential(Block(), nn.ReLU()))
        fused, report = fused_and_report(net)
        assert isinstance(fused[0], conv) and len(report.collapsed) == 1
        assert same_outputs(fused, net, torch.randn(*shape))


# ----------------------------------------------------------------------------- safety

def test_untraceable_model_is_left_alone_and_children_still_fuse():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = pb.RepVGGPlain(3, 4)
            self.b = pb.RepVGGPlain(4, 4)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.b(self.a(x))
            return self.a(x)

    net = ready(Dynamic())
    with pytest.warns(LinearRegionWarning, match="torch.fx cannot trace"):
        fused, report = fused_and_report(net)
    assert [s.owner for s in report.left_alone] == [""]
    assert sorted(r.owner for r in report.collapsed) == ["a", "b"]
    x = torch.randn(1, 3, 6, 6)
    assert same_outputs(fused, net, x) and same_outputs(fused, net, -x.abs() - 1)


def test_hooks_and_shared_modules_are_respected():
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 4), pb.RepVGGPlain(4, 4)))
    seen = []
    net[1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with pytest.warns(LinearRegionWarning, match="'1' is not rewritten: it has forward hooks"):
        fused, report = fused_and_report(net)
    assert [r.owner for r in report.collapsed] == ["0"]
    assert "forward hooks" in report.left_alone[0].reason
    shared = pb.RepVGGPlain(4, 4)
    twice = ready(nn.Sequential(pb.RepVGGPlain(3, 4), shared, nn.Sequential(shared)))
    with pytest.warns(LinearRegionWarning, match="registered at 2 paths"):
        fused, report = fused_and_report(twice)
    assert "registered at 2 paths" in " ".join(s.reason for s in report.left_alone)
    assert same_outputs(fused, twice, torch.randn(1, 3, 5, 5))


def test_original_model_untouched_and_protocol_blocks_first():
    net = ready(nn.Sequential(RepVGGBlock(3, 4), pb.RepVGGPlain(4, 4), pb.ACB(4, 4)))
    before = copy.deepcopy(net.state_dict())
    training = [m.training for m in net.modules()]
    fused, report = fused_and_report(net)
    assert report.protocol == [("0", "reparameterize")]
    assert sorted(r.owner for r in report.collapsed) == ["1", "2"]
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == training
    assert isinstance(net[1].dense, nn.Sequential)
    assert same_outputs(fused, net, torch.randn(2, 3, 6, 6))


def test_generic_false_leaves_methodless_blocks():
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 4)))
    fused, report = fused_and_report(net, generic=False)
    assert report.collapsed == [] and count_ops(fused)["add"] == 1


def test_example_input_self_check_still_runs(monkeypatch):
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 4), pb.RepVGGPlain(4, 4)))
    x = torch.randn(1, 3, 6, 6)
    fused = reparameterize(net, example_input=x)
    assert same_outputs(fused, net, x)

    real = generic_pass.make_conv

    def wrong(spec, like, templates=None):  # a collapse the float64 check would catch
        conv = real(spec, like, templates)
        with torch.no_grad():
            conv.bias += 1
        return conv

    monkeypatch.setattr(generic_pass, "make_conv", wrong)
    monkeypatch.setattr(generic_pass, "exact_check", lambda *args: 0.0)  # ... were it off
    with pytest.raises(ReparameterizationError, match="'0'"):
        reparameterize(net, example_input=x)


def test_inplace_returns_the_converted_model():
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 4), nn.Flatten()))
    ref = copy.deepcopy(net)
    fused = reparameterize(net, inplace=True)
    assert fused is net and isinstance(net[0][0], nn.Conv2d)
    assert same_outputs(fused, ref, torch.randn(1, 3, 5, 5))


# ----------------------------------------------------------------------------- report

def test_counts_before_come_from_the_pass_own_trace(monkeypatch):
    """Without blocks that fuse themselves the model is traced once for the pass and the
    counts before it, not twice; the counts are the same."""
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = pb.RepVGGPlain(3, 4)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    traces = []
    real = generic_pass.RegionTracer.trace

    def counted(self, root, *args, **kwargs):
        traces.append(type(root).__name__)
        return real(self, root, *args, **kwargs)

    for net in (ready(nn.Sequential(pb.RepVGGPlain(3, 4), pb.ACB(4, 4), nn.ReLU())),
                ready(Dynamic()), ready(nn.Sequential(RepVGGBlock(3, 4), pb.ACB(4, 4)))):
        expected = count_ops(net)
        monkeypatch.setattr(generic_pass.RegionTracer, "trace", counted)
        traces.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinearRegionWarning)
            _, report = fused_and_report(net)
        monkeypatch.setattr(generic_pass.RegionTracer, "trace", real)
        assert report.op_counts()["before"] == expected
        protocol = any(isinstance(m, RepVGGBlock) for m in net.modules())
        # the pass (plus its children when the model is untraceable), then the counts after
        assert traces.count(type(net).__name__) == 2 + protocol


def test_report_reads_well_and_serialises():
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 4), pb.DBB(4, 4, pad_with_bias=False),
                              nn.ReLU()))
    with pytest.warns(LinearRegionWarning):
        fused, report = fused_and_report(net)
    data = json.loads(json.dumps(report.to_dict()))
    (done,) = data["collapsed"]
    assert done["owner"] == "0" and done["conv"]["kernel_size"] == [3, 3]
    assert done["ops"] == {"conv": 2, "batch_norm": 2, "add": 1}
    assert done["modules"] == ["0.dense.0", "0.dense.1", "0.pointwise.0", "0.pointwise.1"]
    assert data["left_alone"][0]["owner"] == "1"
    counts = report.op_counts()
    assert counts["before"] == {"conv": 7, "batch_norm": 8, "add": 4}
    # the refused DBB keeps its branches; the conv->BN pass folds the pairs it can, and the
    # BNs after its average pool and inside its padding stay
    assert counts["after"] == {"conv": 1 + 5, "batch_norm": 2, "add": 3}
    assert len(report.folded) == 4
    text = str(report)
    assert "collapsed 0 -> 0.reparam (sequential)" in text
    assert "left alone 1" in text
