"""The multi-host recipe (deploy/multihost/conveyor.toml) is a valid config of host addresses
only, and per-instance rendezvous hosts are checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import ConfigError, load_config, to_dict

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "multihost" / "conveyor.toml"


def test_the_recipe_names_hosts_and_no_local_socket():
    cfg = load_config(RECIPE)
    ep = cfg.endpoints
    assert [ep.ingress, ep.controller, ep.kvcache] == [
        "tcp://control:7600", "tcp://control:7601", "tcp://control:7602"]
    assert ep.rendezvous(0) == ("stage0", 29600)
    assert cfg.security.keys_dir, "a tcp:// control plane runs CURVE"
    assert "ipc://" not in str(to_dict(cfg)) and "{run_dir}" not in str(to_dict(cfg))


def test_each_instance_may_rendezvous_on_its_own_host():
    cfg = load_config(RECIPE, {"deployment.instances": 2,
                               "endpoints.dist_hosts": ["stage0", "stage2"]})
    assert [cfg.endpoints.rendezvous(i) for i in (0, 1)] == [("stage0", 29600),
                                                             ("stage2", 29601)]
    with pytest.raises(ConfigError, match="dist_hosts names 1 host"):
        load_config(RECIPE, {"deployment.instances": 2, "endpoints.dist_hosts": ["stage0"]})
