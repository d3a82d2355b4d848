"""Facts about ops, independent of any target: attribute normalisation and output sizes.

:mod:`.attrs` reads a captured node's attributes in one normal form (pairs, pool geometry,
pad lists, slice bounds, reduced axes, per-channel constants, ``padding='same'``);
:mod:`.sizes` gives output lengths as PyTorch, Caffe and MsnhNet compute them. Target checks,
decomposition rules and writers all read ops through these, so no two of them can disagree
about what a node means.
"""

from deployplug.ops import attrs, sizes

__all__ = ["attrs", "sizes"]
