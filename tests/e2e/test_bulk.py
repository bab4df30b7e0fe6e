#!/usr/bin/python3
"""Volume through the waypoint: 1 GiB in one tunnel with SHA-256 at both ends, 1000 concurrent
tunnels over 10 connections, and bounded memory behind a slow reader (flow control end to end)."""

import asyncio
import hashlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

GIB = 1024 * MiB


class BulkTest(WaypointTestCase):

    async def test_one_gib_through_one_tunnel(self):
        total = int(os.environ.get('WP_E2E_BULK_BYTES', GIB))
        c = await self.wp_client()
        t = c.open_tunnel(self.topo.authority('sink'))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        h = hashlib.sha256()
        t0 = time.monotonic()
        for chunk in Pattern(1234).chunks(total):
            h.update(chunk)
            await t.send(chunk)
        await t.send_eof()
        # the sink ends its side after our END_STREAM arrived and everything was hashed
        self.assertEqual(await t.recv_all(timeout=60), b'')
        dt = time.monotonic() - t0
        rec = self.topo.dest[19].records[0]
        await asyncio.wait_for(rec.done.wait(), 10)
        sys.stderr.write('bulk: %d MiB in %.1fs = %.0f MiB/s\n' % (total // MiB, dt,
                                                                   total / MiB / dt))
        self.assertEqual(rec.bytes_in, total)
        self.assertEqual(rec.sha256, h.hexdigest())
        self.assertEqual(rec.peer_uri_sans, [WAYPOINT_ID])
        self.assertTrue(rec.eof_received)

    async def test_1000_concurrent_tunnels_over_10_connections(self):
        clients = [await self.wp_client() for _ in range(10)]
        per_conn = 100
        for c in clients:
            self.assertGreaterEqual(c.peer_max_concurrent_streams(), per_conn,
                                    'waypoint advertises fewer than 100 streams per connection')
        tunnels = []
        for ci, c in enumerate(clients):
            for k in range(per_conn):
                tunnels.append((ci * per_conn + k, c.open_tunnel(self.topo.authority('echo_many'))))

        async def one(i, t):
            r = await t.wait_response(timeout=30)
            self.assertEqual(r.status, 200, r)
            payload = hashlib.sha256(b'%d' % i).digest() * (32 + i % 64)
            await t.send(payload)
            await t.send_eof()
            got = await t.recv_all(timeout=30)
            return got == payload
        t0 = time.monotonic()
        results = await asyncio.gather(*[one(i, t) for i, t in tunnels])
        sys.stderr.write('bulk: 1000 tunnels in %.1fs\n' % (time.monotonic() - t0))
        self.assertEqual(sum(1 for x in results if x), 1000)
        recs = self.topo.dest[23].records + self.topo.dest[24].records
        self.assertEqual(len(recs), 1000)
        self.assertEqual(len(set(r.authority for r in recs)), 2)
        # round robin (or least-request with equal load): close to an even split
        self.assertGreaterEqual(len(self.topo.dest[23].records), 400)
        self.assertGreaterEqual(len(self.topo.dest[24].records), 400)
        for c in clients:
            c.close()
        await self.assert_serves_good_tunnel()

    async def test_slow_reader_bounds_memory_and_stalls_sender(self):
        c = await self.wp_client()
        # warm up (first connection, TLS, upstream pool) before the baseline
        await self.echo_roundtrip(c, 'echo')
        await asyncio.sleep(0.2)
        base = self.wp.rss_bytes()
        t = c.open_tunnel(self.topo.authority('slow'))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        block = os.urandom(MiB)
        push_limit = 200 * MiB

        async def pusher():
            while t.bytes_sent < push_limit:
                await t.send(block)
        task = asyncio.ensure_future(pusher())
        peak = base
        duration = float(os.environ.get('WP_E2E_SLOW_SECONDS', '8'))
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline and not task.done():
            peak = max(peak, self.wp.rss_bytes())
            await asyncio.sleep(0.2)
        self.assertFalse(task.done(), 'sender finished or failed: %r' %
                         (task.exception() if task.done() else None))
        sent = t.bytes_sent
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        rec = self.topo.dest[22].records[0]
        growth = peak - base
        sys.stderr.write('slow reader: sent %.1f MiB, reader got %.1f MiB, RSS growth %.1f MiB\n'
                         % (sent / MiB, rec.bytes_in / MiB, growth / MiB))
        # flow control reached the client: its window hit 0 and it could not push everything
        self.assertTrue(t.window_zero_seen, 'the client never saw a zero send window')
        self.assertLess(sent, 64 * MiB, 'waypoint accepted %d bytes for a 64 KiB/s reader' % sent)
        self.assertLess(growth, 64 * MiB, 'waypoint RSS grew by %d bytes' % growth)
        # what is buffered between us and the reader is bounded by windows, not by what we sent
        self.assertLess(sent - rec.bytes_in, 48 * MiB)
        t.reset(ErrorCodes.CANCEL)
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertIsNotNone(rec.reset_received)
        await self.assert_serves_good_tunnel()


if __name__ == '__main__':
    require_waypoint()
    main()
