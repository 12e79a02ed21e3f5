"""Text <-> token ids for a model: the ``Tokenizer`` built from a Hugging Face folder or a GGUF file.

Owns: building a ``tokenizers.Tokenizer`` (Rust backend) the way ``transformers`` builds it for the same
files, so the ids match token for token; the special tokens (bos / eos / pad / unk); the model's chat
templates and the eos ids that stop generation (``generation_config.json`` or GGUF end-of-turn ids).

Does not own: rendering chat templates (``chat_template.py``), streaming detokenization
(``detokenizer.py``), reading GGUF files (``checkpoint/gguf_file.py``). Nothing here imports
``transformers``; the tests compare against it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from autoglm_jax import chat_template as chat_template_lib
from autoglm_jax.checkpoint.gguf_file import CheckpointError, gguf_metadata

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")

# GGUF token types (llama.cpp ``llama_token_type``).
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4

# Pre-tokenizer split regexes by ``tokenizer.ggml.pre``, for byte-level vocabularies whose merges
# were learned on a split other than GPT-2's. Same table as transformers' GGUF loader; any other
# value keeps GPT-2's ByteLevel regex, as transformers does.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# SentencePiece-in-GGUF architectures that transformers rebuilds with model-specific fixes we lack.
_UNSUPPORTED_SENTENCEPIECE_ARCHS = ("gemma", "gemma2", "gemma3", "phi3")


class Tokenizer:
    """A model's tokenizer: ids, special tokens, chat templates. Build with ``from_directory``/``from_gguf``."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str | None],
        extra_eos_token_ids: Sequence[int] = (),
        chat_templates: Mapping[str, str] | None = None,
        source: str = "<in memory>",
    ):
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise ValueError(f"unknown special token names {sorted(unknown)}; expected {SPECIAL_TOKEN_NAMES}")
        self.backend = backend
        self.special_tokens = {name: special_tokens.get(name) for name in SPECIAL_TOKEN_NAMES}
        self.chat_templates = dict(chat_templates or {})
        self.source = source
        eos = self._special_id("eos_token")
        self._eos_token_ids = tuple(dict.fromkeys(([eos] if eos is not None else []) + list(extra_eos_token_ids)))

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face tokenizer folder (``tokenizer.json`` + optional configs)."""
        path = os.fspath(path)
        tokenizer_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}; expected a Hugging Face tokenizer folder")
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special_map = _read_json(os.path.join(path, "special_tokens_map.json"))
        special = {name: _token_content(config.get(name, special_map.get(name))) for name in SPECIAL_TOKEN_NAMES}
        generation = _read_json(os.path.join(path, "generation_config.json"))
        model_config = _read_json(os.path.join(path, "config.json"))
        extra_eos = _as_id_list(generation.get("eos_token_id")) + _as_id_list(model_config.get("eos_token_id"))
        # tokenizer.json's post-processor decides bos/eos; like transformers 5 we ignore add_bos_token there.
        return cls(backend, special_tokens=special, extra_eos_token_ids=extra_eos,
                   chat_templates=_directory_chat_templates(path, config), source=path)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike) -> Tokenizer:
        """Builds the tokenizer a GGUF file describes in its ``tokenizer.ggml.*`` metadata."""
        path = os.fspath(path)
        meta = gguf_metadata(path)
        backend, add_bos_default = _gguf_backend(meta, path)
        tokens = meta["tokenizer.ggml.tokens"]
        special = {name: _gguf_token(tokens, meta.get(f"tokenizer.ggml.{key}"), key, path)
                   for name, key in _GGUF_SPECIAL_TOKEN_KEYS.items()}
        _add_gguf_added_tokens(backend, meta, special, byte_level=meta["tokenizer.ggml.model"] == "gpt2")
        _set_bos_eos_processor(backend, special, meta.get("tokenizer.ggml.add_bos_token", add_bos_default),
                               meta.get("tokenizer.ggml.add_eos_token", False))
        # llama.cpp also stops on the end-of-turn / end-of-message tokens.
        extra_eos = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
        templates = {key.removeprefix("tokenizer.chat_template").lstrip(".") or "default": value
                     for key, value in meta.items() if key.startswith("tokenizer.chat_template")}
        return cls(backend, special_tokens=special, extra_eos_token_ids=extra_eos, chat_templates=templates,
                   source=path)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Writes a Hugging Face tokenizer folder that ``from_directory`` reads back identically:
        tokenizer.json, tokenizer_config.json (special tokens, chat templates), generation_config.json."""
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        self.backend.save(os.path.join(directory, "tokenizer.json"))
        config: dict[str, Any] = {name: token for name, token in self.special_tokens.items() if token is not None}
        if self.chat_templates:
            named = [{"name": name, "template": t} for name, t in self.chat_templates.items()]
            config["chat_template"] = self.chat_templates["default"] if list(self.chat_templates) == ["default"] else named
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1, ensure_ascii=False)
        with open(os.path.join(directory, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump({"eos_token_id": list(self.eos_token_ids)}, f, indent=1)

    # ---- ids <-> text ---------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that are not valid UTF-8 become U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str | list[int]:
        """Renders ``messages`` with the model's chat template; ids (no extra bos) when ``tokenize``."""
        template = chat_template_lib.select_chat_template(self.chat_templates, tools=tools, source=self.source)
        text = chat_template_lib.render_chat_template(
            template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
            **{**self.special_tokens, **kwargs},
        )
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- properties -----------------------------------------------------------------------------
    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The eos id first, then the other ids that end generation (generation config, end of turn)."""
        return self._eos_token_ids

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding may be padded larger)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    @property
    def all_special_ids(self) -> tuple[int, ...]:
        """Ids of the added tokens marked special: those ``decode(skip_special_tokens=True)`` drops."""
        return tuple(sorted(i for i, t in self.backend.get_added_tokens_decoder().items() if t.special))

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens[name]
        return None if token is None else self.backend.token_to_id(token)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"


# ---- Hugging Face folder helpers -------------------------------------------------------------------
def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"invalid JSON in {path}: {e}") from e


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config spells it: a string or a serialized AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _directory_chat_templates(path: str, config: Mapping[str, Any]) -> dict[str, str]:
    """Templates by name ("default", "tool_use", ...) from tokenizer_config.json or the files beside it."""
    templates: dict[str, str] = {}
    in_config = config.get("chat_template")
    if in_config is None:
        in_config = _read_json(os.path.join(path, "chat_template.json")).get("chat_template")
    if isinstance(in_config, str):
        templates["default"] = in_config
    elif isinstance(in_config, list):
        templates.update({entry["name"]: entry["template"] for entry in in_config})
    jinja_file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            templates["default"] = f.read()
    extra_dir = os.path.join(path, "chat_templates")
    if os.path.isdir(extra_dir):
        for name in sorted(os.listdir(extra_dir)):
            if name.endswith(".jinja"):
                with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                    templates[name.removesuffix(".jinja")] = f.read()
    return templates


def _set_bos_eos_processor(backend: tokenizers.Tokenizer, special: Mapping[str, str | None],
                           add_bos: bool, add_eos: bool) -> None:
    """Post-processor adding bos/eos around a sequence, as transformers' ``update_post_processor``."""
    bos, eos = special.get("bos_token"), special.get("eos_token")
    add_bos, add_eos = bool(add_bos and bos is not None), bool(add_eos and eos is not None)
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    specials = [(token, backend.token_to_id(token)) for token, add in ((bos, add_bos), (eos, add_eos)) if add]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# ---- GGUF vocabulary ------------------------------------------------------------------------------
_GGUF_SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                            "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


def _gguf_backend(meta: Mapping[str, Any], path: str) -> tuple[tokenizers.Tokenizer, bool]:
    """The backend for ``tokenizer.ggml.model``, and whether it adds bos when the file does not say."""
    if "tokenizer.ggml.tokens" not in meta:
        raise CheckpointError(f"GGUF file {path} has no tokenizer.ggml.tokens; it carries no tokenizer")
    model_type, architecture = meta.get("tokenizer.ggml.model"), meta.get("general.architecture")
    if model_type == "gpt2":
        return _gguf_byte_level_bpe(meta), False
    if model_type == "llama" and architecture not in _UNSUPPORTED_SENTENCEPIECE_ARCHS:
        # llama.cpp adds bos to SentencePiece vocabularies that do not say otherwise.
        return _gguf_sentencepiece_bpe(meta), True
    raise NotImplementedError(
        f"GGUF tokenizer model {model_type!r} (architecture {architecture!r}) in {path} is not supported; "
        f"supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE) except architectures "
        f"{_UNSUPPORTED_SENTENCEPIECE_ARCHS}"
    )


def _gguf_token(tokens: Sequence[str], token_id: int | None, key: str, path: str) -> str | None:
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise CheckpointError(f"tokenizer.ggml.{key}={token_id} is outside the vocabulary of {len(tokens)} in {path}")
    return tokens[token_id]


def _gguf_byte_level_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """GPT-2 style byte-level BPE; tokens spelled in raw UTF-8 are respelled in the byte alphabet."""
    byte_to_char = _bytes_to_unicode()
    spelling = set(byte_to_char.values())
    vocab = {
        token if set(token) <= spelling else "".join(byte_to_char[b] for b in token.encode("utf-8")): index
        for index, token in enumerate(meta["tokenizer.ggml.tokens"])
    }
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges", ())]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                              end_of_word_suffix="", fuse_unk=False))
    split = _GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(tokenizers.Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_sentencepiece_bpe(meta: Mapping[str, Any]) -> tokenizers.Tokenizer:
    """SentencePiece BPE with byte fallback (Llama 1/2, Mistral); merges from the file or the scores."""
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    else:
        merges = _merges_from_scores(vocab, dict(zip(tokens, meta["tokenizer.ggml.scores"])))
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None)
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    return backend


def _merges_from_scores(vocab: Mapping[str, int], scores: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two tokens, best score first."""
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        merges.extend((left, right, score) for left, right in pairs)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_gguf_added_tokens(backend: tokenizers.Tokenizer, meta: Mapping[str, Any],
                           special: Mapping[str, str | None], *, byte_level: bool) -> None:
    """Control tokens (and bos/eos/unk/pad) become special added tokens, user-defined ones plain added ones.

    In a byte-level vocabulary a control token spelled outside the byte alphabet is a llama.cpp
    mislabel; adding it would grow the vocabulary, so it is skipped (as transformers does).
    """
    alphabet = set(_bytes_to_unicode().values()) if byte_level else None
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or ()
    control = [t for t, kind in zip(tokens, types)
               if kind == _GGUF_CONTROL and (alphabet is None or set(t) <= alphabet)]
    named = [t for t in special.values() if t is not None and t not in control]
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control + named])
    vocab = backend.get_vocab(with_added_tokens=False)
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, types) if kind == _GGUF_USER_DEFINED and t in vocab])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table
