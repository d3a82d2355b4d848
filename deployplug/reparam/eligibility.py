"""Which modules the generic conv->BatchNorm pass may rewrite, and why the others are left alone.

Folding rewrites a convolution's ``weight``/``bias`` and deletes the BatchNorm after it. That is
exact only when the conv computes ``F.convNd(x, self.weight, self.bias, ...)`` and nothing else,
and the BatchNorm computes the inference-mode affine map of its running statistics. A subclass
can break either promise in many ways (its own ``forward``, a hook, a ``weight`` property,
``__getattr__``), so instead of recognising what is wrong these checks recognise what is known
to be right: torch's own methods, inherited unchanged. Everything else is reported as a reason
string and left alone.

Parametrized weights (``torch.nn.utils.parametrize``) and the legacy ``weight_norm`` /
``spectral_norm`` forward pre-hooks are judged by :mod:`deployplug.reparam.parametrized`: they
only change *which* weight the standard forward sees, so a conv that carries them can still be
folded once its eval-mode weight is baked in.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter
from torch.nn.utils import parametrize

from deployplug.reparam.parametrized import bake_blocker, baked_names

_CONV_CLASSES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
                 nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# Methods through which a call reaches ``forward`` or a read reaches ``weight``: a subclass
# that redefines any of them can compute something else with the same parameters.
_CALL_PATH = ("__call__", "_call_impl", "_wrapped_call_impl",
              "__getattr__", "__getattribute__", "__setattr__")
_CONV_METHODS = ("forward", "_conv_forward", "_output_padding", *_CALL_PATH)
_BN_METHODS = ("forward", *_CALL_PATH)
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "eps")


def _changed_method(cls: type, base: type, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` that ``cls`` resolves differently from ``base``, if any."""
    for name in names:
        if getattr(cls, name, None) is not getattr(base, name, None):
            return name
    return None


def _shadowing_attribute(cls: type, base: type, names: tuple[str, ...]) -> str | None:
    """A class-level attribute (property, descriptor) between ``cls`` and ``base`` that hides
    one of the ``names`` that normally live in ``_parameters`` / ``_buffers``."""
    for klass in cls.__mro__:
        if klass is base:
            return None
        for name in names:
            if name in vars(klass):
                return f"{klass.__name__}.{name}"
    return None


def _hooks(module: nn.Module) -> str | None:
    if module._forward_hooks:
        return "has forward hooks"
    if module._forward_pre_hooks:
        return "has forward pre-hooks"
    return None


def conv_blocker(conv: nn.Module) -> str | None:
    """Why ``conv`` cannot take a BatchNorm into its weight, or ``None`` if it can.

    ``None`` means: the class is a torch convolution or a subclass that inherits the call
    path, ``forward`` and ``_conv_forward`` unchanged; nothing intercepts ``weight``/``bias``;
    there are no forward hooks; and any parametrization or legacy norm hook on it can be baked
    into a plain parameter exactly (see :func:`~deployplug.reparam.parametrized.bake_blocker`).
    """
    if not isinstance(conv, _ConvNd):
        return f"{type(conv).__name__} is not a convolution"
    cls = parametrize.type_before_parametrizations(conv)
    base = next((k for k in cls.__mro__ if k in _CONV_CLASSES), None)
    if base is None:
        return f"{cls.__name__} derives from no torch convolution class"
    changed = _changed_method(cls, base, _CONV_METHODS)
    if changed is not None:
        return f"{cls.__name__} overrides {changed}(), so its output is not the plain convolution"
    shadow = _shadowing_attribute(cls, base, ("weight", "bias"))
    if shadow is not None:
        return f"{shadow} is defined on the class, so the forward may not read the parameter"
    if conv._forward_hooks:
        return "has forward hooks"
    bake = bake_blocker(conv)
    if bake is not None:
        return bake
    baked = baked_names(conv)
    for name in ("weight", "bias"):
        if name in baked:
            continue
        if name not in conv._parameters:
            return f"its {name} is not a registered parameter"
    if isinstance(conv._parameters.get("weight"), UninitializedParameter):
        return "it is a lazy convolution that has not been initialised"
    return None


def bn_blocker(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded away, or ``None`` if its eval forward is the affine map.

    Missing running statistics are not a blocker here: the caller raises
    :class:`~deployplug.errors.BatchNormStatsError` for them, since such a BatchNorm after a
    foldable conv is a training setup problem the user should hear about.
    """
    if not isinstance(bn, _BatchNorm):
        return f"{type(bn).__name__} is not a BatchNorm"
    base = nn.SyncBatchNorm if isinstance(bn, nn.SyncBatchNorm) else _BatchNorm
    changed = _changed_method(type(bn), base, _BN_METHODS)
    if changed is not None:
        return (f"{type(bn).__name__} overrides {changed}(), so it computes more than the "
                "BatchNorm affine map")
    shadow = _shadowing_attribute(type(bn), base, _BN_STATE)
    if shadow is not None:
        return f"{shadow} is defined on the class"
    if parametrize.is_parametrized(bn):
        return "its parameters are parametrized"
    hooks = _hooks(bn)
    if hooks is not None:
        return hooks
    if bn.training:
        return "it is still in training mode after eval() (it would use batch statistics)"
    if isinstance(bn.running_mean, UninitializedBuffer):
        return "it is a lazy BatchNorm that has not been initialised"
    return None


def runs_children_in_order(container: nn.Module) -> bool:
    """True when ``container`` is an ``nn.Sequential`` whose call runs its children one after
    another and returns only the last output (no override of ``forward``, ``__iter__`` or the
    call path), so adjacency is data flow. Hooks on the container itself are fine: they see its
    input and output, which folding inside it does not change."""
    if not isinstance(container, nn.Sequential):
        return False
    return _changed_method(type(container), nn.Sequential,
                           ("forward", "__iter__", *_CALL_PATH)) is None
