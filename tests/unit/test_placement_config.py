"""model.devices and model.placement = helr in a deployment config and a cluster file: what is
accepted, the errors people will see, and how the stage count follows the placement."""

from __future__ import annotations

import pytest

from common.config import ConfigError, load_config
from common.config_resolve import resolve
from common.costmodel.devices import DEVICES, parse_device
from conveyor.sim.cluster import ClusterError, build_cluster

LLAMA = {"model.source": "llama3-8b", "model.load_format": "dummy"}


def helr(devices: list[str], stages: int = 0, **more) -> dict:
    return {**LLAMA, "model.devices": devices, "model.placement": "helr",
            "deployment.stages": stages, **more}


def test_a_device_entry_is_a_known_name_with_its_memory_or_the_one_given():
    assert parse_device("a100").memory_gib == 80.0 and parse_device("h200").memory_gib == 141.0
    forty = parse_device("A100:40")
    assert (forty.spec, forty.memory_gib, forty.memory_bytes) == (DEVICES["a100"], 40.0,
                                                                   40 * 1024**3)


@pytest.mark.parametrize("settings, message", [
    ({"model.devices": ["h100", "x100"]}, "model.devices: unknown device 'x100' (known: h100, "
                                          "h100-pcie, h200, a100"),
    ({"model.devices": ["a100:lots"]}, "the memory after ':' must be a number of GiB > 0"),
    ({"model.devices": ["a100:0"]}, "the memory after ':' must be a number of GiB > 0"),
    ({"model.placement": "helr"}, "model.placement = helr needs model.devices"),
    ({"deployment.stages": 0}, "deployment.stages must be >= 1 (0, as many stages as the "
                               "placement uses, needs model.devices)"),
    ({"model.devices": ["h100", "a100"], "deployment.stages": 3},
     "deployment.stages is 3 but model.devices names 2 devices: the balanced split puts a "
     "stage on each"),
    ({"model.devices": ["h100", "a100"], "model.layer_split": [20, 5, 5],
      "deployment.stages": 0}, "model.layer_split has 3 entries but model.devices names 2"),
    (helr(["h100", "a100"], **{"model.layer_split": [16, 16]}),
     "model.layer_split fixes the split and model.placement = helr chooses one"),
    (helr(["h100", "a100"], 3), "deployment.stages is 3 but model.devices names only 2"),
    (helr(["h100"], **{"model.helr.decode_tokens": 0, "model.helr.prefill_tokens": 0}),
     "the reference micro-batch needs prefill_tokens or decode_tokens >= 1"),
    (helr(["h100"], **{"model.helr.objective": "fastest"}), "model.helr.objective"),
])
def test_bad_placement_settings_name_the_problem(settings, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, settings)
    assert message in str(e.value)


def test_stages_zero_follows_the_placement_when_the_config_is_resolved():
    cfg = load_config(None, helr(["h200", "a100", "a100"]))
    assert cfg.deployment.stages == 0
    assert resolve(cfg).deployment.stages == 3
    # The sum objective (one micro-batch's way through) is best on the H200 alone.
    alone = resolve(load_config(None, helr(["h200", "a100", "a100"],
                                           **{"model.helr.objective": "sum"})))
    assert alone.deployment.stages == 1 and alone.max_inflight == 1
    # An even split over the devices has a stage on each.
    even = load_config(None, {**LLAMA, "model.devices": ["h100", "a100"],
                              "deployment.stages": 0})
    assert resolve(even).deployment.stages == 2


def test_a_stage_count_that_disagrees_with_helr_is_refused_naming_both():
    cfg = load_config(None, helr(["h200", "a100", "a100"], 2))
    with pytest.raises(ConfigError) as e:
        resolve(cfg)
    assert str(e.value).startswith("model.placement = helr uses 3 of the 3 devices in "
                                   "model.devices (h200, a100, a100; bottleneck ")
    assert "but deployment.stages is 2: set it to 3, or to 0 to follow the placement" \
        in str(e.value)
    assert resolve(load_config(None, helr(["h200", "a100", "a100"], 3))).deployment.stages == 3


def test_a_model_too_big_for_the_devices_is_refused_when_resolved():
    cfg = load_config(None, helr(["a100:8", "a100:8"]))
    with pytest.raises(ConfigError, match="32 layers do not fit in the devices' memory "
                                          r"\(a100:8, a100:8\)"):
        resolve(cfg)


def cluster(**model) -> dict:
    return {"model": {"shape": "llama3-8b", "dtype": "bfloat16", **model},
            "cluster": {"stages": 0}, "kvcache": {"block_size": 16}}


def test_a_cluster_file_takes_the_same_settings_and_sizes_each_stage_by_its_device():
    cfg = build_cluster(cluster(devices=["h200", "a100", "a100"], placement="helr"))
    assert [(s.num_layers, s.device) for s in cfg.stages] == [(20, "h200"), (6, "a100"),
                                                              (6, "a100")]
    assert cfg.max_inflight == 3 and cfg.describe()["stage_devices"] == ["h200", "a100", "a100"]
    # The instance's pool is its smallest stage's: the H200's, whose 20 layers leave the least
    # room per block (services/stage/devices.py's rule with each device's memory).
    from common.model.device_plan import gpu_kv_blocks
    from common.model.shape import NAMED_SHAPES

    h200 = gpu_kv_blocks(NAMED_SHAPES["llama3-8b"], 20, True, False, 141 * 1024**3, 0.9, 2, 16)
    assert cfg.num_blocks == h200 and "each device's memory" in cfg.kv_sizing


@pytest.mark.parametrize("model, extra, message", [
    ({"devices": ["h100", "a100"], "placement": "helr"}, {"kvcache": {"gpu_memory_gib": 80.0}},
     "kvcache.gpu_memory_gib and model.devices"),
    ({"placement": "helr"}, {}, "model.placement = helr needs model.devices"),
    ({"devices": ["h100", "a100"]}, {"cluster": {"stages": 4}},
     "cluster.stages is 4 but model.devices names 2 devices"),
    ({"devices": ["h200", "a100", "a100"], "placement": "helr"}, {"cluster": {"stages": 2}},
     "but cluster.stages is 2: set it to 3"),
])
def test_bad_cluster_placements_are_refused_with_the_reason(model, extra, message):
    raw = cluster(**model)
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    with pytest.raises(ClusterError) as e:
        build_cluster(raw)
    assert message in str(e.value)
