#!/usr/bin/env bash
# The L7 (HTTP/1.1) benchmark, one command: tests/bench/l7.sh
#
#   waypoint: http_load --HBONE--> [waypoint 127.0.0.62:15008, HTTP chain: RBAC, header-match
#             route] --HBONE--> hbone serve 127.0.41.1:15008 --TCP--> http_backend 127.0.41.1:9000
#   direct:   http_load --HBONE--> hbone serve 127.0.41.1:15008 --TCP--> http_backend
#             (the same HBONE hop, no waypoint, no L7 processing)
#
# Small keep-alive GETs (1 KiB response body), one request in flight per tunnel:
#   fixed rate: open loop at L7_RATE req/s (2000) over 32 tunnels; latency from the scheduled
#               send time (no coordinated omission)
#   saturation: closed loop, L7_TUNNELS (16) tunnels on one HBONE connection, back-to-back
# Runs are interleaved direct/waypoint, L7_RUNS (3) of each, L7_SECONDS (6) each. The waypoint
# (--concurrency 1) runs on CPU 0, everything else on CPU 1; its CPU time (all threads, from
# /proc/<pid>/task/*/schedstat) across each run gives CPU microseconds per request.
# Writes tests/bench/results/l7.md (+ l7.jsonl, the raw numbers) and prints it.
#
# Environment: BENCH_BUILD (release build dir, default build-bench/), L7_RUNS, L7_SECONDS,
# L7_RATE, L7_TUNNELS, L7_BODY (response body bytes, 1024), L7_WP_ARGS (extra waypoint
# arguments, e.g. "--io-backend epoll"), BENCH_KEEP=1 keeps the logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${BENCH_BUILD:-$root/build-bench}
runs=${L7_RUNS:-3}
seconds=${L7_SECONDS:-6}
rate=${L7_RATE:-2000}
sat_tunnels=${L7_TUNNELS:-16}
body=${L7_BODY:-1024}
results=$root/tests/bench/results
mkdir -p "$results"
say() { printf '%s\n' "$*" >&2; }

# ---- build (release, no sanitizers) ----
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
ninja -C "$build" -j2 waypoint/waypoint hbone/hbone tests/bench/http_load \
        tests/bench/http_backend >/dev/null
WAYPOINT=$build/waypoint/waypoint
HBONE=$build/hbone/hbone
LOAD=$build/tests/bench/http_load
BACKEND=$build/tests/bench/http_backend

WP_IP=127.0.0.62
POD=127.0.41.1
VIP=127.201.1.1

# ---- environment ----
work=$(mktemp -d /tmp/wp-l7bench.XXXXXX)
pids=()
WP=
cleanup() {
        for p in "${pids[@]}" $WP; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        if [ "${BENCH_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
raw=$work/l7.jsonl
: >"$raw"
if [ "$(nproc)" -ge 2 ]; then
        PIN_WP=(taskset -c 0)
        PIN_REST=(taskset -c 1)
        pinning="waypoint on CPU 0; http_load, hbone serve, http_backend on CPU 1"
else
        PIN_WP=()
        PIN_REST=()
        pinning="none (1 CPU)"
fi

/usr/bin/python3 tests/tools/mkpki.py "$work/pki" >/dev/null
P=$work/pki
/usr/bin/python3 tests/bench/gen_http_config.py >"$work/waypoint.json"
CLIENT=(--cert "$P/client.pem" --key "$P/client.key" --root "$P/root.pem")

wait_port() { # host port
        for _ in $(seq 100); do
                (: <"/dev/tcp/$1/$2") 2>/dev/null && return 0
                sleep 0.05
        done
        say "nothing listens on $1:$2"
        return 1
}
cpu_ns() { # CPU time of the whole process (all threads), nanoseconds
        cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{ s += $1 } END { printf "%.0f", s }'
}

cpu_jiffies() { # "busy total" jiffies of CPU $1 (everything running there, not only ours)
        awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i;
                print t - $5 - $6, t }' /proc/stat
}
busy_pct() { # "busy0 total0" "busy1 total1"
        echo "$1 $2" | awk '{ d = $4 - $2; printf "%.1f", (d > 0 ? 100 * ($3 - $1) / d : 0) }'
}

start_waypoint() {
        "${PIN_WP[@]}" "$WAYPOINT" --config-file "$work/waypoint.json" \
                --cert-file "$P/waypoint.pem" --key-file "$P/waypoint.key" --root-cert "$P/root.pem" \
                --hbone-address $WP_IP:15008 --admin-address $WP_IP:15000 \
                --concurrency 1 --log-level warn --drain-ms 0 ${L7_WP_ARGS:-} \
                2>>"$work/waypoint.log" &
        WP=$!
        for _ in $(seq 100); do
                curl -sf http://$WP_IP:15000/ready >/dev/null 2>&1 && return 0
                kill -0 "$WP" 2>/dev/null || break
                sleep 0.05
        done
        say "waypoint did not become ready; log:"
        cat "$work/waypoint.log" >&2
        exit 1
}

# ---- destination side and waypoint (shared by every run) ----
"${PIN_REST[@]}" "$BACKEND" --listen $POD:9000 --body-bytes "$body" >"$work/backend.json" \
        2>"$work/backend.log" &
BACKEND_PID=$!
pids+=($BACKEND_PID)
"${PIN_REST[@]}" "$HBONE" serve --listen $POD:15008 --cert "$P/dest.pem" \
        --key "$P/dest.key" --root "$P/root.pem" 2>"$work/serve.log" &
SERVE_PID=$!
pids+=($SERVE_PID)
wait_port $POD 9000
wait_port $POD 15008
start_waypoint

io_backend=$(curl -s http://$WP_IP:15000/server_info |
        /usr/bin/python3 -c 'import json,sys; print(json.load(sys.stdin).get("io_backend","?"))' || echo "?")
/usr/bin/python3 - >>"$raw" <<PY
import json, subprocess
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
print(json.dumps({"kind": "env", "date": sh("date -u +%Y-%m-%dT%H:%MZ"), "kernel": sh("uname -r"),
    "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip(), "ncpu": sh("nproc"),
    "loadavg": sh("cut -d' ' -f1-3 /proc/loadavg"), "io_backend": "$io_backend",
    "pinning": "$pinning", "rate": $rate, "sat_tunnels": $sat_tunnels, "seconds": $seconds,
    "body": $body, "commit": sh("git -C '$root' describe --always --dirty 2>/dev/null")}))
PY

# sanity: one request through each path must succeed (and a wrong header must not be routed)
smoke() { # server authority extra-args...
        local s=$1 a=$2
        shift 2
        "${PIN_REST[@]}" "$LOAD" --server "$s" --authority "$a" "${CLIENT[@]}" --tunnels 1 \
                --duration 0.3 --warmup 0 --header 'x-bench: 1' "$@" 2>>"$work/load.log"
}
if ! smoke $POD:15008 $POD:9000 >/dev/null || ! smoke $WP_IP:15008 $VIP:9000 >/dev/null; then
        say "smoke request failed; logs:"
        tail -5 "$work/load.log" "$work/waypoint.log" "$work/serve.log" >&2
        exit 1
fi
if smoke $WP_IP:15008 $VIP:9000 --path /other >/dev/null; then
        say "a request without the route's match was answered 200: the route is not in effect"
        exit 1
fi

# the waypoint's CPU use with nothing to do (timers, housekeeping): the baseline for CPU/request
i0=$(cpu_ns "$WP")
sleep 2
i1=$(cpu_ns "$WP")
printf '{"kind":"idle","seconds":2,"wp_cpu_ns":%d}\n' "$((i1 - i0))" >>"$raw"

# ---- runs ----
one_run() { # path mode run
        local path=$1 mode=$2 run=$3 server authority args c0=0 c1=0 s0 s1 res
        if [ "$path" = waypoint ]; then
                server=$WP_IP:15008
                authority=$VIP:9000
        else
                server=$POD:15008
                authority=$POD:9000
        fi
        if [ "$mode" = rate ]; then
                args=(--rate "$rate" --tunnels 32)
        else
                args=(--tunnels "$sat_tunnels")
        fi
        c0=$(cpu_ns "$WP")
        s0=$(cpu_ns "$SERVE_PID")
        local j0a j0b j1a j1b
        j0a=$(cpu_jiffies 0)
        j1a=$(cpu_jiffies 1)
        res=$("${PIN_REST[@]}" "$LOAD" --server $server --authority $authority "${CLIENT[@]}" \
                --connections 1 "${args[@]}" --duration "$seconds" --warmup 1 \
                --path /bench/get --header 'x-bench: 1' 2>>"$work/load.log") || true
        c1=$(cpu_ns "$WP")
        s1=$(cpu_ns "$SERVE_PID")
        j0b=$(cpu_jiffies 0)
        j1b=$(cpu_jiffies 1)
        [ -n "$res" ] || res='{"requests":0,"requests_total":0,"rps":0,"error":"http_load crashed"}'
        if ! kill -0 "$WP" 2>/dev/null; then
                say "waypoint exited during $path $mode run $run; log tail:"
                tail -5 "$work/waypoint.log" >&2
                exit 1
        fi
        say "$(printf '%-8s %-10s run %d: %s' "$path" "$mode" "$run" "$res")"
        printf '{"kind":"l7","path":"%s","mode":"%s","run":%d,"wp_cpu_ns":%d,"serve_cpu_ns":%d,"cpu0_busy":%s,"cpu1_busy":%s,"result":%s}\n' \
                "$path" "$mode" "$run" "$((c1 - c0))" "$((s1 - s0))" \
                "$(busy_pct "$j0a" "$j0b")" "$(busy_pct "$j1a" "$j1b")" "$res" >>"$raw"
}
for run in $(seq "$runs"); do
        for mode in rate saturation; do
                for path in direct waypoint; do
                        one_run $path $mode "$run"
                done
        done
done

cp "$raw" "$results/l7.jsonl"
/usr/bin/python3 - "$raw" >"$results/l7.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
env = next(r for r in rows if r["kind"] == "env")
runs = [r for r in rows if r["kind"] == "l7"]
idle = next((r for r in rows if r["kind"] == "idle"), None)

def med(path, mode, f):
    v = [f(r) for r in runs if r["path"] == path and r["mode"] == mode]
    v = [x for x in v if x is not None]
    return statistics.median(v) if v else float("nan")

def res(k):
    return lambda r: r["result"].get(k)

def cpu_us(r):  # waypoint CPU per request over everything it served in the run
    n = r["result"].get("requests_total") or 0
    return r["wp_cpu_ns"] / 1e3 / n if n else None

def serve_us(r):
    n = r["result"].get("requests_total") or 0
    return r["serve_cpu_ns"] / 1e3 / n if n else None

def util(r):
    d = r["result"].get("duration") or 0
    return 100.0 * r["wp_cpu_ns"] / 1e9 / d if d else None

out = []
p = out.append
p("# L7 benchmark: HTTP/1.1 GET through the waypoint vs direct")
p("")
p("%s, %s CPUs (%s), kernel %s, io backend %s, commit %s; load average at start %s." % (
    env["date"], env["ncpu"], env["cpu"], env["kernel"], env["io_backend"], env["commit"],
    env["loadavg"]))
p("Pinning: %s. Waypoint `--concurrency 1`. %d-byte response body, keep-alive, one request in "
  "flight per tunnel; %d s per run (first 1 s warm-up excluded from rates and latencies), "
  "runs interleaved direct/waypoint, %d of each; figures are medians over runs." % (
      env["pinning"], env["body"], env["seconds"], len(runs) // 4 if runs else 0))
if idle:
    p("Waypoint CPU when idle: %.2f%% of a CPU (measured over %d s before the runs)." % (
        100.0 * idle["wp_cpu_ns"] / 1e9 / idle["seconds"], idle["seconds"]))
p("")
p("- direct: http_load -HBONE-> hbone serve -TCP-> http_backend")
p("- waypoint: http_load -HBONE-> waypoint (HTTP chain: RBAC on the client principal, "
  "header-match route) -HBONE-> hbone serve -TCP-> http_backend")
p("")
for mode, title in (("rate", "Fixed rate: open loop, %d req/s, 32 tunnels, latency from the "
                     "scheduled send time" % env["rate"]),
                    ("saturation", "Saturation: closed loop, %d tunnels on 1 HBONE connection"
                     % env["sat_tunnels"])):
    p("## " + title)
    p("")
    p("| path | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | errors | waypoint CPU µs/req "
      "| waypoint CPU % | hbone serve CPU µs/req | CPU 0 / CPU 1 busy % |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for path in ("direct", "waypoint"):
        errs = sum((r["result"].get("errors") or 0) + (r["result"].get("non200") or 0) +
                   (r["result"].get("unsent") or 0)
                   for r in runs if r["path"] == path and r["mode"] == mode)
        wcpu = "%.1f" % med(path, mode, cpu_us) if path == "waypoint" else "–"
        wutil = "%.0f" % med(path, mode, util) if path == "waypoint" else "–"
        p("| %s | %.0f | %.0f | %.0f | %.0f | %.0f | %d | %s | %s | %.1f | %s |" % (
            path, med(path, mode, res("rps")), med(path, mode, res("p50_us")),
            med(path, mode, res("p90_us")), med(path, mode, res("p99_us")),
            med(path, mode, res("p999_us")), errs, wcpu, wutil, med(path, mode, serve_us),
            "%.0f / %.0f" % (med(path, mode, lambda r: r.get("cpu0_busy")),
            med(path, mode, lambda r: r.get("cpu1_busy")))
          if mode == "saturation" else "–"))
    d_rps, w_rps = med("direct", mode, res("rps")), med("waypoint", mode, res("rps"))
    p("")
    if mode == "rate":
        p("Added latency (waypoint − direct, medians): p50 %+.0f µs, p90 %+.0f µs, p99 %+.0f µs."
          % tuple(med("waypoint", mode, res(k)) - med("direct", mode, res(k))
                  for k in ("p50_us", "p90_us", "p99_us")))
    else:
        p("Throughput ratio waypoint/direct: %.2f; p50 latency ratio %.2f." % (
            w_rps / d_rps if d_rps else float("nan"),
            med("waypoint", mode, res("p50_us")) / med("direct", mode, res("p50_us"))
            if med("direct", mode, res("p50_us")) else float("nan")))
    p("")
p("## Runs")
p("")
p("| path | mode | run | req/s | p50 µs | p99 µs | requests | errors | waypoint CPU ms |")
p("|---|---|---:|---:|---:|---:|---:|---:|---:|")
for r in runs:
    x = r["result"]
    p("| %s | %s | %d | %.0f | %.0f | %.0f | %d | %d | %s |" % (
        r["path"], r["mode"], r["run"], x.get("rps", 0), x.get("p50_us", 0), x.get("p99_us", 0),
        x.get("requests_total", 0), (x.get("errors") or 0) + (x.get("non200") or 0) +
        (x.get("unsent") or 0), "%.0f" % (r["wp_cpu_ns"] / 1e6) if r["path"] == "waypoint"
        else "–"))
p("")
p("Notes: the saturation rate is bounded by whichever CPU is busy first: \"waypoint CPU %\" "
  "near 100 means the waypoint is the bottleneck; lower means CPU 1 (client, hbone serve, "
  "backend) is (\"CPU 0 / CPU 1 busy\" counts everything on each CPU, other users' processes "
  "included, from /proc/stat's tick-sampled counters, so shown only for saturation where they are "
  "meaningful). Waypoint CPU µs/req is the waypoint's CPU time over the whole run divided by "
  "every request it served (warm-up included), and is the figure to compare across machines.")
sys.stdout.write("\n".join(out) + "\n")
PY
cat "$results/l7.md"
