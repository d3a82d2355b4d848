"""deployplug: train multi-branch CNNs under Lightning, come out with verified deployable files.

Public API (stable names)::

    import deployplug as dp
    dp.RepVGGBlock(...)                       # training-time multi-branch block
    dp.models.build("repvgg_a0", num_classes=10)
    dp.reparameterize(model)                  # fused deploy copy
    dp.targets()                              # onnx, caffe, om, msnhnet profiles
    dp.decompose(model, x, "caffe")           # target-legal copy
    dp.check(model, x, "om")                  # pre-flight report, no files
    dp.export(model, x, "out/", formats=("onnx", "caffe"))
    dp.verify("out/")
    dp.DeployCallback(...)                    # Lightning callback
    dp.int8_report(model, calibration)        # which fused layers int8 hurts, and why

Attributes are imported on first use so that ``import deployplug`` stays cheap for the
command line and does not pull in Lightning for users of the plain API.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "RepVGGBlock": ("deployplug.blocks", "RepVGGBlock"),
    "models": ("deployplug.models", None),
    "reparameterize": ("deployplug.reparam", "reparameterize"),
    "ReparamReport": ("deployplug.reparam", "ReparamReport"),
    "LinearRegionWarning": ("deployplug.reparam", "LinearRegionWarning"),
    "targets": ("deployplug.profiles", "targets"),
    "TargetProfile": ("deployplug.profiles", "TargetProfile"),
    "decompose": ("deployplug.decompositions", "decompose"),
    "check": ("deployplug.preflight", "check"),
    "CompatReport": ("deployplug.preflight", "CompatReport"),
    "export": ("deployplug.pipeline", "export"),
    "verify": ("deployplug.verification", "verify"),
    "VerifyReport": ("deployplug.verification", "VerifyReport"),
    "Manifest": ("deployplug.manifest", "Manifest"),
    "DeployCallback": ("deployplug.callback", "DeployCallback"),
    "int8_report": ("deployplug.int8", "int8_report"),
    "Int8Options": ("deployplug.quant.options", "Int8Options"),
    "DeployError": ("deployplug.errors", "DeployError"),
    "UnsupportedOpError": ("deployplug.errors", "UnsupportedOpError"),
    "VerificationError": ("deployplug.errors", "VerificationError"),
    "IntegrityError": ("deployplug.errors", "IntegrityError"),
    "ArtifactFormatError": ("deployplug.errors", "ArtifactFormatError"),
    "OutputDirectoryError": ("deployplug.errors", "OutputDirectoryError"),
    "ReparameterizationError": ("deployplug.errors", "ReparameterizationError"),
    "CheckpointLoadError": ("deployplug.errors", "CheckpointLoadError"),
    "ModuleMismatchError": ("deployplug.errors", "ModuleMismatchError"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'deployplug' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
