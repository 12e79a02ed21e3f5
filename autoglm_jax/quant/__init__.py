"""Weight quantization as a transform over loaded weights (issue 7).

Owns: the schemes (int8 / fp8 weight-only, W8A8 int8 / fp8, int4 group-wise, GGUF Q8_0 / Q4_0 / Q4_1
blocks), their weight pytrees with their ``linear`` rules, the path -> scheme rules that apply them to a
model, their storable (Orbax) form, and calibration on the model's own activations (optax-learned and
searched clipping, GPTQ, refitted scales, AWQ input scales for int4). Layers never branch
on quantization: ``model.layers.linear`` dispatches on the weight's type, and importing this package
registers the quantized types' rules.
"""

from autoglm_jax.quant.channel import ChannelWeight, quantize_channel
from autoglm_jax.quant.gguf_blocks import GGUFBlockWeight, from_gguf_bytes, quantize_gguf, to_gguf_bytes
from autoglm_jax.quant.int4 import Int4Weight, quantize_int4
from autoglm_jax.quant.schemes import SCHEMES, QuantScheme, get_scheme
from autoglm_jax.quant.transform import (QuantRules, from_storable, is_quantized, model_manifest, quantize_model,
                                         quantize_params, scheme_name, to_storable)

__all__ = ["ChannelWeight", "GGUFBlockWeight", "Int4Weight", "QuantRules", "QuantScheme", "SCHEMES",
           "from_gguf_bytes", "from_storable", "get_scheme", "is_quantized", "model_manifest", "quantize_channel",
           "quantize_gguf", "quantize_int4", "quantize_model", "quantize_params", "scheme_name", "to_gguf_bytes",
           "to_storable"]
