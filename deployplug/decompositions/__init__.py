"""Target-aware decomposition: rewrite the ops a target lacks into exact equivalents.

``decompose(model, example_input, target)`` returns a copy of ``model`` in which every op the
target profile refuses has been replaced by a module built from ops it accepts. Rules live
in :mod:`deployplug.decompositions.rules`, one module per concept, and register themselves with
:func:`register_rule`.
"""

from deployplug.decompositions.apply import decompose, run_decompose
from deployplug.decompositions.registry import (
    ANY_TARGET,
    Rule,
    RuleConflictError,
    all_rules,
    choose_rule,
    needs,
    reachable_by,
    register_rule,
    rules_for,
    unreachable_rules,
    unregister_rule,
    why_not,
)

__all__ = [
    "ANY_TARGET",
    "Rule",
    "RuleConflictError",
    "all_rules",
    "choose_rule",
    "decompose",
    "needs",
    "reachable_by",
    "register_rule",
    "rules_for",
    "run_decompose",
    "unreachable_rules",
    "unregister_rule",
    "why_not",
]
