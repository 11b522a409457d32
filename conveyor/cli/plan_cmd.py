"""`conveyor plan`: where a model's layers go on a list of devices (HELR, or the even and the
balanced split to compare), with each stage's memory and predicted step time. It computes the
very layout the stage workers, the profiler and the simulator use (common/model/placement.py's
`stage_layout`), from a deployment config or a cluster file and the options."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from common.placement_config import HelrConfig, PlacementConfig, field_help
from conveyor.cli.params import comma_list

GIB = 1024**3


def _fail(message: str) -> None:
    typer.secho(f"conveyor plan: error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


class PlanInputs:
    """What the plan needs, from a deployment config (model.source) or a cluster file
    (model.shape): the shape, the [model] section, the stage count and the memory rule."""

    def __init__(self, config: Optional[Path], overrides: dict[str, Any],
                 shortcuts: dict[str, Any]):
        """shortcuts: the command's options (model, devices, objective, placement, stages),
        over the file and `overrides` (--set)."""
        from common.config import ConfigError, read_settings

        try:
            raw = read_settings(config)
            self.cluster_file = "cluster" in raw or "shape" in raw.get("model", {})
            section = "cluster" if self.cluster_file else "deployment"
            keys = {"model": "model.shape" if self.cluster_file else "model.source",
                    "devices": "model.devices", "objective": "model.helr.objective",
                    "placement": "model.placement", "stages": f"{section}.stages"}
            overrides.update({keys[k]: v for k, v in shortcuts.items() if v is not None})
            raw = read_settings(config, overrides)
        except ConfigError as e:
            _fail(str(e))
        self.stages_key = f"{section}.stages"
        if not raw.get("model", {}).get("devices"):
            _fail("no devices to plan for: give --devices (e.g. h100,h100,a100) or "
                  "model.devices")
        # Unless told otherwise, plan by HELR and let it choose the stage count.
        raw.setdefault("model", {}).setdefault("placement", "helr")
        raw.setdefault(section, {}).setdefault("stages", 0)
        if self.cluster_file:
            self._from_cluster(raw)
        else:
            self._from_deployment(raw)

    def _from_cluster(self, raw: dict[str, Any]) -> None:
        from conveyor.sim.cluster import ClusterError, build_cluster

        try:
            cfg = build_cluster(raw)  # validates the whole file, as `conveyor simulate` would
        except ClusterError as e:
            _fail(str(e))
        import msgspec

        from conveyor.sim.cluster_file import ClusterFile

        f = msgspec.convert(raw, ClusterFile)
        self.shape, self.model, self.stages = cfg.shape, f.model, f.cluster.stages
        self.dtype, self.block_size = f.model.dtype, f.kvcache.block_size
        self.utilization = f.kvcache.gpu_memory_utilization
        self.link = (f.link.bandwidth_gbps * 1e9, f.link.latency_us * 1e-6)

    def _from_deployment(self, raw: dict[str, Any]) -> None:
        import msgspec

        from common.config import ConfigError, ConveyorConfig
        from common.model.source import resolve_model

        try:
            cfg = msgspec.convert(raw, ConveyorConfig).validate()
        except msgspec.ValidationError as e:
            _fail(f"invalid configuration: {e}")
        except ConfigError as e:
            _fail(str(e))
        try:
            self.shape = resolve_model(cfg.model.source, cfg.model.load_format).shape
        except ValueError as e:
            _fail(str(e))
        self.model, self.stages = cfg.model, cfg.deployment.stages
        self.dtype, self.block_size = cfg.model.dtype, cfg.kvcache.block_size
        self.utilization = cfg.kvcache.gpu_memory_utilization
        self.link = (0.0, 0.0)


def _placement_doc(name: str, p: Any, devices: list[str]) -> dict[str, Any]:
    return {"placement": name, "devices": [devices[d] for d in p.devices],
            "layers": list(p.layers), "stage_ms": [s * 1e3 for s in p.stage_s],
            "hop_ms": [h * 1e3 for h in p.hop_s], "bottleneck_ms": p.bottleneck_s * 1e3,
            "sum_ms": p.latency_s * 1e3}


def build_plan(inputs: PlanInputs) -> dict[str, Any]:
    """The plan as a document (what --json prints); ValueError when it cannot be made."""
    from common.model.helr import evaluate
    from common.model.placement import (balanced_layer_split, device_planner, split_layers,
                                        stage_layout)

    m, shape = inputs.model, inputs.shape
    link = inputs.link
    layout = stage_layout(shape, m, inputs.stages, inputs.dtype, inputs.utilization, *link,
                          stages_key=inputs.stages_key)
    planner = device_planner(shape, m, inputs.dtype, inputs.utilization, *link)
    chosen = evaluate(planner.device_costs(), layout.device_index, layout.counts)
    rows = planner.stage_rows(chosen, inputs.block_size)
    h = m.helr
    n = len(m.devices)
    compare = {"helr": planner.place_helr()}
    if n <= shape.num_layers:  # a stage on every device
        compare["balanced"] = planner.on_every_device(balanced_layer_split(shape, n,
                                                                           m.head_weight))
        compare["even"] = planner.on_every_device(
            [end - start for start, end in split_layers(shape.num_layers, n)])
    objective = h.objective
    return {
        "model": shape.name, "num_layers": shape.num_layers,
        "dtype_bytes": planner.dtype_bytes, "devices": list(m.devices),
        "placement": m.placement, "objective": objective,
        "stages": layout.num_stages, "stages_key": inputs.stages_key,
        "reference": {"prefill_tokens": h.prefill_tokens, "decode_tokens": h.decode_tokens,
                      "context_len": h.context_len, "kv_reserve_tokens": planner.reserve_tokens},
        "block_size": inputs.block_size, "gpu_memory_utilization": inputs.utilization,
        "stage_rows": [{"stage": i, "device": r.device, "device_index": r.device_index,
                        "layers": [r.start, r.end], "num_layers": r.end - r.start,
                        "weights_gib": r.weight_bytes / GIB, "kv_reserve_gib": r.reserve_bytes / GIB,
                        "available_gib": r.available_bytes / GIB, "kv_blocks": r.kv_blocks,
                        "step_ms": r.step_s * 1e3, "hop_ms": r.hop_s * 1e3}
                       for i, r in enumerate(rows)],
        "bottleneck_ms": chosen.bottleneck_s * 1e3, "sum_ms": chosen.latency_s * 1e3,
        "objective_ms": (chosen.bottleneck_s if objective == "bottleneck"
                         else chosen.latency_s) * 1e3,
        "compare": [_placement_doc(name, p, list(m.devices)) for name, p in compare.items()],
    }


def format_plan(doc: dict[str, Any]) -> str:
    ref = doc["reference"]
    used = [r["device"] for r in doc["stage_rows"]]
    lines = [
        f"{doc['model']}: {doc['num_layers']} layers, {doc['dtype_bytes']}-byte weights, on "
        f"{', '.join(doc['devices'])} (placement {doc['placement']}, objective "
        f"{doc['objective']})",
        f"reference micro-batch: {ref['prefill_tokens']} prefill tokens + "
        f"{ref['decode_tokens']} decodes at context {ref['context_len']}; KV reserve "
        f"{ref['kv_reserve_tokens']} tokens per stage",
        f"{doc['stages']} stage(s) on {', '.join(used)} ({doc['stages_key']} = "
        f"{doc['stages']})",
        "",
        "| stage | device | layers | weights + KV reserve / available (GiB) | KV blocks "
        "| step (ms) | hop (ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc["stage_rows"]:
        lines.append(
            f"| {r['stage']} | {r['device']} (#{r['device_index']}) | {r['layers'][0]}-"
            f"{r['layers'][1] - 1} ({r['num_layers']}) | {r['weights_gib']:.2f} + "
            f"{r['kv_reserve_gib']:.2f} / {r['available_gib']:.2f} | {r['kv_blocks']} | "
            f"{r['step_ms']:.3f} | {r['hop_ms']:.3f} |")
    lines += ["", f"objective ({doc['objective']}): {doc['objective_ms']:.3f} ms "
                  f"(bottleneck {doc['bottleneck_ms']:.3f} ms, sum {doc['sum_ms']:.3f} ms)",
              "", "the same devices and reference micro-batch, by placement:",
              "| placement | devices | layers | stage times (ms) | bottleneck (ms) | sum (ms) |",
              "|---|---|---|---|---|---|"]
    for c in doc["compare"]:
        lines.append(f"| {c['placement']} | {', '.join(c['devices'])} | "
                     f"{'+'.join(map(str, c['layers']))} | "
                     f"{', '.join(f'{s:.3f}' for s in c['stage_ms'])} | "
                     f"{c['bottleneck_ms']:.3f} | {c['sum_ms']:.3f} |")
    return "\n".join(lines)


def plan(
    model: Optional[str] = typer.Option(None, help="smollm2 (default), a .gguf file, a Hugging "
                                        "Face folder, or a named shape (llama3-8b, "
                                        "llama3-70b, qwen2.5-14b, qwen2.5-32b); a cluster "
                                        "file's model.shape."),
    devices: Optional[str] = typer.Option(None, help="Comma-separated, as model.devices: "
                                          + field_help(PlacementConfig, "devices") + "."),
    objective: Optional[str] = typer.Option(None, help=field_help(HelrConfig, "objective")
                                            + " (model.helr.objective; default bottleneck)."),
    placement: Optional[str] = typer.Option(None, help=field_help(PlacementConfig, "placement")
                                            + " (model.placement; default here: helr)."),
    stages: Optional[int] = typer.Option(None, min=0, help="The deployment's stage count "
                                         "(default 0: as many as the placement uses; another "
                                         "figure must agree with it)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", exists=True, dir_okay=False,
                                          help="A deployment config or a cluster file "
                                               "(deploy/clusters/): its [model] and memory "
                                               "settings; the options above override it."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, section.key=value, "
                                   "e.g. model.helr.decode_tokens=256 or "
                                   "kvcache.gpu_memory_utilization=0.85."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
) -> None:
    """Place a model's layers on a list of devices and print each stage's layers, device,
    memory and predicted step time, and the objective, beside the even and balanced splits.
    Stage times are the roofline's for a reference micro-batch (model.helr)."""
    from common.config import ConfigError, parse_override

    try:
        overrides = dict(parse_override(s) for s in set_)
    except ConfigError as e:
        _fail(str(e))
    device_list = None if devices is None else comma_list(devices, "--devices")
    inputs = PlanInputs(config, overrides, {"model": model, "devices": device_list,
                                            "objective": objective, "placement": placement,
                                            "stages": stages})
    try:
        doc = build_plan(inputs)
    except ValueError as e:
        _fail(str(e))
    typer.echo(json.dumps(doc, indent=2) if as_json else format_plan(doc))


def register(app: typer.Typer) -> None:
    app.command()(plan)
