"""The ONNX target: everything ``torch.onnx`` exports and onnxruntime runs needs no rewrite."""

from deployplug.profiles.base import TargetProfile

ONNX = TargetProfile(
    name="onnx",
    format="onnx",
    description="ONNX for onnxruntime; every op torch.onnx exports is accepted",
    accepts_everything=True,
)
