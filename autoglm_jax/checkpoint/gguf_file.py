"""Opening GGUF files and reading their metadata as plain Python values.

Owns: the one place that calls ``gguf.GGUFReader`` and turns a broken file into a clear error.
Weight conversion lives in ``checkpoint.gguf``; the tokenizer reads the metadata returned here.
"""

from __future__ import annotations

import functools
import os
from typing import Any


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, inconsistent or of an unknown kind."""


@functools.lru_cache(maxsize=4)
def open_gguf(path: str | os.PathLike):
    """Returns a memory-mapped ``gguf.GGUFReader``; raises CheckpointError on a broken file."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on bad files
        raise CheckpointError(f"cannot read GGUF file {path} (truncated or not GGUF?): {e}") from e


def gguf_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """All key/value fields of a GGUF file (``general.*``, ``llama.*``, ``tokenizer.*``...)."""
    reader = open_gguf(path)
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out
