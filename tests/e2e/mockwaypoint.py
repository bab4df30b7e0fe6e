#!/usr/bin/python3
"""A deliberately small Python model of the waypoint's HBONE data path, built on hbonelib.

Not a test and not registered with meson: it exists to check the e2e tests themselves (point
WAYPOINT_BIN at this file to see which tests a straightforward implementation of the CLI spec
passes). Same command line as the daemon (unknown flags are accepted and ignored). Known gaps of
the model, so the corresponding tests fail against it: ALPN mismatch does not fail the handshake
(Python's ssl server ignores it), exceeding MAX_CONCURRENT_STREAMS kills the connection (h2
raises) instead of REFUSED_STREAM."""

import argparse
import asyncio
import ipaddress
import json
import os
import signal
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hbonelib as hl  # noqa: E402
import h2.settings  # noqa: E402

ap = argparse.ArgumentParser()
for flag in ['--config-file', '--cert-file', '--key-file', '--root-cert', '--hbone-address',
             '--admin-address']:
    ap.add_argument(flag, required=True)
ap.add_argument('--trust-domain', default='cluster.local')
ap.add_argument('--concurrency', type=int, default=1)
ap.add_argument('--io-backend', default='epoll')
ap.add_argument('--log-level', default='info')
ap.add_argument('--upstream-hbone-port', type=int, default=15008)
ap.add_argument('--connect-timeout-ms', type=int, default=10000)
ap.add_argument('--max-concurrent-streams', type=int, default=100)
ap.add_argument('--handshake-timeout-ms', type=int, default=10000)
args, _unknown = ap.parse_known_args()


def load_routes(path):
    with open(path) as f:
        cfg = json.load(f)
    res = cfg['resources']
    mi = res[hl.T_LISTENER]['main_internal']
    rm = mi['filter_chain_matcher']['matcher_tree']['custom_match']['typed_config']['range_matchers']
    vips, direct = {}, set()
    for m in rm:
        tree = m['on_match']['matcher']['matcher_tree']
        for r in m['ranges']:
            if tree['input']['name'] == 'port':
                for port, act in tree['exact_match_map']['map'].items():
                    vips[(r['address_prefix'], int(port))] = act['action']['name']
            else:
                direct.add(r['address_prefix'])
    clusters = {}
    for name, cla in res[hl.T_CLA].items():
        eps = []
        for loc in cla.get('endpoints', []):
            for lb in loc['lb_endpoints']:
                a = lb['endpoint']['address']
                if 'envoy_internal_address' in a:
                    ip, port = hl.split_addr(a['envoy_internal_address']['endpoint_id'])
                    eps.append((ip, port, True))
                else:
                    eps.append((a['socket_address']['address'],
                                a['socket_address']['port_value'], False))
        clusters[name] = eps
    return vips, direct, clusters


VIPS, DIRECT, CLUSTERS = load_routes(args.config_file)
RR = {}
TIMEOUT = args.connect_timeout_ms / 1000


def log(*a):
    sys.stderr.write('mockwaypoint: ' + ' '.join(str(x) for x in a) + '\n')


def upstream_ctx():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(args.root_cert)
    ctx.load_cert_chain(args.cert_file, args.key_file)
    ctx.set_alpn_protocols(['h2'])
    return ctx


def parse_authority(a):
    host, sep, port = a.rpartition(':')
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    try:
        ip = ipaddress.ip_address(host.strip('[]') if host.startswith('[') else host)
    except ValueError:
        return None
    if host.startswith('[') != host.endswith(']'):
        return None
    return str(ip), int(port)


class TcpSide:
    def __init__(self, reader, writer):
        self.r, self.w = reader, writer

    async def read(self):
        return await self.r.read(256 * 1024)

    async def write(self, data):
        self.w.write(data)
        await self.w.drain()

    async def eof(self):
        self.w.write_eof()

    def abort(self):
        hl.abort_writer(self.w)

    def close(self):
        self.w.close()


class TunnelSide:
    def __init__(self, t):
        self.t = t

    async def read(self):
        return await self.t.recv()

    async def write(self, data):
        await self.t.send(data)

    async def eof(self):
        await self.t.send_eof()

    def abort(self):
        self.t.reset(hl.ErrorCodes.CANCEL)

    def close(self):
        pass


async def pump(src, dst, other_abort):
    try:
        while True:
            d = await src.read()
            if not d:
                await dst.eof()
                return
            await dst.write(d)
    except (hl.TunnelReset, ConnectionError):
        dst.abort()
        other_abort()


async def handle(ep, t, state):
    h = dict(t.request_headers)
    if ':protocol' in h or (h.get(':method') == 'CONNECT' and ':authority' not in h):
        t.reset(hl.ErrorCodes.PROTOCOL_ERROR)
        return
    if h.get(':method') != 'CONNECT':
        t.respond(405, [('x-waypoint-error', 'method_not_allowed')], end_stream=True)
        return
    target = parse_authority(h[':authority'])
    if target is None:
        t.respond(400, [('x-waypoint-error', 'bad_authority')], end_stream=True)
        return
    if target in VIPS:
        eps = CLUSTERS.get(VIPS[target], [])
        if not eps:
            t.respond(503, [('x-waypoint-error', 'no_healthy_endpoint')], end_stream=True)
            return
        i = RR.get(target, 0)
        RR[target] = i + 1
        ep_ip, ep_port, hbone = eps[i % len(eps)]
    elif target[0] in DIRECT:
        ep_ip, ep_port, hbone = target[0], target[1], True
    else:
        t.respond(404, [('x-waypoint-error', 'target_not_served')], end_stream=True)
        return
    try:
        if hbone:
            try:
                c = await hl.HboneClient.connect((ep_ip, args.upstream_hbone_port),
                                                 ssl_context=upstream_ctx(), timeout=TIMEOUT)
            except hl.SessionFailed as e:
                if 'Refused' in str(e):
                    raise ConnectionRefusedError()
                raise asyncio.TimeoutError()
            ut = c.open_tunnel('%s:%d' % (ep_ip, ep_port))
            try:
                r = await ut.wait_response(TIMEOUT)
            except asyncio.TimeoutError:
                ut.reset()
                raise
            if r.status != 200:
                t.respond(502, [('x-waypoint-error', 'upstream_status_%d' % r.status)],
                          end_stream=True)
                c.close()
                return
            up = TunnelSide(ut)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(ep_ip, ep_port),
                                                    TIMEOUT)
            up = TcpSide(reader, writer)
    except ConnectionRefusedError:
        t.respond(502, [('x-waypoint-error', 'upstream_refused')], end_stream=True)
        return
    except (asyncio.TimeoutError, OSError):
        t.respond(504, [('x-waypoint-error', 'upstream_timeout')], end_stream=True)
        return
    t.respond(200)
    down = TunnelSide(t)
    try:
        await asyncio.gather(pump(down, up, up.abort), pump(up, down, down.abort))
    finally:
        up.close()


class Server:
    def __init__(self):
        self.settings = {h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                         args.max_concurrent_streams}

    def factory(self):
        ep = hl.H2Endpoint(False, settings=self.settings, validate_inbound=False)
        state = {'resets': [], 'calm': False}
        orig = ep._dispatch

        def dispatch(ev):
            if isinstance(ev, h2.events.StreamReset):
                now = time.monotonic()
                state['resets'] = [x for x in state['resets'] if now - x < 1] + [now]
                if len(state['resets']) > 200 and not state['calm']:
                    state['calm'] = True
                    ep.close(hl.ErrorCodes.ENHANCE_YOUR_CALM)
            orig(ev)
        ep._dispatch = dispatch
        ep.on_request = lambda t: asyncio.ensure_future(handle(ep, t, state))
        orig_made = ep.connection_made

        def made(transport):
            sans = hl.uri_sans(transport.get_extra_info('ssl_object').getpeercert())
            if len(sans) != 1 or not sans[0].startswith('spiffe://%s/' % args.trust_domain):
                transport.abort()
                return
            orig_made(transport)
        ep.connection_made = made
        return ep


async def admin(reader, writer):
    line = await reader.readline()
    while (await reader.readline()) not in (b'\r\n', b'\n', b''):
        pass
    path = line.split()[1].decode() if len(line.split()) > 1 else '/'
    if path == '/ready':
        body = b'LIVE'
    elif path == '/server_info':
        body = json.dumps({'io_backend': args.io_backend, 'concurrency': args.concurrency}).encode()
    else:
        body = b''
    status = b'200 OK' if body else b'404 Not Found'
    writer.write(b'HTTP/1.1 ' + status + b'\r\nContent-Length: %d\r\nConnection: close\r\n\r\n'
                 % len(body) + body)
    await writer.drain()
    writer.close()


async def main():
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda l, c: None)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert_file, args.key_file)
    ctx.load_verify_locations(args.root_cert)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(['h2'])
    ip, port = hl.split_addr(args.hbone_address)
    srv = Server()
    await loop.create_server(srv.factory, ip, port, ssl=ctx, reuse_address=True,
                             ssl_handshake_timeout=args.handshake_timeout_ms / 1000)
    aip, aport = hl.split_addr(args.admin_address)
    await asyncio.start_server(admin, aip, aport, reuse_address=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


asyncio.run(main())
