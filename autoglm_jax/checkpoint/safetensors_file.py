"""Reading safetensors files tensor by tensor through a memory map.

Owns: parsing the safetensors header ourselves so that bfloat16/float8 tensors arrive as numpy arrays
(via ml_dtypes) without torch, and so that a truncated file is reported with the tensor it cuts.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

from autoglm_jax.checkpoint.gguf_file import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def read_header(path: str) -> tuple[dict, int]:
    """(tensor entries by name, byte offset where the data starts)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header of {header_len} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as e:
            raise CheckpointError(f"{path}: corrupt safetensors header: {e}") from e
    header.pop("__metadata__", None)
    return header, 8 + header_len


def iter_tensors(path: str) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array view into a memory map) in file order; validates every tensor's extent."""
    header, data_start = read_header(path)
    size = os.path.getsize(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if end - begin != expected:
            raise CheckpointError(f"{path}: tensor {name!r} of shape {shape} has {end - begin} bytes, expected {expected}")
        if data_start + end > size:
            raise CheckpointError(f"{path}: truncated file: tensor {name!r} ends at byte {data_start + end}, file has {size}")
        yield name, mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
