#!/usr/bin/env bash
# The benchmarks side by side with peers (issue 6), one command: tests/bench/all.sh
#
# Builds the release tree, starts the systems under test (SUT) one scenario at a time, runs every
# scenario for our waypoint and its peer interleaved (A B A B ...), and regenerates
# docs/benchmarks.md + docs/img/*.png from the raw results (tests/bench/results/all.jsonl).
#
#   relay      L4 relay, bulk: hbone_load -HBONE-> SUT -HBONE-> hbone serve -TCP-> tcp_sink;
#              1 and 8 streams on one connection. Peer: nghttpx (http2-proxy, peers/relay.nghttpx.conf)
#   terminate  HBONE terminate, bulk: hbone_load -HBONE-> SUT -TCP-> tcp_sink.
#              Peer: HAProxy (peers/terminate.haproxy.cfg; tcp_sink --connect answers its CONNECT)
#   l7         L7 requests, 1 KiB GET: peers get TLS h2 in -> route + header rule -> TLS h2 out
#              (peers/l7.haproxy.cfg, peers/l7.nghttpx.conf); the waypoint gets HBONE in with HTTP
#              (inner h1, inner h2) -> RBAC + header route + Istio metrics -> HBONE out. Backend:
#              HAProxy (peers/backend.haproxy.cfg). Saturation (closed loop) and a fixed 2,000
#              req/s; "direct" rows are the same load with no proxy (the pass-through baseline
#              for latency added and the load side's ceiling).
#   full       Full waypoint: the waypoint's L7 path at fixed 1k, 5k, 20k req/s and saturation,
#              inner h1 and h2, against direct; peer: Istio's published Envoy waypoint figures.
#   tunnels    VmRSS idle and with 1,000 and 10,000 idle tunnels (fresh process per run).
#              Peer: HAProxy (terminate config).
#   handshakes new mTLS connections (each with one tunnel) per CPU-second of the SUT.
#   stock      cross-check with independent load tools through `hbone forward` (TCP -> one tunnel
#              per connection): iperf3 through the waypoint's relay and h2load (h2c, 4
#              connections x 16 streams) through the waypoint's L7 path and direct.
#
# The SUT runs on CPU 0 (taskset), everything else on CPU 1; SUT CPU = utime+stime from
# /proc/<pid>/stat (all threads; nghttpx's worker process included). Every run checks that the
# traffic reached the backend (sink bytes, backend request counters).
#
# Environment: BENCH_RUNS (5), BENCH_SECONDS (5, per request run), BENCH_BULK (1g bytes per bulk
# run), BENCH_IDLE ("1000 10000"), BENCH_HS (500 connections per handshake run), BENCH_RATES
# ("1000 5000 20000"), BENCH_SCENARIOS (all: "relay terminate l7 full tunnels handshakes stock"),
# BENCH_BUILD (release build dir, default build-bench/), BENCH_NET (127.0.43: SUT .1, destination
# .2; smoke: 127.0.100-199 from the pid), BENCH_OUT (docs/), BENCH_SMOKE=1 (CI smoke: 1 short run each, report to a temp dir;
# exit 77 when a peer binary is missing), BENCH_KEEP=1 keeps the work directory (logs),
# BENCH_PERF=1 records a `perf record -g` profile of the SUT during every run into the work
# directory (perf-<scenario>-<sut>-<run>.data; use with BENCH_KEEP=1 and BENCH_OUT=/tmp/x);
# BENCH_PERF=dwarf unwinds with DWARF (call chains through code built without frame pointers).
# The whole script is one { } group: bash parses it before running, so editing this file
# while a run is going on cannot derail that run.
{
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
smoke=${BENCH_SMOKE:-0}
if [ "$smoke" = 1 ]; then
        runs=${BENCH_RUNS:-1}
        secs=${BENCH_SECONDS:-1.2}
        bulk=${BENCH_BULK:-32m}
        idle_counts=${BENCH_IDLE:-"100 300"}
        hs_n=${BENCH_HS:-40}
        rates=${BENCH_RATES:-"1000"}
        net=${BENCH_NET:-127.0.$((100 + $$ % 100))} # two smoke runs at once must not collide
else
        runs=${BENCH_RUNS:-5}
        secs=${BENCH_SECONDS:-5}
        bulk=${BENCH_BULK:-1g}
        idle_counts=${BENCH_IDLE:-"1000 10000"}
        hs_n=${BENCH_HS:-500}
        rates=${BENCH_RATES:-"1000 5000 20000"}
        net=${BENCH_NET:-127.0.43}
fi
scenarios=${BENCH_SCENARIOS:-"relay terminate l7 full tunnels handshakes stock"}
build=${BENCH_BUILD:-$root/build-bench}
say() { printf '%s\n' "$*" >&2; }

for b in haproxy nghttpx taskset curl; do
        if ! command -v $b >/dev/null && [ ! -x /usr/sbin/$b ]; then
                say "SKIP: $b is not installed (apt-get install haproxy nghttp2-proxy)"
                exit 77
        fi
done
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)
NGHTTPX=$(command -v nghttpx || echo /usr/sbin/nghttpx)

# ---- build (release, no sanitizers; the smoke test reuses the build it runs from) ----
# (under `meson test` the tools are already built: BENCH_SMOKE with an existing build skips ninja)
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
if [ "$smoke" != 1 ] || [ ! -x "$build/tests/bench/http_load" ]; then
        if ! out=$(ninja -C "$build" -j2 waypoint/waypoint hbone/hbone tests/bench/hbone_load \
                tests/bench/http_load tests/bench/tcp_sink 2>&1); then
                say "$out"
                say "build failed"
                exit 1
        fi
fi
WAYPOINT=$build/waypoint/waypoint
HBONE=$build/hbone/hbone
HLOAD=$build/tests/bench/hbone_load
RLOAD=$build/tests/bench/http_load
SINK=$build/tests/bench/tcp_sink

SUT=$net.1
POD=$net.2
VIPNET=127.201.${net##*.}

# ---- environment ----
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
work=$(mktemp -d /tmp/wp-allbench.XXXXXX)
pids=()
cleanup() {
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        if [ "${BENCH_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
raw=$work/all.jsonl
: >"$raw"
if [ "$(nproc)" -ge 2 ]; then
        PIN_SUT=(taskset -c 0)
        PIN_REST=(taskset -c 1)
        pinning="system under test on CPU 0; load, destination stand-ins, backend on CPU 1"
else
        PIN_SUT=()
        PIN_REST=()
        pinning="none (1 CPU)"
fi
emit() { printf '%s\n' "$1" >>"$raw"; }
note() {
        say "NOTE: $*"
        emit "$(/usr/bin/python3 -c 'import json,sys; print(json.dumps({"kind":"note","text":sys.argv[1]}))' "$*")"
}

/usr/bin/python3 tests/tools/mkpki.py "$work/pki" >/dev/null
P=$work/pki
cat "$P/dest.pem" "$P/dest.key" >"$P/dest.full.pem"
cat "$P/waypoint.pem" "$P/waypoint.key" >"$P/waypoint.full.pem"
head -c 1024 /dev/zero | tr '\0' 'x' >"$work/body"
CLIENT=(--cert "$P/client.pem" --key "$P/client.key" --root "$P/root.pem")
render() { # peers/FILE -> $work/FILE
        sed -e "s|@WORK@|$work|g; s|@SUT@|$SUT|g; s|@POD@|$POD|g" "tests/bench/peers/$1" \
                >"$work/$1"
}
/usr/bin/python3 tests/bench/gen_config.py --vip "$VIPNET.1" --port 9000 --pod "$POD" \
        --node-ip "$SUT" >"$work/relay.json"
/usr/bin/python3 tests/bench/gen_config.py --vip "$VIPNET.2" --port 9003 --pod "$POD" \
        --node-ip "$SUT" --plain >"$work/terminate.json"
/usr/bin/python3 tests/bench/gen_http_config.py --vip "$VIPNET.3" --port 9001 --pod "$POD" \
        --node-ip "$SUT" >"$work/http.json"
/usr/bin/python3 tests/bench/gen_config.py --vip "$VIPNET.4" --port 5201 --pod "$POD" \
        --node-ip "$SUT" >"$work/stock.json"

wait_port() { # host port
        for _ in $(seq 200); do
                (: <"/dev/tcp/$1/$2") 2>/dev/null && return 0
                sleep 0.05
        done
        say "nothing listens on $1:$2"
        return 1
}
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime+stime of a process and its children processes (all threads)
        local t=0 p
        for p in $1 $(pgrep -P "$1" || true); do
                t=$((t + $(awk '{ sub(/^.*\) /, ""); split($0, f, " "); print f[12] + f[13] }' \
                        "/proc/$p/stat" 2>/dev/null || echo 0)))
        done
        echo $t
}
rss_kb() { # VmRSS of a process and its children
        local t=0 p
        for p in $1 $(pgrep -P "$1" || true); do
                t=$((t + $(awk '/^VmRSS:/ { print $2 }' "/proc/$p/status" 2>/dev/null || echo 0)))
        done
        echo $t
}
PERF_PID=
perf_start() { # label: profile the SUT (BENCH_PERF=1)
        [ "${BENCH_PERF:-0}" != 0 ] || return 0
        local p g=-g
        [ "$BENCH_PERF" != dwarf ] || g=--call-graph=dwarf,16384
        p=$(echo $SUTPID $(pgrep -P "$SUTPID" || true) | tr ' ' ',')
        "${PIN_REST[@]}" perf record -q $g -F 999 -p "$p" -o "$work/perf-$1.data" \
                >/dev/null 2>&1 &
        PERF_PID=$!
        sleep 0.3
}
perf_stop() {
        [ -n "$PERF_PID" ] || return 0
        kill -INT "$PERF_PID" 2>/dev/null || true
        wait "$PERF_PID" 2>/dev/null || true
        PERF_PID=
}
ticks_to_s() { awk -v a="$1" -v b="$2" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (b - a) / t }'; }

# ---- systems under test: start_sut NAME -> $SUTPID, SUT address in $SUTADDR ----
SUTPID=
start_sut() { # name
        local name=$1 port
        case $name in
        wp-relay | wp-terminate | wp-http | wp-stock)
                "${PIN_SUT[@]}" "$WAYPOINT" --config-file "$work/${name#wp-}.json" \
                        --cert-file "$P/waypoint.pem" --key-file "$P/waypoint.key" \
                        --root-cert "$P/root.pem" --hbone-address "$SUT:15008" \
                        --admin-address "$SUT:15000" --metrics-address "$SUT:15020" \
                        --concurrency 1 --log-level warn --drain-ms 0 \
                        2>>"$work/$name.log" &
                port=15008
                ;;
        nghttpx-relay)
                render relay.nghttpx.conf
                "${PIN_SUT[@]}" "$NGHTTPX" --conf "$work/relay.nghttpx.conf" 2>>"$work/$name.log" &
                port=15008
                ;;
        nghttpx-l7)
                render l7.nghttpx.conf
                "${PIN_SUT[@]}" "$NGHTTPX" --conf "$work/l7.nghttpx.conf" 2>>"$work/$name.log" &
                port=8444
                ;;
        haproxy-terminate | haproxy-l7)
                render "${name#haproxy-}.haproxy.cfg"
                "${PIN_SUT[@]}" "$HAPROXY" -db -f "$work/${name#haproxy-}.haproxy.cfg" \
                        >>"$work/$name.log" 2>&1 &
                port=$([ "$name" = haproxy-l7 ] && echo 8443 || echo 15008)
                ;;
        esac
        SUTPID=$!
        SUTADDR=$SUT:$port
        if ! wait_port "$SUT" "$port"; then
                tail -5 "$work/$name.log" >&2
                exit 1
        fi
        if [[ $name == nghttpx-* ]]; then # its worker process does the work
                for _ in $(seq 100); do
                        pgrep -P "$SUTPID" >/dev/null && break
                        sleep 0.05
                done
        fi
}
stop_sut() {
        kill -TERM "$SUTPID" 2>/dev/null || true
        wait "$SUTPID" 2>/dev/null || true
        SUTPID=
        sleep 0.2 # the port must be free for the next SUT
}

# ---- destination side: hbone serve, sinks, backend (CPU 1, shared by every run) ----
"${PIN_REST[@]}" "$SINK" --listen "$POD:9000" >"$work/sink.json" 2>"$work/sink.log" &
SINK_PID=$!
pids+=($SINK_PID)
"${PIN_REST[@]}" "$SINK" --listen "$POD:9002" --connect >"$work/sinkc.json" 2>"$work/sinkc.log" &
SINKC_PID=$!
pids+=($SINKC_PID)
"${PIN_REST[@]}" "$SINK" --listen "$POD:9003" >"$work/sinkt.json" 2>"$work/sinkt.log" &
SINKT_PID=$!
pids+=($SINKT_PID)
"${PIN_REST[@]}" "$HBONE" serve --listen "$POD:15008" --cert "$P/dest.pem" --key "$P/dest.key" \
        --root "$P/root.pem" 2>"$work/serve.log" &
pids+=($!)
render backend.haproxy.cfg
"${PIN_REST[@]}" "$HAPROXY" -db -f "$work/backend.haproxy.cfg" >"$work/backend.log" 2>&1 &
pids+=($!)
wait_port "$POD" 9000
wait_port "$POD" 9002
wait_port "$POD" 9003
wait_port "$POD" 15008
wait_port "$POD" 9001
wait_port "$POD" 9443

backend_requests() { # total requests answered by the backend (both frontends)
        /usr/bin/python3 - "$work/backend.sock" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"show stat\n")
data = b""
while True:
    b = s.recv(65536)
    if not b:
        break
    data += b
lines = data.decode().splitlines()
hdr = lines[0].lstrip("# ").split(",")
i, t = hdr.index("req_tot"), 0
for l in lines[1:]:
    f = l.split(",")
    if len(f) > i and f[1] == "FRONTEND" and f[i]:
        t += int(f[i])
print(t)
PY
}

/usr/bin/python3 - >>"$raw" <<PY
import json, subprocess
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
print(json.dumps({"kind": "env", "date": sh("date -u +%Y-%m-%dT%H:%MZ"), "kernel": sh("uname -r"),
    "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip(), "ncpu": sh("nproc"),
    "openssl": sh("openssl version"), "nghttp2": sh("pkg-config --modversion libnghttp2"),
    "haproxy": sh("$HAPROXY -v | head -1"), "nghttpx": sh("$NGHTTPX --version | head -1"),
    "loadavg": sh("cut -d' ' -f1-3 /proc/loadavg"), "pinning": "$pinning",
    "runs": $runs, "seconds": $secs, "bulk": "$bulk", "smoke": $smoke,
    "commit": sh("git -C '$root' describe --always --dirty 2>/dev/null")}))
PY

# ---- bulk: relay and terminate ----
bulk_run() { # scenario sut-name authority streams run
        local sc=$1 name=$2 auth=$3 n=$4 run=$5 per c0 c1 s0 res sinkpid
        per=$(/usr/bin/python3 -c "
import sys
s='$bulk'; m={'k':1<<10,'m':1<<20,'g':1<<30}
v=int(s[:-1])*m[s[-1]] if s[-1] in m else int(s)
print(v//$n)")
        start_sut "$name"
        perf_start "$sc-$name-$n-$run"
        c0=$(cpu_ticks "$SUTPID")
        res=$("${PIN_REST[@]}" "$HLOAD" --server "$SUTADDR" --authority "$auth" "${CLIENT[@]}" \
                --connections 1 --tunnels "$n" --bytes "$per" --sent-is-done \
                --timeout-seconds 120 2>>"$work/load.log") || true
        c1=$(cpu_ticks "$SUTPID")
        perf_stop
        kill -0 "$SUTPID" 2>/dev/null || note "$name exited during $sc run $run"
        stop_sut
        [ -n "$res" ] || res='{"failed":1,"gbps":0,"bytes_sent":0,"error":"hbone_load crashed"}'
        say "$(printf '%-10s %-18s %d streams run %d: %s' "$sc" "$name" "$n" "$run" "$res")"
        emit "{\"kind\":\"bulk\",\"scenario\":\"$sc\",\"sut\":\"$name\",\"streams\":$n,\"run\":$run,\"cpu_s\":$(ticks_to_s "$c0" "$c1"),\"result\":$res}"
}
for sc in relay terminate; do
        [[ " $scenarios " == *" $sc "* ]] || continue
        for run in $(seq "$runs"); do
                for n in 1 8; do
                        if [ $sc = relay ]; then
                                bulk_run relay wp-relay "$VIPNET.1:9000" $n "$run"
                                bulk_run relay nghttpx-relay "$POD:9000" $n "$run"
                        else
                                bulk_run terminate wp-terminate "$VIPNET.2:9003" $n "$run"
                                bulk_run terminate haproxy-terminate "$POD:9002" $n "$run"
                        fi
                done
        done
done

# ---- HTTP: l7 and full ----
# http_run scenario label sut-name|- mode(sat|RATE) run load-args...
http_run() {
        local sc=$1 label=$2 name=$3 mode=$4 run=$5 c0=0 c1=0 b0 b1 res cpu=null rate_args=()
        shift 5
        [ "$mode" = sat ] || rate_args=(--rate "$mode")
        b0=$(backend_requests)
        [ "$name" = - ] || { perf_start "$sc-$label-$mode-$run"; c0=$(cpu_ticks "$SUTPID"); }
        res=$("${PIN_REST[@]}" "$RLOAD" "${CLIENT[@]}" "$@" "${rate_args[@]}" \
                --duration "$secs" --warmup 0.5 --path /bench/get --header 'x-bench: 1' \
                2>>"$work/load.log") || true
        if [ "$name" != - ]; then
                perf_stop
                c1=$(cpu_ticks "$SUTPID")
                cpu=$(ticks_to_s "$c0" "$c1")
                kill -0 "$SUTPID" 2>/dev/null || { note "$name exited during $label"; exit 1; }
        fi
        b1=$(backend_requests)
        [ -n "$res" ] || res='{"requests":0,"requests_total":0,"rps":0,"error":"http_load crashed"}'
        say "$(printf '%-5s %-16s %-6s run %d: %s' "$sc" "$label" "$mode" "$run" "$res")"
        emit "{\"kind\":\"http\",\"scenario\":\"$sc\",\"sut\":\"$label\",\"mode\":\"$mode\",\"run\":$run,\"cpu_s\":$cpu,\"backend_requests\":$((b1 - b0)),\"result\":$res}"
}
WPH=(--server "$SUT:15008" --authority "$VIPNET.3:9001")
DIRH=(--server "$POD:15008" --authority "$POD:9001")
H1_SAT=(--proto h1 --connections 1 --tunnels 16)
H2_SAT=(--proto h2 --connections 1 --tunnels 4 --streams 16)
TLS_SAT=(--tls --connections 4 --streams 16)
H1_RATE=(--proto h1 --connections 1 --tunnels 64)
H2_RATE=(--proto h2 --connections 1 --tunnels 4 --streams 32)
TLS_RATE=(--tls --connections 4 --streams 32)

shapes() { # mode: the load shapes (h1, h2, t) for saturation or a fixed rate
        if [ "$1" = sat ]; then
                h1=("${H1_SAT[@]}") h2=("${H2_SAT[@]}") t=("${TLS_SAT[@]}")
        else
                h1=("${H1_RATE[@]}") h2=("${H2_RATE[@]}") t=("${TLS_RATE[@]}")
        fi
}
waypoint_runs() { # scenario mode run: inner HTTP/1.1 and HTTP/2 through one waypoint process
        start_sut wp-http
        http_run "$1" waypoint-h1 wp-http "$2" "$3" "${WPH[@]}" "${h1[@]}"
        [ $h2_inner = 0 ] || http_run "$1" waypoint-h2 wp-http "$2" "$3" "${WPH[@]}" "${h2[@]}"
        stop_sut
}
direct_runs() { # scenario mode run: the same loads with no proxy (HBONE straight to hbone serve)
        http_run "$1" direct-hbone-h1 - "$2" "$3" "${DIRH[@]}" "${h1[@]}"
        http_run "$1" direct-hbone-h2 - "$2" "$3" "${DIRH[@]}" "${h2[@]}"
}
h2_inner=1
if [[ " $scenarios " == *" l7 "* || " $scenarios " == *" full "* ]]; then
        # sanity: the route, the header rule and RBAC are in effect; inner h2 is supported
        start_sut wp-http
        if "${PIN_REST[@]}" "$RLOAD" "${CLIENT[@]}" "${WPH[@]}" --proto h1 --duration 0.3 \
                --warmup 0 --path /other >/dev/null 2>&1; then
                say "a request without the route's match was answered 200 by the waypoint"
                exit 1
        fi
        if ! "${PIN_REST[@]}" "$RLOAD" "${CLIENT[@]}" "${WPH[@]}" --proto h2 --duration 0.3 \
                --warmup 0 --path /bench/get --header 'x-bench: 1' >"$work/h2check.json" \
                2>&1; then
                h2_inner=0
                emit '{"kind":"unsupported","what":"waypoint: HTTP/2 inside HBONE tunnels"}'
                note "the waypoint refused inner HTTP/2: $(head -c 300 "$work/h2check.json")"
        fi
        stop_sut
fi

if [[ " $scenarios " == *" l7 "* ]]; then
        for run in $(seq "$runs"); do
                for mode in sat 2000; do
                        shapes $mode
                        waypoint_runs l7 $mode "$run"
                        start_sut haproxy-l7
                        http_run l7 haproxy haproxy-l7 $mode "$run" --server "$SUTADDR" "${t[@]}"
                        stop_sut
                        start_sut nghttpx-l7
                        http_run l7 nghttpx nghttpx-l7 $mode "$run" --server "$SUTADDR" "${t[@]}"
                        stop_sut
                        http_run l7 direct-tls - $mode "$run" --server "$POD:9443" "${t[@]}"
                        direct_runs l7 $mode "$run"
                done
        done
fi

if [[ " $scenarios " == *" full "* ]]; then
        for run in $(seq "$runs"); do
                for mode in $rates sat; do
                        shapes $mode
                        waypoint_runs full $mode "$run"
                        direct_runs full $mode "$run"
                done
        done
fi

# ---- tunnels: RSS idle and with N idle tunnels (fresh SUT per run) ----
if [[ " $scenarios " == *" tunnels "* ]]; then
        for run in $(seq "$runs"); do
                for name in wp-relay haproxy-terminate; do
                        start_sut "$name"
                        auth=$([ $name = wp-relay ] && echo "$VIPNET.1:9000" || echo "$POD:9002")
                        sleep 1
                        emit "{\"kind\":\"idle\",\"sut\":\"$name\",\"run\":$run,\"tunnels\":0,\"rss_kb\":$(rss_kb "$SUTPID")}"
                        for n in $idle_counts; do
                                out=$work/idle-$name-$n.out
                                "${PIN_REST[@]}" "$HLOAD" --server "$SUTADDR" --authority "$auth" \
                                        "${CLIENT[@]}" --connections 100 --tunnels "$n" --idle \
                                        --timeout-seconds 120 >"$out" 2>>"$work/load.log" &
                                lp=$!
                                for _ in $(seq 1200); do
                                        grep -q '^READY' "$out" && break
                                        kill -0 $lp 2>/dev/null || break
                                        sleep 0.1
                                done
                                sleep 1
                                rss=$(rss_kb "$SUTPID")
                                ready=$(sed -n 's/^READY //p' "$out")
                                kill -TERM $lp 2>/dev/null || true
                                wait $lp 2>/dev/null || true
                                say "tunnels $name run $run: $n idle tunnels (${ready:-0} ready): VmRSS $rss KiB"
                                emit "{\"kind\":\"idle\",\"sut\":\"$name\",\"run\":$run,\"tunnels\":$n,\"ready\":${ready:-0},\"rss_kb\":$rss}"
                                sleep 0.5
                        done
                        stop_sut
                done
        done
fi

# ---- handshakes: new mTLS connections (one tunnel each) per CPU-second ----
if [[ " $scenarios " == *" handshakes "* ]]; then
        for run in $(seq "$runs"); do
                for name in wp-relay haproxy-terminate nghttpx-relay; do
                        start_sut "$name"
                        case $name in
                        wp-relay) auth=$VIPNET.1:9000 ;;
                        haproxy-terminate) auth=$POD:9002 ;;
                        *) auth=$POD:9000 ;;
                        esac
                        perf_start "hs-$name-$run"
                        c0=$(cpu_ticks "$SUTPID")
                        t0=$(date +%s.%N)
                        res=$("${PIN_REST[@]}" "$HLOAD" --server "$SUTADDR" --authority "$auth" \
                                "${CLIENT[@]}" --connections "$hs_n" --tunnels "$hs_n" --idle \
                                --hold-seconds 0.01 --timeout-seconds 120 2>>"$work/load.log" |
                                grep '^{') || true
                        t1=$(date +%s.%N)
                        c1=$(cpu_ticks "$SUTPID")
                        perf_stop
                        stop_sut
                        [ -n "$res" ] || res='{"ok":0,"error":"hbone_load crashed"}'
                        say "handshakes $name run $run: $res"
                        emit "{\"kind\":\"hs\",\"sut\":\"$name\",\"run\":$run,\"conns\":$hs_n,\"cpu_s\":$(ticks_to_s "$c0" "$c1"),\"wall_s\":$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }'),\"result\":$res}"
                done
        done
fi

# ---- stock tools through `hbone forward` ----
FWD=$net.3
FWD_PID=
start_forward() { # listen-port server authority
        "${PIN_REST[@]}" "$HBONE" forward --listen "$FWD:$1" --server "$2" --authority "$3" \
                "${CLIENT[@]}" 2>>"$work/forward.log" &
        FWD_PID=$!
        wait_port "$FWD" "$1"
}
stop_forward() {
        kill -TERM "$FWD_PID" 2>/dev/null || true
        wait "$FWD_PID" 2>/dev/null || true
}
iperf_json() { # iperf3 -J on stdin -> {"bytes", "gbps", "seconds", "error"}
        /usr/bin/python3 -c 'import json,sys
e = json.load(sys.stdin)
r = e.get("end", {}).get("sum_received", {})
print(json.dumps({"bytes": r.get("bytes", 0), "gbps": r.get("bits_per_second", 0) / 1e9,
                  "seconds": r.get("seconds", 0), "error": e.get("error", "")}))'
}
stock_limit() { awk -v s="$secs" 'BEGIN { printf "%d", s + 20 }'; } # a stuck tool is killed
stock_ok=1
if [[ " $scenarios " == *" stock "* ]]; then
        for b in iperf3 h2load; do
                command -v $b >/dev/null || { note "stock: $b is not installed"; stock_ok=0; }
        done
fi
if [[ " $scenarios " == *" stock "* ]] && [ $stock_ok = 1 ]; then
        "${PIN_REST[@]}" iperf3 -s -B "$POD" -p 5201 >"$work/iperf3-server.log" 2>&1 &
        pids+=($!)
        wait_port "$POD" 5201
        for run in $(seq "$runs"); do
                # (waypoint only: iperf3 hangs at the end through nghttpx, which does not pass
                # the server's close of a CONNECT tunnel back to the client)
                for name in wp-stock; do
                        start_sut "$name"
                        start_forward 5201 "$SUTADDR" "$VIPNET.4:5201"
                        c0=$(cpu_ticks "$SUTPID")
                        for attempt in 1 2; do
                                res=$(timeout $(stock_limit) "${PIN_REST[@]}" iperf3 -c "$FWD" \
                                        -p 5201 -t "$secs" -J 2>>"$work/load.log" | iperf_json) ||
                                        res='{"bytes":0,"gbps":0,"error":"iperf3 failed"}'
                                [[ $res == *'"bytes": 0,'* ]] || break
                                note "stock: iperf3 attempt $attempt moved no data: $res"
                        done
                        c1=$(cpu_ticks "$SUTPID")
                        stop_forward
                        stop_sut
                        say "stock iperf3 $name run $run: $res"
                        emit "{\"kind\":\"stock\",\"tool\":\"iperf3\",\"sut\":\"$name\",\"run\":$run,\"cpu_s\":$(ticks_to_s "$c0" "$c1"),\"result\":$res}"
                done
                for name in wp-http direct; do
                        if [ $name = wp-http ]; then
                                start_sut wp-http
                                start_forward 9001 "$SUT:15008" "$VIPNET.3:9001"
                                c0=$(cpu_ticks "$SUTPID")
                        else
                                start_forward 9001 "$POD:15008" "$POD:9001"
                        fi
                        b0=$(backend_requests)
                        res=$(timeout $(stock_limit) "${PIN_REST[@]}" h2load \
                                -D "$(awk -v s="$secs" 'BEGIN { printf "%d", s < 1 ? 1 : s + 0.5 }')" -c 4 \
                                -m 16 -H 'x-bench: 1' \
                                "http://$FWD:9001/bench/get" 2>>"$work/load.log" |
                                /usr/bin/python3 -c 'import json,re,sys
t = sys.stdin.read()
m = re.search(r"finished in ([0-9.]+)s, ([0-9.]+) req/s", t)
n = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed", t)
s = re.search(r"status codes: (\d+) 2xx", t)
print(json.dumps({"seconds": float(m.group(1)) if m else 0, "rps": float(m.group(2)) if m else 0,
                  "requests": int(n.group(4)) if n else 0, "failed": int(n.group(5)) if n else -1,
                  "ok2xx": int(s.group(1)) if s else 0}))') ||
                                res='{"rps":0,"requests":0,"failed":-1}'
                        b1=$(backend_requests)
                        cpu=null
                        if [ $name = wp-http ]; then
                                c1=$(cpu_ticks "$SUTPID")
                                cpu=$(ticks_to_s "$c0" "$c1")
                        fi
                        stop_forward
                        [ $name = direct ] || stop_sut
                        say "stock h2load $name run $run: $res"
                        emit "{\"kind\":\"stock\",\"tool\":\"h2load\",\"sut\":\"$name\",\"run\":$run,\"cpu_s\":$cpu,\"backend_requests\":$((b1 - b0)),\"result\":$res}"
                done
        done
fi

# ---- what reached the destinations (each sink prints its counters on exit) ----
for p in $SINK_PID $SINKC_PID $SINKT_PID; do kill -TERM "$p" 2>/dev/null || true; done
wait "$SINK_PID" "$SINKC_PID" "$SINKT_PID" 2>/dev/null || true
emit "{\"kind\":\"sinks\",\"relay\":$(cat "$work/sink.json" || echo null),\"haproxy-terminate\":$(cat "$work/sinkc.json" || echo null),\"wp-terminate\":$(cat "$work/sinkt.json" || echo null)}"

# ---- report ----
if [ "$smoke" = 1 ]; then
        out=${BENCH_OUT:-$work/out}
elif [ -n "${BENCH_OUT:-}" ]; then
        out=$BENCH_OUT
        mkdir -p "$out"
        cp "$raw" "$out/all.jsonl"
else
        out=$root/docs
        mkdir -p tests/bench/results
        cp "$raw" tests/bench/results/all.jsonl
fi
mkdir -p "$out/img"
/usr/bin/python3 tests/bench/benchmarks.py "$raw" "$out"
say "report: $out/benchmarks.md"
if [ "$smoke" = 1 ]; then
        /usr/bin/python3 tests/bench/benchmarks.py --check "$raw" "$out"
fi
exit 0
}
