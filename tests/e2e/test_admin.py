#!/usr/bin/python3
"""The admin listener: Envoy-shaped /config_dump that round-trips through our loader, /clusters,
/listeners, /logging, /drain_listeners, readiness transitions, and the HTTP/1.1 server's
behaviour with broken or hostile clients."""

import asyncio
import copy
import http.client
import json
import os
import signal
import socket
import sys
import time

import h2.connection
import unittest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

T_ADMIN = 'type.googleapis.com/envoy.admin.v3.'
T_ADDRESS = 'type.googleapis.com/istio.workload.Address'
T_ADDRESSES_DUMP = 'type.googleapis.com/waypoint.admin.v1.AddressesConfigDump'
FIXTURE = os.path.join(TESTS_DIR, 'data', 'istiod-waypoint-bookinfo.json')
CHART_CI = os.path.join(os.path.dirname(TESTS_DIR), 'charts', 'waypoint', 'ci')
sys.path.insert(0, CHART_CI)
import render as chart_render  # noqa: E402



def allow_streams_after_goaway():
    """python3-h2 (4.1) closes its whole connection state machine when a GOAWAY arrives, so
    streams the peer accepted before it (RFC 9113 6.8: they go on) can neither send nor receive.
    ztunnel keeps them running; make our client stand-in do the same."""
    sm = h2.connection.H2ConnectionStateMachine
    closed = h2.connection.ConnectionState.CLOSED
    for inp in h2.connection.ConnectionInputs:
        sm._transitions.setdefault((closed, inp), (None, closed))


allow_streams_after_goaway()

# one endpoint of the echo service is marked unhealthy by EDS in this class's config
UNHEALTHY_HOST = 12


def http_request(addr, method, path, body=None, headers=None, timeout=5):
    """(status, headers dict lower-case, body) of one request over a fresh connection."""
    ip, port = split_addr(addr)
    c = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        c.close()


def raw_request(addr, data, timeout=8, chunk=None, delay=0.0):
    """Sends raw bytes (optionally chunk bytes at a time with delay between them) and returns
    everything the server sends until it closes: (status or None, raw response)."""
    ip, port = split_addr(addr)
    s = socket.create_connection((ip, port), timeout=timeout)
    try:
        if chunk:
            for i in range(0, len(data), chunk):
                s.sendall(data[i:i + chunk])
                if delay:
                    time.sleep(delay)
        elif data:
            s.sendall(data)
        out = b''
        while True:
            try:
                d = s.recv(65536)
            except ConnectionResetError:
                break
            if not d:
                break
            out += d
    finally:
        s.close()
    status = None
    if out.startswith(b'HTTP/1.1 '):
        status = int(out[9:12])
    return status, out


def strip_volatile(dump):
    """The dump without what changes between two loads of the same resources."""
    d = copy.deepcopy(dump)

    def walk(o):
        if isinstance(o, dict):
            for k in ('version_info', 'last_updated'):
                o.pop(k, None)
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
    walk(d)
    return d


def without_type(o):
    o = dict(o)
    o.pop('@type', None)
    return o


def extract_resources(dump):
    """Takes the resources out of a config dump, back into the fixture shape the loader reads:
    {"node_id": ..., "resources": {type URL: {name: resource}}}."""
    out = {T_LISTENER: {}, T_CLUSTER: {}, T_ROUTE: {}, T_CLA: {}, T_ADDRESS: {}}
    node_id = None
    for c in dump['configs']:
        t = c['@type']
        if t == T_ADMIN + 'BootstrapConfigDump':
            node_id = c['bootstrap']['node'].get('id')
        elif t == T_ADMIN + 'ListenersConfigDump':
            for dl in c.get('dynamic_listeners', []):
                li = dl['active_state']['listener']
                assert li['@type'] == T_LISTENER, li['@type']
                out[T_LISTENER][dl['name']] = without_type(li)
        elif t == T_ADMIN + 'ClustersConfigDump':
            for dc in c.get('dynamic_active_clusters', []):
                assert dc['cluster']['@type'] == T_CLUSTER
                out[T_CLUSTER][dc['cluster']['name']] = without_type(dc['cluster'])
        elif t == T_ADMIN + 'RoutesConfigDump':
            for dr in c.get('dynamic_route_configs', []):
                out[T_ROUTE][dr['route_config']['name']] = without_type(dr['route_config'])
        elif t == T_ADMIN + 'EndpointsConfigDump':
            for de in c.get('dynamic_endpoint_configs', []):
                cla = de['endpoint_config']
                assert cla['@type'] == T_CLA
                out[T_CLA][cla['cluster_name']] = without_type(cla)
        elif t == T_ADDRESSES_DUMP:
            for da in c.get('dynamic_addresses', []):
                assert da['address']['@type'] == T_ADDRESS
                out[T_ADDRESS][da['name']] = without_type(da['address'])
    res = {'resources': out}
    if node_id:
        res['node_id'] = node_id
    return res


def config_with_unhealthy(topo):
    cfg = topo.config()
    cla = cfg['resources'][T_CLA][topo.services['echo'].cluster]
    for lb in cla['endpoints'][0]['lb_endpoints']:
        if lb['endpoint']['address']['envoy_internal_address']['endpoint_id'].startswith(
                topo.ip(UNHEALTHY_HOST) + ':'):
            lb['health_status'] = 'UNHEALTHY'
    return cfg


class AdminTest(WaypointTestCase):

    @classmethod
    def setUpClass(cls):
        AsyncTestCase.setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        cls.topo = Topology(cls.block)
        cls.status_addr = '%s:15021' % cls.topo.wp_ip
        cls.wp = Waypoint(cls.topo.wp_ip, config_with_unhealthy(cls.topo),
                          extra_args=['--status-address', cls.status_addr], name=cls.__name__)
        cls.wp.start()
        cls._extra_ip = 3

    # --- helpers

    def get(self, path, wp=None, method='GET', **kw):
        wp = wp or self.wp
        return http_request(wp.admin_addr, method, path, **kw)

    def get_json(self, path, wp=None):
        status, hdrs, body = self.get(path, wp)
        self.assertEqual(status, 200, body[:300])
        self.assertEqual(hdrs.get('content-type'), 'application/json')
        return json.loads(body)

    def start_waypoint(self, config, extra_args=(), name='extra'):
        """Another waypoint on .3-.9 of the block with an arbitrary config, checked at
        teardown."""
        cls = type(self)
        ip = self.topo.ip(cls._extra_ip)
        cls._extra_ip = 3 + (cls._extra_ip - 2) % 7
        wp = Waypoint(ip, config, extra_args=list(extra_args), name='%s-%s' % (name, ip))
        wp.start()
        self._closers.append(lambda: wp.stop(check=True))
        return wp

    def dump_types(self, dump):
        return [c['@type'] for c in dump['configs']]

    # --- /config_dump

    async def test_config_dump_has_envoy_shape(self):
        cfg = self.wp.config['resources']
        dump = self.get_json('/config_dump')
        self.assertEqual(self.dump_types(dump), [
            T_ADMIN + 'BootstrapConfigDump', T_ADMIN + 'ClustersConfigDump',
            T_ADMIN + 'ListenersConfigDump', T_ADMIN + 'RoutesConfigDump'])
        boot, clusters, listeners, _routes = dump['configs']
        self.assertEqual(boot['bootstrap']['node']['id'], self.wp.config['node_id'])
        self.assertRegex(boot['last_updated'], r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$')

        names = [dl['name'] for dl in listeners['dynamic_listeners']]
        self.assertEqual(sorted(names), sorted(cfg[T_LISTENER]))
        for dl in listeners['dynamic_listeners']:
            st = dl['active_state']
            self.assertEqual(st['listener']['@type'], T_LISTENER)
            self.assertEqual(st['listener']['name'], dl['name'])
            self.assertEqual(st['version_info'], listeners['version_info'])
            self.assertIn('last_updated', st)
        mi = [dl for dl in listeners['dynamic_listeners'] if dl['name'] == 'main_internal'][0]
        self.assertIn('filter_chain_matcher', mi['active_state']['listener'])

        cnames = [dc['cluster']['name'] for dc in clusters['dynamic_active_clusters']]
        self.assertEqual(sorted(cnames), sorted(cfg[T_CLUSTER]))
        for dc in clusters['dynamic_active_clusters']:
            self.assertEqual(dc['cluster']['@type'], T_CLUSTER)
        # nested Any values are expanded with their own @type
        eds = [dc['cluster'] for dc in clusters['dynamic_active_clusters']
               if dc['cluster']['name'] == self.topo.services['echo'].cluster][0]
        self.assertTrue(eds['transport_socket']['typed_config']['@type'].endswith(
            'InternalUpstreamTransport'), eds['transport_socket'])

        # EDS and WDS only on request
        dump = self.get_json('/config_dump?include_eds&include_addresses')
        self.assertEqual(self.dump_types(dump)[4:], [T_ADMIN + 'EndpointsConfigDump',
                                                     T_ADDRESSES_DUMP])
        eps = dump['configs'][4]['dynamic_endpoint_configs']
        self.assertEqual(sorted(e['endpoint_config']['cluster_name'] for e in eps),
                         sorted(cfg[T_CLA]))

    async def test_config_dump_round_trips_through_the_loader(self):
        for name, source in (('topology', None), ('bookinfo', FIXTURE)):
            with self.subTest(config=name):
                if source:
                    with open(source) as f:
                        original = json.load(f)
                    first = self.start_waypoint(original, name='rt-first')
                else:
                    original, first = self.wp.config, self.wp
                d1 = self.get_json('/config_dump?include_eds&include_addresses', first)
                extracted = extract_resources(d1)
                # the same resources by type and name as the file it was loaded from
                for t, byname in original['resources'].items():
                    self.assertEqual(sorted(extracted['resources'][t]), sorted(byname), t)
                self.assertEqual(extracted.get('node_id'), original.get('node_id'))
                second = self.start_waypoint(extracted, name='rt-second')
                d2 = self.get_json('/config_dump?include_eds&include_addresses', second)
                self.assertEqual(strip_volatile(d2), strip_volatile(d1))
                # and the same again: extraction is a fixed point
                self.assertEqual(extract_resources(d2), extracted)
                # the reloaded waypoint serves from it
                self.assertEqual(self.get('/clusters', second)[2], self.get('/clusters', first)[2])

    async def test_config_dump_resource_and_mask(self):
        cfg = self.wp.config['resources']
        d = self.get_json('/config_dump?resource=dynamic_active_clusters')
        self.assertEqual({c['@type'] for c in d['configs']},
                         {T_ADMIN + 'ClustersConfigDump.DynamicCluster'})
        self.assertEqual(sorted(c['cluster']['name'] for c in d['configs']),
                         sorted(cfg[T_CLUSTER]))
        d = self.get_json('/config_dump?resource=dynamic_endpoint_configs&include_eds')
        self.assertEqual(len(d['configs']), len(cfg[T_CLA]))
        d = self.get_json('/config_dump?resource=static_clusters')
        self.assertEqual(d['configs'], [])

        status, _, body = self.get('/config_dump?resource=no_such_field')
        self.assertEqual(status, 404, body)

        d = self.get_json('/config_dump?mask=dynamic_listeners.name')
        listeners = [c for c in d['configs'] if c['@type'] == T_ADMIN + 'ListenersConfigDump'][0]
        self.assertEqual(set(listeners), {'@type', 'dynamic_listeners'})
        for dl in listeners['dynamic_listeners']:
            self.assertEqual(list(dl), ['name'])
        d = self.get_json('/config_dump?resource=dynamic_active_clusters&mask=cluster.name,'
                          'cluster.type')
        for c in d['configs']:
            self.assertEqual(set(c), {'@type', 'cluster'})
            self.assertLessEqual(set(c['cluster']), {'@type', 'name', 'type'})
            self.assertIn('name', c['cluster'])
        for bad in ('mask=', 'mask=a,,b', 'mask=.a', 'mask=a.'):
            status, _, body = self.get('/config_dump?' + bad)
            self.assertEqual(status, 400 if bad != 'mask=' else 200, (bad, body))

    # --- /clusters, /listeners

    async def test_clusters_lists_endpoints_with_health(self):
        status, hdrs, body = self.get('/clusters')
        self.assertEqual(status, 200)
        self.assertTrue(hdrs['content-type'].startswith('text/plain'))
        lines = body.decode().splitlines()
        for line in lines:
            self.assertGreaterEqual(line.count('::'), 2, line)
        for name in self.wp.config['resources'][T_CLUSTER]:
            self.assertIn('%s::observability_name::%s' % (name, name), lines)
        for svc in self.topo.services.values():
            for e in svc.endpoints:
                addr = '%s:%d' % (e.ip, e.port)
                host = 'envoy://connect_originate/' + addr if e.hbone else addr
                health = '/failed_eds_health' if (
                    svc.name == 'echo' and e.ip == self.topo.ip(UNHEALTHY_HOST)) else 'healthy'
                self.assertIn('%s::%s::health_flags::%s' % (svc.cluster, host, health), lines)
                self.assertIn('%s::%s::weight::1' % (svc.cluster, host), lines)
                self.assertIn('%s::%s::hbone::%s' % (svc.cluster, host,
                                                     'true' if e.hbone else 'false'), lines)
        self.assertIn('%s::healthy_hosts::1' % self.topo.services['echo'].cluster, lines)

        js = self.get_json('/clusters?format=json')
        by_name = {c['name']: c for c in js['cluster_statuses']}
        self.assertEqual(sorted(by_name), sorted(self.wp.config['resources'][T_CLUSTER]))
        echo = by_name[self.topo.services['echo'].cluster]
        health = {h['address']['envoy_internal_address']['endpoint_id']:
                  h['health_status']['eds_health_status'] for h in echo['host_statuses']}
        self.assertEqual(health, {'%s:9000' % self.topo.ip(11): 'HEALTHY',
                                  '%s:9000' % self.topo.ip(12): 'UNHEALTHY'})
        plain = by_name[self.topo.services['plain'].cluster]['host_statuses'][0]
        self.assertEqual(plain['address']['socket_address'],
                         {'address': self.topo.ip(13), 'port_value': 9001})
        status, _, _ = self.get('/clusters?format=yaml')
        self.assertEqual(status, 400)

    async def test_listeners_names_and_addresses(self):
        status, _, body = self.get('/listeners')
        self.assertEqual(status, 200)
        lines = body.decode().splitlines()
        self.assertIn('connect_terminate::%s' % self.wp.hbone_addr, lines)
        self.assertIn('main_internal::envoy://main_internal/', lines)
        self.assertIn('connect_originate::envoy://connect_originate/', lines)
        js = self.get_json('/listeners?format=json')
        by_name = {x['name']: x for x in js['listener_statuses']}
        self.assertEqual(by_name['connect_terminate']['local_address'],
                         {'socket_address': {'address': self.wp.ip,
                                             'port_value': self.wp.hbone_port}})
        self.assertEqual(by_name['main_internal']['local_address'],
                         {'envoy_internal_address': {'server_listener_name': 'main_internal'}})

    # --- /logging, /server_info, /stats

    async def test_logging_level_change_is_observed(self):
        def debug_lines():
            return [ln for ln in self.wp.log_text().splitlines() if ' debug ' in ln]

        try:
            status, _, body = self.get('/logging?level=debug', method='POST')
            self.assertEqual(status, 200, body)
            self.assertIn(b'waypoint: debug', body)
            self.assertEqual(self.wp.server_info()['command_line_options']['log_level'], 'debug')
            c = await self.wp_client()
            await self.echo_roundtrip(c, 'plain')
            for _ in range(50):
                if any('established' in ln for ln in debug_lines()):
                    break
                await asyncio.sleep(0.05)
            self.assertTrue(any('established' in ln for ln in debug_lines()), self.wp.tail())
        finally:
            # GET works too (as the brief for operators says), and restores the default
            status, _, body = self.get('/logging?level=info')
            self.assertEqual(status, 200, body)
        before = len(debug_lines())
        c2 = await self.wp_client()
        await self.echo_roundtrip(c2, 'plain')
        await asyncio.sleep(0.2)
        self.assertEqual(len(debug_lines()), before)
        status, _, body = self.get('/logging')
        self.assertEqual((status, body), (200, b'active loggers:\n  waypoint: info\n'))
        for bad in ('/logging?level=loud', '/logging?level=debug&upstream=trace'):
            status, _, _ = self.get(bad, method='POST')
            self.assertEqual(status, 400, bad)
        self.assertEqual(self.wp.server_info()['command_line_options']['log_level'], 'info')

    async def test_server_info_and_stats(self):
        info = self.wp.server_info()
        self.assertEqual(info['state'], 'LIVE')
        self.assertEqual(info['node']['id'], self.wp.config['node_id'])
        self.assertGreaterEqual(info['command_line_options']['concurrency'], 1)
        self.assertRegex(info['uptime_current_epoch'], r'^\d+s$')
        c = await self.wp_client()
        await self.echo_roundtrip(c, 'plain')
        js = self.get_json('/stats?format=json&filter=^waypoint\\.tunnels_')
        names = [s['name'] for s in js['stats']]
        self.assertIn('waypoint.tunnels_total', names)
        self.assertTrue(all(n.startswith('waypoint.tunnels_') for n in names), names)
        total = [s['value'] for s in js['stats'] if s['name'] == 'waypoint.tunnels_total'][0]
        self.assertGreaterEqual(total, 1)
        status, _, body = self.get('/stats?filter=config')
        self.assertEqual(status, 200)
        self.assertEqual(sorted(ln.split(':')[0] for ln in body.decode().splitlines()),
                         ['waypoint.config.chains', 'waypoint.config.clusters'])
        status, _, _ = self.get('/stats?filter=(')
        self.assertEqual(status, 400)

    # --- HTTP/1.1 server behaviour

    async def test_http_methods_and_paths(self):
        addr = self.wp.admin_addr
        status, hdrs, body = await asyncio.to_thread(http_request, addr, 'HEAD', '/server_info')
        self.assertEqual(status, 200)
        self.assertEqual(body, b'')
        self.assertGreater(int(hdrs['content-length']), 20)
        status, hdrs, body = self.get('/server_info')
        self.assertEqual(int(hdrs['content-length']), len(body))

        status, _, _ = self.get('/no/such/thing')
        self.assertEqual(status, 404)
        status, hdrs, _ = self.get('/server_info', method='POST')
        self.assertEqual((status, hdrs.get('allow')), (405, 'GET, HEAD'))
        status, hdrs, _ = self.get('/quitquitquit')  # GET must not quit
        self.assertEqual((status, hdrs.get('allow')), (405, 'POST'))
        status, hdrs, _ = self.get('/drain_listeners', method='PUT')
        self.assertEqual((status, hdrs.get('allow')), (405, 'POST'))
        status, _, _ = self.get('/ready', method='DELETE')
        self.assertEqual(status, 405)
        status, _, body = self.get('/')
        self.assertEqual(status, 200)
        self.assertIn(b'/config_dump', body)
        # a POST with a body: read and ignored
        status, _, body = self.get('/logging?level=info', method='POST', body=b'x' * 3000)
        self.assertEqual(status, 200, body)

        raw = lambda data, **kw: asyncio.to_thread(raw_request, addr, data, **kw)  # noqa: E731
        self.assertEqual((await raw(b'BREW /ready HTTP/1.1\r\nHost: x\r\n\r\n'))[0], 501)
        self.assertEqual((await raw(b'GET /ready HTTP/1.1\r\n\r\n'))[0], 400)  # no Host
        self.assertEqual((await raw(b'GET /ready HTTP/1.0\r\n\r\n'))[0], 200)
        self.assertEqual((await raw(b'GET /ready HTTP/2.0\r\nHost: x\r\n\r\n'))[0], 505)
        self.assertEqual((await raw(b'GET /ready HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n'))[0],
                         400)
        self.assertEqual((await raw(b'GET ready HTTP/1.1\r\nHost: x\r\n\r\n'))[0], 400)
        self.assertEqual((await raw(b'GET /ready HTTP/1.1\r\nHost: x\r\n bad: fold\r\n\r\n'))[0],
                         400)
        self.assertEqual((await raw(b'GET /ready HTTP/1.1\r\nHost: x\r\nNo Colon\r\n\r\n'))[0],
                         400)
        self.assertEqual((await raw(b'GET /ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n'
                                    b'Content-Length: 2\r\n\r\nab'))[0], 400)
        self.assertEqual((await raw(b'POST /logging HTTP/1.1\r\nHost: x\r\n'
                                    b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n'))[0], 501)
        self.assertEqual((await raw(b'POST /logging HTTP/1.1\r\nHost: x\r\n'
                                    b'Content-Length: 1000000\r\n\r\n'))[0], 413)
        self.assertEqual((await raw(b'GET /ready?x=%zz HTTP/1.1\r\nHost: x\r\n\r\n'))[0], 400)
        # binary noise (a TLS ClientHello) is refused at once
        self.assertEqual((await raw(client_hello_bytes()))[0], 400)
        # HTTP/2 prior knowledge
        self.assertEqual((await raw(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'))[0], 400)

    async def test_http_oversized_requests(self):
        addr = self.wp.admin_addr
        raw = lambda data, **kw: asyncio.to_thread(raw_request, addr, data, **kw)  # noqa: E731
        status, out = await raw(b'GET /' + b'a' * 5000 + b' HTTP/1.1\r\nHost: x\r\n\r\n')
        self.assertEqual(status, 414, out[:100])
        status, out = await raw(b'GET /ready HTTP/1.1\r\nHost: x\r\nX-Big: ' + b'b' * 10000 +
                                b'\r\n\r\n')
        self.assertEqual(status, 431, out[:100])
        many = b''.join(b'X-H%d: v\r\n' % i for i in range(100))
        status, out = await raw(b'GET /ready HTTP/1.1\r\nHost: x\r\n' + many + b'\r\n')
        self.assertEqual(status, 431, out[:100])
        # the server survived and still answers
        self.assertEqual(self.get('/ready')[0], 200)

    async def test_http_slow_and_idle_clients(self):
        addr = self.wp.admin_addr
        # byte at a time is fine
        status, out = await asyncio.to_thread(
            raw_request, addr, b'GET /ready HTTP/1.1\r\nHost: x\r\n\r\n', chunk=1, delay=0.005)
        self.assertEqual(status, 200, out)
        self.assertTrue(out.endswith(b'\r\n\r\nLIVE\n'), out)
        # idle connections (more than the server's slots) do not lock others out
        ip, port = split_addr(addr)
        idle = [socket.create_connection((ip, port)) for _ in range(40)]
        try:
            for s in idle[:20]:
                s.sendall(b'GET /ready HTTP/1.1\r\n')  # and never finish
            t0 = time.monotonic()
            status, _, _ = await asyncio.to_thread(http_request, addr, 'GET', '/ready',
                                                   timeout=3)
            self.assertEqual(status, 200)
            self.assertLess(time.monotonic() - t0, 2)
        finally:
            for s in idle:
                s.close()
        # an unfinished request is answered 408 after the read deadline (5 s)
        s = socket.create_connection((ip, port), timeout=10)
        try:
            s.sendall(b'GET /ready HTTP/1.1\r\nHost: x\r\n')
            t0 = time.monotonic()
            out = await asyncio.to_thread(s.recv, 4096)
            self.assertTrue(out.startswith(b'HTTP/1.1 408 '), out)
            self.assertLess(time.monotonic() - t0, 8)
        finally:
            s.close()

    async def test_status_port_serves_only_readiness(self):
        status, _, body = http_request(self.status_addr, 'GET', '/healthz/ready')
        self.assertEqual((status, body), (200, b'LIVE\n'))
        status, _, _ = http_request(self.status_addr, 'GET', '/config_dump')
        self.assertEqual(status, 404)
        status, _, _ = http_request(self.status_addr, 'POST', '/quitquitquit')
        self.assertEqual(status, 404)
        self.assertTrue(self.wp.alive())

    async def test_healthcheck_fail_and_ok(self):
        try:
            self.assertEqual(self.get('/healthcheck/fail', method='POST')[0], 200)
            status, _, body = self.get('/ready')
            self.assertEqual((status, body), (503, b'DRAINING\n'))
            status, _, _ = http_request(self.status_addr, 'GET', '/healthz/ready')
            self.assertEqual(status, 503)
        finally:
            self.assertEqual(self.get('/healthcheck/ok', method='POST')[0], 200)
        self.assertEqual(self.get('/ready')[:3:2], (200, b'LIVE\n'))

    # --- drain

    async def test_drain_listeners_keeps_tunnels_refuses_new_connections(self):
        wp = self.extra_waypoint()
        c = await self.wp_client(wp)
        t = c.open_tunnel(self.topo.authority('echo'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'before')
        self.assertEqual(await t.recv_exactly(6), b'before')

        status, _, body = self.get('/drain_listeners', wp, method='POST')
        self.assertEqual((status, body), (200, b'OK\n'))
        status, _, body = self.get('/ready', wp)
        self.assertEqual((status, body), (503, b'DRAINING\n'))

        # new connections are refused (once every worker closed its listener)
        ip, port = split_addr(wp.hbone_addr)
        deadline = time.monotonic() + 5
        refused = False
        while time.monotonic() < deadline and not refused:
            try:
                socket.create_connection((ip, port), timeout=1).close()
                await asyncio.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        self.assertTrue(refused, 'still accepting after /drain_listeners')
        with self.assertRaises(SessionFailed):
            await HboneClient.connect(wp.hbone_addr, local_ip=self.topo.client_ip, timeout=2)

        # the connection was told to go away, its tunnel goes on
        for _ in range(100):
            if c.goaway is not None:
                break
            await asyncio.sleep(0.02)
        self.assertIsNotNone(c.goaway, 'no GOAWAY on the existing connection')
        payload = os.urandom(200000)
        await t.send(payload)
        await t.send_eof()
        self.assertEqual(await t.recv_all(), payload)
        self.assertTrue(wp.alive())
        self.assertTrue(wp.server_info()['listeners_drained'])
        # idempotent
        self.assertEqual(self.get('/drain_listeners', wp, method='POST')[0], 200)

    async def _readiness_drops_on_drain(self, trigger):
        status_addr = '%s:15021' % self.topo.ip(self._extra_ip)
        wp = self.extra_waypoint(['--drain-ms', '4000', '--status-address', status_addr])
        # it exits on its own here: replace the checked stop registered by extra_waypoint
        self._closers.pop()
        self._closers.append(lambda: wp.stop(check=False))
        self.assertEqual(self.get('/ready', wp)[:3:2], (200, b'LIVE\n'))
        self.assertEqual(http_request(status_addr, 'GET', '/healthz/ready')[0], 200)
        # an open tunnel keeps the process in its drain period
        c = await self.wp_client(wp)
        t = c.open_tunnel(self.topo.authority('echo'))
        self.assertEqual((await t.wait_response()).status, 200)

        trigger(wp)
        seen = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                status, _, body = http_request(wp.admin_addr, 'GET', '/ready', timeout=1)
            except OSError:
                break
            seen.append((status, body))
            if status == 503:
                break
            await asyncio.sleep(0.02)
        self.assertEqual(seen[-1], (503, b'DRAINING\n'), seen)
        self.assertTrue(wp.alive())
        self.assertEqual(http_request(status_addr, 'GET', '/healthz/ready')[0], 503)
        self.assertEqual(wp.server_info()['state'], 'DRAINING')
        # the tunnel still works during the drain period
        await t.send(b'draining')
        self.assertEqual(await t.recv_exactly(8), b'draining')
        await t.send_eof()
        await t.recv_all()
        c.close()
        # with nothing left open the process exits well before the drain period ends
        rc = await asyncio.to_thread(wp.proc.wait, 10)
        self.assertEqual(rc, 0, wp.tail())
        self.assertIsNone(wp.sanitizer_report(), wp.tail(200))

    async def test_readiness_drops_after_quitquitquit(self):
        def quit(wp):
            status, _, _ = http_request(wp.admin_addr, 'POST', '/quitquitquit')
            self.assertEqual(status, 200)
        await self._readiness_drops_on_drain(quit)

    async def test_readiness_drops_after_sigterm(self):
        await self._readiness_drops_on_drain(lambda wp: wp.proc.send_signal(signal.SIGTERM))

    # --- the stock pod's command line

    async def test_accepts_istio_waypoint_template_argv(self):
        wp = self.extra_waypoint([
            'proxy', 'waypoint', '--domain', 'bookinfo.svc.cluster.local',
            '--serviceCluster', 'bookinfo-waypoint.bookinfo', '--proxyLogLevel', 'warning',
            '--proxyComponentLogLevel', 'misc:error', '--log_output_level', 'default:info',
            '--log_as_json', '--outlierLogPath=/dev/null'])
        self.assertEqual(self.get('/ready', wp)[0], 200)

    async def test_chart_overlay_args_are_accepted(self):
        docs = chart_render.manifests(chart_render.render(
            'bookinfo', sets=['parametersRef.enabled=true', 'logLevel=warning']))
        cm = [d for d in docs if d['kind'] == 'ConfigMap'][0]
        patch = yaml.safe_load(cm['data']['deployment'])
        args = patch['spec']['template']['spec']['containers'][0]['args']
        wp = self.extra_waypoint(args)
        self.assertEqual(self.get('/ready', wp)[0], 200)
        self.assertEqual(wp.server_info()['command_line_options']['log_level'], 'warn')


class ChartTest(unittest.TestCase):
    """charts/waypoint renders (with ci/render.py: no Helm here) into what Istio expects."""

    def gateway(self, docs):
        gws = [d for d in docs if d['kind'] == 'Gateway']
        self.assertEqual(len(gws), 1)
        return gws[0]

    def test_default_is_an_annotated_istio_waypoint_gateway(self):
        docs = chart_render.manifests(chart_render.render('bookinfo'))
        self.assertEqual([d['kind'] for d in docs], ['Gateway'])
        gw = self.gateway(docs)
        self.assertEqual(gw['apiVersion'], 'gateway.networking.k8s.io/v1')
        self.assertEqual(gw['metadata']['namespace'], 'bookinfo')
        self.assertEqual(gw['spec']['gatewayClassName'], 'istio-waypoint')
        self.assertEqual(gw['spec']['listeners'], [{
            'name': 'mesh', 'port': 15008, 'protocol': 'HBONE',
            'allowedRoutes': {'namespaces': {'from': 'Same'}}}])
        self.assertEqual(gw['metadata']['labels']['istio.io/waypoint-for'], 'service')
        self.assertNotIn('istio.io/rev', gw['metadata']['labels'])
        image = gw['metadata']['annotations']['sidecar.istio.io/proxyImage']
        self.assertIn('/', image)  # Istio ignores the annotation otherwise
        self.assertTrue(image.endswith(':0.1.0'), image)
        self.assertNotIn('infrastructure', gw['spec'])

    def test_parameters_ref_mode_adds_the_overlay_configmap(self):
        docs = chart_render.manifests(chart_render.render(
            'bookinfo', sets=['parametersRef.enabled=true', 'pdbMinAvailable=1',
                              'gateway.revision=canary', 'image.repository=reg.local/wp']))
        gw = self.gateway(docs)
        cm = [d for d in docs if d['kind'] == 'ConfigMap'][0]
        self.assertEqual(gw['metadata']['labels']['istio.io/rev'], 'canary')
        self.assertEqual(gw['spec']['infrastructure']['parametersRef'],
                         {'group': '', 'kind': 'ConfigMap', 'name': cm['metadata']['name']})
        self.assertEqual(cm['metadata']['namespace'], gw['metadata']['namespace'])
        patch = yaml.safe_load(cm['data']['deployment'])
        c = patch['spec']['template']['spec']['containers'][0]
        self.assertEqual(c['name'], 'istio-proxy')
        self.assertEqual(c['image'], 'reg.local/wp:0.1.0')
        self.assertEqual(c['resources']['limits']['memory'], '1Gi')
        self.assertTrue(all(isinstance(a, str) for a in c['args']), c['args'])
        self.assertEqual(yaml.safe_load(cm['data']['podDisruptionBudget']),
                         {'spec': {'minAvailable': 1}})

    def test_renderer_refuses_missing_values_and_unknown_syntax(self):
        with self.assertRaises(chart_render.TemplateError):
            chart_render.render('x', sets=['image=null'])
        with self.assertRaises(chart_render.TemplateError):
            chart_render.render_text('{{ include "x" . }}', {'Values': {}})
        with self.assertRaises(chart_render.TemplateError):
            chart_render.render_text('{{- if .Values.a }}x', {'Values': {'a': 1}})


if __name__ == '__main__':
    require_waypoint()
    main()
