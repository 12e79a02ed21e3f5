"""The paged KV cache as an explicit pytree.

Owns: the device arrays that hold keys and values, and their layout. It does not own which pages
belong to which sequence (that is the host-side ``engine.page_allocator``) nor how attention reads
them (``model.attention`` and ``pallas_kernels``).

Layout (one array for all layers, so the decoder can ``lax.scan`` over layers and the kernels can
take the layer index as a scalar):

    k, v: [L, num_pages, page_size, Nkv, D]

A token at position ``p`` of a sequence lives at page ``page_table[seq, p // page_size]``, row
``p % page_size``. Page 0 is reserved as a scratch page: padding tokens write there and no sequence
ever owns it, so every kernel can write unconditionally.

Dtype: the engine arg ``kv_cache_dtype`` (``resolve_kv_cache_dtype``): "auto" = the model's dtype, "fp8"
(alias "fp8_e4m3") = float8 e4m3fn pages, as vLLM's ``--kv-cache-dtype``, with no scales (a per-tensor
scale of 1.0: values are saturated to +-448 when written, ``model.attention.to_cache_dtype``, and
converted to the query's dtype when read). Half a bf16 pool's bytes per page: twice the pages.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from autoglm_jax.config import ModelConfig

SCRATCH_PAGE = 0
# The engine arg kv_cache_dtype -> the pool's dtype (None = the model's own).
KV_CACHE_DTYPES = {"auto": None, "fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn}


def resolve_kv_cache_dtype(setting: str, model_dtype) -> jnp.dtype:
    """The KV pool's dtype for the engine arg ``kv_cache_dtype`` with a model of ``model_dtype``."""
    if not isinstance(setting, str) or setting not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype={setting!r}; choose one of {tuple(KV_CACHE_DTYPES)}")
    dtype = KV_CACHE_DTYPES[setting]
    return jnp.dtype(model_dtype if dtype is None else dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, num_pages, page_size, Nkv, D]
    v: jax.Array  # [L, num_pages, page_size, Nkv, D]

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self):
        return self.k.dtype

    @staticmethod
    def bytes_per_page(config: ModelConfig, page_size: int, dtype) -> int:
        """Bytes one page takes across all layers, K and V together."""
        itemsize = jnp.dtype(dtype).itemsize
        return 2 * config.num_hidden_layers * page_size * config.num_key_value_heads * config.head_dim * itemsize

    @classmethod
    def create(cls, config: ModelConfig, num_pages: int, page_size: int, dtype=jnp.bfloat16, sharding=None) -> "KVCache":
        """Zero-filled cache of ``num_pages`` pages (page 0 is the scratch page)."""
        if num_pages < 2:
            raise ValueError(f"num_pages={num_pages} must be >= 2 (page 0 is reserved as scratch)")
        shape = (config.num_hidden_layers, num_pages, page_size, config.num_key_value_heads, config.head_dim)
        make = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=make(), v=make())
