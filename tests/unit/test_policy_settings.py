"""A policy's settings: declared once on its dataclass, read by the config (nested tables and
flat aliases), by `conveyor policies` and by the docs' tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config, save_config
from common.scheduling import make_policy, policy_class, policy_names
from conveyor.cli.deploy_cmd import settings_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "scheduling.md"


def test_a_policy_table_sets_that_policy_alone(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[scheduler]\npolicy = "throttle"\n'
                    '[scheduler.throttle]\nmax_prefill_tokens = 1024\nkv_threshold = 0.1\n')
    cfg = load_config(path)
    policy = cfg.scheduler.build_policy()
    assert (policy.name, policy.max_prefill_tokens, policy.kv_threshold) == ("throttle", 1024, 0.1)
    assert policy.min_prefill_tokens == 32  # the declared default
    assert cfg.scheduler.build_policy("fcfs").max_num_batched_tokens == 512


def test_a_flat_key_is_an_alias_for_every_policy_that_has_it_unless_its_table_says():
    cfg = load_config(None, {"scheduler.max_num_seqs": 64,
                             "scheduler.sarathi.max_num_seqs": 8})
    seqs = {n: cfg.scheduler.build_policy(n).max_num_seqs for n in ("fcfs", "sarathi", "throttle")}
    assert seqs == {"fcfs": 64, "sarathi": 8, "throttle": 64}


def test_three_level_overrides_and_a_saved_config_keep_the_settings(tmp_path):
    cfg = load_config(None, {"scheduler.policy": "throttle",
                             "scheduler.throttle.prefill_iterations": 3})
    again = load_config(save_config(cfg, tmp_path / "resolved.json"))
    assert again.scheduler == cfg.scheduler
    assert again.scheduler.build_policy().prefill_iterations == 3


@pytest.mark.parametrize("overrides, message", [
    ({"scheduler.throttle.kv_threshold": 1.5}, "at `throttle.kv_threshold`"),
    ({"scheduler.throttle.prefill_iterations": 0}, "`int` >= 1 - at `throttle.prefill_itera"),
    ({"scheduler.throttle.knob": 1}, "policy 'throttle' has no setting 'knob'"),
    ({"scheduler.knob": 1}, "unknown key 'knob'"),
    ({"scheduler.nosuch.knob": 1}, "unknown key 'nosuch'"),
    ({"scheduler.policy": "nosuch"}, "unknown scheduling policy 'nosuch'"),
    ({"scheduler.fcfs.watermark": "lots"}, "Expected `float`, got `str`"),
])
def test_bad_settings_are_refused_naming_the_setting(overrides, message):
    with pytest.raises(ConfigError, match="scheduler: ") as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_policies_built_by_name_check_the_same_declaration():
    assert make_policy("fcfs", {"watermark": 0.2}).watermark == 0.2
    with pytest.raises(ValueError, match="has no setting 'max_prefill_tokens'"):
        make_policy("fcfs", max_prefill_tokens=3)


def test_the_docs_tables_are_the_declared_settings():
    docs = DOCS.read_text()
    built_in = [n for n in policy_names()  # not the ones other tests register
                if policy_class(n).__module__.startswith("common.scheduling.")]
    assert {"fcfs", "sarathi", "throttle"} <= set(built_in)
    for name in built_in:
        assert settings_table(name) in docs, f"docs/scheduling.md: regenerate {name}'s table " \
                                             "with `conveyor policies --markdown`"
