"""ClassifierModule: the zoo network under ``net``, its example input and its LR schedule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from deployplug.lit import ClassifierModule


def module(**kwargs) -> ClassifierModule:
    return ClassifierModule(model="repvgg_tiny", num_classes=7, in_channels=2, input_size=16,
                            model_kwargs={"width": 4}, **kwargs)


def test_network_and_example_input():
    m = module()
    assert m.example_input_array.shape == (1, 2, 16, 16)
    assert m(torch.randn(3, 2, 16, 16)).shape == (3, 7)
    assert all(k.startswith(("net.", "train_acc", "val_acc", "test_acc"))
               for k in m.state_dict())
    assert m.hparams.model == "repvgg_tiny"


def test_unknown_model_name_lists_the_zoo():
    with pytest.raises(KeyError, match="repvgg_tiny"):
        ClassifierModule(model="no_such_net")


def _schedule(m: ClassifierModule, steps: int, epochs: int):
    m._trainer = SimpleNamespace(estimated_stepping_batches=steps, max_epochs=epochs)
    config = m.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return opt, lrs


def test_cosine_schedule_with_warmup_decays_to_zero():
    opt, lrs = _schedule(module(lr=0.1, warmup_epochs=1.0), steps=20, epochs=4)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    warmup = lrs[:5]
    assert all(a < b for a, b in zip(warmup, warmup[1:]))  # linear ramp over one epoch
    assert lrs[5] == pytest.approx(0.1)  # peak right after warm-up
    decay = lrs[5:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert decay[-1] < 0.01 * 0.1 * 10  # close to zero at the end


def test_adamw_and_open_ended_training():
    m = module(optimizer="adamw", lr=1e-3, weight_decay=0.01)
    m._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"), max_epochs=-1)
    opt = m.configure_optimizers()
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.01
