"""Built-in decomposition rules; importing this package registers all of them."""

from deployplug.decompositions.rules import (  # noqa: F401
    activations,
    adaptive_pool,
    constant_arith,
    conv3d,
    conv_transpose,
    instance_norm,
    pad,
    pooling,
    upsample,
)
