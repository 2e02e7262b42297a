"""Tokenizer fingerprint: proves that a student and a teacher tokenize identically.

Config ``vocab_size`` may differ between models that share a tokenizer (padded embedding rows, e.g. 151936
vs 152064), so matrix shapes prove nothing; the vocabulary, the added tokens and the special tokens do.
Works with any Hugging Face tokenizer (duck-typed: ``get_vocab()`` and ``all_special_tokens``).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 (first 16 hex digits) over the sorted vocabulary and the special tokens with their ids."""
    vocab = tokenizer.get_vocab()
    specials = sorted((tok, vocab.get(tok, -1)) for tok in set(tokenizer.all_special_tokens))
    doc = {"vocab": sorted(vocab.items(), key=lambda kv: kv[1]), "special": specials}
    digest = hashlib.sha256(json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()[:16]
