#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, CPU PyTorch pinned.
# Usage: scripts/setup.sh "cpu,lm,dev"
# A second run with the same project files and extras (or fewer) installs nothing: .venv/setup.stamp
# records what the last install was made from. "cpu" and "gpu" (the two FAISS builds, which both
# provide the module faiss) never go together: asking for one after the other swaps the build.
# "faiss" asks for the build installed already, else "cpu" (the test and demo scripts ask so).
# Where pip's indexes hold no CPU build of the pinned torch (PyPI holds none), the install is tried
# again with TORCH_INDEX_URL (default: PyTorch's CPU index) added; any other failure is shown as pip
# gave it. A .venv of a Python older than 3.10, or without pip, is refused: remove it.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,lm}"
torch_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
stamp=.venv/setup.stamp
files="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"

has() {  # has EXTRA LIST: LIST (comma-separated) names EXTRA
    case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac
}

without() {  # without EXTRA LIST: LIST less EXTRA
    local out="" extra
    for extra in ${2//,/ }; do
        [ "$extra" = "$1" ] || out="$out,$extra"
    done
    echo "${out#,}"
}

if has cpu "$extras" && has gpu "$extras"; then
    echo "setup.sh: give cpu or gpu, not both: both FAISS builds provide the module faiss" >&2
    exit 2
fi
installed=""
if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then
    installed="$(sed -n 2p "$stamp")"
fi
if has faiss "$extras"; then  # the build there is, else the CPU one
    build=cpu
    if has gpu "$installed" && ! has cpu "$installed"; then
        build=gpu
    fi
    extras="$(without faiss "$extras"),$build"
    extras="${extras#,}"
fi
swap=false  # FAISS to install afresh: the other build (or both, as an older set-up left them) is there
if { has gpu "$extras" && has cpu "$installed"; } || { has cpu "$extras" && has gpu "$installed"; }; then
    swap=true
    installed="$(without gpu "$(without cpu "$installed")")"
fi
if [ -n "$installed" ] && [ "$(sed -n 1p "$stamp")" = "$files" ] && [ "$swap" = false ]; then
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
if [ -x .venv/bin/python ] && ! .venv/bin/python -c 'import sys, pip; assert sys.version_info >= (3, 10)' 2>/dev/null; then
    echo "setup.sh: .venv is of a Python older than 3.10 or has no pip: remove it (rm -rf .venv) and run again" >&2
    exit 1
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "$swap" = true ]; then
    rm -f "$stamp"  # until the install below ends well: a failed one is not taken as done
    .venv/bin/python -m pip uninstall -q -y faiss-cpu faiss-gpu  # both: they share the files of `faiss`
fi
install=(.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]")
if ! "${install[@]}" 2> .venv/setup.err; then
    # pip says so only where torch is asked for directly; through an extra, its resolver says only that
    # the pinned version cannot be installed (ResolutionImpossible)
    # ... so a conflict is put down to torch only where pip cannot fetch the pinned torch by itself
    probe="$(mktemp -d)"
    if grep -qE "No matching distribution found for torch|ResolutionImpossible" .venv/setup.err &&
        ! .venv/bin/python -m pip download -q --no-deps -c constraints.txt -d "$probe" torch 2>/dev/null; then
        rm -rf "$probe"
        cat .venv/setup.err >&2
        echo "setup.sh: no CPU build of the pinned torch on pip's indexes; trying again with $torch_index" >&2
        "${install[@]}" --extra-index-url "$torch_index"
    else
        rm -rf "$probe"
        cat .venv/setup.err >&2
        exit 1
    fi
fi
printf '%s\n%s\n' "$files" "$extras" > "$stamp"
