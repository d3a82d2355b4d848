"""The ONNX target: everything ``torch.onnx`` exports and onnxruntime runs needs no rewrite."""

from deployplug.profiles import TargetProfile, register_target

ONNX = register_target(
    TargetProfile(
        name="onnx",
        format="onnx",
        description="ONNX for onnxruntime; every op torch.onnx exports is accepted",
        accepts_everything=True,
    )
)
