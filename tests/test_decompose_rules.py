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
    reachable_by,
    register_rule,
    rules_for,
    unreachable_rules,
    unregister_rule,
)
from deployplug.decompositions.registry import why_not
from deployplug.profiles import get_target, shipped_targets


@pytest.fixture
def node_and_graph():
    return aten_node(torch.ops.aten.gelu.default, [torch.randn(1, 1, 2, 2)], A(0))[:2]


def _temp(name, priority, targets=frozenset({"*"}), applies=True):
    return Rule(name=name, op="gelu", build=lambda n, g, t: nn.Identity(),
                check=lambda n, g, t: None if applies else "needs nothing it can have",
                targets=frozenset(targets), priority=priority)


def test_lower_priority_wins_and_failing_checks_fall_through(node_and_graph):
    node, graph = node_and_graph
    try:
        register_rule(_temp("tmp_first", 1, applies=False))
        register_rule(_temp("tmp_second", 2))
        assert choose_rule(node, graph, "caffe").name == "tmp_second"
        names = [r.name for r in rules_for("gelu", "caffe")]
        assert names.index("tmp_first") < names.index("tmp_second") < names.index("gelu_by_exp")
        notes = why_not(node, graph, "caffe")
        assert "rule 'tmp_first' does not apply: needs nothing it can have" in notes
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
        def build(node, graph, target):
            return nn.Identity()

        assert isinstance(build, Rule) and rules_for("erf")[0].name == "tmp_decorated"
        with pytest.raises(ValueError, match="already registered"):
            register_rule(Rule(name="tmp_decorated", op="tanh", build=lambda n, g, t: None))
        with pytest.raises(TypeError):
            register_rule(Rule(name="tmp_str", op="tanh", build=build, targets="caffe"))
    finally:
        unregister_rule("tmp_decorated")


def test_every_builtin_rule_is_described():
    rules = all_rules()
    assert len(rules) >= 20
    for rule in rules:
        assert rule.description, rule.name
        assert rule.targets, rule.name
        assert rule.examples is not None, rule.name
    concepts = {r.op for r in rules}
    assert {"conv3d", "instance_norm", "conv_transpose2d", "upsample_nearest2d", "max_pool2d",
            "avg_pool2d", "pad", "add", "sub", "rsub", "mul", "div", "gelu", "mish",
            "adaptive_avg_pool2d", "mean", "sum"} <= concepts
    # composed by the writers themselves, so no rule duplicates them
    assert not concepts & {"relu6", "hardtanh", "clamp", "hardsigmoid", "hardswish", "silu"}


# Rules no shipped target hands a node to, each with the reason it is kept. A rule listed
# here is a second copy of something a writer already does, unless the reason says otherwise.
JUSTIFIED_UNREACHABLE: dict[str, str] = {}


def test_every_rule_is_reachable_from_a_shipped_target():
    """Each rule's examples include a node some shipped target refuses and the rule rewrites."""
    names = {r.name for r in unreachable_rules()}
    assert names == set(JUSTIFIED_UNREACHABLE), sorted(names ^ set(JUSTIFIED_UNREACHABLE))


def test_unreachable_rules_finds_a_rule_every_target_already_runs():
    """A rule for an op every shipped target runs natively is reported, whatever it does."""
    node, graph = aten_node(torch.ops.aten.relu.default, [torch.randn(1, 2, 3, 3)], A(0))[:2]
    rule = Rule(name="tmp_relu_again", op="relu", build=lambda n, g, t: nn.ReLU(),
                description="a second copy of relu", examples=lambda: [(node, graph)])
    try:
        register_rule(rule)
        assert not any(reachable_by(rule, t) for t in shipped_targets())
        assert "tmp_relu_again" in {r.name for r in unreachable_rules()}
        no_examples = Rule(name="tmp_no_examples", op="gelu", build=lambda n, g, t: nn.GELU())
        register_rule(no_examples)
        assert "tmp_no_examples" in {r.name for r in unreachable_rules()}
    finally:
        unregister_rule("tmp_relu_again")
        unregister_rule("tmp_no_examples")
    assert unreachable_rules([get_target("onnx")]) == all_rules()
