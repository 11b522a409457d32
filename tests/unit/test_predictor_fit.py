"""`conveyor predictor fit`: a predictor warm-started from ShareGPT is written where the
deployment's controller loads it, and predicts held-out conversations better than a fresh one."""

from __future__ import annotations

import msgspec
import pytest
from typer.testing import CliRunner

from common.config import ConveyorConfig
from common.prediction import OnlineLengthPredictor
from common.prediction.accuracy import figures
from conveyor.bench.datasets import load_bench_tokenizer
from conveyor.cli.app import app
from conveyor.predictor_fit import sharegpt_records
from services.controller.prediction import ControllerLengths

TRAIN, HELD_OUT = 1500, 300


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The run directory a fit wrote into, with the command's output."""
    run_dir = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(app, [
        "predictor", "fit", "--num", str(TRAIN), "--holdout", str(HELD_OUT), "--no-progress",
        "--set", f"endpoints.run_dir={run_dir}"])
    assert result.exit_code == 0, result.output
    return run_dir, result.output


def test_a_fitted_state_loads_in_a_fresh_controller_and_predicts_better(fitted):
    run_dir, output = fitted
    assert (run_dir / "length_predictor.npz").exists()
    assert f"wrote {run_dir / 'length_predictor.npz'}: {TRAIN} requests learned" in output
    cfg = ConveyorConfig()
    cfg = msgspec.structs.replace(cfg, endpoints=msgspec.structs.replace(
        cfg.endpoints, run_dir=str(run_dir)))
    controller = ControllerLengths(cfg)  # what the controller builds at start
    loaded = controller.lengths.predictor
    assert loaded.seen == TRAIN
    # The held-out conversations: the first HELD_OUT of the same shuffle, never learned from.
    test = sharegpt_records(load_bench_tokenizer("smollm2"), HELD_OUT, seed=0)
    truth = [r.output_len for r in test]
    warm = figures([loaded.predict(len(r.prompt_ids), r.prompt_ids).median for r in test],
                   truth)
    fresh = figures([OnlineLengthPredictor().predict(len(r.prompt_ids), r.prompt_ids).median
                     for r in test], truth)
    assert warm["mae_log"] < fresh["mae_log"] - 0.15
    assert warm["within_2x"] > fresh["within_2x"] + 0.15
    assert warm["kendall_tau"] > 0.1  # it ranks; a fresh one predicts one length for all
    assert "held-out accuracy (300 conversations)" in output


def test_bad_options_are_refused_with_their_name(tmp_path):
    bad = CliRunner().invoke(app, ["predictor", "fit", "--dataset", "alpaca",
                                   "--out", str(tmp_path / "s.npz")])
    assert bad.exit_code == 2 and "--dataset" in bad.output and "sharegpt" in bad.output
    none = CliRunner().invoke(app, ["predictor", "fit", "--set", 'predictor.state_file="none"'])
    assert none.exit_code == 1 and "give --out" in none.output
    assert not list(tmp_path.iterdir())
