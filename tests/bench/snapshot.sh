#!/usr/bin/env bash
# Snapshot benchmark (issue 3): time and peak memory to compile and publish a snapshot of
# 1,000 services x 3 ports x 10 endpoints through the real delta-ADS path, and of a one-endpoint
# change on top of it; the compile alone; wp_snapshot_lookup cost. See bench_snapshot.c.
#
#   tests/bench/snapshot.sh            -> tests/bench/results/snapshot.md (and stdout)
#
# Environment: SNAPBENCH_BUILD (release build dir, default /tmp/build-snapbench),
# SNAPBENCH_SERVICES (1000), SNAPBENCH_PORTS (3), SNAPBENCH_ENDPOINTS (10), SNAPBENCH_RUNS (5),
# SNAPBENCH_BASELINE=<git rev>: also run the benchmark linked with waypoint/snapshot.c and
# xds-client/resources.c as they are at <rev> (everything else current), for a before/after.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${SNAPBENCH_BUILD:-/tmp/build-snapbench}
svcs=${SNAPBENCH_SERVICES:-1000}
ports=${SNAPBENCH_PORTS:-3}
eps=${SNAPBENCH_ENDPOINTS:-10}
runs=${SNAPBENCH_RUNS:-5}
baseline=${SNAPBENCH_BASELINE:-}
results=$root/tests/bench/results
out=$results/snapshot.md
mkdir -p "$results"
say() { printf '%s\n' "$*" >&2; }
export GIT_OPTIONAL_LOCKS=0 # git status below must not rewrite the index (others use the repo)

[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
ninja -C "$build" -j2 tests/bench/bench_snapshot >/dev/null
bench=$build/tests/bench/bench_snapshot
args=(-s "$svcs" -p "$ports" -e "$eps" -r "$runs" -f "$root/tests/data/istiod-waypoint-bookinfo.json")

work=$(mktemp -d /tmp/snapbench.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The baseline binary: the same benchmark object, with the two files of <rev> linked ahead of
# the libraries (their archive members then stay out: they define the same symbols).
if [ -n "$baseline" ]; then
        git rev-parse --verify -q "$baseline^{commit}" >/dev/null ||
                { say "SNAPBENCH_BASELINE: $baseline is not a commit"; exit 2; }
        for f in waypoint/snapshot.c xds-client/resources.c; do
                git show "$baseline:$f" >"$work/$(basename "$f")"
        done
        /usr/bin/python3 - "$build" "$root" "$work" <<'PY'
import json, os, shlex, subprocess, sys
build, root, work = sys.argv[1:]
for e in json.load(open(os.path.join(build, 'compile_commands.json'))):
    src = os.path.normpath(os.path.join(e['directory'], e['file']))
    rel = os.path.relpath(src, root)
    if rel not in ('waypoint/snapshot.c', 'xds-client/resources.c'):
        continue
    argv = shlex.split(e['command'])
    name = os.path.basename(rel)
    # compile <work>/<name> in place of the source, to <work>/<name>.o, without dep files
    cmd, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ('-o', '-MF', '-MQ'):
            skip = True
            continue
        if a in ('-MD', '-c') or a == e['file']:
            continue
        cmd.append(a)
    cmd += ['-c', os.path.join(work, name), '-o', os.path.join(work, name + '.o')]
    subprocess.run(cmd, cwd=e['directory'], check=True)
PY
        link=$(grep -A1 '^build tests/bench/bench_snapshot:' "$build/build.ninja" | sed -n 2p |
               sed 's/^ *LINK_ARGS = //')
        (cd "$build" && cc -o "$work/bench_snapshot_baseline" \
                tests/bench/bench_snapshot.p/bench_snapshot.c.o \
                "$work/snapshot.c.o" "$work/resources.c.o" $link)
fi

cpu=$(grep -m1 'model name' /proc/cpuinfo | sed 's/.*: //' || true)
rev=$(git rev-parse --short HEAD 2>/dev/null || echo '?')
dirty=$(git status --porcelain -- waypoint/snapshot.c xds-client/resources.c tests/bench 2>/dev/null |
        grep -q . && echo ' + uncommitted changes' || true)
say "current tree..."
"$bench" "${args[@]}" -m "$work/current.md" >/dev/null
if [ -n "$baseline" ]; then
        say "baseline ($baseline: snapshot.c, resources.c)..."
        "$work/bench_snapshot_baseline" "${args[@]}" -m "$work/baseline.md" >/dev/null
fi

{
        echo "# Snapshot compile and publish benchmark"
        echo
        echo "\`tests/bench/snapshot.sh\` — $(date -u +%Y-%m-%d), commit $rev$dirty, release build" \
             "(\`-Dbuildtype=release\`), $(nproc) CPUs${cpu:+ ($cpu)}, shared machine: read the" \
             "medians, the maxima are noise."
        echo
        echo "Resources are shaped as istiod sends them to a waypoint (the TCP service of" \
             "tests/data/istiod-waypoint-bookinfo.json): per service-port an EDS Cluster, a" \
             "ClusterLoadAssignment of HBONE endpoints and a tcp_proxy filter chain; main_internal's" \
             "matcher is one /32 VIP range per service, then an exact port map. The ADS rows go" \
             "through xds_ads_on_message with delta responses (CDS, EDS, LDS, empty WDS), on_update" \
             "= wp_snapshot_build + publish (swap, unref the previous); the change is one delta EDS" \
             "response with one endpoint of one CLA moved. Heap figures count every malloc (the" \
             "benchmark interposes malloc); RSS is VmHWM growth."
        echo
        echo "## Current tree"
        echo
        cat "$work/current.md"
        if [ -n "$baseline" ]; then
                echo
                echo "## Baseline: waypoint/snapshot.c and xds-client/resources.c at $baseline"
                echo
                cat "$work/baseline.md"
        fi
} >"$out"
cat "$out"
