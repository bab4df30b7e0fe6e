#!/usr/bin/python3
"""End to end: HTTP/2 with prior knowledge (h2c) inside HBONE tunnels through the waypoint's HTTP
chains.

Client stand-in (python3-h2 HBONE, with a second python3-h2 connection inside the tunnel) ->
waypoint -> destination stand-ins (HBONE, forward mode) or a plain TCP endpoint -> HTTP/1.1
backends (l7lib.HttpBackend). The topology is test_l7's. Checks: many concurrent streams on one
inner connection routed to different clusters, large bodies both ways under flow control,
request trailers and chunked upstream bodies, HTTP/2 -> HTTP/1.1 translation (what the backend
saw), local replies (404, RBAC 403, gRPC-shaped ones), timeouts and retries per stream; bad
input (invalid pseudo-headers, upper-case names, connection-specific fields, content-length
mismatch, oversized header block, too many streams, rapid reset, DATA beyond the window): the
precise stream or connection error, and the waypoint keeps serving.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import unittest
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
import test_l7  # noqa: E402
from hbonelib import (T_CLUSTER, Endpoint, Service, Waypoint, block_for,  # noqa: E402
                      make_config)
from l7lib import (H1, H2, GrpcBackend, H2Backend, HboneForward,  # noqa: E402
                   allow_streams_after_goaway, grpc_frame, grpc_unframe, http_chain, route,
                   route_config, with_http_chains)

try:
    import grpc
except ImportError:  # python3-grpcio missing: the gRPC class is skipped
    grpc = None

H2_PODS, H2_PLAIN_POD, SINK_POD = (41, 42), 43, 44
T_HPO = 'envoy.extensions.upstreams.http.v3.HttpProtocolOptions'
T_FILE_LOG = 'type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog'
PROTOCOL_ERROR, REFUSED_STREAM, FLOW_CONTROL_ERROR, ENHANCE_YOUR_CALM = 1, 7, 3, 11
WEB = ['pod%d' % p for p in test_l7.WEB_PODS]
V2 = 'pod%d' % test_l7.V2_POD


def mark_http2(cfg, cluster):
    """Marks a cluster HTTP/2 as istiod marks HTTP2/gRPC service ports."""
    cfg['resources'][T_CLUSTER][cluster]['typed_extension_protocol_options'] = {T_HPO: {
        '@type': 'type.googleapis.com/' + T_HPO,
        'explicit_http_config': {'http2_protocol_options': {}}}}


class H2Topology(test_l7.L7Topology):
    """test_l7's services plus HTTP/2 ones: h2web (two HBONE pods) and h2plain (a TCP endpoint),
    their clusters marked HTTP/2 as istiod marks HTTP2/gRPC service ports."""

    def __init__(self, block):
        super().__init__(block)
        ip = self.ip
        self.svcs['h2web'] = Service('h2web', ip(110), 80, [
            Endpoint(ip(p), test_l7.APP_PORT, True) for p in H2_PODS])
        self.svcs['h2plain'] = Service('h2plain', ip(111), 80, [
            Endpoint(ip(H2_PLAIN_POD), test_l7.APP_PORT, False)])
        self.svcs['extras'] = Service('extras', ip(112), 80, [
            Endpoint(ip(test_l7.WEB_PODS[0]), test_l7.APP_PORT, True)])
        self.svcs['sticky'] = Service('sticky', ip(113), 80, [
            Endpoint(ip(p), test_l7.APP_PORT, True) for p in test_l7.WEB_PODS])
        self.svcs['sink'] = Service('sink', ip(114), 80, [
            Endpoint(ip(SINK_POD), test_l7.APP_PORT, False)])

    def config(self):
        cfg = super().config()
        chains = {}
        for name in ('h2web', 'h2plain'):
            c = self.cluster(name)
            mark_http2(cfg, c)
            chains[c] = http_chain(c, route_config(name, [
                route({'prefix': '/retry'}, route={'cluster': c, 'retry_policy': {
                    'retry_on': '5xx', 'num_retries': 2}}),
                route({'prefix': '/'}, route={'cluster': c})]))
        # attempt counts, cookie hash policy, mirroring
        cl = self.cluster
        cfg['resources'][T_CLUSTER][cl('sticky')]['lb_policy'] = 'RING_HASH'
        vh = {'name': 'extras', 'domains': ['*'], 'include_request_attempt_count': True,
              'include_attempt_count_in_response': True, 'routes': [
                  route({'prefix': '/flaky'}, route={'cluster': cl('flaky'), 'retry_policy': {
                      'retry_on': '5xx', 'num_retries': 2}}),
                  route({'prefix': '/h2attempt'}, route={'cluster': cl('h2web')}),
                  route({'prefix': '/sticky'}, route={'cluster': cl('sticky'), 'hash_policy': [
                      {'cookie': {'name': 'sticky', 'ttl': '60s', 'path': '/'}}]}),
                  route({'prefix': '/mirror-fail'}, route={
                      'cluster': cl('web-v2'),
                      'request_mirror_policies': [{'cluster': cl('refused')}]}),
                  route({'prefix': '/mirror'}, route={
                      'cluster': cl('web-v2'),
                      'request_mirror_policies': [{'cluster': cl('plainweb')}]})]}
        chains[cl('sink')] = http_chain(cl('sink'), route_config('sink', [
            route({'prefix': '/'}, route={'cluster': cl('sink'), 'timeout': '0s'})]))
        chains[cl('extras')] = http_chain(cl('extras'), {
            'name': 'extras', 'validate_clusters': False, 'virtual_hosts': [vh]})
        return with_http_chains(cfg, chains)


class SinkBackend:
    """Accepts TCP connections and never reads from them (an upstream that stalls)."""

    def __init__(self, ip, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(16)
        self.conns = []
        self.requests = []  # never sees one
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def reset(self):
        pass

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


class L7H2Test(test_l7.L7Base):
    topology = H2Topology
    extra_hbone_pods = H2_PODS

    @classmethod
    def extra_backends(cls, ip):
        b = {p: H2Backend('h2pod%d' % p, ip(p), test_l7.APP_PORT)
             for p in H2_PODS + (H2_PLAIN_POD,)}
        b[SINK_POD] = SinkBackend(ip(SINK_POD), test_l7.APP_PORT)
        return b

    async def h2(self, service='web', client=None, settings=None):
        c = client or await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        t = c.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        return await H2(t, settings=settings).start()

    async def assert_still_serves(self):
        self.wp.assert_healthy()
        h = await self.h2()
        s = await h.request('GET', '/app/still')
        self.assertEqual(s.status, 200, s)

    # --- the pipeline, per stream

    async def test_concurrent_streams_to_different_clusters(self):
        h = await self.h2()
        want = []
        for i in range(8):
            want.append((await h.start_request('GET', '/app/%d' % i), WEB, 200))
            want.append((await h.start_request('GET', '/hdr/%d' % i, headers=[('x-pick', 'v2')]),
                         [V2], 200))
            want.append((await h.start_request('GET', '/plain/%d' % i), ['plain'], 200))
            want.append((await h.start_request('POST', '/methods/%d' % i, body=b'p' * 3000,
                                               headers=[('content-length', '3000')]),
                         [V2], 200))
        direct = await h.start_request('GET', '/direct')
        missing = await h.start_request('GET', '/nothing-here')
        await h.wait([s for s, _, _ in want] + [direct, missing])
        for s, pods, status in want:
            self.assertEqual(s.status, status, s)
            self.assertIn(s.json()['pod'], pods, s)
            self.assertTrue(s.ended, s)
        self.assertEqual(len({s.sid for s, _, _ in want}), len(want))
        self.assertEqual(bytes(direct.body), b'direct body')
        self.assertEqual(missing.status, 404, missing)
        # HTTP/2 -> HTTP/1.1: what the backend saw
        got = [s.json() for s, _, _ in want if s.json()['method'] == 'POST']
        for j in got:
            self.assertEqual(j['body_len'], 3000)
            self.assertEqual(j['headers'].get('content-length'), '3000')
            self.assertEqual(j['headers'].get('host'), 'svc')
            self.assertEqual(j['headers'].get('x-forwarded-proto'), 'http')
            self.assertIn('x-request-id', j['headers'])
        # the connection goes on after all of them
        s = await h.request('GET', '/app/after')
        self.assertEqual(s.status, 200, s)

    async def test_large_bodies_both_ways_with_flow_control(self):
        h = await self.h2()
        up = os.urandom(3 * 1024 * 1024 + 17)
        n = 5 * 1024 * 1024 + 3
        big = await h.start_request('GET', '/bigresp/%d' % n)
        post = await h.start_request('POST', '/methods/big', body=up)
        await h.wait([big, post], timeout=60)
        self.assertEqual(big.status, 200, big)
        want = bytes(range(256)) * (n // 256) + bytes(n % 256)
        self.assertEqual(len(big.body), n)
        self.assertEqual(bytes(big.body), want)
        self.assertEqual(post.status, 200, post)
        self.assertEqual(post.json()['body_len'], len(up))

    async def test_trailers_and_chunked_upstream(self):
        h = await self.h2()
        # no content-length + DATA: chunked towards the HTTP/1.1 upstream; trailers end it
        s = await h.request('PUT', '/chunked/up', body=b'x' * 20000,
                            trailers=[('x-checksum', 'abc')])
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.json()['body_len'], 20000)
        self.assertIn('chunked', s.json()['headers'].get('transfer-encoding', ''))
        # a chunked response becomes DATA without content-length or transfer-encoding
        self.assertIsNone(s.header('transfer-encoding'))
        self.assertIsNone(s.header('content-length'))
        self.assertIsNone(s.header('connection'))
        # HEAD: no body
        s = await h.request('HEAD', '/app/head')
        self.assertEqual(s.status, 200, s)
        self.assertEqual(bytes(s.body), b'')

    async def test_rbac_and_grpc_shaped_local_replies(self):
        h = await self.h2('authz')
        s = await h.request('GET', '/admin/x')
        self.assertEqual(s.status, 200, s)
        s = await h.request('GET', '/other/x')
        self.assertEqual(s.status, 403, s)
        self.assertEqual(bytes(s.body), b'RBAC: access denied')
        # a gRPC request denied: 200, trailers-only, grpc-status 7 (PERMISSION_DENIED)
        s = await h.request('POST', '/other/svc.Method', body=b'\0\0\0\0\0',
                            headers=[('content-type', 'application/grpc'), ('te', 'trailers')])
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.header('grpc-status'), '7', s)
        self.assertEqual(s.header('grpc-message'), 'RBAC: access denied', s)
        self.assertEqual(bytes(s.body), b'')
        # the same over HTTP/1.1 (grpc-status in the headers, as Envoy answers)
        h1 = H1(await self.h2_tunnel('authz'))
        r = await h1.request('POST', '/other/svc.Method', body=b'\0\0\0\0\0',
                             headers=[('Content-Type', 'application/grpc')])
        self.assertEqual((r.status, r.header('grpc-status'), r.header('grpc-message'), r.body),
                         (200, '7', 'RBAC: access denied', b''), r)
        self.assertEqual(r.header('content-type'), 'application/grpc')
        # no route for a gRPC call: UNIMPLEMENTED (12)
        h = await self.h2()
        s = await h.request('POST', '/nothing/svc.M', body=b'\0\0\0\0\0',
                            headers=[('content-type', 'application/grpc+proto')])
        self.assertEqual((s.status, s.header('grpc-status')), (200, '12'), s)

    async def test_timeout_and_retries_per_stream(self):
        h = await self.h2()
        slow = await h.start_request('GET', '/slow/x')
        flaky = await h.start_request('GET', '/flaky/once')
        fast = await h.start_request('GET', '/app/fast')
        await h.wait([slow, flaky, fast])
        self.assertEqual(slow.status, 504, slow)
        self.assertEqual(flaky.status, 200, flaky)
        self.assertEqual(flaky.json()['attempt'], 3)
        self.assertEqual(fast.status, 200, fast)

    # --- HTTP/2 upstream

    def h2_connects(self):
        return sum(len(self.dest[p].records) for p in H2_PODS)

    async def test_h2_upstream_multiplexed_and_reused(self):
        before = self.h2_connects()
        # one client connection: its tunnels land on one worker (sessions are per worker)
        c = await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        h = await self.h2('h2web', client=c)
        streams = [await h.start_request('GET', '/m/%d' % i) for i in range(40)]
        await h.wait(streams)
        conns = set()
        for s in streams:
            self.assertEqual(s.status, 200, s)
            j = s.json()
            self.assertEqual(j['proto'], 'h2')
            conns.add((j['pod'], j['conn']))
        # one upstream session per endpoint (on this worker): one CONNECT per pod
        per_pod = {}
        for pod, conn in conns:
            per_pod.setdefault(pod, set()).add(conn)
        self.assertTrue(all(len(c) == 1 for c in per_pod.values()), conns)
        first = self.h2_connects() - before
        self.assertEqual(first, len(per_pod))
        self.assertTrue(any(self.backends[p].max_open > 1 for p in H2_PODS),
                        [self.backends[p].max_open for p in H2_PODS])
        # later requests (HTTP/1.1 downstream too) reuse the sessions: no new CONNECT
        for i in range(10):
            s = await h.request('POST', '/again/%d' % i, body=b'z' * 100)
            self.assertEqual(s.status, 200, s)
        h1 = H1((await self.h2_tunnel('h2web', client=c)))
        for i in range(10):
            r = await h1.request('GET', '/h1/%d' % i)
            self.assertEqual(r.status, 200, r)
            self.assertEqual(r.json()['proto'], 'h2')
        self.assertEqual(self.h2_connects() - before, first)

    async def test_upstream_goaway_unprocessed_requests_go_elsewhere(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        h = await self.h2('h2plain', client=c)
        s = await h.request('GET', '/warm')  # the session exists before the burst
        self.assertEqual(s.status, 200, s)
        backend = self.backends[H2_PLAIN_POD]
        conns = backend.connections
        streams = await h.start_burst(['/gw/%d' % i for i in range(20)])
        await h.wait(streams)
        for st in streams:
            self.assertEqual(st.status, 200, st)
        self.assertTrue(backend.goaway_sent)
        self.assertEqual(backend.connections, conns + 1)  # one new session took the rest
        # each request reached the backend once: the unprocessed ones were sent again elsewhere
        paths = sorted(p for (_, p, _, _) in backend.requests if p.startswith('/gw/'))
        self.assertEqual(paths, sorted('/gw/%d' % i for i in range(20)))
        s = await h.request('GET', '/after')
        self.assertEqual(s.status, 200, s)

    @unittest.skipIf(not os.environ.get('HBONE_BIN'), '$HBONE_BIN missing')
    async def test_curl_and_nghttp_h2c_through_the_waypoint(self):
        # independent HTTP/2 clients: curl (prior knowledge) and nghttp, through `hbone forward`
        fwd = HboneForward('%s:7100' % self.topo.ip(3), self.wp.hbone_addr,
                           self.topo.authority('h2web'))
        self.addCleanup(fwd.stop)
        out = await asyncio.to_thread(subprocess.run, [
            'curl', '-sS', '--http2-prior-knowledge', '-o', '-', '-w', '\n%{http_version}',
            '-H', 'x-curl: 1', '--data-binary', 'curl-body',
            'http://%s/curl/x' % fwd.listen], capture_output=True, timeout=20)
        body, _, version = out.stdout.decode().rpartition('\n')
        self.assertEqual((out.returncode, version), (0, '2'), out.stderr)
        j = json.loads(body)
        self.assertEqual((j['proto'], j['method'], j['body_len']), ('h2', 'POST', 9))
        self.assertEqual(j['headers'].get('x-curl'), '1')
        out = await asyncio.to_thread(subprocess.run, [
            'nghttp', '-n', '-s', '-m', '20', 'http://%s/nghttp/y' % fwd.listen],
            capture_output=True, timeout=20)
        self.assertEqual(out.returncode, 0, out.stderr)
        got = [p for (_, p, _, _) in self.backends[H2_PODS[0]].requests +
               self.backends[H2_PODS[1]].requests if p == '/nghttp/y']
        self.assertEqual(len(got), 20)

    async def h2_tunnel(self, service, client=None):
        c = client or await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        t = c.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        return t

    async def test_h1_to_h2_translation_with_trailers(self):
        h1 = H1(await self.h2_tunnel('h2plain'))
        r = await h1.request('PUT', '/up/chunked', body=b'c' * 5000, chunked=True,
                             trailers=[('x-sum', '77')], headers=[('TE', 'trailers')])
        self.assertEqual(r.status, 200, r)
        j = r.json()
        self.assertEqual((j['proto'], j['body_len'], j['method']), ('h2', 5000, 'PUT'))
        self.assertEqual(j['trailers'], {'x-sum': '77'})
        self.assertEqual(j['headers'].get('te'), 'trailers')
        self.assertEqual(j['authority'], 'svc')
        self.assertNotIn('transfer-encoding', j['headers'])
        # an HTTP/2 response without content-length + trailers -> chunked with trailers
        r = await h1.request('GET', '/trailers/x')
        self.assertEqual(r.status, 200, r)
        self.assertIn('chunked', (r.header('transfer-encoding') or '').lower())
        self.assertIn(('x-trailer', 'yes'), r.trailers)
        self.assertIn(('grpc-status', '0'), r.trailers)
        r = await h1.request('GET', '/status/404')
        self.assertEqual(r.status, 404, r)
        r = await h1.request('POST', '/cl', body=b'q' * 1234)
        self.assertEqual(r.json()['headers'].get('content-length'), '1234')

    async def test_h2_to_h2_trailers_and_large_bodies(self):
        h = await self.h2('h2web')
        s = await h.request('POST', '/trailers/y', body=b'a' * 100,
                            trailers=[('x-sum', '5')])
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.trailer('x-trailer'), 'yes', s)
        self.assertEqual(s.trailer('grpc-status'), '0', s)
        self.assertEqual(s.json()['trailers'], {'x-sum': '5'})
        n = 3 * 1024 * 1024 + 5
        up = os.urandom(2 * 1024 * 1024 + 3)
        big = await h.start_request('GET', '/bigresp/%d' % n)
        post = await h.start_request('POST', '/bigpost', body=up)
        await h.wait([big, post], timeout=60)
        self.assertEqual(bytes(big.body), bytes(range(256)) * (n // 256) + bytes(n % 256))
        self.assertEqual(post.json()['body_len'], len(up))

    # --- attempt count, cookie hash policy, mirroring

    async def test_attempt_count_headers(self):
        h = await self.h2('extras')
        s = await h.request('GET', '/flaky/count')
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.header('x-envoy-attempt-count'), '3', s)
        seen = [{k.lower(): v for k, v in hs.items()}.get('x-envoy-attempt-count')
                for (_, p, hs, _) in self.backends[test_l7.FLAKY_POD].requests
                if p == '/flaky/count']
        self.assertEqual(seen, ['1', '2', '3'])
        # an HTTP/1.1 client, and an HTTP/2 upstream, see it too
        h1 = H1(await self.h2_tunnel('extras'))
        r = await h1.request('GET', '/h2attempt/x')
        self.assertEqual(r.status, 200, r)
        self.assertEqual(r.header('x-envoy-attempt-count'), '1')
        self.assertEqual(r.json()['headers'].get('x-envoy-attempt-count'), '1')

    async def test_cookie_hash_policy(self):
        import re
        h = await self.h2('extras')
        s = await h.request('GET', '/sticky/new')
        self.assertEqual(s.status, 200, s)
        m = re.fullmatch(r'sticky="([0-9a-f]{16})"; Max-Age=60; Path=/; HttpOnly',
                         s.header('set-cookie') or '')
        self.assertIsNotNone(m, s)
        pods = set()
        for i in range(10):
            s = await h.request('GET', '/sticky/%d' % i,
                                headers=[('cookie', 'a=b; sticky=%s' % m.group(1))])
            self.assertIsNone(s.header('set-cookie'), s)
            pods.add(s.json()['pod'])
        self.assertEqual(len(pods), 1, pods)
        by_value = {}
        for rnd in range(2):
            for v in range(24):
                s = await h.request('GET', '/sticky/v', headers=[('cookie', 'sticky="k%d"' % v)])
                by_value.setdefault(v, set()).add(s.json()['pod'])
        self.assertTrue(all(len(p) == 1 for p in by_value.values()), by_value)
        self.assertGreater(len({next(iter(p)) for p in by_value.values()}), 1, by_value)

    async def wait_requests(self, pod, path, timeout=5):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = [r for r in self.backends[pod].requests if r[1] == path]
            if got:
                return got
            await asyncio.sleep(0.05)
        return []

    async def test_request_mirroring(self):
        h = await self.h2('extras')
        s = await h.request('POST', '/mirror/1', body=b'b' * 1000,
                            headers=[('content-length', '1000')])
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.json()['pod'], V2)
        got = await self.wait_requests(test_l7.PLAIN_POD, '/mirror/1')
        self.assertEqual(len(got), 1, got)
        method, _, hs, body = got[0]
        hs = {k.lower(): v for k, v in hs.items()}
        self.assertEqual((method, hs.get('host'), body), ('POST', 'svc-shadow', b'b' * 1000))
        self.assertEqual(hs.get('x-request-id'),
                         [r for r in self.backends[test_l7.V2_POD].requests
                          if r[1] == '/mirror/1'][0][2].get('x-request-id'))
        # no body (HTTP/1.1 client), and a streamed body without a length
        h1 = H1(await self.h2_tunnel('extras'))
        r = await h1.request('GET', '/mirror/2', host='svc:8000')
        self.assertEqual(r.status, 200, r)
        got = await self.wait_requests(test_l7.PLAIN_POD, '/mirror/2')
        self.assertEqual([{k.lower(): v for k, v in g[2].items()}.get('host') for g in got],
                         ['svc-shadow:8000'])
        s = await h.request('PUT', '/mirror/3', body=b'c' * 3000)
        got = await self.wait_requests(test_l7.PLAIN_POD, '/mirror/3')
        self.assertEqual([len(g[3]) for g in got], [3000])
        # too large to mirror: the main request is untouched, no shadow
        s = await h.request('POST', '/mirror/big', body=os.urandom(100 * 1024))
        self.assertEqual((s.status, s.json()['body_len']), (200, 100 * 1024))
        self.assertEqual(await self.wait_requests(test_l7.PLAIN_POD, '/mirror/big', 1), [])
        # a mirror that cannot connect never fails the request
        s = await h.request('GET', '/mirror-fail/x')
        self.assertEqual(s.status, 200, s)

    # --- bad input

    async def test_malformed_requests_get_stream_errors(self):
        base = [(':method', 'GET'), (':scheme', 'http'), (':authority', 'svc')]
        cases = [
            ('uppercase name', base + [(':path', '/app/a'), ('X-Upper', 'v')]),
            ('connection header', base + [(':path', '/app/a'), ('connection', 'keep-alive')]),
            ('transfer-encoding', base + [(':path', '/app/a'), ('transfer-encoding', 'chunked')]),
            ('te not trailers', base + [(':path', '/app/a'), ('te', 'gzip')]),
            ('missing :path', base),
            ('duplicate :path', base + [(':path', '/a'), (':path', '/b')]),
            ('unknown pseudo', base + [(':path', '/a'), (':foo', 'x')]),
            ('pseudo after regular', [(':method', 'GET'), ('x-a', 'b'), (':scheme', 'http'),
                                      (':authority', 'svc'), (':path', '/a')]),
            ('empty :path', base + [(':path', '')]),
            ('path not origin-form', base + [(':path', 'app')]),
            ('no authority', [(':method', 'GET'), (':scheme', 'http'), (':path', '/app/na')]),
        ]
        h = await self.h2()
        for name, hs in cases:
            with self.subTest(case=name):
                s = await h.start_request(None, None, raw_headers=hs)
                await h.wait([s])
                self.assertEqual(s.reset_code, PROTOCOL_ERROR, (name, s))
        # the same connection still works
        s = await h.request('GET', '/app/ok')
        self.assertEqual(s.status, 200, s)
        # CONNECT inside the inner connection: no route has a connect_matcher, so none matches
        # (404, as Envoy); extended CONNECT (:protocol) is not advertised: malformed
        s = await h.request(None, None, raw_headers=[(':method', 'CONNECT'),
                                                     (':authority', 'x.example:443')])
        self.assertEqual(s.status, 404, s)
        s = await h.request(None, None, raw_headers=base + [(':path', '/ws'),
                                                            (':protocol', 'websocket')])
        self.assertEqual(s.reset_code, PROTOCOL_ERROR, s)
        paths = [p for b in self.backends.values() for (_, p, _, _) in b.requests]
        self.assertEqual(paths, ['/app/ok'])

    async def test_content_length_mismatch_is_a_stream_error(self):
        h = await self.h2()
        s = await h.start_request('POST', '/app/cl', headers=[('content-length', '10')],
                                  body=b'12345')
        await h.wait([s])
        self.assertEqual(s.reset_code, PROTOCOL_ERROR, s)
        s = await h.start_request('POST', '/app/cl2', headers=[('content-length', '3')],
                                  body=b'12345')
        await h.wait([s])
        self.assertEqual(s.reset_code, PROTOCOL_ERROR, s)
        s = await h.request('POST', '/app/cl3', headers=[('content-length', '5')], body=b'12345')
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.json()['body_len'], 5)

    async def test_oversized_header_block_gets_431(self):
        h = await self.h2()
        s = await h.request('GET', '/app/big', headers=[('x-big-%d' % i, 'v' * 8000)
                                                        for i in range(10)])
        self.assertEqual(s.status, 431, s)
        s = await h.request('GET', '/app/small')
        self.assertEqual(s.status, 200, s)

    async def test_too_many_streams_are_refused(self):
        h = await self.h2()
        # 101 requests whose bodies never end, sent before reading the waypoint's SETTINGS
        streams = []
        for i in range(101):
            streams.append(await h.start_request('POST', '/plain/open%d' % i, end=False))
        await asyncio.sleep(0.5)
        for _ in range(20):
            try:
                await h.pump(timeout=0.3)
            except asyncio.TimeoutError:
                break
        refused = [s for s in streams if s.reset_code == REFUSED_STREAM]
        self.assertEqual(len(refused), 1, [s for s in streams if s.done])
        self.assertEqual(refused[0].sid, streams[-1].sid)
        self.assertIsNone(h.goaway)
        await self.assert_still_serves()

    async def test_rapid_reset_flood_gets_goaway(self):
        h = await self.h2()
        for i in range(300):
            sid = h.conn.get_next_available_stream_id()
            h.conn.send_headers(sid, [(':method', 'POST'), (':scheme', 'http'),
                                      (':authority', 'svc'), (':path', '/plain/rr%d' % i)])
            h.conn.reset_stream(sid, 8)
        await h.flush()
        while h.goaway is None and await h.pump(timeout=10):
            pass
        self.assertIsNotNone(h.goaway)
        self.assertEqual(h.goaway[0], ENHANCE_YOUR_CALM)
        await self.assert_still_serves()

    async def test_data_beyond_the_window_is_a_flow_control_error(self):
        import hyperframe.frame
        h = await self.h2('sink')
        s = await h.start_request('POST', '/sink', end=False)
        # the upstream never reads: credit stops coming back; 16 MiB sent regardless of it
        frame = hyperframe.frame.DataFrame(s.sid, data=b'x' * 16384).serialize()
        try:
            for _ in range(64):
                await h.t.send(frame * 16)
        except hbonelib.TunnelReset:
            pass
        while s.reset_code is None and h.goaway is None and await h.pump(timeout=10):
            pass
        self.assertTrue(s.reset_code == FLOW_CONTROL_ERROR or
                        (h.goaway and h.goaway[0] == FLOW_CONTROL_ERROR), (s, h.goaway))
        await self.assert_still_serves()

    async def test_bad_preface_closes_the_tunnel(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.topo.client_ip)
        t = c.open_tunnel(self.topo.authority('web'))
        await t.wait_response()
        await t.send(b'PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n' + b'\0' * 30)
        rest = b''
        try:
            rest = await t.recv_all(timeout=5)
        except hbonelib.TunnelReset:
            pass
        self.assertNotIn(b'HTTP/1.1', rest)
        await self.assert_still_serves()



class GrpcBase(hbonelib.AsyncTestCase):
    """grpcio client -> `hbone forward` (each TCP connection becomes an HBONE tunnel) -> waypoint
    (h2c inside the tunnel) -> HTTP/2 upstream (HBONE or TCP) -> grpcio server."""

    GRPC_POD, PLAIN_POD, BROKEN_POD = 51, 52, 53
    waypoint_args = ()

    @classmethod
    def ip(cls, host):
        return '%s.%d' % (cls.block, host)

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        ip, app = cls.ip, test_l7.APP_PORT
        cls.svcs = {
            'grpc': Service('grpc', ip(120), 80, [Endpoint(ip(cls.GRPC_POD), app, True)]),
            'grpcplain': Service('grpcplain', ip(121), 80,
                                 [Endpoint(ip(cls.PLAIN_POD), app, False)]),
            'broken': Service('broken', ip(122), 80, [Endpoint(ip(cls.BROKEN_POD), app, True)]),
            'grpcauthz': Service('grpcauthz', ip(123), 80,
                                 [Endpoint(ip(cls.GRPC_POD), app, True)]),
        }
        c = {k: v.cluster for k, v in cls.svcs.items()}
        cfg = make_config(ip(1), list(cls.svcs.values()))
        for name in c.values():
            mark_http2(cfg, name)

        rbac = {'policies': {'unary-only': {
            'permissions': [{'url_path': {'path': {'exact': '/test.Echo/Unary'}}}],
            'principals': [{'any': True}]}}}
        chains = {
            c['grpc']: http_chain(c['grpc'], route_config('grpc', [
                route({'prefix': '/broken.'}, route={'cluster': c['broken']}),
                # the grpc-timeout header decides (the route timeout does not apply)
                route({'prefix': '/test.Echo/SlowStream'}, route={
                    'cluster': c['grpc'], 'timeout': '1s',
                    'max_stream_duration': {'grpc_timeout_header_max': '0s'}}),
                route({'prefix': '/'}, route={'cluster': c['grpc'], 'timeout': '0s'})])),
            c['grpcplain']: http_chain(c['grpcplain'], route_config('grpcplain', [
                route({'prefix': '/'}, route={'cluster': c['grpcplain']})])),
            c['grpcauthz']: http_chain(c['grpcauthz'], route_config('grpcauthz', [
                route({'prefix': '/'}, route={'cluster': c['grpc']})]), rbac=rbac),
        }
        chains[c['grpc']]['filters'][0]['typed_config']['access_log'] = [{
            'name': 'envoy.access_loggers.file', 'typed_config': {
                '@type': T_FILE_LOG, 'path': '/dev/stdout', 'log_format': {
                    'text_format_source': {'inline_string': 'AL %PROTOCOL% %REQ(:PATH)% '
                                                            '%RESPONSE_CODE% %RESPONSE_FLAGS%\n'}}}}]
        cfg = with_http_chains(cfg, chains)
        cls.prom_addr = '%s:15090' % ip(1)
        cls.backends = [GrpcBackend('g%d' % p, ip(p), app)
                        for p in (cls.GRPC_POD, cls.PLAIN_POD)]
        cls.wp = Waypoint(ip(1), cfg, name=cls.__name__,
                          extra_args=['--prometheus-address', cls.prom_addr] +
                          list(cls.waypoint_args))
        cls.wp.start()
        cls.fwd = {name: HboneForward('%s:%d' % (ip(3), 7000 + i), cls.wp.hbone_addr,
                                      cls.svcs[name].authority)
                   for i, name in enumerate(cls.svcs)}

    @classmethod
    def tearDownClass(cls):
        for f in cls.fwd.values():
            f.stop()
        cls.wp.stop(check=True)
        for b in cls.backends:
            b.close()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.dest = await self.server(self.ip(self.GRPC_POD), 15008, mode='forward')
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        await super().asyncTearDown()
        self.wp.assert_healthy()

    def channel(self, name):
        ch = grpc.insecure_channel(self.fwd[name].listen)
        self.addCleanup(ch.close)
        return ch

    def call(self, name, method, req, kind='unary', **kw):
        """Runs one call (in a thread): (response or messages, code, details, trailers)."""
        ch = self.channel(name)
        try:
            if kind == 'unary':
                resp, call = ch.unary_unary(method).with_call(req, timeout=10, **kw)
                return resp, call.code(), call.details(), dict(call.trailing_metadata())
            it = ch.unary_stream(method)(req, timeout=20, **kw)
            msgs = list(it)
            return msgs, it.code(), it.details(), dict(it.trailing_metadata())
        except grpc.RpcError as e:
            return None, e.code(), e.details(), dict(e.trailing_metadata() or ())

    async def acall(self, *a, **kw):
        return await asyncio.to_thread(self.call, *a, **kw)


@unittest.skipIf(grpc is None or not os.environ.get('HBONE_BIN'),
                 'python3-grpcio or $HBONE_BIN missing')
class GrpcTest(GrpcBase):

    async def test_unary_with_metadata_and_trailers(self):
        for name, pod in (('grpc', 'g51'), ('grpcplain', 'g52')):
            with self.subTest(service=name):
                resp, code, _, trl = await self.acall(name, '/test.Echo/Unary', b'hi',
                                                      metadata=(('x-md', 'v'),))
                self.assertEqual(code, grpc.StatusCode.OK)
                self.assertEqual(resp, pod.encode() + b':hi')
                self.assertEqual(trl.get('x-trailer'), 'yes')
        # the access log says HTTP/2
        deadline = time.monotonic() + 5
        while 'AL HTTP/2 /test.Echo/Unary 200 -' not in self.wp.log_text():
            self.assertLess(time.monotonic(), deadline, self.wp.tail(20))
            await asyncio.sleep(0.05)
        md = [m for meth, m in self.backends[0].calls if meth == 'Unary']
        self.assertEqual(md[-1].get('x-md'), 'v')
        self.assertIsNotNone(md[-1].get('x-request-id'))
        self.assertIsNotNone(md[-1].get('x-forwarded-proto'))

    async def test_server_streaming_and_concurrent_calls(self):
        msgs, code, _, _ = await self.acall('grpc', '/test.Echo/Stream', b'60', kind='stream')
        self.assertEqual(code, grpc.StatusCode.OK)
        self.assertEqual(msgs, [b'm%d' % i for i in range(60)])
        before = len(self.dest.records)
        ch = self.channel('grpc')
        fn = ch.unary_unary('/test.Echo/Unary')

        def many():
            futs = [fn.future(b'%d' % i, timeout=10) for i in range(30)]
            return [f.result() for f in futs]
        got = await asyncio.to_thread(many)
        self.assertEqual(got, [b'g51:%d' % i for i in range(30)])
        # one upstream HTTP/2 session carried them (at most one more CONNECT)
        self.assertLessEqual(len(self.dest.records) - before, 1)

    async def test_error_status_passes_through(self):
        resp, code, details, _ = await self.acall('grpc', '/test.Echo/Fail', b'x')
        self.assertIsNone(resp)
        self.assertEqual(code, grpc.StatusCode.NOT_FOUND)
        self.assertEqual(details, 'nope')

    async def test_local_replies_are_grpc_status(self):
        resp, code, _, _ = await self.acall('grpcauthz', '/test.Echo/Unary', b'ok')
        self.assertEqual((code, resp), (grpc.StatusCode.OK, b'g51:ok'))
        _, code, details, _ = await self.acall('grpcauthz', '/test.Echo/Stream', b'2',
                                               kind='stream')
        self.assertEqual(code, grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(details, 'RBAC: access denied')
        _, code, details, _ = await self.acall('grpc', '/broken.Svc/M', b'x')
        self.assertEqual(code, grpc.StatusCode.UNAVAILABLE)
        self.assertIn('connection failure', details)

    async def test_grpc_timeout_header_bounds_the_call(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.ip(2))
        t = c.open_tunnel(self.svcs['grpc'].authority)
        self.assertEqual((await t.wait_response()).status, 200)
        h = await H2(t).start()
        hdrs = [('content-type', 'application/grpc'), ('te', 'trailers')]
        path = '/test.Echo/SlowStream'
        # deadline before the first message: a gRPC-shaped 504 (UNAVAILABLE, as Envoy maps it)
        early = await h.request('POST', path, body=grpc_frame(b'20'),
                                headers=hdrs + [('grpc-timeout', '30m')])
        self.assertEqual((early.status, early.header('grpc-status')), (200, '14'), early)
        # deadline while messages flow: the stream is cut there
        t0 = time.monotonic()
        cut = await h.request('POST', path, body=grpc_frame(b'20'),
                              headers=hdrs + [('grpc-timeout', '400000u')])
        self.assertEqual(cut.status, 200, cut)
        self.assertEqual(cut.reset_code, 8, cut)  # CANCEL
        self.assertLess(time.monotonic() - t0, 1.5)
        self.assertLess(len(grpc_unframe(bytes(cut.body))), 20)
        # no header: no timeout at all (the stream outlives the route's 1 s)
        full = await h.request('POST', path, body=grpc_frame(b'15'), headers=hdrs, timeout=20)
        self.assertEqual(full.trailer('grpc-status'), '0', full)
        self.assertEqual(grpc_unframe(bytes(full.body)), [b's%d' % i for i in range(15)])

    async def test_metrics_carry_grpc_status(self):
        for _ in range(2):
            await self.acall('grpc', '/test.Echo/Unary', b'm')
            await self.acall('grpc', '/test.Echo/Fail', b'm')
            await self.acall('grpcauthz', '/test.Echo/Stream', b'1', kind='stream')
        await asyncio.sleep(0.2)
        from prometheus_client.parser import text_string_to_metric_families
        with urllib.request.urlopen('http://%s/stats/prometheus' % self.prom_addr,
                                    timeout=10) as r:
            text = r.read().decode()
        counts = {}
        for fam in text_string_to_metric_families(text):
            if fam.name != 'istio_requests':
                continue
            for smp in fam.samples:
                if smp.name != 'istio_requests_total':
                    continue
                lb = smp.labels
                key = (lb.get('request_protocol'), lb.get('response_code'),
                       lb.get('grpc_response_status'))
                counts[key] = counts.get(key, 0) + smp.value
        self.assertGreaterEqual(counts.get(('grpc', '200', '0'), 0), 2, counts)
        self.assertGreaterEqual(counts.get(('grpc', '200', '5'), 0), 2, counts)
        self.assertGreaterEqual(counts.get(('grpc', '200', '7'), 0), 2, counts)



@unittest.skipIf(grpc is None or not os.environ.get('HBONE_BIN'),
                 'python3-grpcio or $HBONE_BIN missing')
class GrpcDrainTest(GrpcBase):
    """SIGTERM with gRPC streams in flight: inner HTTP/2 clients get GOAWAY(NO_ERROR), the
    streams complete with OK, inner HTTP/1.1 answers say connection: close."""

    waypoint_args = ('--drain-ms', '6000')

    @classmethod
    def setUpClass(cls):
        allow_streams_after_goaway()
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        if cls.wp.proc is not None and cls.wp.alive():
            cls.wp.stop(check=True)
        cls.wp.proc = None
        super().tearDownClass()

    async def asyncTearDown(self):
        await hbonelib.AsyncTestCase.asyncTearDown(self)

    async def test_streams_in_flight_complete_across_sigterm(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.ip(2))
        t = c.open_tunnel(self.svcs['grpc'].authority)
        self.assertEqual((await t.wait_response()).status, 200)
        h = await H2(t).start()
        s = await h.start_request('POST', '/test.Echo/SlowStream', body=grpc_frame(b'20'),
                                  headers=[('content-type', 'application/grpc'),
                                           ('te', 'trailers')])
        t1 = c.open_tunnel(self.svcs['grpcauthz'].authority)  # an HTTP/1.1 tunnel, kept alive
        self.assertEqual((await t1.wait_response()).status, 200)
        h1 = H1(t1)
        grpc_call = asyncio.ensure_future(self.acall('grpc', '/test.Echo/SlowStream', b'20',
                                                     kind='stream'))
        while not s.body:
            await h.pump()
        await asyncio.sleep(0.3)
        self.wp.proc.send_signal(signal.SIGTERM)
        # the inner HTTP/2 client is told to go away gracefully, its stream goes on to the end
        try:
            await h.wait([s], timeout=20)
        except hbonelib.TunnelReset:
            self.fail('tunnel lost: %r' % getattr(c.ep, 'protocol_error', None))
        self.assertEqual(s.status, 200, s)
        self.assertIsNone(s.reset_code, s)
        self.assertEqual(s.trailer('grpc-status'), '0', s)
        self.assertEqual(grpc_unframe(bytes(s.body)), [b's%d' % i for i in range(20)])
        while h.goaway is None and await h.pump(timeout=10):
            pass
        self.assertEqual(h.goaway, (0, s.sid))
        # ... and the inner connection (the tunnel) ends once nothing is left on it
        while await h.pump(timeout=10):
            pass
        msgs, code, _, _ = await grpc_call
        self.assertEqual(code, grpc.StatusCode.OK)
        self.assertEqual(msgs, [b's%d' % i for i in range(20)])
        # inner HTTP/1.1 on a tunnel opened before: answered, with connection: close
        r = await h1.request('POST', '/test.Echo/Unary', body=b'')
        self.assertEqual((r.header('connection') or '').lower(), 'close', r)
        rc = await asyncio.to_thread(self.wp.proc.wait, 15)
        self.assertEqual(rc, 0, self.wp.tail())
        self.assertIsNone(self.wp.sanitizer_report(), self.wp.tail(100))

if __name__ == '__main__':
    hbonelib.require_waypoint()
    hbonelib.main()
