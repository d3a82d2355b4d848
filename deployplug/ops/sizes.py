"""Output sizes of windowed ops, per backend, side by side.

The backends agree on convolutions and disagree on pooling, which is where exports go wrong
silently: a pooled map one row longer in the runtime than in PyTorch shifts every later
value. Each formula below is one axis; every caller (decomposition rules, target checks,
writers) uses these, and ``tests/test_ops.py`` holds them against torch, OpenCV's Caffe
importer and the MsnhNet reference runtime.

* PyTorch: ``floor`` (or ``ceil`` with ``ceil_mode``) of ``(in + 2p - d(k-1) - 1) / s`` plus
  one; in ceil mode a last window that would start in the right padding is dropped.
* Caffe (BVLC and OpenCV): always ``ceil``; then, when the layer pads, a last window starting
  at or past ``in + p`` is dropped. BVLC applies that clip to both axes as soon as *either*
  axis pads; OpenCV applies it per axis (``layer_padded`` selects BVLC's reading).
* MsnhNet (measured on the real runtime): ``ceilMode`` 0 is floor; 1 is floor plus one when
  ``(in + 2p - k) mod s > p`` (PyTorch's ceil only when ``p == 0``); 2 is darknet's
  ``(in + p - k) / s + 1`` with the padding counted once.
"""

from __future__ import annotations


def _check(size: int, k: int, s: int) -> None:
    if size < 1 or k < 1 or s < 1:
        raise ValueError(f"window {k} with stride {s} over {size} elements")


def conv_out(size: int, k: int, s: int = 1, pad_before: int = 0, pad_after: int | None = None,
             d: int = 1) -> int:
    """Convolution output length; the same formula in PyTorch, Caffe and MsnhNet."""
    _check(size, k, s)
    pad_after = pad_before if pad_after is None else pad_after
    return (size + pad_before + pad_after - d * (k - 1) - 1) // s + 1


def conv_transpose_out(size: int, k: int, s: int = 1, p: int = 0, output_padding: int = 0,
                       d: int = 1) -> int:
    """Transposed convolution output length (PyTorch; Caffe Deconvolution has ``op = 0``)."""
    _check(size, k, s)
    return (size - 1) * s - 2 * p + d * (k - 1) + output_padding + 1


def msnhnet_deconv_out(size: int, k: int, s: int, p: int) -> int:
    """MsnhNet ``deconv``: ``(in - 1) s - 2p + k`` (no dilation, no output padding)."""
    _check(size, k, s)
    return (size - 1) * s - 2 * p + k


def torch_pool_out(size: int, k: int, s: int, p: int = 0, d: int = 1,
                   ceil_mode: bool = False) -> int:
    """PyTorch ``max_pool`` / ``avg_pool`` output length."""
    _check(size, k, s)
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def caffe_pool_out(size: int, k: int, s: int, p: int, layer_padded: bool | None = None) -> int:
    """Caffe ``Pooling`` output length: ceil, then the clip of a window starting in the pad.

    ``layer_padded`` is whether the layer pads on any axis (BVLC's condition for the clip);
    by default the clip applies when this axis pads (OpenCV's condition).
    """
    _check(size, k, s)
    out = -(-(size + 2 * p - k) // s) + 1
    padded = p > 0 if layer_padded is None else layer_padded
    if padded and (out - 1) * s >= size + p:
        out -= 1
    return out


def msnhnet_pool_out(size: int, k: int, s: int, p: int, ceil_mode: int) -> int:
    """MsnhNet ``maxpool`` / ``localavgpool`` output length for ``ceilMode`` 0, 1 or 2."""
    _check(size, k, s)
    if ceil_mode == 2:
        return int((size + p - k) / s) + 1
    if ceil_mode not in (0, 1):
        raise ValueError(f"MsnhNet ceilMode is 0, 1 or 2, not {ceil_mode}")
    span = size + 2 * p - k
    return span // s + 1 + (1 if ceil_mode == 1 and span % s > p else 0)
