"""`conveyor profile`: measure a stage's step costs on this machine into a cost profile (see
conveyor/profile and common/costmodel/profile.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from common.placement_config import HelrConfig, PlacementConfig, field_help
from conveyor.cli.params import bad, int_list, placement_option


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def _summary(profile) -> str:
    """Decode steps by context, prefill steps, and the ends of the model, in ms."""
    lines = [f"{profile.model_name}, {profile.num_layers} layers, {profile.dtype} on "
             f"{profile.device.get('name', profile.device.get('type'))}"
             + (f", {profile.device['threads']} thread(s)" if "threads" in profile.device
                else "")]
    contexts = profile.context_axis
    lines.append("decode step (ms)  " + "".join(f"{'ctx ' + str(c):>10}" for c in contexts))
    for d in profile.decode_axis:
        if d == 0:
            continue
        row = [profile.sample_at(0, d, c) for c in contexts]
        if all(row):
            lines.append(f"  {d:4d} decodes      " + "".join(
                f"{s.median_s * 1e3:10.2f}" for s in row))
    lines.append("prefill step (ms)")
    for p in profile.prefill_axis:
        s = profile.sample_at(p, 0, contexts[0]) if p and 0 in profile.decode_axis else None
        if s is not None:
            rate = s.prefill_tokens / s.median_s
            lines.append(f"  {p:4d} tokens  {_ms(s.median_s)}  ({rate:8.0f} tokens/s)")
    split = profile.prefill_split
    if split:
        lines.append(f"  {split['tokens']:4d} tokens as " + ", ".join(
            f"{k} prompts {t * 1e3:.2f}" for k, t in zip(split["sequences"], split["median_s"]))
            + f" ms: attention {profile.attention_pair_s() * 1e9:.2f} ns per query-key pair")
    emb = profile.embedding_s[-1] / profile.embedding_tokens[-1]
    lines.append(f"embedding: {emb * 1e6:.2f} us/token (at {profile.embedding_tokens[-1]} tokens)")
    lines.append("norm + LM head + sampling: " + ", ".join(
        f"{r} rows {s * 1e3:.2f} ms" for r, s in zip(profile.head_rows, profile.head_s)))
    link = profile.link or {}
    if link:
        lines.append(f"link: {link['bandwidth_bytes_s'] / 1e9:.2f} GB/s, "
                     f"{link['latency_s'] * 1e6:.1f} us ({link.get('source', '')})")
    return "\n".join(lines)


def profile(
    model: str = typer.Option("smollm2", help="smollm2 (default), a .gguf file, a Hugging Face "
                              "folder, or a named shape with dummy weights (e.g. llama3-8b)."),
    load_format: str = typer.Option("auto", help="auto, gguf, safetensors or dummy (random "
                                    "weights of the model's shape)."),
    stages: Optional[int] = typer.Option(None, min=0, help="Pipeline stages of the deployment "
                                         "to profile (default 2; with --devices, as many as "
                                         "the placement uses): sets the default layer count "
                                         "(one stage's share) and the default CPU threads "
                                         "(cpu_count // stages)."),
    layers: Optional[int] = typer.Option(None, min=1, help="Decoder layers to time (default: "
                                         "--stage's share of the deployment's split)."),
    stage: int = typer.Option(0, min=0, help="Whose share of the split to time by default."),
    placement: str = typer.Option("balanced", help=field_help(PlacementConfig, "placement")
                                  + " (as model.placement)."),
    devices: Optional[str] = typer.Option(None, help="Comma-separated, as model.devices: "
                                          + field_help(PlacementConfig, "devices") + "."),
    objective: str = typer.Option("bottleneck", help="helr: "
                                  + field_help(HelrConfig, "objective") + "."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, "
                              "bfloat16 or float16."),
    threads: Optional[int] = typer.Option(None, min=1, help="CPU threads (default: what a stage "
                                          "of a --stages deployment gets, cpu_count // stages)."),
    prefill: str = typer.Option("0,16,64,256,512", help="Grid: prefill tokens (one prompt "
                                "chunk starting at position 0), comma-separated."),
    decode: str = typer.Option("0,1,4,16,64", help="Grid: decode tokens (that many sequences, "
                               "one new token each), comma-separated."),
    context: str = typer.Option("64,512,1536", help="Grid: tokens cached per decode "
                                "sequence, comma-separated."),
    head_rows: str = typer.Option("1,4,16,64", help="Sampled rows at which the last stage's "
                                  "norm + LM head + sampling is timed."),
    repeats: int = typer.Option(5, min=1, help="Timed runs per point (median, p10, p90)."),
    warmup: int = typer.Option(1, min=0, help="Untimed runs before each point."),
    block_size: int = typer.Option(16, min=1, help="KV block size (tokens)."),
    link: str = typer.Option("auto", help="Stage-to-stage link: measure (gloo ping-pong between "
                             "two local processes), assume (2 GB/s, 50 us), or auto (measure on "
                             "CPU; CUDA always assumes NVLink/PCIe figures)."),
    seed: int = typer.Option(0, help="Seed of dummy weights."),
    attention: str = typer.Option("auto", help="Attention backend, as model.attention: auto, "
                                  "sdpa (gathered padded copy) or flex (paged, in place)."),
    out: Optional[Path] = typer.Option(None, help="Profile file to write (default: "
                                       "deploy/profiles/<model>-<device>.json)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="A bar over the "
                                  "grid on stderr (the lines of what is timed are kept)."),
) -> None:
    """Time a pipeline stage's step over a grid of batch compositions and write a cost
    profile (for ProfileCostModel and `conveyor simulate`)."""
    from conveyor.profile.measure import MeasureConfig, default_out_path, measure_profile
    from conveyor.progress import Reporter

    if link not in ("auto", "measure", "assume"):
        raise bad("--link", "one of auto, measure, assume")
    if attention not in ("auto", "sdpa", "flex"):
        raise bad("--attention", "one of auto, sdpa, flex")
    place = placement_option(placement, devices, objective)
    cfg = MeasureConfig(
        source=model, load_format=load_format,
        stages=(0 if place.devices else 2) if stages is None else stages, num_layers=layers,
        stage=stage, placement=place, device=device,
        dtype=dtype, threads=threads, prefill=int_list(prefill, "--prefill"),
        decode=int_list(decode, "--decode"), context=int_list(context, "--context"),
        head_rows=int_list(head_rows, "--head-rows"), repeats=repeats, warmup=warmup,
        block_size=block_size, link=link, seed=seed, attention=attention)
    try:
        start = time.perf_counter()
        result = measure_profile(cfg, Reporter("conveyor profile", progress))
    except (ValueError, RuntimeError) as e:
        typer.secho(f"conveyor: error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    path = out or Path(default_out_path(result.model_name, device))
    result.save(path)
    typer.echo(_summary(result))
    typer.echo(f"wrote {path} ({time.perf_counter() - start:.0f}s)")


def register(app: typer.Typer) -> None:
    app.command()(profile)
