"""Parametrized weights baked into plain parameters, when the baked value is provably the one used.

``torch.nn.utils.parametrize`` (``parametrizations.weight_norm`` / ``spectral_norm``) and the
legacy ``torch.nn.utils.weight_norm`` / ``spectral_norm`` forward pre-hooks recompute a conv's
``weight`` from other tensors at every call. Folding a BatchNorm needs one fixed weight, so the
conv is *baked* first: its weight becomes the tensor its eval-mode forward computes, held as a
plain parameter, and the machinery is removed. That is exact only when that tensor is a fixed
function of stored state, which is known for exactly these cases:

* weight norm (either API): ``g * v / ||v||``;
* spectral norm (either API) in eval mode: ``W / (u^T W v)`` with the *stored* ``u``, ``v``;
  there is no power iteration in eval mode, so nothing moves between calls.

Any other parametrization is opaque (it may read the training flag, draw random numbers or use
state outside the module), so a conv carrying one is left alone rather than baked.

Baking never calls ``parametrize.remove_parametrizations``: the ``Parametrized<Conv>`` class
torch creates is shared by a module and every deep copy of it, and that function deletes the
``weight`` property from the class, which would break the user's original model. The copy is
given back the class it had before parametrization and a parameter of its own instead.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

_KNOWN_PARAMETRIZATIONS = (_WeightNorm, _SpectralNorm)
_LEGACY_HOOKS = {WeightNorm: remove_weight_norm, SpectralNorm: remove_spectral_norm}
_BAKEABLE_NAMES = ("weight", "bias")


def _legacy_hooks(module: nn.Module) -> list[WeightNorm | SpectralNorm]:
    hooks = module._forward_pre_hooks.values()
    return [h for h in hooks
            if isinstance(h, (WeightNorm, SpectralNorm)) and type(h) in _LEGACY_HOOKS]


def _parametrizations(module: nn.Module) -> nn.ModuleDict:
    """The ``parametrizations`` container of a parametrized module; a cast because
    ``nn.Module.__getattr__`` is typed as returning ``Tensor | Module``."""
    return cast(nn.ModuleDict, module.parametrizations)


def baked_names(module: nn.Module) -> set[str]:
    """Tensor names of ``module`` that :func:`bake` turns into plain parameters."""
    names = {h.name for h in _legacy_hooks(module)}
    if parametrize.is_parametrized(module):
        names.update(_parametrizations(module).keys())
    return names


def bake_blocker(module: nn.Module) -> str | None:
    """Why :func:`bake` would not be exact for ``module``, or ``None`` when it would be.

    Also ``None`` for a module with nothing to bake. Any forward pre-hook other than a legacy
    weight/spectral norm hook is a blocker, since it can change the input or the weight.
    """
    legacy = _legacy_hooks(module)
    if len(legacy) != len(module._forward_pre_hooks):
        return "has forward pre-hooks"
    if module._forward_pre_hooks_with_kwargs:
        return "has forward pre-hooks"
    for hook in legacy:
        name = hook.name
        if name not in _BAKEABLE_NAMES:
            return f"a legacy {type(hook).__name__} hook parametrizes {name!r}"
        if isinstance(hook, SpectralNorm) and module.training:
            return "its legacy spectral norm is in training mode (power iteration moves u, v)"
    if not parametrize.is_parametrized(module):
        return None
    if legacy:
        return "it mixes legacy norm hooks with torch.nn.utils.parametrize"
    for name, plist in _parametrizations(module).items():
        if name not in _BAKEABLE_NAMES:
            return f"a parametrization rewrites {name!r}"
        for p in cast(parametrize.ParametrizationList, plist):
            if type(p) not in _KNOWN_PARAMETRIZATIONS:
                return (f"parametrization {type(p).__name__} on {name!r} is not known to give a "
                        "fixed weight in eval mode")
            if p.training:
                return f"parametrization {type(p).__name__} on {name!r} is in training mode"
    return None


@torch.no_grad()
def bake(module: nn.Module) -> None:
    """Replace every parametrization / legacy norm hook of ``module`` by a plain parameter that
    holds the value its eval-mode forward uses. In place; only call on a module you own and
    only after :func:`bake_blocker` returned ``None``."""
    for hook in _legacy_hooks(module):
        _LEGACY_HOOKS[type(hook)](module, hook.name)
    if not parametrize.is_parametrized(module):
        return
    plists = _parametrizations(module)
    values: dict[str, nn.Parameter] = {}
    for name, plist in plists.items():
        originals = [*plist.parameters(recurse=False), *plist.buffers(recurse=False)]
        value = getattr(module, name).detach().clone()
        values[name] = nn.Parameter(value, requires_grad=any(t.requires_grad for t in originals))
    before = parametrize.type_before_parametrizations(module)
    del module._modules["parametrizations"]
    module.__class__ = before
    params = module._parameters
    params.update(values)
    order = [k for k in _BAKEABLE_NAMES if k in params] + [
        k for k in params if k not in _BAKEABLE_NAMES]
    reordered = {k: params[k] for k in order}
    params.clear()
    params.update(reordered)
