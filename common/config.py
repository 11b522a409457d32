"""Typed, validated deployment configuration shared by every Conveyor process.

One `ConveyorConfig` describes a whole deployment; every process (`conveyor start ROLE`) reads the
same file and takes its own part. `conveyor serve` builds one from the embedded defaults and the
command-line overrides, resolves the automatic values (free ports, run directory) and hands the
resolved file to its children, so they all agree on addresses and shapes.

Files are TOML or JSON; unknown keys and wrong types are errors that name the offending path.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from common.config_section import Section, failed
from common.deployment_config import DeploymentConfig
from common.migration_config import GroupRefinementConfig, MigrationConfig
from common.placement_config import PlacementConfig
from common.prediction.config import PredictorConfig
from common.scheduling.config import (SchedulerConfig, nest_scheduler_table,
                                      written_scheduler_table)
from common.wire.client_messages import DEFAULT_MAX_FRAME_BYTES

DEFAULT_INGRESS_PORT = 7600
MAX_GRAPH_SIZE = 4096
"""The largest decode graph: its fixed buffers hold a row per decode over the whole cache."""
PROMPT_BYTES_PER_TOKEN = 32
"""ingress.max_prompt_bytes = 0 allows this many UTF-8 bytes per token of max_model_len: text
averages 3-5 bytes per token, and only runs of whitespace pack more into one token."""


class ConfigError(ValueError):
    """A configuration value is missing, malformed or inconsistent."""


class ModelConfig(PlacementConfig):
    source: str = "smollm2"
    """What to serve: `smollm2` (the embedded SmolLM2-135M-Instruct GGUF), a path to a `.gguf`
    file, a Hugging Face folder with safetensors, or a named shape (`llama3-8b`, `tiny`) with
    load_format `dummy`."""
    load_format: Literal["auto", "gguf", "safetensors", "dummy"] = "auto"
    """How to read the weights; `auto` decides from `source`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype; `auto` is float32 on CPU and bfloat16 on CUDA."""
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    """Attention kernels: `flex` reads the paged KV cache in place (FlexAttention, compiled at
    warm-up: a C++ compiler on CPU, Triton on CUDA), `sdpa` gathers each step's contexts into
    a padded copy (the portable reference), `auto` flex on CUDA with Triton, else sdpa (on CPU
    flex wins only on long or mixed-length decode batches: common/model/attention.py)."""
    cuda_graphs: Literal["auto", "on", "off", "eager"] = "auto"
    """CUDA graphs of decode-only micro-batches (common/model/decode_graphs.py): `on` captures
    one per size in graph_sizes at warm-up (CUDA and the flex backend only), `auto` does where
    it can, `off` runs every step eagerly, `eager` runs the graphs' fixed buffers and padding
    without capturing them (any device with flex: how the path is tested on CPU)."""
    graph_sizes: list[int] = msgspec.field(
        default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    """Decode counts captured: d decodes replay the smallest size >= d (padded), more than the
    largest run eagerly."""
    tokenizer: str = ""
    """Tokenizer source; empty means the model's own (dummy models borrow SmolLM2's)."""
    seed: int = 0
    """Seed of `dummy` random weights, so every stage and every run builds the same model."""

    def problems(self, stages: int, stages_key: str) -> list[str]:
        graphs = self.cuda_graphs
        return [*super().problems(stages, stages_key), *failed([
            (bool(self.graph_sizes) and all(1 <= b <= MAX_GRAPH_SIZE for b in self.graph_sizes),
             f"model.graph_sizes must be a non-empty list of sizes in [1, {MAX_GRAPH_SIZE}]"),
            (graphs in ("auto", "off") or self.attention != "sdpa",
             f"model.cuda_graphs = {graphs} needs model.attention = flex (or auto on CUDA): "
             f"sdpa's gather is shaped by each step's longest context, which a graph cannot "
             f"hold"),
        ])]


class EndpointsConfig(Section):
    ingress: str = f"tcp://127.0.0.1:{DEFAULT_INGRESS_PORT}"
    """Where clients reach the ingress (the SDK's address). Port 0 picks a free port."""
    controller: str = "ipc://{run_dir}/controller"
    """The controller's socket, which the ingress and stage workers connect to."""
    kvcache: str = "ipc://{run_dir}/kvcache"
    """The kv-cache manager's socket, which the controller (and tools) connect to."""
    dist_host: str = "127.0.0.1"
    """Host of each instance's torch.distributed rendezvous (its stage 0): an address or a host
    name of that host (stages listen for their peers on the address they reach it from)."""
    dist_hosts: list[str] = []
    """Instance i's rendezvous host, one per instance, when their stage 0s live on different
    hosts; empty: dist_host for every instance."""
    dist_base_port: int = 0
    """Instance i rendezvouses at dist_base_port + i; 0 picks free ports when serving."""
    run_dir: str = ""
    """Folder for ipc sockets and the resolved config; empty derives one from the ingress port."""

    def rendezvous(self, instance: int) -> tuple[str, int]:
        """Where instance `instance`'s stages meet: its stage 0's host and port."""
        host = self.dist_hosts[instance] if self.dist_hosts else self.dist_host
        return host, self.dist_base_port + instance


class KVCacheConfig(Section):
    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int = 0
    """Blocks per instance; 0 sizes the pool from `memory_gib` (CPU) or free GPU memory."""
    memory_gib: float = 0.5
    """KV memory per stage on CPU when num_blocks is 0."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory a stage may use for weights, activations and KV (CUDA)."""
    lease_blocks: int = 0
    """Free blocks the controller holds to assign without asking the kv-cache manager, topped
    up in the background as blocks come free; 0: the whole pool."""

    def problems(self) -> list[str]:
        return failed([
            (self.block_size in (1, 2, 4, 8, 16, 32, 64, 128, 256),
             "kvcache.block_size must be a power of two up to 256"),
            (self.num_blocks >= 0, "kvcache.num_blocks must be >= 0"),
            (self.memory_gib > 0, "kvcache.memory_gib must be > 0"),
            (0 < self.gpu_memory_utilization <= 1,
             "kvcache.gpu_memory_utilization must be in (0, 1]"),
        ])


class IngressConfig(Section):
    default_max_tokens: int = 256
    """max_tokens of a request that does not set it (clamped to the context left)."""
    max_stop_strings: int = 16
    """Most stop strings one request may carry."""
    keepalive_s: float = 1.0
    """How often clients with requests in flight are probed, so a vanished one is noticed."""
    max_prompt_bytes: int = 0
    """Largest prompt (UTF-8 bytes of `prompt`, or of all `messages`) accepted for tokenizing;
    larger ones are refused before any tokenizer work. 0: PROMPT_BYTES_PER_TOKEN (32) per token
    of model.max_model_len."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    """Largest frame a client may send (ZeroMQ MAXMSGSIZE); ZeroMQ drops a larger one unread
    and disconnects the client, which gets no reply. 0: no limit. Health replies carry it, so
    the SDK refuses a larger request itself, before sending it."""
    max_queued_requests: int = 4096
    """Admission control: most requests received and not yet given their first token, over
    the whole deployment; beyond it a request is refused at once (overloaded: HTTP 503 with
    Retry-After, ZeroMQ error code 3)."""
    max_queued_prompt_tokens: int = 2**20
    """Admission control: most prompt tokens of those queued requests (a request alone is
    always let in, whatever its size, so a long prompt is never refused for its length)."""
    api_keys: list[str] = []
    """Keys a client must present (HTTP `Authorization: Bearer KEY` on /v1/*, the ZeroMQ
    GenerateRequest's `api_key`); empty: no key. CONVEYOR_API_KEY (comma-separated) adds keys."""
    shutdown_timeout_s: float = 30.0
    """On SIGTERM the ingress stops admitting and lets requests in flight finish for at most
    this long; what is still running then is ended with an error, never dropped silently."""
    retry_after_s: int = 1
    """Retry-After (seconds) sent with an overloaded or draining refusal."""


class HttpConfig(Section):
    """The OpenAI-compatible HTTP endpoint of the ingress (services/ingress/http/)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8000
    """0 picks a free port (printed by `conveyor serve`)."""
    served_model_name: str = ""
    """The model id of /v1/models and of requests' `model`; empty: the model's name."""


class SecurityConfig(Section):
    """ZeroMQ CURVE on the control plane (common/security.py, docs/architecture.md)."""

    keys_dir: str = ""
    """A folder of the deployment's key pairs, made by `conveyor keys DIR`: every controller and
    kv-cache socket then runs CURVE (encrypted; only peers holding one of the deployment's keys
    get in, each recognised by its role). Empty: no CURVE; ipc sockets are then guarded by the
    run directory's permissions alone, and a tcp:// control plane is refused."""
    allow_plaintext_tcp: bool = False
    """Let a tcp:// controller or kv-cache endpoint run without keys (a closed network, or a
    measurement of what CURVE costs); anyone who reaches such a port can act on the control
    plane."""


class LoggingConfig(Section):
    format: Literal["console", "json"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


class SLOClass(Section):
    ttft_s: float | None = None
    """Time to first token, seconds (None: no target)."""
    tpot_s: float | None = None
    """Time per output token after the first, seconds (None: no target)."""


class SLOConfig(Section):
    """Named latency targets a request may ask for with `slo_class` (docs/scheduling.md)."""

    classes: dict[str, SLOClass] = msgspec.field(default_factory=lambda: {
        "interactive": SLOClass(ttft_s=2.0, tpot_s=0.2),
        "batch": SLOClass(ttft_s=60.0, tpot_s=2.0)})
    default_class: str = ""
    """The class of a request that names none and gives no targets ("": no SLO)."""


class ConveyorConfig(Section):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    deployment: DeploymentConfig = msgspec.field(default_factory=DeploymentConfig)
    endpoints: EndpointsConfig = msgspec.field(default_factory=EndpointsConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    kvcache: KVCacheConfig = msgspec.field(default_factory=KVCacheConfig)
    ingress: IngressConfig = msgspec.field(default_factory=IngressConfig)
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    logging: LoggingConfig = msgspec.field(default_factory=LoggingConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    slo: SLOConfig = msgspec.field(default_factory=SLOConfig)
    predictor: PredictorConfig = msgspec.field(default_factory=PredictorConfig)
    """Output-length prediction at admission (common/prediction/config.py)."""
    migration: MigrationConfig = msgspec.field(default_factory=MigrationConfig)
    group_refinement: GroupRefinementConfig = msgspec.field(
        default_factory=GroupRefinementConfig)

    def validate(self) -> "ConveyorConfig":
        """Checks that single fields cannot express; returns self for chaining."""
        checks = [
            (self.model.cuda_graphs != "on" or self.deployment.device != "cpu",
             "model.cuda_graphs = on needs CUDA, and deployment.device is cpu (off, or eager "
             "to run the graphs' buffers without capturing them)"),
            (self.kvcache.lease_blocks >= 0, "kvcache.lease_blocks must be >= 0"),
            (not self.endpoints.dist_hosts
             or len(self.endpoints.dist_hosts) == self.deployment.instances,
             f"endpoints.dist_hosts names {len(self.endpoints.dist_hosts)} host(s) but "
             f"deployment.instances is {self.deployment.instances} (one per instance, or none)"),
            (not self.slo.default_class or self.slo.default_class in self.slo.classes,
             f"slo.default_class {self.slo.default_class!r} is not one of slo.classes"),
            (all(t is None or (0 < t < math.inf) for c in self.slo.classes.values()
                 for t in (c.ttft_s, c.tpot_s)), "slo.classes targets must be > 0 seconds"),
            (self.ingress.default_max_tokens >= 1, "ingress.default_max_tokens must be >= 1"),
            (self.ingress.keepalive_s > 0, "ingress.keepalive_s must be > 0"),
            (self.ingress.max_prompt_bytes >= 0, "ingress.max_prompt_bytes must be >= 0"),
            (self.ingress.max_queued_requests >= 1, "ingress.max_queued_requests must be >= 1"),
            (self.ingress.max_queued_prompt_tokens >= 1,
             "ingress.max_queued_prompt_tokens must be >= 1"),
            (self.ingress.shutdown_timeout_s >= 0, "ingress.shutdown_timeout_s must be >= 0"),
            (self.ingress.retry_after_s >= 0, "ingress.retry_after_s must be >= 0"),
            (all(self.ingress.api_keys), "ingress.api_keys must not hold an empty key"),
            (0 <= self.http.port <= 65535, "http.port must be in [0, 65535]"),
            (self.predictor.mode != "oracle", "predictor.mode oracle exists only in the "
             "simulator (a deployment does not know the true lengths)"),
            (self.ingress.max_frame_bytes == 0 or self.ingress.max_frame_bytes >
             self.max_prompt_bytes, "ingress.max_frame_bytes must exceed the prompt limit "
             f"({self.max_prompt_bytes} bytes), so a prompt too long is answered, not dropped"),
        ]
        problems = [*self.deployment.problems(), *failed(checks),
                    *self.model.problems(self.deployment.stages, "deployment.stages"),
                    *self.kvcache.problems(),
                    *self.migration.problems(self.deployment),
                    *self.group_refinement.problems(self.deployment)]
        if problems:
            raise ConfigError(problems[0])
        try:
            self.scheduler.check()
        except ValueError as e:
            raise ConfigError(f"scheduler: {e}") from None
        return self

    @property
    def max_inflight(self) -> int:
        return self.scheduler.max_inflight or self.deployment.stages

    @property
    def max_prompt_bytes(self) -> int:
        return self.ingress.max_prompt_bytes or PROMPT_BYTES_PER_TOKEN * self.model.max_model_len


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
                ) -> ConveyorConfig:
    """Reads a TOML/JSON file (or the defaults when `path` is None) and applies dotted overrides
    such as {"deployment.stages": 3}. Raises ConfigError naming the bad key."""
    raw = read_settings(path, overrides)
    if isinstance(raw.get("scheduler"), dict):
        try:
            raw["scheduler"] = nest_scheduler_table(raw["scheduler"])
        except ValueError as e:
            raise ConfigError(f"scheduler: {e}") from None
    try:
        cfg = msgspec.convert(raw, ConveyorConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(f"invalid configuration: {e}") from e
    return cfg.validate()


def read_settings(path: str | os.PathLike | None, overrides: dict[str, Any] | None = None,
                  what: str = "config file") -> dict[str, Any]:
    """The tables of a TOML (or .json) file, `{}` without one, with dotted overrides such as
    {"deployment.stages": 3} applied. Raises ConfigError naming the file or the key."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from e
        try:
            raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as e:
            kind = "JSON" if p.suffix == ".json" else "TOML"
            raise ConfigError(f"{what} {p} is not valid {kind}: {e}") from e
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return raw


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parses `section.key=value` or `section.table.key=value` (value as TOML, falling back to
    a plain string)."""
    key, sep, value = assignment.partition("=")
    if not sep or "." not in key:
        raise ConfigError(f"override {assignment!r} is not of the form section.key=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, key = dotted.split(".")
    if not tables or not key or not all(tables):
        raise ConfigError(f"override key {dotted!r} must be section.key")
    for i, name in enumerate(tables):
        raw = raw.setdefault(name, {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config section {'.'.join(tables[:i + 1])!r} must be a table")
    raw[key] = value


def save_config(cfg: ConveyorConfig, path: str | os.PathLike) -> Path:
    """Writes the config (mode 0600, never through a symlink planted at `path`)."""
    from common.run_dir import write_private_file  # imports this module

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return write_private_file(p, msgspec.json.format(msgspec.json.encode(to_dict(cfg)), indent=2))


def to_dict(cfg: ConveyorConfig, full: bool = False) -> dict[str, Any]:
    """The configuration as a file writes it ([scheduler.NAME] tables); with `full`, every
    policy's settings with their defaults (what `conveyor config` prints)."""
    raw = msgspec.to_builtins(cfg)
    raw["scheduler"] = written_scheduler_table(cfg.scheduler, full=full)
    return raw
