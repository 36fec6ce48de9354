"""Flower records <-> plain numpy dicts: the one place arrays are packed for a message and
unpacked from one (float32 on the wire; the receiving side validates shapes and values)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """``{name: array}`` as an ArrayRecord of contiguous float32 arrays."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value, np.float32))
                        for key, value in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord's arrays as ``{name: numpy array}``."""
    return {key: array.numpy() for key, array in record.items()}
