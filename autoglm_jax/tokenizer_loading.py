"""Choosing the tokenizer that goes with a model source (or the one the user named).

Owns: the rule "GGUF -> its embedded vocab; HF/Orbax dir -> its tokenizer.json; random preset -> none".
"""

from __future__ import annotations

import os

from autoglm_jax.checkpoint.loader import ModelSource
from autoglm_jax.tokenizer import Tokenizer


def load_tokenizer(tokenizer: str | None, source: ModelSource) -> Tokenizer | None:
    """The tokenizer at ``tokenizer`` (a .gguf file or a directory), else the model source's own."""
    if tokenizer is not None:
        if tokenizer.endswith(".gguf"):
            return Tokenizer.from_gguf(tokenizer)
        return Tokenizer.from_directory(tokenizer)
    if source.kind == "gguf":
        return Tokenizer.from_gguf(source.path)
    if source.kind in ("hf", "orbax") and os.path.isfile(os.path.join(source.path, "tokenizer.json")):
        return Tokenizer.from_directory(source.path)
    return None
