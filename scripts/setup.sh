#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with the given extras, CPU PyTorch pinned.
# Usage: scripts/setup.sh "cpu,lm,dev"
# A second run with the same project files and extras (or fewer) installs nothing: .venv/setup.stamp
# records what the last install was made from.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-cpu,lm}"
stamp=.venv/setup.stamp
files="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(sed -n 1p "$stamp")" = "$files" ]; then
    installed="$(sed -n 2p "$stamp")"
    missing=""
    for extra in ${extras//,/ }; do
        case ",$installed," in *",$extra,"*) ;; *) missing="$missing $extra" ;; esac
    done
    if [ -z "$missing" ]; then
        exit 0
    fi
    extras="$installed,$extras"
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[${extras}]"
printf '%s\n%s\n' "$files" "$extras" > "$stamp"
