"""Helpers for checking numerical equivalence the way deployment bugs are actually caught.

Default BatchNorm initialisation (mean 0, var 1, gamma 1, beta 0) makes a BN almost an
identity and hides fusion bugs, so equivalence checks randomise the statistics first. Errors
are reported *normalized* (max|a-b| / max|ref|) because absolute errors on randomly
initialised deep nets span orders of magnitude.
"""

from __future__ import annotations

import torch
from torch import nn

from deployplug.numerics import normalized_error

__all__ = ["normalized_error", "randomize_batchnorm"]


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, in place."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            c = module.num_features
            mean, var = module.running_mean, module.running_var
            assert mean is not None and var is not None  # track_running_stats guarantees both
            with torch.no_grad():
                mean.copy_(torch.randn(c, generator=gen) * 0.5)
                var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    module.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model
