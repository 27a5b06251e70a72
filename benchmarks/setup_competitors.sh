#!/usr/bin/env bash
# Install the two competitor libraries for the benchmarks, each into its own
# isolated directory under benchmarks/.deps/, never into the active environment.
#
#   . /work/venv/bin/activate          # any env that already has torch
#   bash benchmarks/setup_competitors.sh
#
# Idempotent: a directory that already holds the pinned version is left alone;
# otherwise it is wiped and reinstalled. Everything is installed with
# --no-deps, so pip never resolves (or upgrades) torch.
#
# Why isolated: pytorch-posthoc-ema installs a top-level package literally named
# `posthoc_ema`, the same name as ours. Its directory must only ever be put FIRST
# on sys.path, in a separate process (benchmarks/competitors.py does this).
#
# What the competitors import besides torch (checked in their sources):
#   ema-pytorch 0.8.3          -> numpy
#   pytorch-posthoc-ema 1.0.10 -> numpy, matplotlib, PIL (pillow)
#     (its __init__ imports its visualization module, which imports matplotlib/PIL)
# None of them needs beartype or einops. numpy, matplotlib and pillow are
# compiled packages, not small pure-python ones; they are taken from the active
# environment when it has them, else installed into the competitor's directory.
set -euo pipefail

PYTHON=${PYTHON:-python}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEPS="$HERE/.deps"

EMA_PYTORCH_VERSION=0.8.3
PYTORCH_POSTHOC_EMA_VERSION=1.0.10
# only used when the active environment lacks them
NUMPY_VERSION=2.4.6
MATPLOTLIB_VERSION=3.11.2
PILLOW_VERSION=13.0.0

pip_target() {  # pip_target DIR ARGS...: pip install into DIR, quietly
    local dir=$1; shift
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-deps --target "$dir" "$@"
}

install_pinned() {  # install_pinned DIR DIST_NAME(underscored) VERSION PIP_SPEC
    local dir=$1 dist=$2 version=$3 spec=$4
    if [ -d "$dir/$dist-$version.dist-info" ]; then
        echo "ok: $spec already in ${dir#"$HERE"/}"
        return
    fi
    rm -rf "$dir"
    mkdir -p "$dir"
    pip_target "$dir" "$spec"
    echo "installed: $spec into ${dir#"$HERE"/}"
}

ensure_module() {  # ensure_module DIR MODULE PIP_SPEC...: install specs into DIR if MODULE is not importable
    local dir=$1 module=$2; shift 2
    if "$PYTHON" -c "import $module" 2>/dev/null; then
        return
    fi
    echo "the active environment lacks $module: installing $* into ${dir#"$HERE"/}"
    # these have their own dependencies (none of them torch), so let pip resolve them here
    "$PYTHON" -m pip install --quiet --disable-pip-version-check --target "$dir" "$@"
}

"$PYTHON" -c "import torch" || { echo "error: torch must already be installed in $PYTHON's environment" >&2; exit 1; }

install_pinned "$DEPS/ema_pytorch" ema_pytorch "$EMA_PYTORCH_VERSION" "ema-pytorch==$EMA_PYTORCH_VERSION"
ensure_module "$DEPS/ema_pytorch" numpy "numpy==$NUMPY_VERSION"

install_pinned "$DEPS/pytorch_posthoc_ema" pytorch_posthoc_ema "$PYTORCH_POSTHOC_EMA_VERSION" \
    "pytorch-posthoc-ema==$PYTORCH_POSTHOC_EMA_VERSION"
ensure_module "$DEPS/pytorch_posthoc_ema" numpy "numpy==$NUMPY_VERSION"
ensure_module "$DEPS/pytorch_posthoc_ema" matplotlib "matplotlib==$MATPLOTLIB_VERSION"
ensure_module "$DEPS/pytorch_posthoc_ema" PIL "pillow==$PILLOW_VERSION"

# Check that each imports from its own directory when that directory is first on sys.path.
check_import() {  # check_import DIR MODULE
    "$PYTHON" - "$1" "$2" <<'EOF'
import importlib, sys
from pathlib import Path
target, name = Path(sys.argv[1]).resolve(), sys.argv[2]
sys.path.insert(0, str(target))
module = importlib.import_module(name)
origin = Path(module.__file__).resolve()
assert target in origin.parents, f"{name} imported from {origin}, not from {target}"
print(f"import ok: {name} from {origin.parent}")
EOF
}
check_import "$DEPS/ema_pytorch" ema_pytorch
check_import "$DEPS/pytorch_posthoc_ema" posthoc_ema
