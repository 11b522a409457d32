"""The simulator's link model checked on a real link (network namespaces; run as root).

    .venv/bin/python scripts/link_model_check.py [--rates 1,10] [--delays 0.1,1,5] \
        [--num-prompts 24] [--out bench-results/link-model]

Hosts from tests/multihost/netns.py: control (kv-cache manager, controller, ingress), stage0,
stage1, client. For every link setting (the stage hosts' links shaped alike: `delay` one way
on what each sends, `rate` on it; delay needs sch_netem, which some kernels lack, and is then
reported as not measurable):

1. per-micro-batch activation transfer: stage0 hands tensors of a micro-batch's shape
   (tokens x hidden, the stages' dtype) to stage1 through the stages' own transport
   (services/stage/transport.py: gloo p2p), timed from the send to the receive's end (one
   clock: namespaces share CLOCK_MONOTONIC), median of `--repeats`; against the simulator's
   hop, latency + tokens x activation bytes / bandwidth (conveyor/sim/pipeline.py);
2. a short `conveyor bench` from the client host against a 2-stage SmolLM2 deployment over
   those links, against `conveyor simulate` of the same workload with the cluster file's
   [link] set to that delay and rate (deploy/clusters/default-cpu.toml, this VM's profile);
3. the same bench against the same config with every role on one host (loopback), first and
   last, so the link's cost is a ratio within one run.

Prints a Markdown table and writes every result JSON under --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, DTYPE_BYTES = 576, 4  # SmolLM2-135M in float32: 2304 activation bytes per token
TOKENS = (1, 16, 64, 256, 512)
CLUSTER = ROOT / "deploy" / "clusters" / "default-cpu.toml"
PROFILE = ROOT / "deploy" / "profiles" / "smollm2-135m-cpu.json"
PORT = 29700


def transfer_worker(rank: int, host: str, port: int, tokens: list[int], repeats: int) -> None:
    """One end of the transfer check (run in its host's namespace): rank 0 sends, rank 1
    receives; prints the send starts (rank 0) or receive ends (rank 1) as JSON."""
    import torch
    import torch.distributed as dist

    from services.stage.transport import ActivationLink

    link = ActivationLink(rank, 2, host, port, torch.device("cpu"))
    ready = torch.zeros(1)
    times: dict[int, list[float]] = {}
    for n in tokens:
        x = torch.randn(n, HIDDEN)
        for _ in range(repeats + 3):  # the first three warm the connection
            if rank == 0:
                dist.recv(ready, src=1)  # the receiver waits in recv
                t = time.monotonic()
                link.send(x)
                link.flush()
            else:
                dist.send(ready, dst=0)
                link.recv((n, HIDDEN), torch.float32)
                t = time.monotonic()
            times.setdefault(n, []).append(t)
    print(json.dumps({n: ts[3:] for n, ts in times.items()}))
    link.close()


def measure_transfer(net, repeats: int) -> dict[int, float]:
    """Median one-way transfer (s) per micro-batch size, stage0 -> stage1."""
    global PORT
    PORT += 1
    argv = lambda rank: [sys.executable, str(Path(__file__).resolve()), "--transfer-worker",  # noqa
                         str(rank), "stage0", str(PORT), ",".join(map(str, TOKENS)),
                         str(repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"rank{r}.out" for r in (0, 1)]
        procs = [net.popen(f"stage{r}", argv(r), outs[r], cwd=str(ROOT)) for r in (0, 1)]
        for p in procs:
            p.wait(300)
        sent, got = (json.loads(o.read_text().splitlines()[-1]) for o in outs)
    return {n: statistics.median(b - a for a, b in zip(sent[str(n)], got[str(n)]))
            for n in TOKENS}


def predicted_transfer(n: int, delay_ms: float, rate_gbit: float) -> float:
    """The simulator's hop for a link of that latency and rate (conveyor/sim/pipeline.py); an
    unshaped link: the profile's measured one (its cost model's transfer_s)."""
    if rate_gbit:
        return delay_ms * 1e-3 + n * HIDDEN * DTYPE_BYTES / (rate_gbit * 1e9 / 8)
    link = json.loads(PROFILE.read_text())["link"]
    return delay_ms * 1e-3 + link["latency_s"] + n * HIDDEN * DTYPE_BYTES / link[
        "bandwidth_bytes_s"]


def workload(args) -> list[str]:
    """The lengths and arrivals bench and simulate share (each adds its own --dataset or
    --workload random)."""
    return ["--random-input-len", str(args.input_len), "--random-output-len",
            str(args.output_len), "--num-prompts", str(args.num_prompts), "--request-rate",
            "inf", "--seed", "0"]


def bench(dep, out: Path, args) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "conveyor"), "bench", "--address", dep.address,
           "--dataset", "random", *workload(args), "--result-file", str(out), "--no-plots",
           "--no-progress"]
    done = dep.net.run("client", *cmd, check=False, timeout_s=600, cwd=str(ROOT))
    if done.returncode != 0:
        raise RuntimeError(f"bench failed: {done.stderr[-2000:]}\n{dep.tails()}")
    return json.loads(out.read_text())


def simulate(out: Path, delay_ms: float, rate_gbit: float, args) -> dict:
    # The cluster file's link.bandwidth_gbps is in gigaBYTES per second (cluster_file.py).
    cmd = [str(ROOT / ".venv" / "bin" / "conveyor"), "simulate", "--config", str(CLUSTER),
           "--profile", str(PROFILE), "--workload", "random", *workload(args),
           "--set", f"link.bandwidth_gbps={rate_gbit / 8}",
           "--set", f"link.latency_us={delay_ms * 1000}",
           "--result-file", str(out), "--no-plots", "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=str(ROOT), timeout=600)
    return json.loads(out.read_text())


def links(args) -> list[tuple[float, float]]:
    """Every (one-way delay ms, rate Gbit/s) of the grid; 0 and 0 is the unshaped veth."""
    rates = [0.0] + [float(r) for r in args.rates.split(",") if r]
    delays = [0.0] + [float(d) for d in args.delays.split(",") if d]
    return [(d, r) for d in delays for r in rates]


def label(delay_ms: float, rate_gbit: float) -> str:
    parts = ([f"{delay_ms:g} ms"] if delay_ms else []) + ([f"{rate_gbit:g} Gbit/s"]
                                                          if rate_gbit else [])
    return ", ".join(parts) or "veth, unshaped"


def figures(result: dict) -> tuple[float, float, float]:
    """Output tok/s, mean TTFT ms, mean TPOT ms of a bench or simulate result (one summary)."""
    s = result["summary"]
    return s["output_throughput"], 1e3 * s["ttft"]["mean"], 1e3 * s["tpot"]["mean"]


def row(name: str, got: dict, sim: dict | None, base: dict) -> str:
    (tok, ttft, tpot), base_tok = figures(got), figures(base)[0]
    s_tok, s_ttft, s_tpot = figures(sim) if sim else (None, None, None)
    cells = [name, f"{tok:.1f}", f"{s_tok:.1f}" if sim else "", f"{tok / base_tok:.3f}",
             f"{ttft:.0f}", f"{s_ttft:.0f}" if sim else "", f"{tpot:.1f}",
             f"{s_tpot:.1f}" if sim else ""]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="1,10", help="Gbit/s, comma-separated")
    ap.add_argument("--delays", default="0.1,1,5", help="one-way ms, comma-separated (netem)")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "link-model")
    ap.add_argument("--transfer-worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transfer_worker:
        rank, host, port, tokens, repeats = args.transfer_worker
        transfer_worker(int(rank), host, int(port), [int(t) for t in tokens.split(",")],
                        int(repeats))
        return

    from tests.multihost.hosts_deployment import HostsDeployment
    from tests.multihost.netns import Network, netem_available, unavailable_reason

    if unavailable_reason():
        sys.exit(f"link_model_check: {unavailable_reason()}")
    netem = netem_available()
    args.out.mkdir(parents=True, exist_ok=True)
    grid = links(args)
    settings = [(d, r) for d, r in grid if netem or not d]  # measurable here
    predicted_only = [link for link in grid if link not in settings]
    sets = {"http.enabled": False}
    benches: dict[str, dict] = {}
    transfers: dict[tuple[float, float], dict[int, float]] = {}

    def loopback(tag: str) -> None:
        with Network(["control", "client"], aliases={"control": ["stage0", "stage1"]}) as net:
            dep = HostsDeployment(net, Path(tempfile.mkdtemp(prefix="cvy-loop-")), 2, sets,
                                  one_host=True)
            dep.start_all()
            dep.wait_ready()
            benches[tag] = bench(dep, args.out / f"bench-{tag}.json", args)
            dep.stop()

    loopback("loopback-first")
    with Network(["control", "stage0", "stage1", "client"]) as net:
        for d, r in settings:
            for host in ("stage0", "stage1"):
                net.shape(host, delay_ms=d, rate_gbit=r)
            transfers[(d, r)] = measure_transfer(net, args.repeats)
        dep = HostsDeployment(net, Path(tempfile.mkdtemp(prefix="cvy-hosts-")), 2, sets)
        dep.start_all()
        dep.wait_ready()
        for d, r in settings:
            for host in ("stage0", "stage1"):
                net.shape(host, delay_ms=d, rate_gbit=r)
            benches[label(d, r)] = bench(dep, args.out / f"bench-{d:g}ms-{r:g}gbit.json",
                                         args)
        dep.stop()
    loopback("loopback-last")
    sims = {label(d, r): simulate(args.out / f"sim-{d:g}ms-{r:g}gbit.json", d, r, args)
            for d, r in grid}

    print(f"\nnetem: {'yes' if netem else 'no (delay not measurable on this kernel)'}\n")
    print("Per-micro-batch activation transfer stage0 -> stage1, median ms "
          "(measured / simulated):\n")
    print("| link | " + " | ".join(f"{n} tok ({n * HIDDEN * DTYPE_BYTES / 1024:.0f} KiB)"
                                   for n in TOKENS) + " |")
    print("|---|" + "---:|" * len(TOKENS))
    for (d, r), medians in transfers.items():
        print(f"| {label(d, r)} | " + " | ".join(
            f"{1e3 * medians[n]:.3f} / {1e3 * predicted_transfer(n, d, r):.3f}"
            for n in TOKENS) + " |")
    base = benches["loopback-first"]
    print("\nbench (output tok/s, mean TTFT ms, mean TPOT ms), measured and simulated; ratio: "
          "measured throughput / loopback (first):\n")
    print("| run | tok/s | sim tok/s | vs loopback | TTFT | sim TTFT | TPOT | sim TPOT |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(row("loopback (first)", base, None, base))
    for d, r in settings:
        print(row(label(d, r), benches[label(d, r)], sims[label(d, r)], base))
    print(row("loopback (last)", benches["loopback-last"], None, base))
    if predicted_only:
        print("\nSimulated only (this kernel cannot delay a link): output tok/s, mean TTFT ms, "
              "mean TPOT ms, and throughput against the unshaped link's simulation; transfer "
              "of a 512-token micro-batch:\n")
        print("| link | sim tok/s | vs unshaped | sim TTFT | sim TPOT | 512-tok hop ms |")
        print("|---|---:|---:|---:|---:|---:|")
        sim_base = figures(sims[label(0, 0)])[0]
        for d, r in predicted_only:
            tok, ttft, tpot = figures(sims[label(d, r)])
            print(f"| {label(d, r)} | {tok:.1f} | {tok / sim_base:.3f} | {ttft:.0f} | "
                  f"{tpot:.1f} | {1e3 * predicted_transfer(512, d, r):.3f} |")
    (args.out / "transfers.json").write_text(json.dumps(
        {label(d, r): m for (d, r), m in transfers.items()}, indent=1))


if __name__ == "__main__":
    main()
