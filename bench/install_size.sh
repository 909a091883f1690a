#!/usr/bin/env bash
# The installed size of moeedge without and with its extras: one wheel built from this
# tree, installed with torch==2.13.0 (the CPU wheel, as the README installs it) into fresh
# virtual environments; du of each site-packages, and its largest packages.
#   bench/install_size.sh [WORKDIR] [EXTRAS...]   (default extras: "aggregate,sim,plot")
# [bench] is left out by default: llama-cpp-python builds llama.cpp from source (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/moeedge-install-size}
shift || true
sets=("" "${@:-aggregate,sim,plot}")
python=${PYTHON:-python3}
rm -rf "$work" && mkdir -p "$work/wheel"
"$python" -m pip wheel --quiet --no-deps -w "$work/wheel" .
wheel=$(ls "$work"/wheel/moeedge-*.whl)
echo "commit $(git rev-parse --short HEAD), $("$python" --version), $(uname -m)"
for extras in "${sets[@]}"; do
    name=${extras:-base}
    venv="$work/venv-${name//,/-}"
    "$python" -m venv "$venv"
    spec="$wheel${extras:+[$extras]}"
    "$venv/bin/pip" install --quiet torch==2.13.0 "$spec"
    site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$venv/bin/moeedge" --version >/dev/null  # it runs
    total=$(du -sm "$site" | cut -f1)
    echo "moeedge${extras:+[$extras]}: site-packages ${total} MiB; largest:"
    du -sm "$site"/* | sort -rn | awk -v s="$site/" 'NR <= 8 {sub(s, "", $2); printf "    %5d MiB  %s\n", $1, $2}'
done
