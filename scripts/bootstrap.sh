#!/usr/bin/env bash
# All set-up on a fresh machine: a venv in .venv with a CPU torch and this project (editable).
#   bash scripts/bootstrap.sh           what the main job needs
#   bash scripts/bootstrap.sh --tests   and the test extras (pytest, selenium, Ray), byte-compiled
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
case "${1:-}" in
  "") ;;
  --tests) tests=1 ;;
  *) echo "usage: bash scripts/bootstrap.sh [--tests]  (got '$1')" >&2; exit 2 ;;
esac
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch pinned: 2.13.0 is a CPU build on these machines; a bare requirement pulls CUDA. One pip
# call resolves everything once. A stamp of what was installed (this script, pyproject.toml and
# whether the test extras came too) skips pip on the next call, so a rerun of the main command
# costs seconds, not a resolution. The main job does not install the test extras (Ray alone is
# 240 MB: ~10 s of its set-up).
stamp=.venv/.codefend-bootstrap
want=$(cat scripts/bootstrap.sh pyproject.toml | sha256sum | cut -d' ' -f1)
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$tests" = 1 ]; then
  target="$want tests"; spec='.[test]'; check='import harness, torch, ray, pytest'
else
  target="$want"; spec='.'; check='import harness, torch'
fi
# uv installs what pip would (same indexes, find-links and constraints, read from pip's own
# configuration; the best version across them, as pip picks) in ~25 s where pip takes 65-120 s on
# these machines: it unpacks wheels in parallel. pip stays the fallback where uv cannot be had.
install_with_uv() {
  .venv/bin/python -m pip install --quiet --disable-pip-version-check uv >/dev/null 2>&1 || return 1
  local args=(--index-strategy unsafe-best-match) line key value v
  while IFS= read -r line; do
    key=${line%%=*}; key=${key##*.}; value=${line#*=}; value=${value#\'}; value=${value%\'}
    case "$key" in
      index-url|extra-index-url|find-links|constraint) for v in $value; do args+=("--$key" "$v"); done ;;
      cert) export SSL_CERT_FILE="$value" ;;
    esac
  done < <(.venv/bin/python -m pip config list 2>/dev/null)
  .venv/bin/uv pip install --quiet --python .venv/bin/python "${args[@]}" torch==2.13.0 -e "$spec"
}
if { [ "$have" != "$target" ] && [ "$have" != "$want tests" ]; } || ! .venv/bin/python -c "$check" 2>/dev/null; then
  if ! install_with_uv; then
    echo "note: uv could not install the project; installing with pip (slower)" >&2
    # --no-compile: byte-compiling every installed file (torch, ray) costs a minute
    .venv/bin/pip install --quiet --disable-pip-version-check --no-compile torch==2.13.0 -e "$spec"
  fi
  echo "$target" > "$stamp"
fi
# --tests: also byte-compile what runs import, one half per core (~30 s). Where
# PYTHONDONTWRITEBYTECODE is set, as on these machines, every process otherwise compiles torch and
# transformers from source (~6 s each): the test suite starts dozens of processes; the main job
# three, which costs less than compiling first.
compiled=.venv/.codefend-bytecode
if [ "$tests" = 1 ] && [ "$(cat "$compiled" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python scripts/compile_imports.py kernel & kernel=$!
  .venv/bin/python scripts/compile_imports.py libraries
  wait "$kernel"
  echo "$want" > "$compiled"
fi
if ! command -v java >/dev/null 2>&1; then
  echo "note: java not found: caption metrics need it (PTB tokenizer, METEOR); install a JRE (Debian: default-jre-headless)" >&2
fi
if [ "$tests" = 1 ]; then
  # The HTML leaderboard test renders the board in headless Chromium (Debian: chromium, chromium-driver).
  if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1; } \
        || echo "note: could not install chromium + chromium-driver: the HTML leaderboard test will be skipped" >&2
    else
      echo "note: chromium + chromedriver not found (Debian: apt-get install chromium chromium-driver): the HTML leaderboard test will be skipped" >&2
    fi
  fi
fi
