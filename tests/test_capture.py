"""The normalized graph: op names, bound arguments, module paths, elided identity ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deployplug.capture import Ref, capture, format_graph
from deployplug.errors import CaptureError


class Spellings(nn.Module):
    """The same maths written in the ways hook-based converters lose track of."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, (3, 5), stride=(2, 1), padding=(1, 2), bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.register_buffer("scale", torch.full((1, 4, 1, 1), 2.0))

    def forward(self, x):
        y = self.bn(self.conv(x))
        y += 1.5  # in-place with a scalar
        y = F.relu(y, inplace=True)
        y = y.clone().contiguous()
        y = self.drop(y)
        z = torch.relu(y) * self.scale
        return z.flatten(1), y.relu()


@pytest.fixture(scope="module")
def graph():
    return capture(Spellings().eval(), torch.randn(2, 3, 7, 9))


def test_ops_are_normalized_and_identity_ops_elided(graph):
    ops = [n.op for n in graph.nodes]
    assert ops[:2] == ["conv2d", "batch_norm"]
    assert "add" in ops and "add_" not in ops
    for gone in ("clone", "contiguous", "dropout"):
        assert gone not in ops
    assert ops.count("relu") == 3


def test_arguments_bound_by_schema_name(graph):
    conv = graph.nodes[0]
    assert conv.args["input"] == Ref("x")
    assert list(conv.args["stride"]) == [2, 1]
    assert list(conv.args["padding"]) == [1, 2]
    assert conv.args["groups"] == 1
    assert isinstance(conv.args["weight"], torch.Tensor)
    assert tuple(conv.args["weight"].shape) == (4, 3, 3, 5)
    bn = graph.nodes[1]
    assert torch.equal(bn.args["running_var"], torch.ones(4))
    assert bn.inputs == [conv.name]


def test_scalars_and_buffers_are_constants_not_inputs(graph):
    add = next(n for n in graph.nodes if n.op == "add")
    assert add.args["other"] == 1.5 and len(add.inputs) == 1
    mul = next(n for n in graph.nodes if n.op == "mul")
    assert isinstance(mul.args["other"], torch.Tensor) and len(mul.inputs) == 1


def test_shapes_module_paths_and_outputs(graph):
    conv, bn = graph.nodes[0], graph.nodes[1]
    assert conv.shape == (2, 4, 4, 9)
    assert (conv.module_path, conv.module_type) == ("conv", "Conv2d")
    assert (bn.name, bn.module_type) == ("bn", "BatchNorm2d")
    assert len(graph.outputs) == 2
    assert [v.shape for v in graph.output_values] == [(2, 144), (2, 4, 4, 9)]
    assert graph.shape_of("x") == (2, 3, 7, 9)
    assert len({n.name for n in graph.nodes}) == len(graph.nodes)
    assert "conv2d" in format_graph(graph)


def test_consumers_follow_elided_nodes(graph):
    relu_after_add = next(n for n in graph.nodes if n.op == "relu")
    users = graph.consumers(relu_after_add.name)
    assert {u.op for u in users} == {"relu"}


def test_capture_failure_is_a_clear_error():
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(CaptureError, match="DataDependent"):
        capture(DataDependent(), torch.randn(1, 3))
