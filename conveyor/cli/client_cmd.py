"""Commands that talk to a running deployment: generate, chat, health, stats."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer

from conveyor.client import DEFAULT_ADDRESS, Client, ConveyorError

ADDRESS_HELP = "Ingress address; the local default deployment when omitted."


def _sampling(max_tokens, temperature, top_p, top_k, seed, stop) -> dict[str, Any]:
    params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p,
              "top_k": top_k, "seed": seed, "stop": stop or None}
    return {k: v for k, v in params.items() if v is not None}


def _error(e: Exception) -> None:
    typer.secho(f"conveyor: {type(e).__name__}: {e}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def generate(
    prompt: str = typer.Argument(..., help="The prompt; - reads it from standard input."),
    address: str = typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP),
    raw: bool = typer.Option(False, help="Send the prompt as is, without the chat template."),
    max_tokens: Optional[int] = typer.Option(None, help="Tokens to generate at most."),
    temperature: Optional[float] = typer.Option(None, help="0 is greedy (server default 1)."),
    top_p: Optional[float] = typer.Option(None, help="Nucleus sampling mass."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k likeliest (0: off)."),
    seed: Optional[int] = typer.Option(None, help="Makes sampling reproducible."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with text, "
                                 "token_ids (generated only) and finish_reason."),
    timeout: Optional[float] = typer.Option(None, help="Give up (and cancel) after seconds."),
    slo_class: Optional[str] = typer.Option(None, help="A latency class of the server's "
                                            "config (`conveyor config`: slo.classes)."),
    ttft_slo: Optional[float] = typer.Option(None, help="Time-to-first-token target, seconds."),
    tpot_slo: Optional[float] = typer.Option(None, help="Time-per-output-token target, "
                                             "seconds."),
) -> None:
    """Stream a completion of PROMPT to standard output."""
    if prompt == "-":
        prompt = sys.stdin.read()
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, stop)
    params.update({k: v for k, v in (("slo_class", slo_class), ("ttft_slo_s", ttft_slo),
                                     ("tpot_slo_s", tpot_slo)) if v is not None})
    try:
        with Client(address, connect_timeout=min(timeout or 10.0, 10.0)) as client:
            if as_json:
                result = client.generate(prompt, raw=raw, timeout=timeout, **params)
                typer.echo(json.dumps(result.as_json()))
                return
            with client.stream(prompt, raw=raw, timeout=timeout, **params) as stream:
                for delta in stream:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
            sys.stdout.write("\n")
            r = stream.result
            typer.secho(f"[{r.finish_reason}: {r.completion_tokens} tokens, "
                        f"ttft {r.ttft_s:.3f}s, total {r.e2e_s:.2f}s]", dim=True, err=True)
    except ConveyorError as e:
        _error(e)


def chat(
    address: str = typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP),
    system: Optional[str] = typer.Option(None, help="A system message opening the chat."),
    max_tokens: Optional[int] = typer.Option(None),
    temperature: Optional[float] = typer.Option(None),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None),
) -> None:
    """Chat interactively. Ctrl-C stops a reply, Ctrl-D (or /exit) leaves, /reset forgets."""
    params = _sampling(max_tokens, temperature, top_p, top_k, seed, None)
    opening = [{"role": "system", "content": system}] if system else []
    history = list(opening)
    try:
        with Client(address) as client:
            health = client.health()
            typer.secho(f"Chatting with {health.model} at {address}. /reset forgets, "
                        f"/exit leaves.", dim=True, err=True)
            while True:
                try:
                    line = input("you> ").strip()
                except EOFError:
                    typer.echo()
                    return
                if line in ("/exit", "/quit"):
                    return
                if line == "/reset":
                    history = list(opening)
                    continue
                if not line:
                    continue
                history.append({"role": "user", "content": line})
                reply = _stream_reply(client, history, params)
                history.append({"role": "assistant", "content": reply})
    except ConveyorError as e:
        _error(e)


def _stream_reply(client: Client, history: list[dict], params: dict[str, Any]) -> str:
    sys.stdout.write("bot> ")
    parts = []
    with client.stream(messages=history, **params) as stream:
        try:
            for delta in stream:
                parts.append(delta.text)
                sys.stdout.write(delta.text)
                sys.stdout.flush()
        except KeyboardInterrupt:
            stream.cancel()
            sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    return "".join(parts)


def health(address: str = typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP)) -> None:
    """Print whether the deployment is ready, and what it serves; exit 1 when it is not ready
    (starting, draining) or does not answer, so scripts and probes can rely on the status."""
    try:
        with Client(address) as client:
            reply = client.health()
    except ConveyorError as e:
        _error(e)
    typer.echo(json.dumps(reply.__dict__))
    raise typer.Exit(0 if reply.ready else 1)


def stats(address: str = typer.Option(DEFAULT_ADDRESS, help=ADDRESS_HELP)) -> None:
    """Print the controller's counters (requests, tokens, per-stage time, KV use) as JSON."""
    try:
        with Client(address) as client:
            typer.echo(json.dumps(client.stats(), indent=2))
    except ConveyorError as e:
        _error(e)


def register(app: typer.Typer) -> None:
    app.command()(generate)
    app.command()(chat)
    app.command()(health)
    app.command()(stats)
