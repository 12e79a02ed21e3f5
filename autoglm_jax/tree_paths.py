"""Nested parameter dicts <-> flat {"layers/qkv": leaf} maps (checkpoint files and quantization rules).

Owns: the path convention ("/"-joined string keys). Leaves are anything that is not a dict (arrays,
quantized-weight pytrees).
"""

from __future__ import annotations

from typing import Any


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"layers": {"qkv": x}} -> {"layers/qkv": x}."""
    if not isinstance(tree, dict):
        raise TypeError(f"expected a nested dict, got {type(tree).__name__} at {prefix or 'the root'!r}")
    out = {}
    for key, value in tree.items():
        if not isinstance(key, str) or "/" in key:
            raise ValueError(f"tree key {key!r} under {prefix or 'the root'!r} must be a str without '/'")
        path = f"{prefix}{key}"
        out.update(flatten(value, path + "/") if isinstance(value, dict) else {path: value})
    return out


def unflatten(flat: dict[str, Any]) -> dict:
    """{"layers/qkv": x} -> {"layers": {"qkv": x}}."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
