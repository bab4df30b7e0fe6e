#!/usr/bin/python3
"""Writes docs/benchmarks.md and docs/img/*.png from tests/bench/all.sh's raw results.

Usage: benchmarks.py RAW.jsonl OUTDIR            write OUTDIR/benchmarks.md and OUTDIR/img/*.png
       benchmarks.py --check RAW.jsonl OUTDIR    check that the report is well formed (CI smoke)

Every figure is a median over runs with the min-max range beside it. The hand-written analysis
(profiles, what would remove the biggest costs) lives in tests/bench/notes.md and is appended as
is, so regenerating never loses it.
"""

import json
import math
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))

# the issue's table: peer figure as filed, our goal, and which way is better
GOALS = {
    "relay": 0.45,          # GB per CPU-second, >=
    "terminate": 0.60,      # GB per CPU-second, >=
    "l7": 80000,            # requests per CPU-second, >=
    "full": 40000,          # requests per CPU-second, >=
    "vcpu": 0.03,           # vCPU per 1,000 req/s, <=
    "lat_p50": 300,         # latency added at 2k req/s, us, <=
    "lat_p99": 1000,
    "idle_mb": 8,           # idle RSS, MB, <=
    "per1k_mb": 4,          # MB per 1,000 idle tunnels, <=
    "hs": 2500,             # handshakes per CPU-second, >=
}
ISSUE_PEERS = {
    "relay": "nghttpx 0.17", "terminate": "HAProxy 0.25", "l7": "HAProxy 54k, nghttpx 53k",
    "full": "Istio's Envoy waypoint ≈ 4k (published)", "vcpu": "Envoy waypoint 0.25 (published)",
    "lat": "HAProxy +0.7 ms p50, +2.4 ms p99", "idle": "HAProxy 21 MB / +6.6 MB", "hs": "—",
}
NAMES = {
    "wp-relay": "waypoint", "wp-terminate": "waypoint", "nghttpx-relay": "nghttpx",
    "haproxy-terminate": "HAProxy", "waypoint-h1": "waypoint, inner HTTP/1.1",
    "waypoint-h2": "waypoint, inner HTTP/2", "haproxy": "HAProxy", "nghttpx": "nghttpx",
    "direct-tls": "direct TLS h2 (no proxy)", "direct-hbone-h1": "direct HBONE, HTTP/1.1 (no proxy)",
    "direct-hbone-h2": "direct HBONE, HTTP/2 (no proxy)",
}
NAN = float("nan")


def load(path):
    rows = [json.loads(line) for line in open(path) if line.strip()]
    return rows


def med(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.median(v) if v else NAN


def rng(v):
    v = [x for x in v if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return (min(v), max(v)) if v else (NAN, NAN)


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if abs(x) >= 1000:
        return "{:,.0f}".format(x)
    if abs(x) >= 100:
        return "%.0f" % x
    return ("%%.%df" % nd) % x


def mr(v, nd=2):
    """'median (min–max)'"""
    m = med(v)
    lo, hi = rng(v)
    if math.isnan(m):
        return "–"
    if len([x for x in v if x is not None]) < 2:
        return fmt(m, nd)
    return "%s (%s–%s)" % (fmt(m, nd), fmt(lo, nd), fmt(hi, nd))


def ratio(a, b):
    return a / b if b and not math.isnan(a) and not math.isnan(b) else NAN


def verdict(value, goal, higher_better=True):
    if math.isnan(value):
        return "not measured"
    if higher_better:
        if value >= goal:
            return "**met** (%.2f× the goal)" % (value / goal)
        return "missed: %.0f%% of the goal (%.2f× short)" % (100 * value / goal, goal / value)
    if value <= 0:
        return "**met** (no added latency beyond run-to-run noise)"
    if value <= goal:
        return "**met** (%.2f× under)" % (goal / value)
    return "missed: %.2f× over the goal" % (value / goal)


class Report:
    def __init__(self, rows):
        self.rows = rows
        self.env = next((r for r in rows if r["kind"] == "env"), {})
        self.notes = [r["text"] for r in rows if r["kind"] == "note"]
        self.unsupported = [r["what"] for r in rows if r["kind"] == "unsupported"]
        self.out = []

    def p(self, s=""):
        self.out.append(s)

    def sel(self, kind, **kw):
        return [r for r in self.rows if r["kind"] == kind and
                all(r.get(k) == v for k, v in kw.items())]

    # ---- figures ----
    def gb_per_cpu(self, sc, sut, streams):
        v = []
        for r in self.sel("bulk", scenario=sc, sut=sut, streams=streams):
            res = r["result"]
            ok = res.get("failed", 1) == 0
            v.append(res["bytes_sent"] / 1e9 / r["cpu_s"] if ok and r["cpu_s"] else None)
        return v

    def gbps(self, sc, sut, streams):
        return [r["result"].get("gbps") if r["result"].get("failed", 1) == 0 else None
                for r in self.sel("bulk", scenario=sc, sut=sut, streams=streams)]

    def http(self, sc, sut, mode):
        return self.sel("http", scenario=sc, sut=sut, mode=mode)

    @staticmethod
    def clean(r):
        """No request failed. A fixed-rate run may still be overloaded (see overloaded())."""
        x = r["result"]
        return x.get("requests_total", 0) > 0 and not x.get("errors") and not x.get("non200")

    @staticmethod
    def overloaded(r):
        """A fixed-rate run whose path could not keep up: requests were still waiting for a
        free connection at the end (they count from their scheduled time, so the latencies
        include the queueing)."""
        return bool(r["result"].get("unsent"))

    def rps(self, sc, sut, mode):
        """Completed requests per second (for an overloaded fixed-rate run: what got through)."""
        return [r["result"].get("rps") if self.clean(r) else None
                for r in self.http(sc, sut, mode)]

    def n_overloaded(self, sc, sut, mode):
        return sum(1 for r in self.http(sc, sut, mode) if self.overloaded(r))

    def req_per_cpu(self, sc, sut, mode):
        v = []
        for r in self.http(sc, sut, mode):
            n = r["result"].get("requests_total", 0)
            v.append(n / r["cpu_s"] if self.clean(r) and r.get("cpu_s") else None)
        return v

    def vcpu_per_1k(self, sc, sut, mode):
        v = []
        for r in self.http(sc, sut, mode):
            x = r["result"]
            d, n = x.get("duration", 0), x.get("requests_total", 0)
            if self.clean(r) and r.get("cpu_s") is not None and d and n:
                v.append((r["cpu_s"] / d) / (n / d / 1000.0))
            else:
                v.append(None)
        return v

    def lat(self, sc, sut, mode, key):
        return [r["result"].get(key) if self.clean(r) else None for r in self.http(sc, sut, mode)]

    def added(self, sc, sut, base, mode, key):
        return med(self.lat(sc, sut, mode, key)) - med(self.lat(sc, base, mode, key))

    def rss(self, sut, n):
        return [r["rss_kb"] / 1024.0 for r in self.sel("idle", sut=sut, tunnels=n)
                if n == 0 or r.get("ready") == n]

    def per1k(self, sut, n):
        """MB per 1,000 idle tunnels: the RSS growth from the previous count (idle for the
        first) to n, per 1,000 tunnels. Between two tunnel counts on the same 100 connections
        the connections' own cost cancels out."""
        counts = [0] + self.idle_counts()
        prev = counts[counts.index(n) - 1]
        v = []
        for r in self.sel("idle", sut=sut, tunnels=n):
            base = self.sel("idle", sut=sut, tunnels=prev, run=r["run"])
            if base and r.get("ready") == n and (prev == 0 or base[0].get("ready") == prev):
                v.append((r["rss_kb"] - base[0]["rss_kb"]) / 1024.0 / ((n - prev) / 1000.0))
        return v

    def hs(self, sut):
        v = []
        for r in self.sel("hs", sut=sut):
            ok = r["result"].get("ok", 0)
            v.append(ok / r["cpu_s"] if r["cpu_s"] and ok == r["conns"] else None)
        return v

    def idle_counts(self):
        return sorted({r["tunnels"] for r in self.sel("idle")} - {0})

    def rates(self):
        return sorted({int(r["mode"]) for r in self.sel("http", scenario="full")
                       if r["mode"] != "sat"})

    # ---- report ----
    def build(self, outdir):
        e = self.env
        p = self.p
        p("# Benchmarks: the waypoint beside its peers")
        p()
        p("Generated by `tests/bench/all.sh` (raw results: `tests/bench/results/all.jsonl`); do not "
          "edit by hand — the analysis at the end comes from `tests/bench/notes.md`.")
        p()
        p("| machine | |")
        p("| --- | --- |")
        for k, label in (("date", "date"), ("kernel", "kernel"), ("cpu", "CPU model"),
                         ("ncpu", "CPUs online"), ("openssl", "OpenSSL"), ("nghttp2", "nghttp2"),
                         ("haproxy", "HAProxy"), ("nghttpx", "nghttpx"), ("pinning", "pinning"),
                         ("loadavg", "load average at start"), ("commit", "tree")):
            p("| %s | %s |" % (label, e.get(k, "?")))
        p("| runs | %s per system, interleaved; %s s per request run; %s per bulk run%s |" % (
            e.get("runs"), e.get("seconds"), e.get("bulk"),
            " (**smoke mode**: numbers are not meaningful)" if e.get("smoke") else ""))
        p()
        p("Method: every system under test (SUT) gets one worker thread (`--concurrency 1`, "
          "`workers=1`, `nbthread 1`), TLS 1.3 with AES-128-GCM, ECDSA P-256 certificates from "
          "`tests/tools/mkpki.py`, no access log, and runs alone on CPU 0 (`taskset`); the load "
          "generators (`hbone_load`, `http_load`), the destination stand-in (`hbone serve`), the "
          "sinks and the backend (HAProxy answering 1 KiB) share CPU 1. SUT CPU is utime+stime "
          "from `/proc/<pid>/stat` across the run (all threads; nghttpx's worker process "
          "included). Figures are medians with min–max over runs. Each run is checked against "
          "what reached the backend (request counters, sink bytes: see *Checks*).")
        p()
        self.summary()
        self.bulk_section("relay", "L4 relay, bulk: HBONE in → HBONE out",
                          "hbone_load → SUT → hbone serve → tcp_sink; the bytes of each tunnel "
                          "sent and half-closed on one HBONE connection.", "wp-relay",
                          "nghttpx-relay")
        self.bulk_section("terminate", "HBONE terminate, bulk: HBONE in → plain TCP",
                          "hbone_load → SUT → tcp_sink (the waypoint with a socket_address "
                          "endpoint; HAProxy passes the CONNECT to `tcp_sink --connect`).",
                          "wp-terminate", "haproxy-terminate")
        self.l7_section()
        self.full_section()
        self.tunnels_section()
        self.hs_section()
        self.stock_section()
        self.plots(outdir)
        self.checks()
        notes = os.path.join(HERE, "notes.md")
        if os.path.exists(notes):
            p(open(notes).read().rstrip())
            p()
        return "\n".join(self.out) + "\n"

    def summary(self):
        p = self.p
        p("## Summary: the numbers to beat")
        p()
        p("| scenario | peer (issue) | peer measured here | ours | ours / peer | goal | verdict |")
        p("| --- | --- | --- | --- | ---: | --- | --- |")
        for sc, sut, peer, title in (("relay", "wp-relay", "nghttpx-relay",
                                      "L4 relay, GB per CPU-second"),
                                     ("terminate", "wp-terminate", "haproxy-terminate",
                                      "HBONE terminate, GB per CPU-second")):
            for n in (1, 8):
                o, q = med(self.gb_per_cpu(sc, sut, n)), med(self.gb_per_cpu(sc, peer, n))
                p("| %s (%d stream%s) | %s | %s %s | %s | %s | ≥ %.2f | %s |" % (
                    title, n, "s" if n > 1 else "", ISSUE_PEERS[sc], NAMES[peer], fmt(q), fmt(o),
                    fmt(ratio(o, q)), GOALS[sc], verdict(o, GOALS[sc])))
        hp = med(self.req_per_cpu("l7", "haproxy", "sat"))
        ng = med(self.req_per_cpu("l7", "nghttpx", "sat"))
        for sut in ("waypoint-h1", "waypoint-h2"):
            o = med(self.req_per_cpu("l7", sut, "sat"))
            if sut == "waypoint-h2" and math.isnan(o) and self.unsupported:
                p("| L7 requests per CPU-second (%s) | | | not supported yet | | | |" % NAMES[sut])
                continue
            p("| L7 requests per CPU-second (%s) | %s | HAProxy %s, nghttpx %s | %s | %s | ≥ 80k "
              "| %s |" % (NAMES[sut], ISSUE_PEERS["l7"], fmt(hp), fmt(ng), fmt(o),
                          fmt(ratio(o, max(hp, ng) if not math.isnan(ng) else hp)),
                          verdict(o, GOALS["l7"])))
        for sut in ("waypoint-h1", "waypoint-h2"):
            o = med(self.req_per_cpu("full", sut, "sat"))
            if math.isnan(o) and sut == "waypoint-h2" and self.unsupported:
                continue
            p("| Full waypoint, requests per CPU-second (%s) | %s | – | %s | %s | ≥ 40k | %s |" % (
                NAMES[sut], ISSUE_PEERS["full"], fmt(o), fmt(ratio(o, 4000)),
                verdict(o, GOALS["full"])))
        rates = self.rates()
        for sut in ("waypoint-h1", "waypoint-h2"):
            for rate in rates:
                o = med(self.vcpu_per_1k("full", sut, str(rate)))
                if math.isnan(o):
                    continue
                over = self.n_overloaded("full", sut, str(rate))
                p("| vCPU per 1,000 requests/s at %s req/s offered (%s)%s | %s | – | %s | %s | "
                  "≤ 0.03 | %s |" % (
                      "{:,}".format(rate), NAMES[sut],
                      " — path overloaded in %d of %d runs" % (
                          over, len(self.http("full", sut, str(rate)))) if over else "",
                      ISSUE_PEERS["vcpu"], fmt(o, 3), fmt(ratio(o, 0.25), 3),
                      verdict(o, GOALS["vcpu"], False)))
        for sut, base in (("waypoint-h1", "direct-hbone-h1"), ("waypoint-h2", "direct-hbone-h2")):
            a50, a99 = (self.added("l7", sut, base, "2000", k) for k in ("p50_us", "p99_us"))
            if math.isnan(a50):
                continue
            h50 = self.added("l7", "haproxy", "direct-tls", "2000", "p50_us")
            h99 = self.added("l7", "haproxy", "direct-tls", "2000", "p99_us")
            p("| Latency added at 2k requests/s (%s) | %s | HAProxy %+.2f ms p50, %+.2f ms p99 | "
              "%+.2f ms p50, %+.2f ms p99 | | ≤ +0.3 ms p50, ≤ +1.0 ms p99 | p50 %s; p99 %s |" % (
                  NAMES[sut], ISSUE_PEERS["lat"], h50 / 1e3, h99 / 1e3, a50 / 1e3, a99 / 1e3,
                  verdict(a50, GOALS["lat_p50"], False), verdict(a99, GOALS["lat_p99"], False)))
        counts = self.idle_counts()
        big = counts[-1] if counts else None
        if big:
            prev = ([0] + counts)[-2]
            span = "growth from %s to %s tunnels" % ("idle" if prev == 0 else "{:,}".format(prev),
                                                    "{:,}".format(big))
            oi, hi = med(self.rss("wp-relay", 0)), med(self.rss("haproxy-terminate", 0))
            ot, ht = med(self.per1k("wp-relay", big)), med(self.per1k("haproxy-terminate", big))
            p("| Idle RSS / per 1,000 idle tunnels (%s) | %s | HAProxy %s MB / +%s MB | %s MB / "
              "+%s MB | %s / %s | ≤ 8 MB / ≤ 4 MB | %s; %s |" % (
                  span, ISSUE_PEERS["idle"], fmt(hi, 1), fmt(ht, 1), fmt(oi, 1),
                  fmt(ot, 1), fmt(ratio(oi, hi)), fmt(ratio(ot, ht)),
                  verdict(oi, GOALS["idle_mb"], False), verdict(ot, GOALS["per1k_mb"], False)))
        o = med(self.hs("wp-relay"))
        p("| mTLS handshakes per CPU-second | %s | HAProxy %s, nghttpx %s | %s | %s | ≥ 2,500 | %s |"
          % (ISSUE_PEERS["hs"], fmt(med(self.hs("haproxy-terminate"))),
             fmt(med(self.hs("nghttpx-relay"))), fmt(o),
             fmt(ratio(o, med(self.hs("haproxy-terminate")))), verdict(o, GOALS["hs"])))
        p()
        p("Published anchors (Istio 1.24 performance page, not measured here): waypoint 0.25 vCPU "
          "and 60 MB per 1,000 requests/s; ztunnel 0.06 vCPU and 12 MB.")
        for u in self.unsupported:
            p()
            p("Not supported yet: %s (those rows are left out)." % u)
        for n in self.notes:
            p()
            p("Note from the run: %s" % n)
        p()

    def bulk_section(self, sc, title, topo, ours, peer):
        p = self.p
        if not self.sel("bulk", scenario=sc):
            return
        p("## %s" % title)
        p()
        p(topo + " Throughput is bytes over the time to write them all (the tail in flight, "
          "a few MiB of windows, is not waited for); GB = 10⁹ bytes.")
        p()
        p("| streams | system | Gbit/s | GB per CPU-second | SUT CPU s | failed runs |")
        p("| ---: | --- | --- | --- | --- | ---: |")
        for n in (1, 8):
            for sut in (ours, peer):
                rs = self.sel("bulk", scenario=sc, sut=sut, streams=n)
                if not rs:
                    continue
                p("| %d | %s | %s | %s | %s | %d |" % (
                    n, NAMES[sut], mr(self.gbps(sc, sut, n)), mr(self.gb_per_cpu(sc, sut, n)),
                    mr([r["cpu_s"] for r in rs]),
                    sum(1 for r in rs if r["result"].get("failed", 1))))
        p()

    def http_table(self, sc, suts, mode):
        p = self.p
        p("| system | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | SUT CPU % | requests per "
          "CPU-second | backend saw / load sent | failed runs | overloaded runs |")
        p("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for sut in suts:
            rs = self.http(sc, sut, mode)
            if not rs:
                continue
            util = [100.0 * r["cpu_s"] / r["result"]["duration"]
                    if r.get("cpu_s") is not None and r["result"].get("duration") else None
                    for r in rs]
            seen = sum(r["backend_requests"] for r in rs)
            sent = sum(r["result"].get("requests_total", 0) for r in rs)
            p("| %s | %s | %s | %s | %s | %s | %s | %s | %s / %s | %d | %d |" % (
                NAMES.get(sut, sut), mr(self.rps(sc, sut, mode), 0),
                fmt(med(self.lat(sc, sut, mode, "p50_us")), 0),
                fmt(med(self.lat(sc, sut, mode, "p90_us")), 0),
                fmt(med(self.lat(sc, sut, mode, "p99_us")), 0),
                fmt(med(self.lat(sc, sut, mode, "p999_us")), 0), fmt(med(util), 0),
                mr(self.req_per_cpu(sc, sut, mode), 0) if not sut.startswith("direct") else "–",
                "{:,}".format(seen), "{:,}".format(sent),
                sum(1 for r in rs if not self.clean(r)), self.n_overloaded(sc, sut, mode)))
        p()
        if any(self.n_overloaded(sc, s_, mode) for s_ in suts):
            p("*Overloaded*: the path could not keep up with the offered rate (requests still "
              "queued at the end; their latency counts from the scheduled time, queueing "
              "included); req/s is what got through.")
            p()

    def l7_section(self):
        p = self.p
        if not self.sel("http", scenario="l7"):
            return
        suts = ["waypoint-h1", "waypoint-h2", "haproxy", "nghttpx", "direct-tls",
                "direct-hbone-h1", "direct-hbone-h2"]
        p("## L7 requests: 1 KiB GET, route + header rule")
        p()
        p("HAProxy and nghttpx: `http_load --tls` (4 connections × 16 streams at saturation, × 32 at "
          "fixed rate) → TLS h2 → SUT (path prefix `/bench` + header `x-bench: 1`; nghttpx has "
          "no header rules, path only) → TLS h2 → backend. The waypoint: `http_load` over HBONE "
          "(inner HTTP/1.1: 16 tunnels at saturation, 64 at fixed rate; inner HTTP/2: 4 tunnels × "
          "16 / 32 streams) → waypoint (RBAC on the client's SPIFFE principal, the same route "
          "and header rule, Istio metrics on) → HBONE → hbone serve → backend: it carries the "
          "HBONE layer on both sides in addition to the same HTTP work. The *direct* rows are "
          "the same load with no proxy: the baseline for latency added and the load side's "
          "ceiling (a SUT row far below its direct row is the SUT's limit, not the load's).")
        p()
        p("### Saturation (closed loop)")
        p()
        self.http_table("l7", suts, "sat")
        ceil = {s_: med(self.rps("l7", s_, "sat")) for s_ in suts}
        best = max((ceil[s_], s_) for s_ in suts[:4] if not math.isnan(ceil[s_]))
        p("Load side: with everything on CPU 1, the direct paths reach %s (TLS h2), %s (HBONE, "
          "inner HTTP/2) and %s (HBONE, inner HTTP/1.1) requests/s; the best proxied row (%s) "
          "reached %s. The proxied rows are limited by CPU 1 (load, backend and destination "
          "stand-in together) and by cross-CPU wake-ups, not by the load generator alone: "
          "compare requests per CPU-second, which divides by the SUT's own CPU time." % (
              fmt(ceil["direct-tls"], 0), fmt(ceil["direct-hbone-h2"], 0),
              fmt(ceil["direct-hbone-h1"], 0), NAMES[best[1]], fmt(best[0], 0)))
        p()
        p("### Fixed rate: 2,000 requests/s (open loop, latency from the scheduled send time)")
        p()
        self.http_table("l7", suts, "2000")
        for sut, base in (("waypoint-h1", "direct-hbone-h1"), ("waypoint-h2", "direct-hbone-h2"),
                          ("haproxy", "direct-tls"), ("nghttpx", "direct-tls")):
            a = [self.added("l7", sut, base, "2000", k) for k in ("p50_us", "p90_us", "p99_us")]
            if not math.isnan(a[0]):
                p("- latency added by %s (vs %s): p50 %+.0f µs, p90 %+.0f µs, p99 %+.0f µs" % (
                    NAMES[sut], NAMES[base], *a))
        p()

    def full_section(self):
        p = self.p
        if not self.sel("http", scenario="full"):
            return
        p("## Full waypoint")
        p()
        p("Client ztunnel stand-in (`http_load`, HBONE with the client's certificate) → waypoint "
          "(AuthorizationPolicy as RBAC on the peer principal, route with a header rule, Istio "
          "standard metrics on `--metrics-address`) → HBONE → destination stand-in (`hbone serve`) "
          "→ backend. Peer: Istio's published Envoy waypoint (0.25 vCPU per 1,000 requests/s, "
          "≈ 4k requests per CPU-second).")
        p()
        suts = ["waypoint-h1", "direct-hbone-h1", "waypoint-h2", "direct-hbone-h2"]
        for rate in self.rates():
            p("### %s requests/s" % "{:,}".format(rate))
            p()
            self.http_table("full", suts, str(rate))
            for sut in ("waypoint-h1", "waypoint-h2"):
                v = self.vcpu_per_1k("full", sut, str(rate))
                if not math.isnan(med(v)):
                    p("- %s: %s vCPU per 1,000 requests/s" % (NAMES[sut], mr(v, 3)))
            p()
        p("### Saturation")
        p()
        self.http_table("full", suts, "sat")

    def tunnels_section(self):
        p = self.p
        if not self.sel("idle"):
            return
        p("## Tunnels: memory")
        p()
        p("VmRSS of a fresh SUT idle, then holding N idle tunnels over 100 HBONE connections "
          "(`hbone_load --idle`), measured 1 s after all were answered; the waypoint relays "
          "each tunnel (upstream HBONE, pooled), HAProxy opens one TCP connection per tunnel.")
        p()
        p("| system | idle MB | " + " | ".join("%s tunnels MB | MB per 1,000 more" % "{:,}".format(n)
                                               for n in self.idle_counts()) + " |")
        p("| --- | --- |" + " --- | --- |" * len(self.idle_counts()))
        for sut in ("wp-relay", "haproxy-terminate"):
            cells = [mr(self.rss(sut, 0), 1)]
            for n in self.idle_counts():
                cells += [mr(self.rss(sut, n), 1), mr(self.per1k(sut, n), 2)]
            p("| %s | %s |" % (NAMES[sut], " | ".join(cells)))
        short = [r for r in self.sel("idle") if r["tunnels"] and r.get("ready") != r["tunnels"]]
        if short:
            p()
            p("Runs where not every tunnel opened (left out of the figures): " + ", ".join(
                "%s run %d: %d of %d" % (NAMES[r["sut"]], r["run"], r.get("ready", 0),
                                         r["tunnels"]) for r in short))
        p()

    def hs_section(self):
        p = self.p
        if not self.sel("hs"):
            return
        n = self.sel("hs")[0]["conns"]
        p("## Handshakes")
        p()
        p("`hbone_load --idle --connections %d --tunnels %d`: %d new mTLS connections (ECDSA "
          "P-256 both ways, no resumption), each with one tunnel, then closed; SUT CPU over "
          "the whole run." % (n, n, n))
        p()
        p("| system | handshakes per CPU-second | SUT CPU s | wall s |")
        p("| --- | --- | --- | --- |")
        for sut in ("wp-relay", "haproxy-terminate", "nghttpx-relay"):
            rs = self.sel("hs", sut=sut)
            if rs:
                p("| %s | %s | %s | %s |" % (NAMES[sut], mr(self.hs(sut), 0),
                                             mr([r["cpu_s"] for r in rs], 3),
                                             mr([r["wall_s"] for r in rs], 2)))
        p()

    def stock_section(self):
        p = self.p
        if not self.sel("stock"):
            return
        p("## Cross-check with stock tools")
        p()
        p("Independent load generators through `hbone forward` (each TCP connection becomes one "
          "tunnel on a shared HBONE connection; the forwarder runs on CPU 1): the same paths as "
          "above, driven by code that is not ours.")
        p()
        rows = self.sel("stock", tool="iperf3")
        if rows:
            p("| iperf3 (%s s, 1 stream) through | Gbit/s | GB per CPU-second | hbone_load's figure "
              "(relay, 1 stream) |" % self.env.get("seconds"))
            p("| --- | --- | --- | --- |")
            for sut, bulk in (("wp-stock", "wp-relay"),):
                rs = [r for r in rows if r["sut"] == sut]
                if not rs:
                    continue
                per = [r["result"]["bytes"] / 1e9 / r["cpu_s"]
                       if r["cpu_s"] and r["result"].get("bytes") else None for r in rs]
                p("| %s | %s | %s | %s |" % (NAMES.get(sut, "waypoint"),
                                             mr([r["result"].get("gbps") for r in rs]), mr(per),
                                             mr(self.gb_per_cpu("relay", bulk, 1))))
            p()
        rows = self.sel("stock", tool="h2load")
        if rows:
            p("| h2load (h2c, 4 connections × 16 streams) through | req/s | requests per "
              "CPU-second | http_load's figure (inner HTTP/2, saturation) | failed | backend saw "
              "/ h2load succeeded |")
            p("| --- | --- | --- | --- | ---: | ---: |")
            for sut, label, ref in (("wp-http", "waypoint (L7 path)", "waypoint-h2"),
                                    ("direct", "direct HBONE (no proxy)", None)):
                rs = [r for r in rows if r["sut"] == sut]
                if not rs:
                    continue
                per = [r["result"]["requests"] / r["cpu_s"]
                       if r.get("cpu_s") and r["result"].get("requests") else None for r in rs]
                p("| %s | %s | %s | %s | %d | %s / %s |" % (
                    label, mr([r["result"].get("rps") for r in rs], 0),
                    mr(per, 0) if sut != "direct" else "–",
                    mr(self.req_per_cpu("full", ref, "sat"), 0) if ref else "–",
                    sum(r["result"].get("failed", 1) for r in rs),
                    "{:,}".format(sum(r.get("backend_requests", 0) for r in rs)),
                    "{:,}".format(sum(r["result"].get("requests", 0) for r in rs))))
            p()

    def checks(self):
        p = self.p
        p("## Checks")
        p()
        bad = []
        for r in self.sel("http"):
            sent = r["result"].get("requests_total", 0)
            if r["backend_requests"] < sent:
                bad.append("%s %s %s run %d: backend saw %d of %d requests" % (
                    r["scenario"], r["sut"], r["mode"], r["run"], r["backend_requests"], sent))
        sinks = next((r for r in self.rows if r["kind"] == "sinks"), None)
        for key, runs in (("relay", self.sel("bulk", scenario="relay")),
                          ("wp-terminate", self.sel("bulk", sut="wp-terminate")),
                          ("haproxy-terminate", self.sel("bulk", sut="haproxy-terminate"))):
            sent = sum(r["result"].get("bytes_sent", 0) for r in runs)
            got = (sinks or {}).get(key) or {}
            if sent:
                line = "%s: tunnels sent %s bytes, its sink read %s" % (
                    key, "{:,}".format(sent), "{:,}".format(got.get("bytes", 0)))
                if got.get("bytes", 0) < 0.99 * sent:
                    bad.append(line)
                else:
                    p("- " + line)
        n = len(self.sel("http"))
        p("- HTTP runs whose requests all reached the backend: %d of %d" % (n - len(
            [b for b in bad if "backend saw" in b]), n))
        for b in bad:
            p("- **check failed**: " + b)
        p()

    # ---- plots ----
    def plots(self, outdir):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        img = os.path.join(outdir, "img")
        os.makedirs(img, exist_ok=True)
        made = []
        rates = self.rates()
        if rates:
            fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True)
            marks = {"p50_us": "o-", "p90_us": "s--", "p99_us": "^-.", "p999_us": "x:"}
            for ax, (title, pair) in zip(axes, (
                    ("inner HTTP/1.1", (("waypoint-h1", "C0"), ("direct-hbone-h1", "C2"))),
                    ("inner HTTP/2", (("waypoint-h2", "C1"), ("direct-hbone-h2", "C3"))))):
                for sut, color in pair:
                    for key, m in marks.items():
                        ys = [med(self.lat("full", sut, str(r), key)) for r in rates]
                        if all(math.isnan(y) for y in ys):
                            continue
                        ax.plot(rates, [y / 1e3 for y in ys], m, color=color,
                                label="%s %s" % ("waypoint" if sut.startswith("waypoint")
                                                 else "direct",
                                                 key[:-3].replace("p999", "p99.9")))
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("offered requests/s (open loop)")
                ax.set_title(title)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7, ncol=2)
            axes[0].set_ylabel("latency, ms (from the scheduled send)")
            fig.suptitle("Full waypoint: latency percentiles vs rate")
            fig.tight_layout()
            fig.savefig(os.path.join(img, "latency-vs-rate.png"), dpi=110)
            plt.close(fig)
            made.append(("latency-vs-rate.png", "Full waypoint: latency percentiles vs rate"))
        bars = []
        for sc, ours, peer in (("relay", "wp-relay", "nghttpx-relay"),
                               ("terminate", "wp-terminate", "haproxy-terminate")):
            for n in (1, 8):
                bars.append(("%s\n%d stream%s" % (sc, n, "s" if n > 1 else ""),
                             med(self.gb_per_cpu(sc, ours, n)), med(self.gb_per_cpu(sc, peer, n)),
                             GOALS[sc]))
        if any(not math.isnan(b[1]) for b in bars):
            fig, ax = plt.subplots(figsize=(7, 4))
            xs = range(len(bars))
            ax.bar([x - 0.2 for x in xs], [0 if math.isnan(b[1]) else b[1] for b in bars], 0.4,
                   label="waypoint")
            ax.bar([x + 0.2 for x in xs], [0 if math.isnan(b[2]) else b[2] for b in bars], 0.4,
                   label="peer (nghttpx / HAProxy)")
            for x, b in zip(xs, bars):
                ax.hlines(b[3], x - 0.45, x + 0.45, colors="k", linestyles="dashed")
            ax.set_xticks(list(xs))
            ax.set_xticklabels([b[0] for b in bars])
            ax.set_ylabel("GB per CPU-second of the SUT")
            ax.set_title("Bulk: bytes per CPU-second (dashed: goal)")
            ax.legend()
            fig.tight_layout()
            fig.savefig(os.path.join(img, "bytes-per-cpu.png"), dpi=110)
            plt.close(fig)
            made.append(("bytes-per-cpu.png", "Bulk: bytes per CPU-second"))
        suts = [s for s in ("waypoint-h1", "waypoint-h2", "haproxy", "nghttpx")
                if not math.isnan(med(self.req_per_cpu("l7", s, "sat")))]
        if suts:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            vals = [med(self.req_per_cpu("l7", s, "sat")) / 1e3 for s in suts]
            ax.bar(range(len(suts)), vals, color=["C0", "C1", "C2", "C3"][:len(suts)])
            ax.axhline(GOALS["l7"] / 1e3, color="k", linestyle="dashed")
            ax.set_xticks(range(len(suts)))
            ax.set_xticklabels([NAMES[s].replace(", ", "\n") for s in suts])
            ax.set_ylabel("thousand requests per CPU-second")
            ax.set_title("L7 requests at saturation (dashed: goal)")
            fig.tight_layout()
            fig.savefig(os.path.join(img, "requests-per-cpu.png"), dpi=110)
            plt.close(fig)
            made.append(("requests-per-cpu.png", "L7 requests per CPU-second"))
        if made:
            self.p("## Plots")
            self.p()
            for f, alt in made:
                self.p("![%s](img/%s)" % (alt, f))
                self.p()


def check(raw, outdir):
    """The CI smoke's test: the report exists and is well formed (never a speed)."""
    md = os.path.join(outdir, "benchmarks.md")
    text = open(md).read()
    rows = load(raw)
    errs = []
    for h in ("## Summary", "## L4 relay", "## HBONE terminate", "## L7 requests",
              "## Full waypoint", "## Tunnels", "## Handshakes", "## Checks"):
        if h not in text:
            errs.append("missing section " + h)
    for line in text.splitlines():
        if line.startswith("|") and ("nan" in line.lower().split("|")[1:] or " nan " in line):
            errs.append("NaN in table row: " + line)
    if "**check failed**" in text:
        errs.append("a traffic check failed: " + "; ".join(
            l for l in text.splitlines() if "**check failed**" in l))
    env = next((r for r in rows if r["kind"] == "env"), None)
    if not env or not all(env.get(k) for k in ("kernel", "cpu", "openssl")):
        errs.append("env record lacks kernel/cpu/openssl")
    kinds = {r["kind"] for r in rows}
    for k in ("bulk", "http", "idle", "hs", "sinks"):
        if k not in kinds:
            errs.append("no %s records" % k)
    failed = [r for r in rows if r["kind"] == "bulk" and r["result"].get("failed", 1)]
    failed += [r for r in rows if r["kind"] == "http" and not Report.clean(r)]
    failed += [r for r in rows if r["kind"] == "hs" and r["result"].get("ok") != r["conns"]]
    failed += [r for r in rows if r["kind"] == "idle" and r["tunnels"] and
               r.get("ready") != r["tunnels"]]
    failed += [r for r in rows if r["kind"] == "stock" and (
        r["result"].get("failed", 0) != 0 or not (r["result"].get("bytes") or
                                                  r["result"].get("requests")))]
    for r in failed:
        errs.append("failed run: " + json.dumps(r)[:300])
    for f in ("latency-vs-rate.png", "bytes-per-cpu.png", "requests-per-cpu.png"):
        path = os.path.join(outdir, "img", f)
        if not os.path.exists(path) or open(path, "rb").read(8) != b"\x89PNG\r\n\x1a\n":
            errs.append("missing or not a PNG: " + path)
    for e in errs:
        print("check: " + e, file=sys.stderr)
    return 1 if errs else 0


def main(argv):
    if len(argv) == 4 and argv[1] == "--check":
        return check(argv[2], argv[3])
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    rows = load(argv[1])
    rep = Report(rows)
    text = rep.build(argv[2])
    with open(os.path.join(argv[2], "benchmarks.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
