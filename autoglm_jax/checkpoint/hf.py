"""Hugging Face checkpoint directories: ``config.json`` + single or sharded ``*.safetensors``.

Owns: finding the shard files (via ``model.safetensors.index.json`` when present), checking that
the index and the files agree, and streaming every tensor into ``checkpoint.params``.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.checkpoint.safetensors_file import iter_tensors

INDEX_FILE = "model.safetensors.index.json"


def is_hf_directory(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def safetensors_files(directory: str) -> list[str]:
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(directory, name)):
                raise CheckpointError(f"{index_path} names shard {name!r}, which is missing from {directory}")
        return [os.path.join(directory, name) for name in files]
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {directory}")
    return [os.path.join(directory, name) for name in files]


def iter_hf_tensors(directory: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """(name, tensor, file) for every tensor of every shard, one at a time."""
    for path in safetensors_files(directory):
        for name, tensor in iter_tensors(path):
            yield name, tensor, os.path.basename(path)
