#!/usr/bin/env bash
# Makes $VENV ready for `make demo` / `make test`: created with $PYTHON when it is missing or
# unusable (another Python, no pip, a half-made one), and the pinned stack (constraints.txt)
# installed for this checkout: again when pyproject.toml or constraints.txt changed, or when
# the checkout moved. Quick when nothing needs doing.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
EXTRAS=${EXTRAS:-dev,docs,onnx,tensorboard,plots,parquet,hf}
PY=$VENV/bin/python
STAMP=$VENV/.transferkit-installed
NEED="3.11"  # the oldest Python with wheels of every version pinned in constraints.txt

new_enough() { "$1" -c "import sys; sys.exit(sys.version_info < tuple(map(int, '$NEED'.split('.'))))" 2>/dev/null; }

if new_enough "$PY" && ! "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m ensurepip --upgrade >/dev/null 2>&1 || true  # a venv made without pip (uv, --without-pip)
fi
if ! new_enough "$PY" || ! "$PY" -m pip --version >/dev/null 2>&1; then
    if ! command -v "$PYTHON" >/dev/null 2>&1; then
        echo "make: '$PYTHON' is not installed. Install Python >= $NEED, or name one: make PYTHON=python3.12" >&2
        exit 1
    fi
    if ! new_enough "$PYTHON"; then
        echo "make: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'), and the" \
             "pinned stack in constraints.txt needs Python >= $NEED. Name a newer one: make PYTHON=python3.12" \
             "(pip install . without the constraints works on Python 3.10 too)." >&2
        exit 1
    fi
    if [ -e "$VENV" ] && [ ! -f "$VENV/pyvenv.cfg" ]; then  # not a virtual environment: never removed here
        echo "make: $VENV is not a usable virtual environment (no pyvenv.cfg): remove it, or name another with" \
             "make VENV=<folder>" >&2
        exit 1
    fi
    if [ -e "$VENV" ]; then
        echo "make: $VENV is unusable (made with another Python, or without pip): making it again" >&2
        rm -rf "$VENV"
    fi
    if ! "$PYTHON" -m venv "$VENV"; then
        rm -rf "$VENV"  # the half-made one this call created
        echo "make: '$PYTHON -m venv' failed (on Debian and Ubuntu: apt install python3-venv), then run make again" >&2
        exit 1
    fi
fi

here=$(pwd -P)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$here" ] && [ "$STAMP" -nt pyproject.toml ] \
        && [ "$STAMP" -nt constraints.txt ]; then
    exit 0
fi
install=("$PY" -m pip install --disable-pip-version-check -c constraints.txt -e ".[$EXTRAS]")
if ! "${install[@]}" --quiet; then
    echo "make: installing the pinned stack failed. Rerun pip without --quiet to see why: ${install[*]}" >&2
    exit 1
fi
echo "$here" > "$STAMP"
