#!/usr/bin/env bash
# A waypoint on loopback, end to end:
#
#   hbone connect (client ztunnel stand-in, identity sleep)
#      --HBONE--> waypoint 127.0.0.60:15008   (config: examples/waypoint-demo.yaml)
#      --HBONE--> hbone serve 127.0.30.{1,2}:15008 (destination ztunnel stand-ins)
#      --TCP----> echo pods 127.0.30.{1,2}:7000
#   and a non-mesh service (legacy) reached over plain TCP at 127.0.31.1:7001.
#
# Usage: examples/demo.sh   (builds into build-demo/ on first use; needs the packages in .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
build=${WP_DEMO_BUILD:-build-demo}
[ -f "$build/build.ninja" ] || meson setup "$build" -Dbuildtype=release -De2e=false >/dev/null
ninja -C "$build" waypoint/waypoint hbone/hbone >/dev/null
work=$(mktemp -d)
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${WP_DEMO_KEEP:-}" ] && echo "kept $work" || rm -rf "$work"; }
trap cleanup EXIT
/usr/bin/python3 tests/tools/mkpki.py "$work/pki" >/dev/null
P=$work/pki

# echo "pods": each prefixes its name so round robin is visible
for pod in 127.0.30.1:7000 127.0.30.2:7000 127.0.31.1:7001; do
        /usr/bin/python3 - "$pod" <<'PY' &
import socket, sys, threading
host, port = sys.argv[1].rsplit(":", 1)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, int(port))); s.listen(64)
def serve(c):
    with c:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(b"[" + sys.argv[1].encode() + b"] " + d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
PY
        pids+=($!)
done
for ip in 127.0.30.1 127.0.30.2; do
        "$build/hbone/hbone" serve --listen $ip:15008 --cert $P/dest.pem --key $P/dest.key \
                --root $P/root.pem 2>"$work/serve-$ip.log" &
        pids+=($!)
done
"$build/waypoint/waypoint" --config-file examples/waypoint-demo.yaml \
        --cert-file $P/waypoint.pem --key-file $P/waypoint.key --root-cert $P/root.pem \
        --hbone-address 127.0.0.60:15008 --admin-address 127.0.0.60:15000 \
        --concurrency 2 --log-level info 2>"$work/waypoint.log" &
pids+=($!)
for _ in $(seq 50); do
        curl -sf http://127.0.0.60:15000/ready >/dev/null 2>&1 && break
        sleep 0.1
done

say() { printf '\n\033[1m%s\033[0m\n' "$*"; }
connect() { "$build/hbone/hbone" connect --server 127.0.0.60:15008 --authority "$1" \
        --cert $P/client.pem --key $P/client.key --root $P/root.pem; }

say "1. Three tunnels to the echo service VIP 127.200.0.10:7000 (HBONE endpoints, round robin):"
for i in 1 2 3; do echo "hello $i" | connect 127.200.0.10:7000; done
say "2. A tunnel to the legacy service VIP 127.200.0.11:7001 (plain TCP endpoint):"
echo "hello legacy" | connect 127.200.0.11:7001
say "3. A target this waypoint does not serve (expect a refusal):"
echo "nobody home" | connect 127.200.0.99:80 || true
say "4. What the destination ztunnel stand-ins saw (peer identity = the waypoint's):"
cat "$work"/serve-*.log
say "5. Waypoint server_info and counters:"
curl -s http://127.0.0.60:15000/server_info
curl -s http://127.0.0.60:15000/stats | grep -E 'tunnels_(total|established|target_not_served)|bytes'
say "6. Waypoint log:"
cat "$work/waypoint.log"
