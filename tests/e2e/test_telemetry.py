#!/usr/bin/python3
"""Telemetry end to end: Istio HTTP metrics for L7 requests and access logs for HTTP requests and
TCP tunnels.

One waypoint serves an HTTP chain (RBAC: GET /public/* allowed, the rest denied) with a JSON
access log on /dev/stdout, and a TCP chain with Istio's text access log on /dev/stdout. After N
allowed requests, M denied ones and K TCP tunnels, /stats/prometheus (parsed with
prometheus_client) shows istio_requests_total per response code with the expected labels, a well
formed duration histogram and K TCP connections; the waypoint's stdout holds one access log line
per request and per tunnel with the expected fields.
"""

import asyncio
import base64
import ipaddress
import json
import os
import re
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hbonelib  # noqa: E402
from hbonelib import (CLIENT_ID, T_LISTENER, Endpoint, Service, Waypoint, block_for,  # noqa: E402
                      make_config)
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


class TelemetryTest(hbonelib.AsyncTestCase):

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
                    file_log({'text_format_source': {'inline_string': ISTIO_TEXT}})]
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
    def ip(cls, host):
        return '%s.%d' % (cls.block, host)

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

        # --- access logs (the waypoint's stdout)
        text = self.wp.log_text()
        jl = [json.loads(line) for line in text.splitlines() if line.startswith('{')]
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
        for e in rejected:
            self.assertTrue(e['path'].startswith('/secret/'), e)
            self.assertTrue(e['response_code_details'].startswith(
                'rbac_access_denied_matched_policy['), e)
            self.assertIsNone(e['upstream_host'], e)
            self.assertEqual(e['bytes_sent'], len(b'RBAC: access denied'), e)
        tl = [line for line in text.splitlines()
              if line.startswith('[') and self.tcp.cluster in line]
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


if __name__ == '__main__':
    hbonelib.unittest.main(verbosity=2)
