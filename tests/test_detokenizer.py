"""IncrementalDetokenizer: streamed deltas are whole characters and add up to ``decode``.

Byte-level BPE: the SmolLM2 GGUF tokenizer (emoji and CJK span several tokens).
SentencePiece-style decoding (leading-space rule, byte fallback): a small BPE trained here.
"""

import random

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from autoglm_jax.default_model import default_model_path
from autoglm_jax.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from autoglm_jax.tokenizer import Tokenizer

PIECES = [
    "Hello", " world", "😀", "👍🏽", "👨‍👩‍👧‍👦", "🇯🇵", "日本語", "中文文本", "한국어", " naïve", " café", "\n", "  ", "\t",
    "def f(x):", " return", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "Ω≈ç√", "𝔘𝔫𝔦", "¿Qué?", "🦀🐍",
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf(default_model_path())


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """Metaspace pre-tokenizer (prepend to the first word) + byte fallback + strip-one-space decoder."""
    backend = BackendTokenizer(models.BPE(byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    backend.train_from_iterator(["Hello world, a quick test of words", "naïve café", "the the the end"] * 5, trainer)
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})


def random_text(rng: random.Random, num_pieces: int) -> str:
    return "".join(rng.choice(PIECES) for _ in range(num_pieces))


def stream(tokenizer, ids, chunk_sizes=(1,), rng=None, **kwargs):
    """Feeds ``ids`` in chunks; returns the deltas (flush last)."""
    detok = IncrementalDetokenizer(tokenizer, **kwargs)
    deltas, start = [], 0
    while start < len(ids):
        size = rng.choice(chunk_sizes) if rng else chunk_sizes[0]
        deltas.append(detok.add(ids[start:start + size]))
        start += size
    deltas.append(detok.flush())
    assert "".join(deltas) == detok.text
    assert detok.token_ids == list(ids)
    return deltas


def test_multibyte_characters_are_held_until_complete(tokenizer):
    ids = tokenizer.encode("a😀b")
    assert len(ids) > 3  # the emoji spans several byte-level tokens
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == "a😀b"
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "😀" in deltas and deltas.count("") >= 1


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_streamed_text_equals_decode(tokenizer, seed, skip_special_tokens):
    rng = random.Random(seed)
    ids = tokenizer.encode(random_text(rng, rng.randint(1, 40)))
    expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    for chunk_sizes in ((1,), (1, 2, 3, 7)):
        deltas = stream(tokenizer, ids, chunk_sizes, rng, skip_special_tokens=skip_special_tokens)
        assert "".join(deltas) == expected
        bad = [d for d in deltas if REPLACEMENT_CHAR in d or d.encode("utf-8").decode("utf-8") != d]
        assert not bad, f"broken characters in deltas {bad!r}"


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_with_invalid_utf8_still_add_up(tokenizer, seed):
    rng = random.Random(100 + seed)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 300))]
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids)
    # A U+FFFD appears in a delta only when decode really produces it.
    assert any(REPLACEMENT_CHAR in d for d in deltas) <= (REPLACEMENT_CHAR in tokenizer.decode(ids))


@pytest.mark.parametrize("seed", range(4))
def test_prompt_context_keeps_the_first_generated_token_intact(tokenizer, seed):
    rng = random.Random(200 + seed)
    prompt = tokenizer.encode(random_text(rng, 5))
    generated = tokenizer.encode(random_text(rng, 10))
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt, skip_special_tokens=False)
    text = "".join(detok.add(i) for i in generated) + detok.flush()
    full, prompt_text = tokenizer.decode(prompt + generated, False), tokenizer.decode(prompt, False)
    assert full.startswith(prompt_text) and text == full[len(prompt_text):]


@pytest.mark.parametrize("seed", range(6))
def test_sentencepiece_leading_space_and_byte_fallback(sentencepiece_tokenizer, seed):
    rng = random.Random(300 + seed)
    words = ["Hello", "world", "the", "😀", "日本", "café", "<s>", "</s>", "  ", "x"]
    text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 25)))
    ids = sentencepiece_tokenizer.encode(text)
    for skip in (True, False):
        deltas = stream(sentencepiece_tokenizer, ids, (1, 2), rng, skip_special_tokens=skip)
        assert "".join(deltas) == sentencepiece_tokenizer.decode(ids, skip_special_tokens=skip), text
        assert all(REPLACEMENT_CHAR not in d for d in deltas)


def test_adjacent_special_tokens_have_no_spaces_either_way(tokenizer):
    ids = tokenizer.encode("a<|im_start|><|im_end|><|endoftext|>b")
    for spaces in (True, False):
        text = "".join(stream(tokenizer, ids, skip_special_tokens=False, spaces_between_special_tokens=spaces))
        assert text == "a<|im_start|><|im_end|><|endoftext|>b"
        assert "".join(stream(tokenizer, ids, spaces_between_special_tokens=spaces)) == "ab"


class CountingDecoder:
    """Records how many ids each decode call sees."""

    def __init__(self, tokenizer):
        self.tokenizer, self.window_sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_a_short_window(tokenizer):
    rng = random.Random(7)
    ids = tokenizer.encode(random_text(rng, 400))
    counter = CountingDecoder(tokenizer)
    detok = IncrementalDetokenizer(counter, skip_special_tokens=False)
    text = "".join(detok.add(i) for i in ids) + detok.flush()
    assert len(ids) > 500 and text == tokenizer.decode(ids, skip_special_tokens=False)
    assert max(counter.window_sizes) <= 12, f"window grew to {max(counter.window_sizes)} ids"
    assert len(counter.window_sizes) <= 2 * len(ids) + 2
