"""GGUF loading: tiny transformers models written the way llama.cpp's convert_hf_to_gguf.py writes
them (names, Llama Q/K permutation, GLM fused tensors, F32/F16/BF16/Q8_0/Q4_1), then read back;
and the real SmolLM2 GGUF against transformers' own GGUF loader."""

import os
import struct

import gguf
import numpy as np
import pytest
import torch

from autoglm_jax.checkpoint.gguf import GGUF_ARCHITECTURES, config_from_gguf, iter_gguf_tensors
from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.checkpoint.loader import ModelSource, load_params
from autoglm_jax.config import ModelConfig, UnsupportedModelError
from tests.hf_tiny import save_tiny, tiny_hf_model

Q = gguf.GGMLQuantizationType
HF_TO_GGUF_ARCH = {hf: g for g, hf in GGUF_ARCHITECTURES.items()}
QTYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1)


# ---- a small convert_hf_to_gguf ----------------------------------------------------------------


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp LlamaModel.permute: per head, rows (half, j) -> (j, half)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, gguf_arch: str, fuse_qkv: bool) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in HF layout, as llama.cpp's converter would produce."""
    cfg = model.config
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    name_map = gguf.get_tensor_name_map(
        {n: a for a, n in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch], cfg.num_hidden_layers)
    out = {}
    for name, w in sd.items():
        base, kind = name.rsplit(".", 1)
        if gguf_arch == "llama" and base.endswith("q_proj"):
            w = llama_cpp_permute(w, cfg.num_attention_heads)
        if gguf_arch == "llama" and base.endswith("k_proj"):
            w = llama_cpp_permute(w, cfg.num_key_value_heads)
        if fuse_qkv and base.endswith(("k_proj", "v_proj")):
            continue
        if fuse_qkv and base.endswith("q_proj"):  # THUDM's query_key_value
            parts = [sd[f"{base[:-6]}{p}_proj.{kind}"] for p in "qkv"]
            out[name_map.get_name(base).replace("attn_q", "attn_qkv") + f".{kind}"] = np.concatenate(parts)
            continue
        gguf_name = name_map.get_name(base)
        assert gguf_name is not None, f"gguf has no name for {base}"
        out[f"{gguf_name}.{kind}"] = w
    return out


def write_gguf(path, model, qtype=Q.F32, fuse_qkv=False, gguf_arch=None, extra=None,
               eot_token_id=None) -> dict[str, np.ndarray]:
    """Writes ``model`` as GGUF (2-D tensors as ``qtype``, 1-D as F32); returns what was stored,
    dequantized back by gguf (GGUF name -> array in HF layout)."""
    cfg = model.config
    gguf_arch = gguf_arch or HF_TO_GGUF_ARCH[cfg.architectures[0]]
    tensors = gguf_tensors(model, HF_TO_GGUF_ARCH[cfg.architectures[0]], fuse_qkv)
    tensors.update(extra or {})
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        writer.add_rope_scaling_type(gguf.RopeScalingType(cfg.rope_parameters["rope_type"]))
        writer.add_rope_scaling_factor(cfg.rope_parameters["factor"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
    if gguf_arch == "qwen2":
        writer.add_key_length(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(cfg.bos_token_id)
    writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_pad_token_id(cfg.pad_token_id)
    if eot_token_id is not None:
        writer.add_eot_token_id(eot_token_id)
    stored = {}
    for name, w in tensors.items():
        kind = qtype if w.ndim == 2 else Q.F32
        data = gguf.quants.quantize(np.ascontiguousarray(w, np.float32), kind)
        writer.add_tensor(name, data, raw_dtype=kind if data.dtype == np.uint8 else None)
        stored[name] = gguf.quants.dequantize(data, kind).astype(np.float32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def expected_hf_tensors(model, qtype) -> dict[str, np.ndarray]:
    """HF state_dict after a round trip through ``qtype`` (rows quantize independently, so a row
    permutation or concatenation commutes with quantization)."""
    out = {}
    for name, w in model.state_dict().items():
        w = w.detach().float().numpy()
        kind = qtype if w.ndim == 2 else Q.F32
        out[name] = gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind).astype(np.float32)
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


def hf_model_config(model) -> ModelConfig:
    config = ModelConfig.from_hf_config(model.config.to_dict())
    return config.replace(rms_norm_eps=float(np.float32(config.rms_norm_eps)))  # GGUF stores float32


# ---- tiny models of every architecture ---------------------------------------------------------

CASES = [("LlamaForCausalLM", False), ("Qwen2ForCausalLM", False), ("Glm4ForCausalLM", False),
         ("GlmForCausalLM", True)]  # chatglm as THUDM wrote it: fused query_key_value


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("architecture,fuse_qkv", CASES, ids=[c[0] for c in CASES])
def test_tiny_model_round_trip(tmp_path, architecture, fuse_qkv, qtype):
    model = tiny_hf_model(architecture, seed=int(qtype) + 7)
    path = tmp_path / "model.gguf"
    write_gguf(path, model, qtype, fuse_qkv)
    config = config_from_gguf(path)
    assert config == hf_model_config(model)
    expected = expected_hf_tensors(model, qtype)
    seen = []
    for name, tensor in iter_gguf_tensors(path, config):
        assert tensor.dtype == np.float32 and name in expected, name
        ref = expected[name]
        assert tensor.shape == ref.shape, (name, tensor.shape, ref.shape)
        err = np.abs(tensor - ref)
        assert err.max() == 0, f"{name}: max {err.max():.3e} mean {err.mean():.3e}"
        seen.append(name)
    assert sorted(seen) == sorted(expected)


def test_f32_values_equal_transformers_state_dict(tmp_path):
    """F32 is exact: the un-permuted Llama Q/K equal transformers' tensors bit for bit."""
    model = tiny_hf_model("LlamaForCausalLM", seed=3)
    write_gguf(tmp_path / "m.gguf", model)
    state = model.state_dict()
    tensors = dict(iter_gguf_tensors(tmp_path / "m.gguf", config_from_gguf(tmp_path / "m.gguf")))
    stored = gguf_tensors(model, "llama", False)
    for name, gguf_name in (("model.layers.1.self_attn.q_proj.weight", "blk.1.attn_q.weight"),
                            ("model.layers.2.self_attn.k_proj.weight", "blk.2.attn_k.weight")):
        np.testing.assert_array_equal(tensors[name], state[name].numpy())
        assert not np.array_equal(tensors[name], stored[gguf_name])  # the file really was permuted


def test_end_of_turn_token_ends_generation(tmp_path):
    model = tiny_hf_model("GlmForCausalLM")
    write_gguf(tmp_path / "m.gguf", model, eot_token_id=7)
    config = config_from_gguf(tmp_path / "m.gguf")
    assert config.eos_token_ids == (model.config.eos_token_id, 7)
    assert (config.bos_token_id, config.pad_token_id) == (model.config.bos_token_id, model.config.pad_token_id)


def test_tied_embeddings_when_no_output_tensor(tmp_path):
    model = tiny_hf_model("LlamaForCausalLM", seed=5, tie_word_embeddings=True)
    write_gguf(tmp_path / "m.gguf", model, Q.Q8_0)
    config = config_from_gguf(tmp_path / "m.gguf")
    assert config.tie_word_embeddings and config == hf_model_config(model)
    assert "lm_head.weight" not in dict(iter_gguf_tensors(tmp_path / "m.gguf", config))


@pytest.mark.parametrize("architecture,fuse_qkv", CASES, ids=[c[0] for c in CASES])
def test_gguf_params_equal_safetensors_params(tmp_path, architecture, fuse_qkv):
    """The whole loader: an F32 GGUF gives the same parameter tree as the safetensors directory."""
    hf = save_tiny(architecture, tmp_path / "hf", seed=11)
    write_gguf(tmp_path / "m.gguf", hf, Q.F32, fuse_qkv)
    _, from_hf = load_params(ModelSource("hf", str(tmp_path / "hf")), np.float32)
    _, from_gguf = load_params(ModelSource("gguf", str(tmp_path / "m.gguf")), np.float32)
    flat_hf, flat_gguf = _flatten(from_hf), _flatten(from_gguf)
    assert flat_hf.keys() == flat_gguf.keys()
    for key in flat_hf:
        np.testing.assert_array_equal(flat_gguf[key], flat_hf[key], err_msg=key)


def _flatten(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flatten(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


# ---- errors --------------------------------------------------------------------------------------


@pytest.fixture
def llama_gguf(tmp_path):
    path = tmp_path / "llama.gguf"
    write_gguf(path, tiny_hf_model("LlamaForCausalLM", seed=1), Q.Q8_0)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file_names_the_file(llama_gguf, tmp_path, keep):
    data = llama_gguf.read_bytes()
    cut = tmp_path / f"cut_{keep}.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=str(cut)):
        config = config_from_gguf(cut)
        list(iter_gguf_tensors(cut, config))


def test_tensor_shape_not_matching_its_bytes_names_tensor_and_file(llama_gguf, tmp_path):
    """Header claims blk.0.attn_norm.weight has 2x its elements: its data would overlap the next."""
    data = bytearray(llama_gguf.read_bytes())
    name = b"blk.0.attn_norm.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims, dim0 = struct.unpack_from("<IQ", data, at)
    assert (n_dims, dim0) == (1, 64)
    struct.pack_into("<Q", data, at + 4, 128)
    bad = tmp_path / "bad_shape.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"blk\.0\.attn_norm\.weight.*{bad}"):
        list(iter_gguf_tensors(bad, config_from_gguf(bad)))


def test_unknown_architecture_is_named(tmp_path):
    path = tmp_path / "gpt2.gguf"
    write_gguf(path, tiny_hf_model("LlamaForCausalLM"), gguf_arch="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"'gpt2'.*llama, qwen2, glm4, chatglm"):
        config_from_gguf(path)


def test_unknown_tensor_is_named(tmp_path):
    path = tmp_path / "extra.gguf"
    rng = np.random.default_rng(0)
    write_gguf(path, tiny_hf_model("LlamaForCausalLM"), extra={"blk.0.mystery.weight": rng.standard_normal(64)})
    with pytest.raises(CheckpointError, match=r"blk\.0\.mystery\.weight"):
        list(iter_gguf_tensors(path, config_from_gguf(path)))


def test_linear_rope_scaling(tmp_path):
    model = tiny_hf_model("LlamaForCausalLM", rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                               "rope_theta": 5000.0})
    write_gguf(tmp_path / "m.gguf", model)
    config = config_from_gguf(tmp_path / "m.gguf")
    assert config.rope_scaling == (("factor", 4.0), ("rope_type", "linear")) and config.rope_theta == 5000.0
    assert config == hf_model_config(model)


def test_yarn_rope_scaling_is_refused(tmp_path):
    model = tiny_hf_model("LlamaForCausalLM", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                               "rope_theta": 5000.0})
    write_gguf(tmp_path / "m.gguf", model)
    with pytest.raises(UnsupportedModelError, match="yarn"):
        config_from_gguf(tmp_path / "m.gguf")


def test_llama3_rope_freqs_are_refused(tmp_path):
    path = tmp_path / "llama3.gguf"
    freqs = np.linspace(1.0, 8.0, 8).astype(np.float32)
    write_gguf(path, tiny_hf_model("LlamaForCausalLM"), extra={"rope_freqs.weight": freqs})
    with pytest.raises(UnsupportedModelError, match="rope_freqs"):
        config_from_gguf(path)


# ---- the real default model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    transformers = pytest.importorskip("transformers")
    from autoglm_jax.default_model import default_model_path

    try:
        path = default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return path, model


def test_smollm2_config_matches_transformers(smollm2):
    path, model = smollm2
    hf = model.config.to_dict()
    hf["architectures"] = [type(model).__name__]  # a config loaded from GGUF names none
    assert config_from_gguf(path) == ModelConfig.from_hf_config(hf)


def test_smollm2_tensors_equal_transformers(smollm2):
    path, model = smollm2
    state = model.state_dict()
    config = config_from_gguf(path)
    seen = set()
    for name, tensor in iter_gguf_tensors(path, config):
        ref = state[name].numpy()
        assert tensor.shape == ref.shape, name
        err = np.abs(tensor - ref)
        assert err.max() == 0, f"{name}: max {err.max():.3e} mean {err.mean():.3e}"
        seen.add(name)
    assert config.tie_word_embeddings
    assert seen == set(state) - {"lm_head.weight"}
