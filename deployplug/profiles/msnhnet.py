"""The ``msnhnet`` target: what MsnhNet computes exactly, by the measured runtime semantics.

The op checks are :data:`.msnhnet_checks.CHECKS`; the MsnhNet writer lowers exactly those
ops. Not accepted (left to decomposition rules or refused): 3-D convolutions,
instance/layer/group norm, gelu, log_softmax, broadcasting element-wise ops, softmax anywhere
but the output, ``pow`` with a non-integer exponent on possibly negative values,
reflect/replicate padding, non-divisible adaptive pooling, bilinear resizing by non-exact
scale factors, reductions over the batch axis. Model-level limits: one input of rank 2 to 4,
one output.
"""

from __future__ import annotations

from deployplug.profiles.base import Limits, TargetProfile
from deployplug.profiles.msnhnet_checks import CHECKS, graph_limits

MSNHNET_LIMITS = Limits(broadcast="none")

DEFAULT_HINT = ("rewrite it into ops MsnhNet has: dp.decompose(model, example_input, 'msnhnet') "
                "applies every built-in rule, and dp.check(model, example_input, 'msnhnet') "
                "lists what remains; or export this model to ONNX instead")

MSNHNET = TargetProfile(
    name="msnhnet",
    format="msnhnet",
    description=(
        "MsnhNet .msnhnet/.msnhbin, checked by the numpy reference runtime that follows "
        "the measured C++ semantics"
    ),
    ops=CHECKS,
    limits=MSNHNET_LIMITS,
    default_hint=DEFAULT_HINT,
    graph_check=graph_limits,
)
