"""The controller's predictor: loaded from and saved to the run directory, so what it learned
survives a restart; off and "none" keep nothing."""

from __future__ import annotations

import msgspec

from common.config import ConveyorConfig
from common.instance import CoreRequest, Finish
from services.controller.prediction import ControllerLengths


def config(run_dir, **predictor) -> ConveyorConfig:
    cfg = ConveyorConfig()
    return msgspec.structs.replace(
        cfg, endpoints=msgspec.structs.replace(cfg.endpoints, run_dir=str(run_dir)),
        predictor=msgspec.structs.replace(cfg.predictor, **predictor))


def serve_one(c: ControllerLengths, out: int) -> CoreRequest:
    req = CoreRequest(1, 0.0, 8, 512, 2048, prompt_token_ids=[5, 6, 7, 8, 9, 10, 11, 12])
    c.lengths.admit(req)
    req.out, req.finish = out, Finish.STOP
    c.lengths.finished(req)
    c.learned()
    return req


def test_what_it_learned_survives_a_restart(tmp_path):
    c = ControllerLengths(config(tmp_path, save_every=10))
    for _ in range(25):
        serve_one(c, 20)
    assert (tmp_path / "length_predictor.npz").exists()  # saved at 10 and 20
    c.save()  # at exit: all 25
    again = ControllerLengths(config(tmp_path))
    assert again.lengths.predictor.seen == 25
    assert serve_one(again, 20).predicted_output < 60  # not the prior's 128


def test_off_and_none_keep_nothing(tmp_path):
    assert ControllerLengths(config(tmp_path, mode="off")).lengths is None
    c = ControllerLengths(config(tmp_path, state_file="none", save_every=1))
    serve_one(c, 20)
    c.save()
    assert not list(tmp_path.iterdir())
