#!/usr/bin/env bash
# The test command: builds with AddressSanitizer + UndefinedBehaviorSanitizer and runs every
# suite (unit, then end to end on both I/O backends, then the benchmarks' smoke run).
#   tests/run.sh            all suites
#   tests/run.sh unit       one suite
set -euo pipefail
cd "$(dirname "$0")/.."
build=${WP_BUILD_DIR:-build-ci}
if [ ! -f "$build/build.ninja" ]; then
        meson setup "$build" -Db_sanitize=address,undefined -Db_lundef=false -Dbuildtype=debugoptimized
fi
ninja -C "$build"
suites=("$@")
[ ${#suites[@]} -gt 0 ] || suites=(unit e2e bench)
args=()
for s in "${suites[@]}"; do args+=(--suite "$s"); done
meson test -C "$build" --print-errorlogs --num-processes 2 "${args[@]}"
