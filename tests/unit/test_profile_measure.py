"""A real (tiny) measurement: the `tiny` shape with dummy weights, 2 layers, a 2x2x1 grid, one
repeat, written and read back through ProfileCostModel; and the CLI on the same."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from common.costmodel import StepCost
from common.costmodel.profile_model import ProfileCostModel
from common.model import NAMED_SHAPES
from conveyor.cli.app import app
from conveyor.progress import Reporter
from conveyor.profile.measure import (MeasureConfig, default_out_path, measure_profile,
                                      model_slug)

TINY = NAMED_SHAPES["tiny"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> MeasureConfig:
    values = dict(source="tiny", num_layers=2, prefill=[0, 16], decode=[0, 4], context=[64],
                  head_rows=[1, 4], repeats=1, threads=1, link="assume")
    values.update(overrides)
    return MeasureConfig(**values)


def test_tiny_measurement_round_trip(tmp_path, capsys):
    profile = measure_profile(tiny_config(), progress=Reporter("profile", enabled=False))
    path = profile.save(tmp_path / "tiny.json")
    lines = capsys.readouterr().err.splitlines()
    assert sum("profile: [" in line for line in lines) == 3  # a line per grid point
    assert any("profile: [3/3] prefill" in line for line in lines)

    model = ProfileCostModel.load(path, shape=TINY)
    p = model.profile
    assert (p.num_layers, p.dtype, p.device["type"], p.device["threads"]) == (2, "float32",
                                                                            "cpu", 1)
    assert p.activation_bytes_per_token == TINY.hidden_size * 4
    assert {(s.prefill_tokens, s.decode_tokens) for s in p.samples} == {(0, 4), (16, 0),
                                                                        (16, 4)}
    for s in p.samples:
        assert 0 < s.p10_s <= s.median_s <= s.p90_s and s.prepare_s > 0
    assert min(p.embedding_s) > 0 and min(p.head_s) > 0
    # The largest prefill (16) was also timed as 4 and 16 prompts (64 does not divide 16).
    assert p.prefill_split["tokens"] == 16 and p.prefill_split["sequences"] == [1, 4, 16]
    assert min(p.prefill_split["median_s"]) > 0 and p.attention_pair_s() >= 0
    assert p.decode_context == "max"  # the CPU backend pads a step's decodes to the longest

    def cost(prefill: int, decode: int, first: bool = False, last: bool = False) -> float:
        return model.stage_step_s(StepCost(prefill, decode, 64, decode, 2, first, last))

    for args in [(16, 0), (0, 4), (16, 4), (8, 2), (32, 8)]:
        assert cost(*args) > 0
    # At grid points the model gives what was measured (no timing is compared: this machine
    # is shared, and speed belongs in benchmarks).
    point = p.sample_at(16, 4, 64)
    assert cost(16, 4) == pytest.approx(point.median_s + point.prepare_s)
    assert cost(16, 4, first=True, last=True) > cost(16, 4)  # embedding and head added
    assert model.transfer_s(16) > 0


def test_cli_writes_the_profile_and_a_summary(tmp_path):
    out = tmp_path / "cli.json"
    result = CliRunner().invoke(app, [
        "profile", "--model", "tiny", "--layers", "1", "--prefill", "0,16", "--decode", "0,2",
        "--context", "32", "--head-rows", "1", "--repeats", "1", "--threads", "1",
        "--link", "assume", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    assert "decode step (ms)" in result.output and "prefill step (ms)" in result.output
    assert "16 tokens as 1 prompts" in result.output and "per query-key pair" in result.output
    data = json.loads(out.read_text())
    assert data["format"] == "conveyor-cost-profile" and data["num_layers"] == 1


def test_cli_rejects_a_bad_grid():
    result = CliRunner().invoke(app, ["profile", "--model", "tiny", "--prefill", "a,b"])
    assert result.exit_code != 0
    assert "--prefill" in result.output


def test_defaults():
    cfg = MeasureConfig()
    assert (cfg.source, cfg.stages, cfg.prefill, cfg.decode, cfg.context, cfg.repeats) == (
        "smollm2", 2, [0, 16, 64, 256, 512], [0, 1, 4, 16, 64], [64, 512, 1536], 5)
    from common.model import resolve_model

    assert model_slug("llama3-8b", "auto", resolve_model("llama3-8b")) == "llama3-8b"
    assert default_out_path("llama3-8b", "cuda:1") == "deploy/profiles/llama3-8b-cuda.json"
    with pytest.raises(ValueError, match="layers"):
        measure_profile(tiny_config(num_layers=9))


def test_a_decode_only_grid_has_no_prefill_split():
    profile = measure_profile(tiny_config(prefill=[0], decode=[0, 2]))
    assert profile.prefill_split is None and profile.attention_pair_s() == 0.0
