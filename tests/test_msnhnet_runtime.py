"""The MsnhNet reference runtime on hand-written files: measured semantics and rejections."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deployplug.errors import ArtifactFormatError
from deployplug.runtimes import msnhnet as rt
from deployplug.runtimes.msnhnet.ops import pool_out
from deployplug.testing import normalized_error

RNG = np.random.default_rng(0)


def _config(c: int, h: int, w: int, batch: int = 1) -> str:
    return f"config:\n  batch: {batch}\n  channels: {c}\n  height: {h}\n  width: {w}\n"


def _write(tmp_path: Path, body: str, weights: list[np.ndarray] | None = None,
           raw: bytes | None = None, shape: tuple[int, int, int] = (3, 6, 7)) -> rt.MsnhNetModel:
    net, binf = tmp_path / "m.msnhnet", tmp_path / "m.msnhbin"
    net.write_text(_config(*shape) + body)
    if raw is None:
        flat = [np.asarray(w, np.float32).reshape(-1) for w in (weights or [])]
        raw = np.concatenate(flat).astype("<f4").tobytes() if flat else np.zeros(
            0, "<f4").tobytes()
    binf.write_bytes(raw)
    return rt.load(net, binf)


def _x(shape: tuple[int, ...]) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _ref(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


# ---------------------------------------------------------------------------- rejections
REJECTIONS = {
    "unknown field": ("conv:\n  filters: 2\n  colour: 1\n", "'colour' is not supported"),
    "unknown layer": ("frobnicate:\n  a: 1\n", "unknown layer keyword 'frobnicate'"),
    "route at layer 0": ("route:\n  layers: 0\n", "cannot be layer 0"),
    "route to a later layer": ("act:\n  activation: relu\nroute:\n  layers: 2\n",
                               "not an earlier layer"),
    "route to itself": ("act:\n  activation: relu\nroute:\n  layers: 1\n",
                        "not an earlier layer"),
    "route to a missing layer": ("act:\n  activation: relu\nroute:\n  layers: -5\n",
                                 "not an earlier layer"),
    "route groups": ("act:\n  activation: relu\nroute:\n  layers: 0\n  groups: 2\n",
                     "route groups"),
    "pixshf": ("pixshf:\n  factor: 2\n", "pixshf"),
    "deconv groups": ("deconv:\n  filters: 3\n  groups: 3\n  kSize: 2\n  stride: 2\n",
                      "deconv groups=3"),
    "varop tanh": ("varop:\n  type: tanh\n", "varop tanh computes tan"),
    "unknown varop": ("varop:\n  type: cube\n", "unknown varop type"),
    "conv batchNorm without bias": ("conv:\n  filters: 2\n  batchNorm: 1\n  useBias: 0\n",
                                    "useBias: 0"),
    "connect batchNorm without bias": ("connect:\n  output: 2\n  batchNorm: 1\n  useBias: 0\n",
                                       "useBias: 0"),
    "padded maxpool": ("maxpool:\n  kSize: 3\n  stride: 2\n  padding: 1\n", "maxpool padding"),
    "nearest scaleX": ("upsample:\n  type: nearest\n  strideX: 2\n  strideY: 2\n"
                       "  scaleX: 3.0\n", "multiplies every value by scaleX"),
    "elu alpha": ("act:\n  activation: elu,0.5\n", "ignores the alpha"),
    "unmeasured activation": ("act:\n  activation: loggy\n", "not verified"),
    "varop names previous (1 index)": ("act:\n  activation: relu\nvarop:\n  layers: 0\n"
                                       "  type: add\n", "previous layer"),
    "varop names previous (2 indices)": ("act:\n  activation: relu\nact:\n  activation: tanh\n"
                                         "varop:\n  layers: 0,1\n  type: add\n",
                                         "previous layer"),
    "varop shape mismatch": ("act:\n  activation: relu\nglobalavgpool:\nact:\n"
                             "  activation: none\nvarop:\n  layers: 0,1\n  type: add\n",
                             "equal shapes"),
    "route concat H mismatch": ("act:\n  activation: relu\nglobalavgpool:\nroute:\n"
                                "  layers: 0,1\n", "equal H and W"),
    "route add single": ("act:\n  activation: relu\nroute:\n  layers: 0\n  addModel: 1\n",
                         "at least 2"),
    "layer after softmax": ("softmax:\n  groups: 1\nconv:\n  filters: 1\n", "softmax"),
    "route to softmax": ("softmax:\n  groups: 1\nact:\n  activation: relu\nroute:\n"
                         "  layers: 0\n", "softmax"),
    "deconv first on non-square input": ("deconv:\n  filters: 1\n  kSize: 2\n  stride: 2\n",
                                         "layer 0"),
    "flow list": ("route:\n  layers: [0, 0]\n", "flow collection"),
    "scalar layer": ("act: relu\n", "must be a map"),
    "null layer": ("act:\n", "must be a map"),
    "yaml list value": ("act:\n  - relu\n", "YAML list"),
    "upsample type": ("upsample:\n  type: bicubic\n", "nearest or bilinear"),
    "reduction axis": ("reduction:\n  type: sum\n", "axis must be"),
    "view count": ("view:\n  dim0: 5\n  dim1: 5\n  dim2: 5\n", "does not hold"),
    "localavgpool window in padding": ("localavgpool:\n  kSizeX: 1\n  kSizeY: 1\n"
                                       "  paddingX: 1\n  paddingY: 1\n", "entirely in the "
                                       "padding"),
    "non-square maxpool equal strides": ("maxpool:\n  kSizeX: 3\n  kSizeY: 2\n  strideX: 1\n"
                                         "  strideY: 1\n", "unverified AVX"),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejected_constructs(tmp_path: Path, case: str) -> None:
    body, message = REJECTIONS[case]
    with pytest.raises(ArtifactFormatError, match=message.replace("[", r"\[")):
        _write(tmp_path, body, [np.zeros(1000)], shape=(3, 6, 7))


@pytest.mark.parametrize("field,pair", [("kSize", (3, 5)), ("stride", (2, 1)),
                                        ("padding", (0, 1)), ("dilation", (1, 2))])
def test_asymmetric_conv_parameters_are_rejected(tmp_path: Path, field: str,
                                                 pair: tuple[int, int]) -> None:
    body = f"conv:\n  filters: 2\n  kSize: 3\n  {field}X: {pair[0]}\n  {field}Y: {pair[1]}\n"
    with pytest.raises(ArtifactFormatError, match=f"asymmetric {field}"):
        _write(tmp_path, body, [np.zeros(200)])


def test_config_must_come_first(tmp_path: Path) -> None:
    (tmp_path / "m.msnhnet").write_text("act:\n  activation: relu\n" + _config(1, 2, 2))
    (tmp_path / "m.msnhbin").write_bytes(np.zeros(1, "<f4").tobytes())
    with pytest.raises(ArtifactFormatError, match=r"first node must be \[config\]"):
        rt.load(tmp_path / "m.msnhnet", tmp_path / "m.msnhbin")


def test_unknown_config_key(tmp_path: Path) -> None:
    (tmp_path / "m.msnhnet").write_text(_config(1, 2, 2) + "  depth: 3\nact:\n  activation: "
                                        "relu\n")
    (tmp_path / "m.msnhbin").write_bytes(np.zeros(1, "<f4").tobytes())
    with pytest.raises(ArtifactFormatError, match="'depth' is not supported in \\[config\\]"):
        rt.load(tmp_path / "m.msnhnet", tmp_path / "m.msnhbin")


CONV = "conv:\n  filters: 2\n  kSize: 3\n  padding: 1\n"  # needs 2*3*9 + 2 = 56 floats


@pytest.mark.parametrize("count,message", [(55, r"need > given"), (57, r"need != given")])
def test_weight_count_must_match_exactly(tmp_path: Path, count: int, message: str) -> None:
    with pytest.raises(ArtifactFormatError, match=message):
        _write(tmp_path, CONV, [np.zeros(count)])
    assert _write(tmp_path, CONV, [np.zeros(56)]).layers[0].num_weights == 56


def test_weight_file_size_must_be_a_multiple_of_4(tmp_path: Path) -> None:
    with pytest.raises(ArtifactFormatError, match="not a multiple of 4"):
        _write(tmp_path, CONV, raw=np.zeros(56, "<f4").tobytes() + b"\x00\x00")


def test_empty_weight_file_is_rejected_even_without_weights(tmp_path: Path) -> None:
    with pytest.raises(ArtifactFormatError, match="empty"):
        _write(tmp_path, "act:\n  activation: relu\n", raw=b"")
    with pytest.raises(ArtifactFormatError, match="need != given"):
        _write(tmp_path, "act:\n  activation: relu\n", [np.zeros(1)])


def test_wrong_batch_is_rejected(tmp_path: Path) -> None:
    model = _write(tmp_path, "act:\n  activation: relu\nbatchnorm:\n  eps: 0.0\n",
                   [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)])
    with pytest.raises(ArtifactFormatError, match="does not match"):
        model.run(_x((2, 3, 6, 7)))


# --------------------------------------------------------------------------- semantics
def test_parser_accepts_comments_blank_lines_and_duplicate_keys(tmp_path: Path) -> None:
    body = """
    # a comment line
    #0
    act:
      activation: relu   # trailing comment

      activation: tanh
    """
    body = BN0 + textwrap.dedent(body)
    model = _write(tmp_path, body, IDENT3)
    x = _x((1, 3, 6, 7))
    np.testing.assert_allclose(model.run(x), np.tanh(x), atol=1e-6)


def test_conv_square_groups_dilation_stride_bias_and_fused_leaky(tmp_path: Path) -> None:
    w, b = _x((6, 1, 3, 3)), _x((6,))
    body = ("conv:\n  filters: 6\n  kSize: 3\n  stride: 2\n  padding: 2\n  dilation: 2\n"
            "  groups: 3\n  activation: leaky,0.2\n")
    model = _write(tmp_path, body, [w, b], shape=(3, 9, 12))
    x = _x((1, 3, 9, 12))
    ref = F.leaky_relu(F.conv2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                                2, 2, 2, 3), 0.2)
    assert normalized_error(model.run(x), ref) < 1e-6


def test_conv_fused_batchnorm_block_order(tmp_path: Path) -> None:
    w = _x((4, 3, 1, 1))
    scale, bias, mean = _x((4,)), _x((4,)), _x((4,))
    var = RNG.random(4).astype(np.float32) + 0.5
    model = _write(tmp_path, "conv:\n  filters: 4\n  batchNorm: 1\n  eps: 0.001\n",
                   [w, scale, bias, mean, var], shape=(3, 5, 4))
    x = _x((1, 3, 5, 4))
    conv = F.conv2d(torch.from_numpy(x), torch.from_numpy(w))
    ref = F.batch_norm(conv, torch.from_numpy(mean), torch.from_numpy(var),
                       torch.from_numpy(scale), torch.from_numpy(bias), eps=1e-3)
    assert normalized_error(model.run(x), ref) < 1e-6


def test_connect_flattens_chw_and_batchnorm_order(tmp_path: Path) -> None:
    w = _x((5, 3 * 4 * 2))
    scale, mean, bias = _x((5,)), _x((5,)), _x((5,))
    var = RNG.random(5).astype(np.float32) + 0.5
    model = _write(tmp_path, "connect:\n  output: 5\n  batchNorm: 1\n",
                   [w, scale, mean, var, bias], shape=(3, 4, 2))
    x = _x((1, 3, 4, 2))
    lin = torch.from_numpy(x).flatten(1) @ torch.from_numpy(w).T
    ref = F.batch_norm(lin, torch.from_numpy(mean), torch.from_numpy(var),
                       torch.from_numpy(scale), torch.from_numpy(bias), eps=1e-5)
    assert model.out_shape == (5, 1, 1)
    assert normalized_error(model.run(x).reshape(1, 5), ref) < 1e-6


def test_batchnorm_with_prelu_slopes_last(tmp_path: Path) -> None:
    scale, bias, mean, slopes = _x((3,)), _x((3,)), _x((3,)), _x((3,))
    var = RNG.random(3).astype(np.float32) + 0.5
    model = _write(tmp_path, "batchnorm:\n  activation: prelu\n",
                   [scale, bias, mean, var, slopes])
    x = _x((1, 3, 6, 7))
    bn = F.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
                      torch.from_numpy(scale), torch.from_numpy(bias), eps=1e-5)
    assert normalized_error(model.run(x), F.prelu(bn, torch.from_numpy(slopes))) < 1e-6


def test_deconv_groups1_non_square_x_is_width(tmp_path: Path) -> None:
    w, b = _x((3, 2, 2, 3)), _x((2,))
    body = ("act:\n  activation: none\ndeconv:\n  filters: 2\n  kSizeX: 3\n  kSizeY: 2\n"
            "  strideX: 2\n  strideY: 1\n  paddingX: 1\n  paddingY: 0\n")
    model = _write(tmp_path, body, [w, b], shape=(3, 5, 6))
    x = _x((1, 3, 5, 6))
    ref = F.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                             stride=(1, 2), padding=(0, 1))
    assert normalized_error(model.run(x), ref) < 1e-6


@pytest.mark.parametrize("size,k,s,p,mode,expected", [
    (8, 3, 2, 1, 1, 4),   # PyTorch ceil_mode gives 5
    (8, 5, 3, 2, 1, 3),   # PyTorch ceil_mode gives 4
    (9, 3, 2, 1, 2, 4),
    (12, 3, 2, 1, 2, 6),
    (8, 3, 2, 0, 1, 4),   # without padding it is PyTorch's ceil
    (9, 2, 2, 0, 0, 4),
])
def test_pool_size_formula(size: int, k: int, s: int, p: int, mode: int, expected: int) -> None:
    assert pool_out(size, k, s, p, mode) == expected


def test_maxpool_ceil_without_padding_matches_pytorch(tmp_path: Path) -> None:
    body = "batchnorm:\n  eps: 0.0\nmaxpool:\n  kSize: 3\n  stride: 2\n  ceilMode: 1\n"
    ident = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    model = _write(tmp_path, body, ident, shape=(3, 8, 11))
    x = _x((1, 3, 8, 11))
    ref = F.max_pool2d(torch.from_numpy(x), 3, 2, ceil_mode=True)
    assert model.run(x).shape == ref.shape
    assert normalized_error(model.run(x), ref) == 0.0


def test_localavgpool_excludes_padding_and_the_lt1_fallback(tmp_path: Path) -> None:
    body = "localavgpool:\n  kSize: 3\n  stride: 2\n  padding: 1\n  paddingX: 0\n"
    body = "batchnorm:\n  eps: 0.0\n" + body
    ident = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
    model = _write(tmp_path, body, ident, shape=(3, 9, 12))
    x = _x((1, 3, 9, 12))
    ref = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1, count_include_pad=False)
    assert normalized_error(model.run(x), ref) < 1e-6  # paddingX: 0 became padding 1
    ref_include = F.avg_pool2d(torch.from_numpy(x), 3, 2, 1, count_include_pad=True)
    assert normalized_error(model.run(x), ref_include) > 1e-2


def test_localavgpool_ceil_mode_uses_msnhnet_formula(tmp_path: Path) -> None:
    body = ("batchnorm:\n  eps: 0.0\nlocalavgpool:\n  kSizeX: 3\n  kSizeY: 3\n  strideX: 2\n"
            "  strideY: 2\n  paddingX: 1\n  paddingY: 1\n  ceilMode: 1\n")
    ident = [np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)]
    model = _write(tmp_path, body, ident, shape=(2, 8, 8))
    assert model.out_shape == (2, 4, 4)  # PyTorch ceil_mode would give 5x5


IDENT3 = [np.ones(3), np.zeros(3), np.zeros(3), np.ones(3)]
BN0 = "batchnorm:\n  eps: 0.0\n"


@pytest.mark.parametrize("keys,expected_hw", [
    ("  type: nearest\n  strideX: 3\n  strideY: 2\n", (8, 15)),
    ("  strideX: 3\n  strideY: 2\n  type: nearest\n", (8, 5)),
    ("  type: nearest\n  stride: 2\n", (4, 5)),
    ("  stride: 2\n  type: nearest\n", (8, 10)),
    ("  stride: 2\n", (8, 10)),
    ("  type: nearest\n  strideX: 2\n", (4, 10)),
    ("  type: bilinear\n  scale: 2.0\n", (4, 5)),
    ("  scale: 2.0\n  type: bilinear\n", (8, 10)),
])
def test_upsample_key_order(tmp_path: Path, keys: str, expected_hw: tuple[int, int]) -> None:
    model = _write(tmp_path, BN0 + "upsample:\n" + keys, IDENT3, shape=(3, 4, 5))
    assert model.out_shape[1:] == expected_hw


def test_upsample_nearest_values_x_is_width(tmp_path: Path) -> None:
    body = BN0 + "upsample:\n  type: nearest\n  strideX: 3\n  strideY: 2\n"
    model = _write(tmp_path, body, IDENT3, shape=(3, 4, 5))
    x = _x((1, 3, 4, 5))
    ref = F.interpolate(torch.from_numpy(x), scale_factor=(2, 3), mode="nearest")
    assert normalized_error(model.run(x), ref) == 0.0


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("sx,sy", [(2.0, 2.0), (3.0, 2.0), (0.5, 0.6), (1.5, 1.5)])
def test_upsample_bilinear_is_size_based(tmp_path: Path, align: int, sx: float,
                                         sy: float) -> None:
    body = BN0 + (f"upsample:\n  type: bilinear\n  strideX: 1\n  strideY: 1\n  scaleX: {sx}\n"
                  f"  scaleY: {sy}\n  alignCorners: {align}\n")
    model = _write(tmp_path, body, IDENT3, shape=(3, 7, 9))
    x = _x((1, 3, 7, 9))
    size = (int(7 * sy), int(9 * sx))
    ref = F.interpolate(torch.from_numpy(x), size=size, mode="bilinear",
                        align_corners=bool(align))
    assert normalized_error(model.run(x), ref) < 1e-6


def test_view_slots_are_w_h_c_and_data_never_moves(tmp_path: Path) -> None:
    model = _write(tmp_path, BN0 + "view:\n  dim0: 10\n  dim1: 2\n  dim2: 3\n", IDENT3,
                   shape=(3, 4, 5))
    x = _x((1, 3, 4, 5))
    assert model.out_shape == (3, 2, 10)
    np.testing.assert_array_equal(model.run(x).reshape(-1), x.reshape(-1))


@pytest.mark.parametrize("dims", [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1),
                                  (2, 1, 0)])
def test_permute_is_zero_based_chw(tmp_path: Path, dims: tuple[int, int, int]) -> None:
    body = BN0 + f"permute:\n  dim0: {dims[0]}\n  dim1: {dims[1]}\n  dim2: {dims[2]}\n"
    model = _write(tmp_path, body, IDENT3, shape=(3, 4, 5))
    x = _x((1, 3, 4, 5))
    np.testing.assert_array_equal(model.run(x), x.transpose(0, *(d + 1 for d in dims)))


@pytest.mark.parametrize("groups,temp", [(1, 1.0), (3, 1.0), (4, 2.5)])
def test_softmax_over_flattened_chw(tmp_path: Path, groups: int, temp: float) -> None:
    body = BN0 + f"softmax:\n  groups: {groups}\n  temperature: {temp}\n"
    model = _write(tmp_path, body, IDENT3, shape=(3, 4, 2))
    x = _x((1, 3, 4, 2))
    ref = F.softmax(torch.from_numpy(x).reshape(1, groups, -1) / temp, dim=-1).reshape(x.shape)
    assert normalized_error(model.run(x), ref) < 1e-6
    assert model.layers[-1].opaque


def test_route_concat_add_and_varop_operand_order(tmp_path: Path) -> None:
    body = BN0 + textwrap.dedent("""
    act:
      activation: tanh
    route:
      layers: 1, 0
    route:
      layers: 0,-3
      addModel: 1
    varop:
      layers: 1
      type: subInv
    varop:
      layers: 1
      type: div
    act:
      activation: none
    varop:
      layers: 1,5
      type: sub
    """)
    model = _write(tmp_path, body, IDENT3, shape=(3, 4, 5))
    x = _x((1, 3, 4, 5))
    outs = model.run(x, keep_all=True)
    t = np.tanh(x)
    np.testing.assert_allclose(outs[2], np.concatenate([t, x], 1), atol=1e-6)
    np.testing.assert_allclose(outs[3], 2 * x, atol=1e-6)
    np.testing.assert_allclose(outs[4], t - 2 * x, atol=1e-6)       # subInv = K - prev
    np.testing.assert_allclose(outs[5], (t - 2 * x) / t, rtol=1e-5)  # div = prev / K
    np.testing.assert_allclose(outs[7], t - outs[5], rtol=1e-5, atol=1e-6)  # out[J] - out[K]


@pytest.mark.parametrize("kind,const,fn", [
    ("addConst", 1.5, lambda x: x + 1.5), ("subConst", 1.5, lambda x: x - 1.5),
    ("subConstInv", 1.5, lambda x: 1.5 - x), ("mulConst", -2.0, lambda x: -2 * x),
    ("divConst", 4.0, lambda x: x / 4), ("divConstInv", 2.0, lambda x: 2 / x),
    ("abs", 0.0, np.abs), ("exp", 0.0, np.exp), ("sin", 0.0, np.sin), ("atan", 0.0, np.arctan),
    ("cosh", 0.0, np.cosh), ("tan", 0.0, np.tan),
])
def test_varop_const_and_unary(tmp_path: Path, kind: str, const: float, fn) -> None:
    model = _write(tmp_path, BN0 + f"varop:\n  type: {kind}\n  constVal: {const}\n", IDENT3)
    x = _x((1, 3, 6, 7))
    np.testing.assert_allclose(model.run(x), fn(x), rtol=1e-5, atol=1e-6)


def test_varop_pow_is_exact_for_positive_and_garbage_for_negative(tmp_path: Path) -> None:
    model = _write(tmp_path, BN0 + "varop:\n  type: pow\n  constVal: 2.0\n", IDENT3)
    x = _x((1, 3, 6, 7))
    y = model.run(x)
    pos = x > 0
    np.testing.assert_allclose(y[pos], x[pos] ** 2, rtol=1e-5)
    assert not np.isfinite(y[x < 0]).any()


@pytest.mark.parametrize("name,ref", [
    ("logistic", torch.sigmoid), ("swish", F.silu), ("hardswish", F.hardswish),
    ("mish", F.mish), ("relu", F.relu), ("relu6", F.relu6), ("relu6,3", F.relu6),
    ("tanh", torch.tanh), ("hardtan", F.hardtanh), ("leaky", lambda t: F.leaky_relu(t, 0.1)),
    ("leaky,0.01", lambda t: F.leaky_relu(t, 0.01)), ("elu", F.elu), ("elu,1", F.elu),
    ("softplus,20", F.softplus), ("none", lambda t: t),
    ("sigmoid", F.relu), ("Relu", F.relu), ("identity", F.relu),  # unknown -> relu
])
def test_activations(tmp_path: Path, name: str, ref) -> None:
    model = _write(tmp_path, BN0 + f"act:\n  activation: {name}\n", IDENT3)
    x = _x((1, 3, 6, 7)) * 4
    assert normalized_error(model.run(x), ref(torch.from_numpy(x))) < 2e-6


def test_selu_uses_the_runtime_rounded_constants(tmp_path: Path) -> None:
    model = _write(tmp_path, BN0 + "act:\n  activation: selu\n", IDENT3)
    x = _x((1, 3, 6, 7)) * 4
    expected = 1.0507 * np.where(x >= 0, x, 1.6732 * np.expm1(x))
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-6, atol=1e-6)
    assert np.abs(model.run(x) - _ref(F.selu(torch.from_numpy(x)))).max() > 3e-5


def test_bare_softplus_uses_threshold_0_1(tmp_path: Path) -> None:
    model = _write(tmp_path, BN0 + "act:\n  activation: softplus\n", IDENT3)
    x = _x((1, 3, 6, 7)) * 3
    assert np.abs(model.run(x) - _ref(F.softplus(torch.from_numpy(x)))).max() > 0.5


def test_padding_slice_reduction_clip_globalavgpool(tmp_path: Path) -> None:
    body = BN0 + textwrap.dedent("""
    padding:
      top: 1
      down: 2
      left: 0
      right: 3
      paddingVal: 0.5
    slice:
      start1: 1
      step1: 2
      start2: 1
      step2: 3
    reduction:
      type: mean
      axis: 2
    clip:
      min: -0.3
      max: 0.4
    globalavgpool:
      ignored: 1
    """)
    model = _write(tmp_path, body, IDENT3, shape=(3, 5, 6))
    x = _x((1, 3, 5, 6))
    outs = model.run(x, keep_all=True)
    p = F.pad(torch.from_numpy(x), (0, 3, 1, 2), value=0.5)
    s = p[:, :, 1::2, 1::3]
    r = s.mean(3, keepdim=True)
    c = r.clamp(-0.3, 0.4)
    for got, ref in zip(outs[1:], (p, s, r, c, c.mean((2, 3), keepdim=True))):
        assert normalized_error(got, ref) < 1e-6


def test_null_globalavgpool_is_accepted(tmp_path: Path) -> None:
    model = _write(tmp_path, BN0 + "globalavgpool:\n", IDENT3)
    x = _x((1, 3, 6, 7))
    np.testing.assert_allclose(model.run(x), x.mean((2, 3), keepdims=True), rtol=1e-5)


def test_batch_runs_every_sample(tmp_path: Path) -> None:
    net, binf = tmp_path / "m.msnhnet", tmp_path / "m.msnhbin"
    net.write_text(_config(3, 2, 2, batch=2) + BN0 + "softmax:\n  groups: 1\n")
    binf.write_bytes(np.concatenate(IDENT3).astype("<f4").tobytes())
    model = rt.load(net, binf)
    x = _x((2, 3, 2, 2))
    ref = F.softmax(torch.from_numpy(x).flatten(1), 1).reshape(x.shape)
    assert normalized_error(model.run(x), ref) < 1e-6
