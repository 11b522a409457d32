"""`conveyor serve --devices h100,a100 --placement helr` on this machine's CPU: the stage count
follows the placement, each stage worker loads the layers HELR gives it (19 + 11 for SmolLM2,
where the balanced split is 17 + 13), and the answers are transformers' greedy tokens."""

from __future__ import annotations

import re

import pytest

from common.model.placement import stage_layout
from common.model.source import resolve_model
from common.placement_config import PlacementConfig
from tests.e2e import reference

DEVICES = ["h100", "a100"]


@pytest.mark.parametrize("deployment", [{"stages": 0, "sets": (
    f"model.devices={DEVICES!r}".replace("'", '"'), 'model.placement="helr"')}],
    indirect=True, ids=["helr-h100-a100"])
def test_a_helr_deployment_serves_on_helrs_split(deployment):
    shape = resolve_model("smollm2").shape
    layout = stage_layout(shape, PlacementConfig(placement="helr", devices=DEVICES), 0)
    assert layout.counts == [19, 11]
    assert stage_layout(shape, PlacementConfig(), 2).counts == [17, 13]  # not the default's
    assert deployment.config().deployment.stages == 2  # resolved from 0 for every process
    loaded = {}
    for line in deployment.log_path.read_text().splitlines():
        found = re.search(r"stage 0\.(\d).*model slice loaded.*layers=(\d+)\.\.(\d+)", line)
        if found:
            loaded[int(found[1])] = (int(found[2]), int(found[3]) + 1)
    assert [loaded[s] for s in sorted(loaded)] == list(layout.bounds)
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    prompt = reference.chat_ids(messages)
    with deployment.client(timeout=120) as client:
        got = client.generate(messages=messages, max_tokens=16, temperature=0)
    assert got.token_ids == reference.greedy(prompt, 16)
