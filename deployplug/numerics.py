"""How far an artifact's output is from PyTorch's, in one measure used everywhere.

Errors are *normalized* (max|a-b| / max|ref|) because absolute errors on randomly initialised
deep nets span orders of magnitude; one definition keeps verification, the layer-by-layer
localisation and the tests comparing the same number.
"""

from __future__ import annotations

import numpy as np
import torch


def normalized_error(actual: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor,
                     floor: float = 1e-12) -> float:
    """max|actual - reference| / max|reference|, with the denominator floored.

    The floor keeps the measure defined for all-zero references (a ReLU output can be).
    """
    a = np.asarray(actual.detach().cpu() if isinstance(actual, torch.Tensor) else actual,
                   dtype=np.float64)
    r = np.asarray(reference.detach().cpu() if isinstance(reference, torch.Tensor) else reference,
                   dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"shape mismatch: {a.shape} vs reference {r.shape}")
    if r.size == 0:
        return 0.0
    return float(np.max(np.abs(a - r)) / max(float(np.max(np.abs(r))), floor))
