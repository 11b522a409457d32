"""The one progress style: counts, postfix and message lines, with tqdm and without it."""

from __future__ import annotations

import builtins

import pytest

from conveyor.progress import Progress, Reporter


def test_tqdm_bar_counts_and_writes_lines_above_it(capsys):
    bar = Progress(4, "requests", "req")
    bar.update()
    bar.advance_to(3, simulated="1.50s")
    bar.write("a message")
    bar.close()
    err = capsys.readouterr().err
    assert "a message" in err
    assert "requests: 100%" not in err and "3/4" in err and "simulated=1.50s" in err


def test_without_tqdm_a_plain_counter_line(capsys, monkeypatch):
    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    with Progress(2, "grid", "point") as bar:
        bar.update()
        bar.update()
    assert "grid: 2/2 point" in capsys.readouterr().err


@pytest.mark.parametrize("enabled", [True, False])
def test_reporter_lines_survive_a_bar_and_progress_off_hides_only_the_bar(capsys, enabled):
    rep = Reporter("conveyor profile", enabled)
    rep.say("loading")
    with rep.steps(2, "grid", "point") as bar:
        rep.say("[1/2] a point")
        bar.update()
    rep.say("done")
    err = capsys.readouterr().err
    for line in ("conveyor profile: loading", "conveyor profile: [1/2] a point",
                 "conveyor profile: done"):
        assert line in err
    assert ("grid:" in err) is enabled
