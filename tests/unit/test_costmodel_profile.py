"""ProfileCostModel on hand-built profiles (nothing is measured): interpolation, extrapolation,
layer scaling, the first/last-stage extras, the link, and the file format's errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.costmodel import BatchShape, CostModel, StepCost
from common.costmodel.profile import DEFAULT_LINK, VERSION, Profile, ProfileError, Sample
from common.costmodel.profile_model import ProfileCostModel, interp1
from common.model import NAMED_SHAPES

SHAPE = NAMED_SHAPES["tiny"]
PREFILL, DECODE, CONTEXT = [0, 16, 64], [0, 1, 8], [64, 512, 1024]
PROFILE_LAYERS = 2


def nonlinear(p: float, d: float, c: float) -> float:
    """Deliberately not multilinear (p^2, sqrt), so interpolation is visible between points."""
    return 1e-3 + 2e-5 * p + 1e-8 * p * p + 3e-4 * d + 1e-7 * d * c ** 0.5


def multilinear(p: float, d: float, c: float) -> float:
    return 1e-3 + 2e-5 * p + 3e-4 * d + 1e-7 * d * c + 1e-9 * p * d * c


def make_profile(f=nonlinear, prepare=lambda p, d, c: 1e-5 + 1e-7 * (p + d), **overrides
                 ) -> Profile:
    samples = [Sample(p, d, c, f(p, d, c), 0.9 * f(p, d, c), 1.1 * f(p, d, c), prepare(p, d, c))
               for p in PREFILL for d in DECODE for c in CONTEXT if p + d > 0]
    fields = dict(
        model_name="tiny", shape=SHAPE, dtype="float32", device={"type": "cpu", "threads": 1},
        num_layers=PROFILE_LAYERS, prefill_axis=PREFILL, decode_axis=DECODE,
        context_axis=CONTEXT, samples=samples, embedding_tokens=[1, 64],
        embedding_s=[1e-6, 64e-6], head_rows=[1, 4, 16], head_s=[1e-3, 2e-3, 5e-3],
        activation_bytes_per_token=SHAPE.hidden_size * 4,
        link={"bandwidth_bytes_s": 1e9, "latency_s": 1e-4})
    fields.update(overrides)
    return Profile(**fields)


def middle(p: float, d: float, c: float, layers: int = PROFILE_LAYERS) -> StepCost:
    return StepCost(prefill_tokens=p, decode_tokens=d, context_len=c, sampled_rows=d,
                    num_layers=layers, first_stage=False, last_stage=False)


@pytest.fixture
def model() -> ProfileCostModel:
    return ProfileCostModel(make_profile())


def test_implements_the_protocol(model):
    assert isinstance(model, CostModel)
    assert not isinstance(model.profile, CostModel)  # the check has teeth


def test_exact_at_every_grid_point(model):
    for p in PREFILL:
        for d in DECODE:
            for c in CONTEXT:
                if p + d == 0:
                    continue
                expected = nonlinear(p, d, c) + 1e-5 + 1e-7 * (p + d)
                assert model.stage_step_s(middle(p, d, c)) == pytest.approx(expected, rel=1e-12)


def test_linear_between_grid_points_along_each_axis(model):
    f = lambda p, d, c: model.layers_s(p, d, c, PROFILE_LAYERS)  # noqa: E731
    # a quarter of the way along the prefill, decode and context edges
    assert f(28, 1, 512) == pytest.approx(0.75 * f(16, 1, 512) + 0.25 * f(64, 1, 512))
    assert f(16, 2.75, 512) == pytest.approx(0.75 * f(16, 1, 512) + 0.25 * f(16, 8, 512))
    assert f(16, 8, 640) == pytest.approx(0.75 * f(16, 8, 512) + 0.25 * f(16, 8, 1024))


def test_trilinear_inside_a_cell(model):
    p, d, c = 40, 5, 700
    tp, td, tc = (p - 16) / 48, (d - 1) / 7, (c - 512) / 512
    expected = 0.0
    for ip, wp in ((16, 1 - tp), (64, tp)):
        for id_, wd in ((1, 1 - td), (8, td)):
            for ic, wc in ((512, 1 - tc), (1024, tc)):
                expected += wp * wd * wc * nonlinear(ip, id_, ic)
    assert model.layers_s(p, d, c, PROFILE_LAYERS) == pytest.approx(expected, rel=1e-12)


def test_multilinear_costs_are_reproduced_everywhere_inside():
    m = ProfileCostModel(make_profile(f=multilinear))
    for p, d, c in [(20, 3, 100), (63, 7, 1000), (16, 1, 64), (50, 2, 800)]:
        assert m.layers_s(p, d, c, PROFILE_LAYERS) == pytest.approx(multilinear(p, d, c))


def test_extrapolates_linearly_beyond_the_grid():
    m = ProfileCostModel(make_profile(f=multilinear))
    # multilinear costs extend exactly: more tokens and longer contexts than measured
    for p, d, c in [(128, 4, 512), (32, 16, 512), (32, 4, 4096), (256, 32, 2048)]:
        assert m.layers_s(p, d, c, PROFILE_LAYERS) == pytest.approx(multilinear(p, d, c))


def test_context_below_the_grid_is_clamped(model):
    assert model.layers_s(16, 8, 10, 2) == model.layers_s(16, 8, 64, 2)


def test_a_decreasing_last_segment_is_extended_flat():
    assert interp1([0, 1, 2], [1.0, 3.0, 2.0], 10) == 2.0
    assert interp1([0, 1, 2], [1.0, 3.0, 5.0], 10) == pytest.approx(21.0)
    assert interp1([5], [7.0], 100) == 7.0


def test_empty_step_cell_is_the_cheapest_step_of_its_context(model):
    # prefill 8 tokens alone sits halfway between the (filled) empty cell and prefill 16
    cheapest = min(nonlinear(p, d, 512) for p in PREFILL for d in DECODE if p + d)
    assert model.layers_s(8, 0, 512, 2) == pytest.approx(0.5 * (cheapest + nonlinear(16, 0, 512)))
    assert model.stage_step_s(middle(0, 0, 512)) == 0.0


def test_layer_part_scales_with_layers_and_prepare_does_not(model):
    one = model.stage_step_s(middle(64, 8, 512, layers=PROFILE_LAYERS))
    three = model.stage_step_s(middle(64, 8, 512, layers=3 * PROFILE_LAYERS))
    layers, prepare = nonlinear(64, 8, 512), 1e-5 + 1e-7 * 72
    assert one == pytest.approx(layers + prepare)
    assert three == pytest.approx(3 * layers + prepare)


def test_first_and_last_stage_extras(model):
    base = model.stage_step_s(middle(16, 4, 512))
    step = dataclasses.replace(middle(16, 4, 512), first_stage=True)
    embedding = 1e-6 + (20 - 1) / 63 * 63e-6
    assert model.stage_step_s(step) == pytest.approx(base + embedding)
    step = dataclasses.replace(middle(16, 4, 512), last_stage=True, sampled_rows=4)
    assert model.stage_step_s(step) == pytest.approx(base + 2e-3)
    step = dataclasses.replace(step, sampled_rows=10)  # halfway between 4 and 16 rows
    assert model.stage_step_s(step) == pytest.approx(base + 3.5e-3)
    step = dataclasses.replace(step, sampled_rows=0)
    assert model.stage_step_s(step) == pytest.approx(base)
    both = dataclasses.replace(middle(16, 4, 512), first_stage=True, last_stage=True)
    assert model.stage_step_s(both) == pytest.approx(base + embedding + 2e-3)


def test_noisy_small_head_point_does_not_make_more_rows_cheaper():
    m = ProfileCostModel(make_profile(head_s=[3e-3, 2e-3, 5e-3]))
    assert m.head_s(1) == m.head_s(4) == 3e-3
    assert m.head_s(16) == 5e-3


def test_transfer(model):
    assert model.transfer_s(0) == 0.0
    assert model.transfer_s(100) == pytest.approx(1e-4 + 100 * SHAPE.hidden_size * 4 / 1e9)
    default = ProfileCostModel(make_profile(link=None))
    assert default.transfer_s(1) == pytest.approx(
        DEFAULT_LINK["latency_s"] + SHAPE.hidden_size * 4 / DEFAULT_LINK["bandwidth_bytes_s"])


def test_file_round_trip(tmp_path):
    path = make_profile().save(tmp_path / "sub" / "p.json")
    loaded = ProfileCostModel.load(path, shape=SHAPE)
    original = ProfileCostModel(make_profile())
    for step in [middle(16, 1, 64), middle(40, 5, 700), middle(100, 20, 3000, layers=4)]:
        assert loaded.stage_step_s(step) == pytest.approx(original.stage_step_s(step), rel=1e-6)
    assert loaded.profile.shape == SHAPE


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="no cost profile at .*conveyor profile"):
        ProfileCostModel.load(tmp_path / "nope.json")


def test_wrong_version_and_format(tmp_path):
    data = make_profile().to_json()
    path = tmp_path / "p.json"
    path.write_text(json.dumps({**data, "version": VERSION + 1}))
    with pytest.raises(ProfileError, match="version 2.*re-run"):
        ProfileCostModel.load(path)
    path.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(ProfileError, match="not a Conveyor cost profile"):
        ProfileCostModel.load(path)
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="cannot read"):
        ProfileCostModel.load(path)
    del data["grid"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="malformed"):
        ProfileCostModel.load(path)


def test_shape_mismatch_only_when_asked(tmp_path):
    path = make_profile().save(tmp_path / "p.json")
    ProfileCostModel.load(path)  # no check asked
    ProfileCostModel.load(path, shape=dataclasses.replace(SHAPE, name="renamed"))  # name only
    with pytest.raises(ProfileError, match="hidden_size 64 \\(expected 4096\\)"):
        ProfileCostModel.load(path, shape=NAMED_SHAPES["llama3-8b"])


def test_missing_grid_point_is_an_error():
    profile = make_profile()
    profile.samples = [s for s in profile.samples if (s.prefill_tokens, s.decode_tokens,
                                                      s.context_len) != (16, 1, 512)]
    with pytest.raises(ProfileError, match="no sample at prefill 16, decode 1, context 512"):
        ProfileCostModel(profile)


# ---- prefill attention: one long prompt against many short ones -------------------------------

SPLIT = {"tokens": 64, "sequences": [1, 4, 16, 64], "median_s": []}
PAIR_S = 2e-8


def split_profile(pair_s: float = PAIR_S) -> Profile:
    """A profile whose prefill_split differs only by pair_s per attention pair."""
    base = nonlinear(64, 0, 64)
    pairs = [64 * (64 // k + 1) / 2 for k in SPLIT["sequences"]]
    split = {**SPLIT, "median_s": [base + pair_s * (q - pairs[0]) for q in pairs]}
    return make_profile(prefill_split=split)


def test_the_split_gives_the_attention_cost_per_pair():
    assert split_profile().attention_pair_s() == pytest.approx(PAIR_S)
    assert make_profile().attention_pair_s() == 0.0  # no split measured: no correction
    # Noise making more prompts slower is no negative attention cost.
    assert split_profile(-PAIR_S).attention_pair_s() == 0.0


def test_many_short_prompts_cost_less_than_one_long_prompt_of_the_same_tokens():
    model = ProfileCostModel(split_profile())
    one = middle(64, 0, 64)
    assert model.stage_step_s(one) == pytest.approx(  # as measured on the grid
        model.stage_step_s(dataclasses.replace(one, prefill_context=32.5)))
    eight = dataclasses.replace(one, prefill_context=4.5)  # eight prompts of 8 tokens
    saved = PAIR_S * 64 * (32.5 - 4.5)  # the pairs they do not attend to, per profile layers
    assert model.stage_step_s(one) - model.stage_step_s(eight) == pytest.approx(saved)
    # A chunk after a cached prefix attends to more than a fresh prompt.
    assert model.stage_step_s(dataclasses.replace(one, prefill_context=300.0)) > \
        model.stage_step_s(one)


def test_the_split_survives_the_file_and_a_bad_one_is_refused(tmp_path):
    path = split_profile().save(tmp_path / "p.json")
    assert ProfileCostModel.load(path).pair_s == pytest.approx(PAIR_S)
    data = json.loads(path.read_text())
    data["prefill_split"]["sequences"] = [1, 5, 16, 64]  # 5 does not divide 64
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="prefill_split"):
        ProfileCostModel.load(path)


def test_merged_profiles_take_the_median_scaled_to_the_first_layer_count():
    from conveyor.profile.merge import merge_profiles

    fast = split_profile()
    # Twice as many layers, each as fast: per layer it is the same machine, 20% slower.
    slow = dataclasses.replace(
        make_profile(lambda p, d, c: 2.4 * nonlinear(p, d, c)), num_layers=2 * PROFILE_LAYERS)
    merged = ProfileCostModel(merge_profiles([fast, slow]))
    point = merged.profile.sample_at(16, 1, 512)
    assert point.median_s == pytest.approx(1.1 * nonlinear(16, 1, 512))
    assert merged.profile.num_layers == PROFILE_LAYERS
    assert merged.pair_s == pytest.approx(PAIR_S)  # only the first timed the split
    with pytest.raises(ProfileError, match="at least two"):
        merge_profiles([fast])
    with pytest.raises(ProfileError, match="another grid"):
        merge_profiles([fast, make_profile(prefill_axis=[0, 16, 128])])


def test_a_padding_backend_is_costed_at_the_longest_decode_context():
    mean_model = ProfileCostModel(make_profile())
    padded = ProfileCostModel(make_profile(decode_context="max"))
    step = dataclasses.replace(middle(0, 8, 100), max_context_len=900.0)
    # A backend that pads costs the 8 decodes as if all had the longest context.
    assert padded.stage_step_s(step) == pytest.approx(padded.stage_step_s(middle(0, 8, 900)))
    assert mean_model.stage_step_s(step) == pytest.approx(mean_model.stage_step_s(
        middle(0, 8, 100)))
    assert padded.stage_step_s(middle(0, 8, 100)) == mean_model.stage_step_s(middle(0, 8, 100))


def test_decode_context_survives_the_file_and_a_bad_one_is_refused(tmp_path):
    path = make_profile(decode_context="max").save(tmp_path / "p.json")
    assert ProfileCostModel.load(path).pads_decode_context
    data = json.loads(path.read_text())
    del data["decode_context"]  # profiles written before it: the mean
    path.write_text(json.dumps(data))
    assert not ProfileCostModel.load(path).pads_decode_context
    data["decode_context"] = "median"
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="decode_context must be mean or max"):
        ProfileCostModel.load(path)


def test_batch_shape_counts_chunks_as_the_simulator_does():
    # Two prompt chunks (a fresh one of 4 tokens, one of 3 after 8 cached) and two decodes.
    shape = BatchShape.of_chunks([(0, 4), (10, 1), (20, 1), (8, 3)], sampled_rows=3)
    assert (shape.prefill_tokens, shape.decode_tokens) == (7, 2)
    assert shape.prefill_context == pytest.approx((4 * 5 / 2 + 3 * 8 + 3 * 4 / 2) / 7)
    assert (shape.context_len, shape.max_context_len) == (15.0, 20.0)
    step = shape.at_stage(17, True, False)
    assert (step.num_layers, step.first_stage, step.sampled_rows) == (17, True, 3)
    assert step.prefill_pairs == pytest.approx(40.0)
    only_decodes = BatchShape.of_chunks([(5, 1)], 1).at_stage(13, False, True)
    assert only_decodes.prefill_context is None and only_decodes.max_context_len == 5.0
