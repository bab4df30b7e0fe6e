#!/usr/bin/python3
"""L7 helpers for the end-to-end tests: HTTP chains in istiod's shape, HTTP/1.1 backends and an
HTTP/1.1 client speaking inside an HBONE tunnel (hbonelib.Tunnel).

  http_chain      an http_connection_manager filter chain (istiod's waypoint shape: peer metadata,
                  stats, fault/cors placeholders, optional RBAC, router) with an inline
                  RouteConfiguration
  route, route_config  a Route / an inline one-virtual-host RouteConfiguration
  AUTHZ_RBAC      the RBAC rules of test_l7's and test_clients' authz service
  with_http_chains  make_config() output with some services' TCP chains replaced by HTTP chains
  HttpBackend     a threaded HTTP/1.1 server (keep-alive, chunked bodies) answering JSON about what
                  it received; modes for slow, flaky (503 N times per path) and WebSocket-like echo
  H1              an HTTP/1.1 client on one tunnel (keep-alive; Content-Length and chunked)

Only the standard library and hbonelib. Run with /usr/bin/python3.
"""

import asyncio
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hbonelib

T_HCM = ('type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.'
         'HttpConnectionManager')
T_RBAC = 'type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC'


def http_chain(name, route_config, rbac=None, websocket=True):
    """The filter chain istiod emits for an HTTP service port, with route_config inline and an
    optional RBAC (envoy.config.rbac.v3.RBAC rules dict)."""
    filters = []
    if rbac is not None:
        filters.append({'name': 'envoy.filters.http.rbac',
                        'typed_config': {'@type': T_RBAC, 'rules': rbac}})
    filters += [
        {'name': 'envoy.filters.http.grpc_stats', 'typed_config': {
            '@type': 'type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig',
            'emit_filter_state': True, 'stats_for_all_methods': False}},
        {'name': 'envoy.filters.http.fault', 'typed_config': {
            '@type': 'type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault'}},
        {'name': 'envoy.filters.http.cors', 'typed_config': {
            '@type': 'type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors'}},
        {'name': 'istio.stats', 'typed_config': {
            '@type': 'type.googleapis.com/stats.PluginConfig',
            'disable_host_header_fallback': True, 'reporter': 'SERVER_GATEWAY'}},
        {'name': 'envoy.filters.http.router', 'typed_config': {
            '@type': 'type.googleapis.com/envoy.extensions.filters.http.router.v3.Router'}},
    ]
    hcm = {'@type': T_HCM, 'stat_prefix': name, 'http_filters': filters,
           'route_config': route_config, 'use_remote_address': False,
           'normalize_path': True, 'path_with_escaped_slashes_action': 'KEEP_UNCHANGED'}
    if websocket:
        hcm['upgrade_configs'] = [{'upgrade_type': 'websocket'}]
    return {'name': name, 'filters': [
        {'name': 'envoy.filters.network.http_connection_manager', 'typed_config': hcm}]}


def route(match, **action):
    """One Route: the match dict plus its action keys (route=, redirect=, header edits...)."""
    r = {'match': match}
    r.update(action)
    return r


def route_config(name, routes):
    """An inline RouteConfiguration: one catch-all virtual host holding routes."""
    return {'name': name, 'validate_clusters': False,
            'virtual_hosts': [{'name': name, 'domains': ['*'], 'routes': routes}]}


# The RBAC rules the authz services use in test_l7 and test_clients: GET /public for anyone,
# /admin for hbonelib.CLIENT_ID, /other for some other identity (so denied to the client).
AUTHZ_RBAC = {'policies': {
    'public-get': {
        'permissions': [{'and_rules': {'rules': [
            {'header': {'name': ':method', 'string_match': {'exact': 'GET'}}},
            {'url_path': {'path': {'prefix': '/public'}}}]}}],
        'principals': [{'any': True}]},
    'admin-for-client': {
        'permissions': [{'url_path': {'path': {'prefix': '/admin'}}}],
        'principals': [{'filter_state': {'key': 'io.istio.peer_principal',
                                         'string_match': {'exact': hbonelib.CLIENT_ID}}}]},
    'other-for-someone-else': {
        'permissions': [{'url_path': {'path': {'prefix': '/other'}}}],
        'principals': [{'filter_state': {
            'key': 'io.istio.peer_principal',
            'string_match': {'exact': 'spiffe://cluster.local/ns/x/sa/y'}}}]},
}}


def with_http_chains(cfg, chains):
    """cfg: make_config() output; chains: {chain name (the service's cluster name): chain dict}.
    Replaces those TCP chains of main_internal by the given HTTP chains."""
    mi = cfg['resources'][hbonelib.T_LISTENER]['main_internal']
    for i, fc in enumerate(mi['filter_chains']):
        if fc['name'] in chains:
            mi['filter_chains'][i] = chains[fc['name']]
    return cfg


# ------------------------------------------------------------------------------------------------
# HTTP/1.1 backends

class _Handler(BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'

    def log_message(self, *a):
        pass

    def _read_body(self):
        te = self.headers.get('Transfer-Encoding', '')
        if 'chunked' in te.lower():
            body = bytearray()
            while True:
                line = self.rfile.readline()
                size = int(line.split(b';')[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b'\r\n', b'\n', b''):
                        pass
                    return bytes(body)
                body += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get('Content-Length', '0') or 0)
        return self.rfile.read(n) if n else b''

    def _serve(self):
        srv = self.server.owner
        body = self._read_body()
        with srv.lock:
            srv.requests.append((self.command, self.path, dict(self.headers.items()), body))
            srv.attempts[self.path] = srv.attempts.get(self.path, 0) + 1
            attempt = srv.attempts[self.path]
        if srv.mode == 'ws' and self.headers.get('Upgrade', '').lower() == 'websocket':
            self.send_response(101)
            self.send_header('Upgrade', 'websocket')
            self.send_header('Connection', 'Upgrade')
            self.end_headers()
            self.wfile.flush()
            conn = self.connection
            conn.settimeout(10)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    conn.sendall(data)
            except OSError:
                pass
            self.close_connection = True
            return
        status = 200
        if srv.mode == 'slow' and self.path.startswith(('/slow', '/ptry')):
            time.sleep(srv.delay)
        if srv.mode == 'flaky' and (self.path.startswith('/flaky/always') or
                                    attempt <= srv.fail_times):
            status = 503
        out = json.dumps({'pod': srv.name, 'method': self.command, 'path': self.path,
                          'headers': {k.lower(): v for k, v in self.headers.items()},
                          'body_len': len(body), 'attempt': attempt}).encode()
        if self.path.startswith('/bigresp/'):
            n = int(self.path.split('/')[2])
            out = bytes(range(256)) * (n // 256) + bytes(n % 256)
        if self.command == 'HEAD':
            out_body = b''
        else:
            out_body = out
        self.send_response(status)
        self.send_header('Content-Type', 'application/octet-stream'
                         if self.path.startswith('/bigresp/') else 'application/json')
        self.send_header('X-Backend-Secret', 'hidden')
        self.send_header('X-Pod', srv.name)
        if self.path.startswith('/chunked'):
            self.send_header('Transfer-Encoding', 'chunked')
            self.end_headers()
            if out_body:
                half = len(out_body) // 2
                for part in (out_body[:half], out_body[half:]):
                    self.wfile.write(b'%x\r\n%s\r\n' % (len(part), part))
            self.wfile.write(b'0\r\n\r\n')
        else:
            self.send_header('Content-Length', str(len(out)))
            self.end_headers()
            self.wfile.write(out_body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = do_OPTIONS = _serve


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # resets from the waypoint (retries, teardown) are expected


class HttpBackend:
    """A threaded HTTP/1.1 server on ip:port. mode: 'ok', 'slow' (delay on /slow...), 'flaky'
    (503 for the first fail_times attempts of each path; always for /flaky/always...), 'ws'."""

    def __init__(self, name, ip, port, mode='ok', delay=2.0, fail_times=2):
        self.name, self.ip, self.port, self.mode = name, ip, port, mode
        self.delay, self.fail_times = delay, fail_times
        self.lock = threading.Lock()
        self.requests = []
        self.attempts = {}
        self.httpd = _Server((ip, port), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.attempts.clear()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ------------------------------------------------------------------------------------------------
# HTTP/1.1 client inside a tunnel

class H1Response:
    def __init__(self, status, reason, headers, body):
        self.status, self.reason, self.headers, self.body = status, reason, headers, body
        self.trailers = []

    def header(self, name):
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return 'H1Response(%d %s %r %r)' % (self.status, self.reason, self.headers,
                                             self.body[:200])


class H1:
    """HTTP/1.1 over one hbonelib.Tunnel, one request at a time (keep-alive)."""

    def __init__(self, tunnel):
        self.t = tunnel
        self.buf = bytearray()

    async def _fill(self, timeout):
        chunk = await self.t.recv(timeout=timeout)
        if not chunk:
            raise EOFError('tunnel ended (%d bytes buffered)' % len(self.buf))
        self.buf += chunk

    async def _line(self, timeout):
        while b'\r\n' not in self.buf:
            await self._fill(timeout)
        i = self.buf.index(b'\r\n')
        line = bytes(self.buf[:i])
        del self.buf[:i + 2]
        return line

    async def _exactly(self, n, timeout):
        while len(self.buf) < n:
            await self._fill(timeout)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_response(self, head_request=False, timeout=10):
        line = await self._line(timeout)
        parts = line.decode('latin-1').split(' ', 2)
        status = int(parts[1])
        reason = parts[2] if len(parts) > 2 else ''
        headers = []
        while True:
            h = await self._line(timeout)
            if not h:
                break
            k, _, v = h.decode('latin-1').partition(':')
            headers.append((k.strip(), v.strip()))
        resp = H1Response(status, reason, headers, b'')
        if head_request or status in (204, 304) or 100 <= status < 200:
            return resp
        te = resp.header('transfer-encoding')
        if te and 'chunked' in te.lower():
            body = bytearray()
            while True:
                size = int((await self._line(timeout)).split(b';')[0], 16)
                if size == 0:
                    while True:
                        t = await self._line(timeout)
                        if not t:
                            break
                        k, _, v = t.decode('latin-1').partition(':')
                        resp.trailers.append((k.strip().lower(), v.strip()))
                    break
                body += await self._exactly(size, timeout)
                await self._line(timeout)
            resp.body = bytes(body)
        elif resp.header('content-length') is not None:
            resp.body = await self._exactly(int(resp.header('content-length')), timeout)
        else:
            while True:
                try:
                    await self._fill(timeout)
                except EOFError:
                    break
            resp.body = bytes(self.buf)
            self.buf.clear()
        return resp

    async def send_raw(self, data):
        await self.t.send(data)

    async def request(self, method, path, headers=(), body=None, host='svc', chunked=False,
                      timeout=10, trailers=()):
        lines = ['%s %s HTTP/1.1' % (method, path), 'Host: %s' % host]
        lines += ['%s: %s' % (k, v) for k, v in headers]
        payload = b''
        if body is not None:
            if chunked:
                lines.append('Transfer-Encoding: chunked')
                payload = b''.join(b'%x\r\n%s\r\n' % (len(body[i:i + 1000]), body[i:i + 1000])
                                   for i in range(0, len(body), 1000)) + b'0\r\n' + b''.join(
                    b'%s: %s\r\n' % (k.encode(), v.encode()) for k, v in trailers) + b'\r\n'
            else:
                lines.append('Content-Length: %d' % len(body))
                payload = body
        await self.t.send(('\r\n'.join(lines) + '\r\n\r\n').encode() + payload)
        return await self.read_response(head_request=(method == 'HEAD'), timeout=timeout)


# ------------------------------------------------------------------------------------------------
# HTTP/2 (h2c prior knowledge) client inside a tunnel

class H2Stream:
    def __init__(self, sid):
        self.sid = sid
        self.status = None
        self.headers = []
        self.body = bytearray()
        self.trailers = []
        self.ended = False
        self.reset_code = None

    def header(self, name):
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def trailer(self, name):
        for k, v in self.trailers:
            if k == name.lower():
                return v
        return None

    def json(self):
        return json.loads(bytes(self.body))

    @property
    def done(self):
        return self.ended or self.reset_code is not None

    def __repr__(self):
        return 'H2Stream(%d %s %r %r trailers=%r reset=%r)' % (
            self.sid, self.status, self.headers, bytes(self.body[:200]), self.trailers,
            self.reset_code)


class H2:
    """HTTP/2 with prior knowledge over one hbonelib.Tunnel: many concurrent streams. Outbound
    headers are not validated (negative tests send what a broken client would); received DATA is
    credited back as it arrives."""

    def __init__(self, tunnel, settings=None):
        import h2.config
        import h2.connection
        self.t = tunnel
        cfg = h2.config.H2Configuration(client_side=True, header_encoding='utf-8',
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False,
                                        validate_inbound_headers=False)
        self.conn = h2.connection.H2Connection(config=cfg)
        self.streams = {}
        self.goaway = None  # (error_code, last_stream_id)
        self.eof = False
        self.settings = settings or {}

    async def start(self):
        self.conn.initiate_connection()
        if self.settings:
            self.conn.update_settings(self.settings)
        await self.flush()
        return self

    async def flush(self):
        data = self.conn.data_to_send()
        if data:
            await self.t.send(data)

    def _on_events(self, events):
        import h2.events as ev
        for e in events:
            s = self.streams.get(getattr(e, 'stream_id', None))
            if isinstance(e, ev.ResponseReceived) and s:
                hs = [(k, v) for k, v in e.headers]
                s.status = int(dict(hs)[':status'])
                s.headers = [(k, v) for k, v in hs if not k.startswith(':')]
            elif isinstance(e, ev.TrailersReceived) and s:
                s.trailers = list(e.headers)
            elif isinstance(e, ev.DataReceived):
                if s:
                    s.body += e.data
                if e.flow_controlled_length:
                    try:
                        self.conn.acknowledge_received_data(e.flow_controlled_length,
                                                            e.stream_id)
                    except Exception:  # the stream may be closed already
                        pass
            elif isinstance(e, ev.StreamEnded) and s:
                s.ended = True
            elif isinstance(e, ev.StreamReset) and s:
                s.reset_code = int(e.error_code)
            elif isinstance(e, ev.ConnectionTerminated):
                self.goaway = (int(e.error_code), e.last_stream_id)

    async def pump(self, timeout=10):
        """Reads once from the tunnel and handles the frames. False at the tunnel's end."""
        chunk = await self.t.recv(timeout=timeout)
        if not chunk:
            self.eof = True
            return False
        self._on_events(self.conn.receive_data(chunk))
        await self.flush()
        return True

    async def send_body(self, sid, body, end=True, trailers=None):
        view = memoryview(body)
        while len(view):
            win = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if win <= 0:
                if not await self.pump():
                    raise EOFError('tunnel ended while sending')
                continue
            self.conn.send_data(sid, bytes(view[:win]))
            view = view[win:]
            await self.flush()
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
        elif end:
            self.conn.end_stream(sid)
        await self.flush()

    async def start_request(self, method, path, headers=(), body=None, authority='svc',
                            trailers=None, end=True, raw_headers=None):
        """Opens a stream; returns its H2Stream. raw_headers replaces the whole header list."""
        sid = self.conn.get_next_available_stream_id()
        s = self.streams[sid] = H2Stream(sid)
        hs = raw_headers if raw_headers is not None else (
            [(':method', method), (':scheme', 'http'), (':authority', authority),
             (':path', path)] + list(headers))
        no_body = body is None and not trailers
        self.conn.send_headers(sid, hs, end_stream=no_body and end)
        await self.flush()
        if body is not None or trailers:
            await self.send_body(sid, body or b'', end=end, trailers=trailers)
        return s

    async def start_burst(self, paths, method='GET', authority='svc'):
        """Opens one bodiless stream per path, all in one write (one read for the peer)."""
        out = []
        for p in paths:
            sid = self.conn.get_next_available_stream_id()
            out.append(self.streams.setdefault(sid, H2Stream(sid)))
            self.conn.send_headers(sid, [(':method', method), (':scheme', 'http'),
                                         (':authority', authority), (':path', p)],
                                   end_stream=True)
        await self.flush()
        return out

    async def wait(self, streams, timeout=10):
        deadline = asyncio.get_running_loop().time() + timeout
        while not all(s.done for s in streams):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                raise asyncio.TimeoutError('streams not done: %r' % [
                    s for s in streams if not s.done])
            if not await self.pump(timeout=left):
                break
        return streams

    async def request(self, method, path, **kw):
        timeout = kw.pop('timeout', 10)
        s = await self.start_request(method, path, **kw)
        await self.wait([s], timeout=timeout)
        return s


# ------------------------------------------------------------------------------------------------
# HTTP/2 (h2c prior knowledge) backend

class H2Backend:
    """A threaded h2c server (python3-h2) on ip:port answering like HttpBackend (JSON about the
    request, 'proto': 'h2'), many streams per connection. Paths: /bigresp/N (N pattern bytes),
    /trailers... (response trailers x-trailer and grpc-status), /status/NNN, /gw... (the first
    one per reset() answers, then sends GOAWAY(NO_ERROR) naming its stream as the last one,
    leaves every other stream of the connection unprocessed and closes it). Counts connections
    and the most requests one read carried (max_open: > 1 only when streams are multiplexed)."""

    def __init__(self, name, ip, port):
        self.name, self.ip, self.port = name, ip, port
        self.lock = threading.Lock()
        self.requests = []
        self.connections = 0
        self.max_open = 0
        self.goaway_sent = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((ip, port))
        self.sock.listen(64)
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.requests.clear()
            self.connections = 0
            self.max_open = 0
            self.goaway_sent = False

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def _accept(self):
        while not self.closed:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                idx = self.connections
            threading.Thread(target=self._serve, args=(s, idx), daemon=True).start()

    def _answer(self, conn, sid, st, idx, pending):
        hs = st['headers']
        path = hs.get(':path', '')
        with self.lock:
            self.requests.append((hs.get(':method'), path, hs, bytes(st['body'])))
        status = 200
        trailers = None
        body = json.dumps({'pod': self.name, 'proto': 'h2', 'conn': idx,
                           'method': hs.get(':method'), 'path': path,
                           'authority': hs.get(':authority'),
                           'headers': {k: v for k, v in hs.items() if not k.startswith(':')},
                           'trailers': st['trailers'], 'body_len': len(st['body'])}).encode()
        if path.startswith('/bigresp/'):
            n = int(path.split('/')[2])
            body = bytes(range(256)) * (n // 256) + bytes(n % 256)
        if path.startswith('/status/'):
            status = int(path.split('/')[2])
        if path.startswith('/trailers'):
            trailers = [('x-trailer', 'yes'), ('grpc-status', '0')]
        conn.send_headers(sid, [(':status', str(status)), ('content-type', 'application/json'),
                                ('x-pod', self.name)])
        pending.append([sid, memoryview(body), trailers])

    @staticmethod
    def _progress(conn, pending):
        import h2.exceptions
        for p in list(pending):
            sid, rest, trailers = p
            try:
                while len(rest):
                    w = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size,
                            len(rest))
                    if w <= 0:
                        break
                    conn.send_data(sid, bytes(rest[:w]))
                    rest = rest[w:]
                p[1] = rest
                if not len(rest):
                    if trailers:
                        conn.send_headers(sid, trailers, end_stream=True)
                    else:
                        conn.end_stream(sid)
                    pending.remove(p)
            except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                pending.remove(p)

    def _serve(self, s, idx):
        import h2.config
        import h2.connection
        import h2.events as ev
        conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding='utf-8'))
        conn.initiate_connection()
        streams, pending = {}, []
        try:
            s.sendall(conn.data_to_send())
            while True:
                data = s.recv(65536)
                if not data:
                    break
                events = conn.receive_data(data)
                batch = sum(isinstance(e, ev.RequestReceived) for e in events)
                with self.lock:
                    self.max_open = max(self.max_open, batch)
                for e in events:
                    if isinstance(e, ev.RequestReceived):
                        streams[e.stream_id] = {'headers': dict(e.headers), 'body': bytearray(),
                                                'trailers': {}}
                    elif isinstance(e, ev.DataReceived):
                        if e.stream_id in streams:
                            streams[e.stream_id]['body'] += e.data
                        conn.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                    elif isinstance(e, ev.TrailersReceived):
                        if e.stream_id in streams:
                            streams[e.stream_id]['trailers'] = dict(e.headers)
                    elif isinstance(e, ev.StreamEnded):
                        st = streams.pop(e.stream_id, None)
                        if st is not None:
                            self._answer(conn, e.stream_id, st, idx, pending)
                            if st['headers'].get(':path', '').startswith('/gw'):
                                with self.lock:
                                    gw, self.goaway_sent = not self.goaway_sent, True
                                if gw:
                                    self._progress(conn, pending)
                                    conn.close_connection(0, last_stream_id=e.stream_id)
                                    s.sendall(conn.data_to_send())
                                    time.sleep(0.3)
                                    raise EOFError
                    elif isinstance(e, ev.StreamReset):
                        streams.pop(e.stream_id, None)
                    elif isinstance(e, ev.ConnectionTerminated):
                        raise EOFError
                self._progress(conn, pending)
                s.sendall(conn.data_to_send())
        except (OSError, EOFError):
            pass
        except Exception as e:  # a protocol error: visible in the test's output
            import sys
            sys.stderr.write('H2Backend %s: %r\n' % (self.name, e))
        finally:
            s.close()


# ------------------------------------------------------------------------------------------------
# gRPC backend (python3-grpcio, generic handlers on raw bytes: no generated code)

def grpc_frame(msg):
    """One gRPC length-prefixed message (uncompressed)."""
    return b'\0' + len(msg).to_bytes(4, 'big') + msg


def grpc_unframe(data):
    out = []
    while len(data) >= 5:
        n = int.from_bytes(data[1:5], 'big')
        out.append(bytes(data[5:5 + n]))
        data = data[5 + n:]
    return out


class GrpcBackend:
    """A grpcio server on ip:port with service test.Echo: Unary (echoes 'name:' + request, sets
    trailing metadata x-trailer), Stream (int(request) messages m0..), SlowStream (int(request)
    messages, 0.1 s apart), Fail (NOT_FOUND 'nope')."""

    def __init__(self, name, ip, port):
        import grpc
        from concurrent import futures
        self.name = name
        self.calls = []
        lock = threading.Lock()

        def record(method, ctx):
            with lock:
                self.calls.append((method, dict(ctx.invocation_metadata())))

        def unary(req, ctx):
            record('Unary', ctx)
            ctx.set_trailing_metadata((('x-trailer', 'yes'),))
            return name.encode() + b':' + req

        def stream(req, ctx):
            record('Stream', ctx)
            for i in range(int(req or b'3')):
                yield b'm%d' % i

        def slow_stream(req, ctx):
            record('SlowStream', ctx)
            for i in range(int(req or b'3')):
                time.sleep(0.1)
                yield b's%d' % i

        def fail(req, ctx):
            record('Fail', ctx)
            ctx.abort(grpc.StatusCode.NOT_FOUND, 'nope')

        handler = grpc.method_handlers_generic_handler('test.Echo', {
            'Unary': grpc.unary_unary_rpc_method_handler(unary),
            'Stream': grpc.unary_stream_rpc_method_handler(stream),
            'SlowStream': grpc.unary_stream_rpc_method_handler(slow_stream),
            'Fail': grpc.unary_unary_rpc_method_handler(fail),
        })
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        self.server.add_generic_rpc_handlers((handler,))
        if not self.server.add_insecure_port('%s:%d' % (ip, port)):
            raise OSError('grpc server cannot bind %s:%d' % (ip, port))
        self.server.start()

    def close(self):
        self.server.stop(0)


def allow_streams_after_goaway():
    """python3-h2 4.1 closes its connection state machine on GOAWAY; RFC 9113 §6.8 lets the
    streams the peer accepted go on (graceful drain): let our clients do the same (as
    test_drain.py does)."""
    import h2.connection
    sm = h2.connection.H2ConnectionStateMachine
    closed = h2.connection.ConnectionState.CLOSED
    for inp in h2.connection.ConnectionInputs:
        sm._transitions.setdefault((closed, inp), (None, closed))


class HboneForward:
    """`hbone forward` ($HBONE_BIN): every TCP connection accepted on listen (ip:port) becomes an
    HBONE tunnel to server for authority, with the client certificate. Started at once and
    waited for; stop() ends it."""

    def __init__(self, listen, server, authority):
        import os
        import subprocess
        import tempfile
        self.listen = listen
        self.log = tempfile.NamedTemporaryFile(prefix='hbone-fwd-', suffix='.log', delete=False)
        self.proc = subprocess.Popen(
            [os.environ['HBONE_BIN'], 'forward', '--listen', listen, '--server', server,
             '--authority', authority, '--io-backend', os.environ.get('WP_IO_BACKEND', 'auto'),
             '--cert', hbonelib.pki_path('client.pem'), '--key', hbonelib.pki_path('client.key'),
             '--root', hbonelib.pki_path('root.pem')], stderr=self.log,
            stdout=subprocess.DEVNULL)
        ip, _, port = listen.rpartition(':')
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((ip, int(port)), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.05)

    def stop(self):
        """Ends the forwarder; raises AssertionError if a sanitizer reported in its log."""
        import os
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(5)
        self.log.close()
        with open(self.log.name, 'rb') as f:
            text = f.read().decode('utf-8', 'replace')
        os.unlink(self.log.name)
        for m in hbonelib.SANITIZER_MARKERS:
            if m in text:
                raise AssertionError('hbone forward: %s\n%s' % (m, text[-4000:]))
