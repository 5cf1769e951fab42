"""A small byte-level CLIP vocabulary, shipped with the package so pipelines build offline.

The shipped files in ``assets/`` were written by ``python -m asyncdiff.models.tokenizer``.
Every byte has a token (alone and word-final), so any prompt tokenizes; a few merges make
common English fragments single tokens.

Example:
    >>> tok = load_clip_tokenizer()
    >>> tok("a photo of a cat").input_ids[:2]
    [0, 354]
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["ASSETS", "load_clip_tokenizer", "write_vocabulary"]

ASSETS = Path(str(resources.files("asyncdiff.models") / "assets"))
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_MERGES = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("i", "n"), ("o", "n</w>"), ("e", "r</w>"),
           ("a", "t</w>"), ("o", "f</w>"), ("c", "at</w>"), ("p", "h"), ("ph", "o"), ("t", "o</w>")]


def _byte_unicode() -> list[str]:
    # Same table as GPT-2/CLIP: printable bytes map to themselves, the rest above 255.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_vocabulary(folder: Path = ASSETS) -> None:
    chars = _byte_unicode()
    tokens = [BOS] + chars + [c + "</w>" for c in chars] + ["".join(m) for m in _MERGES] + [EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in _MERGES) + "\n")


def load_clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        str(ASSETS), model_max_length=max_length, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
    )


if __name__ == "__main__":
    write_vocabulary()
