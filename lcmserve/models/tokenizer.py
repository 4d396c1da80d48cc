"""Small CLIP BPE tokenizers built from a word list.

Real Stable Diffusion folders ship their own tokenizer files. Our random-weight presets and
our own small domains need a tokenizer that lives in the repository, so we build CLIP's
byte-level BPE format (vocab.json + merges.txt) ourselves: the 512 byte symbols CLIP starts
from, one merge chain per listed word, and CLIP's two special tokens. transformers' own
``CLIPTokenizer`` reads the result like any CLIP tokenizer.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# The words the presets' tokenizer (models/assets/clip-tokenizer-tiny) knows as whole tokens.
PRESET_WORDS = """a an the of on in at with and photo picture painting drawing portrait landscape cat dog horse
bird astronaut riding mars moon city street forest mountain sea beach sunset night red orange yellow green blue
purple pink black white gray brown small large big tiny circle square triangle star heart top bottom left right
center middle corner background scene shape shapes""".split()

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


@lru_cache(maxsize=1)
def _byte_symbols() -> list[str]:
    """CLIP's reversible byte -> unicode table (Radford et al., 2021; openai/CLIP simple_tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    order = sorted(range(256), key=lambda i: printable[i])
    return [chr(codes[i]) for i in order]


def _bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word: repeatedly merge the adjacent pair of lowest rank."""
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list in CLIP's format: byte symbols, merges that make each word one token, specials.

    BPE applies merges by rank across the whole word, not left to right, so a merge added for
    one word ("a n" for "and") can split another ("triangle" -> "tri", "an", ...). Each word is
    therefore run through the merges so far and only the merges still missing are appended:
    a later merge has a larger rank than every merge an earlier word uses, so it never changes
    how an earlier word splits, and every listed word ends as exactly one token.
    """
    symbols = _byte_symbols()
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab_tokens)
    for word in sorted({w.lower() for w in words if w}):
        # CLIP marks the last symbol of a word with </w>.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if any(p.replace("</w>", "") not in symbols for p in pieces):
            raise ValueError(f"words: {word!r} has characters outside CLIP's byte table; use ASCII words")
        pieces = _bpe(pieces, ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(merges)
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in seen:
                vocab_tokens.append(merged)
                seen.add(merged)
            pieces = _bpe([merged] + pieces[2:], ranks)
    vocab_tokens += [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(vocab_tokens)}, merges


def write_clip_tokenizer(words: list[str], out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json that CLIPTokenizer.from_pretrained reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_clip_bpe(words)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(m + "\n" for m in merges), encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out
