"""The decode-graph path of the stage worker through a real 2-stage deployment on CPU:
`model.cuda_graphs = eager` runs every decode-only micro-batch through the graphs' fixed
buffers (common/model/decode_graphs.py) exactly as a captured graph would, without the capture
(which needs CUDA: tests/unit/test_gpu_path.py). Greedy output still equals transformers'
token for token, while requests of very different lengths decode side by side in micro-batches
padded up to the graph sizes (2, 4 and 8 here), the padding rows writing to the scratch block
that each stage holds beyond the pool it reports."""

from __future__ import annotations

import asyncio

import pytest
import torch

from common.log import read_json_events
from conveyor.client import AsyncClient
from conveyor.local_deployment import start_deployment, stop_deployment
from tests.e2e import reference
from tests.e2e.test_reference import PROMPTS as REFERENCE_PROMPTS

pytestmark = pytest.mark.slow

MAX_NEW = 16
POOL = 128
PROMPTS = [*REFERENCE_PROMPTS[:3],
           [{"role": "user", "content": "Name three colours."}],
           [{"role": "user", "content": "Count from one to ten in words."}]]
"""Five requests of about 30 to 250 tokens: prefilled within a few micro-batches, then
decoding together (two micro-batches in flight, so 2 or 3 decodes each, padded to 4)."""
SETS = ("model.attention=flex", "model.cuda_graphs=eager", "model.graph_sizes=[2, 4, 8]",
        f"kvcache.num_blocks={POOL}", "scheduler.max_num_batched_tokens=64",
        "logging.format=json")


async def _generate_all(address: str) -> list:
    async with AsyncClient(address, timeout=300) as client:
        return await asyncio.gather(*(
            client.generate(messages=m, max_tokens=MAX_NEW, temperature=0) for m in PROMPTS))


def test_greedy_through_the_decode_graph_buffers_equals_transformers():
    prompts = [reference.chat_ids(m) for m in PROMPTS]
    want = [reference.greedy(p, MAX_NEW) for p in prompts]
    dep = start_deployment(stages=2, sets=SETS)
    try:
        results = asyncio.run(_generate_all(dep.address))
        pools = dep.wait_kv_free()
    finally:
        code = stop_deployment(dep)
    assert code == 0, dep.log_tail()
    for prompt, ref, got in zip(prompts, want, results):
        assert got.token_ids == ref, f"diverged for a {len(prompt)}-token prompt"
    # The scratch block is the stages' own: the pool holds exactly the configured blocks, and
    # every one of them came back.
    assert pools[0].total_blocks == pools[0].free_blocks == POOL
    events = list(read_json_events(dep.log_path))
    ready = [e for e in events if e.get("event") == "decode graphs ready"]
    assert sorted(e["stage"] for e in ready) == [0, 1]
    assert all(e["sizes"] == [2, 4, 8] and e["captured"] is False for e in ready)
    stopped = {e["stage"]: e for e in events if e.get("event") == "stopped" and "stage" in e}
    for stage in (0, 1):
        # Decode-only micro-batches went through the graph buffers, several decodes at a time
        # in some, and some of them padded.
        steps, decodes = stopped[stage]["graph_steps"], stopped[stage]["graph_decodes"]
        assert steps >= MAX_NEW and decodes > steps, stopped[stage]
        assert stopped[stage]["graph_padding_rows"] > 0, stopped[stage]
    assert stopped[0]["graph_steps"] == stopped[1]["graph_steps"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="graphs can be captured here")
def test_graphs_on_without_cuda_stop_the_stage_saying_why():
    """`model.cuda_graphs = on` where the device resolves to the CPU (deployment.device auto,
    no CUDA): configuration cannot know it, the stage does, and fails at start naming why."""
    with pytest.raises(RuntimeError, match="model.cuda_graphs = on needs CUDA, and this stage "
                                           "runs on cpu"):
        dep = start_deployment(stages=1, sets=("model.source=tiny", "model.load_format=dummy",
                                                "model.attention=flex", "model.cuda_graphs=on",
                                                "deployment.stage_restarts=0"))
        stop_deployment(dep)
