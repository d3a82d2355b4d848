"""The decomposition rule registry: (op, target) -> exact replacement modules.

A rule says *how* to rebuild one normalized op (see :mod:`deployplug.capture`) from ops a
target has. *Whether* a node needs rebuilding is the target's call
(``target.refusal(node, graph)``), so a rule never hard-codes which targets lack an op: a
rule registered for ``"*"`` is offered to every target that refuses its op. What a rule needs
from the target (its pooling window limit, what it broadcasts) it reads from the target
object it is handed, never from a constant of one backend.

A rule answers like a target does: ``check(node, graph, target)`` is ``None`` when the rule
applies, otherwise what it would need; ``build(node, graph, target)`` returns the module.

Selection is deterministic: rules are tried by ascending priority; the first priority level
at which a rule applies wins, and two rules applying to the same node at the same priority is
a registration bug reported as :class:`RuleConflictError` rather than resolved by import
order.

Every built-in rule carries ``examples``: nodes it exists for. :func:`unreachable_rules`
runs them against the shipped targets, so a rule that no shipped target can ever hand work
to (because a writer already expresses the op) is found instead of kept as a second copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, overload

from torch import nn

from deployplug.capture import Graph, Node
from deployplug.errors import DeployError
from deployplug.profiles import TargetProfile, get_target, shipped_targets

ANY_TARGET = "*"

Check = Callable[[Node, Graph, TargetProfile], "str | None"]
Builder = Callable[[Node, Graph, TargetProfile], nn.Module]
Examples = Callable[[], Iterable[tuple[Node, Graph]]]


class RuleConflictError(DeployError):
    """Two rules of the same priority both claim one node."""


def _applies(node: Node, graph: Graph, target: TargetProfile) -> str | None:
    return None


def needs(predicate: Callable[[Node, Graph, TargetProfile], bool], what: str) -> Check:
    """A check from a yes/no predicate: ``"needs <what>"`` when it says no."""

    def check(node: Node, graph: Graph, target: TargetProfile) -> str | None:
        return None if predicate(node, graph, target) else f"needs {what}"

    return check


@dataclass(frozen=True)
class Rule:
    """One exact rewrite of ``op``.

    ``build`` returns a module computing exactly what the node computes; its ``forward``
    takes the node's activation inputs (``node.inputs``) in order, while weights and other
    constants are copied out of ``node.args``. ``check`` says why the rule does not apply to
    a node (``None`` when it does), so an error can explain itself.
    """

    name: str
    op: str
    build: Builder
    check: Check = _applies
    targets: frozenset[str] = frozenset({ANY_TARGET})
    priority: int = 100
    description: str = ""
    examples: Examples | None = None

    def serves(self, target: str | TargetProfile) -> bool:
        name = target.name if isinstance(target, TargetProfile) else target
        return ANY_TARGET in self.targets or name in self.targets

    def unmet(self, node: Node, graph: Graph, target: TargetProfile) -> str | None:
        """``None`` when this rule rewrites ``node`` for ``target``, otherwise why not."""
        if node.op != self.op:
            return f"rewrites {self.op}, not {node.op}"
        try:
            return self.check(node, graph, target)
        except (KeyError, TypeError, ValueError) as exc:
            return f"cannot read the node's arguments: {exc}"

    def applies(self, node: Node, graph: Graph, target: TargetProfile) -> bool:
        return self.unmet(node, graph, target) is None


_RULES: dict[str, Rule] = {}


@overload
def register_rule(rule: Rule) -> Rule: ...


@overload
def register_rule(rule: None = None, **fields: Any) -> Callable[[Builder], Rule]: ...


def register_rule(rule: Rule | None = None, **fields: Any) -> Rule | Callable[[Builder], Rule]:
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


def rules_for(op: str, target: str | TargetProfile | None = None) -> list[Rule]:
    """Rules rewriting ``op`` (for ``target`` when given), best priority first."""
    return [r for r in all_rules() if r.op == op and (target is None or r.serves(target))]


def _profile(target: str | TargetProfile) -> TargetProfile:
    """The target object; a name nobody registered gets default limits (no rule limit applies)."""
    if isinstance(target, TargetProfile):
        return target
    try:
        return get_target(target)
    except ValueError:
        return TargetProfile(name=target, format="", description="unregistered target name")


def choose_rule(node: Node, graph: Graph, target: str | TargetProfile) -> Rule | None:
    """The rule that rewrites ``node`` for ``target``, or ``None`` when none applies.

    Pass the target object rather than its name when it is not a registered one: rules read
    its limits.
    """
    profile = _profile(target)
    return _pick(rules_for(node.op, profile), node, graph, profile)


def _pick(candidates: Iterable[Rule], node: Node, graph: Graph,
          target: TargetProfile) -> Rule | None:
    by_priority: dict[int, list[Rule]] = {}
    for rule in candidates:
        by_priority.setdefault(rule.priority, []).append(rule)
    for priority in sorted(by_priority):
        winners = [r for r in by_priority[priority] if r.applies(node, graph, target)]
        if len(winners) > 1:
            names = ", ".join(r.name for r in winners)
            raise RuleConflictError(
                f"rules {names} all claim {node.op} at '{node.where}' with priority {priority}; "
                "give one of them a different priority or a narrower check"
            )
        if winners:
            return winners[0]
    return None


def why_not(node: Node, graph: Graph, target: str | TargetProfile) -> tuple[str, ...]:
    """For an error message: each rule for the op and why it did not apply here."""
    profile = _profile(target)
    notes = []
    for rule in rules_for(node.op):
        if not rule.serves(profile):
            notes.append(f"rule '{rule.name}' is not registered for target {profile.name}")
            continue
        reason = rule.unmet(node, graph, profile)
        if reason is not None:
            notes.append(f"rule '{rule.name}' does not apply: {reason}")
        else:
            notes.append(f"rule '{rule.name}' applied, but its result still contains this op")
    return tuple(notes)


def reachable_by(rule: Rule, target: TargetProfile) -> bool:
    """Whether one of ``rule``'s examples is refused by ``target`` and rewritten by ``rule``."""
    if rule.examples is None or not rule.serves(target):
        return False
    return any(target.refusal(node, graph) is not None and rule.applies(node, graph, target)
               for node, graph in rule.examples())


def unreachable_rules(targets: Iterable[TargetProfile] | None = None) -> list[Rule]:
    """Rules none of ``targets`` (default: the shipped ones) can hand a node to.

    A rule is reachable when one of its examples is a node some target refuses and the rule
    rewrites. Rules without examples cannot show that and are listed too.
    """
    chosen = list(shipped_targets() if targets is None else targets)
    return [r for r in all_rules() if not any(reachable_by(r, t) for t in chosen)]


def _load_builtin() -> None:
    # Rule modules register themselves on import; imported lazily to avoid import cycles.
    from deployplug.decompositions import rules  # noqa: F401
