"""Model zoo: RepVGG A0-B3 and a tiny RepVGG, plus plain reference nets for the exporters.

``build(name, num_classes, in_channels, **kwargs)`` returns a freshly initialised model with a
``default_input_shape`` attribute, so callers can make an example input without knowing the
architecture.
"""

from deployplug.models import reference, repvgg  # noqa: F401  (registers the builders)
from deployplug.models.registry import build, names, register

__all__ = ["build", "names", "register"]
