"""The decomposition rule registry: (op, target) -> exact replacement modules.

A rule says *how* to rebuild one normalized op (see :mod:`deployplug.capture`) from ops a
target has. *Whether* a node needs rebuilding is the target profile's call
(``profile.refusal(node, graph)``), so a rule never hard-codes which targets lack an op: a
rule registered for ``"*"`` is offered to every target that refuses its op.

Selection is deterministic: rules are tried by ascending priority; the first priority level
at which a predicate accepts the node wins, and two rules accepting the same node at the
same priority is a registration bug reported as :class:`RuleConflictError` rather than
resolved by import order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from deployplug.capture import Graph, Node
from deployplug.errors import DeployError

ANY_TARGET = "*"

Predicate = Callable[[Node, Graph], bool]
Builder = Callable[[Node, Graph], nn.Module]


class RuleConflictError(DeployError):
    """Two rules of the same priority both claim one node."""


@dataclass(frozen=True)
class Rule:
    """One exact rewrite of ``op``.

    ``build`` returns a module computing exactly what the node computes; its ``forward``
    takes the node's activation inputs (``node.inputs``) in order, while weights and other
    constants are copied out of ``node.args``. ``requires`` says in words when ``predicate``
    holds, so an error can explain why a rule did not apply.
    """

    name: str
    op: str
    build: Builder
    predicate: Predicate = field(default=lambda node, graph: True)
    targets: frozenset[str] = frozenset({ANY_TARGET})
    priority: int = 100
    description: str = ""
    requires: str = ""

    def serves(self, target: str) -> bool:
        return ANY_TARGET in self.targets or target in self.targets

    def applies(self, node: Node, graph: Graph) -> bool:
        return node.op == self.op and bool(self.predicate(node, graph))


_RULES: dict[str, Rule] = {}


def register_rule(rule: Rule | None = None, **fields) -> Rule | Callable[[Builder], Rule]:
    """Register ``rule``; or, used as ``@register_rule(name=..., op=...)``, build one.

    The decorator form wraps a builder function, so a rule module reads as one function per
    rewrite. Re-registering a name replaces the old rule only if it is the very same rule
    (module reloads); anything else is a name clash and raises.
    """
    if rule is None:

        def decorate(build: Builder) -> Rule:
            made = Rule(build=build, **fields)
            _add(made)
            return made

        return decorate
    _add(rule)
    return rule


def _add(rule: Rule) -> None:
    if isinstance(rule.targets, str):
        raise TypeError(f"rule {rule.name!r}: targets must be a set of names, not a string")
    old = _RULES.get(rule.name)
    if old is not None and (old.op, old.build.__qualname__) != (rule.op, rule.build.__qualname__):
        raise ValueError(f"a different rule named {rule.name!r} is already registered")
    _RULES[rule.name] = rule


def unregister_rule(name: str) -> None:
    """Remove a rule (tests register temporary rules and must clean up)."""
    _RULES.pop(name, None)


def all_rules() -> list[Rule]:
    """Every registered rule, ordered by op, priority and name."""
    _load_builtin()
    return sorted(_RULES.values(), key=lambda r: (r.op, r.priority, r.name))


def rules_for(op: str, target: str | None = None) -> list[Rule]:
    """Rules rewriting ``op`` (for ``target`` when given), best priority first."""
    return [r for r in all_rules() if r.op == op and (target is None or r.serves(target))]


def choose_rule(node: Node, graph: Graph, target: str) -> Rule | None:
    """The rule that rewrites ``node`` for ``target``, or ``None`` when none applies."""
    return _pick(rules_for(node.op, target), node, graph)


def _pick(candidates: Iterable[Rule], node: Node, graph: Graph) -> Rule | None:
    by_priority: dict[int, list[Rule]] = {}
    for rule in candidates:
        by_priority.setdefault(rule.priority, []).append(rule)
    for priority in sorted(by_priority):
        winners = [r for r in by_priority[priority] if r.applies(node, graph)]
        if len(winners) > 1:
            names = ", ".join(r.name for r in winners)
            raise RuleConflictError(
                f"rules {names} all claim {node.op} at '{node.where}' with priority {priority}; "
                "give one of them a different priority or a narrower predicate"
            )
        if winners:
            return winners[0]
    return None


def why_not(node: Node, graph: Graph, target: str) -> tuple[str, ...]:
    """For an error message: each rule for the op and why it did not apply here."""
    notes = []
    for rule in rules_for(node.op):
        if not rule.serves(target):
            notes.append(f"rule '{rule.name}' is not registered for target {target}")
        elif not rule.applies(node, graph):
            needs = rule.requires or "other attributes"
            notes.append(f"rule '{rule.name}' does not apply: needs {needs}")
        else:
            notes.append(f"rule '{rule.name}' applied, but its result still contains this op")
    return tuple(notes)


def _load_builtin() -> None:
    # Rule modules register themselves on import; imported lazily to avoid import cycles.
    from deployplug.decompositions import rules  # noqa: F401
