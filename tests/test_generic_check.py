"""The float64 re-check of a collapsed region: what it refuses, and how often it runs.

A wrong kernel, bias or padding in the composed conv, or a built conv whose weights are not
the composed values, must be refused (the region stays as it was, with the reason). The check
runs once per region structure: identical blocks of any width share one check, different
structures get their own, and a structure whose check failed is checked region by region.
"""

from __future__ import annotations

import dataclasses

import paper_blocks as pb
import pytest
import torch
from torch import nn

from deployplug.reparam import ReparamReport, reparameterize
from deployplug.reparam import generic as generic_pass
from deployplug.reparam.affine_form import AffineForm
from deployplug.reparam.kernel_sum import KernelSum
from deployplug.testing import normalized_error, randomize_batchnorm


@pytest.fixture(autouse=True)
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def ready(model: nn.Module) -> nn.Module:
    return pb.randomize_scales(randomize_batchnorm(model, seed=3), seed=4).eval()


def fused_and_report(model: nn.Module) -> tuple[nn.Module, ReparamReport]:
    report = ReparamReport()
    return reparameterize(model, report=report), report


def count_checks(monkeypatch) -> list[str]:
    """Owners of the regions the float64 check actually ran on, in order."""
    calls: list[str] = []
    real = generic_pass.exact_check

    def counted(region, *args):
        calls.append(region.owner)
        return real(region, *args)

    monkeypatch.setattr(generic_pass, "exact_check", counted)
    return calls


def corrupt_spec(monkeypatch, corrupt, only_first: bool = False) -> None:
    real = AffineForm.conv_spec
    seen = []

    def wrong(self, *args):
        spec = real(self, *args)
        seen.append(spec)
        return corrupt(spec) if not only_first or len(seen) == 1 else spec

    monkeypatch.setattr(AffineForm, "conv_spec", wrong)


def off_by_one_tap(spec):
    dense = spec.weight.dense()
    dense[0, 0, 0, 0] += 1e-3 * float(dense.abs().max())
    return dataclasses.replace(spec, weight=KernelSum.of(dense, spec.groups))


CORRUPTIONS = {
    "kernel": off_by_one_tap,
    "bias": lambda spec: dataclasses.replace(
        spec, bias=spec.bias + 1e-4 * float(spec.bias.abs().max())),
    "padding": lambda spec: dataclasses.replace(
        spec, padding=tuple(p + 1 for p in spec.padding)),
    "stride": lambda spec: dataclasses.replace(spec, stride=tuple(2 * s for s in spec.stride)),
}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_a_wrong_composition_is_refused(monkeypatch, what):
    net = ready(nn.Sequential(pb.RepVGGPlain(3, 6), pb.RepVGGPlain(6, 6)))
    corrupt_spec(monkeypatch, CORRUPTIONS[what])
    with pytest.warns(UserWarning, match="re-check"):
        fused, report = fused_and_report(net)
    assert report.collapsed == []
    assert len(report.left_alone) == 2
    assert all("float64 re-check" in s.reason for s in report.left_alone)
    x = torch.randn(2, 3, 7, 6)
    with torch.no_grad():
        assert normalized_error(fused(x), net(x)) <= 1e-6  # left as it was


def test_a_conv_not_holding_the_composed_values_is_refused(monkeypatch):
    net = ready(nn.Sequential(pb.ACB(3, 6), nn.ReLU()))
    real = generic_pass.make_conv

    def rounded_twice(spec, like, templates=None):
        conv = real(spec, like, templates)
        with torch.no_grad():
            conv.weight.mul_(1 + 1e-5)  # far above float32 rounding, far below any tolerance
        return conv

    monkeypatch.setattr(generic_pass, "make_conv", rounded_twice)
    with pytest.warns(UserWarning, match="does not hold the composed float64 values"):
        _, report = fused_and_report(net)
    assert report.collapsed == []


def test_identical_structures_are_checked_once(monkeypatch):
    calls = count_checks(monkeypatch)
    net = ready(nn.Sequential(
        pb.RepVGGPlain(3, 4, stride=2),                      # in != out, stride 2
        pb.RepVGGPlain(4, 4), pb.RepVGGPlain(4, 4),          # identity blocks...
        pb.RepVGGPlain(4, 8, stride=2),                      # the first structure again
        pb.RepVGGPlain(8, 8), pb.RepVGGPlain(8, 8),          # ...of another width: same
        pb.RepVGGPlain(8, 8, groups=2),                      # grouped: its own structure
        pb.ACB(8, 8)))                                       # another block: its own
    fused, report = fused_and_report(net)
    assert len(report.collapsed) == 8 and report.left_alone == []
    assert len(calls) == 4
    assert sorted(calls) == ["0", "1", "6", "7"]  # the first block of each structure
    by_owner = {r.owner: r.check_error for r in report.collapsed}
    assert by_owner["2"] == by_owner["4"] == by_owner["5"] == by_owner["1"]  # shared check
    x = torch.randn(2, 3, 11, 9)
    with torch.no_grad():
        assert normalized_error(fused(x), net(x)) <= 1e-6


def test_different_settings_are_different_structures(monkeypatch):
    calls = count_checks(monkeypatch)
    net = ready(nn.Sequential(pb.RepVGGPlain(4, 4), pb.RepVGGPlain(4, 4, dilation=2),
                              pb.DBB(4, 4, 3), nn.ReLU(), pb.DBB(4, 4, 5), nn.ReLU(),
                              pb.DBB(4, 4, 3, 2), nn.ReLU()))
    _, report = fused_and_report(net)
    assert len(report.collapsed) == 5
    assert len(calls) == 5


def test_nothing_is_trusted_across_calls(monkeypatch):
    calls = count_checks(monkeypatch)
    net = ready(nn.Sequential(pb.RepVGGPlain(4, 4), pb.RepVGGPlain(4, 4)))
    reparameterize(net)
    reparameterize(net.double())
    assert len(calls) == 2


def test_a_failed_structure_is_checked_region_by_region(monkeypatch):
    calls = count_checks(monkeypatch)
    corrupt_spec(monkeypatch, CORRUPTIONS["bias"], only_first=True)
    net = ready(nn.Sequential(*[pb.RepVGGPlain(4, 4) for _ in range(4)]))
    with pytest.warns(UserWarning, match="re-check"):
        fused, report = fused_and_report(net)
    assert [s.owner for s in report.left_alone] == ["0"]
    assert sorted(r.owner for r in report.collapsed) == ["1", "2", "3"]
    assert calls == ["0", "1"]  # the failure trusted nothing; the next one passed for all
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert normalized_error(fused(x), net(x)) <= 1e-6


def test_a_factor_that_is_not_finite_is_refused():
    net = ready(nn.Sequential(pb.RepVGGPlain(4, 4), nn.ReLU()))
    bn = net[0].dense[1]
    with torch.no_grad():
        bn.running_var[1] = -1.0  # 1 / sqrt(var + eps) is not a number
    with pytest.warns(UserWarning, match="not finite"):
        _, report = fused_and_report(net)
    assert report.collapsed == []
