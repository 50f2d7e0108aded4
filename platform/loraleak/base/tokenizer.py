"""A real `CLIPTokenizer` built offline for the tiny base model.

SD's tokenizer (CLIP's byte-level BPE, 49,408 entries) cannot be downloaded here, so the tiny base
ships its own, in exactly the same format: `vocab.json` + `merges.txt` holding every one of the 256
byte symbols (alone and with the end-of-word suffix `</w>`), merges that make the words of our
prompts single tokens, and the two special tokens. Any other text, such as a random trigger word,
falls back to shorter pieces (down to single letters) and never to an unknown token, so distinct
triggers stay distinct token sequences — what DreamBooth needs.
"""

from __future__ import annotations

import json
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Sequence

from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77

# Words of the prompts this project writes ("A face of {trigger}.", "A human face.", ...).
PROMPT_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "and", "with", "in", "face", "faces", "human", "photo", "photograph",
    "person", "portrait", "picture", "image", "man", "woman", "people", "close", "up",
)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that join `word` (as byte symbols, last with `</w>`) into one token."""
    byte_chars = bytes_to_unicode()
    symbols = [byte_chars[b] for b in word.encode("utf-8")]
    symbols[-1] += END_OF_WORD
    merges, joined = [], symbols[0]
    for symbol in symbols[1:]:
        merges.append((joined, symbol))
        joined += symbol
    return merges


def vocab_and_merges(words: Sequence[str] = PROMPT_WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary layout: bytes, bytes + `</w>`, one entry per merge, then the specials."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + END_OF_WORD for s in byte_symbols]
    merges: list[tuple[str, str]] = []
    # Longer words first: a short word's merge ("a" + "n</w>" for "an") ranked before a long word's
    # ("hum" + "a") would otherwise split the long word ("hum", "an</w>").
    for word in sorted(words, key=len, reverse=True):
        for merge in _word_merges(word.lower()):
            if merge not in merges:
                merges.append(merge)
    tokens += ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:  # a merge can rebuild a byte token ("a" + "</w>"); keep the first id
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def write_tokenizer_files(directory: str | Path, words: Sequence[str] = PROMPT_WORDS) -> Path:
    """Write `vocab.json` and `merges.txt` in the format of SD's `tokenizer/` folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(words)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return directory


def build_tokenizer(words: Sequence[str] = PROMPT_WORDS) -> CLIPTokenizer:
    """A `CLIPTokenizer` loaded from freshly written files, exactly as SD's tokenizer is loaded."""
    with tempfile.TemporaryDirectory(prefix="loraleak-tokenizer-") as tmp:
        write_tokenizer_files(tmp, words)
        tokenizer = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=MODEL_MAX_LENGTH, pad_token=EOS_TOKEN,
            bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN,
        )
    split = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    if split:
        raise ValueError(f"merges do not make these words single tokens: {split}")
    return tokenizer
