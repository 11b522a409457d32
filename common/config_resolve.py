"""The automatic values of a configuration, filled in once (`resolve`) before the processes of a
deployment start from it, so that all of them agree: the ports left at 0 (picked below the
kernel's ephemeral range, common/ports.py), the run directory and the addresses in it, the
stages' rendezvous ports, and the stage count of a placement on `model.devices`."""

from __future__ import annotations

import os

import msgspec

from common.config import ConfigError, ConveyorConfig
from common.ports import free_port, free_port_block


def resolve(cfg: ConveyorConfig) -> ConveyorConfig:
    """Fills in the automatic values (port 0, run_dir, dist ports, the stage count of a
    placement on model.devices) so that every process started from the result agrees on
    addresses and shapes. Idempotent."""
    ep = cfg.endpoints
    ingress = ep.ingress
    if ingress.startswith("tcp://") and ingress.rsplit(":", 1)[-1] == "0":
        host = ingress[len("tcp://"):].rsplit(":", 1)[0]
        ingress = f"tcp://{host}:{free_port('127.0.0.1' if host in ('*', '0.0.0.0') else host)}"
    run_dir = ep.run_dir or os.path.join(
        os.environ.get("XDG_RUNTIME_DIR") or "/tmp", f"conveyor-{_port_of(ingress)}")
    base = ep.dist_base_port or _free_port_block(cfg.deployment.instances, ep.dist_host)
    endpoints = msgspec.structs.replace(
        ep, ingress=ingress, run_dir=run_dir, dist_base_port=base,
        controller=ep.controller.replace("{run_dir}", run_dir),
        kvcache=ep.kvcache.replace("{run_dir}", run_dir))
    http = cfg.http
    if http.enabled and http.port == 0:
        host = "127.0.0.1" if http.host in ("0.0.0.0", "::", "") else http.host
        http = msgspec.structs.replace(http, port=free_port(host))
    deployment = cfg.deployment
    if cfg.model.devices:
        deployment = msgspec.structs.replace(deployment, stages=placed_stages(cfg))
    security = cfg.security
    if security.keys_dir:  # children may start elsewhere (systemd units have their own cwd)
        security = msgspec.structs.replace(security, keys_dir=os.path.abspath(security.keys_dir))
    return msgspec.structs.replace(cfg, endpoints=endpoints, http=http, security=security,
                                   deployment=deployment)


def placed_stages(cfg: ConveyorConfig) -> int:
    """The stage count of a deployment on model.devices: what deployment.stages = 0 follows
    (HELR may leave devices out); a figure that disagrees is refused. Reads the model's
    metadata only."""
    from common.model.placement import deployment_layout
    from common.model.source import resolve_model

    try:
        shape = resolve_model(cfg.model.source, cfg.model.load_format).shape
        return deployment_layout(cfg, shape).num_stages
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _port_of(address: str) -> str:
    tail = address.rsplit(":", 1)[-1]
    return tail if tail.isdigit() else "local"


def _free_port_block(count: int, host: str) -> int:
    try:
        return free_port_block(count, host)
    except OSError as e:
        raise ConfigError(str(e)) from None
