"""Typed configuration: defaults, files, overrides and the errors people will see."""

import pytest

from common.config import ConfigError, load_config, parse_override, save_config
from common.config_resolve import resolve


def test_defaults_describe_the_embedded_deployment():
    cfg = load_config()
    assert (cfg.model.source, cfg.deployment.stages, cfg.deployment.instances) == ("smollm2", 2, 1)
    assert cfg.max_inflight == 2


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[deployment]\nstages = 3\n[scheduler]\npolicy = "fcfs"\n')
    cfg = load_config(path, {"scheduler.max_num_seqs": 8})
    assert cfg.deployment.stages == 3 and cfg.scheduler.build_policy().max_num_seqs == 8


@pytest.mark.parametrize("text, message", [
    ("[deployment]\nstages = 'two'\n", r"Expected `int`, got `str` - at `\$.deployment.stages`"),
    ("[deployment]\nstagez = 2\n", "unknown field `stagez`"),
    ("[deployment]\nstages = 0\n", "deployment.stages must be >= 1"),
    ("[model]\nlayer_split = [10, 10, 10]\n", "layer_split has 3 entries but deployment.stages is 2"),
    ("[kvcache]\nblock_size = 24\n", "block_size must be a power of two"),
    ("[deployment\n", "is not valid"),
    ("[model]\ncuda_graphs = 'yes'\n", "Invalid enum value 'yes'"),
    ("[model]\ncuda_graphs = 'on'\nattention = 'sdpa'\n",
     "model.cuda_graphs = on needs model.attention = flex"),
    ("[model]\ncuda_graphs = 'eager'\nattention = 'sdpa'\n",
     "model.cuda_graphs = eager needs model.attention = flex"),
    ("[model]\ncuda_graphs = 'on'\n[deployment]\ndevice = 'cpu'\n",
     "model.cuda_graphs = on needs CUDA, and deployment.device is cpu"),
    ("[model]\ngraph_sizes = []\n", "model.graph_sizes must be a non-empty list"),
    ("[model]\ngraph_sizes = [4, 0]\n", r"model.graph_sizes must be .* in \[1, 4096\]"),
])
def test_bad_configs_name_the_problem(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "absent.toml")


def test_parse_override_types_values():
    assert parse_override("deployment.stages=3") == ("deployment.stages", 3)
    assert parse_override("model.source=tiny") == ("model.source", "tiny")
    assert parse_override("model.layer_split=[2, 2]") == ("model.layer_split", [2, 2])
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("stages")


def test_resolve_fills_ports_and_paths_and_round_trips(tmp_path):
    cfg = resolve(load_config(None, {"endpoints.ingress": "tcp://127.0.0.1:0",
                                     "deployment.instances": 2}))
    port = int(cfg.endpoints.ingress.rsplit(":", 1)[1])
    assert port > 0 and cfg.endpoints.dist_base_port > 0
    assert cfg.endpoints.run_dir.endswith(f"conveyor-{port}")
    assert cfg.endpoints.controller == f"ipc://{cfg.endpoints.run_dir}/controller"
    again = load_config(save_config(cfg, tmp_path / "resolved.json"))
    assert again == cfg and resolve(again) == cfg


def test_the_prompt_limit_follows_the_context_unless_set():
    assert load_config().max_prompt_bytes == 32 * 2048
    assert load_config(None, {"model.max_model_len": 4096}).max_prompt_bytes == 32 * 4096
    assert load_config(None, {"ingress.max_prompt_bytes": 1000}).max_prompt_bytes == 1000
    assert load_config().ingress.max_frame_bytes == 16 * 2**20
    with pytest.raises(ConfigError, match=r"ingress.max_frame_bytes must exceed the prompt limit "
                                          r"\(65536 bytes\), so a prompt too long is answered"):
        load_config(None, {"ingress.max_frame_bytes": 65536})
    assert load_config(None, {"ingress.max_frame_bytes": 0}).ingress.max_frame_bytes == 0
