#!/usr/bin/python3
"""Drain on SIGTERM: with 100 tunnels open and traffic flowing, the waypoint turns unready,
refuses new connections, sends GOAWAY, lets every open tunnel finish its exchange, and exits 0
within the drain period; pilot-agent's EXIT_ON_ZERO_ACTIVE_CONNECTIONS / MINIMUM_DRAIN_DURATION
semantics are honoured."""

import asyncio
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403


def allow_streams_after_goaway():
    """python3-h2 4.1 closes its connection state machine on GOAWAY; RFC 9113 §6.8 says the
    streams the peer accepted go on (ztunnel keeps them): let our stand-in do the same."""
    sm = h2.connection.H2ConnectionStateMachine
    closed = h2.connection.ConnectionState.CLOSED
    for inp in h2.connection.ConnectionInputs:
        sm._transitions.setdefault((closed, inp), (None, closed))


allow_streams_after_goaway()


class DrainTest(WaypointTestCase):

    def start_wp(self, args, env=None):
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            return self.extra_waypoint(args)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def exited(self, wp, rc):
        """The test stopped wp itself: check the exit and take it off the teardown list."""
        self.assertEqual(rc, 0, wp.tail())
        self.assertIsNone(wp.sanitizer_report(), wp.tail(100))
        wp.returncode = rc
        wp.log.close()
        wp.proc = None

    def ready(self, wp):
        try:
            return wp.admin_get('/ready', timeout=2)[0]
        except OSError:
            return None

    async def test_sigterm_with_100_open_tunnels(self):
        wp = self.start_wp(['--drain-ms', '8000'])
        clients = [await self.wp_client(wp) for _ in range(10)]
        tunnels = []
        for i in range(100):
            t, r = await clients[i % 10].connect_tunnel(self.topo.authority('echo'))
            self.assertEqual(r.status, 200)
            await t.send(b'before-%d' % i)
            self.assertEqual(await t.recv_exactly(len(b'before-%d' % i)), b'before-%d' % i)
            tunnels.append(t)
        start = time.monotonic()
        wp.proc.send_signal(signal.SIGTERM)
        # readiness fails as soon as draining starts
        deadline = time.monotonic() + 3
        while self.ready(wp) == 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertNotEqual(self.ready(wp), 200)
        # every connection is told to go away, new connections are refused
        for c in clients:
            for _ in range(40):
                if c.goaway is not None:
                    break
                await asyncio.sleep(0.05)
            self.assertIsNotNone(c.goaway, 'no GOAWAY on an open connection')
            self.assertEqual(c.goaway[0], 0)  # NO_ERROR: graceful
        with self.assertRaises(OSError):
            s = socket.create_connection(split_addr(wp.hbone_addr), timeout=2)
            s.close()
        # the tunnels in flight finish their exchange untouched
        for i, t in enumerate(tunnels):
            await t.send(b'after-%d' % i)
            self.assertEqual(await t.recv_exactly(len(b'after-%d' % i)), b'after-%d' % i)
            await t.send_eof()
            self.assertEqual(await t.recv_all(), b'')
        # then the process leaves (nothing open any more), well within the drain period
        rc = await asyncio.to_thread(wp.proc.wait, 10)
        self.assertLess(time.monotonic() - start, 8)
        self.exited(wp, rc)

    async def test_exit_on_zero_false_waits_the_whole_drain_period(self):
        wp = self.start_wp(['--drain-ms', '2500'], {'EXIT_ON_ZERO_ACTIVE_CONNECTIONS': 'false'})
        start = time.monotonic()
        wp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(wp.proc.wait, 10)
        self.assertGreaterEqual(time.monotonic() - start, 2.4)
        self.exited(wp, rc)

    async def test_minimum_drain_duration_is_honoured(self):
        wp = self.start_wp(['--drain-ms', '6000'], {'MINIMUM_DRAIN_DURATION': '1500ms'})
        start = time.monotonic()
        wp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(wp.proc.wait, 10)
        self.assertGreaterEqual(time.monotonic() - start, 1.4)
        self.assertLess(time.monotonic() - start, 5)
        self.exited(wp, rc)

    async def test_drain_deadline_closes_what_is_left(self):
        wp = self.start_wp(['--drain-ms', '1000'])
        c = await self.wp_client(wp)
        t, r = await c.connect_tunnel(self.topo.authority('echo'))
        self.assertEqual(r.status, 200)
        start = time.monotonic()
        wp.proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(wp.proc.wait, 10)
        self.assertLess(time.monotonic() - start, 4)
        self.exited(wp, rc)


if __name__ == '__main__':
    unittest.main(verbosity=2)
