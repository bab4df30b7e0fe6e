#!/usr/bin/python3
"""L7 helpers for the end-to-end tests: HTTP chains in istiod's shape, HTTP/1.1 backends and an
HTTP/1.1 client speaking inside an HBONE tunnel (hbonelib.Tunnel).

  http_chain      an http_connection_manager filter chain (istiod's waypoint shape: peer metadata,
                  stats, fault/cors placeholders, optional RBAC, router) with an inline
                  RouteConfiguration
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
                    while await self._line(timeout):
                        pass
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
                      timeout=10):
        lines = ['%s %s HTTP/1.1' % (method, path), 'Host: %s' % host]
        lines += ['%s: %s' % (k, v) for k, v in headers]
        payload = b''
        if body is not None:
            if chunked:
                lines.append('Transfer-Encoding: chunked')
                payload = b''.join(b'%x\r\n%s\r\n' % (len(body[i:i + 1000]), body[i:i + 1000])
                                   for i in range(0, len(body), 1000)) + b'0\r\n\r\n'
            else:
                lines.append('Content-Length: %d' % len(body))
                payload = body
        await self.t.send(('\r\n'.join(lines) + '\r\n\r\n').encode() + payload)
        return await self.read_response(head_request=(method == 'HEAD'), timeout=timeout)
