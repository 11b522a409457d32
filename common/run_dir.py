"""The run directory: where a deployment keeps its ipc sockets and its resolved config.

Whoever can open the ipc sockets can speak to the controller and the kv-cache manager, so the
folder is private to the user who started the deployment: created with mode 0700, and refused
when it already exists but is someone else's (another user could have made it first, in the
shared temp folder, to plant symlinks or to listen in), is a symlink, or is not a folder. A
folder of ours that others may read is made private again. Files are written through a fresh
temporary file renamed over the target: never through a symlink planted in its place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from common.config import ConfigError


class UnsafeRunDir(ConfigError):
    """The run directory exists and is not safe to use (not ours, a symlink, not a folder)."""


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Creates `path` (and missing parents) with mode 0700, or checks the existing one; raises
    UnsafeRunDir when it cannot be trusted. Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)  # parents are not ours to judge (/tmp, /run)
    try:
        os.mkdir(p, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(p)
    me = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeRunDir(f"run directory {p} is a symlink; refusing to use it (remove it, or "
                           f"set endpoints.run_dir to a folder of your own)")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeRunDir(f"run directory {p} exists and is not a folder")
    if st.st_uid != me:
        raise UnsafeRunDir(f"run directory {p} belongs to uid {st.st_uid}, not to you (uid "
                           f"{me}): another user may have created it to reach this "
                           f"deployment's sockets. Remove it, or set endpoints.run_dir to a "
                           f"folder of your own")
    if stat.S_IMODE(st.st_mode) & 0o077:
        # Ours, but others may enter it (a umask, or a folder the operator made by hand).
        os.chmod(p, 0o700)
    return p


def write_private_file(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` (mode 0600) so that a symlink or file planted at `path` is
    replaced, never written through: the bytes go to a new file (O_EXCL, O_NOFOLLOW) that is
    then renamed over the target."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)  # replaces a symlink itself, not what it points to
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def ipc_folder(address: str) -> str | None:
    """The folder of an ipc:// endpoint's socket file, None for other transports."""
    if not address.startswith("ipc://"):
        return None
    return os.path.dirname(address[len("ipc://"):]) or "."
