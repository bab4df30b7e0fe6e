#!/usr/bin/env bash
# The waypoint benchmark, one command: tests/bench/run.sh
#
#   hbone_load --HBONE--> [waypoint 127.0.0.61:15008] --HBONE--> hbone serve 127.0.40.1:15008
#              --TCP--> tcp_sink 127.0.40.1:9000
#
# 1. bulk: 1 tunnel x 1 GiB and 8 tunnels x 256 MiB (one HBONE connection), direct (no waypoint)
#    and through the waypoint (--concurrency 1), interleaved direct/waypoint, BENCH_RUNS (3) each;
#    median throughput, ratio, waypoint CPU seconds per GiB.
# 2. idle: waypoint VmRSS with 0, 1,000 and 10,000 open idle tunnels (100 connections).
# The waypoint runs on CPU 0, everything else on CPU 1 (when there are 2+ CPUs).
# Writes tests/bench/results/latest.md (+ latest.jsonl, the raw numbers) and prints it.
#
# Environment: BENCH_BUILD (build dir, default build-bench/), BENCH_RUNS (3),
# BENCH_IDLE ("1000 10000"), BENCH_KEEP=1 keeps the work directory (logs).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${BENCH_BUILD:-$root/build-bench}
runs=${BENCH_RUNS:-3}
idle_counts=${BENCH_IDLE:-"1000 10000"}
results=$root/tests/bench/results
mkdir -p "$results"
say() { printf '%s\n' "$*" >&2; }

# ---- build (release, no sanitizers) ----
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
ninja -C "$build" -j2 waypoint/waypoint hbone/hbone >/dev/null
if ninja -C "$build" -t targets all 2>/dev/null | grep -q '^tests/bench/hbone_load:'; then
        ninja -C "$build" -j2 tests/bench/hbone_load tests/bench/tcp_sink >/dev/null
        LOAD=$build/tests/bench/hbone_load
        SINK=$build/tests/bench/tcp_sink
else
        # tests/meson.build does not include bench/ (yet): build the two tools by hand
        LOAD=$build/bench-hbone_load
        SINK=$build/bench-tcp_sink
        cc -O2 -std=gnu11 -D_GNU_SOURCE -I"$root" tests/bench/hbone_load.c \
                "$build/hbone/libhbone_io.a" "$build/hbone/libhbone.a" \
                "$build/waypoint/base/libwpbase.a" -lnghttp2 -lssl -lcrypto -luring -lpthread \
                -o "$LOAD"
        cc -O2 -std=gnu11 -D_GNU_SOURCE tests/bench/tcp_sink.c -o "$SINK"
fi
WAYPOINT=$build/waypoint/waypoint
HBONE=$build/hbone/hbone

# ---- environment ----
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
work=$(mktemp -d /tmp/wp-bench.XXXXXX)
pids=()
WP=
cleanup() {
        for p in "${pids[@]}" $WP; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        if [ "${BENCH_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
raw=$work/results.jsonl
: >"$raw"
note() {
        say "NOTE: $*"
        /usr/bin/python3 -c 'import json,sys; print(json.dumps({"kind":"note","text":sys.argv[1]}))' \
                "$*" >>"$raw"
}
if [ "$(nproc)" -ge 2 ]; then
        PIN_WP=(taskset -c 0)
        PIN_REST=(taskset -c 1)
        pinning="waypoint on CPU 0; hbone_load, hbone serve, tcp_sink on CPU 1"
else
        PIN_WP=()
        PIN_REST=()
        pinning="none (1 CPU)"
fi
[ "$nofile" -ge 10300 ] || note "ulimit -n is $nofile: 10,000 idle tunnels need about 10,300 fds in hbone serve"

/usr/bin/python3 tests/tools/mkpki.py "$work/pki" >/dev/null
P=$work/pki
/usr/bin/python3 tests/bench/gen_config.py >"$work/waypoint.json"
CLIENT=(--cert "$P/client.pem" --key "$P/client.key" --root "$P/root.pem")

wait_port() { # host port
        for _ in $(seq 100); do
                (: <"/dev/tcp/$1/$2") 2>/dev/null && return 0
                sleep 0.05
        done
        say "nothing listens on $1:$2"
        return 1
}
cpu_ticks() { # utime + stime of the whole process (all threads)
        awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' "/proc/$1/stat"
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)

start_waypoint() { # tag
        "${PIN_WP[@]}" "$WAYPOINT" --config-file "$work/waypoint.json" \
                --cert-file "$P/waypoint.pem" --key-file "$P/waypoint.key" --root-cert "$P/root.pem" \
                --hbone-address 127.0.0.61:15008 --admin-address 127.0.0.61:15000 \
                --concurrency 1 --log-level warn --drain-ms 0 2>"$work/waypoint-$1.log" &
        WP=$!
        for _ in $(seq 100); do
                curl -sf http://127.0.0.61:15000/ready >/dev/null 2>&1 && return 0
                kill -0 "$WP" 2>/dev/null || break
                sleep 0.05
        done
        say "waypoint did not become ready; log:"
        cat "$work/waypoint-$1.log" >&2
        exit 1
}
stop_waypoint() {
        kill -TERM "$WP" 2>/dev/null || true
        wait "$WP" 2>/dev/null || true
        WP=
}
check_waypoint() { # what
        if ! kill -0 "$WP" 2>/dev/null; then
                local rc=0
                wait "$WP" || rc=$?
                note "waypoint exited (status $rc) during $1; log tail: $(tail -5 "$work"/waypoint-*.log | tr '\n' ' ')"
                WP=
                return 1
        fi
}

# ---- destination side (shared by every run) ----
"${PIN_REST[@]}" "$SINK" --listen 127.0.40.1:9000 >"$work/sink.json" 2>"$work/sink.log" &
SINK_PID=$!
pids+=($SINK_PID)
"${PIN_REST[@]}" "$HBONE" serve --listen 127.0.40.1:15008 --cert "$P/dest.pem" \
        --key "$P/dest.key" --root "$P/root.pem" 2>"$work/serve.log" &
pids+=($!)
wait_port 127.0.40.1 9000
wait_port 127.0.40.1 15008

start_waypoint bulk
io_backend=$(curl -s http://127.0.0.61:15000/server_info |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("io_backend","?"))' || echo "?")
/usr/bin/python3 - "$work" >>"$raw" <<PY
import json, subprocess
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
cpu = sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip()
print(json.dumps({"kind": "env", "date": sh("date -u +%Y-%m-%dT%H:%MZ"), "kernel": sh("uname -r"),
    "cpu": cpu, "ncpu": sh("nproc"), "openssl": sh("openssl version"),
    "nghttp2": sh("pkg-config --modversion libnghttp2"), "io_backend": "$io_backend",
    "pinning": "$pinning", "commit": sh("git -C '$root' describe --always --dirty 2>/dev/null")}))
PY

# ---- bulk ----
bulk_run() { # path load-label tunnels bytes run
        local path=$1 label=$2 n=$3 bytes=$4 run=$5 server authority c0=0 c1=0 cpu=null res
        if [ "$path" = waypoint ]; then
                server=127.0.0.61:15008
                authority=127.201.0.1:9000
                c0=$(cpu_ticks "$WP")
        else
                server=127.0.40.1:15008
                authority=127.0.40.1:9000
        fi
        res=$("${PIN_REST[@]}" "$LOAD" --server $server --authority $authority "${CLIENT[@]}" \
                --connections 1 --tunnels "$n" --bytes "$bytes" --timeout-seconds 120 \
                2>>"$work/load.log") || true
        [ -n "$res" ] || res="{\"failed\":$n,\"gbps\":0,\"bytes_sent\":0,\"error\":\"hbone_load crashed\"}"
        if [ "$path" = waypoint ]; then
                if check_waypoint "bulk $label run $run"; then
                        c1=$(cpu_ticks "$WP")
                        cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / t }')
                else
                        start_waypoint bulk-restarted
                fi
        fi
        say "$(printf '%-9s %-28s run %d: %s' "$path" "$label" "$run" "$res")"
        printf '{"kind":"bulk","path":"%s","load":"%s","run":%d,"wp_cpu_s":%s,"result":%s}\n' \
                "$path" "$label" "$run" "$cpu" "$res" >>"$raw"
}
for run in $(seq "$runs"); do
        for path in direct waypoint; do
                bulk_run $path "1 tunnel x 1 GiB" 1 1g "$run"
        done
        for path in direct waypoint; do
                bulk_run $path "8 tunnels x 256 MiB (1 conn)" 8 256m "$run"
        done
done
stop_waypoint

# ---- idle tunnels: fresh waypoint ----
start_waypoint idle
sleep 1
printf '{"kind":"idle","tunnels":0,"rss_kb":%s,"result":null}\n' "$(rss_kb "$WP")" >>"$raw"
for n in $idle_counts; do
        out=$work/idle-$n.out
        "${PIN_REST[@]}" "$LOAD" --server 127.0.0.61:15008 --authority 127.201.0.1:9000 \
                "${CLIENT[@]}" --connections 100 --tunnels "$n" --idle --timeout-seconds 120 \
                >"$out" 2>>"$work/load.log" &
        lp=$!
        for _ in $(seq 1200); do
                grep -q '^READY' "$out" && break
                kill -0 $lp 2>/dev/null || break
                sleep 0.1
        done
        sleep 1
        if ! check_waypoint "idle $n"; then
                kill $lp 2>/dev/null || true
                wait $lp 2>/dev/null || true
                break
        fi
        rss=$(rss_kb "$WP")
        fds=$(ls "/proc/$WP/fd" | wc -l)
        ready=$(sed -n 's/^READY //p' "$out")
        kill -TERM $lp 2>/dev/null || true
        wait $lp 2>/dev/null || true
        res=$(grep '^{' "$out" || echo null)
        say "idle $n: READY ${ready:-none}, waypoint VmRSS $rss KiB, $fds fds; $res"
        [ "${ready:-0}" = "$n" ] || note "idle $n: only ${ready:-0} tunnels established: $res"
        printf '{"kind":"idle","tunnels":%d,"rss_kb":%s,"fds":%s,"result":%s}\n' \
                "$n" "$rss" "$fds" "$res" >>"$raw"
        sleep 1
done
stop_waypoint

cp "$raw" "$results/latest.jsonl"
/usr/bin/python3 tests/bench/report.py "$raw" >"$results/latest.md"
cat "$results/latest.md"
