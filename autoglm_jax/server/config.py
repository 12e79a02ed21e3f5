"""Settings of the HTTP layer: one frozen dataclass (the engine's own settings live in ``EngineConfig``).

Owns: the served model name, the API key, and the server-side request limits. It does not own host,
port or shutdown timing (``autoglm_jax.cli.serve`` passes those to uvicorn).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """served_model_name: the name clients must send as ``model`` (and ``GET /v1/models`` lists).
    api_key: when set, every ``/v1/*`` call needs ``Authorization: Bearer <api_key>`` (401 otherwise);
    ``/health`` and ``/metrics`` stay open, as in vLLM. max_n: most choices one request may ask for.
    """

    served_model_name: str
    api_key: str | None = None
    max_n: int = 16

    def __post_init__(self):
        if not isinstance(self.served_model_name, str) or not self.served_model_name:
            raise ValueError(f"served_model_name={self.served_model_name!r} must be a non-empty string")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key='' would accept no key; pass None to disable the check")
        if not isinstance(self.max_n, int) or self.max_n < 1:
            raise ValueError(f"max_n={self.max_n!r} must be an int >= 1")
