"""Weights as the ordered list of arrays Flower's legacy (SecAgg+) workflow moves, and back."""

from __future__ import annotations

import numpy as np
import torch


def float_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """The floating-point entries (SecAgg+ quantises floats; integer counters stay as they are)."""
    return [k for k, v in state.items() if v.is_floating_point()]


def to_arrays(state: dict[str, torch.Tensor], keys: list[str]) -> list[np.ndarray]:
    return [state[k].detach().cpu().numpy() for k in keys]


def from_arrays(template: dict[str, torch.Tensor], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """`template` with its floating-point entries replaced, in order, by `arrays`."""
    keys = float_keys(template)
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} arrays, got {len(arrays)}")
    out = dict(template)
    for k, a in zip(keys, arrays):
        out[k] = torch.from_numpy(np.asarray(a, dtype=np.float32)).reshape(template[k].shape).to(template[k].dtype)
    return out
