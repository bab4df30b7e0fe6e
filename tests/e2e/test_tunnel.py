#!/usr/bin/python3
"""Tunnels through the waypoint: service VIPs with HBONE and plain endpoints, round robin, the
identity the destination sees, workload-addressed traffic, half-close and reset propagation.

Client stand-in (source ztunnel) -> waypoint -> destination stand-in (destination ztunnel) -> app.
"""

import asyncio
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403


class TunnelTest(WaypointTestCase):

    async def test_server_info_reports_io_backend(self):
        info = self.wp.server_info()
        self.assertEqual(info.get('io_backend'), io_backend(), info)
        self.assertIsInstance(info.get('concurrency'), int, info)
        self.assertGreaterEqual(info['concurrency'], 1)

    async def test_auto_backend_falls_back_to_epoll_when_io_uring_is_blocked(self):
        # WP_IO_URING_DISABLE=1 makes io_uring_setup look blocked (as under a seccomp profile)
        os.environ['WP_IO_URING_DISABLE'] = '1'
        try:
            wp = self.extra_waypoint(['--io-backend', 'auto'])
        finally:
            del os.environ['WP_IO_URING_DISABLE']
        info = wp.server_info()
        self.assertEqual(info.get('io_backend'), 'epoll', info)
        note = info.get('io_backend_note', '')
        self.assertIn('io_uring', note, info)
        self.assertEqual(wp.log_text().count(note), 1, wp.tail())  # logged once
        c = await self.wp_client(wp)
        await self.echo_roundtrip(c, 'echo')

    async def test_waypoint_presents_its_identity_over_tls13_h2(self):
        c = await self.wp_client()
        self.assertEqual(c.ep.tls_version, 'TLSv1.3')
        self.assertEqual(c.ep.alpn, 'h2')
        self.assertEqual(c.ep.peer_uri_sans, [WAYPOINT_ID])
        self.assertGreaterEqual(c.peer_max_concurrent_streams(), 1)
        rtt = await c.ping()
        self.assertLess(rtt, 2)

    async def test_echo_through_vip_with_hbone_endpoint(self):
        c = await self.wp_client()
        payload = os.urandom(200 * KiB)
        t = await self.echo_roundtrip(c, 'echo', payload)
        self.assertTrue(t.remote_ended)
        recs = self.topo.dest[11].records + self.topo.dest[12].records
        self.assertEqual(len(recs), 1, recs)
        rec = recs[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        # single HBONE: :authority is the endpoint's pod ip:target port, classic CONNECT shape
        self.assertIn(rec.authority, ['%s:9000' % self.topo.ip(11), '%s:9000' % self.topo.ip(12)])
        self.assertIsNone(rec.shape_error, rec.headers)
        self.assertEqual(rec.bytes_in, len(payload))
        self.assertTrue(rec.eof_received)
        # the destination sees the waypoint's own identity, not the client's
        self.assertEqual(rec.peer_uri_sans, [WAYPOINT_ID])
        app = self.topo.apps[(11, 9000)] if rec.server is self.topo.dest[11] \
            else self.topo.apps[(12, 9000)]
        self.assertEqual(len(app.records), 1)
        self.assertEqual(app.records[0].bytes_in, len(payload))

    async def test_echo_through_vip_with_plain_endpoint(self):
        c = await self.wp_client()
        payload = os.urandom(300 * KiB)
        await self.echo_roundtrip(c, 'plain', payload)
        recs = self.topo.apps[(13, 9001)].records
        self.assertEqual(len(recs), 1)
        await asyncio.wait_for(recs[0].done.wait(), 5)
        self.assertEqual(recs[0].bytes_in, len(payload))
        self.assertEqual(recs[0].close_kind, 'eof')
        self.assertEqual(bytes(recs[0].data[:100]), payload[:100])

    async def test_round_robin_across_two_endpoints(self):
        c = await self.wp_client()
        for i in range(10):
            await self.echo_roundtrip(c, 'echo', b'rr-%d' % i)
        n11 = len(self.topo.dest[11].records)
        n12 = len(self.topo.dest[12].records)
        self.assertEqual((n11, n12), (5, 5))
        # strictly alternating (one connection, one tunnel at a time)
        order = [h for (_, h) in sorted([(r.seq, 11) for r in self.topo.dest[11].records] +
                                        [(r.seq, 12) for r in self.topo.dest[12].records])]
        for a, b in zip(order, order[1:]):
            self.assertNotEqual(a, b, order)
        for rec in self.topo.dest[11].records + self.topo.dest[12].records:
            self.assertEqual(rec.peer_uri_sans, [WAYPOINT_ID])

    async def test_round_robin_across_connections(self):
        seen = set()
        for i in range(4):
            c = await self.wp_client()
            await self.echo_roundtrip(c, 'echo', b'x%d' % i)
            c.close()
        for h in (11, 12):
            if self.topo.dest[h].records:
                seen.add(h)
        self.assertEqual(seen, {11, 12})

    async def test_workload_addressed_tunnel(self):
        # authority = pod ip:port of a workload the waypoint serves (direct-tcp -> encap ->
        # connect_originate): HBONE to podIP:15008 with the same authority.
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.workload_authority)
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        await t.send(b'direct')
        await t.send_eof()
        self.assertEqual(await t.recv_all(), b'direct')
        recs = self.topo.dest[Topology.WORKLOAD_POD].records
        self.assertEqual(len(recs), 1)
        self.assertEqual(recs[0].authority, self.topo.workload_authority)
        self.assertEqual(recs[0].peer_uri_sans, [WAYPOINT_ID])

    async def _half_close_client_first(self, service, app):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        data = os.urandom(123457)
        await t.send(data)
        await t.send_eof()
        # the app only answers after our FIN reached it; the tunnel must still carry it back
        got = await t.recv_all()
        self.assertEqual(got, b'REPLY:' + hashlib.sha256(data).hexdigest().encode())
        self.assertTrue(t.remote_ended)
        self.assertIsNone(t.reset_code)
        rec = (await app.wait_records(1))[0]
        self.assertEqual(rec.close_kind, 'eof')

    async def test_half_close_client_to_server_hbone(self):
        await self._half_close_client_first('halfclose', self.topo.apps[(14, 9002)])

    async def test_half_close_client_to_server_plain(self):
        await self._half_close_client_first('plain_halfclose', self.topo.apps[(13, 9002)])

    async def _half_close_server_first(self, service, app):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        # the app sends a greeting and FIN: we get the data then END_STREAM
        self.assertEqual(await t.recv_all(), b'hello from backend\n')
        self.assertTrue(t.remote_ended)
        # our direction stays open
        await t.send(b'after-server-fin')
        await asyncio.sleep(0.1)
        await t.send(b'/more')
        await t.send_eof()
        rec = (await app.wait_records(1))[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertEqual(bytes(rec.data), b'after-server-fin/more')
        self.assertEqual(rec.close_kind, 'eof')

    async def test_half_close_server_to_client_hbone(self):
        await self._half_close_server_first('talkfirst', self.topo.apps[(14, 9003)])

    async def test_half_close_server_to_client_plain(self):
        await self._half_close_server_first('plain_talkfirst', self.topo.apps[(13, 9003)])

    async def test_client_reset_resets_hbone_upstream(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('hbone_echo'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'abc')
        self.assertEqual(await t.recv_exactly(3), b'abc')
        t.reset(ErrorCodes.CANCEL)
        rec = self.topo.dest[14].records[-1]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertIsNotNone(rec.reset_received, rec)
        self.assertFalse(rec.eof_received, 'a reset must not arrive as a clean END_STREAM')
        app = self.topo.apps[(14, 9005)].records[-1]
        await asyncio.wait_for(app.done.wait(), 5)
        # the connection is still usable
        await self.echo_roundtrip(c, 'hbone_echo')

    async def test_client_reset_closes_plain_upstream(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('plain'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'abc')
        self.assertEqual(await t.recv_exactly(3), b'abc')
        t.reset(ErrorCodes.CANCEL)
        rec = self.topo.apps[(13, 9001)].records[-1]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertIn(rec.close_kind, ('reset', 'eof'))
        await self.echo_roundtrip(c, 'plain')

    async def test_upstream_stream_reset_reaches_client(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('rst_after_200'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'trigger')
        with self.assertRaises(TunnelReset):
            await t.recv_all(timeout=5)
        self.assertIsNotNone(t.reset_code)
        self.assertNotEqual(t.reset_code, CONNECTION_LOST, 'the whole connection died')
        await self.echo_roundtrip(c, 'plain')

    async def test_upstream_tcp_reset_reaches_client_hbone(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('abort'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'x')
        with self.assertRaises(TunnelReset):
            await t.recv_all(timeout=5)
        self.assertNotEqual(t.reset_code, CONNECTION_LOST)
        await self.echo_roundtrip(c, 'plain')

    async def test_upstream_tcp_reset_reaches_client_plain(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('plain_abort'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send(b'x')
        with self.assertRaises(TunnelReset):
            await t.recv_all(timeout=5)
        self.assertNotEqual(t.reset_code, CONNECTION_LOST)
        await self.echo_roundtrip(c, 'plain')

    async def test_download_from_plain_source(self):
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('plain_source'))
        self.assertEqual((await t.wait_response()).status, 200)
        await t.send_eof()
        h = hashlib.sha256()
        n = 0
        while True:
            chunk = await t.recv(timeout=10)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
        self.assertEqual(n, Topology.SOURCE_BYTES)
        self.assertEqual(h.hexdigest(),
                         Pattern.digest(Topology.SOURCE_SEED, Topology.SOURCE_BYTES))

    async def test_multiplexed_tunnels_on_one_connection(self):
        c = await self.wp_client()
        services = ['echo', 'plain', 'hbone_echo']

        async def one(i):
            payload = os.urandom(1000 + i * 37)
            t = c.open_tunnel(self.topo.authority(services[i % 3]))
            r = await t.wait_response()
            self.assertEqual(r.status, 200)
            await t.send(payload[:500])
            await asyncio.sleep(0.01)
            await t.send(payload[500:])
            await t.send_eof()
            return (await t.recv_all()) == payload
        results = await asyncio.gather(*[one(i) for i in range(30)])
        self.assertTrue(all(results))


if __name__ == '__main__':
    require_waypoint()
    main()
