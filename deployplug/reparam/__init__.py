"""Training form -> deploy form: fuse multi-branch blocks and fold conv->BatchNorm pairs.

The maths lives in :mod:`deployplug.reparam.fusion` (pure tensor functions); the module
walking lives in :mod:`deployplug.reparam.passes`.
"""

from deployplug.reparam.passes import convert_blocks, fold_conv_bn, reparameterize

__all__ = ["convert_blocks", "fold_conv_bn", "reparameterize"]
