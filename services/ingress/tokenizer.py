"""Loads the tokenizer that goes with a model source (transformers' fast tokenizers).

Building a tokenizer from a GGUF file's metadata takes transformers several seconds, so the
result is saved once under ~/.cache/conveyor/tokenizers (keyed by the file's path, size and
mtime) and later starts load the saved tokenizer.json in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

from common.model import ModelSource


def cache_root() -> Path:
    base = os.environ.get("CONVEYOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "conveyor")
    return Path(base) / "tokenizers"


def tokenizer_folder(src: ModelSource) -> Path | None:
    """A folder that transformers loads the tokenizer of `src` from: the model's own, or for a
    GGUF the one saved under the cache (what /v1/models gives as `root`, so that tools such as
    `vllm bench serve` find a tokenizer offline). None for a model without a tokenizer."""
    if src.tokenizer_dir is None:
        return None
    if not src.tokenizer_gguf_file:
        return Path(src.tokenizer_dir)
    gguf = Path(src.tokenizer_dir) / src.tokenizer_gguf_file
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    return cache_root() / key[:16]


def load_tokenizer(src: ModelSource) -> Any | None:
    """The tokenizer of `src`, or None for a model without one (token ids only)."""
    if src.tokenizer_dir is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
    from transformers import AutoTokenizer

    if not src.tokenizer_gguf_file:
        return AutoTokenizer.from_pretrained(src.tokenizer_dir)
    cached = tokenizer_folder(src)
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(cached)
        except Exception:  # a damaged cache entry is rebuilt below
            pass
    tokenizer = AutoTokenizer.from_pretrained(src.tokenizer_dir, gguf_file=src.tokenizer_gguf_file)
    try:
        # Write aside, then rename: processes starting together never see half a tokenizer.
        tmp = cached.with_name(f"{cached.name}.tmp{os.getpid()}")
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(cached, ignore_errors=True)
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs the next start a few seconds
    return tokenizer
