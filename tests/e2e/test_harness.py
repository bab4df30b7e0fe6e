#!/usr/bin/python3
"""Self-test of the e2e harness: the client stand-in against the destination stand-in directly,
without the waypoint. If these fail, the waypoint tests cannot be trusted."""

import asyncio
import hashlib
import json
import os
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403
import hbonelib  # noqa: E402

FIXTURE = '/work/shared/fixtures/istiod-waypoint-bookinfo.json'


class HarnessTest(AsyncTestCase):

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.block = block_for(self.id())
        self.dest_ip = self.block + '.11'
        self.dest = await self.server(self.dest_ip, 15008, mode='echo')
        self.addr = '%s:15008' % self.dest_ip

    async def test_echo_and_identities(self):
        c = await self.client(self.addr, local_ip=self.block + '.2')
        self.assertEqual(c.ep.alpn, 'h2')
        self.assertEqual(c.ep.tls_version, 'TLSv1.3')
        self.assertEqual(c.ep.peer_uri_sans, [DEST_ID])
        t, r = await c.connect_tunnel(self.block + '.11:9000')
        self.assertEqual(r.status, 200)
        await t.send(b'ping' * 1000)
        self.assertEqual(await t.recv_exactly(4000), b'ping' * 1000)
        await t.send_eof()
        self.assertEqual(await t.recv_all(), b'')
        self.assertTrue(t.remote_ended)
        rec = self.dest.records[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertEqual(rec.peer_uri_sans, [CLIENT_ID])
        self.assertEqual(rec.authority, self.block + '.11:9000')
        self.assertEqual(rec.method, 'CONNECT')
        self.assertNotIn(':path', rec.headers)
        self.assertNotIn(':scheme', rec.headers)
        self.assertTrue(rec.eof_received)
        self.assertEqual(rec.peer_addr[0], self.block + '.2')

    async def test_forward_half_close_both_ways(self):
        self.dest.mode = 'forward'
        b1 = await self.backend(self.dest_ip, 9001, kind='reply_after_eof')
        b2 = await self.backend(self.dest_ip, 9002, kind='talk_first')
        c = await self.client(self.addr)
        t, r = await c.connect_tunnel(self.dest_ip + ':9001')
        self.assertEqual(r.status, 200)
        await t.send(b'x' * 100000)
        await t.send_eof()
        got = await t.recv_all()
        self.assertEqual(got, b'REPLY:' + hashlib.sha256(b'x' * 100000).hexdigest().encode())
        t2, r2 = await c.connect_tunnel(self.dest_ip + ':9002')
        self.assertEqual(r2.status, 200)
        self.assertEqual(await t2.recv_all(), b'hello from backend\n')
        await t2.send(b'after-fin')
        await t2.send_eof()
        rec = (await b2.wait_records(1))[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertEqual(bytes(rec.data), b'after-fin')
        self.assertEqual(rec.close_kind, 'eof')

    async def test_forward_refused_is_503(self):
        self.dest.mode = 'forward'
        c = await self.client(self.addr)
        t = c.open_tunnel(self.dest_ip + ':9')
        r = await t.wait_response()
        self.assertEqual(r.status, 503)

    async def test_modes_status_reset_hang(self):
        c = await self.client(self.addr)
        self.dest.mode = 'status'
        r = await c.open_tunnel(self.dest_ip + ':1').wait_response()
        self.assertEqual(r.status, 503)
        self.dest.mode = 'reset'
        t = c.open_tunnel(self.dest_ip + ':1')
        with self.assertRaises(TunnelReset) as cm:
            await t.wait_response()
        self.assertEqual(cm.exception.code, ErrorCodes.CANCEL)
        self.dest.mode = 'hang'
        t = c.open_tunnel(self.dest_ip + ':1')
        with self.assertRaises(asyncio.TimeoutError):
            await t.wait_response(timeout=0.5)
        t.reset()
        await self.dest.wait_records(3)
        rec = self.dest.records[2]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertEqual(rec.reset_received, ErrorCodes.CANCEL)

    async def test_client_reset_reaches_backend(self):
        self.dest.mode = 'forward'
        b = await self.backend(self.dest_ip, 9003, kind='echo')
        c = await self.client(self.addr)
        t, r = await c.connect_tunnel(self.dest_ip + ':9003')
        await t.send(b'abc')
        self.assertEqual(await t.recv_exactly(3), b'abc')
        t.reset(ErrorCodes.CANCEL)
        rec = (await b.wait_records(1))[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertIn(rec.close_kind, ('reset', 'eof'))
        b2 = await self.backend(self.dest_ip, 9004, kind='abort')
        t, r = await c.connect_tunnel(self.dest_ip + ':9004')
        await t.send(b'z')
        with self.assertRaises(TunnelReset):
            await t.recv_all()

    async def test_flow_control_stalls_on_slow_reader(self):
        self.dest.mode = 'sink'
        self.dest.read_rate = 64 * KiB
        c = await self.client(self.addr)
        t, r = await c.connect_tunnel(self.dest_ip + ':1')
        data = b'\0' * (8 * MiB)
        try:
            await asyncio.wait_for(t.send(data), 2)
            self.fail('8 MiB went through a 64 KiB/s reader in 2 s')
        except asyncio.TimeoutError:
            pass
        self.assertTrue(t.window_zero_seen)
        # window + what the reader consumed meanwhile (64 KiB/s for ~2 s) + slack
        self.assertLessEqual(t.bytes_sent, ZT_STREAM_WINDOW + 3 * 64 * KiB)

    async def test_bulk_256mib_sink(self):
        self.dest.mode = 'sink'
        c = await self.client(self.addr)
        t, r = await c.connect_tunnel(self.dest_ip + ':1')
        total = 256 * MiB
        h = hashlib.sha256()
        t0 = time.monotonic()
        for chunk in Pattern(7).chunks(total):
            h.update(chunk)
            await t.send(chunk)
        await t.send_eof()
        await t.recv_all(timeout=60)
        rec = self.dest.records[0]
        await asyncio.wait_for(rec.done.wait(), 10)
        dt = time.monotonic() - t0
        sys.stderr.write('harness: 256 MiB in %.2fs (%.0f MiB/s)\n' % (dt, 256 / dt))
        self.assertEqual(rec.bytes_in, total)
        self.assertEqual(rec.sha256, h.hexdigest())

    async def test_many_tunnels(self):
        clients = [await self.client(self.addr) for _ in range(4)]

        async def one(i):
            c = clients[i % len(clients)]
            t, r = await c.connect_tunnel('%s:%d' % (self.dest_ip, 1000 + i))
            payload = ('tunnel-%d-' % i).encode() * 100
            await t.send(payload)
            await t.send_eof()
            return (await t.recv_all()) == payload
        res = await asyncio.gather(*[one(i) for i in range(400)])
        self.assertTrue(all(res))
        self.assertEqual(len(self.dest.records), 400)

    async def test_tls_probes(self):
        ok = await asyncio.to_thread(tls_probe, self.addr, client_ssl_context())
        self.assertTrue(ok['h2'], ok)
        for name, ctx in [
                ('no client cert', client_ssl_context(cert=None)),
                ('foreign root', client_ssl_context(cert='foreign-client')),
                ('expired', client_ssl_context(cert='expired-client')),
                ('tls1.2', client_ssl_context(min_version=ssl.TLSVersion.TLSv1_2,
                                              max_version=ssl.TLSVersion.TLSv1_2)),
                ('alpn http/1.1', client_ssl_context(alpn=('http/1.1',)))]:
            res = await asyncio.to_thread(tls_probe, self.addr, ctx)
            if name == 'alpn http/1.1':
                # Python's server does not fail on ALPN mismatch; just check no h2 was agreed.
                self.assertNotEqual(res['alpn'], 'h2', res)
                continue
            self.assertFalse(res['h2'], (name, res))

    async def test_raw_probe_and_client_hello(self):
        hello = client_hello_bytes()
        self.assertEqual(hello[0], 0x16)
        self.assertGreater(len(hello), 100)
        dt, got, how = await asyncio.to_thread(raw_probe, self.addr, b'garbage\r\n\r\n' * 10, 5)
        self.assertIn(how, ('eof', 'reset'))
        self.assertLess(dt, 4)

    def test_block_for_is_private_and_stable(self):
        a = block_for('x')
        self.assertEqual(a, block_for('x'))
        parts = [int(p) for p in a.split('.')]
        self.assertEqual(parts[0], 127)
        self.assertTrue(32 <= parts[1] < 200)

    def test_make_config_matches_fixture_shape(self):
        svc = Service('mongodb', '127.200.0.6', 27017, [Endpoint('127.0.24.1', 27017)])
        legacy = Service('legacy', '127.200.0.7', 8080, [Endpoint('127.0.25.1', 8080, hbone=False)])
        cfg = make_config('127.0.0.60', [svc, legacy], workloads=['127.0.24.1'])
        json.dumps(cfg)
        res = cfg['resources']
        self.assertIn(svc.cluster, res[hbonelib.T_CLUSTER])
        self.assertEqual(svc.cluster, 'inbound-vip|27017|tcp|mongodb.bookinfo.svc.cluster.local')
        if not os.path.exists(FIXTURE):
            self.skipTest('fixture not available')
        with open(FIXTURE) as f:
            fx = json.load(f)['resources']

        def keys(d, prefix=''):
            out = set()
            if isinstance(d, dict):
                for k, v in d.items():
                    k = '<port>' if k.isdigit() else k
                    out.add(prefix + '/' + k)
                    out |= keys(v, prefix + '/' + k)
            elif isinstance(d, list):
                for v in d:
                    out |= keys(v, prefix + '[]')
            return out
        # Every key path of the fixture's mongodb cluster / CLA / chain exists in ours.
        for typ in (hbonelib.T_CLUSTER, hbonelib.T_CLA):
            missing = keys(fx[typ][svc.cluster]) - keys(res[typ][svc.cluster])
            self.assertFalse(missing, (typ, missing))
        missing = keys(fx[hbonelib.T_CLA][legacy.cluster.replace('|tcp|', '|http|')]) - \
            keys(res[hbonelib.T_CLA][legacy.cluster])
        self.assertFalse(missing, missing)
        fchain = [c for c in fx[hbonelib.T_LISTENER]['main_internal']['filter_chains']
                  if c['name'] == svc.cluster][0]
        ochain = [c for c in res[hbonelib.T_LISTENER]['main_internal']['filter_chains']
                  if c['name'] == svc.cluster][0]
        self.assertFalse(keys(fchain) - keys(ochain))
        fm = fx[hbonelib.T_LISTENER]['main_internal']['filter_chain_matcher']
        om = res[hbonelib.T_LISTENER]['main_internal']['filter_chain_matcher']
        self.assertFalse(keys(fm) - keys(om))
        fo = fx[hbonelib.T_CLUSTER]['connect_originate']
        oo = res[hbonelib.T_CLUSTER]['connect_originate']
        self.assertFalse(keys(fo) - keys(oo))


if __name__ == '__main__':
    main()
