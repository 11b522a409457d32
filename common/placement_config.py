"""The placement settings a served model and a simulated one share (`[model]` of a deployment
config and of a cluster file): the context limit, how the layers are split over the stages,
and, for HELR, the devices a pipeline has and what the placement program optimises.

Stage count: with `model.devices` the devices decide it. Even, balanced and explicit splits use
every device listed; HELR may leave some out when the pipeline is faster without them. The
stage count of the deployment (`deployment.stages`, a cluster's `cluster.stages`) is then 0 —
"as many as the placement uses", filled in when the config is resolved — or must equal it;
any other figure is refused, naming both (common/model/placement.py, `stage_layout`).

Torch-free (the device table it checks names against is too), like common/config.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta
from common.config_section import Section


class HelrConfig(Section):
    """`[model.helr]`: what HELR's placement program (common/model/helr.py) optimises. Stage
    times are the roofline's (common/costmodel/roofline.py) for one reference micro-batch on
    each device; memory is each device's, less the KV reserve."""

    objective: Annotated[Literal["bottleneck", "sum"], Meta(
        description="bottleneck: the slowest stage or link (the pipeline's pace, for "
                    "throughput); sum: stages and links added up (one micro-batch's way "
                    "through, for latency)")] = "bottleneck"
    prefill_tokens: Annotated[int, Meta(ge=0, description="prefill tokens of the reference "
                                        "micro-batch the stages are timed on")] = 512
    decode_tokens: Annotated[int, Meta(ge=0, description="decodes of the reference "
                                       "micro-batch")] = 128
    context_len: Annotated[int, Meta(ge=0, description="tokens cached per decode of the "
                                     "reference micro-batch")] = 1024
    kv_reserve_tokens: Annotated[int, Meta(ge=0, description="tokens of KV every stage must "
                                           "hold for its layers beside its weights; 0: "
                                           "decode_tokens x max_model_len")] = 0

    def problems(self) -> list[str]:
        if self.prefill_tokens + self.decode_tokens < 1:
            return ["model.helr: the reference micro-batch needs prefill_tokens or "
                    "decode_tokens >= 1"]
        return []

    def reserve_tokens(self, max_model_len: int) -> int:
        return self.kv_reserve_tokens or self.decode_tokens * max_model_len


class PlacementConfig(Section):
    """What a served model and a simulated one share: the context limit and the split of the
    layers over the stages (the cluster file's [model] extends it too)."""

    max_model_len: int = 2048
    """Longest sequence (prompt + output) a request may reach, in tokens."""
    layer_split: list[int] = []
    """Layers per stage, e.g. [17, 13]; empty lets `placement` choose."""
    placement: Annotated[Literal["balanced", "even", "helr"], Meta(
        description="how layers are split when layer_split is empty: balanced counts the LM "
                    "head of the last stage as extra layers and balances stage cost on "
                    "identical devices; even splits by layer count; helr places them on "
                    "model.devices by HELR's program (which may use fewer devices)")
    ] = "balanced"
    head_weight: float = 0.5
    """balanced placement: the share of the LM head's full decode cost to plan for (1.0 when
    every token samples, ~0 for prefill-only work)."""
    devices: Annotated[list[str], Meta(
        description="one instance's devices in pipeline (link) order, by name: h100, "
                    "h100-pcie, h200, a100, or name:GIB for another memory size; stage s runs "
                    "on the placement's s-th device. Empty: identical devices")] = []
    helr: HelrConfig = msgspec.field(default_factory=HelrConfig)

    def problems(self, stages: int, stages_key: str) -> list[str]:
        problems = [message for ok, message in [
            (self.placement != "helr" or bool(self.devices), "model.placement = helr needs "
                                                             "model.devices, e.g. [\"h100\", "
                                                             "\"h100\", \"a100\"]"),
            (self.max_model_len >= 16, "model.max_model_len must be >= 16"),
            (0.0 <= self.head_weight <= 1.0, "model.head_weight must be in [0, 1]"),
            (all(n >= 1 for n in self.layer_split), "model.layer_split entries must be >= 1"),
            (stages >= 0, f"{stages_key} must be >= 1 (or 0 to follow model.devices)"),
            (stages != 0 or bool(self.devices), f"{stages_key} must be >= 1 (0, as many "
                                                f"stages as the placement uses, needs "
                                                f"model.devices)"),
        ] if not ok]
        problems += self.helr.problems()
        if not self.devices:
            problems += [message for ok, message in [
                (not self.layer_split or len(self.layer_split) == stages,
                 f"model.layer_split has {len(self.layer_split)} entries but {stages_key} is "
                 f"{stages}"),
            ] if not ok]
            return problems
        from common.costmodel.devices import parse_devices

        try:
            parse_devices(self.devices)
        except ValueError as e:
            problems.append(f"model.devices: {e}")
        n = len(self.devices)
        if self.layer_split and self.placement == "helr":
            problems.append("model.layer_split fixes the split and model.placement = helr "
                            "chooses one: give one of them")
        elif self.layer_split and len(self.layer_split) != n:
            problems.append(f"model.layer_split has {len(self.layer_split)} entries but "
                            f"model.devices names {n} devices (one stage on each)")
        if self.placement != "helr" and stages not in (0, n):
            problems.append(f"{stages_key} is {stages} but model.devices names {n} devices: "
                            f"the {'explicit' if self.layer_split else self.placement} split "
                            f"puts a stage on each (set {stages_key} = 0 to follow the devices)")
        if self.placement == "helr" and stages > n:
            problems.append(f"{stages_key} is {stages} but model.devices names only {n} "
                            f"devices (0: as many stages as HELR uses)")
        return problems


def field_help(struct: type, name: str) -> str:
    """The description of a field declared `Annotated[..., Meta(description=...)]`, for
    command-line help (one declaration for the config, its validation and the CLI)."""
    import typing

    hint = typing.get_type_hints(struct, include_extras=True)[name]
    metas: list[Any] = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Meta)]
    return metas[0].description if metas and metas[0].description else ""
