"""Deterministic identifiers and random streams for the synthetic generator."""

from __future__ import annotations

import hashlib

import numpy as np

_NAMESPACE = "rfm-appliance-synthetic"


def _digest(*parts: object) -> bytes:
    text = "|".join([_NAMESPACE, *map(str, parts)])
    return hashlib.sha256(text.encode("utf-8")).digest()


def synthetic_uid(*parts: object) -> str:
    """A `2.25.<int>` UID derived from `parts` (same parts, same UID; 44 characters at most)."""
    return "2.25." + str(int.from_bytes(_digest(*parts)[:16], "big"))


def derived_seed(*parts: object) -> int:
    """A 63-bit integer seed derived from `parts`, for an independent random stream."""
    return int.from_bytes(_digest(*parts)[:8], "big") >> 1


def derived_rng(*parts: object) -> np.random.Generator:
    return np.random.default_rng(derived_seed(*parts))


def seed_of(rng_or_seed: int | np.random.Generator) -> int:
    """A plain integer seed from an int or (by drawing once) from a Generator."""
    if isinstance(rng_or_seed, np.random.Generator):
        return int(rng_or_seed.integers(0, 2**63 - 1))
    return int(rng_or_seed)
