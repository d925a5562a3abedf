#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, CPU PyTorch pinned.
# Usage: scripts/setup.sh "cpu,lm,dev"
# A second run with the same project files and extras (or fewer) installs nothing: .venv/setup.stamp
# records what the last install was made from. "cpu" and "gpu" (the two FAISS builds, which both
# provide the module faiss) never go together: asking for one after the other swaps the build.
# Where pip's indexes hold no CPU build of the pinned torch (PyPI holds none), the install is tried
# again with TORCH_INDEX_URL (default: PyTorch's CPU index) added.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,lm}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
stamp=.venv/setup.stamp
files="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

has() {  # has EXTRA LIST: LIST (comma-separated) names EXTRA
    case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

if has cpu "$extras" && has gpu "$extras"; then
    echo "setup.sh: give cpu or gpu, not both: both FAISS builds provide the module faiss" >&2
    exit 2
fi
swap=""  # the FAISS package to remove: the other build was installed before
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
    installed="$(sed -n 2p "$stamp")"
    if has gpu "$extras" && has cpu "$installed"; then
        swap=faiss-cpu
    elif has cpu "$extras" && has gpu "$installed"; then
        swap=faiss-gpu
    fi
    kept=""
    for extra in ${installed//,/ }; do
        if ! { [ -n "$swap" ] && { [ "$extra" = cpu ] || [ "$extra" = gpu ]; }; }; then
            kept="$kept,$extra"
        fi
    done
    installed="${kept#,}"
    if [ "$(sed -n 1p "$stamp")" = "$files" ] && [ -z "$swap" ]; then
        missing=""
        for extra in ${extras//,/ }; do
            has "$extra" "$installed" || missing="$missing $extra"
        done
        if [ -z "$missing" ]; then
            exit 0
        fi
    fi
    for extra in ${extras//,/ }; do
        has "$extra" "$installed" || installed="${installed:+$installed,}$extra"
    done
    extras="$installed"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ -n "$swap" ]; then
    .venv/bin/python -m pip uninstall -q -y "$swap"
fi
install=(.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]")
if ! "${install[@]}" 2> .venv/setup.err; then
    if grep -q "No matching distribution found for torch" .venv/setup.err; then
        echo "setup.sh: no CPU build of the pinned torch on pip's indexes; trying again with $torch_index" >&2
        "${install[@]}" --extra-index-url "$torch_index"
    else
        cat .venv/setup.err >&2
        exit 1
    fi
fi
printf '%s\n%s\n' "$files" "$extras" > "$stamp"
