#!/usr/bin/python3
"""Hostile and broken peers. Each case asserts the precise outcome and then that the waypoint
still serves a good tunnel on a fresh connection."""

import asyncio
import os
import socket
import ssl
import sys
import time

import collections
import h2.settings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

CONNECT_TIMEOUT_MS = 1500
HANDSHAKE_TIMEOUT_MS = 1500


class NegativeTest(WaypointTestCase):
    waypoint_args = ['--connect-timeout-ms', str(CONNECT_TIMEOUT_MS),
                     '--handshake-timeout-ms', str(HANDSHAKE_TIMEOUT_MS)]
    config_kw = {'connect_timeout': '%gs' % (CONNECT_TIMEOUT_MS / 1000)}

    async def asyncTearDown(self):
        await self.assert_serves_good_tunnel()
        await super().asyncTearDown()

    # --- TLS

    async def _assert_tls_refused(self, ctx, expect_handshake_failure=False):
        res = await asyncio.to_thread(tls_probe, self.wp.hbone_addr, ctx)
        self.assertFalse(res['h2'], 'waypoint accepted the session: %r' % res)
        self.assertIsNotNone(res['error'], res)
        if expect_handshake_failure:
            self.assertFalse(res['handshake'], res)
        # the same through the asyncio client
        with self.assertRaises(SessionFailed):
            c = await HboneClient.connect(self.wp.hbone_addr, ssl_context=ctx, timeout=5)
            c.close()
        return res

    async def test_tls_accepts_good_client(self):
        res = await asyncio.to_thread(tls_probe, self.wp.hbone_addr, client_ssl_context())
        self.assertTrue(res['h2'], res)
        self.assertEqual(res['alpn'], 'h2')
        self.assertEqual(res['version'], 'TLSv1.3')

    async def test_tls_rejects_missing_client_cert(self):
        await self._assert_tls_refused(client_ssl_context(cert=None))

    async def test_tls_rejects_cert_from_other_root(self):
        await self._assert_tls_refused(client_ssl_context(cert='foreign-client'))

    async def test_tls_rejects_other_trust_domain(self):
        await self._assert_tls_refused(client_ssl_context(cert='other-td-client'))

    async def test_tls_rejects_expired_client_cert(self):
        await self._assert_tls_refused(client_ssl_context(cert='expired-client'))

    async def test_tls_rejects_client_cert_without_uri_san(self):
        await self._assert_tls_refused(client_ssl_context(cert='no-san-client'))

    async def test_tls_rejects_tls12(self):
        await self._assert_tls_refused(client_ssl_context(min_version=ssl.TLSVersion.TLSv1_2,
                                                          max_version=ssl.TLSVersion.TLSv1_2),
                                       expect_handshake_failure=True)

    async def test_tls_rejects_alpn_other_than_h2(self):
        await self._assert_tls_refused(client_ssl_context(alpn=('http/1.1',)),
                                       expect_handshake_failure=True)

    # --- handshake timing and garbage

    async def test_silent_peer_closed_after_handshake_timeout(self):
        dt, got, how = await asyncio.to_thread(raw_probe, self.wp.hbone_addr, b'', 10)
        self.assertIn(how, ('eof', 'reset'), 'silent peer never closed (%.1fs)' % dt)
        self.assertGreater(dt, HANDSHAKE_TIMEOUT_MS / 1000 * 0.6)
        self.assertLess(dt, HANDSHAKE_TIMEOUT_MS / 1000 + 3)

    async def test_partial_client_hello_closed_after_handshake_timeout(self):
        hello = client_hello_bytes()
        dt, got, how = await asyncio.to_thread(raw_probe, self.wp.hbone_addr, hello[:40], 10)
        self.assertIn(how, ('eof', 'reset'), 'partial ClientHello never closed (%.1fs)' % dt)
        self.assertGreater(dt, HANDSHAKE_TIMEOUT_MS / 1000 * 0.6)
        self.assertLess(dt, HANDSHAKE_TIMEOUT_MS / 1000 + 3)

    async def test_garbage_instead_of_client_hello_closed_at_once(self):
        dt, got, how = await asyncio.to_thread(
            raw_probe, self.wp.hbone_addr, b'GET / HTTP/1.1\r\nHost: x\r\n\r\n' * 4, 10)
        self.assertIn(how, ('eof', 'reset'))
        self.assertLess(dt, HANDSHAKE_TIMEOUT_MS / 1000 * 0.6, 'garbage not rejected at once')
        # nothing but (at most) a TLS alert record comes back
        if got:
            self.assertEqual(got[0], 0x15, got[:16])

    async def test_garbage_instead_of_http2_preface(self):
        def probe():
            ip, port = split_addr(self.wp.hbone_addr)
            raw = socket.create_connection((ip, port), timeout=5)
            s = client_ssl_context().wrap_socket(raw)
            t0 = time.monotonic()
            s.sendall(b'GET / HTTP/1.1\r\nHost: x\r\n\r\n')
            got = b''
            try:
                while time.monotonic() - t0 < 5:
                    d = s.recv(65536)
                    if not d:
                        return time.monotonic() - t0, got, 'eof'
                    got += d
            except (ssl.SSLError, OSError) as e:
                return time.monotonic() - t0, got, repr(e)
            finally:
                s.close()
            return time.monotonic() - t0, got, 'timeout'
        dt, got, how = await asyncio.to_thread(probe)
        self.assertNotEqual(how, 'timeout', 'connection with a bad preface stayed open')
        self.assertNotIn(b'HTTP/1.1 200', got)

    # --- HTTP/2 request shape

    async def test_non_connect_method_is_405(self):
        c = await self.wp_client()
        t = c.open_tunnel(None, pseudo=[(':method', 'GET'), (':scheme', 'https'), (':path', '/'),
                                        (':authority', self.topo.authority('plain'))],
                          end_stream=True)
        r = await t.wait_response()
        self.assertEqual(r.status, 405, r)
        await self.echo_roundtrip(c, 'plain')  # same connection still works

    async def test_protocol_pseudo_header_rejected(self):
        c = await self.wp_client()
        t = c.open_tunnel(None, pseudo=[(':method', 'CONNECT'), (':protocol', 'websocket'),
                                        (':scheme', 'https'), (':path', '/'),
                                        (':authority', self.topo.authority('plain'))])
        try:
            r = await t.wait_response()
            self.assertEqual(r.status, 400, r)
        except TunnelReset as e:
            self.assertEqual(e.code, ErrorCodes.PROTOCOL_ERROR)
            self.assertFalse(t.refused_by_goaway)
        self.assertIsNone(c.goaway)
        self.assertFalse(c.closed)
        await self.echo_roundtrip(c, 'plain')

    async def test_missing_authority_rejected(self):
        c = await self.wp_client()
        t = c.open_tunnel(None, pseudo=[(':method', 'CONNECT')])
        try:
            r = await t.wait_response()
            self.assertEqual(r.status, 400, r)
        except TunnelReset as e:
            self.assertEqual(e.code, ErrorCodes.PROTOCOL_ERROR)
            self.assertFalse(t.refused_by_goaway)
        self.assertIsNone(c.goaway)
        self.assertFalse(c.closed)
        await self.echo_roundtrip(c, 'plain')

    async def test_malformed_authority_is_400(self):
        c = await self.wp_client()
        vip = self.topo.services['plain'].vip
        for bad in [vip, vip + ':', vip + ':99999', vip + ':0', vip + ':abc', vip + ':80:80',
                    '300.1.1.1:80', '[::1:80', ':9001', '1.2.3:9001']:
            t = c.open_tunnel(bad)
            r = await t.wait_response()
            self.assertEqual(r.status, 400, (bad, r))
        await self.echo_roundtrip(c, 'plain')

    # --- dispatch and upstream failures

    async def _expect_status(self, authority, status, reason):
        c = await self.wp_client()
        t0 = time.monotonic()
        t = c.open_tunnel(authority)
        r = await t.wait_response(timeout=15)
        dt = time.monotonic() - t0
        self.assertEqual(r.status, status, r)
        self.assertEqual(r.headers.get('x-waypoint-error'), reason, r)
        await self.echo_roundtrip(c, 'plain')
        return dt

    async def test_target_not_served_is_404(self):
        await self._expect_status(self.topo.ip(250) + ':9001', 404, 'target_not_served')
        # a served VIP on a port it does not serve
        await self._expect_status(self.topo.services['plain'].vip + ':9999', 404,
                                  'target_not_served')

    async def test_no_healthy_endpoint_is_503(self):
        await self._expect_status(self.topo.authority('empty'), 503, 'no_healthy_endpoint')

    async def test_upstream_refused_is_502(self):
        await self._expect_status(self.topo.authority('refused'), 502, 'upstream_refused')

    async def test_hbone_upstream_refused_is_502(self):
        await self._expect_status(self.topo.authority('refused_hbone'), 502, 'upstream_refused')

    async def test_upstream_non_200_is_502(self):
        await self._expect_status(self.topo.authority('status503'), 502, 'upstream_status_503')
        recs = self.topo.dest[17].records
        self.assertEqual(len(recs), 1)
        self.assertEqual(recs[0].status_sent, 503)

    async def test_upstream_never_answering_is_504(self):
        dt = await self._expect_status(self.topo.authority('hang'), 504, 'upstream_timeout')
        self.assertGreater(dt, CONNECT_TIMEOUT_MS / 1000 * 0.8)
        self.assertLess(dt, CONNECT_TIMEOUT_MS / 1000 + 3)
        # the waypoint gave up on the upstream stream too
        rec = self.topo.dest[18].records[0]
        await asyncio.wait_for(rec.done.wait(), 5)
        self.assertIsNotNone(rec.reset_received)

    # --- abuse

    async def test_stream_limit_exceeded_is_a_connection_error(self):
        # RFC 9113 §5.1.2 allows REFUSED_STREAM or PROTOCOL_ERROR as a *stream* error; nghttp2
        # (1.52, what the waypoint runs on) treats a HEADERS beyond the acknowledged
        # SETTINGS_MAX_CONCURRENT_STREAMS as a connection error: GOAWAY PROTOCOL_ERROR. Only a
        # peer that ignores our SETTINGS gets there (ztunnel honours them). Assert exactly that,
        # and that the waypoint keeps serving new connections.
        wp = self.extra_waypoint(self.waypoint_args + ['--max-concurrent-streams', '5'])
        c = await self.wp_client(wp)
        self.assertEqual(c.peer_max_concurrent_streams(), 5)
        open_tunnels = []
        for i in range(5):
            t = c.open_tunnel(self.topo.authority('plain'))
            self.assertEqual((await t.wait_response()).status, 200)
            open_tunnels.append(t)
        sixth = c.open_tunnel(self.topo.authority('plain'), ignore_stream_limit=True)
        with self.assertRaises(TunnelReset):
            await sixth.wait_response()
        self.assertTrue(sixth.refused_by_goaway)
        self.assertIsNotNone(c.goaway)
        self.assertEqual(c.goaway[0], ErrorCodes.PROTOCOL_ERROR)
        # the streams the GOAWAY covers were processed; the sixth was not
        self.assertLess(c.goaway[1], sixth.stream_id)
        await self.assert_serves_good_tunnel(wp)

    async def test_rst_flood_gets_goaway_enhance_your_calm(self):
        c = await self.wp_client()
        authority = self.topo.authority('hang')
        # one burst (HTTP/2 "rapid reset"): 1000 x (HEADERS + RST_STREAM) in a single write,
        # then we only read, so the waypoint's GOAWAY cannot be lost to a TCP RST caused by
        # our own writes after its close
        conn = c.conn
        key = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
        for i in range(1000):
            sid = conn.get_next_available_stream_id()
            t = Tunnel(c.ep, sid)
            c.ep.streams[sid] = t
            conn.remote_settings._settings[key] = collections.deque([2 ** 31 - 1])
            conn.send_headers(sid, [(':method', 'CONNECT'), (':authority', authority)])
            conn.reset_stream(sid, ErrorCodes.CANCEL)
        c.ep.flush()
        try:
            await c.wait_closed(timeout=10)
        except asyncio.TimeoutError:
            pass
        self.assertIsNotNone(c.goaway, 'no GOAWAY after 1000 open+reset streams (connection %s, '
                             '%r)' % ('closed' if c.closed else 'open', c.ep.close_exc))
        self.assertEqual(c.goaway[0], ErrorCodes.ENHANCE_YOUR_CALM, c.goaway)


if __name__ == '__main__':
    require_waypoint()
    main()
