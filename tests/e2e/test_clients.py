#!/usr/bin/python3
"""End to end with stock HTTP clients: curl and nghttp (HTTP/1.1 and h2c prior knowledge) inside HBONE
tunnels through the waypoint's HTTP chains.

  curl/nghttp --TCP--> `hbone forward` (our source-ztunnel stand-in) --HBONE--> waypoint
      --HBONE--> destination stand-ins (python3-h2) --TCP--> Python http.server backends

The clients are independent implementations of HTTP/1.1 and HTTP/2; the checks are on what
they print and on what the backends and stand-ins saw.
"""

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
from hbonelib import Endpoint, Service, Waypoint, block_for, make_config  # noqa: E402
from l7lib import (AUTHZ_RBAC, HboneForward, HttpBackend, http_chain, route,  # noqa: E402
                   route_config, with_http_chains)

PODS = (31, 32, 33)
V2_POD = 34
APP_PORT = 8080
CURL = shutil.which('curl')
NGHTTP = shutil.which('nghttp')


class Topo:
    def __init__(self, block):
        self.block = block
        ip = self.ip
        self.wp_ip, self.fwd_ip = ip(1), ip(2)

        def svc(name, vip, pods):
            return Service(name, ip(vip), 80, [Endpoint(ip(p), APP_PORT, True) for p in pods])
        self.svcs = {'web': svc('web', 100, PODS), 'web-v2': svc('web-v2', 101, [V2_POD]),
                     'single': svc('single', 102, [PODS[0]]), 'authz': svc('authz', 103, [PODS[0]])}
        # one `hbone forward` listener per service: port -> service
        self.fwd_ports = {'web': 7000, 'single': 7001, 'authz': 7002}

    def ip(self, host):
        return '%s.%d' % (self.block, host)

    def url(self, service, path):
        return 'http://%s:%d%s' % (self.fwd_ip, self.fwd_ports[service], path)

    def config(self):
        c = lambda n: self.svcs[n].cluster  # noqa: E731
        web_routes = [
            route({'path': '/redirect'}, redirect={'path_redirect': '/new-home',
                                                   'response_code': 'FOUND'}),
            route({'prefix': '/hdr', 'headers': [{'name': 'x-pick',
                                                  'string_match': {'exact': 'v2'}}]},
                  route={'cluster': c('web-v2')}),
            route({'prefix': '/q', 'query_parameters': [{'name': 'v',
                                                         'string_match': {'exact': '2'}}]},
                  route={'cluster': c('web-v2')}),
            route({'prefix': '/mut/'}, route={'cluster': c('web'), 'prefix_rewrite': '/rewritten/'},
                  request_headers_to_add=[{'header': {'key': 'x-added', 'value': 'yes'},
                                           'append_action': 'OVERWRITE_IF_EXISTS_OR_ADD'}],
                  response_headers_to_add=[{'header': {'key': 'x-resp-added', 'value': 'r'},
                                            'append_action': 'OVERWRITE_IF_EXISTS_OR_ADD'}],
                  response_headers_to_remove=['x-backend-secret']),
            route({'prefix': '/'}, route={'cluster': c('web')}),
        ]
        chains = {
            c('web'): http_chain(c('web'), route_config('web', web_routes)),
            c('single'): http_chain(c('single'), route_config('single', [
                route({'prefix': '/'}, route={'cluster': c('single')})])),
            c('authz'): http_chain(c('authz'), route_config('authz', [
                route({'prefix': '/'}, route={'cluster': c('authz')})]), rbac=AUTHZ_RBAC),
        }
        return with_http_chains(make_config(self.wp_ip, list(self.svcs.values())), chains)


def run(argv, timeout=60, input=None):
    p = subprocess.run(argv, capture_output=True, timeout=timeout, input=input)
    return p.returncode, p.stdout, p.stderr.decode('utf-8', 'replace')


class ClientsTest(hbonelib.AsyncTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        cls.topo = Topo(cls.block)
        ip = cls.topo.ip
        cls.backends = {p: HttpBackend('pod%d' % p, ip(p), APP_PORT) for p in PODS + (V2_POD,)}
        cls.wp = Waypoint(cls.topo.wp_ip, cls.topo.config(), name=cls.__name__)
        cls.wp.start()
        cls.fwd = [HboneForward('%s:%d' % (cls.topo.fwd_ip, port), cls.wp.hbone_addr,
                                cls.topo.svcs[svc].authority)
                   for svc, port in cls.topo.fwd_ports.items()]

    @classmethod
    def tearDownClass(cls):
        for f in cls.fwd:
            f.stop()
        cls.wp.stop(check=True)
        for b in cls.backends.values():
            b.close()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        for b in self.backends.values():
            b.reset()
        self.dest = {}
        for p in PODS + (V2_POD,):
            self.dest[p] = await self.server(self.topo.ip(p), 15008, mode='forward')
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        await super().asyncTearDown()
        self.wp.assert_healthy()

    async def curl(self, *args, timeout=60, input=None):
        return await asyncio.to_thread(run, [CURL, '-sS', '--max-time', '30'] + list(args),
                                       timeout, input)

    async def curl_json(self, url, *args):
        import json
        rc, out, err = await self.curl(url, *args)
        self.assertEqual(rc, 0, err)
        return json.loads(out)

    # --- HTTP/1.1 with curl

    async def test_curl_routing_rewrites_and_bodies(self):
        t = self.topo
        j = await self.curl_json(t.url('web', '/hdr/a'), '-H', 'x-pick: v2')
        self.assertEqual(j['pod'], 'pod%d' % V2_POD)
        j = await self.curl_json(t.url('web', '/hdr/a'), '-H', 'x-pick: v1')
        self.assertIn(j['pod'], ['pod%d' % p for p in PODS])
        j = await self.curl_json(t.url('web', '/q/x?v=2'))
        self.assertEqual(j['pod'], 'pod%d' % V2_POD)
        j = await self.curl_json(t.url('web', '/q/x?v=1'))
        self.assertNotEqual(j['pod'], 'pod%d' % V2_POD)
        # rewrite + request/response header mutations, seen by curl's -D
        with tempfile.NamedTemporaryFile() as hdrs:
            j = await self.curl_json(t.url('web', '/mut/page'), '-D', hdrs.name)
            head = open(hdrs.name, 'rb').read().decode().lower()
        self.assertEqual(j['path'], '/rewritten/page')
        self.assertEqual(j['headers'].get('x-added'), 'yes')
        self.assertEqual(j['headers'].get('x-forwarded-proto'), 'http')
        self.assertIn('x-resp-added: r', head)
        self.assertNotIn('x-backend-secret', head)
        # redirect, not followed
        rc, out, err = await self.curl('-o', '/dev/null', '-w', '%{http_code} %{redirect_url}',
                                       t.url('web', '/redirect'))
        self.assertEqual(out.decode().split()[0], '302', err)
        self.assertTrue(out.decode().split()[1].endswith('/new-home'), out)
        # 1 MiB upload with Content-Length, and chunked
        body = os.urandom(1 << 20)
        rc, out, err = await self.curl(t.url('web', '/up'), '--data-binary', '@-', input=body)
        self.assertEqual(rc, 0, err)
        self.assertIn(b'"body_len": %d' % len(body), out)
        rc, out, err = await self.curl(t.url('web', '/up'), '--data-binary', '@-',
                                       '-H', 'Transfer-Encoding: chunked', input=body)
        self.assertEqual(rc, 0, err)
        self.assertIn(b'"body_len": %d' % len(body), out)
        # a big response body arrives whole
        n = 3 * 1024 * 1024 + 5
        rc, out, err = await self.curl(t.url('web', '/bigresp/%d' % n))
        self.assertEqual(rc, 0, err)
        self.assertEqual(out, bytes(range(256)) * (n // 256) + bytes(n % 256))

    async def test_curl_keepalive_is_one_tunnel_each_way(self):
        t = self.topo
        urls = [t.url('single', '/k/%d' % i) for i in range(10)]
        rc, out, err = await self.curl('-v', *urls)
        self.assertEqual(rc, 0, err)
        self.assertEqual(out.count(b'"pod": "pod%d"' % PODS[0]), 10, out[:500])
        self.assertEqual(err.count('Re-using existing connection'), 9, err[-2000:])
        paths = [p for (_, p, _, _) in self.backends[PODS[0]].requests]
        self.assertEqual(paths, ['/k/%d' % i for i in range(10)])
        # keep-alive upstream: one CONNECT to the pod's stand-in carried all ten
        self.assertEqual(len(self.dest[PODS[0]].records), 1, self.dest[PODS[0]].records)

    async def test_curl_per_request_balancing(self):
        t = self.topo
        rc, out, err = await self.curl(*[t.url('web', '/lb/%d' % i) for i in range(30)])
        self.assertEqual(rc, 0, err)
        pods = collections.Counter(p for p in PODS if b'"pod": "pod%d"' % p in out)
        self.assertEqual(len(pods), 3, out[:300])
        counts = [len(self.backends[p].requests) for p in PODS]
        self.assertEqual(sum(counts), 30)
        self.assertTrue(all(c >= 1 for c in counts), counts)  # P(a pod unused) ~ 1.5e-5

    async def test_curl_authorization(self):
        t = self.topo

        async def code(path, *args):
            rc, out, err = await self.curl('-o', '-', '-w', '\n%{http_code}',
                                           t.url('authz', path), *args)
            self.assertEqual(rc, 0, err)
            body, _, status = out.rpartition(b'\n')
            return int(status), body
        self.assertEqual((await code('/public/x'))[0], 200)
        self.assertEqual((await code('/admin/x'))[0], 200)  # principal = forward's client cert
        self.assertEqual(await code('/other/x'), (403, b'RBAC: access denied'))
        self.assertEqual(await code('/public/x', '-X', 'POST', '-d', 'x'),
                         (403, b'RBAC: access denied'))
        self.assertEqual((await code('/nothing'))[0], 403)  # no policy matches: deny
        seen = [p for (_, p, _, _) in self.backends[PODS[0]].requests]
        self.assertEqual(sorted(seen), ['/admin/x', '/public/x'])

    async def test_curl_bad_requests(self):
        t = self.topo
        cases = [
            (['-X', 'G@T'], 400),
            (['-H', 'X-Big: ' + 'a' * 70000], 431),
            (['--request-target', 'http://evil.example/app'], 400),
        ]
        for args, status in cases:
            with self.subTest(args=args[:1]):
                rc, out, err = await self.curl('-o', '/dev/null', '-w', '%{http_code}',
                                               t.url('web', '/app'), *args)
                self.assertEqual(out.decode(), str(status), err)
        for b in self.backends.values():
            self.assertEqual(b.requests, [])
        j = await self.curl_json(t.url('web', '/still'))
        self.assertEqual(j['path'], '/still')

    # --- HTTP/2 prior knowledge (h2c inside the tunnel) with nghttp and curl

    async def nghttp(self, *args, timeout=60):
        return await asyncio.to_thread(run, [NGHTTP, '-t', '30'] + list(args), timeout)

    async def test_nghttp_h2c_routing_concurrency_and_bodies(self):
        if not NGHTTP:
            self.skipTest('nghttp not installed')
        import json
        t = self.topo
        rc, out, err = await self.nghttp(t.url('web', '/hdr/a'), '-H', 'x-pick: v2')
        self.assertEqual(rc, 0, err)
        j = json.loads(out)
        self.assertEqual(j['pod'], 'pod%d' % V2_POD)
        self.assertEqual(j['headers'].get('x-forwarded-proto'), 'http')
        # 30 concurrent streams on one connection (one tunnel), balanced per request
        urls = [t.url('web', '/lb2/%d' % i) for i in range(30)]
        rc, out, err = await self.nghttp('-v', *urls)
        self.assertEqual(rc, 0, err)
        text = out.decode('utf-8', 'replace')
        self.assertEqual(text.count(':status: 200'), 30, text[-2000:])
        self.assertEqual(text.count('] Connected'), 1, text[:500])  # one HTTP/2 connection
        counts = [len([r for r in self.backends[p].requests if r[1].startswith('/lb2/')])
                  for p in PODS]
        self.assertEqual(sum(counts), 30)
        self.assertTrue(all(c >= 1 for c in counts), counts)
        # a 1 MiB upload
        with tempfile.NamedTemporaryFile() as f:
            f.write(os.urandom(1 << 20))
            f.flush()
            rc, out, err = await self.nghttp('-d', f.name, t.url('web', '/up2'))
        self.assertEqual(rc, 0, err)
        self.assertEqual(json.loads(out)['body_len'], 1 << 20)
        # authorization over HTTP/2
        rc, out, err = await self.nghttp('-v', t.url('authz', '/other/x'))
        text = out.decode('utf-8', 'replace')
        self.assertIn(':status: 403', text)
        self.assertIn('RBAC: access denied', text)
        rc, out, err = await self.nghttp(t.url('authz', '/public/x'))
        self.assertEqual(json.loads(out)['path'], '/public/x')

    async def test_curl_http2_prior_knowledge(self):
        t = self.topo
        rc, out, err = await self.curl('--http2-prior-knowledge', '-o', '/dev/null', '-w',
                                       '%{http_version} %{http_code}', t.url('web', '/app/h2'))
        self.assertEqual(out.decode(), '2 200', err)
        # one URL per curl: curl 7.88 fails reusing a prior-knowledge connection for a second
        # URL on any server (curl issue 10634, fixed in 8.0); nghttp covers reuse above
        for path in ('/k2/a', '/k2/b'):
            rc, out, err = await self.curl('--http2-prior-knowledge', t.url('single', path))
            self.assertEqual(rc, 0, err)
            self.assertIn(b'"path": "%s"' % path.encode(), out)
        rc, out, err = await self.curl('--http2-prior-knowledge', '-o', '/dev/null', '-w',
                                       '%{http_code}', t.url('authz', '/other/x'))
        self.assertEqual(out.decode(), '403', err)
        # an oversized header block: refused, the connection and waypoint survive
        rc, out, err = await self.curl('--http2-prior-knowledge', '-o', '/dev/null', '-w',
                                       '%{http_code}', t.url('web', '/app/big'),
                                       '-H', 'x-big: ' + 'a' * 70000)
        self.assertNotEqual(out.decode(), '200', err)
        self.assertFalse(any(r[1] == '/app/big' for b in self.backends.values()
                             for r in b.requests))
        rc, out, err = await self.curl('--http2-prior-knowledge', '-o', '/dev/null', '-w',
                                       '%{http_code}', t.url('web', '/app/after'))
        self.assertEqual(out.decode(), '200', err)


if __name__ == '__main__':
    hbonelib.require_waypoint()
    if not CURL or not os.access(os.environ.get('HBONE_BIN', ''), os.X_OK):
        sys.stderr.write('curl or HBONE_BIN missing: skipping\n')
        sys.exit(77)
    hbonelib.main()
