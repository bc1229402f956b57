#!/usr/bin/env bash
# Executes every notebook in notebooks/ headless with the evcxr Rust kernel and fails on any cell
# error. Installs what is missing first: evcxr_jupyter (cargo), nbconvert/nbclient (PyPI, in a
# virtual environment under target/) and the kernel spec.
#
#   bash notebooks/run.sh                 # all notebooks
#   bash notebooks/run.sh 02-likelihood   # one (name with or without .ipynb)
#   bash notebooks/run.sh --install-only  # only install (CI starts this early, in the background)
#
# Executed copies (with their outputs) go to target/notebooks/. The evcxr build directory is
# target/evcxr, shared by the notebooks so that only the first one compiles the library.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
EVCXR_VERSION=0.22.0

if ! cargo install --list | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
    echo "notebooks: installing evcxr_jupyter $EVCXR_VERSION (cargo install, a few minutes)"
    cargo install --locked --quiet evcxr_jupyter --version "$EVCXR_VERSION"
fi
export PATH="$HOME/.cargo/bin:$PATH"

venv="$root/target/notebook-venv"
if [ ! -x "$venv/bin/jupyter-nbconvert" ]; then
    echo "notebooks: installing nbconvert into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "nbconvert==7.17.2" "nbclient==0.11.0"
fi
# The kernel spec goes into the virtual environment, not the user's Jupyter directory.
export JUPYTER_PATH="$venv/share/jupyter"
if [ ! -f "$JUPYTER_PATH/kernels/rust/kernel.json" ]; then
    mkdir -p "$JUPYTER_PATH/kernels/rust"
    cat > "$JUPYTER_PATH/kernels/rust/kernel.json" <<JSON
{"argv": ["$(command -v evcxr_jupyter)", "--control_file", "{connection_file}"],
 "display_name": "Rust", "language": "rust", "interrupt_mode": "message"}
JSON
fi

if [ "${1:-}" = "--install-only" ]; then
    exit 0
fi

export EVCXR_TMPDIR="$root/target/evcxr"
# The build folder's artefacts partly live in evcxr's cache (`:cache`); one built against a cache
# that was since cleared fails with "can't find crate", so it is started afresh then.
cache="${XDG_CACHE_HOME:-$HOME/.cache}/evcxr"
stamp="$EVCXR_TMPDIR/.cache-inode"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" != "$(stat -c %i "$cache" 2>/dev/null || echo none)" ]; then
    echo "notebooks: evcxr's cache changed since the last build; rebuilding target/evcxr"
    rm -rf "$EVCXR_TMPDIR"
fi
mkdir -p "$EVCXR_TMPDIR" target/notebooks
if [ $# -gt 0 ]; then
    books=()
    for n in "$@"; do books+=("notebooks/${n%.ipynb}.ipynb"); done
else
    books=(notebooks/*.ipynb)
fi
execute() {
    "$venv/bin/jupyter-nbconvert" --to notebook --execute \
        --ExecutePreprocessor.kernel_name=rust --ExecutePreprocessor.timeout=1200 \
        --output-dir target/notebooks "$1" >"target/notebooks/$(basename "$1" .ipynb).log" 2>&1
}
failed=0
for nb in "${books[@]}"; do
    start=$(date +%s)
    log="target/notebooks/$(basename "$nb" .ipynb).log"
    rm -f "target/notebooks/$(basename "$nb")"
    ran=0
    execute "$nb" && ran=1
    if [ $ran = 1 ] && "$venv/bin/python" notebooks/check.py "target/notebooks/$(basename "$nb")"; then
        echo "notebook $nb: ok ($(( $(date +%s) - start )) s)"
    else
        echo "notebook $nb: FAILED ($(( $(date +%s) - start )) s)"
        tail -40 "$log"
        failed=1
    fi
done
stat -c %i "$cache" >"$stamp" 2>/dev/null || true
exit $failed
