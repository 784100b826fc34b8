"""The umT5 tokenizer, read from the checkpoint's `tokenizer.json` with the `tokenizers` library.

Prompts are cleaned as Wan does (HTML unescaped twice, whitespace collapsed; Wan also runs ftfy, which only
repairs mis-decoded unicode) and padded or truncated to the model's text length with the end token kept.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import torch


def clean(text: str) -> str:
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class Tokenizer:
    def __init__(self, path: Path, length: int):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"missing tokenizer file: {path}")
        self.tok = HFTokenizer.from_file(str(path))
        pad_id = self.tok.token_to_id("<pad>")
        if pad_id is None:
            raise ValueError(f"{path}: the tokenizer has no <pad> token")
        self.tok.enable_padding(length=length, pad_id=pad_id, pad_token="<pad>")
        self.tok.enable_truncation(max_length=length)

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids and attention mask, both [len(texts), length] int64."""
        enc = self.tok.encode_batch([clean(t) for t in texts])
        ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long)
        return ids, mask
