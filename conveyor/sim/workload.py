"""What the simulated cluster is asked to serve: arrival times and prompt/output lengths.

* `sharegpt` and `random` take their lengths from `conveyor bench`'s own samplers
  (conveyor/bench/datasets.py) and their send times from its arrival process
  (conveyor/bench/arrivals.py), with the same seeds, so a simulation and a benchmark of the same
  options see the same requests. ShareGPT lengths are counted once with the tokenizer and
  cached (~/.cache/conveyor); asking for more requests than the dataset holds draws the extra
  ones at random from its length distribution (the first ones are still bench's, in order).
  `random` with very many long prompts draws its lengths from the same uniform ranges without
  making the token ids (bench's sampler makes every id, which only a real server needs).
* `trace` replays a file: JSON lines of {"arrival_s", "prompt_len", "output_len"} and an
  optional "max_tokens" (the client's cap; output_len is then where the request emits EOS), or a
  `conveyor bench` result JSON (its per-request records: start_s, prompt_len,
  expected_output_len).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.scheduling.types import SLO

WORKLOADS = ("sharegpt", "random", "trace")
RANDOM_EXACT_TOKEN_LIMIT = 2_000_000
"""Up to this many prompt tokens in all, `random` calls bench's sampler itself (same lengths as
bench, id draws included); above, it draws only the lengths."""


class WorkloadError(ValueError):
    pass


@dataclass
class Workload:
    arrival_s: list[float]
    prompt_len: list[int]
    output_len: list[int]
    """Where each request truly ends (its EOS)."""
    description: dict[str, Any] = field(default_factory=dict)
    max_tokens: list[int] | None = None
    """Each request's cap as its client sets it; None: bench's default, the output length
    with EOS ignored (so every request ends at its cap)."""
    slo: SLO | None = None
    """The latency target every request carries (bench's --slo sends it with each)."""
    slos: list[SLO | None] | None = None
    """Per request, its own target instead (a mix of SLO classes); None: `slo` for all."""

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if not (len(self.prompt_len) == len(self.output_len) == n):
            raise WorkloadError("arrival_s, prompt_len and output_len differ in length")
        if self.max_tokens is not None and len(self.max_tokens) != n:
            raise WorkloadError("max_tokens and arrival_s differ in length")
        if self.slos is not None and len(self.slos) != n:
            raise WorkloadError("slos and arrival_s differ in length")
        if any(b < a for a, b in zip(self.arrival_s, self.arrival_s[1:])):
            order = sorted(range(n), key=self.arrival_s.__getitem__)
            self.arrival_s = [self.arrival_s[i] for i in order]
            self.prompt_len = [self.prompt_len[i] for i in order]
            self.output_len = [self.output_len[i] for i in order]
            if self.max_tokens is not None:
                self.max_tokens = [self.max_tokens[i] for i in order]
            if self.slos is not None:
                self.slos = [self.slos[i] for i in order]

    def with_slo(self, slo: SLO | None) -> "Workload":
        return dataclasses.replace(self, slo=slo)

    def with_slo_mix(self, classes: list[tuple[SLO, float]], seed: int = 0) -> "Workload":
        """Each request given one of `classes` at random, by weight (seeded)."""
        rng = random.Random(seed)
        slos, weights = [c for c, _ in classes], [w for _, w in classes]
        return dataclasses.replace(self, slos=rng.choices(slos, weights, k=len(self)))

    def slo_of(self, i: int) -> SLO | None:
        return self.slos[i] if self.slos is not None else self.slo

    def with_max_tokens(self, cap: int | None) -> "Workload":
        """The same requests sent by a client that caps every one at `cap` tokens and stops
        at EOS (None: bench's default, the output length with EOS ignored)."""
        if cap is not None and cap < 1:
            raise WorkloadError("max_tokens must be >= 1")
        caps = None if cap is None else [cap] * len(self)
        return Workload(list(self.arrival_s), list(self.prompt_len), list(self.output_len),
                        {**self.description, "max_tokens": cap if cap else "output length"},
                        caps, self.slo, self.slos)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @classmethod
    def from_lengths(cls, lengths: list[tuple[int, int]], arrivals: list[float],
                     **description: Any) -> "Workload":
        return cls(list(arrivals), [p for p, _ in lengths], [o for _, o in lengths],
                   dict(description))

    def at_rate(self, request_rate: float, burstiness: float = 1.0, seed: int = 0
                ) -> "Workload":
        """The same requests sent at another rate: bench's arrival times for it, the lengths
        kept (what make_workload gives for that rate, without sampling the lengths again)."""
        from conveyor.bench.arrivals import arrival_times

        times = arrival_times(len(self), request_rate, burstiness, seed)
        return Workload(list(times), list(self.prompt_len), list(self.output_len),
                        {**self.description, "request_rate": request_rate,
                         "burstiness": burstiness, "seed": seed},
                        None if self.max_tokens is None else list(self.max_tokens), self.slo,
                        self.slos)

    def summary(self) -> dict[str, Any]:
        n = len(self)
        return {**self.description, "num_requests": n,
                "mean_prompt_len": float(np.mean(self.prompt_len)) if n else 0.0,
                "mean_output_len": float(np.mean(self.output_len)) if n else 0.0,
                "last_arrival_s": self.arrival_s[-1] if n else 0.0}


# ---- ShareGPT -----------------------------------------------------------------------------------

def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "conveyor"


def sharegpt_pair_lengths(tokenizer: str | None = "smollm2", path: Path | None = None,
                          say=None) -> list[tuple[int, int]]:
    """(prompt tokens, reply tokens) of every ShareGPT pair, in file order, as bench counts
    them (`tokenizer` None: bench's 4-characters-a-token estimate). Counted once, then read
    from a cache keyed by the file and the tokenizer."""
    from conveyor.bench import datasets as ds

    try:
        path = path or ds.sharegpt_path()
    except ValueError as e:
        raise WorkloadError(str(e)) from None
    st = path.stat()
    key = hashlib.sha1(f"{path}|{st.st_size}|{st.st_mtime_ns}|{tokenizer}".encode()).hexdigest()
    cache = _cache_dir() / f"sharegpt-lengths-{key[:16]}.json"
    try:
        return [tuple(x) for x in json.loads(cache.read_text())]
    except (OSError, ValueError):
        pass
    tok = None
    if tokenizer:
        if say:
            say(f"counting ShareGPT tokens with the {tokenizer} tokenizer (once; cached)")
        tok = ds.load_bench_tokenizer(tokenizer)
    count_prompt, count_reply = ds._counter(tok, True), ds._counter(tok, False)
    pairs = list(ds.sharegpt_pairs(path))
    lengths: list[tuple[int, int]] = []
    for start in range(0, len(pairs), 256):
        chunk = pairs[start:start + 256]
        lengths += zip(count_prompt([p for p, _ in chunk]), count_reply([c for _, c in chunk]))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(lengths))
        tmp.replace(cache)
    except OSError:
        pass
    return lengths


def sharegpt_lengths(n: int, seed: int = 0, max_len: int = 2048, tokenizer: str | None = "smollm2",
                     pairs: list[tuple[int, int]] | None = None, say=None
                     ) -> list[tuple[int, int]]:
    """`n` (prompt, output) lengths: bench's `sample_shargpt` choice (shuffle with `seed`, skip
    pairs under 4 tokens or over `max_len`), then, past the end of the dataset, draws with
    replacement from those lengths."""
    from conveyor.bench.datasets import MIN_SHAREGPT_TOKENS

    pairs = list(pairs if pairs is not None else sharegpt_pair_lengths(tokenizer, say=say))
    random.Random(seed).shuffle(pairs)  # the same permutation bench applies to the texts
    ok = [(p, o) for p, o in pairs
          if p >= MIN_SHAREGPT_TOKENS and o >= MIN_SHAREGPT_TOKENS and p + o <= max_len]
    if not ok:
        raise WorkloadError("no ShareGPT conversation fits the length filters")
    if n <= len(ok):
        return ok[:n]
    rng = np.random.default_rng(seed)
    extra = rng.integers(0, len(ok), size=n - len(ok))
    return ok + [ok[i] for i in extra.tolist()]


# ---- random -------------------------------------------------------------------------------------

def random_lengths(n: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[tuple[int, int]]:
    """bench's `random` lengths (uniform in [len*(1-r), len*(1+r)])."""
    from conveyor.bench import datasets as ds

    if n * input_len * (1 + range_ratio) <= RANDOM_EXACT_TOKEN_LIMIT:
        try:
            samples = ds.sample_random(n, input_len, output_len, range_ratio, None, seed, "ids")
        except ValueError as e:
            raise WorkloadError(str(e)) from None
        return [(s.prompt_len, s.output_len) for s in samples]
    if input_len < 1 or output_len < 1 or not 0.0 <= range_ratio < 1.0:
        raise WorkloadError("random lengths must be >= 1 and the range ratio in [0, 1)")
    rng = random.Random(seed)
    in_lo, in_hi = ds.length_range(input_len, range_ratio)
    out_lo, out_hi = ds.length_range(output_len, range_ratio)
    return [(rng.randint(in_lo, in_hi), rng.randint(out_lo, out_hi)) for _ in range(n)]


# ---- traces -------------------------------------------------------------------------------------

def load_trace(path: str | Path, num_prompts: int | None = None) -> Workload:
    """A recorded trace: JSON lines {"arrival_s", "prompt_len", "output_len"} (extra keys are
    ignored), or a `conveyor bench` result JSON with its per-request records."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise WorkloadError(f"cannot read trace {p}: {e.strerror}") from None
    rows: list[tuple[float, int, int]] = []
    try:
        data = json.loads(text)  # one document: a bench result, or a list of records
    except ValueError:
        data = None  # JSON lines
    if isinstance(data, list) or (isinstance(data, dict) and "requests" in data):
        records = data["requests"] if isinstance(data, dict) else data
        if not isinstance(records, list):
            raise WorkloadError(f"{p}: a JSON trace needs a list of requests")
        for i, rec in enumerate(records):
            rows.append(_row(rec, f"{p} request {i}"))
        return _finish_trace(rows, p, num_prompts)
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise WorkloadError(f"{p}:{lineno}: not JSON: {e}") from None
        rows.append(_row(rec, f"{p}:{lineno}"))
    return _finish_trace(rows, p, num_prompts)


def _row(rec: Any, where: str) -> tuple[float, int, int, int | None]:
    if not isinstance(rec, dict):
        raise WorkloadError(f"{where}: expected an object")
    arrival = rec.get("arrival_s", rec.get("start_s"))
    prompt = rec.get("prompt_len")
    output = rec.get("output_len", rec.get("expected_output_len"))
    try:
        arrival, prompt, output = float(arrival), int(prompt), int(output)
    except (TypeError, ValueError):
        raise WorkloadError(f"{where}: needs numeric arrival_s (or start_s), prompt_len and "
                            f"output_len (or expected_output_len)") from None
    if not math.isfinite(arrival) or arrival < 0 or prompt < 1 or output < 1:
        raise WorkloadError(f"{where}: arrival_s must be >= 0 and lengths >= 1")
    cap = rec.get("max_tokens")
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
        raise WorkloadError(f"{where}: max_tokens must be an integer >= 1")
    return arrival, prompt, output, cap


def _finish_trace(rows: list[tuple[float, int, int, int | None]], p: Path, n: int | None
                  ) -> Workload:
    """A trace's requests from its first arrival on. A row with max_tokens is a client's cap
    with EOS at output_len; rows without one (bench results, whose requests ignore EOS) are
    capped at their output length."""
    if not rows:
        raise WorkloadError(f"{p}: the trace holds no requests")
    rows.sort(key=lambda r: r[0])
    if n is not None:
        rows = rows[:n]
    t0 = rows[0][0]
    caps = None
    if any(r[3] is not None for r in rows):
        caps = [r[2] if r[3] is None else r[3] for r in rows]
    return Workload([r[0] - t0 for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                    {"workload": "trace", "trace": str(p)}, caps)


def save_trace(workload: Workload, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w") as f:
        caps = workload.max_tokens or [None] * len(workload)
        for a, pl, ol, cap in zip(workload.arrival_s, workload.prompt_len, workload.output_len,
                                  caps):
            rec = {"arrival_s": a, "prompt_len": pl, "output_len": ol}
            if cap is not None:
                rec["max_tokens"] = cap
            f.write(json.dumps(rec) + "\n")
    return p


# ---- one entry point ----------------------------------------------------------------------------

def make_workload(kind: str, num_prompts: int, request_rate: float = math.inf,
                  burstiness: float = 1.0, seed: int = 0, trace: str | Path | None = None,
                  sharegpt_max_len: int = 2048, tokenizer: str | None = "smollm2",
                  random_input_len: int = 1024, random_output_len: int = 128,
                  random_range_ratio: float = 0.0, say=None) -> Workload:
    if kind == "trace":
        if not trace:
            raise WorkloadError("--workload trace needs --trace FILE")
        return load_trace(trace, num_prompts)
    if kind == "sharegpt":
        lengths = sharegpt_lengths(num_prompts, seed, sharegpt_max_len, tokenizer, say=say)
        desc = {"workload": "sharegpt", "sharegpt_max_len": sharegpt_max_len,
                "tokenizer": tokenizer or "estimate"}
    elif kind == "random":
        lengths = random_lengths(num_prompts, random_input_len, random_output_len,
                                 random_range_ratio, seed)
        desc = {"workload": "random", "random_input_len": random_input_len,
                "random_output_len": random_output_len, "random_range_ratio": random_range_ratio}
    else:
        raise WorkloadError(f"unknown workload {kind!r} ({', '.join(WORKLOADS)})")
    from conveyor.bench.arrivals import arrival_times  # bench's send times, exactly

    times = arrival_times(len(lengths), request_rate, burstiness, seed)
    return Workload.from_lengths(lengths, times, **desc, request_rate=request_rate,
                                 burstiness=burstiness, seed=seed)
