#!/usr/bin/python3
"""End to end: HTTP/1.1 inside HBONE tunnels through the waypoint's HTTP chains.

Client stand-in (python3-h2 HBONE) -> waypoint -> destination stand-ins (HBONE, forward mode) or a
plain TCP endpoint -> Python http.server backends. Checks routing (path, header, method),
weighted split, redirect, direct response, prefix rewrite, header mutations, RBAC, per-request
load balancing, timeout (504), retries (attempts seen by the backend), connect failure (503),
keep-alive reuse of upstream tunnels (CONNECTs counted at the destination stand-in), a
WebSocket-style upgrade, an h2c prior-knowledge request (test_l7_h2.py covers HTTP/2), and
request smuggling attempts (400, tunnel closed, waypoint survives).
"""

import asyncio
import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
from hbonelib import Endpoint, Service, Waypoint, block_for, make_config  # noqa: E402
from l7lib import (AUTHZ_RBAC, H1, H2, HttpBackend, http_chain, route,  # noqa: E402
                   route_config, with_http_chains)

WEB_PODS = (31, 32, 33)
V2_POD, SLOW_POD, FLAKY_POD, WS_POD, PLAIN_POD, NOSTANDIN_POD = 34, 35, 36, 37, 38, 39
HBONE_PODS = WEB_PODS + (V2_POD, SLOW_POD, FLAKY_POD, WS_POD)
APP_PORT = 8080


class L7Topology:
    def __init__(self, block):
        self.block = block
        ip = self.ip
        self.wp_ip = ip(1)
        self.client_ip = ip(2)

        def svc(name, vip, pods, hbone=True):
            return Service(name, ip(vip), 80, [Endpoint(ip(p), APP_PORT, hbone) for p in pods])
        self.svcs = {
            'web': svc('web', 100, WEB_PODS),
            'web-v2': svc('web-v2', 101, [V2_POD]),
            'slow': svc('slow', 102, [SLOW_POD]),
            'flaky': svc('flaky', 103, [FLAKY_POD]),
            'ws': svc('ws', 104, [WS_POD]),
            'plainweb': svc('plainweb', 105, [PLAIN_POD], hbone=False),
            'single': svc('single', 106, [WEB_PODS[0]]),
            'authz': svc('authz', 107, [WEB_PODS[0]]),
            'refused': svc('refused', 108, [NOSTANDIN_POD]),
        }

    def ip(self, host):
        return '%s.%d' % (self.block, host)

    def authority(self, name):
        return self.svcs[name].authority

    def cluster(self, name):
        return self.svcs[name].cluster

    def config(self):
        c = self.cluster
        web_routes = [
            route({'path': '/redirect'}, redirect={'path_redirect': '/new-home',
                                                   'response_code': 'FOUND'}),
            route({'prefix': '/direct'}, direct_response={
                'status': 200, 'body': {'inline_string': 'direct body'}}),
            route({'prefix': '/old/'}, route={'cluster': c('web'), 'prefix_rewrite': '/new/'}),
            route({'prefix': '/split'}, route={'weighted_clusters': {'clusters': [
                {'name': c('web'), 'weight': 80}, {'name': c('web-v2'), 'weight': 20}]}}),
            route({'prefix': '/hdr', 'headers': [{'name': 'x-pick',
                                                  'string_match': {'exact': 'v2'}}]},
                  route={'cluster': c('web-v2')}),
            route({'prefix': '/hdr'}, route={'cluster': c('web')}),
            route({'prefix': '/methods', 'headers': [{'name': ':method',
                                                      'string_match': {'exact': 'POST'}}]},
                  route={'cluster': c('web-v2')}),
            route({'prefix': '/methods'}, route={'cluster': c('web')}),
            route({'prefix': '/mut'}, route={'cluster': c('web')},
                  request_headers_to_add=[{'header': {'key': 'x-added', 'value': 'yes'},
                                           'append_action': 'OVERWRITE_IF_EXISTS_OR_ADD'}],
                  request_headers_to_remove=['x-remove-me'],
                  response_headers_to_add=[{'header': {'key': 'x-resp-added', 'value': 'r'},
                                            'append_action': 'OVERWRITE_IF_EXISTS_OR_ADD'}],
                  response_headers_to_remove=['x-backend-secret']),
            route({'prefix': '/slow'}, route={'cluster': c('slow'), 'timeout': '0.5s'}),
            route({'prefix': '/ptry'}, route={'cluster': c('slow'), 'timeout': '5s', 'retry_policy': {
                'retry_on': '5xx', 'num_retries': 1, 'per_try_timeout': '0.3s'}}),
            route({'prefix': '/flaky'}, route={'cluster': c('flaky'), 'retry_policy': {
                'retry_on': '5xx', 'num_retries': 2}}),
            route({'prefix': '/ws'}, route={'cluster': c('ws')}),
            route({'prefix': '/plain'}, route={'cluster': c('plainweb')}),
            route({'prefix': '/refused'}, route={'cluster': c('refused')}),
            route({'prefix': '/app'}, route={'cluster': c('web')}),
            route({'prefix': '/chunked'}, route={'cluster': c('web')}),
            route({'prefix': '/bigresp'}, route={'cluster': c('web')}),
        ]
        chains = {
            c('web'): http_chain(c('web'), route_config('web', web_routes)),
            c('single'): http_chain(c('single'), route_config('single', [
                route({'prefix': '/'}, route={'cluster': c('single')})])),
            c('authz'): http_chain(c('authz'), route_config('authz', [
                route({'prefix': '/'}, route={'cluster': c('authz')})]), rbac=AUTHZ_RBAC),
        }
        cfg = make_config(self.wp_ip, list(self.svcs.values()))
        return with_http_chains(cfg, chains)


class L7Base(hbonelib.AsyncTestCase):
    """The waypoint on the class's block with `topology`'s config, HTTP/1.1 backends on the
    pods, destination stand-ins (forward mode) on the HBONE pods. Subclasses may add backends
    (extra_backends) and HBONE pods (extra_hbone_pods)."""

    topology = L7Topology
    extra_hbone_pods = ()

    @classmethod
    def extra_backends(cls, ip):
        return {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        cls.topo = cls.topology(cls.block)
        ip = cls.topo.ip
        cls.backends = {}
        for p in WEB_PODS + (V2_POD,):
            cls.backends[p] = HttpBackend('pod%d' % p, ip(p), APP_PORT)
        cls.backends[SLOW_POD] = HttpBackend('slow', ip(SLOW_POD), APP_PORT, mode='slow')
        cls.backends[FLAKY_POD] = HttpBackend('flaky', ip(FLAKY_POD), APP_PORT, mode='flaky')
        cls.backends[WS_POD] = HttpBackend('ws', ip(WS_POD), APP_PORT, mode='ws')
        cls.backends[PLAIN_POD] = HttpBackend('plain', ip(PLAIN_POD), APP_PORT)
        cls.backends.update(cls.extra_backends(ip))
        cls.wp = Waypoint(cls.topo.wp_ip, cls.topo.config(), name=cls.__name__)
        cls.wp.start()

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)
        for b in cls.backends.values():
            b.close()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        for b in self.backends.values():
            b.reset()
        self.dest = {}
        for p in HBONE_PODS + tuple(self.extra_hbone_pods):
            self.dest[p] = await self.server(self.topo.ip(p), 15008, mode='forward')
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        await super().asyncTearDown()
        self.wp.assert_healthy()


class L7Test(L7Base):
    async def h1(self, service='web', client=None):
        c = client or await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        t = c.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        return H1(t)

    # --- routing

    async def test_path_header_and_method_routing(self):
        h = await self.h1()
        r = await h.request('GET', '/app/x')
        self.assertEqual(r.status, 200, r)
        self.assertIn(r.json()['pod'], ['pod%d' % p for p in WEB_PODS])
        self.assertEqual(r.json()['path'], '/app/x')
        r = await h.request('GET', '/hdr', headers=[('x-pick', 'v2')])
        self.assertEqual(r.json()['pod'], 'pod%d' % V2_POD)
        r = await h.request('GET', '/hdr', headers=[('x-pick', 'v1')])
        self.assertNotEqual(r.json()['pod'], 'pod%d' % V2_POD)
        r = await h.request('POST', '/methods', body=b'x' * 5000)
        self.assertEqual(r.json()['pod'], 'pod%d' % V2_POD)
        self.assertEqual(r.json()['body_len'], 5000)
        r = await h.request('GET', '/methods')
        self.assertNotEqual(r.json()['pod'], 'pod%d' % V2_POD)
        # chunked both ways
        r = await h.request('PUT', '/chunked/up', body=os.urandom(20000), chunked=True)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()['body_len'], 20000)
        self.assertIn('chunked', (r.header('transfer-encoding') or '').lower())
        # HEAD: no body, framing kept
        r = await h.request('HEAD', '/app/head')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b'')
        # no route -> 404
        r = await h.request('GET', '/nothing-here')
        self.assertEqual(r.status, 404, r)
        # still usable
        r = await h.request('GET', '/app/after')
        self.assertEqual(r.status, 200)

    async def test_large_bodies_stream_both_ways(self):
        h = await self.h1()
        body = os.urandom(3 * 1024 * 1024)
        r = await h.request('POST', '/app/upload', body=body, timeout=60)
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()['body_len'], len(body))
        r = await h.request('PUT', '/app/upload-chunked', body=body[:1000000], chunked=True,
                            timeout=60)
        self.assertEqual(r.json()['body_len'], 1000000)
        n = 5 * 1024 * 1024 + 17
        r = await h.request('GET', '/bigresp/%d' % n, timeout=60)
        self.assertEqual(r.status, 200)
        self.assertEqual(len(r.body), n)
        self.assertEqual(r.body, bytes(range(256)) * (n // 256) + bytes(n % 256))
        r = await h.request('GET', '/app/after-big')
        self.assertEqual(r.status, 200)

    async def test_headers_set_by_the_waypoint(self):
        h = await self.h1()
        r = await h.request('GET', '/app/h', headers=[('Connection', 'keep-alive, x-hop'),
                                                      ('X-Hop', 'drop me'),
                                                      ('Keep-Alive', 'timeout=5')])
        hd = r.json()['headers']
        self.assertEqual(hd.get('x-forwarded-proto'), 'http')
        rid = hd.get('x-request-id', '')
        self.assertRegex(rid, r'^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-'
                              r'[0-9a-f]{12}$')
        self.assertNotIn('x-hop', hd)
        self.assertNotIn('keep-alive', hd)
        r = await h.request('GET', '/app/h', headers=[('X-Request-Id', 'mine')])
        self.assertEqual(r.json()['headers']['x-request-id'], 'mine')

    async def test_weighted_split_within_tolerance(self):
        h = await self.h1()
        counts = collections.Counter()
        for i in range(1000):
            r = await h.request('GET', '/split/%d' % i)
            self.assertEqual(r.status, 200, r)
            counts['v2' if r.json()['pod'] == 'pod%d' % V2_POD else 'v1'] += 1
        self.assertGreater(counts['v2'], 200 - 60, counts)
        self.assertLess(counts['v2'], 200 + 60, counts)

    async def test_redirect_direct_response_and_rewrite(self):
        h = await self.h1()
        r = await h.request('GET', '/redirect', host='shop.example')
        self.assertEqual(r.status, 302, r)
        self.assertEqual(r.header('location'), 'http://shop.example/new-home')
        self.assertEqual(r.header('content-length'), '0')
        r = await h.request('GET', '/direct')
        self.assertEqual((r.status, r.body), (200, b'direct body'))
        r = await h.request('GET', '/old/page?q=1')
        self.assertEqual(r.status, 200)
        self.assertEqual(r.json()['path'], '/new/page?q=1')

    async def test_header_mutations(self):
        h = await self.h1()
        r = await h.request('GET', '/mut', headers=[('X-Remove-Me', '1'), ('X-Added', 'client')])
        self.assertEqual(r.status, 200)
        hd = r.json()['headers']
        self.assertEqual(hd.get('x-added'), 'yes')
        self.assertNotIn('x-remove-me', hd)
        self.assertEqual(r.header('x-resp-added'), 'r')
        self.assertIsNone(r.header('x-backend-secret'))
        r = await h.request('GET', '/app/x')
        self.assertEqual(r.header('x-backend-secret'), 'hidden')

    # --- authorization

    async def test_rbac_allow_and_deny(self):
        h = await self.h1('authz')
        r = await h.request('GET', '/public/a')
        self.assertEqual(r.status, 200, r)
        r = await h.request('POST', '/public/a', body=b'abc')  # method not allowed
        self.assertEqual((r.status, r.body), (403, b'RBAC: access denied'), r)
        r = await h.request('GET', '/admin/x')  # principal allowed
        self.assertEqual(r.status, 200, r)
        r = await h.request('GET', '/other/x')  # another principal only
        self.assertEqual((r.status, r.body), (403, b'RBAC: access denied'))
        r = await h.request('GET', '/secret')  # no policy
        self.assertEqual(r.status, 403)
        # the denied POST body was drained: the connection still works
        r = await h.request('GET', '/public/b')
        self.assertEqual(r.status, 200)
        paths = [p for (_, p, _, _) in self.backends[WEB_PODS[0]].requests]
        self.assertNotIn('/secret', paths)
        self.assertNotIn('/other/x', paths)

    # --- load balancing, timeouts, retries, failures

    async def test_per_request_lb_over_three_endpoints(self):
        h = await self.h1()
        seen = collections.Counter()
        for i in range(60):
            r = await h.request('GET', '/app/lb%d' % i)
            seen[r.json()['pod']] += 1
        self.assertEqual(set(seen), {'pod%d' % p for p in WEB_PODS}, seen)

    async def test_route_timeout_gives_504(self):
        h = await self.h1()
        t0 = asyncio.get_running_loop().time()
        r = await h.request('GET', '/slow/x')
        took = asyncio.get_running_loop().time() - t0
        self.assertEqual((r.status, r.body), (504, b'upstream request timeout'), r)
        self.assertLess(took, 1.8)
        r = await h.request('GET', '/app/after-timeout')
        self.assertEqual(r.status, 200)

    async def test_retries_are_attempted(self):
        h = await self.h1()
        r = await h.request('GET', '/flaky/ok')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()['attempt'], 3)
        self.assertEqual(self.backends[FLAKY_POD].attempts['/flaky/ok'], 3)
        r = await h.request('POST', '/flaky/always', body=b'z' * 1000)
        self.assertEqual(r.status, 503, r)
        self.assertEqual(self.backends[FLAKY_POD].attempts['/flaky/always'], 3)
        bodies = [b for (m, p, _, b) in self.backends[FLAKY_POD].requests if p == '/flaky/always']
        self.assertEqual(bodies, [b'z' * 1000] * 3)

    async def test_per_try_timeout_retries_then_504(self):
        h = await self.h1()
        t0 = asyncio.get_running_loop().time()
        r = await h.request('GET', '/ptry/x')
        took = asyncio.get_running_loop().time() - t0
        self.assertEqual((r.status, r.body), (504, b'upstream request timeout'), r)
        self.assertLess(took, 1.8)
        for _ in range(50):  # the second attempt reaches the backend shortly before the 504
            if self.backends[SLOW_POD].attempts.get('/ptry/x') == 2:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(self.backends[SLOW_POD].attempts.get('/ptry/x'), 2)

    async def test_upgrade_refused_by_backend_keeps_http(self):
        h = await self.h1()
        r = await h.request('GET', '/app/no-ws', headers=[('Connection', 'Upgrade'),
                                                          ('Upgrade', 'websocket')])
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.json()['headers'].get('upgrade'), 'websocket')  # forwarded
        r = await h.request('GET', '/app/after-refused-upgrade')
        self.assertEqual(r.status, 200, r)

    async def test_connect_failure_gives_503(self):
        h = await self.h1()
        r = await h.request('GET', '/refused')
        self.assertEqual(r.status, 503, r)
        self.assertIn(b'connection failure', r.body)
        r = await h.request('GET', '/app/x')
        self.assertEqual(r.status, 200)

    async def test_plain_tcp_endpoint(self):
        h = await self.h1()
        for i in range(3):
            r = await h.request('GET', '/plain/%d' % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()['pod'], 'plain')

    async def test_keepalive_reuses_upstream_tunnel(self):
        dest = self.dest[WEB_PODS[0]]
        before = len(dest.records)
        c = await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        h = await self.h1('single', c)
        for i in range(10):
            r = await h.request('GET', '/ka/%d' % i)
            self.assertEqual(r.status, 200, r)
        # a second downstream tunnel, after the first one ended, reuses the idle upstream
        await h.t.send_eof()
        await h.t.wait_closed()
        h2 = await self.h1('single', c)
        for i in range(5):
            r = await h2.request('POST', '/ka2/%d' % i, body=b'b' * 3000)
            self.assertEqual(r.status, 200, r)
        self.assertEqual(len(dest.records) - before, 1, dest.records)
        self.assertEqual(dest.records[-1].authority, '%s:%d' % (self.topo.ip(WEB_PODS[0]),
                                                                 APP_PORT))

    async def test_websocket_upgrade_echo(self):
        h = await self.h1()
        await h.send_raw(b'GET /ws/chat HTTP/1.1\r\nHost: svc\r\nConnection: Upgrade\r\n'
                         b'Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n'
                         b'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n')
        r = await h.read_response()
        self.assertEqual(r.status, 101, r)
        self.assertEqual((r.header('upgrade') or '').lower(), 'websocket')
        for msg in (b'hello', os.urandom(70000)):
            await h.send_raw(msg)
            got = bytes(h.buf)
            h.buf.clear()
            while len(got) < len(msg):
                got += await h.t.recv(timeout=10)
            self.assertEqual(got, msg)

    async def test_h2c_prior_knowledge_is_served(self):
        # the preface switches the tunnel to HTTP/2 (test_l7_h2.py covers it in depth)
        h = await self.h1()
        s = await H2(h.t).start()
        s = await s.request('GET', '/app/h2')
        self.assertEqual(s.status, 200, s)
        self.assertIn(s.json()['pod'], ['pod%d' % p for p in WEB_PODS])
        await self.assert_still_serves()

    # --- bad input

    async def assert_still_serves(self):
        self.wp.assert_healthy()
        h = await self.h1()
        r = await h.request('GET', '/app/still')
        self.assertEqual(r.status, 200, r)

    async def test_smuggling_attempts_get_400_and_close(self):
        cases = [
            (b'POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n'
             b'Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /app/smuggled HTTP/1.1\r\nHost: a\r\n\r\n', 400),
            (b'POST /app HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef', 400),
            (b'GET /app HTTP/1.1\nHost: a\r\n\r\n', 400),
            (b'GET /app HTTP/1.1\r\nHost: a\r\nX-Fold: a\r\n b\r\n\r\n', 400),
            (b'GET /app HTTP/1.1\r\nHost: a\r\nX-Bad: a\x01b\r\n\r\n', 400),
            (b'G@T /app HTTP/1.1\r\nHost: a\r\n\r\n', 400),
            (b'POST /app HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n', 400),
            (b'GET /app HTTP/1.1\r\nHost: a\r\nX-Big: ' + b'a' * 70000 + b'\r\n\r\n', 431),
            (b'GET http://evil.example/app HTTP/1.1\r\nHost: a\r\n\r\n', 400),
        ]
        for raw, status in cases:
            with self.subTest(raw=raw[:60]):
                h = await self.h1()
                await h.send_raw(raw)
                r = await h.read_response()
                self.assertEqual(r.status, status, (raw[:60], r))
                self.assertEqual((r.header('connection') or '').lower(), 'close')
                rest = await h.t.recv_all(timeout=5)  # the tunnel ends after the reply
                self.assertEqual(rest + bytes(h.buf), b'')
        paths = [p for b in self.backends.values() for (_, p, _, _) in b.requests]
        self.assertNotIn('/app/smuggled', paths)
        await self.assert_still_serves()


if __name__ == '__main__':
    hbonelib.require_waypoint()
    hbonelib.main()
