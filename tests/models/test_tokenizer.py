"""The small CLIP tokenizer builder, and the files shipped with the package."""

import filecmp

from transformers import CLIPTokenizer

from lcmserve.models.presets import tokenizer_path
from lcmserve.models.tokenizer import PRESET_WORDS, build_clip_bpe, write_clip_tokenizer


def test_known_words_become_single_tokens(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(["a", "photo", "of", "cat"], tmp_path))
    ids = tok("A photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == [
        "<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"
    ]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == len(tok) - 1


def test_unknown_words_fall_back_to_bytes(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(["cat"], tmp_path))
    tokens = tok.convert_ids_to_tokens(tok("dog!").input_ids)
    assert tokens == ["<|startoftext|>", "d", "o", "g</w>", "!</w>", "<|endoftext|>"]
    # CLIP decodes word ends as spaces: the text survives up to spacing.
    assert tok.decode(tok("dog!").input_ids, skip_special_tokens=True).replace(" ", "") == "dog!"


def test_padding_and_truncation_to_model_max_length(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(["cat"], tmp_path, model_max_length=16))
    ids = tok("cat " * 40, padding="max_length", max_length=16, truncation=True).input_ids
    assert len(ids) == 16 and ids[-1] == tok.eos_token_id


def test_shipped_files_match_the_builder(tmp_path):
    write_clip_tokenizer(PRESET_WORDS, tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / name, f"{tokenizer_path()}/{name}", shallow=False), name


def test_vocabulary_is_deterministic():
    assert build_clip_bpe(["b", "a", "ab"]) == build_clip_bpe(["ab", "a", "b"])


def test_every_listed_word_is_one_token_even_when_merges_overlap(tmp_path):
    # BPE merges by rank over the whole word: "a n" (from "and") once split "triangle" and
    # "orange" into pieces, and long shapes captions were cut at the model's 32 tokens.
    words = ["and", "an", "right", "triangle", "orange", "yellow", "low", "lower", "tri", "angle"]
    tok = CLIPTokenizer.from_pretrained(write_clip_tokenizer(words, tmp_path))
    for word in words:
        assert tok.tokenize(word) == [word + "</w>"], word
    for word in PRESET_WORDS:
        assert len(CLIPTokenizer.from_pretrained(tokenizer_path()).tokenize(word)) == 1, word


def test_every_shapes_caption_fits_the_domain_tokenizer(tmp_path):
    from lcmserve.shapes.models import MAX_TOKENS, write_tokenizer
    from lcmserve.shapes.scenes import caption_for_index, vocabulary

    tok = write_tokenizer(tmp_path)
    assert [w for w in vocabulary() if len(tok.tokenize(w)) != 1] == []
    lengths = [len(tok(caption_for_index(i, split)[1]).input_ids) for split in ("train", "heldout") for i in range(2000)]
    assert max(lengths) <= MAX_TOKENS
