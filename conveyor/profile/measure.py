"""Times what one pipeline stage executes per step and writes it as a cost profile.

    profile = measure_profile(MeasureConfig(source="smollm2", stages=2), Reporter("profile"))
    profile.save("deploy/profiles/smollm2-135m-cpu.json")

Four measurements, each the median (and p10/p90) of `repeats` runs after `warmup` runs
(`torch.cuda.synchronize()` around each run on CUDA):

1. The decoder layers of a *middle* stage (hidden states in and out) over a grid of
   (prefill tokens, decode tokens, context length): the prefill tokens are one fresh prompt
   chunk starting at position 0, the decodes are that many sequences with `context_len` tokens
   cached each (a distinct set of KV blocks per sequence, as in a real cache, so that the
   attention reads really come from memory). The host time to build the step's inputs
   (`StepBatch.build`) is recorded apart (`prepare_s`), since it does not grow with the layers.
   Prefill-only points do not depend on the context: they are measured once per prefill size
   and copied along the context axis.
2. The first stage's embedding of a number of tokens.
3. The last stage's final norm + LM head + float32 logits + greedy sampling of 1..64 rows.
4. The largest prefill split into 1, 4, 16, 64 equal prompts: the prefill attention's cost
   (prefill_split.py).

CPU threads default to what a stage of a `stages`-way deployment gets (os.cpu_count() //
stages, at least 1), the dtype to float32 on CPU and bfloat16 on CUDA, as the stage workers do
(services/stage/devices.py). The layer count defaults to the first stage's share of a
`stages`-way split (the largest share). Weights come from `resolve_model` like a worker's, so a
named shape (e.g. llama3-8b) runs with dummy weights.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from common.costmodel.profile import DEFAULT_LINK, Profile, Sample
from common.costmodel.devices import device_for_gpu
from common.model import (PagedKVCache, SamplingSpec, SeqSpec, StageModel, StepBatch,
                          resolve_model, sample)
from common.model.dtypes import DTYPES, resolve_dtype
from common.model.placement import stage_layout
from common.model.source import DEFAULT_SOURCE, ModelSource
from conveyor.profile.prefill_split import DEFAULT_SPLITS, time_prefill_split
from conveyor.progress import Reporter

DEFAULT_PREFILL = (0, 16, 64, 256, 512)
DEFAULT_DECODE = (0, 1, 4, 16, 64)
DEFAULT_CONTEXT = (64, 512, 1536)
DEFAULT_HEAD_ROWS = (1, 4, 16, 64)

# The link assumed for a CUDA stage on a GPU that common/costmodel/roofline.py does not know
# (the known ones take its DEVICES figures; measuring needs two GPUs).
_UNKNOWN_GPU_LINK = (25e9, 20e-6, "PCIe Gen4 x16")


@dataclass
class MeasureConfig:
    source: str = DEFAULT_SOURCE
    load_format: str = "auto"
    stages: int = 2
    num_layers: int | None = None
    """Layers to time; None: stage `stage`'s share of the deployment's split (`placement`)."""
    stage: int = 0
    placement: Any = None
    """The deployment's placement settings (a common.placement_config.PlacementConfig: split,
    devices, HELR's settings); None: the defaults (balanced). `stages` 0 follows its
    devices."""
    device: str = "cpu"
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (float32 on CPU, bfloat16 on CUDA)."""
    threads: int | None = None
    """CPU threads; None: os.cpu_count() // stages (at least 1)."""
    prefill: list[int] = field(default_factory=lambda: list(DEFAULT_PREFILL))
    decode: list[int] = field(default_factory=lambda: list(DEFAULT_DECODE))
    context: list[int] = field(default_factory=lambda: list(DEFAULT_CONTEXT))
    head_rows: list[int] = field(default_factory=lambda: list(DEFAULT_HEAD_ROWS))
    prefill_splits: tuple[int, ...] = DEFAULT_SPLITS
    """The largest prefill is also timed as that many equal prompts (prefill_split.py)."""
    repeats: int = 5
    warmup: int = 1
    block_size: int = 16
    link: str = "auto"
    """measure (gloo ping-pong, CPU), assume (documented defaults), or auto (measure on CPU)."""
    seed: int = 0
    attention: str = "auto"
    """Attention backend (common/model/attention.py): auto, sdpa or flex, as model.attention."""

    def validate(self) -> None:
        for name in ("prefill", "decode", "context", "head_rows"):
            values = getattr(self, name)
            if not values or min(values) < 0:
                raise ValueError(f"{name} needs at least one value, all >= 0: {values}")
            setattr(self, name, sorted(set(values)))
        if max(self.prefill) == 0 and max(self.decode) == 0:
            raise ValueError("the grid has no step with tokens (prefill and decode are all 0)")
        if min(self.head_rows) < 1:
            raise ValueError(f"head rows must be >= 1: {self.head_rows}")
        if self.repeats < 1 or self.warmup < 0 or self.block_size < 1:
            raise ValueError("repeats and block size must be >= 1, warmup >= 0")
        problems = self.placement_config().problems(self.stages, "stages")
        if problems:
            raise ValueError(problems[0])
        if self.stage < 0:
            raise ValueError(f"stage must be >= 0, got {self.stage}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"layers must be >= 1, got {self.num_layers}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}")
        if self.link not in ("auto", "measure", "assume"):
            raise ValueError(f"link must be auto, measure or assume, got {self.link!r}")

    def placement_config(self) -> Any:
        from common.placement_config import PlacementConfig

        return self.placement or PlacementConfig()

    def stage_bounds(self, shape: Any) -> tuple[int, int]:
        """Stage `stage`'s layers as the deployment's workers place them (stage_layout)."""
        layout = stage_layout(shape, self.placement_config(), self.stages, self.dtype)
        if self.stage >= layout.num_stages:
            raise ValueError(f"stage {self.stage} is outside the {layout.num_stages}-stage "
                             f"placement {layout.counts}")
        return layout.bounds[self.stage]


def model_slug(source: str, load_format: str, src: ModelSource) -> str:
    """The model part of a profile's default file name: smollm2 -> smollm2-135m (its named
    shape), a named shape -> its name, a file -> its name lowercased with dashes."""
    if source == DEFAULT_SOURCE:
        name = "smollm2-135m"
    else:
        name = src.display_name.removesuffix(" (dummy)")
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")
    if load_format == "dummy" and src.kind == "dummy" and src.path is not None:
        slug += "-dummy"
    return slug


def default_out_path(model: str, device: str) -> str:
    return f"deploy/profiles/{model}-{device.split(':')[0]}.json"


def default_threads(stages: int) -> int:
    return max(1, (os.cpu_count() or 1) // stages)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_device(device: torch.device, threads: int) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device),
                "cuda_version": torch.version.cuda, "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": cpu_name(), "threads": threads,
            "cpu_count": os.cpu_count(), "platform": platform.platform()}


def _stats(samples: list[float]) -> tuple[float, float, float]:
    p10, p90 = np.percentile(samples, [10, 90])
    return statistics.median(samples), float(p10), float(p90)


class _Timer:
    def __init__(self, device: torch.device, repeats: int, warmup: int):
        self.cuda = device.type == "cuda"
        self.device = device
        self.repeats, self.warmup = repeats, warmup

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn: Callable[[], object]) -> list[float]:
        samples = []
        for i in range(self.warmup + self.repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            if i >= self.warmup:
                samples.append(time.perf_counter() - start)
        return samples


def _link(cfg: MeasureConfig, device: torch.device,
          progress: Callable[[str], None]) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = device_for_gpu(name)
        bandwidth, latency, what = ((spec.link_bandwidth, spec.link_latency_s,
                                     f"the {spec.name} link of roofline.DEVICES") if spec
                                    else _UNKNOWN_GPU_LINK)
        return {"bandwidth_bytes_s": bandwidth, "latency_s": latency,
                "source": f"assumed: {what} between two {name} (see common/costmodel/"
                          f"roofline.py)"}
    if cfg.link == "assume":
        return dict(DEFAULT_LINK)
    from conveyor.profile.link import measure_gloo_link

    progress("link: gloo ping-pong between two processes ...")
    try:
        return measure_gloo_link()
    except RuntimeError as e:
        if cfg.link == "measure":
            raise
        warnings.warn(f"link measurement failed ({e}); using the assumed defaults", stacklevel=2)
        return dict(DEFAULT_LINK)


@torch.inference_mode()
def measure_profile(cfg: MeasureConfig, progress: Reporter | None = None) -> Profile:
    """Runs every measurement of `cfg` and returns the profile (not yet written); `progress`
    says what it does, with a bar over the grid."""
    say = progress.say if progress is not None else (lambda _line: None)
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but no CUDA device is visible")
    dtype = resolve_dtype(cfg.dtype, device.type == "cuda")
    dtype_name = str(dtype).removeprefix("torch.")
    threads = cfg.threads or default_threads(cfg.stages or len(cfg.placement_config().devices))
    if device.type == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.cuda.set_device(device)

    src = resolve_model(cfg.source, cfg.load_format)
    shape = src.shape
    if cfg.num_layers is None:
        # The stage's share as the workers place layers (balanced by default).
        start, end = cfg.stage_bounds(shape)
        num_layers = end - start
    else:
        num_layers = cfg.num_layers
        if num_layers > shape.num_layers:
            raise ValueError(f"{src.display_name} has {shape.num_layers} layers, not "
                             f"{num_layers}")
    say(f"{src.display_name}: {num_layers} layers, {dtype_name} on {device}"
        + (f", {threads} thread(s)" if device.type == "cpu" else ""))

    t0 = time.perf_counter()
    # Middle stage: layers only. Any `num_layers` layers have the same shapes; the first ones
    # are loaded.
    model = StageModel.from_source(src, 0, num_layers, False, False, dtype, device, cfg.seed,
                                   attention=cfg.attention)
    decode_context = "max" if model.attention.pads_decode_context else "mean"
    bs = cfg.block_size
    prefill_blocks = -(-max(cfg.prefill) // bs)
    decode_blocks = -(-(max(cfg.context) + 1) // bs)
    num_blocks = max(1, prefill_blocks + max(cfg.decode) * decode_blocks)
    kv = PagedKVCache.for_stage(shape, num_layers, num_blocks, bs, dtype, device)
    say(f"loaded in {time.perf_counter() - t0:.1f}s; KV cache {num_blocks} blocks "
        f"({kv.nbytes / 1024**3:.2f} GiB)")
    prefill_table = list(range(prefill_blocks))
    decode_tables = [list(range(prefill_blocks + i * decode_blocks,
                                prefill_blocks + (i + 1) * decode_blocks))
                     for i in range(max(cfg.decode))]
    timer = _Timer(device, cfg.repeats, cfg.warmup)

    def seqs_of(prefill: int, decode: int, context: int) -> list[SeqSpec]:
        seqs = [SeqSpec(0, prefill, prefill_table)] if prefill else []
        return seqs + [SeqSpec(context, 1, decode_tables[i]) for i in range(decode)]

    def time_point(prefill: int, decode: int, context: int) -> Sample:
        seqs = seqs_of(prefill, decode, context)
        x = torch.randn(prefill + decode, shape.hidden_size, dtype=dtype, device=device)
        prepare, forward = [], []
        for i in range(cfg.warmup + cfg.repeats):
            timer.sync()
            start = time.perf_counter()
            batch = StepBatch.build(seqs, bs, device)
            timer.sync()
            built = time.perf_counter()
            model(batch, kv, x)
            timer.sync()
            if i >= cfg.warmup:
                prepare.append(built - start)
                forward.append(time.perf_counter() - built)
        median, p10, p90 = _stats(forward)
        return Sample(prefill, decode, context, median, p10, p90, statistics.median(prepare))

    points = [(p, d) for p in cfg.prefill for d in cfg.decode if p + d > 0]
    # One throwaway step first: the first forward pays for lazy initialisation.
    p0, d0 = points[0]
    model(StepBatch.build(seqs_of(p0, d0, cfg.context[0]), bs, device), kv,
          torch.randn(p0 + d0, shape.hidden_size, dtype=dtype, device=device))

    total = sum(1 if d == 0 else len(cfg.context) for p, d in points)
    samples: list[Sample] = []
    done = 0
    t_grid = time.perf_counter()
    bar = progress.steps(total, "grid", "point") if progress is not None else None
    for p, d in points:
        for c in (cfg.context[:1] if d == 0 else cfg.context):
            s = time_point(p, d, c)
            done += 1
            say(f"[{done}/{total}] prefill {p:4d} decode {d:3d} "
                + (f"context {c:5d}" if d else "(any context)")
                + f": {s.median_s * 1e3:9.3f} ms  (p10 {s.p10_s * 1e3:.3f}, "
                  f"p90 {s.p90_s * 1e3:.3f}, prepare {s.prepare_s * 1e3:.3f})")
            if bar is not None:
                bar.update()
            if d == 0:
                samples.extend(Sample(p, 0, cc, s.median_s, s.p10_s, s.p90_s, s.prepare_s)
                               for cc in cfg.context)
            else:
                samples.append(s)
    if bar is not None:
        bar.close()
    say(f"grid done in {time.perf_counter() - t_grid:.1f}s")
    split = time_prefill_split(model, kv, shape.hidden_size, max(cfg.prefill),
                               cfg.prefill_splits, timer, say)
    model = kv = None  # free the slice before loading the ends (closures above hold names only)

    # The ends of the model: embedding (first stage), norm + LM head + sampling (last stage).
    ends = StageModel.from_source(src, 0, 1, True, True, dtype, device, cfg.seed)
    assert ends.embed_tokens is not None and ends.norm is not None and ends.lm_head is not None
    embed_tokens = sorted({1, *(t for t in (16, 64, 256) if t <= max(cfg.prefill) + max(
        cfg.decode)), max(cfg.prefill) + max(cfg.decode)})
    embedding_s = []
    for n in embed_tokens:
        ids = torch.randint(0, shape.vocab_size, (n,), device=device)
        seconds = statistics.median(timer(lambda ids=ids: ends.embed_tokens(ids)))
        embedding_s.append(seconds)
        say(f"embedding {n:4d} tokens: {seconds * 1e3:9.3f} ms")
    head_s, head_p10, head_p90 = [], [], []
    for rows in cfg.head_rows:
        h = torch.randn(rows, shape.hidden_size, dtype=dtype, device=device)
        index = torch.arange(rows, device=device)
        specs = [SamplingSpec(0.0)] * rows

        def head(h=h, index=index, specs=specs) -> list[int]:
            logits = ends.lm_head(ends.norm(h[index])).float()
            return sample(logits, specs)

        median, p10, p90 = _stats(timer(head))
        head_s.append(median)
        head_p10.append(p10)
        head_p90.append(p90)
        say(f"norm + LM head + greedy sampling, {rows:3d} rows: {median * 1e3:9.3f} ms")
    ends = None  # free the ends before timing the link

    link = _link(cfg, device, say)
    if "measured" in str(link.get("source", "")):
        say(f"link: {link['bandwidth_bytes_s'] / 1e9:.2f} GB/s, "
            f"{link['latency_s'] * 1e6:.1f} us latency")

    return Profile(
        model_name=model_slug(cfg.source, cfg.load_format, src), shape=shape, dtype=dtype_name,
        device=describe_device(device, threads), num_layers=num_layers,
        prefill_axis=list(cfg.prefill), decode_axis=list(cfg.decode),
        context_axis=list(cfg.context), samples=samples, embedding_tokens=embed_tokens,
        embedding_s=embedding_s, head_rows=list(cfg.head_rows), head_s=head_s,
        head_p10_s=head_p10, head_p90_s=head_p90,
        activation_bytes_per_token=shape.hidden_size * dtype.itemsize, link=link,
        prefill_split=split,
        decode_context=decode_context,
        source=cfg.source, load_format=cfg.load_format, torch_version=torch.__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        block_size=bs, repeats=cfg.repeats, warmup=cfg.warmup,
        notes=f"measured by `conveyor profile` in {time.perf_counter() - t0:.0f}s; prefill "
              f"chunks start at position 0; greedy sampling")
