"""The run directory is private to its user (common/run_dir.py), on the real file system: made
0700, refused when another user made it first, a symlink or a file; the config is never written
through a planted symlink; `conveyor serve` refuses such a folder and a keyless tcp:// control
plane before starting anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from common.config import ConfigError, load_config
from common.run_dir import UnsafeRunDir, ensure_private_dir, write_private_file
from common.security import check_control_plane

as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to make another user's folder")


def _mode(path) -> str:
    return oct(os.lstat(path).st_mode & 0o777)


def test_a_new_run_directory_is_private(tmp_path):
    d = ensure_private_dir(tmp_path / "a" / "run")
    assert d.is_dir() and _mode(d) == "0o700" and os.stat(d).st_uid == os.getuid()


def test_an_open_folder_of_ours_is_made_private(tmp_path):
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o777)
    ensure_private_dir(d)
    assert _mode(d) == "0o700"


@as_root
def test_another_users_folder_is_refused(tmp_path):
    d = tmp_path / "conveyor-7600"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(UnsafeRunDir, match=r"belongs to uid 65534, not to you \(uid 0\)"):
        ensure_private_dir(d)


def test_a_symlink_or_a_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(UnsafeRunDir, match="is a symlink"):
        ensure_private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UnsafeRunDir, match="is not a folder"):
        ensure_private_dir(tmp_path / "file")


def test_a_planted_symlink_is_replaced_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    run = ensure_private_dir(tmp_path / "run")
    (run / "config.json").symlink_to(victim)
    write_private_file(run / "config.json", b"{}")
    assert victim.read_text() == "precious"
    assert not (run / "config.json").is_symlink() and (run / "config.json").read_bytes() == b"{}"
    assert _mode(run / "config.json") == "0o600" and os.listdir(run) == ["config.json"]


def test_a_tcp_control_plane_needs_keys():
    check_control_plane(load_config())  # ipc: the run directory guards it
    tcp = {"endpoints.kvcache": "tcp://127.0.0.1:5555"}
    with pytest.raises(ConfigError, match=r"endpoints.kvcache is tcp:// but security.keys_dir "
                                          r"is empty"):
        check_control_plane(load_config(None, tcp))
    check_control_plane(load_config(None, {**tcp, "security.allow_plaintext_tcp": True}))
    check_control_plane(load_config(None, {**tcp, "security.keys_dir": "/k"}))


def _serve(*sets: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "conveyor.cli", "serve", "--model", "tiny", "--no-smoke",
           "--set", "model.load_format=dummy", "--address", "tcp://127.0.0.1:0"]
    for s in sets:
        cmd += ["--set", s]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@as_root
def test_serve_refuses_another_users_run_directory(tmp_path):
    d = tmp_path / "taken"
    d.mkdir(mode=0o777)
    os.chown(d, 65534, 65534)
    out = _serve(f'endpoints.run_dir="{d}"')
    assert out.returncode == 1 and "belongs to uid 65534, not to you" in out.stderr
    assert os.listdir(d) == []  # nothing was written or bound there


def test_serve_refuses_a_keyless_tcp_control_plane_and_missing_keys(tmp_path):
    out = _serve('endpoints.controller="tcp://127.0.0.1:5556"', f'endpoints.run_dir="{tmp_path}"')
    assert out.returncode == 1 and "endpoints.controller is tcp:// but security.keys_dir is " \
                                   "empty" in out.stderr
    out = _serve(f'security.keys_dir="{tmp_path / "nokeys"}"', f'endpoints.run_dir="{tmp_path}"')
    assert out.returncode == 1 and "controller.key_secret is missing (generate the " \
                                   "deployment's keys with `conveyor keys" in out.stderr
