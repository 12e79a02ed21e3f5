"""OpenAI-compatible HTTP server over ``AutoGLMEngine`` (FastAPI); ``autoglm serve`` runs it."""

from autoglm_jax.server.app import create_app
from autoglm_jax.server.config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
