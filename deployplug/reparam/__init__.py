"""Training form -> deploy form: fuse multi-branch blocks and fold conv->BatchNorm pairs.

The maths lives in :mod:`deployplug.reparam.fusion` (pure tensor functions); the module
walking lives in :mod:`deployplug.reparam.passes`; the generic pass that collapses any linear
multi-branch region into one conv is :mod:`deployplug.reparam.generic` (ops and regions:
:mod:`~deployplug.reparam.linear_ops`, :mod:`~deployplug.reparam.linear_regions`; algebra:
:mod:`~deployplug.reparam.affine_form`, :mod:`~deployplug.reparam.kernel_sum`,
:mod:`~deployplug.reparam.region_algebra`; check:
:mod:`~deployplug.reparam.region_check`; rewrite: :mod:`~deployplug.reparam.rewrite`; report:
:mod:`~deployplug.reparam.report`); what the conv->BN pass may touch is decided
by :mod:`deployplug.reparam.eligibility` and :mod:`deployplug.reparam.parametrized`; the
optional check against the unfused model on an example input is
:mod:`deployplug.reparam.selfcheck`.
"""

from deployplug.reparam.generic import collapse_linear_regions
from deployplug.reparam.passes import convert_blocks, fold_conv_bn, reparameterize
from deployplug.reparam.report import LinearRegionWarning, ReparamReport

__all__ = ["LinearRegionWarning", "ReparamReport", "collapse_linear_regions", "convert_blocks",
           "fold_conv_bn", "reparameterize"]
