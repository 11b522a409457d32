"""An analytical cost model from FLOPs and bytes (a roofline), for devices with no profile.

For one stage step of P prefill tokens whose causal attention spans Q query-key pairs
(`StepCost.prefill_pairs`: P (P + 1) / 2 for one fresh prompt chunk, far fewer for many short
prompts) and D decode tokens with a mean of C cached tokens each, T = P + D, per decoder layer
(b = dtype bytes, params = ModelShape.layer_param_count()):

    FLOPs  = 2 * params * T                               (every matmul, 2 FLOPs per MAC)
           + 4 * q_size * D * C                           (decode QK^T and PV over the cache)
           + 4 * q_size * Q                               (prefill QK^T and PV, 4 FLOPs a pair)
    bytes  = params * b                                   (weights, read once per step)
           + D * C * kv_size * 2 * b                      (K and V read by the decodes)
           + T * kv_size * 2 * b                          (the step's new K and V written)
           + T * 2 * (4 * hidden + 2 * q_size + 2 * kv_size + 3 * intermediate) * b
                                                          (activations: each intermediate of
                                                           the layer written once, read once)

and for the ends of the model: the first stage gathers T embedding rows (T * hidden * b read
and written); the last stage runs the LM head on the sampled rows R (vocab * hidden * b weight
bytes, 2 * vocab * hidden * R FLOPs, R * vocab * 4 * 2 bytes of float32 logits written and read
by the sampler). Then

    stage_step_s = max(FLOPs / (peak_flops * mfu), bytes / (memory_bandwidth * mbu))
                   + step_overhead_s

    transfer_s(n) = link_latency_s + n * hidden * b / link_bandwidth_bytes_s

Mixed lengths (`mixed_length_penalty`, default 1: off): GPU decode attention over a batch of
very different context lengths runs slower than its FLOPs and bytes say (the longest
sequences' thread blocks straggle; CascadeInfer's motivation measures 1.1-2.1x slower
attention for mixed-length batches). With a penalty x, the decode attention terms (its FLOPs
and its K/V reads) are multiplied by 1 + (x - 1) * (1 - C / Cmax), C the decodes' mean
context and Cmax their longest (StepCost.max_context_len): 1 for equal lengths, x when one
context dwarfs the rest. The shape of that curve is Conveyor's assumption, the range of x the
paper's, until a GPU profile measures it.

`mfu` and `mbu` (model FLOPs / memory-bandwidth utilisation) are the fractions of the peaks a
real kernel reaches; the defaults (0.6, 0.8) are typical of well-tuned serving engines on
Hopper GEMMs and decode-attention kernels. `step_overhead_s` (default 100 us) stands for the
host work and kernel launches of one step without CUDA graphs.

Device figures (`DEVICES`, with their sources): common/costmodel/devices.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.costmodel import StepCost, fresh_prefill_pairs
from common.costmodel.devices import DEVICES, DeviceSpec, device_for_gpu  # noqa: F401 (re-exported)
from common.model.shape import ModelShape


@dataclass(frozen=True)
class StepBreakdown:
    flops: float
    bytes: float
    compute_s: float
    """flops / (peak_flops * mfu)"""
    memory_s: float
    """bytes / (memory_bandwidth * mbu)"""
    overhead_s: float

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s


class RooflineCostModel:
    """`CostModel` of `shape` on a named device (or a DeviceSpec), from FLOPs and bytes."""

    def __init__(self, shape: ModelShape, device: str | DeviceSpec = "h100", dtype_bytes: int = 2,
                 mfu: float = 0.6, mbu: float = 0.8, step_overhead_s: float = 100e-6,
                 peak_flops: float | None = None, memory_bandwidth: float | None = None,
                 link_bandwidth: float | None = None, link_latency_s: float | None = None,
                 mixed_length_penalty: float = 1.0):
        if isinstance(device, str):
            if device not in DEVICES:
                raise ValueError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
            device = DEVICES[device]
        if not (0 < mfu <= 1 and 0 < mbu <= 1):
            raise ValueError(f"mfu and mbu must be in (0, 1], got {mfu} and {mbu}")
        if mixed_length_penalty < 1:
            raise ValueError(f"mixed_length_penalty must be >= 1, got {mixed_length_penalty}")
        if dtype_bytes < 1:
            raise ValueError(f"dtype_bytes must be >= 1, got {dtype_bytes}")
        self.shape = shape
        self.device = device
        self.dtype_bytes = dtype_bytes
        self.mfu, self.mbu = mfu, mbu
        self.step_overhead_s = step_overhead_s
        self.mixed_length_penalty = mixed_length_penalty
        self.reads_longest_context = mixed_length_penalty > 1
        """The simulator passes the decodes' longest context (StepTimer)."""
        self.peak_flops = peak_flops or device.peak_flops(dtype_bytes)
        self.memory_bandwidth = memory_bandwidth or device.memory_bandwidth
        self.link_bandwidth = link_bandwidth or device.link_bandwidth
        self.link_latency_s = device.link_latency_s if link_latency_s is None else link_latency_s

    def mixed_factor(self, context_len: float, max_context_len: float | None) -> float:
        """The decode attention's slowdown for mixed lengths (module docstring)."""
        x = self.mixed_length_penalty
        if x <= 1 or not max_context_len or max_context_len <= context_len:
            return 1.0
        return 1.0 + (x - 1.0) * (1.0 - context_len / max_context_len)

    def layer_flops_bytes(self, prefill_tokens: float, decode_tokens: float,
                          context_len: float, prefill_pairs: float | None = None,
                          max_context_len: float | None = None) -> tuple[float, float]:
        """FLOPs and bytes of ONE decoder layer for the step (prefill_pairs None: one fresh
        chunk)."""
        s, b = self.shape, self.dtype_bytes
        p, d, c = prefill_tokens, decode_tokens, context_len
        t = p + d
        pairs = fresh_prefill_pairs(p) if prefill_pairs is None else prefill_pairs
        params = s.layer_param_count()
        mixed = self.mixed_factor(c, max_context_len) if d else 1.0
        flops = 2 * params * t + 4 * s.q_size * d * c * mixed + 4 * s.q_size * pairs
        per_token_act = 2 * (4 * s.hidden_size + 2 * s.q_size + 2 * s.kv_size
                             + 3 * s.intermediate_size)
        nbytes = (params * b + d * c * s.kv_size * 2 * b * mixed + t * s.kv_size * 2 * b
                  + t * per_token_act * b)
        return flops, nbytes

    def breakdown(self, step: StepCost) -> StepBreakdown:
        s, b = self.shape, self.dtype_bytes
        t = step.prefill_tokens + step.decode_tokens
        if t <= 0:
            return StepBreakdown(0.0, 0.0, 0.0, 0.0, 0.0)
        flops, nbytes = self.layer_flops_bytes(step.prefill_tokens, step.decode_tokens,
                                               step.context_len, step.prefill_pairs,
                                               step.max_context_len)
        flops, nbytes = flops * step.num_layers, nbytes * step.num_layers
        if step.first_stage:
            nbytes += 2 * t * s.hidden_size * b
        if step.last_stage and step.sampled_rows > 0:
            r = step.sampled_rows
            flops += 2 * s.vocab_size * s.hidden_size * r
            nbytes += s.vocab_size * s.hidden_size * b + r * s.vocab_size * 4 * 2
        return StepBreakdown(flops, nbytes, flops / (self.peak_flops * self.mfu),
                             nbytes / (self.memory_bandwidth * self.mbu), self.step_overhead_s)

    def stage_step_s(self, step: StepCost) -> float:
        return self.breakdown(step).total_s

    def transfer_s(self, num_tokens: int) -> float:
        if num_tokens <= 0:
            return 0.0
        nbytes = num_tokens * self.shape.hidden_size * self.dtype_bytes
        return self.link_latency_s + nbytes / self.link_bandwidth
