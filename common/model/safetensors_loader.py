"""Hugging Face model folders: config.json for the shape, *.safetensors for one stage's weights.

Tensor names are already the HF names of the loading contract (weights.py), so loading is a
lookup: the shard index (model.safetensors.index.json) says which file holds each name, and
`safe_open` reads just those tensors from their memory-mapped files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from common.model.shape import ModelShape
from common.model.weights import EMBEDDING, LM_HEAD

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_INDEX_FILE = "model.safetensors.index.json"


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def read_shape(folder: str | Path, name: str) -> ModelShape:
    """The model shape from config.json (no weights are read)."""
    cfg = read_config(folder)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{folder}: model_type {model_type!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if cfg.get("mlp_bias") or cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{folder}: only bias-free SiLU MLPs are supported")
    # transformers 5 writes `rope_parameters`; older configs have rope_theta + rope_scaling.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"{folder}: RoPE type {rope_type!r} is not supported (only default)")
    heads = cfg["num_attention_heads"]
    max_positions = cfg.get("max_position_embeddings", 2048)
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", model_type == "mistral"):
        # Sliding-window attention is not implemented; it equals full attention while the
        # context fits in the window, so the window caps the usable context instead.
        max_positions = min(max_positions, window)
    eos = cfg.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    return ModelShape(
        name=name,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        # Qwen2's q/k/v projections always have biases; Llama's only when configured.
        attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def load_tensors(folder: str, shape: ModelShape, wanted: dict[str, tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Reads the tensors named in `wanted` from the folder's safetensors files."""
    files = _weight_files(Path(folder))
    # A tied checkpoint stores no lm_head (or a copy of the embedding): read the embedding.
    source_name = {name: name for name in wanted}
    if shape.tie_word_embeddings and LM_HEAD in wanted:
        source_name[LM_HEAD] = EMBEDDING
    by_file: dict[Path, list[str]] = {}
    for name, stored in source_name.items():
        if stored not in files:
            raise ValueError(f"{folder}: no tensor {stored} in its safetensors files")
        by_file.setdefault(files[stored], []).append(name)
    out: dict[str, torch.Tensor] = {}
    loaded: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in names:
                stored = source_name[name]
                if stored not in loaded:
                    loaded[stored] = f.get_tensor(stored).to(device=device, dtype=dtype)
                out[name] = loaded[stored]
    return out


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it."""
    index = folder / _INDEX_FILE
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors files")
    names: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names.update(dict.fromkeys(f.keys(), path))
    return names
