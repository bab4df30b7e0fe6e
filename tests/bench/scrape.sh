#!/usr/bin/env bash
# Scrape cost of /stats/prometheus, one command: tests/bench/scrape.sh
#
# Two waypoints in turn (release build, --concurrency 1, on CPU 0; everything else on CPU 1):
#
#   L4: hbone_load --HBONE--> [waypoint 127.0.57.10] --HBONE--> hbone serve 127.0.57.1:15008
#       --TCP--> tcp_sink 127.0.57.1:9000            (TCP service, VIP 127.201.57.1:9000)
#   L7: http_load --HBONE--> [waypoint 127.0.57.20, HTTP chain] --HBONE--> hbone serve
#       127.0.57.2:15008 --TCP--> http_backend 127.0.57.2:9000   (VIP 127.201.57.2:9000)
#
# Each waypoint is first filled with SCRAPE_SERIES (10,000) label sets: that many tunnels, each
# with a distinct `baggage` source workload (tests/e2e/test_cardinality.py's python3-h2 client);
# L4: each tunnel is one istio_tcp series; L7: each tunnel carries one request answered 404 by
# a direct_response route, one istio_requests_total + 3 histograms series.
#   (a) latency: SCRAPE_N scrapes (curl, sequential): p50/p99 and the page size; the
#       waypoint's CPU time per scrape (all threads, /proc/<pid>/task/*/schedstat).
#   (b) data-plane impact: L4 bulk (hbone_load, 1 tunnel x 1 GiB) and L7 saturation
#       (http_load, 16 tunnels, SCRAPE_SECONDS) without (A) and with (B) a scraper fetching the
#       page every second (curl, 1 Hz, or back to back when a scrape takes longer), interleaved
#       A B B A A B ..., SCRAPE_RUNS (5) pairs; medians, the ratio of the medians, the median of
#       the per-pair ratios, and the waypoint's CPU time per run (the cost of the scrapes).
# Writes tests/bench/results/scrape.md and prints it.
#
# tests/bench/scrape.sh --report RAW.jsonl rewrites scrape.md from the raw lines of a run.
# Environment: BENCH_BUILD (release build dir, default build-bench/), SCRAPE_SERIES (10000),
# SCRAPE_N (20; the L7 page is ~0.5 GiB: max(3, SCRAPE_N/4) there), SCRAPE_RUNS (5),
# SCRAPE_SECONDS (4), BENCH_KEEP=1 keeps the logs.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
build=${BENCH_BUILD:-$root/build-bench}
series=${SCRAPE_SERIES:-10000}
nscrapes=${SCRAPE_N:-20}
runs=${SCRAPE_RUNS:-5}
seconds=${SCRAPE_SECONDS:-4}
results=$root/tests/bench/results
mkdir -p "$results"
say() { printf '%s\n' "$*" >&2; }

# Writes tests/bench/results/scrape.md from the raw JSON lines.
report() { # raw.jsonl
        /usr/bin/python3 - "$1" >"$results/scrape.md" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
env = next(r for r in rows if r["kind"] == "env")
p = print
p("# /stats/prometheus scrape cost")
p()
p("`tests/bench/scrape.sh` (release build, `--concurrency 1`). %s." % env["pinning"])
p()
p("| | |\n| --- | --- |")
for k in ("date", "commit", "kernel", "cpu", "ncpu", "openssl", "curl", "loadavg"):
    p("| %s | %s |" % (k, env.get(k, "?")))
p()
p("## (a) Scrape latency (curl, sequential scrapes)")
p()
p("| registry | scrapes | page | p50 | p99 | max | waypoint CPU / scrape | = share of a CPU at 1 Hz | waypoint VmRSS |")
p("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if r["kind"] == "latency":
        p("| %s | %d | %.1f MiB | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f%% | %.1f MiB |" % (
            r["what"], r["n"], r["page_bytes"] / 2**20, r["p50_ms"], r["p99_ms"], r["max_ms"],
            r["wp_cpu_ms_per_scrape"], r["wp_cpu_ms_per_scrape"] / 10, r["wp_rss_kb"] / 1024))
p()
p("## (b) Data plane with and without a 1 Hz scraper (pairs A B, B A, A B ..., same run)")
p()
imp = [r for r in rows if r["kind"] == "impact"]
def metric(r):
    res = r["result"]
    return res.get("gbps") if r["what"] == "L4" else res.get("rps")
p("| load | runs A (no scraper) | runs B (1 Hz scraper) | median A | median B | B/A of medians | median of pair ratios B_i/A_i | scrapes in B (p50, max) | waypoint CPU per unit of work A / B |")
p("| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |")
for what in ("L4", "L7"):
    a = sorted((r for r in imp if r["what"] == what and r["ab"] == "A"), key=lambda r: r["run"])
    b = sorted((r for r in imp if r["what"] == what and r["ab"] == "B"), key=lambda r: r["run"])
    if not a or not b:
        continue
    va = [metric(r) or 0 for r in a]
    vb = [metric(r) or 0 for r in b]
    ma, mb = statistics.median(va), statistics.median(vb)
    pairs = statistics.median(y / x for x, y in zip(va, vb) if x)
    sc = [r for r in b if r["scrapes"]]
    scr = "%d (%.0f ms, %.0f ms)" % (sum(r["scrapes"] for r in b),
                                     statistics.median(r["scrape_p50_ms"] for r in sc),
                                     max(r["scrape_max_ms"] for r in sc)) if sc else "0"
    # the waypoint's CPU per unit of work (GiB moved, 10k requests answered): the data plane's
    # cost without the scrapes, and with them
    def unit(r):
        res = r["result"]
        return (res.get("bytes_sent", 0) / 2**30 if what == "L4"
                else res.get("requests_total", 0) / 1e4) or 1
    ca = statistics.median(r["wp_cpu_ns"] / 1e9 / unit(r) for r in a)
    cb = statistics.median(r["wp_cpu_ns"] / 1e9 / unit(r) for r in b)
    cpu = "%.3f s / %.3f s per %s" % (ca, cb, "GiB" if what == "L4" else "10k requests")
    fmt = (lambda v: "%.2f" % v) if what == "L4" else (lambda v: "%.0f" % v)
    p("| %s | %s | %s | %s | %s | %.3f | %.3f | %s | %s |" % (
        "L4 bulk, 1 tunnel x 1 GiB (Gbit/s)" if what == "L4" else
        "L7 saturation, 16 tunnels (req/s)", " ".join(fmt(v) for v in va),
        " ".join(fmt(v) for v in vb), fmt(ma), fmt(mb), mb / ma if ma else 0, pairs, scr, cpu))
p()
p("loadavg at the end: %s (the machine is shared: other jobs run on both CPUs during the runs)"
  % next((r["loadavg"] for r in rows if r["kind"] == "end"), "?"))
p()
p("""Reading the figures:

- The page is streamed (64 KiB at a time as the socket drains), so the waypoint's VmRSS does not
  follow the page size; a scrape costs the waypoint CPU time (rendering plus the kernel copy of the
  bytes), shown per scrape in (a). In (b), the waypoint's CPU per unit of work (GiB relayed,
  10k requests answered) in B exceeds A's by about the scrapes' CPU from (a) spread over that
  work: the data plane's own cost does not change, the scrapes add theirs. On a waypoint whose
  CPU is saturated that share is the throughput it loses; otherwise it loses none.
- Page size is dominated by the HTTP histograms: every HTTP label set is 67 samples
  (istio_requests_total, and 20 buckets + _sum + _count for each of the 3 histograms) carrying
  about 800 bytes of labels each, some 55 KiB per label set; a TCP label set is 4 samples.
- The scraper runs on CPU 1 with the load generators (the pinning of the other benchmarks), so
  in (b) it also takes CPU from them; with the waypoint alone on CPU 0, the data plane feels the
  scrapes only when the waypoint's CPU is the bottleneck. On this shared 2-CPU machine the run to
  run spread is large (see the A and B columns): read B/A together with that spread.""")
p()
p("Raw lines:")
p()
p("```")
for r in rows:
    p(json.dumps(r))
p("```")
PY
}
# tests/bench/scrape.sh --report RAW.jsonl: only rewrite scrape.md from earlier raw lines
if [ "${1:-}" = --report ]; then
        report "$2"
        cat "$results/scrape.md"
        exit 0
fi

# ---- build (release, no sanitizers) ----
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
ninja -C "$build" -j2 waypoint/waypoint hbone/hbone tests/bench/hbone_load tests/bench/tcp_sink \
        tests/bench/http_load tests/bench/http_backend >/dev/null
WAYPOINT=$build/waypoint/waypoint
HBONE=$build/hbone/hbone

# ---- environment ----
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
work=$(mktemp -d /tmp/wp-scrapebench.XXXXXX)
pids=()
WP=
SCRAPER=
cleanup() {
        for p in "${pids[@]}" $WP $SCRAPER; do kill "$p" 2>/dev/null || true; done
        wait 2>/dev/null || true
        if [ "${BENCH_KEEP:-0}" = 1 ]; then say "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
raw=$work/scrape.jsonl
: >"$raw"
if [ "$(nproc)" -ge 2 ]; then
        PIN_WP=(taskset -c 0)
        PIN_REST=(taskset -c 1)
        pinning="waypoint on CPU 0; load generators, hbone serve, sinks, curl on CPU 1"
else
        PIN_WP=()
        PIN_REST=()
        pinning="none (1 CPU)"
fi

/usr/bin/python3 tests/tools/mkpki.py "$work/pki" >/dev/null
P=$work/pki
CLIENT=(--cert "$P/client.pem" --key "$P/client.key" --root "$P/root.pem")
# the benchmark configs (gen_config.py, gen_http_config.py) at this script's addresses
/usr/bin/python3 tests/bench/gen_config.py --vip 127.201.57.1 --pod 127.0.57.1 >"$work/l4.json"
/usr/bin/python3 tests/bench/gen_http_config.py --vip 127.201.57.2 --pod 127.0.57.2 \
        >"$work/l7.json"

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
# A destination pod: the app (command..., on ip:9000) and `hbone serve` on ip:15008 in front
start_destination() { # ip tag command...
        local ip=$1 tag=$2
        shift 2
        "${PIN_REST[@]}" "$@" >"$work/app-$tag.json" 2>"$work/app-$tag.log" &
        pids+=($!)
        "${PIN_REST[@]}" "$HBONE" serve --listen "$ip:15008" --cert "$P/dest.pem" \
                --key "$P/dest.key" --root "$P/root.pem" 2>"$work/serve-$tag.log" &
        pids+=($!)
        wait_port "$ip" 9000
        wait_port "$ip" 15008
        sleep 0.2
        # the address may have been taken by something else: then ours exited
        for p in "${pids[@]}"; do
                kill -0 "$p" 2>/dev/null && continue
                say "a destination stand-in exited; logs:"
                tail -n 3 "$work/app-$tag.log" "$work/serve-$tag.log" >&2 || true
                exit 1
        done
}
rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
emit() { printf '%s\n' "$*" >>"$raw"; }

start_waypoint() { # ip config-file
        "${PIN_WP[@]}" "$WAYPOINT" --config-file "$2" \
                --cert-file "$P/waypoint.pem" --key-file "$P/waypoint.key" --root-cert "$P/root.pem" \
                --hbone-address "$1:15008" --admin-address "$1:15000" \
                --metrics-address "$1:15020" --max-metric-series $((series * 2)) \
                --concurrency 1 --log-level warn --drain-ms 0 2>>"$work/waypoint-$1.log" &
        WP=$!
        for _ in $(seq 100); do
                curl -sf "http://$1:15000/ready" >/dev/null 2>&1 && return 0
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
alive() { # what
        kill -0 "$WP" 2>/dev/null && return 0
        say "waypoint exited during $1; log tail:"
        tail -5 "$work"/waypoint-*.log >&2
        exit 1
}

# Opens $series tunnels with distinct baggage through the waypoint (4 connections, 100
# streams in flight each); request: bytes sent in each tunnel once it is up.
populate() { # wp-ip authority request(python bytes literal)
        "${PIN_REST[@]}" /usr/bin/python3 - "$1" "$2" "$3" "$series" "$P" "$root" <<'PY'
import asyncio, ast, ssl, sys, time
wp, authority, request, n, pki, root = sys.argv[1], sys.argv[2], ast.literal_eval(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5], sys.argv[6]
sys.path.insert(0, root + "/tests/e2e")
from test_cardinality import Source  # noqa: E402

async def main():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(pki + "/root.pem")
    ctx.load_cert_chain(pki + "/client.pem", pki + "/client.key")
    ctx.set_alpn_protocols(["h2"])
    loop = asyncio.get_running_loop()
    names = (b"job-%06d" % i for i in range(n))
    protos = []
    for _ in range(4):
        done = loop.create_future()
        _, p = await loop.create_connection(
            lambda d=done: Source(authority, names, d, request=request, window=100), wp, 15008,
            ssl=ctx, server_hostname=None)
        protos.append((p, done))
    await asyncio.gather(*(d for _, d in protos))
    ok = sum(p.ok for p, _ in protos)
    if ok != n:
        sys.exit("populate: %d of %d tunnels answered 200: %r" %
                 (ok, n, [p.statuses for p, _ in protos]))

t0 = time.monotonic()
asyncio.run(main())
print("%.1f" % (time.monotonic() - t0))
PY
}

# (a): sequential scrapes; one JSON line with the latencies, sizes and the waypoint's CPU
scrape_latency() { # wp-ip what count
        local c0 c1 out=$work/lat-$2.txt
        c0=$(cpu_ns "$WP")
        for _ in $(seq "$3"); do
                "${PIN_REST[@]}" curl -s -o /dev/null -w '%{time_total} %{size_download}\n' \
                        "http://$1:15020/stats/prometheus" >>"$out"
        done
        c1=$(cpu_ns "$WP")
        alive "scrapes ($2)"
        /usr/bin/python3 - "$out" "$2" "$((c1 - c0))" "$3" "$(rss_kb "$WP")" >>"$raw" <<'PY'
import json, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
lat = sorted(float(r[0]) * 1e3 for r in rows)
size = sorted(int(r[1]) for r in rows)
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(json.dumps({"kind": "latency", "what": sys.argv[2], "n": len(lat), "p50_ms": q(0.5),
                  "p99_ms": q(0.99), "max_ms": lat[-1], "page_bytes": size[len(size) // 2],
                  "wp_cpu_ms_per_scrape": int(sys.argv[3]) / 1e6 / int(sys.argv[4]),
                  "wp_rss_kb": int(sys.argv[5])}))
PY
}

# 1 Hz scraper (back to back when a scrape takes longer than a second)
scraper_start() { # wp-ip log
        (
                # stop at once, with the curl in flight (its scrape would spill into the next run)
                trap 'kill "$cpid" 2>/dev/null; exit 0' TERM
                while :; do
                        t0=$(date +%s.%N)
                        "${PIN_REST[@]}" curl -s -o /dev/null \
                                -w '%{time_total} %{size_download}\n' \
                                "http://$1:15020/stats/prometheus" >>"$2" &
                        cpid=$!
                        wait "$cpid" || true
                        left=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { d = 1 - (b - a); print (d > 0 ? d : 0) }')
                        sleep "$left" &
                        cpid=$!
                        wait "$cpid" || true
                done
        ) &
        SCRAPER=$!
}
scraper_stop() {
        kill "$SCRAPER" 2>/dev/null || true
        wait "$SCRAPER" 2>/dev/null || true
        SCRAPER=
}

# A B, B A, A B, ... (ABBA: neither condition always runs first)
order() { if [ $(($1 % 2)) = 1 ]; then echo A B; else echo B A; fi; }

# (b): one data-plane run, with or without the scraper
impact_run() { # what A|B run command...
        local what=$1 ab=$2 run=$3 c0 c1 res slog=$work/scraper-$1-$2-$3.txt
        shift 3
        : >"$slog"
        [ "$ab" = B ] && scraper_start "$wp_ip" "$slog"
        c0=$(cpu_ns "$WP")
        res=$("${PIN_REST[@]}" "$@" 2>>"$work/load.log") || true
        c1=$(cpu_ns "$WP")
        [ "$ab" = B ] && scraper_stop
        [ -n "$res" ] || res='{"error":"load generator failed"}'
        alive "$what $ab run $run"
        say "$(printf '%-3s %s run %d: %s; %d scrapes' "$what" "$ab" "$run" "$res" "$(grep -c . "$slog" || true)")"
        /usr/bin/python3 - "$slog" "$what" "$ab" "$run" "$((c1 - c0))" "$res" >>"$raw" <<'PY'
import json, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
lat = sorted(float(r[0]) * 1e3 for r in rows)
print(json.dumps({"kind": "impact", "what": sys.argv[2], "ab": sys.argv[3], "run": int(sys.argv[4]),
                  "wp_cpu_ns": int(sys.argv[5]), "scrapes": len(lat),
                  "scrape_p50_ms": lat[len(lat) // 2] if lat else None,
                  "scrape_max_ms": lat[-1] if lat else None,
                  "result": json.loads(sys.argv[6])}))
PY
}

# ---- environment line ----
/usr/bin/python3 - >>"$raw" <<PY
import json, subprocess
def sh(c):
    try: return subprocess.run(c, shell=True, capture_output=True, text=True).stdout.strip()
    except Exception: return "?"
print(json.dumps({"kind": "env", "date": sh("date -u +%Y-%m-%dT%H:%MZ"), "kernel": sh("uname -r"),
    "cpu": sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-").strip(), "ncpu": sh("nproc"),
    "openssl": sh("openssl version"), "curl": sh("curl --version | head -1 | cut -d' ' -f1-2"),
    "loadavg": sh("cut -d' ' -f1-3 /proc/loadavg"), "pinning": "$pinning", "series": $series,
    "runs": $runs, "seconds": $seconds,
    "commit": sh("git -C '$root' describe --always --dirty 2>/dev/null")}))
PY

# ---- L4 ----
start_destination 127.0.57.1 l4 "$build/tests/bench/tcp_sink" --listen 127.0.57.1:9000
wp_ip=127.0.57.10
start_waypoint $wp_ip "$work/l4.json"
scrape_latency $wp_ip "L4, 0 series" 5
t=$(populate $wp_ip 127.201.57.1:9000 "b''")
say "L4: $series tunnels with distinct sources in ${t}s"
sleep 1
scrape_latency $wp_ip "L4, $series TCP series" "$nscrapes"
for run in $(seq "$runs"); do
        for ab in $(order "$run"); do
                impact_run L4 $ab "$run" "$build/tests/bench/hbone_load" --server $wp_ip:15008 \
                        --authority 127.201.57.1:9000 "${CLIENT[@]}" --connections 1 --tunnels 1 \
                        --bytes 1g --timeout-seconds 120
        done
done
stop_waypoint

# ---- L7 ----
start_destination 127.0.57.2 l7 "$build/tests/bench/http_backend" --listen 127.0.57.2:9000 \
        --body-bytes 1024
wp_ip=127.0.57.20
start_waypoint $wp_ip "$work/l7.json"
t=$(populate $wp_ip 127.201.57.2:9000 \
        "b'GET /populate HTTP/1.1\\r\\nHost: benchhttp\\r\\nConnection: close\\r\\n\\r\\n'")
say "L7: $series tunnels with one request each in ${t}s"
sleep 1
l7n=$((nscrapes / 4))
[ "$l7n" -ge 3 ] || l7n=3
scrape_latency $wp_ip "L7, $series HTTP series" "$l7n"
for run in $(seq "$runs"); do
        for ab in $(order "$run"); do
                impact_run L7 $ab "$run" "$build/tests/bench/http_load" --server $wp_ip:15008 \
                        --authority 127.201.57.2:9000 "${CLIENT[@]}" --connections 1 \
                        --tunnels 16 --duration "$seconds" --warmup 1 --path /bench/get \
                        --header 'x-bench: 1'
        done
done
stop_waypoint

/usr/bin/python3 -c 'import json; print(json.dumps({"kind": "end", "loadavg": open("/proc/loadavg").read().split()[:3]}))' >>"$raw"

# ---- report ----
report "$raw"
cat "$results/scrape.md"
