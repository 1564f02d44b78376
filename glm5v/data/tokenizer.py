"""Tokenizers for the LLM: an offline byte-level one (the embedded default) and an adapter over any
Hugging Face tokenizer, both with the special tokens of the multimodal chat format.

Both give `encode(text) -> list[int]`, where a special-token string in the text becomes its single
id, `decode(ids) -> str`, `vocab_size` and `token_id(name)` (name: the token string, e.g.
"<|image|>"). `encode` never adds BOS/EOS: the caller lays the format out with the specials.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from os import PathLike
from typing import Protocol

# The format's special tokens, in the order of their ids in ByteTokenizer (after the 256 bytes).
ENDOFTEXT, PAD = "<|endoftext|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE = "<|image|>", "<|begin_of_image|>", "<|end_of_image|>"
SPECIAL_TOKENS = (ENDOFTEXT, PAD, SYSTEM, USER, ASSISTANT, IMAGE, BEGIN_OF_IMAGE, END_OF_IMAGE)


class Tokenizer(Protocol):
    """What the models and data pipelines need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def token_id(self, name: str) -> int: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; SPECIAL_TOKENS follow as ids 256, 257, ... (vocab_size = 264).

    Needs no files or network; every string round-trips exactly. decode() replaces byte
    sequences that are not valid UTF-8 (e.g. a generation cut inside a character) with U+FFFD.
    """

    def __init__(self):
        self._special_ids = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
        self._special_names = {i: name for name, i in self._special_ids.items()}
        self._pattern = re.compile("(" + "|".join(re.escape(name) for name in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    def token_id(self, name: str) -> int:
        """The id of a special token, given as its string (e.g. "<|image|>")."""
        if name not in self._special_ids:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(SPECIAL_TOKENS)}")
        return self._special_ids[name]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        ids: list[int] = []
        # re.split with a capturing group alternates plain text (even indices) and specials (odd).
        for i, piece in enumerate(self._pattern.split(text)):
            ids.extend([self._special_ids[piece]] if i % 2 else piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside [0, vocab_size) = [0, {self.vocab_size})")
            if i < 256:
                run.append(i)
                continue
            # Bytes are decoded a run at a time, so multi-byte characters survive.
            parts.append(run.decode("utf-8", errors="replace"))
            parts.append(self._special_names[i])
            run = bytearray()
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """Any Hugging Face tokenizer with the format's special tokens added where it lacks them.

    tokenizer: a transformers tokenizer, or a path / hub name for `AutoTokenizer.from_pretrained`
    (offline use needs a local path). Tokens it already has keep their ids; missing ones are
    added as special (atomic) tokens at the end of its vocabulary, so `vocab_size` may grow and
    the LLM's embedding must be sized from it.
    """

    def __init__(self, tokenizer, special_tokens: Iterable[str] = SPECIAL_TOKENS):
        if isinstance(tokenizer, (str, PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        for method in ("encode", "decode", "add_tokens", "convert_tokens_to_ids", "get_vocab"):
            if not callable(getattr(tokenizer, method, None)):
                raise TypeError(f"tokenizer must be a transformers tokenizer (it has no {method}()), got "
                                f"{type(tokenizer).__name__}")
        from tokenizers import AddedToken

        self.special_tokens = tuple(special_tokens)
        vocab = tokenizer.get_vocab()
        missing = [name for name in self.special_tokens if name not in vocab]
        # normalized=False: the tokenizer's normaliser must not rewrite the marker before matching.
        tokenizer.add_tokens([AddedToken(name, special=True, normalized=False) for name in missing],
                             special_tokens=True)
        self.tokenizer = tokenizer
        self._special_ids = {name: tokenizer.convert_tokens_to_ids(name) for name in self.special_tokens}

    @property
    def vocab_size(self) -> int:
        # len() counts added tokens; the `vocab_size` attribute of transformers does not.
        return len(self.tokenizer)

    def token_id(self, name: str) -> int:
        """The id of a special token, given as its string (e.g. "<|image|>")."""
        if name not in self._special_ids:
            raise KeyError(f"{name!r} is not a special token; known: {', '.join(self.special_tokens)}")
        return self._special_ids[name]

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside [0, vocab_size) = [0, {self.vocab_size})")
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
