"""The deploy copy lends the generic pass torch's own linear leaf modules instead of copying
them, and the result still never shares anything with the given model.

Lent: convs, BatchNorms, pads, pools, identities (and plain ``nn.Sequential`` of them) outside
any block with a fusion method, used once, without hooks. The pass only reads them; whatever
survives it (a conv->BN pair left to the fold, a region refused) is copied before anything may
write to it. With an example input the BatchNorms (and containers) the self-check hooks are
not lent, so no hook ever touches the given model.
"""

from __future__ import annotations

import copy

import paper_blocks as pb
import pytest
import torch
from torch import nn

from deployplug.reparam import passes, reparameterize
from deployplug.testing import normalized_error, randomize_batchnorm


@pytest.fixture(autouse=True)
def seeded():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def storages(model: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}


def assert_independent(fused: nn.Module, model: nn.Module) -> None:
    assert not ({id(m) for m in model.modules()} & {id(m) for m in fused.modules()})
    assert not (storages(model) & storages(fused))


class Mutating(nn.Module):
    """A block whose own fusion method writes to its children in place (it is allowed to:
    it was given a copy), then keeps them."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.pw = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.pw(x)

    def switch_to_deploy(self):
        with torch.no_grad():
            self.conv.weight.mul_(2)
            self.bn.running_mean.add_(1)


def mixed_net(mutating: bool = True) -> nn.Module:
    torch.manual_seed(1)
    net = nn.Sequential(
        pb.RepVGGPlain(3, 6),                                   # collapsed by the generic pass
        nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)),  # left to the fold
        nn.ReLU(),
        Mutating(6) if mutating else pb.RepVGGPlain(6, 6),      # fuses itself, in place
        nn.ReLU(),
        pb.DBB(6, 6, pad_with_bias=False),                      # refused: survives as it was
        nn.ReLU(),
        pb.ACB(6, 6))
    return pb.randomize_scales(randomize_batchnorm(net, seed=2), seed=3)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("training", [True, False])
def test_nothing_lent_survives_and_the_model_is_untouched(training):
    net = mixed_net().train(training)
    state = copy.deepcopy(net.state_dict())
    modes = [m.training for m in net.modules()]
    reference = copy.deepcopy(net).eval()
    fused = reparameterize(net)
    assert_independent(fused, net)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert [m.training for m in net.modules()] == modes
    assert not any(m.training for m in fused.modules())
    assert isinstance(fused[1][1], nn.Identity)  # the fold ran on a copy of the lent pair
    assert isinstance(net[1][1], nn.BatchNorm2d)
    x = torch.randn(2, 3, 8, 7)
    with torch.no_grad():
        mutated = copy.deepcopy(reference)
        mutated[3].switch_to_deploy()
        assert normalized_error(fused(x), mutated(x)) <= 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_with_an_example_input_no_hook_touches_the_model(monkeypatch):
    net = mixed_net(mutating=False).eval()
    originals = {id(m) for m in net.modules()}
    watched: list[nn.Module] = []
    real = passes.record

    def spy(model, inputs, watch):
        watched.extend(watch.values())
        return real(model, inputs, watch)

    monkeypatch.setattr(passes, "record", spy)
    fused = reparameterize(net, example_input=torch.randn(1, 3, 8, 8), tolerance=1e-4)
    assert watched and not any(id(m) in originals for m in watched)
    assert_independent(fused, net)


def test_shared_and_hooked_leaves_are_copied_not_lent():
    shared = nn.Conv2d(4, 4, 1)
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    calls = []
    hooked.register_forward_hook(lambda *args: calls.append(1))
    net = nn.Sequential(shared, nn.ReLU(), shared, nn.ReLU(), hooked, nn.ReLU()).eval()
    borrowed = passes._deploy_copy(net, lend_leaves=True)[1]
    assert id(shared) not in borrowed.modules and id(hooked) not in borrowed.modules
    fused = reparameterize(net)
    assert_independent(fused, net)
    assert len(hooked._forward_hooks) == 1 and calls == []


def test_trivial_modules_are_copied_exactly():
    act = nn.Hardtanh(-2.0, 3.0, inplace=True)
    pool = nn.AdaptiveAvgPool2d((2, 3))
    net = nn.Sequential(nn.Conv2d(3, 4, 1), act, pool, nn.Flatten(1))
    copied, _ = passes._deploy_copy(net)
    for a, b in zip(net, copied):
        assert a is not b and type(a) is type(b)
        assert {k: v for k, v in vars(a).items() if not k.startswith("_")} == {
            k: v for k, v in vars(b).items() if not k.startswith("_")}
        for name, value in vars(a).items():  # containers are new objects, not shared
            if isinstance(value, (dict, list, set)):
                assert vars(b)[name] is not value
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda *args: None)
    assert not passes._trivial(hooked) and passes._trivial(nn.ReLU())
