"""Training form -> deploy form: fuse multi-branch blocks and fold conv->BatchNorm pairs.

The maths lives in :mod:`deployplug.reparam.fusion` (pure tensor functions); the module
walking lives in :mod:`deployplug.reparam.passes`; what the conv->BN pass may touch is decided
by :mod:`deployplug.reparam.eligibility` and :mod:`deployplug.reparam.parametrized`; the
optional check against the unfused model on an example input is
:mod:`deployplug.reparam.selfcheck`.
"""

from deployplug.reparam.passes import convert_blocks, fold_conv_bn, reparameterize

__all__ = ["convert_blocks", "fold_conv_bn", "reparameterize"]
