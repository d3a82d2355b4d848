"""Targets own their checks and limits; writers and rules follow them, never the reverse."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from decompose_harness import A, aten_node
from torch import nn

import deployplug as dp
from deployplug.capture import capture
from deployplug.decompositions import run_decompose
from deployplug.decompositions.apply import MAX_ROUNDS
from deployplug.errors import UnsupportedOpError
from deployplug.exporters import get_exporter
from deployplug.exporters.caffe import lower as caffe_lower
from deployplug.exporters.caffe import om_check
from deployplug.exporters.msnhnet import offenders as msnhnet_offenders
from deployplug.exporters.msnhnet import ops as msnhnet_ops
from deployplug.profiles import offenders, shipped_targets
from deployplug.profiles.caffe import CAFFE, OM, OM_LIMITS, caffe_family, pool_window
from deployplug.profiles.msnhnet import MSNHNET
from deployplug.testing import normalized_error

PACKAGE = Path(dp.__file__).parent
POOLS = ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d")


class Pools(nn.Module):
    """Windows over 16 of every kind: max, tiling average, global, spatial mean."""

    def forward(self, x):
        a = F.max_pool2d(x, 20, 2, 3)
        b = F.avg_pool2d(x, 24, 24)
        c = F.adaptive_avg_pool2d(x, 1) + x.mean((2, 3), keepdim=True)
        return a, b, c


def _windows(graph):
    return [max(pool_window(n, graph)) for n in graph if n.op in POOLS]


def test_rules_read_the_pool_limit_from_the_target():
    """A target with 16-wide pooling gets 16-wide chains, in a few rounds, exactly."""
    om16 = caffe_family("om16", "om with 16-wide pooling",
                        dataclasses.replace(OM_LIMITS, max_pool_window=16))
    x = torch.rand(1, 2, 48, 48)
    result = run_decompose(Pools(), om16, x)
    assert result.offenders == []
    assert max(a.round for a in result.applied) < MAX_ROUNDS // 2
    graph = capture(result.module, x)
    assert [n.op for n in graph if om16.refusal(n, graph)] == []
    assert max(_windows(graph)) <= 16
    with torch.no_grad():
        for got, want in zip(result.module(x), Pools()(x), strict=True):
            assert normalized_error(got, want) <= 1e-5
    # the shipped om keeps its own limit: windows up to 32, some of them over 16
    om_graph = capture(run_decompose(Pools(), OM, x).module, x)
    assert 16 < max(_windows(om_graph)) <= 32


def test_limits_are_data_and_the_file_checker_reads_them():
    assert OM.limits.max_pool_window == 32 == om_check.MAX_POOL_WINDOW
    assert CAFFE.limits.max_pool_window is None
    assert OM.limits.symmetric_pad and not OM.limits.spatial_reductions
    assert CAFFE.limits.broadcast == OM.limits.broadcast == "channel_product"
    assert MSNHNET.limits.broadcast == "none"
    node, graph, _ = aten_node(torch.ops.aten.max_pool2d.default, [torch.zeros(1, 1, 40, 40)],
                               A(0), [33, 33])
    assert "windows <= 32" in OM.refusal(node, graph)
    assert CAFFE.refusal(node, graph) is None
    om24 = caffe_family("om24", "test", dataclasses.replace(OM_LIMITS, max_pool_window=24))
    node, graph, _ = aten_node(torch.ops.aten.max_pool2d.default, [torch.zeros(1, 1, 40, 40)],
                               A(0), [25, 25])
    assert "windows <= 24" in om24.refusal(node, graph) and OM.refusal(node, graph) is None


def test_every_accepted_op_has_a_lowering_and_every_lowering_a_check():
    assert set(CAFFE.ops) == set(OM.ops) == set(caffe_lower.RULES)
    assert set(MSNHNET.ops) == set(msnhnet_ops.RULES)


def test_a_writer_that_disagrees_with_its_target_fails_at_import(monkeypatch):
    monkeypatch.setitem(caffe_lower.RULES, "erf", lambda ctx, node: None)
    with pytest.raises(ImportError, match="no check for \\['erf'\\]"):
        caffe_lower.check_registry()
    monkeypatch.delitem(msnhnet_ops.RULES, "relu")
    with pytest.raises(ImportError, match="no lowering for \\['relu'\\]"):
        msnhnet_ops.check_registry()


def test_every_check_has_the_one_signature():
    for target in shipped_targets():
        for op, check in target.ops.items():
            params = [p for p in inspect.signature(check).parameters.values()
                      if p.default is inspect.Parameter.empty]
            assert len(params) == 2, (target.name, op)


def test_unreadable_attributes_are_refused_not_guessed():
    """A kernel of three numbers for a 2-D pooling has no meaning; both targets say so."""
    node, graph, _ = aten_node(torch.ops.aten.max_pool2d.default, [torch.zeros(1, 1, 8, 8)],
                               A(0), [2, 2])
    node.args["kernel_size"] = [2, 2, 2]
    for target in (CAFFE, OM, MSNHNET):
        reason = target.refusal(node, graph)
        assert reason is not None and "kernel_size" in reason, target.name


class _Unsupported(nn.Module):
    def forward(self, x):
        y = torch.erf(x) + torch.fft.rfft2(x).abs().sum()
        return y, y * 2


def test_one_builder_makes_every_offender_list():
    x = torch.randn(1, 2, 4, 4)
    graph = capture(_Unsupported(), x)
    with pytest.raises(UnsupportedOpError) as caffe_error:
        get_exporter("caffe").write(_Unsupported(), (x,), Path("/nonexistent/never-written"),
                                    "caffe", graph=graph)
    assert list(caffe_error.value.offenders) == offenders(graph, CAFFE)
    found = msnhnet_offenders(graph)
    assert found == offenders(graph, MSNHNET)
    assert [(o.op, o.target) for o in found][-1] == ("output", "msnhnet")  # model level
    result = run_decompose(_Unsupported(), "caffe", x)
    by_builder = {(o.op, o.module_path, o.reason) for o in offenders(graph, CAFFE)}
    assert {(o.op, o.module_path, o.reason) for o in result.offenders} == by_builder


def test_msnhnet_hint_names_functions_that_exist():
    x = torch.randn(1, 2, 4, 4)
    hint = " ".join(msnhnet_offenders(capture(_Unsupported(), x))[0].suggestions)
    called = re.findall(r"dp\.(\w+)\(", hint)
    assert called and "decompositions(" not in hint
    for name in called:
        assert callable(getattr(dp, name)) and not inspect.ismodule(getattr(dp, name)), name
    assert "dp.decompose(model, example_input, 'msnhnet')" in hint


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def _modules(*parts: str) -> list[Path]:
    base = PACKAGE.joinpath(*parts)
    return sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]


LOWERING = (_modules("exporters", "msnhnet") + _modules("exporters", "caffe"))
LOWERING = [p for p in LOWERING if p.name not in ("__init__.py", "writer.py", "schema.py")]


@pytest.mark.parametrize("path", _modules("ops") + _modules("profiles")
                         + _modules("decompositions"), ids=lambda p: p.stem)
def test_ops_targets_and_rules_import_no_writer_or_runtime(path):
    bad = {m for m in _imports(path)
           if m.startswith(("deployplug.exporters", "deployplug.runtimes", "deployplug.pipeline"))}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", LOWERING, ids=lambda p: f"{p.parent.name}.{p.stem}")
def test_lowerings_import_no_runtime(path):
    """The MsnhNet lowering sizes pools with ops.sizes, not the reference runtime it is checked
    against; no lowering imports a runtime."""
    bad = {m for m in _imports(path) if m.startswith("deployplug.runtimes")}
    assert not bad, f"{path.relative_to(PACKAGE)} imports {sorted(bad)}"


def test_opencv_runtime_imports_no_lowering():
    bad = {m for m in _imports(PACKAGE / "runtimes" / "opencv_caffe.py")
           if m.startswith(("deployplug.exporters.caffe.lower", "deployplug.exporters.caffe.layers",
                            "deployplug.profiles"))}
    assert not bad


def test_rules_take_an_unregistered_target_name_with_default_limits():
    node, graph, _ = aten_node(torch.ops.aten.gelu.default, [torch.randn(1, 1, 2, 2)], A(0))
    from deployplug.decompositions import choose_rule, why_not

    assert choose_rule(node, graph, "someone-elses-target").name == "gelu_by_exp"
    pool, pool_graph, _ = aten_node(torch.ops.aten.max_pool2d.default,
                                    [torch.zeros(1, 1, 40, 40)], A(0), [33, 33])
    assert choose_rule(pool, pool_graph, "someone-elses-target") is None
    assert choose_rule(pool, pool_graph, OM).name == "max_pool2d_split"
    assert any("window limit" in note for note in why_not(pool, pool_graph, "unknown"))
