"""Model zoo: registry behaviour, paper configurations, and the small reference nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from deployplug import models
from deployplug.blocks import RepVGGBlock
from deployplug.reparam import reparameterize

PAPER_PARAMS_M = {  # fused parameter counts with 1000 classes, from the RepVGG paper
    "repvgg_a0": 8.30, "repvgg_a1": 12.78, "repvgg_b0": 14.33, "repvgg_b1": 51.82,
    "repvgg_b1g4": 36.12, "repvgg_b1g2": 41.36, "repvgg_b3": 110.96,
}
REFERENCE = ["resnet18_like", "mobilenetv2_like", "unet_like", "deeplabv3_like"]
REQUIRED = set(PAPER_PARAMS_M) | {"repvgg_a2", "repvgg_b2", "repvgg_tiny"} | set(REFERENCE)


def blocks(model: nn.Module) -> list[RepVGGBlock]:
    return [m for m in model.modules() if isinstance(m, RepVGGBlock)]


def fused_param_count(model: nn.Module) -> int:
    """Parameters of the deploy form, computed from the training form without fusing."""
    total = sum(b.conv_kxk.conv.weight.numel() + b.out_channels for b in blocks(model))
    return total + sum(p.numel() for p in model.linear.parameters())


def test_registry():
    assert set(models.names()) >= REQUIRED
    assert models.names() == sorted(models.names())
    with pytest.raises(KeyError, match="repvgg_a0"):
        models.build("no_such_model")

    @models.register("test_only_identity_net")
    def builder(num_classes=1000, in_channels=3):
        model = nn.Conv2d(in_channels, num_classes, 1)
        model.default_input_shape = (1, in_channels, 4, 4)
        return model

    assert models.build("test_only_identity_net", num_classes=2).out_channels == 2
    with pytest.raises(ValueError, match="already registered"):
        models.register("test_only_identity_net")(lambda **kw: None)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_paper_parameter_counts(name):
    with torch.device("meta"):
        model = models.build(name)
    assert round(fused_param_count(model) / 1e6, 2) == pytest.approx(PAPER_PARAMS_M[name],
                                                                     abs=0.011)
    assert model.default_input_shape == (1, 3, 224, 224)


def test_fused_a0_has_the_counted_parameters():
    model = models.build("repvgg_a0")
    expected = fused_param_count(model)
    fused = reparameterize(model, inplace=True)
    assert sum(p.numel() for p in fused.parameters()) == expected


@pytest.mark.parametrize("name,groups", [("repvgg_b1g2", 2), ("repvgg_b1g4", 4)])
def test_grouped_layers_are_the_even_ones(name, groups):
    with torch.device("meta"):
        model = models.build(name)
    seen = [b.groups for b in blocks(model)]
    assert len(seen) == 28
    assert seen == [groups if i in range(2, 27, 2) else 1 for i in range(28)]


def test_paper_topology():
    with torch.device("meta"):
        a0 = models.build("repvgg_a0")
        b0 = models.build("repvgg_b0")
    assert [len(getattr(a0, f"stage{i}")) for i in range(1, 5)] == [2, 4, 14, 1]
    assert [len(getattr(b0, f"stage{i}")) for i in range(1, 5)] == [4, 6, 16, 1]
    assert [b.out_channels for b in blocks(a0)][:4] == [48, 48, 48, 96]
    assert blocks(a0)[-1].out_channels == 1280
    strides = [b.stride[0] for b in blocks(a0)]
    assert strides.count(2) == 5 and strides[0] == 2


@pytest.mark.parametrize("name", REFERENCE + ["repvgg_tiny", "repvgg_a0"])
@pytest.mark.parametrize("in_channels,num_classes", [(3, 10), (1, 4)])
def test_builds_and_runs(name, in_channels, num_classes):
    model = models.build(name, num_classes=num_classes, in_channels=in_channels).eval()
    shape = model.default_input_shape
    assert shape[:2] == (1, in_channels)
    if name == "repvgg_a0":
        shape = (1, in_channels, 64, 64)
    with torch.no_grad():
        y = model(torch.randn(shape))
    if name in ("unet_like", "deeplabv3_like"):
        assert y.shape == (1, num_classes, *shape[2:])
    else:
        assert y.shape == (1, num_classes)


@pytest.mark.parametrize("name", REFERENCE + ["repvgg_tiny"])
def test_odd_rectangular_inputs_and_training_mode(name):
    model = models.build(name, num_classes=3)
    y = model(torch.randn(2, 3, 45, 37))
    y.sum().backward()
    if name in ("unet_like", "deeplabv3_like"):
        assert y.shape == (2, 3, 45, 37)


def test_reference_nets_exercise_their_ops():
    r18 = models.build("resnet18_like")
    assert r18.conv1.kernel_size == (7, 7) and r18.conv1.stride == (2, 2)
    assert (r18.maxpool.kernel_size, r18.maxpool.stride, r18.maxpool.padding) == (3, 2, 1)
    assert isinstance(r18.layer2[0].downsample[0], nn.Conv2d)

    mb = models.build("mobilenetv2_like")
    assert any(isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1 for m in mb.modules())
    assert any(isinstance(m, nn.ReLU6) for m in mb.modules())

    dl = models.build("deeplabv3_like")
    assert {m.dilation for m in dl.modules() if isinstance(m, nn.Conv2d)} >= {(2, 2), (3, 3)}

    unet = models.build("unet_like").eval()
    x = torch.randn(unet.default_input_shape)
    with torch.no_grad():
        s1 = unet.enc1(x)
        s2 = unet.enc2(unet.pool1(s1))
        up = unet.up2(unet.bottleneck(unet.pool2(s2)))
    # default input makes the decoder pad one side only
    assert s2.shape[-1] % 2 == 1 and s2.shape[-1] - up.shape[-1] == 1


@pytest.fixture
def one_thread():
    """Tiny batches gain nothing from intra-op threads, and lose a lot on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_repvgg_tiny_learns_digits(one_thread):
    """The tiny model reaches > 95 % test accuracy on 8x8 digits upsampled to 32x32."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x))
    train, test = perm[:1400], perm[1400:]
    model = models.build("repvgg_tiny", num_classes=10, in_channels=1)
    assert model.default_input_shape == (1, 1, 32, 32)
    epochs, batch = 4, 32
    opt = torch.optim.AdamW(model.parameters(), 3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 3e-3, total_steps=epochs * -(-len(train) // batch))
    for _ in range(epochs):
        model.train()
        order = train[torch.randperm(len(train))]
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    fused = reparameterize(model)
    with torch.no_grad():
        acc = (model(x[test]).argmax(1) == y[test]).float().mean().item()
        fused_acc = (fused(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc > 0.95
    assert fused_acc == acc
