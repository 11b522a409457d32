"""A sequence a stage cannot run fails alone (services/stage/isolation.py), on the tiny model's
two real stages: the other sequences of the micro-batch get exactly the tokens they get
without it, the failed one is named with its error, and the shapes passed between the stages
stay whole."""

from __future__ import annotations

import torch

from common.model import PagedKVCache, StageModel, resolve_model
from common.model.placement import split_layers
from common.wire.internal_messages import Chunk, SampleSpec, StepPlan
from services.stage.isolation import PLACEHOLDER_TOKEN, IsolatedStep

CPU = torch.device("cpu")
BLOCK = 4
POOL = 32
GREEDY = SampleSpec(0.0, 1.0, 0, None, 0)


class Pipeline:
    """The tiny model over two stages, each with its own cache and block tables, as two stage
    workers hold them."""

    def __init__(self):
        self.src = src = resolve_model("tiny")
        bounds = split_layers(src.shape.num_layers, 2)
        self.models = [StageModel.from_source(src, a, b, i == 0, i == 1, torch.float32, "cpu")
                       for i, (a, b) in enumerate(bounds)]
        self.caches = [PagedKVCache.for_stage(src.shape, b - a, POOL, BLOCK, torch.float32,
                                              "cpu") for a, b in bounds]
        self.tables: list[dict[int, list[int]]] = [{}, {}]

    def step(self, chunks: list[Chunk]) -> tuple[list[int], list[dict[int, str]]]:
        """(sampled tokens, each stage's failed requests)."""
        x, failed = None, []
        for s, model in enumerate(self.models):
            plan = StepPlan(1, [c if s == 0 else Chunk(c.req_id, c.start, c.num_new, [],
                                                       c.new_blocks, c.sample)
                                for c in chunks], [])
            work = IsolatedStep.prepare(plan, self.tables[s], POOL, s == 0, BLOCK, CPU)
            with torch.inference_mode():
                out, sampled = work.run(lambda b, inp, m=model, kv=self.caches[s]: m(b, kv, inp),
                                        x, s == 0, s == 1, self.src.shape.hidden_size,
                                        torch.float32)
            if s == 0:
                assert out.shape == (sum(c.num_new for c in chunks),
                                     self.src.shape.hidden_size)  # whole, failed rows too
            x = out
            failed.append(work.failed)
        return sampled, failed


def _prompt(req_id: int, ids: list[int], blocks: list[int]) -> Chunk:
    return Chunk(req_id, 0, len(ids), ids, blocks, GREEDY)


A, C = [11, 12, 13, 14, 15], [7, 8, 9]


def test_a_token_the_embedding_cannot_take_fails_its_request_alone():
    alone, _ = Pipeline().step([_prompt(1, A, [0, 1]), _prompt(3, C, [4])])
    bad = [5, 10**6, 6]  # beyond the vocabulary: the batched embedding raises
    sampled, failed = Pipeline().step([_prompt(1, A, [0, 1]), _prompt(2, bad, [2, 3]),
                                       _prompt(3, C, [4])])
    assert sampled == [alone[0], PLACEHOLDER_TOKEN, alone[1]]
    assert list(failed[0]) == [2] and "IndexError" in failed[0][2]
    assert failed[1] == {}  # stage 1 ran the zero rows it got for it


def test_a_chunk_a_stage_cannot_prepare_fails_alone_and_the_rest_decodes_on():
    pipe = Pipeline()
    first, _ = pipe.step([_prompt(1, A, [0, 1]), _prompt(3, C, [4])])
    ref = Pipeline()
    ref.step([_prompt(1, A, [0, 1])])
    want, _ = ref.step([Chunk(1, 5, 1, [first[0]], [], GREEDY)])
    sampled, failed = pipe.step([
        Chunk(1, 5, 1, [first[0]], [], GREEDY),  # decodes on
        Chunk(9, 4, 1, [3], [], GREEDY),  # continues a sequence no stage holds
        Chunk(3, 3, 1, [first[1]], [POOL + 5], GREEDY),  # a block beyond the pool
    ])
    assert sampled == [want[0], PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN]
    assert "holds no block table" in failed[0][9] and "outside this stage's pool" in failed[0][3]
    assert failed[1].keys() == {9, 3}  # every stage prepares, so every stage says so


def test_a_sampling_parameter_the_stage_refuses_fails_its_request_alone():
    ok, _ = Pipeline().step([_prompt(1, A, [0, 1])])
    sampled, failed = Pipeline().step([
        _prompt(1, A, [0, 1]), Chunk(2, 0, 3, C, [4], SampleSpec(0.5, 0.0, 0, None, 0))])
    assert sampled == [ok[0], PLACEHOLDER_TOKEN]
    assert "top_p must be in (0, 1]" in failed[1][2] and failed[0].keys() == {2}
