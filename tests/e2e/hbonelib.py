#!/usr/bin/python3
"""End-to-end harness for the waypoint: independent HBONE peers and test fixtures.

Everything here is written against the HBONE contract (TLS 1.3 mTLS, ALPN h2, HTTP/2 CONNECT with
:authority = ip:port) with python3-h2 and Python's ssl module, so the waypoint is checked against an
implementation that shares no code with it:

  HboneClient    the source ztunnel stand-in: one TLS+h2 connection, many tunnels (asyncio).
  HboneServer    the destination ztunnel stand-in: accepts CONNECT, records the peer identity, and
                 forwards to the authority's ip:port ("forward"), or echoes, sinks, answers a status,
                 resets or never answers.
  Backend        plain TCP apps: echo, sha256 sink, source, reply-after-EOF, talk-first, abort.
  Waypoint       the daemon under test ($WAYPOINT_BIN) as a subprocess with its stderr in a file.
  make_config    the istiod-shaped resource file for the daemon (--config-file).
  block_for      a private 127.x.y.0/24 per test so tests can run in parallel.

Only the Python standard library, h2 (with hpack/hyperframe) and cryptography (through
tests/tools/mkpki.py) are used. Run with /usr/bin/python3 (the Debian python that has python3-h2).
"""

import asyncio
import collections
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.request

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS_DIR = os.path.dirname(HERE)
MKPKI = os.path.join(TESTS_DIR, 'tools', 'mkpki.py')

TRUST_DOMAIN = 'cluster.local'
WAYPOINT_ID = 'spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint'
CLIENT_ID = 'spiffe://cluster.local/ns/default/sa/sleep'
DEST_ID = 'spiffe://cluster.local/ns/bookinfo/sa/reviews'

try:
    _soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if _soft < min(_hard, 16384):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(_hard, 16384), _hard))
except (ValueError, OSError):
    pass

KiB = 1024
MiB = 1024 * 1024

# ztunnel's HTTP/2 settings (ISTIO-CONTRACT.md 1.5).
ZT_STREAM_WINDOW = 4 * MiB
ZT_CONN_WINDOW = 16 * MiB
ZT_MAX_FRAME = 1 * MiB

ErrorCodes = h2.errors.ErrorCodes
CONNECTION_LOST = -1  # Tunnel.reset_code when the whole connection went away


class TunnelReset(Exception):
    """The tunnel's stream was reset (code = RST_STREAM error code, or CONNECTION_LOST)."""

    def __init__(self, code, where=''):
        super().__init__('stream reset (%s)%s' % (code_name(code), where))
        self.code = code


class SessionFailed(Exception):
    """No HTTP/2 session could be established (TLS or preface failure)."""


def code_name(code):
    if code == CONNECTION_LOST:
        return 'CONNECTION_LOST'
    try:
        return ErrorCodes(code).name
    except (ValueError, TypeError):
        return str(code)


# ------------------------------------------------------------------------------------------------
# Addresses

def block_for(name):
    """A private 127.x.y.0/24 block (returned as '127.x.y') for a test, from its name and our pid.

    x stays in 32..199 so it never meets 127.0.0.0/16 (other helpers' daemons) nor the fixture's
    127.200.0.0/16 addresses."""
    h = hashlib.sha256(('%s:%d' % (name, os.getpid())).encode()).digest()
    return '127.%d.%d' % (32 + h[0] % 168, h[1])


def port_is_free(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((ip, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


# ------------------------------------------------------------------------------------------------
# PKI

_PKI_DIR = None


def pki_dir():
    """The process-wide test PKI (tests/tools/mkpki.py output), generated once per process."""
    global _PKI_DIR
    if _PKI_DIR is None:
        d = tempfile.mkdtemp(prefix='wp-e2e-pki-')
        subprocess.run(['/usr/bin/python3', MKPKI, d], check=True)
        _PKI_DIR = d
    return _PKI_DIR


def pki_path(name):
    return os.path.join(pki_dir(), name)


def client_ssl_context(cert='client', root='root', alpn=('h2',), min_version=ssl.TLSVersion.TLSv1_3,
                       max_version=ssl.TLSVersion.TLSv1_3, verify=True):
    """TLS context of a ztunnel-like client: TLS 1.3, ALPN h2, client cert, no SNI, root CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki_path(root + '.pem'))
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = min_version
    ctx.maximum_version = max_version
    if cert:
        ctx.load_cert_chain(pki_path(cert + '.pem'), pki_path(cert + '.key'))
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_ssl_context(cert='dest', root='root', alpn=('h2',), require_client_cert=True):
    """TLS context of a ztunnel-like server (destination stand-in): TLS 1.3, ALPN h2, mTLS."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(pki_path(cert + '.pem'), pki_path(cert + '.key'))
    ctx.load_verify_locations(pki_path(root + '.pem'))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def uri_sans(peercert):
    """The URI SANs of a certificate dict from SSLObject.getpeercert()."""
    if not peercert:
        return []
    return [v for (k, v) in peercert.get('subjectAltName', ()) if k == 'URI']


def client_hello_bytes():
    """The bytes of a real TLS 1.3 ClientHello (for partial-handshake tests)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(['h2'])
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_side=False)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return out.read()


# ------------------------------------------------------------------------------------------------
# Deterministic bulk data

class Pattern:
    """Deterministic pseudo-random stream: a 1 MiB random block (seeded), each copy prefixed
    with its 8-byte counter so that reordered or duplicated blocks change the hash."""

    def __init__(self, seed, block=1 * MiB):
        self.block = bytearray(random.Random(seed).randbytes(block))
        self.index = 0

    def next_block(self):
        self.block[0:8] = self.index.to_bytes(8, 'big')
        self.index += 1
        return bytes(self.block)

    def chunks(self, total):
        left = total
        while left > 0:
            b = self.next_block()
            if len(b) > left:
                b = b[:left]
            left -= len(b)
            yield b

    @staticmethod
    def digest(seed, total, block=1 * MiB):
        h = hashlib.sha256()
        for c in Pattern(seed, block).chunks(total):
            h.update(c)
        return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# HTTP/2 endpoint shared by the client and the server stand-ins

class Response:
    def __init__(self, headers):
        self.headers = {}
        for k, v in headers:
            self.headers[k.lower()] = v
        self.status = int(self.headers.get(':status', '0'))

    def __repr__(self):
        return 'Response(%d, %r)' % (self.status, self.headers)


class Tunnel:
    """One HTTP/2 stream used as a byte tunnel. Flow control is honest: received bytes are handed
    back to the peer (WINDOW_UPDATE) only once the application consumed them with recv()."""

    def __init__(self, ep, stream_id, request_headers=None):
        self.ep = ep
        self.stream_id = stream_id
        self.request_headers = request_headers  # list of (name, value), server side
        self.response = ep.loop.create_future()  # Response, client side
        self.rbuf = bytearray()
        self.remote_ended = False
        self.local_ended = False
        self.reset_code = None  # set when the peer reset the stream (or connection lost)
        self.local_reset_code = None
        self.trailers = None
        self.bytes_received = 0
        self.bytes_sent = 0
        self.window_zero_seen = False
        self.refused_by_goaway = False
        self.discarded = 0
        self.ended_event = asyncio.Event()  # remote END_STREAM or reset
        self._readable = asyncio.Event()

    # --- events from the endpoint

    def _on_headers(self, headers):
        if not self.response.done():
            self.response.set_result(Response(headers))
        else:
            self.trailers = headers

    def _on_data(self, data, flow_len):
        pad = flow_len - len(data)
        if pad:
            self.ep._ack(pad, self.stream_id)
        self.rbuf += data
        self.bytes_received += len(data)
        self._readable.set()

    def _on_end(self):
        self.remote_ended = True
        self._readable.set()
        self.ended_event.set()

    def _on_reset(self, code):
        if self.reset_code is None:
            self.reset_code = code
        if self.rbuf:  # RST_STREAM aborts: unread data is dropped (and its window returned)
            self.discarded = len(self.rbuf)
            self.ep._ack(len(self.rbuf), self.stream_id)
            self.rbuf.clear()
        if not self.response.done():
            self.response.set_exception(TunnelReset(code, ' before response'))
            self.response.exception()  # mark retrieved
        self._readable.set()
        self.ended_event.set()

    # --- application API

    @property
    def closed(self):
        return self.reset_code is not None or self.local_reset_code is not None or \
            (self.remote_ended and self.local_ended)

    async def wait_response(self, timeout=10):
        """The response (status + headers). Raises TunnelReset if the stream was reset first,
        asyncio.TimeoutError if nothing came."""
        return await asyncio.wait_for(asyncio.shield(self.response), timeout)

    async def send(self, data):
        """Sends all of data, waiting for flow-control window and socket drain."""
        view = memoryview(data)
        conn = self.ep.conn
        while len(view):
            if self.reset_code is not None:
                raise TunnelReset(self.reset_code, ' while sending')
            if self.ep.closed:
                raise TunnelReset(CONNECTION_LOST, ' while sending')
            try:
                win = conn.local_flow_control_window(self.stream_id)
            except h2.exceptions.StreamClosedError:
                raise TunnelReset(self.reset_code if self.reset_code is not None
                                  else CONNECTION_LOST, ' (stream closed)')
            if win <= 0:
                self.window_zero_seen = True
                await self.ep._wait_window()
                continue
            n = min(len(view), win, conn.max_outbound_frame_size)
            try:
                conn.send_data(self.stream_id, bytes(view[:n]))
            except h2.exceptions.ProtocolError as e:
                raise TunnelReset(self.reset_code if self.reset_code is not None
                                  else CONNECTION_LOST, ' (h2: %s)' % e)
            self.bytes_sent += n
            view = view[n:]
            self.ep.flush()
            await self.ep.drain()

    async def send_eof(self):
        """Half-close: END_STREAM (empty DATA frame)."""
        if self.reset_code is not None:
            raise TunnelReset(self.reset_code, ' at send_eof')
        try:
            self.ep.conn.end_stream(self.stream_id)
        except h2.exceptions.ProtocolError as e:
            raise TunnelReset(self.reset_code if self.reset_code is not None
                              else CONNECTION_LOST, ' (h2: %s)' % e)
        self.local_ended = True
        self.ep.flush()
        await self.ep.drain()

    def reset(self, code=ErrorCodes.CANCEL):
        """Sends RST_STREAM."""
        if self.reset_code is not None or self.local_reset_code is not None or self.ep.closed:
            return
        try:
            self.ep.conn.reset_stream(self.stream_id, code)
        except h2.exceptions.ProtocolError:  # includes StreamClosedError
            return
        self.local_reset_code = code
        if self.rbuf:
            self.ep._ack(len(self.rbuf), self.stream_id)
            self.rbuf.clear()
        self.ep.flush()

    def respond(self, status, headers=(), end_stream=False):
        """Server side: sends the response headers."""
        hdrs = [(':status', str(status))] + list(headers)
        self.ep.conn.send_headers(self.stream_id, hdrs, end_stream=end_stream)
        if end_stream:
            self.local_ended = True
        self.ep.flush()

    async def recv(self, max_bytes=256 * KiB, timeout=None):
        """Up to max_bytes; b'' at END_STREAM. Raises TunnelReset once the stream was reset."""
        while not self.rbuf:
            if self.reset_code is not None:
                raise TunnelReset(self.reset_code, ' while receiving')
            if self.remote_ended:
                return b''
            self._readable.clear()
            if timeout is None:
                await self._readable.wait()
            else:
                await asyncio.wait_for(self._readable.wait(), timeout)
        n = min(max_bytes, len(self.rbuf))
        out = bytes(self.rbuf[:n])
        del self.rbuf[:n]
        self.ep._ack(n, self.stream_id)
        return out

    async def recv_exactly(self, n, timeout=10):
        out = bytearray()
        deadline = time.monotonic() + timeout
        while len(out) < n:
            chunk = await self.recv(n - len(out), timeout=max(0.01, deadline - time.monotonic()))
            if not chunk:
                raise EOFError('END_STREAM after %d of %d bytes' % (len(out), n))
            out += chunk
        return bytes(out)

    async def recv_all(self, timeout=10):
        """Everything until END_STREAM."""
        out = bytearray()
        deadline = time.monotonic() + timeout
        while True:
            chunk = await self.recv(timeout=max(0.01, deadline - time.monotonic()))
            if not chunk:
                return bytes(out)
            out += chunk

    async def wait_closed(self, timeout=5):
        """Waits for the remote END_STREAM or reset."""
        await asyncio.wait_for(self.ended_event.wait(), timeout)


class H2Endpoint(asyncio.Protocol):
    """asyncio protocol wrapping one h2 connection over TLS (client or server side)."""

    def __init__(self, client_side, on_request=None, settings=None, conn_window=ZT_CONN_WINDOW,
                 validate_inbound=True):
        self.loop = asyncio.get_running_loop()
        cfg = h2.config.H2Configuration(client_side=client_side, header_encoding='utf-8',
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=validate_inbound)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.client_side = client_side
        self.on_request = on_request
        self.settings = settings if settings is not None else {}
        self.conn_window = conn_window
        self.streams = {}
        self.transport = None
        self.closed = False
        self.close_exc = None
        self.goaway = None  # (error_code, last_stream_id, additional_data) when received
        self.protocol_error = None
        self.peer_cert = None
        self.peer_uri_sans = []
        self.alpn = None
        self.tls_version = None
        self.peer_addr = None
        self.remote_settings_event = asyncio.Event()
        self.settings_acked_event = asyncio.Event()
        self.closed_event = asyncio.Event()
        self._window_waiters = []
        self._drain_waiter = None
        self._paused = False
        self._ping_waiters = {}
        self.frames_in = 0

    # --- asyncio.Protocol

    def connection_made(self, transport):
        self.transport = transport
        sslobj = transport.get_extra_info('ssl_object')
        if sslobj is not None:
            self.peer_cert = sslobj.getpeercert()
            self.peer_uri_sans = uri_sans(self.peer_cert)
            self.alpn = sslobj.selected_alpn_protocol()
            self.tls_version = sslobj.version()
        self.peer_addr = transport.get_extra_info('peername')
        transport.set_write_buffer_limits(high=2 * MiB)
        self.conn.initiate_connection()
        if self.settings:
            self.conn.update_settings(self.settings)
        if self.conn_window > 65535:
            self.conn.increment_flow_control_window(self.conn_window - 65535)
        self.flush()

    def data_received(self, data):
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self.protocol_error = e
            self.flush()
            self.transport.close()
            return
        for ev in events:
            self.frames_in += 1
            self._dispatch(ev)
        self.flush()

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.close_exc = exc
        for t in list(self.streams.values()):
            if not t.remote_ended or not t.response.done():
                t._on_reset(CONNECTION_LOST)
        self._wake_windows()
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)
        for f in self._ping_waiters.values():
            if not f.done():
                f.set_exception(ConnectionError('connection lost'))
        self.closed_event.set()

    def pause_writing(self):
        self._paused = True

    def resume_writing(self):
        self._paused = False
        if self._drain_waiter and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # --- internals

    def _dispatch(self, ev):
        E = h2.events
        if isinstance(ev, E.RequestReceived):
            t = Tunnel(self, ev.stream_id, request_headers=list(ev.headers))
            self.streams[ev.stream_id] = t
            if self.on_request:
                self.on_request(t)
            else:
                t.reset(ErrorCodes.REFUSED_STREAM)
        elif isinstance(ev, (E.ResponseReceived, E.TrailersReceived)):
            t = self.streams.get(ev.stream_id)
            if t:
                t._on_headers(list(ev.headers))
        elif isinstance(ev, E.InformationalResponseReceived):
            pass
        elif isinstance(ev, E.DataReceived):
            t = self.streams.get(ev.stream_id)
            if t and t.local_reset_code is None:
                t._on_data(ev.data, ev.flow_controlled_length)
            else:
                self._ack(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, E.StreamEnded):
            t = self.streams.get(ev.stream_id)
            if t:
                t._on_end()
        elif isinstance(ev, E.StreamReset):
            t = self.streams.get(ev.stream_id)
            if t:
                t._on_reset(ev.error_code)
            self._wake_windows()
        elif isinstance(ev, (E.WindowUpdated, E.RemoteSettingsChanged)):
            if isinstance(ev, E.RemoteSettingsChanged):
                self.remote_settings_event.set()
            self._wake_windows()
        elif isinstance(ev, E.SettingsAcknowledged):
            self.settings_acked_event.set()
        elif isinstance(ev, E.ConnectionTerminated):
            self.goaway = (ev.error_code, ev.last_stream_id, ev.additional_data)
            for sid, t in list(self.streams.items()):
                if ev.last_stream_id is not None and sid > ev.last_stream_id and \
                        sid % 2 == (1 if self.client_side else 0):
                    t.refused_by_goaway = True
                    t._on_reset(ErrorCodes.REFUSED_STREAM)
            self._wake_windows()
        elif isinstance(ev, E.PingAckReceived):
            f = self._ping_waiters.pop(ev.ping_data, None)
            if f and not f.done():
                f.set_result(time.monotonic())

    def _ack(self, n, stream_id):
        if n <= 0 or self.closed:
            return
        try:
            self.conn.acknowledge_received_data(n, stream_id)
        except (h2.exceptions.ProtocolError, ValueError):
            pass
        self.flush()

    def _wake_windows(self):
        waiters, self._window_waiters = self._window_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    async def _wait_window(self):
        if self.closed:
            return
        f = self.loop.create_future()
        self._window_waiters.append(f)
        await f

    def flush(self):
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self):
        if self._paused and not self.closed:
            self._drain_waiter = self.loop.create_future()
            await self._drain_waiter

    # --- API

    async def wait_remote_settings(self, timeout=5):
        """Waits for the peer's SETTINGS (proof that an HTTP/2 session exists)."""
        done, _ = await asyncio.wait([asyncio.ensure_future(self.remote_settings_event.wait()),
                                      asyncio.ensure_future(self.closed_event.wait())],
                                     timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        for f in _:
            f.cancel()
        if not self.remote_settings_event.is_set():
            raise SessionFailed('no SETTINGS from peer (closed=%s exc=%r)' %
                                (self.closed, self.close_exc))

    async def ping(self, timeout=5):
        data = os.urandom(8)
        f = self.loop.create_future()
        self._ping_waiters[data] = f
        t0 = time.monotonic()
        self.conn.ping(data)
        self.flush()
        await asyncio.wait_for(f, timeout)
        return time.monotonic() - t0

    def close(self, error_code=ErrorCodes.NO_ERROR):
        if self.transport is None or self.closed:
            return
        try:
            self.conn.close_connection(error_code)
            self.flush()
        except h2.exceptions.ProtocolError:
            pass
        self.transport.close()

    def abort(self):
        if self.transport is not None:
            self.transport.abort()


# ------------------------------------------------------------------------------------------------
# Client stand-in (source ztunnel)

class HboneClient:
    """Source-side ztunnel stand-in: one mTLS + h2 connection carrying many CONNECT tunnels."""

    def __init__(self, ep):
        self.ep = ep

    @classmethod
    async def connect(cls, addr, cert='client', root='root', local_ip=None, ssl_context=None,
                      stream_window=ZT_STREAM_WINDOW, conn_window=ZT_CONN_WINDOW,
                      max_frame=ZT_MAX_FRAME, timeout=10):
        """Connects to addr ('ip:port' or (ip, port)), completes TLS and waits for the peer's
        SETTINGS. Raises SessionFailed when no HTTP/2 session comes up."""
        ip, port = split_addr(addr)
        loop = asyncio.get_running_loop()
        ctx = ssl_context or client_ssl_context(cert=cert, root=root)
        settings = {h2.settings.SettingCodes.ENABLE_PUSH: 0,
                    h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                    h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
                    h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * KiB}
        ep = H2Endpoint(True, settings=settings, conn_window=conn_window)
        try:
            await asyncio.wait_for(loop.create_connection(
                lambda: ep, ip, port, ssl=ctx, server_hostname='',
                local_addr=(local_ip, 0) if local_ip else None,
                ssl_handshake_timeout=timeout), timeout)
        except (OSError, ssl.SSLError, asyncio.TimeoutError, ConnectionError) as e:
            raise SessionFailed('connect/TLS to %s:%d failed: %r' % (ip, port, e))
        await ep.wait_remote_settings(timeout)
        return cls(ep)

    # introspection
    @property
    def conn(self):
        return self.ep.conn

    @property
    def goaway(self):
        return self.ep.goaway

    @property
    def closed(self):
        return self.ep.closed

    def peer_max_concurrent_streams(self):
        return self.ep.conn.remote_settings.max_concurrent_streams

    def open_tunnel(self, authority, extra_headers=(), method='CONNECT', pseudo=None,
                    end_stream=False, ignore_stream_limit=False):
        """Sends a CONNECT (or anything crafted: pseudo = full list of pseudo headers replacing
        the default [(':method', method), (':authority', authority)]) and returns the Tunnel.
        Call await tunnel.wait_response() for the status."""
        if self.ep.closed:
            raise TunnelReset(CONNECTION_LOST, ' (connection closed)')
        conn = self.ep.conn
        sid = conn.get_next_available_stream_id()
        if pseudo is None:
            pseudo = [(':method', method)]
            if authority is not None:
                pseudo.append((':authority', authority))
        headers = list(pseudo) + list(extra_headers)
        t = Tunnel(self.ep, sid)
        self.ep.streams[sid] = t
        if ignore_stream_limit:
            key = h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS
            saved = conn.remote_settings._settings.get(key)
            conn.remote_settings._settings[key] = collections.deque([2 ** 31 - 1])
            try:
                conn.send_headers(sid, headers, end_stream=end_stream)
            finally:
                if saved is None:
                    del conn.remote_settings._settings[key]
                else:
                    conn.remote_settings._settings[key] = saved
        else:
            conn.send_headers(sid, headers, end_stream=end_stream)
        if end_stream:
            t.local_ended = True
        self.ep.flush()
        return t

    async def connect_tunnel(self, authority, extra_headers=(), timeout=10):
        """open_tunnel + wait_response; asserts nothing, returns (tunnel, response)."""
        t = self.open_tunnel(authority, extra_headers)
        r = await t.wait_response(timeout)
        return t, r

    async def ping(self, timeout=5):
        return await self.ep.ping(timeout)

    def send_raw(self, data):
        """Writes raw bytes on the TLS connection (crafted frames)."""
        self.ep.transport.write(data)

    async def wait_closed(self, timeout=5):
        await asyncio.wait_for(self.ep.closed_event.wait(), timeout)

    def close(self):
        self.ep.close()


def split_addr(addr):
    if isinstance(addr, tuple):
        return addr
    ip, _, port = addr.rpartition(':')
    return ip, int(port)


# ------------------------------------------------------------------------------------------------
# Destination stand-in (destination ztunnel)

_record_seq = iter(range(1 << 62))


class TunnelRecord:
    """What the destination stand-in saw for one CONNECT (seq orders records globally)."""

    def __init__(self, tunnel, ep, server):
        self.seq = next(_record_seq)
        self.tunnel = tunnel
        self.authority = None
        self.method = None
        self.headers = {}
        for k, v in tunnel.request_headers:
            self.headers[k] = v
        self.authority = self.headers.get(':authority')
        self.method = self.headers.get(':method')
        self.peer_uri_sans = list(ep.peer_uri_sans)
        self.peer_addr = ep.peer_addr
        self.server = server
        self.status_sent = None
        self.bytes_in = 0
        self.sha256 = None
        self.eof_received = False
        self.reset_received = None  # RST code the stand-in received
        self.done = asyncio.Event()
        self.backend_error = None
        self.shape_error = None

    def __repr__(self):
        return 'TunnelRecord(%s %s sans=%s status=%s in=%d eof=%s rst=%s)' % (
            self.method, self.authority, self.peer_uri_sans, self.status_sent, self.bytes_in,
            self.eof_received, self.reset_received)


class HboneServer:
    """Destination ztunnel stand-in. Modes (attribute `mode`, changeable at any time):
      forward  connect to the authority's ip:port (503 if that fails), answer 200, splice
      echo     answer 200 and echo everything, END_STREAM after the peer's END_STREAM
      sink     answer 200, sha256 everything until END_STREAM, then END_STREAM
      status   answer `status` (e.g. 503) and end the stream
      reset    reset the stream (RST_STREAM `reset_code`) without answering
      reset_after_200  answer 200, then reset on the first DATA
      hang     never answer
    read_rate (bytes/s) makes echo/sink/forward read slowly (slow-reader tests)."""

    def __init__(self, ip, port=15008, cert='dest', root='root', mode='forward', status=503,
                 stream_window=ZT_STREAM_WINDOW, conn_window=ZT_CONN_WINDOW,
                 max_frame=ZT_MAX_FRAME, max_concurrent_streams=2000):
        self.ip = ip
        self.port = port
        self.cert = cert
        self.root = root
        self.mode = mode
        self.status = status
        self.reset_code = ErrorCodes.CANCEL
        self.read_rate = None
        self.records = []
        self.connections = []
        self.tasks = set()
        self.server = None
        self.new_record = asyncio.Event()
        self.settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: stream_window,
                         h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame,
                         h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                         h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * KiB}
        self.conn_window = conn_window

    async def start(self):
        ctx = server_ssl_context(cert=self.cert, root=self.root)
        loop = asyncio.get_running_loop()

        def factory():
            # h2 4.1 insists on :path/:scheme in every request, so the CONNECT shape is checked
            # by hand in _serve (strict, like hyper in ztunnel).
            ep = H2Endpoint(False, settings=self.settings, conn_window=self.conn_window,
                            validate_inbound=False)
            ep.on_request = lambda t, ep=ep: self._on_request(ep, t)
            self.connections.append(ep)
            return ep
        self.server = await loop.create_server(factory, self.ip, self.port, ssl=ctx,
                                               reuse_address=True, ssl_handshake_timeout=10)
        return self

    async def close(self):
        if self.server:
            self.server.close()
        for ep in self.connections:
            ep.abort()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.server:
            await self.server.wait_closed()

    async def wait_records(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.records) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError('%s: %d CONNECTs seen, expected %d' %
                                     (self.ip, len(self.records), n))
            self.new_record.clear()
            try:
                await asyncio.wait_for(self.new_record.wait(), left)
            except asyncio.TimeoutError:
                pass
        return self.records

    def _on_request(self, ep, tunnel):
        rec = TunnelRecord(tunnel, ep, self)
        self.records.append(rec)
        self.new_record.set()
        task = asyncio.ensure_future(self._handle(rec))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _slow(self, n):
        if self.read_rate:
            await asyncio.sleep(n / self.read_rate)

    async def _read(self, t):
        chunk = await t.recv(16 * KiB if self.read_rate else 256 * KiB)
        if chunk:
            await self._slow(len(chunk))
        return chunk

    async def _handle(self, rec):
        t = rec.tunnel
        try:
            await self._serve(rec)
        except TunnelReset as e:
            rec.reset_received = e.code
        except (h2.exceptions.ProtocolError, ConnectionError) as e:
            rec.backend_error = repr(e)
        finally:
            if rec.reset_received is None and t.reset_code is not None:
                rec.reset_received = t.reset_code
            rec.eof_received = rec.eof_received or t.remote_ended
            rec.done.set()

    async def _serve(self, rec):
        t = rec.tunnel
        mode = self.mode
        rec.shape_error = connect_shape_error(rec.headers)
        if rec.shape_error:
            rec.status_sent = 400
            t.respond(400, end_stream=True)
            return
        if mode == 'hang':
            await t.ended_event.wait()
            if t.reset_code is not None:
                raise TunnelReset(t.reset_code)
            return
        if mode == 'reset':
            t.reset(self.reset_code)
            return
        if mode == 'status':
            rec.status_sent = self.status
            t.respond(self.status, end_stream=True)
            return
        if mode == 'reset_after_200':
            rec.status_sent = 200
            t.respond(200)
            await t.recv(1)
            t.reset(self.reset_code)
            return
        if mode == 'echo':
            rec.status_sent = 200
            t.respond(200)
            while True:
                chunk = await self._read(t)
                if not chunk:
                    rec.eof_received = True
                    await t.send_eof()
                    return
                rec.bytes_in += len(chunk)
                await t.send(chunk)
        if mode == 'sink':
            rec.status_sent = 200
            t.respond(200)
            h = hashlib.sha256()
            while True:
                chunk = await self._read(t)
                if not chunk:
                    break
                rec.bytes_in += len(chunk)
                h.update(chunk)
            rec.eof_received = True
            rec.sha256 = h.hexdigest()
            await t.send_eof()
            return
        if mode == 'forward':
            try:
                ip, port = split_addr(rec.authority)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 5)
            except (OSError, ValueError, asyncio.TimeoutError) as e:
                rec.backend_error = repr(e)
                rec.status_sent = 503
                t.respond(503, end_stream=True)
                return
            rec.status_sent = 200
            t.respond(200)
            await splice_tunnel_tcp(t, reader, writer, rec, self)
            return
        raise ValueError('unknown mode %r' % mode)


def connect_shape_error(headers):
    """Why a request header block is not a classic HBONE CONNECT (RFC 9113 8.5), or None."""
    pseudo = [k for k in headers if k.startswith(':')]
    if headers.get(':method') != 'CONNECT':
        return 'method %r' % headers.get(':method')
    if not headers.get(':authority'):
        return 'no :authority'
    extra = set(pseudo) - {':method', ':authority'}
    if extra:
        return 'unexpected pseudo headers %s' % sorted(extra)
    try:
        ip, port = split_addr(headers[':authority'])
        if not (0 < port < 65536):
            return 'bad port'
    except ValueError:
        return 'authority %r is not ip:port' % headers[':authority']
    return None


async def splice_tunnel_tcp(t, reader, writer, rec, server):
    """Copies tunnel <-> TCP both ways with half-close; a reset on one side aborts the other."""

    async def up():
        try:
            while True:
                chunk = await server._read(t)
                if not chunk:
                    rec.eof_received = True
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                rec.bytes_in += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except TunnelReset as e:
            rec.reset_received = e.code
            abort_writer(writer)
        except ConnectionError:
            t.reset(ErrorCodes.CONNECT_ERROR)

    async def down():
        try:
            while True:
                chunk = await reader.read(256 * KiB)
                if not chunk:
                    await t.send_eof()
                    return
                await t.send(chunk)
        except ConnectionError:
            t.reset(ErrorCodes.CONNECT_ERROR)
        except TunnelReset:
            abort_writer(writer)

    try:
        await asyncio.gather(up(), down())
    finally:
        writer.close()


def abort_writer(writer):
    sock = writer.get_extra_info('socket')
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\x00\x00\x00\x00\x00\x00\x00')
        except OSError:
            pass
    writer.transport.abort()


# ------------------------------------------------------------------------------------------------
# Plain TCP backends (the applications)

class ConnRecord:
    def __init__(self, peer):
        self.peer = peer
        self.bytes_in = 0
        self.data = bytearray()  # kept for small exchanges only (first 1 MiB)
        self.sha256 = None
        self.close_kind = None  # 'eof' or 'reset' (how the peer ended its side)
        self.done = asyncio.Event()

    def __repr__(self):
        return 'ConnRecord(%s in=%d close=%s)' % (self.peer, self.bytes_in, self.close_kind)


class Backend:
    """A TCP application. kind:
      echo             echo, FIN after peer FIN
      sink             sha256 all input, then FIN
      source           send `nbytes` of Pattern(seed) then FIN (input is drained)
      reply_after_eof  read until FIN, then send b'REPLY:' + sha256 hex of the input, then FIN
      talk_first       send `greeting`, FIN, then record everything until the peer's FIN
      abort            read `abort_after` bytes (0 = at once), then close with RST"""

    def __init__(self, ip, port, kind='echo', nbytes=0, seed=1, greeting=b'hello from backend\n',
                 abort_after=1):
        self.ip, self.port, self.kind = ip, port, kind
        self.nbytes, self.seed, self.greeting, self.abort_after = nbytes, seed, greeting, abort_after
        self.records = []
        self.server = None
        self.writers = []
        self.new_record = asyncio.Event()

    async def start(self):
        self.server = await asyncio.start_server(self._handle, self.ip, self.port,
                                                 reuse_address=True, limit=1 * MiB)
        return self

    async def close(self):
        if self.server:
            self.server.close()
        for w in self.writers:
            w.transport.abort()
        if self.server:
            await self.server.wait_closed()

    async def wait_records(self, n, timeout=10):
        deadline = time.monotonic() + timeout
        while len(self.records) < n:
            if time.monotonic() > deadline:
                raise AssertionError('%s:%d: %d connections, expected %d' %
                                     (self.ip, self.port, len(self.records), n))
            self.new_record.clear()
            try:
                await asyncio.wait_for(self.new_record.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        return self.records

    async def _read_all(self, reader, rec, h=None):
        try:
            while True:
                chunk = await reader.read(256 * KiB)
                if not chunk:
                    rec.close_kind = 'eof'
                    return
                rec.bytes_in += len(chunk)
                if len(rec.data) < MiB:
                    rec.data += chunk[:MiB - len(rec.data)]
                if h:
                    h.update(chunk)
        except ConnectionError:
            rec.close_kind = 'reset'

    async def _handle(self, reader, writer):
        rec = ConnRecord(writer.get_extra_info('peername'))
        self.records.append(rec)
        self.new_record.set()
        self.writers.append(writer)
        try:
            if self.kind == 'echo':
                try:
                    while True:
                        chunk = await reader.read(256 * KiB)
                        if not chunk:
                            rec.close_kind = 'eof'
                            writer.write_eof()
                            break
                        rec.bytes_in += len(chunk)
                        if len(rec.data) < MiB:
                            rec.data += chunk[:MiB - len(rec.data)]
                        writer.write(chunk)
                        await writer.drain()
                except ConnectionError:
                    rec.close_kind = 'reset'
            elif self.kind == 'sink':
                h = hashlib.sha256()
                await self._read_all(reader, rec, h)
                rec.sha256 = h.hexdigest()
                if rec.close_kind == 'eof':
                    writer.write_eof()
            elif self.kind == 'source':
                drain = asyncio.ensure_future(self._read_all(reader, rec))
                for chunk in Pattern(self.seed).chunks(self.nbytes):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()
                await drain
            elif self.kind == 'reply_after_eof':
                h = hashlib.sha256()
                await self._read_all(reader, rec, h)
                rec.sha256 = h.hexdigest()
                if rec.close_kind == 'eof':
                    writer.write(b'REPLY:' + rec.sha256.encode())
                    await writer.drain()
                    writer.write_eof()
            elif self.kind == 'talk_first':
                writer.write(self.greeting)
                await writer.drain()
                writer.write_eof()
                await self._read_all(reader, rec)
            elif self.kind == 'abort':
                if self.abort_after:
                    data = await reader.read(self.abort_after)
                    rec.bytes_in += len(data)
                abort_writer(writer)
                rec.close_kind = 'aborted-by-us'
                return
            else:
                raise ValueError(self.kind)
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            if rec.close_kind is None:
                rec.close_kind = 'reset'
        finally:
            rec.done.set()
            writer.close()


# ------------------------------------------------------------------------------------------------
# Config generation (istiod-shaped resources; shapes follow the fixture's mongodb entries)

T_CLUSTER = 'type.googleapis.com/envoy.config.cluster.v3.Cluster'
T_CLA = 'type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment'
T_LISTENER = 'type.googleapis.com/envoy.config.listener.v3.Listener'
T_ROUTE = 'type.googleapis.com/envoy.config.route.v3.RouteConfiguration'
T_TCP_PROXY = 'type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy'
T_STRING = 'type.googleapis.com/google.protobuf.StringValue'
T_INTERNAL_UP = ('type.googleapis.com/envoy.extensions.transport_sockets.internal_upstream.v3.'
                 'InternalUpstreamTransport')
T_RAW = 'type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer'
T_ORIG_DST = 'type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst'
T_IN_NET = 'type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.'


class Endpoint:
    """A service endpoint: pod ip:port, reached with HBONE (podIP:15008) or plain TCP."""

    def __init__(self, ip, port, hbone=True, workload='app-v1-00000;bookinfo;app;v1;Kubernetes'):
        self.ip, self.port, self.hbone, self.workload = ip, port, hbone, workload


class Service:
    def __init__(self, name, vip, port, endpoints, namespace='bookinfo'):
        self.name, self.vip, self.port, self.endpoints = name, vip, port, list(endpoints)
        self.namespace = namespace

    @property
    def host(self):
        return '%s.%s.svc.cluster.local' % (self.name, self.namespace)

    @property
    def cluster(self):
        return 'inbound-vip|%d|tcp|%s' % (self.port, self.host)

    @property
    def authority(self):
        return '%s:%d' % (self.vip, self.port)


def _sds(name):
    return {'name': name, 'sds_config': {
        'api_config_source': {'api_type': 'GRPC', 'grpc_services': [
            {'envoy_grpc': {'cluster_name': 'sds-grpc'}}],
            'set_node_on_first_message_only': True, 'transport_api_version': 'V3'},
        'initial_fetch_timeout': '0s', 'resource_api_version': 'V3'}}


def _tls_params():
    return {'tls_maximum_protocol_version': 'TLSv1_3', 'tls_minimum_protocol_version': 'TLSv1_3'}


def _action(name):
    return {'action': {'name': name, 'typed_config': {'@type': T_STRING, 'value': name}}}


def _internal_upstream(passthrough):
    ts = {'@type': T_INTERNAL_UP, 'transport_socket': {'name': 'raw_buffer',
                                                        'typed_config': {'@type': T_RAW}}}
    if passthrough:
        ts['passthrough_metadata'] = [{'kind': {'host': {}}, 'name': 'envoy.filters.listener.original_dst'},
                                      {'kind': {'host': {}}, 'name': 'istio'}]
    return {'name': 'internal_upstream', 'typed_config': ts}


def _circuit_breakers():
    big = 4294967295
    return {'thresholds': [{'max_connections': big, 'max_pending_requests': big,
                            'max_requests': big, 'max_retries': big, 'track_remaining': True}]}


def _static_internal_cluster(name, listener):
    return {
        'name': name, 'alt_stat_name': name + ';', 'type': 'STATIC',
        'circuit_breakers': _circuit_breakers(),
        'load_assignment': {'cluster_name': name, 'endpoints': [{'lb_endpoints': [
            {'endpoint': {'address': {'envoy_internal_address': {
                'server_listener_name': listener}}}}]}]},
        'transport_socket': _internal_upstream(False),
        'typed_extension_protocol_options': {
            'envoy.extensions.upstreams.http.v3.HttpProtocolOptions': {
                '@type': 'type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions',
                'common_http_protocol_options': {'idle_timeout': '300s'},
                'use_downstream_protocol_config': {
                    'http2_protocol_options': {'max_concurrent_streams': 1073741824},
                    'http_protocol_options': {}}}}}


def _tcp_chain(name, cluster):
    return {'name': name, 'filters': [
        {'name': 'istio.stats', 'typed_config': {
            '@type': 'type.googleapis.com/stats.PluginConfig',
            'disable_host_header_fallback': True, 'reporter': 'SERVER_GATEWAY'}},
        {'name': 'envoy.filters.network.tcp_proxy', 'typed_config': {
            '@type': T_TCP_PROXY, 'cluster': cluster, 'stat_prefix': cluster}}]}


def make_config(waypoint_ip, services, workloads=(), namespace='bookinfo',
                trust_domain=TRUST_DOMAIN, connect_timeout='10s'):
    """Resources as istiod would send them to a waypoint serving `services` (TCP ports) and,
    for workload-addressed traffic, the pod IPs in `workloads` (direct-tcp chain -> encap ->
    connect_originate). Returns a dict ready for json.dump."""
    clusters, clas, listeners = {}, {}, {}
    td_prefix = 'spiffe://%s/' % trust_domain

    # connect_terminate: HBONE listener (port from --hbone-address in our daemon)
    listeners['connect_terminate'] = {
        'name': 'connect_terminate',
        'address': {'socket_address': {'address': '0.0.0.0', 'port_value': 15008}},
        'connection_balance_config': {'exact_balance': {}},
        'filter_chains': [{
            'name': 'default',
            'filters': [{'name': 'envoy.filters.network.http_connection_manager', 'typed_config': {
                '@type': 'type.googleapis.com/envoy.extensions.filters.network.'
                         'http_connection_manager.v3.HttpConnectionManager',
                'stat_prefix': 'connect_terminate',
                'http2_protocol_options': {'allow_connect': True, 'max_concurrent_streams': 100,
                                           'connection_keepalive': {'interval': '10s',
                                                                    'timeout': '20s'}},
                'http_filters': [{'name': 'envoy.filters.http.router', 'typed_config': {
                    '@type': 'type.googleapis.com/envoy.extensions.filters.http.router.v3.Router'}}],
                'route_config': {'name': 'default', 'virtual_hosts': [{
                    'name': 'default', 'domains': ['*'], 'routes': [{
                        'match': {'connect_matcher': {}},
                        'route': {'cluster': 'main_internal', 'upgrade_configs': [
                            {'upgrade_type': 'CONNECT', 'connect_config': {}}]}}]}]},
                'stream_idle_timeout': '0s',
                'upgrade_configs': [{'upgrade_type': 'CONNECT'}],
                'use_remote_address': False}}],
            'transport_socket': {'name': 'tls', 'typed_config': {
                '@type': 'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.'
                         'DownstreamTlsContext',
                'require_client_certificate': True,
                'common_tls_context': {
                    'alpn_protocols': ['h2'],
                    'combined_validation_context': {
                        'default_validation_context': {'match_typed_subject_alt_names': [
                            {'matcher': {'prefix': td_prefix}, 'san_type': 'URI'}]},
                        'validation_context_sds_secret_config': _sds('ROOTCA')},
                    'tls_certificate_sds_secret_configs': [_sds('default')],
                    'tls_params': _tls_params()}}}}]}

    # main_internal: dispatch on destination IP then port
    by_vip = collections.OrderedDict()
    for s in services:
        by_vip.setdefault(s.vip, []).append(s)
    range_matchers = []
    for vip, svcs in by_vip.items():
        range_matchers.append({
            'ranges': [{'address_prefix': vip, 'prefix_len': 32}],
            'on_match': {'matcher': {'matcher_tree': {
                'input': {'name': 'port', 'typed_config': {
                    '@type': T_IN_NET + 'DestinationPortInput'}},
                'exact_match_map': {'map': {str(s.port): _action(s.cluster) for s in svcs}}}}}})
    chains = [_tcp_chain(s.cluster, s.cluster) for s in services]
    if workloads:
        range_matchers.append({
            'ranges': [{'address_prefix': ip, 'prefix_len': 32} for ip in workloads],
            'on_match': {'matcher': {
                'matcher_tree': {
                    'input': {'name': 'application-protocol', 'typed_config': {
                        '@type': T_IN_NET + 'ApplicationProtocolInput'}},
                    'exact_match_map': {'map': {"'h2c'": _action('direct-http'),
                                                "'http/1.1'": _action('direct-http')}}},
                'on_no_match': _action('direct-tcp')}}})
        chains.append({'name': 'direct-tcp', 'filters': [
            {'name': 'connect_authority', 'typed_config': {
                '@type': 'type.googleapis.com/envoy.extensions.filters.network.set_filter_state.'
                         'v3.Config',
                'on_new_connection': [{
                    'format_string': {'text_format_source': {'inline_string':
                        '%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%'}},
                    'object_key': 'envoy.filters.listener.original_dst.local_ip',
                    'shared_with_upstream': 'ONCE'}]}},
            {'name': 'envoy.filters.network.tcp_proxy', 'typed_config': {
                '@type': T_TCP_PROXY, 'cluster': 'encap', 'stat_prefix': 'encap'}}]})
        chains.append({'name': 'direct-http', 'filters': [
            {'name': 'envoy.filters.network.tcp_proxy', 'typed_config': {
                '@type': T_TCP_PROXY, 'cluster': 'encap', 'stat_prefix': 'encap'}}]})
    listeners['main_internal'] = {
        'name': 'main_internal',
        'internal_listener': {},
        'traffic_direction': 'INBOUND',
        'listener_filters': [{'name': 'envoy.filters.listener.original_dst',
                              'typed_config': {'@type': T_ORIG_DST}}],
        'filter_chain_matcher': {'matcher_tree': {
            'input': {'name': 'ip', 'typed_config': {'@type': T_IN_NET + 'DestinationIPInput'}},
            'custom_match': {'name': 'ip', 'typed_config': {
                '@type': 'type.googleapis.com/xds.type.matcher.v3.IPMatcher',
                'range_matchers': range_matchers}}}},
        'filter_chains': chains}

    listeners['connect_originate'] = {
        'name': 'connect_originate', 'internal_listener': {}, 'use_original_dst': False,
        'listener_filters': [{'name': 'envoy.filters.listener.original_dst',
                              'typed_config': {'@type': T_ORIG_DST}}],
        'filter_chains': [{'filters': [{'name': 'envoy.filters.network.tcp_proxy', 'typed_config': {
            '@type': T_TCP_PROXY, 'cluster': 'connect_originate',
            'stat_prefix': 'connect_originate',
            'tunneling_config': {'hostname': '%DOWNSTREAM_LOCAL_ADDRESS%'}}}]}]}

    clusters['main_internal'] = _static_internal_cluster('main_internal', 'main_internal')
    clusters['encap'] = _static_internal_cluster('encap', 'connect_originate')
    clusters['connect_originate'] = {
        'name': 'connect_originate', 'alt_stat_name': 'connect_originate;',
        'circuit_breakers': _circuit_breakers(),
        'type': 'ORIGINAL_DST', 'lb_policy': 'CLUSTER_PROVIDED', 'connect_timeout': connect_timeout,
        'cleanup_interval': '60s',
        'original_dst_lb_config': {'metadata_key': {
            'key': 'envoy.filters.listener.original_dst', 'path': [{'key': 'waypoint'}]},
            'upstream_port_override': 15008},
        'transport_socket': {'name': 'tls', 'typed_config': {
            '@type': 'type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.'
                     'UpstreamTlsContext',
            'common_tls_context': {
                'alpn_protocols': ['h2'],
                'combined_validation_context': {
                    'default_validation_context': {'match_typed_subject_alt_names': [
                        {'matcher': {'prefix': td_prefix}, 'san_type': 'URI'},
                        {'matcher': {'prefix': td_prefix + 'ns/%s/sa/' % namespace},
                         'san_type': 'URI'}]},
                    'validation_context_sds_secret_config': _sds('ROOTCA')},
                'tls_certificate_sds_secret_configs': [_sds('default')],
                'tls_params': _tls_params()}}},
        'typed_extension_protocol_options': {
            'envoy.extensions.upstreams.http.v3.HttpProtocolOptions': {
                '@type': 'type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions',
                'common_http_protocol_options': {'idle_timeout': '3600s'},
                'explicit_http_config': {'http2_protocol_options': {'allow_connect': True}}}}}

    for s in services:
        clusters[s.cluster] = {
            'name': s.cluster, 'alt_stat_name': s.cluster + ';', 'type': 'EDS',
            'circuit_breakers': _circuit_breakers(),
            'connect_timeout': connect_timeout, 'lb_policy': 'LEAST_REQUEST',
            'common_lb_config': {},
            'eds_cluster_config': {'service_name': s.cluster, 'eds_config': {
                'ads': {}, 'initial_fetch_timeout': '0s', 'resource_api_version': 'V3'}},
            'metadata': {'filter_metadata': {'istio': {'services': [
                {'host': s.host, 'name': s.name, 'namespace': s.namespace}]}}},
            'transport_socket': _internal_upstream(True)}
        lbs = []
        for e in s.endpoints:
            addr = '%s:%d' % (e.ip, e.port)
            if e.hbone:
                lbs.append({
                    'endpoint': {'address': {'envoy_internal_address': {
                        'endpoint_id': addr, 'server_listener_name': 'connect_originate'}}},
                    'health_status': 'HEALTHY', 'load_balancing_weight': 1,
                    'metadata': {'filter_metadata': {
                        'envoy.filters.listener.original_dst': {'local': addr},
                        'istio': {'workload': e.workload}}}})
            else:
                lbs.append({
                    'endpoint': {'address': {'socket_address': {
                        'address': e.ip, 'port_value': e.port}}},
                    'health_status': 'HEALTHY', 'load_balancing_weight': 1,
                    'metadata': {'filter_metadata': {'istio': {'workload': e.workload}}}})
        clas[s.cluster] = {'cluster_name': s.cluster, 'endpoints': (
            [{'lb_endpoints': lbs, 'load_balancing_weight': 1, 'locality': {}}] if lbs else [])}

    return {'node_id': 'waypoint~%s~bookinfo-waypoint-e2e.%s~%s.svc.cluster.local' % (
                waypoint_ip, namespace, namespace),
            'resources': {T_CLUSTER: clusters, T_CLA: clas, T_LISTENER: listeners, T_ROUTE: {}}}


# ------------------------------------------------------------------------------------------------
# The daemon under test

SANITIZER_MARKERS = ('ERROR: AddressSanitizer', 'runtime error:', 'ERROR: LeakSanitizer')
ALL_WAYPOINTS = []


def waypoint_bin():
    return os.environ.get('WAYPOINT_BIN', '')


def io_backend():
    return os.environ.get('WP_IO_BACKEND', 'epoll')


class Waypoint:
    """$WAYPOINT_BIN as a subprocess: config + PKI in a temp dir, stderr in a file."""

    def __init__(self, ip, config, hbone_port=15008, admin_port=15000, extra_args=(),
                 cert='waypoint', name='waypoint'):
        self.ip = ip
        self.hbone_port = hbone_port
        self.admin_port = admin_port
        self.config = config
        self.extra_args = list(extra_args)
        self.cert = cert
        self.name = name
        self.dir = tempfile.mkdtemp(prefix='wp-e2e-%s-' % name)
        self.log_path = os.path.join(self.dir, 'stderr.log')
        self.proc = None
        self.returncode = None
        ALL_WAYPOINTS.append(self)

    @property
    def hbone_addr(self):
        return '%s:%d' % (self.ip, self.hbone_port)

    @property
    def admin_addr(self):
        return '%s:%d' % (self.ip, self.admin_port)

    def argv(self):
        cfg = os.path.join(self.dir, 'config.json')
        with open(cfg, 'w') as f:
            json.dump(self.config, f, indent=1)
        args = [waypoint_bin(), '--config-file', cfg,
                '--cert-file', pki_path(self.cert + '.pem'),
                '--key-file', pki_path(self.cert + '.key'),
                '--root-cert', pki_path('root.pem'),
                '--trust-domain', TRUST_DOMAIN,
                '--hbone-address', self.hbone_addr,
                '--admin-address', self.admin_addr,
                '--io-backend', io_backend()]
        if os.environ.get('WP_E2E_LOG_LEVEL'):
            args += ['--log-level', os.environ['WP_E2E_LOG_LEVEL']]
        return args + self.extra_args

    def start(self, timeout=20):
        argv = self.argv()
        with open(os.path.join(self.dir, 'argv.txt'), 'w') as f:
            f.write(' '.join(argv) + '\n')
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError('waypoint exited with %d during startup\n%s' %
                                     (self.proc.returncode, self.tail()))
            try:
                status, body = self.admin_get('/ready', timeout=1)
                if status == 200 and b'LIVE' in body:
                    return self
                last = (status, body[:200])
            except OSError as e:
                last = e
            time.sleep(0.05)
        self.stop(check=False)
        raise AssertionError('waypoint not ready after %ds (last: %r)\n%s' %
                             (timeout, last, self.tail()))

    def admin_get(self, path, timeout=5):
        try:
            with urllib.request.urlopen('http://%s%s' % (self.admin_addr, path),
                                        timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def server_info(self):
        status, body = self.admin_get('/server_info')
        if status != 200:
            raise AssertionError('/server_info: %d %r' % (status, body[:200]))
        return json.loads(body)

    def rss_bytes(self):
        with open('/proc/%d/status' % self.proc.pid) as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) * 1024
        raise AssertionError('no VmRSS')

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            with open(self.log_path, 'rb') as f:
                return f.read().decode('utf-8', 'replace')
        except OSError:
            return ''

    def tail(self, lines=60):
        text = self.log_text().splitlines()
        return '--- %s log (%s), last %d lines:\n%s\n---' % (
            self.name, self.log_path, min(lines, len(text)), '\n'.join(text[-lines:]))

    def sanitizer_report(self):
        text = self.log_text()
        for m in SANITIZER_MARKERS:
            if m in text:
                return m
        return None

    def assert_healthy(self):
        """The process is running and has not printed a sanitizer report."""
        if not self.alive():
            raise AssertionError('waypoint died (exit %s)\n%s' % (self.proc.returncode,
                                                                   self.tail()))
        m = self.sanitizer_report()
        if m:
            raise AssertionError('waypoint printed %r\n%s' % (m, self.tail(200)))

    def stop(self, check=True, timeout=10):
        """SIGTERM, then SIGKILL after `timeout` s. With check: the exit must be clean (0 or
        death by our SIGTERM), in time, and without sanitizer output."""
        if self.proc is None:
            return None
        killed = False
        if self.proc.poll() is None:
            died_before = False
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait()
        else:
            died_before = True
        self.returncode = self.proc.returncode
        self.log.close()
        if check:
            problems = []
            if died_before:
                problems.append('exited on its own with %d before being stopped' %
                                self.returncode)
            elif killed:
                problems.append('did not exit within %ds of SIGTERM' % timeout)
            elif self.returncode not in (0, -signal.SIGTERM):
                problems.append('exit status %d after SIGTERM' % self.returncode)
            m = self.sanitizer_report()
            if m:
                problems.append('sanitizer report %r' % m)
            if problems:
                raise AssertionError('waypoint: %s\n%s' % ('; '.join(problems), self.tail(200)))
        return self.returncode


# ------------------------------------------------------------------------------------------------
# Raw TLS / TCP probes (blocking; call through asyncio.to_thread from async tests)

def tls_probe(addr, ssl_context, send_preface=True, timeout=5):
    """Tries to set up TLS + HTTP/2 with the given client context. Returns a dict:
      handshake  True if the TLS handshake completed on our side
      alpn, version, error (repr of the first error)
      h2         True if the server sent an HTTP/2 frame (it accepted the session)
    In TLS 1.3 a server rejecting the client certificate does so after our handshake completed,
    so "h2" (not "handshake") is the meaningful "session accepted" bit."""
    ip, port = split_addr(addr)
    res = {'handshake': False, 'alpn': None, 'version': None, 'error': None, 'h2': False,
           'bytes': 0}
    raw = socket.create_connection((ip, port), timeout=timeout)
    try:
        s = ssl_context.wrap_socket(raw, server_side=False, do_handshake_on_connect=False)
        s.settimeout(timeout)
        try:
            s.do_handshake()
            res['handshake'] = True
            res['alpn'] = s.selected_alpn_protocol()
            res['version'] = s.version()
            if send_preface:
                s.sendall(b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n' + b'\x00\x00\x00\x04\x00\x00\x00\x00\x00')
            buf = b''
            while len(buf) < 9:
                d = s.recv(4096)
                if not d:
                    res['error'] = 'EOF'
                    break
                buf += d
            res['bytes'] = len(buf)
            # a server SETTINGS frame: type 4 on stream 0
            if len(buf) >= 9 and buf[3] == 4 and buf[5:9] == b'\x00\x00\x00\x00':
                res['h2'] = True
        except (ssl.SSLError, OSError) as e:
            res['error'] = repr(e)
        finally:
            s.close()
    finally:
        raw.close()
    return res


def raw_probe(addr, payload=b'', timeout=10):
    """TCP connect, send payload, then wait until the server closes. Returns (seconds until
    close, bytes received, how) with how in 'eof', 'reset', 'timeout'."""
    ip, port = split_addr(addr)
    s = socket.create_connection((ip, port), timeout=timeout)
    t0 = time.monotonic()
    got = b''
    how = 'timeout'
    try:
        if payload:
            s.sendall(payload)
        s.settimeout(0.2)
        while time.monotonic() - t0 < timeout:
            try:
                d = s.recv(65536)
            except socket.timeout:
                continue
            except ConnectionError:
                how = 'reset'
                break
            if not d:
                how = 'eof'
                break
            got += d
    finally:
        s.close()
    return time.monotonic() - t0, got, how


# ------------------------------------------------------------------------------------------------
# The standard test topology (one per 127.x.y.0/24 block)

class Topology:
    """Addresses, services and the apps behind them, inside one 127.x.y.0/24 block:

      .1   waypoint (hbone :15008, admin :15000)    .2  client source address
      .3-.9 extra waypoints started by single tests
      pods (destination stand-ins on :15008, apps on the target port):
      .11 .12  echo service, forward -> echo apps on :9000
      .13      plain (non-mesh) pod: echo :9001, reply_after_eof :9002, talk_first :9003,
               abort :9004, sink :9010, source :9011
      .14      HBONE pod: reply_after_eof :9002, talk_first :9003, abort :9004, echo :9005
      .15      plain pod with nothing listening (refused)
      .16      HBONE pod without a destination stand-in (refused on 15008)
      .17      stand-in answering 503          .18 stand-in never answering
      .19      stand-in in sink mode            .20 stand-in: 200 then RST on first DATA
      .21      workload-addressed pod (direct), forward -> echo app :9020
      .22      stand-in: slow sink (read_rate 64 KiB/s)
      .23 .24  stand-ins in echo mode (many-tunnel tests)
      VIPs are .100 and up (see SERVICES)."""

    # name: (vip host byte, port, [(pod host byte, port, hbone)])
    SERVICES = {
        'echo': (100, 9000, [(11, 9000, True), (12, 9000, True)]),
        'plain': (101, 9001, [(13, 9001, False)]),
        'halfclose': (102, 9002, [(14, 9002, True)]),
        'plain_halfclose': (102, 9102, [(13, 9002, False)]),
        'talkfirst': (103, 9003, [(14, 9003, True)]),
        'plain_talkfirst': (103, 9103, [(13, 9003, False)]),
        'abort': (104, 9004, [(14, 9004, True)]),
        'plain_abort': (104, 9104, [(13, 9004, False)]),
        'hbone_echo': (105, 9005, [(14, 9005, True)]),
        'refused': (106, 9006, [(15, 9006, False)]),
        'refused_hbone': (107, 9007, [(16, 9007, True)]),
        'status503': (108, 9008, [(17, 9008, True)]),
        'hang': (109, 9009, [(18, 9009, True)]),
        'empty': (110, 9010, []),
        'sink': (111, 9011, [(19, 9011, True)]),
        'plain_sink': (111, 9111, [(13, 9010, False)]),
        'plain_source': (112, 9012, [(13, 9011, False)]),
        'rst_after_200': (113, 9013, [(20, 9013, True)]),
        'slow': (114, 9014, [(22, 9014, True)]),
        'echo_many': (115, 9015, [(23, 9015, True), (24, 9015, True)]),
    }
    WORKLOAD_POD = 21
    WORKLOAD_PORT = 9020
    SOURCE_BYTES = 256 * MiB
    SOURCE_SEED = 99

    def __init__(self, block):
        self.block = block
        self.wp_ip = self.ip(1)
        self.client_ip = self.ip(2)
        self.services = {}
        for name, (vip, port, eps) in self.SERVICES.items():
            self.services[name] = Service(name.replace('_', '-'), self.ip(vip), port,
                                          [Endpoint(self.ip(h), p, hb) for (h, p, hb) in eps])
        self.workload_authority = '%s:%d' % (self.ip(self.WORKLOAD_POD), self.WORKLOAD_PORT)
        self.dest = {}
        self.apps = {}

    def ip(self, host):
        return '%s.%d' % (self.block, host)

    def authority(self, name):
        return self.services[name].authority

    def config(self, **kw):
        return make_config(self.wp_ip, list(self.services.values()),
                           workloads=[self.ip(self.WORKLOAD_POD)], **kw)

    async def start(self, test):
        """Starts the stand-ins and apps (registered for closing with test)."""
        modes = {11: 'forward', 12: 'forward', 14: 'forward', 17: 'status', 18: 'hang',
                 19: 'sink', 20: 'reset_after_200', 21: 'forward', 22: 'sink',
                 23: 'echo', 24: 'echo'}
        for host, mode in modes.items():
            srv = await test.server(self.ip(host), 15008, mode=mode)
            if host == 22:
                srv.read_rate = 64 * KiB
            self.dest[host] = srv
        apps = [(11, 9000, 'echo'), (12, 9000, 'echo'), (13, 9001, 'echo'),
                (13, 9002, 'reply_after_eof'), (13, 9003, 'talk_first'), (13, 9004, 'abort'),
                (13, 9010, 'sink'), (13, 9011, 'source'),
                (14, 9002, 'reply_after_eof'), (14, 9003, 'talk_first'), (14, 9004, 'abort'),
                (14, 9005, 'echo'), (21, 9020, 'echo')]
        for host, port, kind in apps:
            self.apps[(host, port)] = await test.backend(
                self.ip(host), port, kind=kind, nbytes=self.SOURCE_BYTES, seed=self.SOURCE_SEED)
        return self


# ------------------------------------------------------------------------------------------------
# unittest glue

class AsyncTestCase(unittest.IsolatedAsyncioTestCase):
    """Base class: collects objects to close, quiets asyncio's SSL handshake noise."""

    @classmethod
    def setUpClass(cls):
        pki_dir()

    async def asyncSetUp(self):
        self._closers = []
        loop = asyncio.get_running_loop()
        loop.set_debug(False)  # IsolatedAsyncioTestCase turns it on; it slows bulk transfers

        def handler(loop, ctx):
            exc = ctx.get('exception')
            if isinstance(exc, (ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
                return
            msg = ctx.get('message', '')
            if 'SSL' in msg or 'handshake' in msg:
                return
            loop.default_exception_handler(ctx)
        loop.set_exception_handler(handler)

    async def asyncTearDown(self):
        failures = []
        for c in reversed(self._closers):
            try:
                r = c()
                if asyncio.iscoroutine(r):
                    await r
            except AssertionError as e:  # e.g. an extra waypoint that did not stop cleanly
                failures.append(e)
            except Exception:
                pass
        self._closers = []
        if failures:
            raise failures[0]

    def closing(self, obj):
        """Registers obj (HboneClient, HboneServer, Backend) to be closed at teardown."""
        self._closers.append(obj.close)
        return obj

    async def server(self, *a, **kw):
        return self.closing(await HboneServer(*a, **kw).start())

    async def backend(self, *a, **kw):
        return self.closing(await Backend(*a, **kw).start())

    async def client(self, addr, **kw):
        return self.closing(await HboneClient.connect(addr, **kw))


class WaypointTestCase(AsyncTestCase):
    """One waypoint per test class on the class's own block, the Topology's stand-ins per test.
    Subclasses may set waypoint_args (extra CLI flags) and config_kw (make_config keywords)."""

    waypoint_args = ()
    config_kw = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        cls.topo = Topology(cls.block)
        cls.wp = Waypoint(cls.topo.wp_ip, cls.topo.config(**cls.config_kw),
                          extra_args=cls.waypoint_args, name=cls.__name__)
        cls.wp.start()
        cls._extra_ip = 3

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.topo = Topology(self.block)
        await self.topo.start(self)
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        await super().asyncTearDown()
        self.wp.assert_healthy()

    async def wp_client(self, wp=None, **kw):
        """A client stand-in connected to the waypoint (from the block's client address)."""
        wp = wp or self.wp
        kw.setdefault('local_ip', self.topo.client_ip)
        return await self.client(wp.hbone_addr, **kw)

    def extra_waypoint(self, extra_args=(), config_kw=None):
        """Starts another waypoint (own flags) on .3-.9 of the block, stopped (and checked) at
        teardown."""
        cls = type(self)
        ip = self.topo.ip(cls._extra_ip)
        cls._extra_ip = 3 + (cls._extra_ip - 2) % 7
        cfg = make_config(ip, list(self.topo.services.values()),
                          workloads=[self.topo.ip(Topology.WORKLOAD_POD)],
                          **(config_kw if config_kw is not None else self.config_kw))
        wp = Waypoint(ip, cfg, extra_args=extra_args, name='%s-%s' % (cls.__name__, ip))
        wp.start()
        self._closers.append(lambda: wp.stop(check=True))
        return wp

    async def echo_roundtrip(self, client, service='plain', payload=None):
        """Opens a tunnel, checks 200 and an echo of payload, closes it cleanly."""
        payload = payload or os.urandom(3000)
        t = client.open_tunnel(self.topo.authority(service))
        r = await t.wait_response()
        self.assertEqual(r.status, 200, r)
        await t.send(payload)
        await t.send_eof()
        got = await t.recv_all()
        self.assertEqual(got, payload)
        return t

    async def assert_serves_good_tunnel(self, wp=None):
        """A fresh connection and tunnel still work (the waypoint survived what came before)."""
        wp = wp or self.wp
        wp.assert_healthy()
        c = await self.wp_client(wp)
        await self.echo_roundtrip(c, 'plain')
        await self.echo_roundtrip(c, 'echo')
        c.close()


def require_waypoint():
    """Exit 77 (meson: skipped) when $WAYPOINT_BIN is not an executable."""
    b = waypoint_bin()
    if not b or not os.access(b, os.X_OK):
        sys.stderr.write('WAYPOINT_BIN not set or not executable (%r): skipping\n' % b)
        sys.exit(77)


def main():
    """unittest.main, printing the logs of every waypoint started when something failed."""
    prog = unittest.main(exit=False, verbosity=2, warnings='ignore')
    ok = prog.result.wasSuccessful()
    if not ok:
        for w in ALL_WAYPOINTS:
            sys.stderr.write('\n%s\n' % w.tail(80))
    elif not os.environ.get('WP_E2E_KEEP'):
        # logs are only kept when something failed (or WP_E2E_KEEP is set)
        for d in [w.dir for w in ALL_WAYPOINTS] + ([_PKI_DIR] if _PKI_DIR else []):
            shutil.rmtree(d, ignore_errors=True)
    if prog.result.testsRun == len(prog.result.skipped) and prog.result.testsRun:
        sys.exit(77)
    sys.exit(0 if ok else 1)
