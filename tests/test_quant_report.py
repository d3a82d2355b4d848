"""The INT8 readiness report: int8 arithmetic, branch attribution, ranking by measured effect."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from quant_harness import (
    calibration_batches,
    one_thread,
    plant_identity_outlier,
    tiny_repvgg,
    trained_tiny,
)

import deployplug as dp
from deployplug.errors import ConfigError, InputShapeError
from deployplug.int8 import int8_report
from deployplug.quant.branches import attribute_largest, block_branches, collect_branches
from deployplug.quant.qmath import (
    activation_qparams,
    fake_quant_activation,
    fake_quant_weight,
    sqnr_db,
)
from deployplug.testing import randomize_batchnorm


@pytest.fixture(autouse=True)
def _one_thread():
    with one_thread():
        yield


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 20), st.floats(1e-3, 1e3), st.booleans(),
       st.integers(0, 2**16))
def test_weight_round_trip_error_is_at_most_half_a_step(out_ch, size, magnitude, per_channel,
                                                        seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_ch, size, generator=gen, dtype=torch.float64) * magnitude
    q = fake_quant_weight(w, per_channel)
    absmax = w.abs().amax(1, keepdim=True) if per_channel else w.abs().max()
    step = absmax / 127
    assert bool(((q - w).abs() <= step / 2 + 1e-12 * magnitude).all())
    assert torch.allclose(q.abs().amax(1) if per_channel else q.abs().max(),
                          w.abs().amax(1) if per_channel else w.abs().max(),
                          rtol=1e-12, atol=0)  # the range is kept
    # one outlier channel costs per-tensor SQNR and not per-channel SQNR
    w[0] *= 50
    assert sqnr_db(w, fake_quant_weight(w, True)) >= sqnr_db(w, fake_quant_weight(w, False)) - 1e-9


@settings(max_examples=60, deadline=None)
@given(st.floats(-50, 0), st.floats(0, 50), st.integers(0, 2**16))
def test_activation_round_trip_keeps_zero_and_clips_to_the_range(low, high, seed):
    x = torch.randn(1000, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = x * max(high - low, 1e-3) + low
    scale, zero_point = activation_qparams(low, high)
    q = fake_quant_activation(x, low, high)
    assert float(fake_quant_activation(torch.zeros(1, dtype=torch.float64), low, high)) == 0.0
    assert -128 <= zero_point <= 127
    inside = (x >= low) & (x <= high)
    assert bool(((q - x).abs()[inside] <= scale / 2 + 1e-9).all())
    assert float(q.max()) <= max(high, 0) + scale and float(q.min()) >= min(low, 0) - scale


def test_branch_kernels_add_up_to_the_fused_kernel_for_both_block_forms():
    for quant_friendly in (False, True):
        model = randomize_batchnorm(tiny_repvgg(quant_friendly), 3).eval()
        fused = dp.reparameterize(model)
        found, skipped = collect_branches(model, fused)
        assert not skipped
        assert set(found) == {f"{p}.reparam" for p in
                              ("stage0", "stage1.0", "stage1.1", "stage2.0", "stage2.1")}
        assert {k.form for k in found.values()} == {
            "quant_friendly" if quant_friendly else "repvgg"}
        assert set(found["stage1.1.reparam"].parts) == {"kxk", "1x1", "identity"}
        assert set(found["stage1.0.reparam"].parts) == {"kxk", "1x1"}  # strided: no identity


def test_attribution_is_dropped_when_the_branches_do_not_explain_the_weights():
    model = randomize_batchnorm(tiny_repvgg(), 4).eval()
    fused = dp.reparameterize(model)
    with torch.no_grad():
        fused.stage1[1].reparam.weight[0, 0, 0, 0] += 1.0  # not what the branches sum to
    found, skipped = collect_branches(model, fused)
    assert "stage1.1.reparam" not in found and "stage1.1" in skipped
    assert "differ" in skipped["stage1.1"]


def test_planted_identity_outlier_is_named_by_layer_branch_and_channel():
    model = plant_identity_outlier(trained_tiny(), channel=5, factor=20.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = int8_report(model, calibration_batches(), weights="per_tensor")
    top = report.layers[0]
    assert top.path == "stage1.1.reparam" and top.rank == 1 and top.risky
    assert top.float_gain_db > 6 and top.float_gain_db > report.layers[1].float_gain_db + 3
    assert top.largest is not None
    assert (top.largest.branch, top.largest.module) == ("identity", "stage1.1.identity")
    assert (top.largest.out_channel, top.largest.in_channel) == (5, 5)
    assert top.largest.message.startswith("identity BN of 'stage1.1' scales channel 5 by")
    assert top.largest.scale == pytest.approx(top.largest.branch_value, rel=1e-6)
    assert top.outlier_ratio > 4 and top.sqnr_per_channel_db > top.sqnr_per_tensor_db + 6
    assert "weight outlier" in " ".join(top.reasons)
    assert "identity BN of 'stage1.1' scales channel 5" in str(report)
    assert report.headline().split("riskiest: ")[1].startswith(
        "stage1.1.reparam (identity BN of 'stage1.1' scales channel 5 by")
    # the caller's model is untouched: same tensors, still the training form
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.stage1[1].deployed


def test_ranking_is_by_measured_effect_and_the_json_round_trips(tmp_path):
    report = int8_report(trained_tiny(), calibration_batches(128), weights="per_tensor",
                         top_k=2, sensitivity_samples=64)
    layers = report.layers
    # two greedy picks, each improving on the all-int8 model and on the pick before it ...
    greedy = [layer.cumulative_kl for layer in layers[:2]]
    assert all(kl is not None for kl in greedy) and greedy[1] <= greedy[0]
    assert greedy[0] == layers[0].float_kl <= min(layer.float_kl for layer in layers)
    assert report.simulated["per_tensor"]["kl"] >= greedy[0]
    # ... then the others by what keeping each one alone in float buys
    rest = [layer.float_kl for layer in layers[2:]]
    assert all(layer.cumulative_kl is None for layer in layers[2:]) and rest == sorted(rest)
    assert [layer.rank for layer in layers] == list(range(1, len(layers) + 1))
    assert [layer.path for layer in report.risky()] == report.ranking()[:2]
    assert report.samples == 128 and len(layers) == 6
    assert set(report.simulated) == {"per_tensor", "per_channel"}
    data = json.loads(report.write(tmp_path / "r.json").read_text())
    assert data["layers"][0]["path"] == report.ranking()[0]
    assert all(isinstance(row["input_range"], list) for row in data["layers"])


def test_quant_friendly_report_explains_the_shared_scale():
    model = trained_tiny(quant_friendly=True)
    report = int8_report(model, calibration_batches(64), sensitivity_samples=32)
    notes = " ".join(report.notes)
    assert "quant-friendly" in notes and "one BN after the sum" in notes
    layer = report.layer("stage1.1.reparam")
    assert layer.form == "quant_friendly" and layer.largest is not None
    assert "post-sum BN scale" in layer.largest.message


def test_attribution_of_a_quant_friendly_identity_entry():
    block = randomize_batchnorm(dp.RepVGGBlock(4, 4, quant_friendly=True), 2).eval()
    with torch.no_grad():
        block.conv_kxk.conv.weight.mul_(1e-3)
        block.conv_1x1.conv.weight.mul_(1e-3)
    kernels = block_branches(block, "blk")
    top = attribute_largest(kernels)
    assert top.branch == "identity" and top.in_channel == top.out_channel
    bn = block.post_bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    assert top.scale == pytest.approx(float(scale[top.out_channel]), rel=1e-6)


def test_bad_calibration_is_refused_with_the_batch_named():
    model = tiny_repvgg().eval()
    with pytest.raises(InputShapeError, match="batch 1"):
        int8_report(model, [torch.randn(2, 1, 8, 8), torch.randn(2, 1, 9, 9)])
    with pytest.raises(InputShapeError, match="NaN"):
        int8_report(model, [torch.full((2, 1, 8, 8), math.nan)])
    with pytest.raises(InputShapeError, match="float inputs"):  # an (input, label) pair
        int8_report(model, [(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))])
    with pytest.raises(ConfigError, match="empty"):
        int8_report(model, [])
    with pytest.raises(ConfigError, match="per_channel"):
        int8_report(model, [torch.randn(2, 1, 8, 8)], weights="per_row")


def test_calibration_is_cut_to_the_requested_count():
    batches = [torch.randn(64, 1, 8, 8) for _ in range(10)]
    report = int8_report(tiny_repvgg().eval(), iter(batches), calibration_samples=100,
                         sensitivity_samples=16)
    assert report.samples == 100
    assert np.isfinite(report.layers[0].float_gain_db)
