#!/usr/bin/env bash
# Create (or update) an isolated virtualenv with the peer libraries the side-by-side
# benchmarks compare pymeta against: learn2learn 0.2.0, higher, easyfsl -- plus pymeta
# itself (editable). Idempotent: re-running only installs what is missing.
#
#   usage: bash benchmarks/setup_peers.sh [VENV_DIR]      (default: ./.venv-peers)
#
# Never touches the Python that runs it: everything goes through "$VENV/bin/python -m pip".
# Network: PyPI only (torch/torchvision wheels come from local disk where pip is set up so).
# Keep the venv outside the git tree (e.g. /work/venv-peers); ./.venv-peers is git-ignored.
#
# Why the learn2learn dance: learn2learn 0.2.0 ships only an sdist whose Cython-generated
# .c files predate Python 3.11 and fail to compile. We download the sdist, regenerate the
# .c files with Cython 3 and build it without build isolation. Its setup.py also requires
# gsutil and qpth, which `import learn2learn` does not need (qpth is imported lazily by
# learn2learn.nn.SVClassifier only), so we install its runtime deps by hand, with --no-deps.
set -euo pipefail

VENV="${1:-./.venv-peers}"
PYTHON_BOOTSTRAP="${PYTHON:-python3}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Versions that were installed and checked together (torch 2.14.1 is the newest release
# this machine's pip constraints allow; torchvision 0.29.1 is its match).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
PEER_PINS=(higher==0.2.1 easyfsl==1.5.0)
L2L_VERSION=0.2.0
# learn2learn's import-time dependencies (numpy comes with torch); gym 0.26.2 imports
# under numpy 2 and prints an "unmaintained" notice to stderr.
L2L_DEPS=(gym==0.26.2 scipy requests tqdm)
BUILD_DEPS=("cython>=3" "setuptools>=70.1")  # 70.1+ builds wheels without the wheel package
# pymeta's own runtime dependencies (pymeta itself goes in with --no-deps so pip never
# re-resolves torch).
PYMETA_DEPS=(numpy tqdm ninja pybind11 pillow matplotlib)

if [[ ! -x "$VENV/bin/python" ]]; then
    echo "== creating venv $VENV"
    "$PYTHON_BOOTSTRAP" -m venv "$VENV"
fi
PY="$(cd "$VENV" && pwd)/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check --quiet)

# Pin torch for every later install, so no peer can pull another torch (a CUDA build of
# several GB from PyPI on machines without the local wheels).
CONSTRAINTS="$(mktemp)"
WORK="$(mktemp -d)"
trap 'rm -rf "$CONSTRAINTS" "$WORK"' EXIT
printf '%s\n' "${TORCH_PINS[@]}" >"$CONSTRAINTS"

echo "== torch"
"${PIP[@]}" install "${TORCH_PINS[@]}"

echo "== higher, easyfsl"
"${PIP[@]}" install -c "$CONSTRAINTS" "${PEER_PINS[@]}"

echo "== learn2learn $L2L_VERSION"
"${PIP[@]}" install -c "$CONSTRAINTS" "${L2L_DEPS[@]}" "${BUILD_DEPS[@]}"
if "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('learn2learn') != '$L2L_VERSION')" 2>/dev/null; then
    echo "learn2learn $L2L_VERSION already installed"
else
    "${PIP[@]}" download --no-deps --no-binary :all: -d "$WORK" "learn2learn==$L2L_VERSION"
    tar -xzf "$WORK/learn2learn-$L2L_VERSION.tar.gz" -C "$WORK"
    SRC="$WORK/learn2learn-$L2L_VERSION"
    # Regenerate the stale C files (setup.py builds from .c unless invoked as build_ext).
    find "$SRC/learn2learn" -name '*.pyx' -print0 |
        while IFS= read -r -d '' pyx; do "$(dirname "$PY")/cython" -3 "$pyx"; done
    "${PIP[@]}" install --no-build-isolation --no-deps "$SRC"
fi

echo "== pymeta (editable, --no-deps) from $REPO"
"${PIP[@]}" install -c "$CONSTRAINTS" "${PYMETA_DEPS[@]}"
# Checked from / : in the repository, the current folder's pymeta/ would import without an install.
if (cd / && "$PY" -c "import sys, pymeta; sys.exit(not pymeta.__file__.startswith('$REPO/'))") 2>/dev/null; then
    echo "pymeta already installed from $REPO"
else
    "${PIP[@]}" install --no-deps -e "$REPO"
fi

echo "== check"
(cd / && "$PY" -) <<'EOF'
import contextlib, io
with contextlib.redirect_stderr(io.StringIO()):  # gym's notice
    import learn2learn
import easyfsl, higher, torch, torchvision
import pymeta
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"learn2learn {learn2learn.__version__}, easyfsl {easyfsl.__version__}, higher ok, "
      f"pymeta from {pymeta.__file__}")
EOF
echo "peers venv ready: $VENV  (run: $VENV/bin/python benchmarks/bench_meta.py)"
