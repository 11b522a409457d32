"""Commands that run Conveyor's processes: serve (all of them), start (one), config, policies."""

from __future__ import annotations

import json
import signal
import sys
import time
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from common.config import ConfigError, ConveyorConfig, load_config, parse_override, to_dict
from common.config_resolve import resolve
from common.placement_config import PlacementConfig, field_help
from conveyor.cli.params import comma_list

SMOKE_PROMPT = "What is the capital of France? Answer in one sentence."
WATCH_INTERVAL_S = 0.1
"""How often `conveyor serve` looks for a dead child (a dead stage's restart waits for it) and
for a stop signal."""


class Role(str, Enum):
    ingress = "ingress"
    controller = "controller"
    stage = "stage"
    kvcache = "kvcache"


def _fail(message: str) -> None:
    typer.secho(f"conveyor: error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def build_config(config: Optional[Path], sets: list[str], **shortcuts) -> ConveyorConfig:
    """The config file (or defaults), then --set overrides, then the named shortcut options."""
    names = {"model": "model.source", "stages": "deployment.stages",
             "instances": "deployment.instances", "routing": "deployment.routing",
             "groups": "deployment.groups", "policy": "scheduler.policy",
             "address": "endpoints.ingress", "log_format": "logging.format",
             "http_host": "http.host", "http_port": "http.port",
             "served_model_name": "http.served_model_name", "api_key": "ingress.api_keys",
             "shutdown_timeout": "ingress.shutdown_timeout_s", "placement": "model.placement",
             "devices": "model.devices"}
    try:
        overrides = dict(parse_override(s) for s in sets)
        overrides.update({names[k]: v for k, v in shortcuts.items() if v not in (None, [])})
        return load_config(config, overrides)
    except ConfigError as e:
        _fail(str(e))


def _resolve(cfg: ConveyorConfig) -> ConveyorConfig:
    """resolve(), its errors (a placement that disagrees with deployment.stages) as ours."""
    try:
        return resolve(cfg)
    except ConfigError as e:
        _fail(str(e))


def _policy_help() -> str:
    """--policy help naming every policy and setting with its default (from the policies'
    own declarations, so the help cannot drift from the code)."""
    from common.scheduling import policy_class, policy_names, policy_settings

    parts = ["Scheduling policy (default fcfs). Its settings are set with --set "
             "scheduler.POLICY.SETTING=VALUE (`conveyor policies` lists them)."]
    for name in policy_names():
        params = "; ".join(f"{s.name} ({s.default}): {s.help}"
                           for s in policy_settings(policy_class(name)))
        parts.append(f"{name} -- {params}.")
    return "\n\n".join(parts)


_stop_signals: list[int] = []
"""The SIGTERMs and SIGINTs `conveyor serve` has received."""


def _stop_signal(signum, frame) -> None:
    # Recorded, not raised: an exception raised from a handler surfaces wherever the main
    # thread happens to be, and inside subprocess's fork hooks (the warm spare is started
    # just as the deployment gets ready, when scripts and tests often stop it) or a finalizer
    # Python prints "Exception ignored" and drops it: the deployment did not stop. A signal
    # during the stop does not cut the ingress's drain short either.
    _stop_signals.append(signum)


def _stop_if_asked() -> None:
    """Raises KeyboardInterrupt (the stop path) once SIGTERM or SIGINT has come."""
    if _stop_signals:
        raise KeyboardInterrupt


def _health(client):
    """The deployment's health, None while the ingress does not answer."""
    from conveyor.client import ConnectionFailed, ConveyorError

    try:
        return client.health(timeout=2.0)
    except (ConnectionFailed, ConveyorError):
        return None


def serve(
    model: Optional[str] = typer.Option(None, help="smollm2 (default), a .gguf file, a Hugging "
                                        "Face folder, or a named shape with dummy weights."),
    stages: Optional[int] = typer.Option(None, help="Pipeline stages per instance (default 2; "
                                         "with --devices, as many as the placement uses)."),
    placement: Optional[str] = typer.Option(None, help=field_help(PlacementConfig, "placement")
                                            + " (model.placement, default balanced)."),
    devices: Optional[str] = typer.Option(None, help="Comma-separated, as model.devices: "
                                          + field_help(PlacementConfig, "devices") + ". The "
                                          "stage count then follows the placement unless "
                                          "--stages is given (`conveyor plan` shows it)."),
    instances: Optional[int] = typer.Option(None, help="Model instances (default 1)."),
    routing: Optional[str] = typer.Option(None, help="Which instance takes a request: "
                                          "least-loaded (default), round-robin or "
                                          "length-groups (with --groups)."),
    groups: Optional[str] = typer.Option(None, help="Length groups for --routing "
                                         "length-groups: LO-HI:INSTANCES ranges in instance "
                                         "order, e.g. 0-512:2,512-:1 (all --instances)."),
    policy: Optional[str] = typer.Option(None, help=_policy_help()),
    address: Optional[str] = typer.Option(None, help="Client address of the ingress, "
                                          "e.g. tcp://0.0.0.0:7600 (port 0: any free port)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML or JSON config "
                                          "file; the options above override it."),
    set_: list[str] = typer.Option([], "--set", help="Override any setting: section.key=value "
                                   "(repeatable), e.g. --set scheduler.throttle.max_num_seqs=64."),
    log_format: Optional[str] = typer.Option(None, help="console or json."),
    http_host: Optional[str] = typer.Option(None, help="Host of the OpenAI-compatible HTTP "
                                            "endpoint (default 127.0.0.1)."),
    http_port: Optional[int] = typer.Option(None, help="Its port (default 8000; 0: any free "
                                            "port). --set http.enabled=false turns it off."),
    api_key: list[str] = typer.Option([], "--api-key", help="A key clients must present "
                                      "(repeatable; CONVEYOR_API_KEY, comma-separated, adds "
                                      "more): HTTP Authorization: Bearer, the SDK's api_key."),
    served_model_name: Optional[str] = typer.Option(None, help="The model id of /v1/models "
                                                    "(default: the model's name)."),
    shutdown_timeout: Optional[float] = typer.Option(None, help="On Ctrl-C or SIGTERM, seconds "
                                                     "requests in flight may take to finish "
                                                     "(default 30)."),
    smoke: bool = typer.Option(True, help="Answer a smoke-test prompt once ready."),
    ready_timeout: float = typer.Option(600.0, help="Seconds to wait for every stage to load."),
) -> None:
    """Start a whole deployment on this machine and serve until Ctrl-C."""
    from conveyor.client import Client, ConveyorError
    from conveyor.supervisor import ChildDied, Supervisor

    device_list = comma_list(devices, "--devices") if devices else None
    if device_list and stages is None:
        stages = 0  # as many as the placement uses, filled in by resolve()
    cfg = _resolve(build_config(config, set_, model=model, stages=stages, instances=instances,
                               routing=routing, groups=groups, policy=policy, address=address,
                               log_format=log_format, http_host=http_host,
                               http_port=http_port, api_key=api_key,
                               served_model_name=served_model_name,
                               shutdown_timeout=shutdown_timeout, placement=placement,
                               devices=device_list))
    _check_security(cfg)
    dep = cfg.deployment
    # SIGTERM (systemd, supervisord) and SIGINT both stop the deployment cleanly. SIGINT is set
    # explicitly: a process started in the background of a non-interactive shell (nohup, CI
    # runners) inherits it ignored, and `kill -INT` would then do nothing.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop_signal)
    try:
        sup = Supervisor(cfg, cfg.logging.format)
    except ConfigError as e:  # an unsafe run directory
        _fail(str(e))

    def say(text: str, color: str = typer.colors.GREEN) -> None:
        # Through the relay of the children's lines, so that none cuts this one.
        line = f"conveyor: {text}"
        sup.output.write(typer.style(line, fg=color) if sys.stderr.isatty() else line)

    say(f"starting {cfg.model.source}: {dep.stages} stage(s) x {dep.instances} instance(s), "
        f"policy {cfg.scheduler.policy}, config {sup.config_path}")
    client = Client(cfg.endpoints.ingress.replace("0.0.0.0", "127.0.0.1").replace("*", "127.0.0.1"),
                    connect_timeout=2.0, api_key=(cfg.ingress.api_keys or [None])[0])
    code = 0
    try:
        sup.start()
        deadline = time.monotonic() + ready_timeout
        while True:
            _stop_if_asked()
            sup.check()
            if (health := _health(client)) is not None and health.ready:
                break
            if time.monotonic() > deadline:
                raise ChildDied(f"deployment not ready after {ready_timeout:g}s")
            time.sleep(0.5)
        say(f"ready: {health.model} at {cfg.endpoints.ingress} (max_model_len "
            f"{health.max_model_len})")
        if cfg.http.enabled:
            url = f"http://{cfg.http.host}:{cfg.http.port}"
            say(f"http: {url}/v1 (OpenAI-compatible; {url}/health, {url}/metrics)")
        if smoke:
            r = client.generate(SMOKE_PROMPT, max_tokens=48, temperature=0.0, timeout=120)
            say(f"smoke test: {SMOKE_PROMPT!r} -> {r.text!r} "
                f"({r.completion_tokens} tokens in {r.e2e_s:.2f}s)")
        say("serving; Ctrl-C stops")
        while True:
            _stop_if_asked()
            for line in sup.recover():
                say(line, typer.colors.YELLOW)
            if sup.wants_spare() and (health := _health(client)) is not None and health.ready:
                sup.start_spare()
            time.sleep(WATCH_INTERVAL_S)
    except KeyboardInterrupt:
        say("stopping")
    except (ChildDied, ConveyorError) as e:
        say(f"error: {e}; stopping the deployment", typer.colors.RED)
        code = 1
    finally:
        client.close()
        sup.stop()
    raise typer.Exit(code)


def start(
    role: Role = typer.Argument(..., help="Which process to run."),
    config: Path = typer.Option(..., "--config", "-c", help="The deployment's config file."),
    instance: int = typer.Option(0, help="Instance of a stage worker."),
    stage: int = typer.Option(0, help="Pipeline stage of a stage worker."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting: section.key=value."),
    log_format: Optional[str] = typer.Option(None, help="console or json."),
    spare: bool = typer.Option(False, "--spare", hidden=True,
                               help="A warm spare stage: imports done, it reads 'INSTANCE "
                                    "STAGE' from stdin (conveyor serve's, spare_stage.py)."),
) -> None:
    """Run one process of a deployment (what supervisord or systemd starts)."""
    from common.log import configure_logging
    from common.runtime import run_service

    cfg = build_config(config, set_, log_format=log_format)
    if cfg.deployment.stages != 1 and cfg.endpoints.dist_base_port == 0:
        _fail("endpoints.dist_base_port must be set when processes are started one by one, "
              "so that the stages of an instance find each other")
    cfg = _resolve(cfg)
    _check_security(cfg, (role.value,))
    if spare and role is Role.stage:
        from conveyor.spare_stage import await_assignment

        configure_logging(role.value, cfg.logging.format, cfg.logging.level)
        assigned = await_assignment()
        if assigned is None:
            return
        instance, stage = assigned
    dep = cfg.deployment
    if role is Role.stage and not (0 <= instance < dep.instances and 0 <= stage < dep.stages):
        _fail(f"stage {instance}.{stage} is outside the deployment "
              f"({dep.instances} instance(s) x {dep.stages} stage(s))")
    context = {"instance": instance, "stage": stage} if role is Role.stage else {}
    configure_logging(role.value, cfg.logging.format, cfg.logging.level, **context)
    if role is Role.stage:
        from services.stage.worker import run
        run(cfg, instance, stage)
        return
    if role is Role.controller:
        from services.controller.service import run as main
    elif role is Role.ingress:
        from services.ingress.service import run as main
    else:
        from services.kvcache.service import run as main
    run_service(lambda: main(cfg))


def _check_security(cfg: ConveyorConfig, roles: tuple[str, ...] | None = None) -> None:
    """A tcp:// control plane needs keys, and the keys of `roles` (all of them by default)
    must be there and private, so a process never starts to fail later."""
    from common.security import ROLES, Security, check_control_plane

    try:
        check_control_plane(cfg)
        for role in (roles or ROLES) if cfg.security.keys_dir else ():
            Security.for_role(cfg, role).check()
    except ConfigError as e:
        _fail(str(e))


def keys(
    folder: Path = typer.Argument(..., help="Folder for the key pairs (created private)."),
    force: bool = typer.Option(False, help="Replace keys already there."),
) -> None:
    """Generate a deployment's CURVE keys: one pair per role (controller, kvcache, ingress,
    stage). Point security.keys_dir at the folder; a stage on another machine needs
    stage.key_secret and controller.key copied there."""
    from common.security import generate_keys

    try:
        files = generate_keys(folder, force)
    except ConfigError as e:
        _fail(str(e))
    for f in files:
        typer.echo(str(f))
    typer.secho(f"conveyor: keys written; use them with --set security.keys_dir="
                f"{folder.resolve()}", fg=typer.colors.GREEN, err=True)


def show_config(
    config: Optional[Path] = typer.Option(None, "--config", "-c"),
    set_: list[str] = typer.Option([], "--set"),
    resolved: bool = typer.Option(False, help="Fill in ports and paths as `serve` would."),
) -> None:
    """Print the effective configuration as JSON (a starting point for a config file)."""
    cfg = build_config(config, set_)
    typer.echo(json.dumps(to_dict(_resolve(cfg) if resolved else cfg, full=True), indent=2))


def policies(markdown: bool = typer.Option(False, help="Print each policy's settings as the "
                                           "Markdown table docs/scheduling.md carries.")
             ) -> None:
    """List the scheduling policies and their settings (defaults and bounds)."""
    from common.scheduling import policy_names

    for name in policy_names():
        typer.echo(settings_table(name) if markdown else _settings_text(name))


def _settings_text(name: str) -> str:
    from common.scheduling import policy_class, policy_settings

    cls = policy_class(name)
    lines = [f"{name}: {' '.join((cls.__doc__ or '').split())}"]
    for s in policy_settings(cls):
        bounds = f", {s.bounds}" if s.bounds else ""
        lines.append(f"    --set scheduler.{name}.{s.name}={s.default}  ({s.type}{bounds}) "
                     f"{s.help}")
    return "\n".join(lines)


def settings_table(name: str) -> str:
    """Policy `name`'s settings as a Markdown table (docs/scheduling.md holds one per policy,
    and a test checks that it is this one)."""
    from common.scheduling import policy_class, policy_settings

    rows = [f"| `scheduler.{name}.{s.name}` | {s.default} | {s.bounds or 'any'} | {s.help} |"
            for s in policy_settings(policy_class(name))]
    return "\n".join(["| setting | default | bounds | meaning |", "|---|---|---|---|", *rows])


def register(app: typer.Typer) -> None:
    app.command()(serve)
    app.command()(start)
    app.command("config")(show_config)
    app.command()(policies)
    app.command()(keys)
