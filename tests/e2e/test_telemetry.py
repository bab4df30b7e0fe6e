#!/usr/bin/python3
"""Telemetry end to end: Istio HTTP metrics for L7 requests and access logs for HTTP requests and
TCP tunnels.

One waypoint serves an HTTP chain (RBAC: GET /public/* allowed, the rest denied) with a JSON
access log on /dev/stdout, and a TCP chain with Istio's text access log on /dev/stdout. After N
allowed requests, M denied ones and K TCP tunnels, /stats/prometheus (parsed with
prometheus_client) shows istio_requests_total per response code with the expected labels, a well
formed duration histogram and K TCP connections; the waypoint's stdout holds one access log line
per request and per tunnel with the expected fields.

StalledStdoutTest: a waypoint whose stdout is a pipe nobody reads logs every tunnel: traffic goes
on, the lines that do not fit are dropped and counted in /stats (waypoint.access_log.*), and
once the pipe is read every line that was written is whole.
"""

import asyncio
import base64
import ipaddress
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
from hbonelib import (CLIENT_ID, T_LISTENER, Endpoint, Service, Waypoint, block_for,  # noqa: E402
                      client_ssl_context, make_config, server_ssl_context, split_addr)
from l7lib import H1, HttpBackend, http_chain, with_http_chains  # noqa: E402

try:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
except ImportError:
    print('skip: python3-prometheus-client missing')
    sys.exit(77)

T_ADDRESS = 'type.googleapis.com/istio.workload.Address'
T_FILE_LOG = 'type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog'
WEB_POD, TCP_POD = 31, 14
APP_PORT, TCP_PORT = 8080, 9005
N, M, K = 6, 3, 4
PAYLOAD = 1000

# Istio's default text format (MeshConfig accessLogFormat empty, encoding TEXT)
ISTIO_TEXT = (
    '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    '%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% '
    '"%UPSTREAM_TRANSPORT_FAILURE_REASON%" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% '
    '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
    '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%" %UPSTREAM_CLUSTER_RAW% '
    '%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% '
    '%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n')
# connection ids, upstream wire bytes and pool-ready time of L4 tunnels
TCP_IDS = ('WPTCP conn=%CONNECTION_ID% up=%UPSTREAM_CONNECTION_ID% '
           'usent=%UPSTREAM_WIRE_BYTES_SENT% urecv=%UPSTREAM_WIRE_BYTES_RECEIVED% '
           'ready=%UPSTREAM_CONNECTION_POOL_READY_DURATION%\n')
JSON_FORMAT = {
    'start_time': '%START_TIME%', 'method': '%REQ(:METHOD)%',
    'path': '%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%', 'protocol': '%PROTOCOL%',
    'response_code': '%RESPONSE_CODE%', 'response_flags': '%RESPONSE_FLAGS%',
    'response_code_details': '%RESPONSE_CODE_DETAILS%', 'bytes_received': '%BYTES_RECEIVED%',
    'bytes_sent': '%BYTES_SENT%', 'duration': '%DURATION%', 'authority': '%REQ(:AUTHORITY)%',
    'upstream_host': '%UPSTREAM_HOST%', 'upstream_cluster': '%UPSTREAM_CLUSTER_RAW%',
    'downstream_remote_address': '%DOWNSTREAM_REMOTE_ADDRESS%',
    'peer': '%DOWNSTREAM_PEER_URI_SAN%', 'route_name': '%ROUTE_NAME%',
    'local_ip': '%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%',
    'request_duration': '%REQUEST_DURATION%', 'response_duration': '%RESPONSE_DURATION%',
    'upstream_protocol': '%UPSTREAM_PROTOCOL%', 'connection_id': '%CONNECTION_ID%',
    'upstream_connection_id': '%UPSTREAM_CONNECTION_ID%',
    'pool_ready_ms': '%UPSTREAM_CONNECTION_POOL_READY_DURATION%',
    'upstream_us': '%COMMON_DURATION(US_TX_BEG:US_RX_END:us)%',
    'wire_in': '%DOWNSTREAM_WIRE_BYTES_RECEIVED%',
}


def file_log(fmt):
    return {'name': 'envoy.access_loggers.file',
            'typed_config': {'@type': T_FILE_LOG, 'path': '/dev/stdout', 'log_format': fmt}}


def workload(ip, name, ns, sa, canonical, rev='v1'):
    uid = 'Kubernetes//Pod/%s/%s-abc12' % (ns, name)
    return uid, {'workload': {
        'uid': uid, 'name': name + '-abc12', 'namespace': ns,
        'addresses': [base64.b64encode(ipaddress.ip_address(ip).packed).decode()],
        'trust_domain': 'cluster.local', 'service_account': sa,
        'workload_name': name, 'canonical_name': canonical, 'canonical_revision': rev,
        'cluster_id': 'Kubernetes'}}


class BlockTest(hbonelib.AsyncTestCase):
    """A test class on its own 127.x.y.0/24 block (cls.block, set in setUpClass)."""

    @classmethod
    def ip(cls, host):
        return '%s.%d' % (cls.block, host)


class TelemetryTest(BlockTest):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        ip = cls.ip
        cls.web = Service('web', ip(100), 80, [Endpoint(ip(WEB_POD), APP_PORT, True)])
        cls.tcp = Service('tcpecho', ip(101), TCP_PORT, [Endpoint(ip(TCP_POD), TCP_PORT, True)])
        rbac = {'policies': {'public-get': {
            'permissions': [{'and_rules': {'rules': [
                {'header': {'name': ':method', 'string_match': {'exact': 'GET'}}},
                {'url_path': {'path': {'prefix': '/public'}}}]}}],
            'principals': [{'any': True}]}}}
        rc = {'name': 'web', 'validate_clusters': False, 'virtual_hosts': [
            {'name': 'web', 'domains': ['*'], 'routes': [
                {'name': 'web-default', 'match': {'prefix': '/'},
                 'route': {'cluster': cls.web.cluster}}]}]}
        chain = http_chain(cls.web.cluster, rc, rbac=rbac)
        chain['filters'][-1]['typed_config']['access_log'] = [
            file_log({'json_format': JSON_FORMAT})]
        cfg = with_http_chains(make_config(ip(1), [cls.web, cls.tcp]), {cls.web.cluster: chain})
        for fc in cfg['resources'][T_LISTENER]['main_internal']['filter_chains']:
            if fc['name'] == cls.tcp.cluster:
                fc['filters'][-1]['typed_config']['access_log'] = [
                    file_log({'text_format_source': {'inline_string': ISTIO_TEXT}}),
                    file_log({'text_format_source': {'inline_string': TCP_IDS}})]
        cfg['resources'][T_ADDRESS] = dict([
            workload(ip(2), 'sleep', 'default', 'sleep', 'sleep'),
            workload(ip(WEB_POD), 'web-v1', 'bookinfo', 'web', 'web'),
            workload(ip(TCP_POD), 'tcpecho-v1', 'bookinfo', 'tcpecho', 'tcpecho')])
        cls.prom_addr = '%s:15090' % ip(1)
        cls.backend_http = HttpBackend('pod%d' % WEB_POD, ip(WEB_POD), APP_PORT)
        cls.wp = Waypoint(ip(1), cfg, name=cls.__name__,
                          extra_args=['--prometheus-address', cls.prom_addr])
        cls.wp.start()

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)
        cls.backend_http.close()

    async def asyncSetUp(self):
        await super().asyncSetUp()
        for p in (WEB_POD, TCP_POD):
            await self.server(self.ip(p), 15008, mode='forward')
        await self.backend(self.ip(TCP_POD), TCP_PORT, kind='echo')
        self.wp.assert_healthy()

    async def asyncTearDown(self):
        await super().asyncTearDown()
        self.wp.assert_healthy()

    def scrape(self):
        with urllib.request.urlopen('http://%s/stats/prometheus' % self.prom_addr,
                                    timeout=10) as r:
            self.assertEqual(r.status, 200)
            return r.read().decode()

    async def test_http_and_tcp_metrics_and_access_logs(self):
        c = await self.client(self.wp.hbone_addr, local_ip=self.ip(2))
        t = c.open_tunnel(self.web.authority)
        self.assertEqual((await t.wait_response()).status, 200)
        h = H1(t)
        for i in range(N):
            r = await h.request('GET', '/public/%d' % i, host='web.example')
            self.assertEqual(r.status, 200, r)
        for i in range(M):
            r = await h.request('GET', '/secret/%d' % i, host='web.example')
            self.assertEqual(r.status, 403, r)
        for i in range(K):
            tt, r = None, None
            tt = c.open_tunnel(self.tcp.authority)
            self.assertEqual((await tt.wait_response()).status, 200)
            await tt.send(b'y' * PAYLOAD)
            self.assertEqual(await tt.recv_exactly(PAYLOAD), b'y' * PAYLOAD)
            await tt.send_eof()
            self.assertEqual(await tt.recv_all(), b'')
            await tt.wait_closed()
        await asyncio.sleep(0.5)  # the last tunnel's upstream side closes asynchronously

        # --- metrics
        fams = {f.name: f for f in text_string_to_metric_families(
            await asyncio.to_thread(self.scrape))}
        want = {
            'reporter': 'waypoint', 'source_workload': 'sleep',
            'source_workload_namespace': 'default', 'source_canonical_service': 'sleep',
            'source_principal': CLIENT_ID,
            'destination_workload': 'web-v1', 'destination_workload_namespace': 'bookinfo',
            'destination_canonical_service': 'web',
            'destination_principal': 'spiffe://cluster.local/ns/bookinfo/sa/web',
            'destination_service': self.web.host, 'destination_service_name': 'web',
            'destination_service_namespace': 'bookinfo', 'request_protocol': 'http',
            'response_flags': '-', 'grpc_response_status': '',
            'connection_security_policy': 'mutual_tls',
        }

        def samples(family, suffix, **extra):
            lab = dict(want, **extra)
            return [s for s in fams[family].samples if s.name == family + suffix and
                    all(s.labels.get(k) == v for k, v in lab.items())]

        ok = samples('istio_requests', '_total', response_code='200')
        self.assertEqual([s.value for s in ok], [N], fams['istio_requests'].samples)
        denied = [s for s in fams['istio_requests'].samples
                  if s.labels.get('response_code') == '403']
        self.assertEqual([s.value for s in denied], [M], fams['istio_requests'].samples)
        self.assertEqual(denied[0].labels['source_principal'], CLIENT_ID)
        self.assertEqual(denied[0].labels['request_protocol'], 'http')
        self.assertEqual(denied[0].labels['response_flags'], '-')
        self.assertEqual(denied[0].labels['destination_service'], 'web.example')
        for fam in ('istio_request_duration_milliseconds', 'istio_request_bytes',
                    'istio_response_bytes'):
            buckets = samples(fam, '_bucket', response_code='200')
            count = samples(fam, '_count', response_code='200')
            total = samples(fam, '_sum', response_code='200')
            self.assertEqual([s.value for s in count], [N], fam)
            self.assertEqual(len(total), 1, fam)
            self.assertGreaterEqual(total[0].value, 0)
            les = [(float(s.labels['le']), s.value) for s in buckets]
            self.assertEqual(les, sorted(les), fam)
            vals = [v for _, v in les]
            self.assertEqual(vals, sorted(vals), (fam, 'buckets not cumulative', les))
            self.assertEqual(les[-1], (float('inf'), N), fam)
            if fam != 'istio_request_duration_milliseconds':
                self.assertGreater(total[0].value, 0, fam)  # wire bytes, heads included
        tcp = [s for s in fams['istio_tcp_connections_opened'].samples
               if s.labels.get('destination_service') == self.tcp.host]
        self.assertEqual([s.value for s in tcp], [K], fams['istio_tcp_connections_opened'].samples)

        # --- access logs (the waypoint's stdout, written by its access-log writer thread)
        deadline = time.monotonic() + 5
        while True:
            text = self.wp.log_text()
            jl = [json.loads(line) for line in text.splitlines() if line.startswith('{')]
            tl = [line for line in text.splitlines()
                  if line.startswith('[') and self.tcp.cluster in line]
            if (len(jl), len(tl)) == (N + M, K) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        self.assertEqual(len(jl), N + M, text[-3000:])
        allowed = [e for e in jl if e['response_code'] == 200]
        rejected = [e for e in jl if e['response_code'] == 403]
        self.assertEqual((len(allowed), len(rejected)), (N, M), jl)
        self.assertEqual(sorted(e['path'] for e in allowed),
                         sorted('/public/%d' % i for i in range(N)))
        for e in allowed:
            self.assertEqual((e['method'], e['protocol'], e['authority']),
                             ('GET', 'HTTP/1.1', 'web.example'), e)
            self.assertEqual(e['response_flags'], '-', e)
            self.assertEqual(e['response_code_details'], 'via_upstream', e)
            self.assertEqual(e['upstream_cluster'], self.web.cluster, e)
            self.assertEqual(e['upstream_host'], '%s:%d' % (self.ip(WEB_POD), APP_PORT), e)
            self.assertEqual(e['route_name'], 'web-default', e)
            self.assertEqual(e['bytes_received'], 0, e)
            self.assertGreater(e['bytes_sent'], 0, e)
            self.assertIsInstance(e['duration'], int, e)
            self.assertEqual(e['peer'], CLIENT_ID, e)
            self.assertEqual(e['local_ip'], self.web.authority, e)
            self.assertTrue(e['downstream_remote_address'].startswith(self.ip(2) + ':'), e)
            # timing and ids of the upstream exchange
            self.assertIsInstance(e['request_duration'], int, e)
            self.assertIsInstance(e['response_duration'], int, e)
            self.assertLessEqual(e['response_duration'], e['duration'], e)
            self.assertEqual(e['upstream_protocol'], 'HTTP/1.1', e)
            self.assertIsInstance(e['pool_ready_ms'], int, e)
            self.assertIsInstance(e['upstream_us'], int, e)
            self.assertGreater(e['upstream_us'], 0, e)
            self.assertGreater(e['wire_in'], 0, e)
            self.assertGreater(e['connection_id'], 0, e)
            self.assertGreater(e['upstream_connection_id'], 0, e)
            self.assertNotEqual(e['connection_id'], e['upstream_connection_id'], e)
        # all requests came on one client connection; kept-alive upstream: one connection
        self.assertEqual(len({e['connection_id'] for e in jl}), 1, jl)
        self.assertEqual(len({e['upstream_connection_id'] for e in allowed}), 1, allowed)
        for e in rejected:
            # RBAC answered: nothing went upstream
            self.assertIsNone(e['response_duration'], e)
            self.assertIsNone(e['upstream_protocol'], e)
            self.assertIsNone(e['upstream_connection_id'], e)
            self.assertTrue(e['path'].startswith('/secret/'), e)
            self.assertTrue(e['response_code_details'].startswith(
                'rbac_access_denied_matched_policy['), e)
            self.assertIsNone(e['upstream_host'], e)
            self.assertEqual(e['bytes_sent'], len(b'RBAC: access denied'), e)
        self.assertEqual(len(tl), K, text[-3000:])
        pat = re.compile(r'^\[\d{4}-\d\d-\d\dT[0-9:.]+Z\] "- - -" 0 - - - "-" (\d+) (\d+) (\d+) '
                         r'- "-" "-" "-" "-" "([^"]+)" (\S+) - (\S+) (\S+) - -$')
        for line in tl:
            m = pat.match(line)
            self.assertIsNotNone(m, line)
            self.assertEqual((int(m.group(1)), int(m.group(2))), (PAYLOAD, PAYLOAD), line)
            self.assertEqual(m.group(4), '%s:%d' % (self.ip(TCP_POD), TCP_PORT), line)
            self.assertEqual(m.group(5), self.tcp.cluster, line)
            self.assertEqual(m.group(6), self.tcp.authority, line)
            self.assertTrue(m.group(7).startswith(self.ip(2) + ':'), line)
        ids = [re.match(r'^WPTCP conn=(\d+) up=(\d+) usent=(\d+) urecv=(\d+) ready=(\d+)$', line)
               for line in text.splitlines() if line.startswith('WPTCP')]
        self.assertEqual(len(ids), K, text[-3000:])
        self.assertTrue(all(ids), text[-3000:])
        # all K tunnels came on one client connection and left on one pooled upstream one
        self.assertEqual(len({m.group(1) for m in ids}), 1, ids)
        self.assertEqual(len({m.group(2) for m in ids}), 1, ids)
        self.assertNotEqual(ids[0].group(1), ids[0].group(2))
        for m in ids:
            self.assertEqual((int(m.group(3)), int(m.group(4))), (PAYLOAD, PAYLOAD), m.group(0))
            self.assertLess(int(m.group(5)), 5000, m.group(0))


class PipedWaypoint(Waypoint):
    """A waypoint whose stdout is a pipe (self.stdout_r, non-blocking) that the test reads, or
    not; stderr goes to the log file."""

    def start(self, timeout=20):
        argv = self.argv()
        self.log = open(self.log_path, 'wb')
        self.stdout_r, w = os.pipe()
        os.set_blocking(self.stdout_r, False)
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=w, stderr=self.log)
        os.close(w)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError('waypoint exited during startup\n' + self.tail())
            try:
                if self.admin_get('/ready', timeout=1)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError('waypoint not ready\n' + self.tail())

    def stats(self):
        status, body = self.admin_get('/stats?filter=access_log')
        assert status == 200, (status, body)
        return {k: int(v) for k, v in (line.split(': ') for line in body.decode().splitlines())}

    def read_stdout(self):
        out = b''
        while True:
            try:
                chunk = os.read(self.stdout_r, 1 << 20)
            except BlockingIOError:
                return out
            if not chunk:
                return out
            out += chunk


class StalledStdoutTest(BlockTest):
    TUNNELS = 5000  # ~350-byte lines: far more than the pipe plus the workers' queues hold

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        ip = cls.ip
        cls.svc = Service('logged', ip(100), 9000, [Endpoint(ip(11), 9000, True)])
        cfg = make_config(ip(1), [cls.svc])
        for fc in cfg['resources'][T_LISTENER]['main_internal']['filter_chains']:
            if fc['name'] == cls.svc.cluster:
                fc['filters'][-1]['typed_config']['access_log'] = [
                    file_log({'text_format_source': {'inline_string': ISTIO_TEXT}})]
        cls.wp = PipedWaypoint(ip(1), cfg, name=cls.__name__,
                               extra_args=['--concurrency', '2'])
        cls.wp.start()

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)
        os.close(cls.wp.stdout_r)

    async def test_stalled_stdout_drops_counted_traffic_flows_lines_whole(self):
        from test_cardinality import Source, Stand
        loop = asyncio.get_running_loop()
        counts = {'connects': 0}
        server = await loop.create_server(lambda: Stand(counts), self.ip(11), 15008,
                                          ssl=server_ssl_context(cert='dest'),
                                          reuse_address=True)
        self.addAsyncCleanup(server.wait_closed)
        self.addCleanup(server.close)
        self.addCleanup(lambda: [t.close() for t in counts.get('transports', [])])
        names = (b'w-%05d' % i for i in range(self.TUNNELS))
        protos = []
        t0 = time.monotonic()
        for _ in range(2):
            done = loop.create_future()
            _, p = await loop.create_connection(
                lambda d=done: Source(self.svc.authority, names, d, window=100),
                *split_addr(self.wp.hbone_addr), ssl=client_ssl_context(),
                local_addr=(self.ip(2), 0), server_hostname=None)
            protos.append((p, done))
        # nobody reads stdout meanwhile: the tunnels must not wait for it
        await asyncio.wait_for(asyncio.gather(*(d for _, d in protos)), 60)
        elapsed = time.monotonic() - t0
        self.assertEqual(sum(p.ok for p, _ in protos), self.TUNNELS)
        for p, _ in protos:
            p.transport.close()
        deadline = time.monotonic() + 10
        while True:  # the last tunnels' lines are logged when they close
            st = self.wp.stats()
            if st['waypoint.access_log.queued'] + st['waypoint.access_log.dropped'] >= \
                    self.TUNNELS or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        sys.stderr.write('\n  %d tunnels in %.1f s with stdout stalled: %r\n' %
                         (self.TUNNELS, elapsed, st))
        self.assertEqual(st['waypoint.access_log.queued'] + st['waypoint.access_log.dropped'],
                         self.TUNNELS)
        self.assertGreater(st['waypoint.access_log.dropped'], self.TUNNELS // 4)
        self.assertLess(st['waypoint.access_log.written'], st['waypoint.access_log.queued'])

        # read the pipe: what was queued is written, line by line, each whole
        out = b''
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out += self.wp.read_stdout()
            st = self.wp.stats()
            if st['waypoint.access_log.written'] == st['waypoint.access_log.queued']:
                out += self.wp.read_stdout()
                if out.count(b'\n') == st['waypoint.access_log.written']:
                    break
            await asyncio.sleep(0.05)
        self.assertEqual(st['waypoint.access_log.write_errors'], 0)
        # bounded: what was accepted fit in the 2 workers' queues (256 KiB each), the pipe
        # (64 KiB) and the writer's batch
        self.assertLessEqual(len(out), 2 * 256 * 1024 + 64 * 1024 + 4096)
        lines = out.decode().split('\n')
        self.assertEqual(lines[-1], '')
        lines = lines[:-1]
        self.assertEqual(len(lines), st['waypoint.access_log.queued'])
        pat = re.compile(r'^\[\d{4}-\d\d-\d\dT[0-9:.]+Z\] "- - -" 0 - - - "-" 0 0 \d+ '
                         r'- "-" "-" "-" "-" "([^"]+)" (\S+) - (\S+) (\S+) - -$')
        for line in lines:
            m = pat.match(line)
            self.assertIsNotNone(m, line)
            self.assertEqual(m.group(2), self.svc.cluster, line)
        # the pipe drained, new lines go through again
        before = st['waypoint.access_log.written']
        done = loop.create_future()
        _, p = await loop.create_connection(
            lambda: Source(self.svc.authority, iter([b'late']), done, window=1),
            *split_addr(self.wp.hbone_addr), ssl=client_ssl_context(),
            local_addr=(self.ip(2), 0), server_hostname=None)
        await asyncio.wait_for(done, 10)
        p.transport.close()
        deadline = time.monotonic() + 5
        while self.wp.stats()['waypoint.access_log.written'] == before and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.assertTrue(pat.match(self.wp.read_stdout().decode().rstrip('\n')))


if __name__ == '__main__':
    hbonelib.unittest.main(verbosity=2)
