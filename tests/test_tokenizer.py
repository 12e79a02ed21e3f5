"""Tokenizer ids and special tokens against transformers' tokenizer for the same files.

Byte-level BPE: the real SmolLM2 GGUF, and its tokenizer saved as a Hugging Face folder.
SentencePiece BPE: a small GGUF written here (no merges: they are derived from the scores).
"""

import json
import os

import gguf
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, processors, trainers

from autoglm_jax.checkpoint.gguf_file import CheckpointError
from autoglm_jax.default_model import default_model_path
from autoglm_jax.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    " leading space and trailing space ",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\r\n        pass",
    "a    b\t\t\tc\n\n\n\nd        ",
    "Ünïcödé naïve café, Straße, Ελληνικά, русский текст",
    "日本語のテキストと中文文本，还有한국어",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷 and ✨",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>x<file_sep>",
    "numbers 1234567890 3.14159 -42 1e-9",
    "it's they're we've I'm you'll he'd",
    "",
    " ",
    "\n",
    "URL https://example.com/a?b=c&d=e#f and email a.b@c.de",
    "mixed<|im_start|>inside<|im_end|>words",
]


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def reference(gguf_path):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))


@pytest.fixture(scope="module")
def tokenizer(gguf_path):
    return Tokenizer.from_gguf(gguf_path)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers_and_round_trips(tokenizer, reference, text):
    ids = tokenizer.encode(text)
    assert ids == reference.encode(text), text
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def test_gguf_special_tokens_match_transformers(tokenizer, reference):
    assert tokenizer.bos_token_id == reference.bos_token_id == 1
    assert tokenizer.eos_token_ids == (reference.eos_token_id,) == (2,)
    assert tokenizer.pad_token_id == reference.pad_token_id
    assert tokenizer.vocab_size == len(reference) == 49152
    assert set(reference.all_special_ids) <= set(tokenizer.all_special_ids)
    assert tokenizer.chat_template == reference.chat_template
    assert tokenizer.id_to_token(1) == "<|im_start|>" and tokenizer.token_to_id("<|im_end|>") == 2
    assert tokenizer.token_to_id("not a token at all") is None
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode("hi", add_special_tokens=False)


def test_directory_matches_gguf_and_transformers(tokenizer, reference, tmp_path):
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text) == tokenizer.encode(text), text
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.bos_token_id, loaded.eos_token_ids, loaded.pad_token_id) == (1, (2,), 2)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.all_special_ids == tokenizer.all_special_ids


def test_directory_post_processor_decides_bos_and_generation_config_adds_eos(reference, tmp_path):
    """tokenizer.json's post-processor adds bos; tokenizer_config's add_bos_token is ignored (transformers 5)."""
    reference.save_pretrained(tmp_path)
    tokenizer_file = str(tmp_path / "tokenizer.json")
    backend = BackendTokenizer.from_file(tokenizer_file)
    bos_then_text = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    backend.post_processor = bos_then_text
    backend.save(tokenizer_file)
    config_file = tmp_path / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_bos_token": False}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    loaded = Tokenizer.from_directory(tmp_path)
    expected = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in ("hello there", "<|im_start|>x"):
        assert loaded.encode(text) == expected.encode(text)
        assert loaded.encode(text)[0] == loaded.bos_token_id == 1
        assert loaded.encode(text, add_special_tokens=False) == expected.encode(text, add_special_tokens=False)
    assert loaded.eos_token_ids == (2, 0)


def test_directory_without_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_directory(tmp_path)


def test_tokenize_chat_template_has_no_extra_bos(tokenizer):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]), False)
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids.count(tokenizer.bos_token_id) == 3


# ---- SentencePiece ("llama") GGUF --------------------------------------------------------------
SPM_CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!", "naïve café déjà vu",
              "def main():\n    return 42", "日本語のテキスト", "two  spaces and\ttabs"]


def _write_gguf(path, tokens, types, scores, tokenizer_model="llama"):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory):
    """A Llama-style vocabulary: <unk>, <s>, </s>, 256 byte tokens, pieces scored by merge rank."""
    trained = BackendTokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    trained.train_from_iterator(SPM_CORPUS * 10, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    for piece, _ in sorted(trained.get_vocab().items(), key=lambda item: item[1]):
        if piece not in tokens:
            tokens.append(piece)
            types.append(1)
    scores = [0.0] * 259 + [-float(rank) for rank in range(len(tokens) - 259)]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    _write_gguf(path, tokens, types, scores)
    return path


@pytest.fixture(scope="module")
def sentencepiece_pair(sentencepiece_gguf):
    reference = transformers.AutoTokenizer.from_pretrained(sentencepiece_gguf.parent, gguf_file=sentencepiece_gguf.name)
    return Tokenizer.from_gguf(sentencepiece_gguf), reference


SPM_TEXTS = SPM_CORPUS + ["Hello there <s>x</s> y", "  lead", "emoji 😀 unseen ÿ", "", "a\n\nb"]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_gguf_matches_transformers(sentencepiece_pair, text):
    ours, reference = sentencepiece_pair
    ids = ours.encode(text)
    assert ids == reference.encode(text), text
    assert ids[0] == ours.bos_token_id == 1  # SentencePiece GGUFs add bos unless they say otherwise
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)


def test_unknown_gguf_tokenizer_model_is_not_implemented(tmp_path):
    path = tmp_path / "bert.gguf"
    _write_gguf(path, ["[UNK]", "[CLS]", "[SEP]", "a"], [2, 3, 3, 1], [0.0] * 4, tokenizer_model="bert")
    with pytest.raises(NotImplementedError, match="'bert'"):
        Tokenizer.from_gguf(path)


def test_missing_gguf_file_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        Tokenizer.from_gguf(tmp_path / "absent.gguf")
