#!/usr/bin/python3
"""End to end: protocol detection on a service port of unknown protocol.

istiod gives such a port two chains and an ApplicationProtocolInput matcher ('h2c' and
'http/1.1' -> the HTTP chain, anything else -> the TCP chain), which Envoy feeds from its
http_inspector. Here the HTTP chain routes to an HTTP backend (pod A) and the TCP chain to a raw
backend (pod B), so where each tunnel went shows what the waypoint detected: HTTP/1.1 and the
HTTP/2 preface are served at L7; other client-first bytes, an immediate end of stream and a
client that says nothing (a server-first protocol) go to the TCP chain, the last after
--protocol-detection-ms, without hanging.
"""

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
from hbonelib import Endpoint, Service, Waypoint, block_for, make_config  # noqa: E402
from l7lib import H1, H2, HttpBackend, http_chain  # noqa: E402

POD_A, POD_B = 31, 32
SNIFF_MS = 400
T_IN_NET = 'type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.'
T_STRING = 'type.googleapis.com/google.protobuf.StringValue'


def action(name):
    return {'action': {'name': name, 'typed_config': {'@type': T_STRING, 'value': name}}}


class SniffTest(hbonelib.AsyncTestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block = block_for(cls.__module__ + '.' + cls.__name__)
        ip = lambda h: '%s.%d' % (block, h)  # noqa: E731
        cls.ip = staticmethod(ip)
        cls.web = Service('auto', ip(100), 80, [Endpoint(ip(POD_A), 8080, True)])
        cls.raw = Service('raw', ip(101), 9100, [Endpoint(ip(POD_B), 9100, True)])
        cfg = make_config(ip(1), [cls.web, cls.raw])
        mi = cfg['resources'][hbonelib.T_LISTENER]['main_internal']
        http_name = 'inbound-vip|80|http|' + cls.web.host
        rc = {'name': 'auto', 'validate_clusters': False, 'virtual_hosts': [
            {'name': 'auto', 'domains': ['*'],
             'routes': [{'match': {'prefix': '/'}, 'route': {'cluster': cls.web.cluster}}]}]}
        mi['filter_chains'].append(http_chain(http_name, rc))
        found = False
        for rm in mi['filter_chain_matcher']['matcher_tree']['custom_match']['typed_config'][
                'range_matchers']:
            if rm['ranges'][0]['address_prefix'] == cls.web.vip:
                ports = rm['on_match']['matcher']['matcher_tree']['exact_match_map']['map']
                ports['80'] = {'matcher': {
                    'matcher_tree': {
                        'input': {'name': 'application-protocol', 'typed_config': {
                            '@type': T_IN_NET + 'ApplicationProtocolInput'}},
                        'exact_match_map': {'map': {"'h2c'": action(http_name),
                                                    "'http/1.1'": action(http_name)}}},
                    'on_no_match': action(cls.raw.cluster)}}
                found = True
        assert found
        cls.backend_http = HttpBackend('podA', ip(POD_A), 8080)
        cls.wp = Waypoint(ip(1), cfg, name=cls.__name__,
                          extra_args=['--protocol-detection-ms', str(SNIFF_MS)])
        cls.wp.start()

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)
        cls.backend_http.close()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.backend_http.reset()
        self.dest = {p: await self.server(self.ip(p), 15008, mode='forward')
                     for p in (POD_A, POD_B)}
        self.raw_conns = []
        self.raw_server = await asyncio.start_server(self.raw_handler, self.ip(POD_B), 9100)
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        self.raw_server.close()
        await self.raw_server.wait_closed()
        await super().asyncTearDown()
        self.wp.assert_healthy()

    async def raw_handler(self, r, w):
        """Pod B: greets first (server-first protocols), then echoes; records what it saw."""
        rec = {'data': b''}
        self.raw_conns.append(rec)
        w.write(b'220 podB ready\r\n')
        await w.drain()
        try:
            while True:
                d = await r.read(65536)
                if not d:
                    break
                rec['data'] += d
                w.write(d)
                await w.drain()
        except ConnectionError:
            pass
        w.close()

    def tunnels_total(self):
        import json
        status, body = self.wp.admin_get('/stats?format=json&filter=^waypoint\\.tunnels_total$')
        self.assertEqual(status, 200)
        return [s['value'] for s in json.loads(body)['stats']
                if s['name'] == 'waypoint.tunnels_total'][0]

    async def tunnel(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.ip(2))
        t = c.open_tunnel(self.web.authority)
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        return t

    async def test_http1_is_served_by_the_http_chain(self):
        before = self.tunnels_total()
        h = H1(await self.tunnel())
        r = await h.request('GET', '/sniffed/1')
        self.assertEqual(r.status, 200, r)
        j = r.json()
        self.assertEqual((j['pod'], j['path']), ('podA', '/sniffed/1'))
        self.assertEqual(j['headers'].get('x-forwarded-proto'), 'http')  # the HCM ran
        r = await h.request('POST', '/sniffed/2', body=b'x' * 70000)  # keep-alive, then more
        self.assertEqual(r.json()['body_len'], 70000)
        self.assertEqual(self.raw_conns, [])
        self.assertEqual(self.tunnels_total() - before, 1)  # counted once, as an HTTP tunnel

    async def test_h2c_preface_is_served_by_the_http_chain(self):
        h = await H2(await self.tunnel()).start()
        s = await h.request('GET', '/sniffed/h2')
        self.assertEqual(s.status, 200, s)
        self.assertEqual(s.json()['path'], '/sniffed/h2')
        self.assertEqual(self.raw_conns, [])

    async def test_other_client_first_bytes_go_to_the_tcp_chain(self):
        before = self.tunnels_total()
        for first in (b'\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03',  # a TLS ClientHello
                      b'HELO mail.example\r\n',                        # no HTTP version
                      b'GET /x SPDY/3\r\n'):                           # not HTTP/1.x
            with self.subTest(first=first[:12]):
                t = await self.tunnel()
                await t.send(first)
                got = b''
                want = b'220 podB ready\r\n' + first
                while len(got) < len(want):
                    got += await t.recv(timeout=5)
                self.assertEqual(got, want)
                await t.send_eof()
                self.assertEqual(await t.recv_all(), b'')
        self.assertEqual(len(self.raw_conns), 3)
        self.assertEqual(self.backend_http.requests, [])
        self.assertEqual(self.tunnels_total() - before, 3)  # counted once each, as L4 tunnels

    async def test_server_first_protocol_does_not_hang(self):
        t = await self.tunnel()
        t0 = time.monotonic()
        greeting = await t.recv(timeout=10)  # the client says nothing
        waited = time.monotonic() - t0
        self.assertEqual(greeting, b'220 podB ready\r\n')
        self.assertGreaterEqual(waited, SNIFF_MS / 1000 * 0.8)
        self.assertLess(waited, SNIFF_MS / 1000 + 3)
        await t.send(b'QUIT\r\n')
        self.assertEqual(await t.recv(timeout=5), b'QUIT\r\n')
        await t.send_eof()
        self.assertEqual(await t.recv_all(), b'')

    async def test_end_of_stream_before_any_byte(self):
        t = await self.tunnel()
        await t.send_eof()
        self.assertEqual(await t.recv_all(timeout=10), b'220 podB ready\r\n')
        self.assertEqual(self.backend_http.requests, [])

    async def test_client_gone_while_sniffed(self):
        t = await self.tunnel()
        await t.send(b'GET /half')  # undecided: no version yet
        t.reset()
        await asyncio.sleep(SNIFF_MS / 1000 + 0.3)  # the sniffer's timer must not fire on it
        h = H1(await self.tunnel())
        r = await h.request('GET', '/after')
        self.assertEqual(r.status, 200, r)


if __name__ == '__main__':
    hbonelib.require_waypoint()
    hbonelib.main()
