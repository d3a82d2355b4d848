"""Models whose outputs or wrapping are not the plain case still pre-flight and export in a fit.

Outputs that are dicts or nested tuples used to be refused at fit start with an input-shape
error while ``dp.check`` passed; a ``torch.compile``d model passed pre-flight and failed after
training. Pre-flight and export must agree, and both must work.
"""

from __future__ import annotations

import json
from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F
from callback_harness import CLASSES, SIZE, make_trainer, run_dir, tiny_data
from pytorch_lightning import LightningModule
from torch import nn

from deployplug.callback import DeployCallback
from deployplug.verification import verify


class DetectionLikeModule(LightningModule):
    """``forward`` returns ``{"logits": ..., "aux": (features, pooled)}``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Linear(6, CLASSES)
        self.example_input_array = torch.zeros(1, 1, SIZE, SIZE)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.body(x)
        pooled = feats.mean((2, 3))
        return {"logits": self.head(pooled), "aux": (feats, pooled)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0])["logits"], batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch[0])["logits"], batch[1]))

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05)


class CompiledNetModule(DetectionLikeModule):
    """The network attribute is a ``torch.compile`` wrapper, as users write for speed."""

    def __init__(self):
        super().__init__()
        self.body = torch.compile(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.body(x).mean((2, 3)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))


def _final(root) -> dict:
    return json.loads((run_dir(root) / "deploy" / "final" / "manifest.json").read_text())


def test_dict_outputs_pass_preflight_and_export_with_their_names(tmp_path):
    callback = DeployCallback(formats=("onnx", "caffe"), preflight="error", fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(DetectionLikeModule(), datamodule=tiny_data())
    manifest = _final(tmp_path)
    assert manifest["passed"] is True
    assert [o["name"] for o in manifest["outputs"]] == ["logits", "aux.0", "aux.1"]
    folder = run_dir(tmp_path) / "deploy" / "final"
    proto = onnx.load(str(folder / "model.onnx"))
    assert [o.name for o in proto.graph.output] == ["logits", "aux.0", "aux.1"]
    assert verify(folder).passed


@pytest.mark.parametrize("formats", [("onnx",), ("caffe",)])
def test_compiled_submodule_passes_preflight_and_exports(tmp_path, formats):
    callback = DeployCallback(formats=formats, preflight="error", fail_on_error=True)
    make_trainer(tmp_path, [callback]).fit(CompiledNetModule(), datamodule=tiny_data())
    manifest = _final(tmp_path)
    assert manifest["passed"] is True, manifest.get("failed_formats")


def test_compiled_lightning_module_exports_its_forward(tmp_path):
    callback = DeployCallback(formats=("onnx",), preflight="error", fail_on_error=True)
    module = CompiledNetModule()
    make_trainer(tmp_path, [callback]).fit(torch.compile(module), datamodule=tiny_data())
    manifest = _final(tmp_path)
    assert manifest["passed"] is True
    assert manifest["outputs"][0]["shape"] == [1, CLASSES]
