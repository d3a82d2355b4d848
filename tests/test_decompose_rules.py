"""The rule registry: priorities, target filtering, conflicts, and every rule documented."""

import pytest
import torch
from decompose_harness import A, aten_node
from torch import nn

from deployplug.decompositions import (
    Rule,
    RuleConflictError,
    all_rules,
    choose_rule,
    register_rule,
    rules_for,
    unregister_rule,
)


@pytest.fixture
def node_and_graph():
    return aten_node(torch.ops.aten.gelu.default, [torch.randn(1, 1, 2, 2)], A(0))[:2]


def _temp(name, priority, targets=frozenset({"*"}), applies=True):
    return Rule(name=name, op="gelu", build=lambda n, g: nn.Identity(),
                predicate=lambda n, g: applies, targets=frozenset(targets), priority=priority)


def test_lower_priority_wins_and_failing_predicates_fall_through(node_and_graph):
    node, graph = node_and_graph
    try:
        register_rule(_temp("tmp_first", 1, applies=False))
        register_rule(_temp("tmp_second", 2))
        assert choose_rule(node, graph, "caffe").name == "tmp_second"
        names = [r.name for r in rules_for("gelu", "caffe")]
        assert names.index("tmp_first") < names.index("tmp_second") < names.index("gelu_by_exp")
    finally:
        unregister_rule("tmp_first")
        unregister_rule("tmp_second")
    assert choose_rule(node, graph, "caffe").name == "gelu_by_exp"


def test_same_priority_conflict_is_an_error(node_and_graph):
    node, graph = node_and_graph
    try:
        register_rule(_temp("tmp_a", 3))
        register_rule(_temp("tmp_b", 3))
        with pytest.raises(RuleConflictError, match="tmp_a, tmp_b"):
            choose_rule(node, graph, "caffe")
    finally:
        unregister_rule("tmp_a")
        unregister_rule("tmp_b")


def test_target_filtering(node_and_graph):
    node, graph = node_and_graph
    try:
        register_rule(_temp("tmp_msnh_only", 1, targets={"msnhnet"}))
        assert choose_rule(node, graph, "msnhnet").name == "tmp_msnh_only"
        assert choose_rule(node, graph, "caffe").name == "gelu_by_exp"
        assert "tmp_msnh_only" not in [r.name for r in rules_for("gelu", "caffe")]
    finally:
        unregister_rule("tmp_msnh_only")


def test_decorator_form_and_name_clash():
    try:
        @register_rule(name="tmp_decorated", op="erf", priority=5)
        def build(node, graph):
            return nn.Identity()

        assert isinstance(build, Rule) and rules_for("erf")[0].name == "tmp_decorated"
        with pytest.raises(ValueError, match="already registered"):
            register_rule(Rule(name="tmp_decorated", op="tanh", build=lambda n, g: None))
        with pytest.raises(TypeError):
            register_rule(Rule(name="tmp_str", op="tanh", build=build, targets="caffe"))
    finally:
        unregister_rule("tmp_decorated")


def test_every_builtin_rule_is_described():
    rules = all_rules()
    assert len(rules) >= 30
    for rule in rules:
        assert rule.description, rule.name
        assert rule.targets, rule.name
    concepts = {r.op for r in rules}
    assert {"conv3d", "instance_norm", "conv_transpose2d", "upsample_nearest2d", "max_pool2d",
            "avg_pool2d", "pad", "add", "mul", "gelu", "mish", "hardswish", "hardsigmoid",
            "silu", "hardtanh", "clamp", "relu6", "adaptive_avg_pool2d", "mean",
            "sum"} <= concepts
