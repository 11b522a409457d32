"""A measured cost profile: what `conveyor profile` writes and `ProfileCostModel` reads.

File format (JSON, `"format": "conveyor-cost-profile"`, `"version": 1`):

    {
      "format": "conveyor-cost-profile",
      "version": 1,
      "model": {"name": "smollm2-135m", "source": "smollm2", "load_format": "auto",
                "shape": {...every ModelShape field...}},
      "dtype": "float32",
      "device": {"type": "cpu", "name": "AMD EPYC ...", "threads": 1, "cpu_count": 2},
      "torch_version": "2.5.1", "created": "2025-01-01T12:00:00+00:00",
      "block_size": 16, "repeats": 5, "warmup": 1,
      "num_layers": 15,
      "grid": {"prefill_tokens": [0, 16, ...], "decode_tokens": [0, 1, ...],
               "context_len": [64, 512, 1536]},
      "samples": [
        {"prefill_tokens": 16, "decode_tokens": 0, "context_len": 64,
         "median_s": ..., "p10_s": ..., "p90_s": ..., "prepare_s": ...},
        ...
      ],
      "embedding": {"tokens": [1, 16, ...], "median_s": [...]},
      "head": {"sampled_rows": [1, 4, 16, 64], "median_s": [...], "p10_s": [...],
               "p90_s": [...]},
      "activation_bytes_per_token": 2304,
      "prefill_split": {"tokens": 512, "sequences": [1, 4, 16, 64], "median_s": [...]},
      "decode_context": "max",
      "link": {"bandwidth_bytes_s": 2e9, "latency_s": 5e-5, "source": "measured gloo ..."},
      "notes": "..."
    }

What is measured (see conveyor/profile/measure.py):

- `samples`: one forward of a *middle* stage of `num_layers` decoder layers (hidden states in,
  hidden states out: no embedding, no LM head) for every grid point except the empty step
  (0 prefill, 0 decode). `median_s`, `p10_s`, `p90_s` summarise the repeats of that forward;
  `prepare_s` is the median host time to build the step's inputs (`StepBatch.build`: positions,
  slot mapping, block tables), which every stage pays once per step whatever its layer count.
  The prefill tokens are ONE sequence's chunk starting at position 0 (a fresh prompt: plain
  causal attention, no cached prefix); the decodes are `decode_tokens` sequences with
  `context_len` tokens cached each, one new token each. `context_len` therefore only affects
  the decodes: prefill-only points (decode 0) are measured once per prefill size and the same
  numbers are written for every context of the grid.
- `embedding`: the first stage's token embedding for a number of tokens.
- `head`: the last stage's final norm + LM head (+ float32 logits) + greedy sampling of
  `sampled_rows` rows.
- `activation_bytes_per_token`: hidden_size x dtype bytes, what a stage sends per token.
- `prefill_split` (optional): the same middle stage with `tokens` prefill tokens as 1, 4, ...
  fresh prompts of equal length. Only the attention differs between them (`tokens` x
  (n + 1) / 2 query-key pairs for prompts of n tokens), so the slope of time over pairs is
  the prefill attention's cost per pair.
- `decode_context` (optional, default mean): "max" when the measured attention backend pads a
  step's decodes to its longest context (the CPU backend does): a real micro-batch of mixed
  contexts then costs what the grid says at its longest one, and the cost model reads it there.
- `link` (optional): one-way time of a tensor between two stage processes, as
  latency_s + bytes / bandwidth_bytes_s. Without it, `DEFAULT_LINK` (CPU gloo on one host:
  2 GB/s, 50 us, an assumption) is used.

The cost model that reads a profile is `ProfileCostModel` (profile_model.py).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.costmodel import fresh_prefill_pairs
from common.model.shape import ModelShape

FORMAT = "conveyor-cost-profile"
VERSION = 1

DEFAULT_LINK = {"bandwidth_bytes_s": 2e9, "latency_s": 50e-6,
                "source": "assumed: CPU gloo between two processes on one host"}

SHAPE_CHECK_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                      "num_heads", "num_kv_heads", "head_dim", "attention_bias",
                      "tie_word_embeddings")
"""The ModelShape fields that change a step's cost; a profile of another shape is refused."""


class ProfileError(ValueError):
    """A cost profile that is missing, of another format version, malformed, or of another
    model than the caller expects."""


def shape_to_dict(shape: ModelShape) -> dict[str, Any]:
    data = dataclasses.asdict(shape)
    data["eos_token_ids"] = list(shape.eos_token_ids)
    return data


def shape_from_dict(data: dict[str, Any]) -> ModelShape:
    known = {f.name for f in dataclasses.fields(ModelShape)}
    values = {k: v for k, v in data.items() if k in known}
    if "eos_token_ids" in values:
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
    return ModelShape(**values)


@dataclass
class Sample:
    prefill_tokens: int
    decode_tokens: int
    context_len: int
    median_s: float
    p10_s: float
    p90_s: float
    prepare_s: float = 0.0


@dataclass
class Profile:
    """The contents of a profile file (see the module docstring for each field)."""

    model_name: str
    shape: ModelShape
    dtype: str
    device: dict[str, Any]
    num_layers: int
    prefill_axis: list[int]
    decode_axis: list[int]
    context_axis: list[int]
    samples: list[Sample]
    embedding_tokens: list[int]
    embedding_s: list[float]
    head_rows: list[int]
    head_s: list[float]
    activation_bytes_per_token: int
    head_p10_s: list[float] = field(default_factory=list)
    head_p90_s: list[float] = field(default_factory=list)
    link: dict[str, Any] | None = None
    prefill_split: dict[str, Any] | None = None
    decode_context: str = "mean"
    """"max" when the measured backend pads decodes to the longest context of the step
    (AttentionBackend.pads_decode_context): the grid is then read at the longest context."""
    source: str = ""
    load_format: str = "auto"
    torch_version: str = ""
    created: str = ""
    block_size: int = 16
    repeats: int = 0
    warmup: int = 0
    notes: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": {"name": self.model_name, "source": self.source,
                      "load_format": self.load_format, "shape": shape_to_dict(self.shape)},
            "dtype": self.dtype,
            "device": self.device,
            "torch_version": self.torch_version,
            "created": self.created,
            "block_size": self.block_size,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "num_layers": self.num_layers,
            "grid": {"prefill_tokens": self.prefill_axis, "decode_tokens": self.decode_axis,
                     "context_len": self.context_axis},
            "samples": [{k: _ns(v) for k, v in dataclasses.asdict(s).items()}
                        for s in self.samples],
            "embedding": {"tokens": self.embedding_tokens,
                          "median_s": [_ns(x) for x in self.embedding_s]},
            "head": {"sampled_rows": self.head_rows, "median_s": [_ns(x) for x in self.head_s],
                     "p10_s": [_ns(x) for x in self.head_p10_s],
                     "p90_s": [_ns(x) for x in self.head_p90_s]},
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "prefill_split": self.prefill_split,
            "decode_context": self.decode_context,
            "link": self.link,
            "notes": self.notes,
        }

    @classmethod
    def from_json(cls, data: Any, where: str = "profile") -> Profile:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ProfileError(f"{where} is not a Conveyor cost profile (no "
                               f"\"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ProfileError(f"{where} is cost-profile version {data.get('version')!r}; this "
                               f"Conveyor reads version {VERSION}: re-run `conveyor profile`")
        try:
            model, grid, head, emb = data["model"], data["grid"], data["head"], data["embedding"]
            profile = cls(
                model_name=model["name"], shape=shape_from_dict(model["shape"]),
                dtype=data["dtype"], device=dict(data["device"]),
                num_layers=int(data["num_layers"]),
                prefill_axis=[int(x) for x in grid["prefill_tokens"]],
                decode_axis=[int(x) for x in grid["decode_tokens"]],
                context_axis=[int(x) for x in grid["context_len"]],
                samples=[Sample(**s) for s in data["samples"]],
                embedding_tokens=[int(x) for x in emb["tokens"]],
                embedding_s=[float(x) for x in emb["median_s"]],
                head_rows=[int(x) for x in head["sampled_rows"]],
                head_s=[float(x) for x in head["median_s"]],
                head_p10_s=[float(x) for x in head.get("p10_s", [])],
                head_p90_s=[float(x) for x in head.get("p90_s", [])],
                activation_bytes_per_token=int(data["activation_bytes_per_token"]),
                link=data.get("link"), prefill_split=_split_table(data.get("prefill_split")),
                decode_context=_decode_context(data.get("decode_context", "mean")),
                source=model.get("source", ""),
                load_format=model.get("load_format", "auto"),
                torch_version=data.get("torch_version", ""), created=data.get("created", ""),
                block_size=int(data.get("block_size", 16)), repeats=int(data.get("repeats", 0)),
                warmup=int(data.get("warmup", 0)), notes=data.get("notes", ""))
        except (KeyError, TypeError, ValueError) as e:
            raise ProfileError(f"{where} is malformed: {type(e).__name__}: {e}") from None
        return profile

    def attention_pair_s(self) -> float:
        """Prefill attention seconds per query-key pair for `num_layers` layers: the slope of
        `prefill_split` over pairs (least squares, never negative); 0 without one."""
        split = self.prefill_split
        if not split or len(split["sequences"]) < 2:
            return 0.0
        tokens = split["tokens"]
        xs = [k * fresh_prefill_pairs(tokens // k) for k in split["sequences"]]
        ys = split["median_s"]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
        return max(slope, 0.0)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_dumps(self.to_json()) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Profile:
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"no cost profile at {path}: write one with `conveyor profile "
                               f"--out {path}` (or use the roofline cost model)")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ProfileError(f"cannot read cost profile {path}: {e}") from None
        return cls.from_json(data, where=str(path))

    def sample_at(self, prefill: int, decode: int, context: int) -> Sample | None:
        for s in self.samples:
            if (s.prefill_tokens, s.decode_tokens, s.context_len) == (prefill, decode, context):
                return s
        return None


def _decode_context(raw: Any) -> str:
    if raw not in ("mean", "max"):
        raise ValueError(f"decode_context must be mean or max, got {raw!r}")
    return raw


def _split_table(raw: Any) -> dict[str, Any] | None:
    """The optional prefill_split table, checked: equal-length prompts that divide `tokens`."""
    if raw is None:
        return None
    tokens = int(raw["tokens"])
    sequences = [int(k) for k in raw["sequences"]]
    median_s = [float(x) for x in raw["median_s"]]
    if len(sequences) != len(median_s) or any(k < 1 or tokens % k for k in sequences):
        raise ValueError(f"prefill_split: {len(sequences)} prompt counts that must divide "
                         f"{tokens} tokens, and {len(median_s)} times")
    return {"tokens": tokens, "sequences": sequences, "median_s": median_s}


def _ns(value: Any) -> Any:
    """Seconds rounded to the nanosecond for the file (ints, the grid coordinates, untouched)."""
    return round(value, 9) if isinstance(value, float) else value


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per flat object or list (a sample, an axis), nested ones indented."""
    def flat(v: Any) -> bool:
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        return not any(isinstance(x, (dict, list)) for x in items)

    if not isinstance(value, (dict, list)) or flat(value):
        return json.dumps(value)
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        body = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(body) + "\n" + " " * indent + "}"
    body = [pad + _dumps(v, indent + 1) for v in value]
    return "[\n" + ",\n".join(body) + "\n" + " " * indent + "]"


def check_shape(profile: Profile, expected: ModelShape, where: str = "profile") -> None:
    """Raises ProfileError when `profile` was measured on a model of another shape."""
    diffs = [f"{name} {getattr(profile.shape, name)} (expected {getattr(expected, name)})"
             for name in SHAPE_CHECK_FIELDS
             if getattr(profile.shape, name) != getattr(expected, name)]
    if diffs:
        raise ProfileError(f"{where} was measured on {profile.model_name} whose shape differs "
                           f"from {expected.name}: {', '.join(diffs)}")
