#!/usr/bin/env bash
# Downloads, into .whl/ (ignored by git), the wheels the GPU machine lacks for the GPU check:
# its image has PyTorch, Triton, transformers, typer, uvloop, msgpack and prometheus-client
# (/work/.library/device/KINDS.md) but not these. CPython 3.12, x86-64 manylinux, no deps
# (each dependency that is missing there is named here too). Run here, where pip reaches the
# registry; the device run carries .whl and scripts/gpu_check.sh installs it.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    pyzmq msgspec structlog gguf starlette uvicorn pytest-asyncio
ls -la .whl
du -sh .whl
