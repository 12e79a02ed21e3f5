"""What every handler needs, kept on ``app.state.server``: the engine, the server settings, the metrics.

Owns: ``ServerState`` and the few engine facts handlers read (tokenizer, context length, vocabulary
size). It does not own the engine's lifecycle (``autoglm_jax.cli.serve`` starts and stops it).
"""

from __future__ import annotations

import dataclasses
import time

from autoglm_jax.engine.async_engine import AutoGLMEngine
from autoglm_jax.server.config import ServerConfig
from autoglm_jax.server.errors import APIError
from autoglm_jax.server.metrics import ServerMetrics


@dataclasses.dataclass(frozen=True)
class ServerState:
    engine: AutoGLMEngine
    config: ServerConfig
    metrics: ServerMetrics
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        """The engine's tokenizer; 400 for text input when the model was loaded without one."""
        if self.engine.tokenizer is None:
            raise APIError(400, "this model was loaded without a tokenizer; send token ids to /v1/completions")
        return self.engine.tokenizer

    @property
    def max_sequence_length(self) -> int:
        return self.engine.core.max_sequence_length

    @property
    def vocab_size(self) -> int:
        return self.engine.core.model_config.vocab_size

    def token_text(self, token_id: int) -> str:
        """Text of one token (special tokens spelled out), for logprobs."""
        tokenizer = self.engine.tokenizer
        return tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer is not None else str(token_id)
