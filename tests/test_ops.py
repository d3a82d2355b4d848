"""The op-semantics layer against the ground truth: torch's own shapes and values, OpenCV's
Caffe importer, and the MsnhNet reference runtime's independent pooling formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deployplug.capture import Graph, Node, Value
from deployplug.errors import OpAttributeError
from deployplug.ops import attrs, sizes
from deployplug.runtimes.msnhnet.ops import pool_out as runtime_pool_out

EXAMPLES = 200


def _node(op: str, args: dict, in_shape: tuple[int, ...], out_shape=None) -> tuple[Node, Graph]:
    node = Node(name=op, op=op, target=op, args=args, inputs=["x"],
                shape=None if out_shape is None else tuple(out_shape), dtype=torch.float32,
                module_path="m", module_type="M")
    return node, Graph(inputs=[Value("x", tuple(in_shape), torch.float32)], nodes=[node],
                       outputs=[op])


# -- attribute normalisation ----------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None)
@given(n=st.integers(1, 3), value=st.one_of(
    st.integers(-5, 9), st.lists(st.integers(-5, 9), min_size=0, max_size=4)))
def test_pair_accepts_atens_three_spellings_and_refuses_the_rest(n, value):
    if isinstance(value, int):
        assert attrs.pair(value, n) == (value,) * n
    elif len(value) == 1:
        assert attrs.pair(value, n) == (value[0],) * n
    elif len(value) == n:
        assert attrs.pair(value, n) == tuple(value)
    elif not value:
        assert attrs.pair(value, n, default=7) == (7,) * n
        with pytest.raises(OpAttributeError):
            attrs.pair(value, n)
    else:
        with pytest.raises(OpAttributeError, match="kernel_size"):
            attrs.pair(value, n, name="kernel_size")


def test_pair_refuses_bools_and_none_without_default():
    with pytest.raises(OpAttributeError):
        attrs.pair(True)
    with pytest.raises(OpAttributeError):
        attrs.pair(None)
    assert attrs.pair(None, 2, default=1) == (1, 1)


def test_pool_attrs_reads_an_empty_stride_as_the_kernel():
    node, _ = _node("max_pool2d", {"kernel_size": [3, 2], "stride": [], "padding": [1],
                                   "dilation": [1, 1], "ceil_mode": True}, (1, 1, 8, 8))
    pa = attrs.pool_attrs(node)
    assert (pa.kernel, pa.stride, pa.padding, pa.dilation) == ((3, 2), (3, 2), (1, 1), (1, 1))
    assert pa.ceil_mode and pa.count_include_pad and pa.divisor_override is None


@settings(max_examples=EXAMPLES, deadline=None)
@given(rank=st.integers(1, 4), data=st.data())
def test_pad_spec_matches_torch_pad_shapes(rank, data):
    shape = tuple(data.draw(st.integers(2, 6)) for _ in range(rank))
    count = data.draw(st.integers(0, rank))
    pads = [data.draw(st.integers(-1, 3)) for _ in range(2 * count)]
    x = torch.zeros(shape)
    node, graph = _node("constant_pad_nd", {"pad": pads, "value": 0.5}, shape)
    spec = attrs.pad_spec(node, graph)
    expected = tuple(s + sum(spec.axis(d)) for d, s in enumerate(shape))
    assume(min(expected) > 0)
    assert tuple(F.pad(x, pads, value=0.5).shape) == expected
    assert spec.mode == "constant" and spec.value == 0.5
    assert spec.symmetric == all(a == b and a >= 0 for a, b in zip(pads[::2], pads[1::2]))


def test_pad_spec_refuses_malformed_lists():
    node, graph = _node("pad", {"pad": [1, 2, 3], "mode": "constant"}, (1, 2, 3, 4))
    with pytest.raises(OpAttributeError, match="even number"):
        attrs.pad_spec(node, graph)
    node, graph = _node("pad", {"pad": [1] * 10, "mode": "constant"}, (1, 2, 3, 4))
    with pytest.raises(OpAttributeError, match="at most 8"):
        attrs.pad_spec(node, graph)


@pytest.mark.filterwarnings("ignore:Truncating the start/stop/step")
@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.integers(0, 12),
       start=st.one_of(st.none(), st.integers(-20, 20), st.just(2**63 - 1)),
       end=st.one_of(st.none(), st.integers(-20, 20), st.just(2**63 - 1), st.just(-(2**63))),
       step=st.integers(1, 4))
def test_slice_bounds_match_python_and_torch(size, start, end, step):
    lo, hi, st_ = attrs.slice_bounds(size, start, end, step)
    assert 0 <= lo <= hi <= size
    kept = list(range(lo, hi, st_))
    assert kept == list(range(size))[start:end:step]
    x = torch.arange(size)
    assert x[start:end:step].tolist() == kept


def test_slice_bounds_refuse_non_positive_steps():
    with pytest.raises(OpAttributeError, match="step"):
        attrs.slice_bounds(5, 0, 5, 0)


@settings(max_examples=EXAMPLES, deadline=None)
@given(rank=st.integers(1, 4), data=st.data())
def test_reduce_dims_match_torch_sum(rank, data):
    shape = tuple(data.draw(st.integers(1, 4)) for _ in range(rank))
    dims = data.draw(st.one_of(
        st.none(), st.just([]), st.integers(-rank, rank - 1),
        st.lists(st.integers(-rank, rank - 1), min_size=1, max_size=rank,
                 unique_by=lambda d: d % rank)))
    node, graph = _node("sum", {"dim": dims}, shape)
    axes, got_rank = attrs.reduce_dims(node, graph)
    assert got_rank == rank and axes == sorted(set(axes))
    x = torch.ones(shape)
    summed = x.sum() if dims is None or dims == [] else x.sum(dims)
    assert summed.numel() * int(np.prod([shape[a] for a in axes])) == x.numel()
    kept = x.sum(dim=axes, keepdim=True) if axes else x
    assert torch.equal(kept.reshape(-1), summed.reshape(-1))


def test_norm_dim_refuses_axes_out_of_range():
    assert attrs.norm_dim(-1, 4) == 3
    with pytest.raises(OpAttributeError, match="out of range"):
        attrs.norm_dim(4, 4)
    with pytest.raises(OpAttributeError):
        attrs.norm_dim(-5, 4)


@settings(max_examples=EXAMPLES, deadline=None)
@given(c=st.integers(1, 4), rank=st.integers(2, 4), data=st.data())
def test_channel_vector_is_exactly_the_broadcast_constant(c, rank, data):
    shape = (2, c) + (3,) * (rank - 2)
    const_shape = data.draw(st.sampled_from([(), (1,), (c,), (1, c), (c, 1), (1, c, 1),
                                             (c,) + (1,) * (rank - 2), (1, 3), (3, 1, 1)]))
    const = torch.randn(const_shape, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    try:
        want = x + const
    except RuntimeError:
        want = None
    vec = attrs.channel_vector(const, shape)
    if vec is not None:
        assert want is not None and want.shape == x.shape
        assert torch.equal(x + vec.reshape((1, c) + (1,) * (rank - 2)), want)
    elif want is not None and want.shape == x.shape:
        # refused although it keeps the shape: then it varies along batch or a spatial axis
        diff = (want - x).reshape(2, c, -1)
        assert not torch.equal(diff, diff[:1, :, :1].expand_as(diff))


def test_channel_vector_takes_numbers_but_not_bools():
    assert torch.equal(attrs.channel_vector(2, (1, 3, 4, 4)), torch.full((3,), 2.0,
                                                                         dtype=torch.float64))
    assert attrs.channel_vector(True, (1, 3)) is None
    assert attrs.channel_vector(torch.ones(3, dtype=torch.bool), (1, 3)) is None


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=EXAMPLES, deadline=None)
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), dh=st.integers(1, 3), dw=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_same_padding_is_torchs_before_after_split(kh, kw, dh, dw, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 2, 7, 9, generator=gen)
    w = torch.randn(3, 2, kh, kw, generator=gen)
    node, _ = _node("conv2d", {"weight": w, "padding": "same", "dilation": [dh, dw]}, x.shape)
    (top, bottom), (left, right) = attrs.conv_pads(node)
    assert ((top, bottom), (left, right)) == attrs.same_pads((kh, kw), (dh, dw))
    ref = F.conv2d(x, w, padding="same", dilation=(dh, dw))
    ours = F.conv2d(F.pad(x, (left, right, top, bottom)), w, dilation=(dh, dw))
    assert torch.equal(ours, ref)


def test_conv_pads_read_valid_ints_and_refuse_unknown_strings():
    w = torch.zeros(1, 1, 3, 3)
    assert attrs.conv_pads(_node("conv2d", {"weight": w, "padding": "valid"}, (1, 1, 5, 5))[0]) \
        == ((0, 0), (0, 0))
    assert attrs.conv_pads(_node("conv2d", {"weight": w, "padding": [1, 2]}, (1, 1, 5, 5))[0]) \
        == ((1, 1), (2, 2))
    with pytest.raises(OpAttributeError):
        attrs.conv_pads(_node("conv2d", {"weight": w, "padding": "full"}, (1, 1, 5, 5))[0])


def test_clamp_bounds_for_every_spelling():
    def bounds(op, **args):
        return attrs.clamp_bounds(_node(op, args, (1, 1))[0])

    assert bounds("relu6") == (0.0, 6.0)
    assert bounds("hardtanh", min_val=-2, max_val=3) == (-2.0, 3.0)
    assert bounds("clamp", min=None, max=torch.tensor(2.5)) == (None, 2.5)
    assert bounds("clamp_min", min=1) == (1.0, None)
    assert bounds("clamp_max", max=-1) == (None, -1.0)
    with pytest.raises(OpAttributeError):
        bounds("clamp", min=torch.ones(3), max=None)


# -- output sizes: PyTorch --------------------------------------------------------------------
@st.composite
def pool_cases(draw):
    k = draw(st.integers(1, 6))
    d = draw(st.integers(1, 3))
    s = draw(st.integers(1, 5))
    p = draw(st.integers(0, k // 2))
    size = draw(st.integers(1, 20))
    assume(size + 2 * p >= d * (k - 1) + 1)
    return size, k, s, p, d, draw(st.booleans())


@settings(max_examples=EXAMPLES, deadline=None)
@given(pool_cases())
def test_torch_pool_out_is_torchs_shape(case):
    size, k, s, p, d, ceil = case
    x = torch.zeros(1, 1, size, 3)
    got = F.max_pool2d(x, (k, 1), (s, 1), (p, 0), (d, 1), ceil_mode=ceil).shape[2]
    assert sizes.torch_pool_out(size, k, s, p, d, ceil) == got
    if d == 1:
        avg = F.avg_pool2d(x, (k, 1), (s, 1), (p, 0), ceil_mode=ceil).shape[2]
        assert sizes.torch_pool_out(size, k, s, p, 1, ceil) == avg


@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.integers(1, 16), k=st.integers(1, 5), s=st.integers(1, 4), before=st.integers(0, 3),
       after=st.integers(0, 3), d=st.integers(1, 3))
def test_conv_out_is_torchs_shape(size, k, s, before, after, d):
    assume(size + before + after >= d * (k - 1) + 1)
    x = F.pad(torch.zeros(1, 1, size, 1), (0, 0, before, after))
    got = F.conv2d(x, torch.zeros(1, 1, k, 1), stride=(s, 1), dilation=(d, 1)).shape[2]
    assert sizes.conv_out(size, k, s, before, after, d) == got
    if before == after:
        sym = F.conv2d(torch.zeros(1, 1, size, 1), torch.zeros(1, 1, k, 1), stride=(s, 1),
                       padding=(before, 0), dilation=(d, 1)).shape[2]
        assert sizes.conv_out(size, k, s, before, d=d) == sym


@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.integers(1, 10), k=st.integers(1, 5), s=st.integers(1, 4), p=st.integers(0, 3),
       op=st.integers(0, 3), d=st.integers(1, 3))
def test_conv_transpose_out_is_torchs_shape(size, k, s, p, op, d):
    assume(op < max(s, d))
    out = sizes.conv_transpose_out(size, k, s, p, op, d)
    assume(out >= 1)
    got = F.conv_transpose2d(torch.zeros(1, 1, size, 1), torch.zeros(1, 1, k, 1), stride=(s, 1),
                             padding=(p, 0), output_padding=(op, 0), dilation=(d, 1)).shape[2]
    assert out == got
    if d == 1 and op == 0:
        assert sizes.msnhnet_deconv_out(size, k, s, p) == got


# -- output sizes: Caffe ----------------------------------------------------------------------
def _opencv_pool_shape(h: int, w: int, k: tuple[int, int], s: tuple[int, int],
                       p: tuple[int, int]) -> tuple[int, int]:
    import cv2

    text = (
        f'input: "x"\ninput_shape {{ dim: 1 dim: 1 dim: {h} dim: {w} }}\n'
        'layer { name: "p" type: "Pooling" bottom: "x" top: "p" pooling_param { pool: MAX '
        f"kernel_h: {k[0]} kernel_w: {k[1]} stride_h: {s[0]} stride_w: {s[1]} "
        f"pad_h: {p[0]} pad_w: {p[1]} }} }}\n")
    net = cv2.dnn.readNetFromCaffe(np.frombuffer(text.encode(), np.uint8))
    net.setInput(np.zeros((1, 1, h, w), np.float32), "x")
    out = net.forward("p")
    return int(out.shape[2]), int(out.shape[3])


@settings(max_examples=EXAMPLES, deadline=None)
@given(h=st.integers(1, 14), w=st.integers(1, 14), data=st.data())
def test_caffe_pool_out_is_what_opencv_computes(h, w, data):
    k = (data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5)))
    s = (data.draw(st.integers(1, 4)), data.draw(st.integers(1, 4)))
    p = (data.draw(st.integers(0, (k[0] - 1) // 2)), data.draw(st.integers(0, (k[1] - 1) // 2)))
    assume(h + 2 * p[0] >= k[0] and w + 2 * p[1] >= k[1])
    want = tuple(sizes.caffe_pool_out(n, kk, ss, pp) for n, kk, ss, pp in zip((h, w), k, s, p))
    assert _opencv_pool_shape(h, w, k, s, p) == want


@settings(max_examples=EXAMPLES, deadline=None)
@given(pool_cases())
def test_caffe_pool_out_against_its_documented_rule(case):
    """Ceil, then drop a last window that starts at or past ``in + p``; within one of torch."""
    size, k, s, p, _, _ = case
    assume(size + 2 * p >= k)
    out = sizes.caffe_pool_out(size, k, s, p)
    torch_ceil = sizes.torch_pool_out(size, k, s, p, ceil_mode=True)
    bvlc = sizes.caffe_pool_out(size, k, s, p, layer_padded=True)
    assert bvlc == torch_ceil  # with the clip, Caffe's rule is PyTorch's ceil mode
    if p > 0:
        assert out == bvlc and (out - 1) * s < size + p
    else:
        assert out in (torch_ceil, torch_ceil + 1)


def test_bvlc_clips_an_unpadded_axis_when_the_other_pads():
    # stride 3 over a 1-wide window on 5 rows: ceil gives 3 windows, the last starting at 6
    assert sizes.caffe_pool_out(5, 1, 3, 0) == 3
    assert sizes.caffe_pool_out(5, 1, 3, 0, layer_padded=True) == 2


# -- output sizes: MsnhNet --------------------------------------------------------------------
@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.integers(1, 20), k=st.integers(1, 6), s=st.integers(1, 5), p=st.integers(0, 3),
       mode=st.sampled_from([0, 1, 2]))
def test_msnhnet_pool_out_agrees_with_the_reference_runtime(size, k, s, p, mode):
    assume(size + 2 * p >= k and size + p >= k)
    assert sizes.msnhnet_pool_out(size, k, s, p, mode) == runtime_pool_out(size, k, s, p, mode)


@settings(max_examples=EXAMPLES, deadline=None)
@given(size=st.integers(1, 20), k=st.integers(1, 6), s=st.integers(1, 5))
def test_msnhnet_ceil_mode_equals_torch_ceil_without_padding(size, k, s):
    """True unless MsnhNet's last ceil window starts past the input (stride over kernel),
    which PyTorch drops and the reference runtime refuses."""
    assume(size >= k)
    assert sizes.msnhnet_pool_out(size, k, s, 0, 0) == sizes.torch_pool_out(size, k, s)
    ceil = sizes.msnhnet_pool_out(size, k, s, 0, 1)
    if (ceil - 1) * s < size:
        assert ceil == sizes.torch_pool_out(size, k, s, ceil_mode=True)
    else:
        assert s > k and ceil == sizes.torch_pool_out(size, k, s, ceil_mode=True) + 1


def test_msnhnet_pool_out_measured_cases():
    """The cases measured on the real runtime (reference sheet, pooling section)."""
    assert sizes.msnhnet_pool_out(8, 3, 2, 1, 1) == 4  # PyTorch ceil: 5
    assert sizes.torch_pool_out(8, 3, 2, 1, ceil_mode=True) == 5
    assert sizes.msnhnet_pool_out(8, 5, 3, 2, 1) == 3  # PyTorch ceil: 4
    assert sizes.torch_pool_out(8, 5, 3, 2, ceil_mode=True) == 4
    assert (sizes.msnhnet_pool_out(9, 3, 2, 1, 2), sizes.msnhnet_pool_out(12, 3, 2, 1, 2)) == (4, 6)
    with pytest.raises(ValueError):
        sizes.msnhnet_pool_out(8, 3, 2, 1, 3)
