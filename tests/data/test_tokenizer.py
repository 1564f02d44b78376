"""glm5v/data/tokenizer.py: the byte-level tokenizer against Python's own UTF-8 codec, and the
Hugging Face adapter on a byte-level BPE tokenizer trained here, offline, on a few sentences."""

from __future__ import annotations

import pytest

from glm5v.data.tokenizer import IMAGE, SPECIAL_TOKENS, USER, ByteTokenizer, HFTokenizer

TEXTS = [
    "",
    "plain ascii, with punctuation!",
    "naïve café — 東京 🌸 ё ñ\u200d\t\n  spaces",
    "a photo of <|image|> 2 cats",
    "<|user|>What is in <|begin_of_image|><|image|><|image|><|end_of_image|>?<|assistant|>A cat.<|endoftext|>",
    "<|imag|> <| image |> <|image|<|image|>>",  # near-misses stay text, the real one inside does not
]


def split_specials(text: str) -> list[str]:
    """Independent segmentation: scan left to right, a special token wherever one starts."""
    pieces, i, plain = [], 0, ""
    while i < len(text):
        hit = next((s for s in SPECIAL_TOKENS if text.startswith(s, i)), None)
        if hit is None:
            plain += text[i]
            i += 1
            continue
        if plain:
            pieces.append(plain)
        pieces.append(hit)
        plain, i = "", i + len(hit)
    return pieces + ([plain] if plain else [])


@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_matches_utf8_and_round_trips(text):
    tok = ByteTokenizer()
    expected = []
    for piece in split_specials(text):
        expected += [tok.token_id(piece)] if piece in SPECIAL_TOKENS else list(piece.encode("utf-8"))
    ids = tok.encode(text)
    assert ids == expected
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_ids_are_distinct_and_outside_the_bytes():
    tok = ByteTokenizer()
    ids = [tok.token_id(name) for name in SPECIAL_TOKENS]
    assert sorted(ids) == list(range(256, tok.vocab_size))
    assert tok.encode(IMAGE) == [tok.token_id(IMAGE)]


def test_byte_tokenizer_bad_input():
    tok = ByteTokenizer()
    with pytest.raises(KeyError, match="<|video|>"):
        tok.token_id("<|video|>")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([65, tok.vocab_size])
    with pytest.raises(TypeError, match="text"):
        tok.encode(b"bytes")
    # a character cut in half decodes to the replacement character instead of raising
    assert tok.decode(list("é".encode())[:1] + [65]) == "\ufffdA"


@pytest.fixture
def hf_tokenizer():
    """A byte-level BPE with <|endoftext|> and <|user|> already in its vocabulary (as GLM's has)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", USER],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the cat sat on the mat", "a photo of two cats", "what is in the image?"] * 20
    bpe.train_from_iterator(corpus, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)


@pytest.mark.parametrize("from_path", [False, True], ids=["object", "from_pretrained"])
def test_hf_adapter_adds_specials_and_round_trips(hf_tokenizer, from_path, tmp_path):
    before = hf_tokenizer.get_vocab()
    if from_path:
        hf_tokenizer.save_pretrained(tmp_path)
        tok = HFTokenizer(str(tmp_path))
    else:
        tok = HFTokenizer(hf_tokenizer)
    missing = [name for name in SPECIAL_TOKENS if name not in before]
    assert tok.vocab_size == len(before) + len(missing)
    # tokens it had keep their ids; the added ones are new, distinct ids at the end
    assert tok.token_id("<|endoftext|>") == before["<|endoftext|>"] and tok.token_id(USER) == before[USER]
    assert sorted(tok.token_id(name) for name in missing) == list(range(len(before), tok.vocab_size))

    special_ids = {tok.token_id(name) for name in SPECIAL_TOKENS}
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == text
        pieces = split_specials(text)
        # each special is exactly one id, in order, and no other id is a special
        assert [i for i in ids if i in special_ids] == [tok.token_id(p) for p in pieces if p in SPECIAL_TOKENS]
    # plain text between specials is encoded as it would be on its own
    assert tok.encode("a cat<|image|>the mat") == tok.encode("a cat") + [tok.token_id(IMAGE)] + tok.encode("the mat")


def test_hf_adapter_bad_input(hf_tokenizer):
    tok = HFTokenizer(hf_tokenizer)
    with pytest.raises(KeyError, match="<|video|>"):
        tok.token_id("<|video|>")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError, match="transformers tokenizer"):
        HFTokenizer(ByteTokenizer())
