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


def build_clip_bpe(words: list[str]) -> tuple[dict[str, int], list[str]]:
    """Vocabulary and merge list in CLIP's format: byte symbols, word merge chains, specials."""
    symbols = _byte_symbols()
    vocab_tokens = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    seen = set(vocab_tokens)
    for word in sorted({w.lower() for w in words if w}):
        # CLIP marks the last symbol of a word with </w>, then merges left to right.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        if any(p.replace("</w>", "") not in symbols for p in pieces):
            raise ValueError(f"words: {word!r} has characters outside CLIP's byte table; use ASCII words")
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            merged = pieces[0] + pieces[1]
            if merged not in seen:
                merges.append(pair)
                vocab_tokens.append(merged)
                seen.add(merged)
            pieces = [merged] + pieces[2:]
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
