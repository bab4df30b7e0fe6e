#!/usr/bin/python3
"""Istio standard metrics for L4 tunnels, scraped from :15020 and :15090 /stats/prometheus and
parsed with Debian's prometheus_client: after K tunnels of known size, the istio_tcp_* series
carry the expected labels (source from WDS by source IP and from the client certificate,
destination from the endpoint's WDS workload and the cluster's istio service metadata) and the
expected counts and bytes."""

import asyncio
import base64
import ipaddress
import os
import socket
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

try:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
except ImportError:
    print('skip: python3-prometheus-client missing')
    sys.exit(77)

T_ADDRESS = 'type.googleapis.com/istio.workload.Address'
K = 5
PAYLOAD = 1000


def workload(uid, ip, name, ns, sa, canonical, rev='v1'):
    return {'workload': {
        'uid': uid, 'name': name + '-abc12', 'namespace': ns,
        'addresses': [base64.b64encode(ipaddress.ip_address(ip).packed).decode()],
        'trust_domain': 'cluster.local', 'service_account': sa,
        'workload_name': name, 'canonical_name': canonical, 'canonical_revision': rev,
        'cluster_id': 'Kubernetes'}}


class MetricsTest(WaypointTestCase):

    @classmethod
    def setUpClass(cls):
        pki_dir()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        cls.topo = Topology(cls.block)
        cfg = cls.topo.config()
        cfg['resources'][T_ADDRESS] = {
            'Kubernetes//Pod/default/sleep-abc12':
                workload('Kubernetes//Pod/default/sleep-abc12', cls.topo.client_ip, 'sleep',
                         'default', 'sleep', 'sleep'),
            'Kubernetes//Pod/bookinfo/echo-v1-abc12':
                workload('Kubernetes//Pod/bookinfo/echo-v1-abc12', cls.topo.ip(14), 'echo-v1',
                         'bookinfo', 'echo', 'echo', 'v1'),
        }
        cls.metrics_addr = '%s:15020' % cls.topo.wp_ip
        cls.prom_addr = '%s:15090' % cls.topo.wp_ip
        cls.wp = Waypoint(cls.topo.wp_ip, cfg, name=cls.__name__,
                          extra_args=['--metrics-address', cls.metrics_addr,
                                      '--prometheus-address', cls.prom_addr])
        cls.wp.start()
        cls._extra_ip = 3

    def scrape(self, addr):
        with urllib.request.urlopen('http://%s/stats/prometheus' % addr, timeout=10) as r:
            self.assertEqual(r.status, 200)
            self.assertIn('text/plain', r.headers.get('content-type'))
            return r.read().decode()

    def families(self, text):
        return {f.name: f for f in text_string_to_metric_families(text)}

    async def test_tcp_metrics_count_tunnels_and_bytes_with_labels(self):
        c = await self.wp_client()
        for i in range(K):
            t, r = await c.connect_tunnel(self.topo.authority('hbone_echo'))
            self.assertEqual(r.status, 200)
            await t.send(b'x' * PAYLOAD)
            self.assertEqual(await t.recv_exactly(PAYLOAD), b'x' * PAYLOAD)
            await t.send_eof()
            self.assertEqual(await t.recv_all(), b'')
            await t.wait_closed()
        await asyncio.sleep(0.3)  # the last tunnel's upstream side closes asynchronously
        for addr in (self.prom_addr, self.metrics_addr):
            fams = self.families(await asyncio.to_thread(self.scrape, addr))
            self.assertIn('istio_build', fams)
            want = {
                'reporter': 'waypoint',
                'source_workload': 'sleep', 'source_workload_namespace': 'default',
                'source_canonical_service': 'sleep',
                'source_principal': 'spiffe://cluster.local/ns/default/sa/sleep',
                'destination_workload': 'echo-v1', 'destination_workload_namespace': 'bookinfo',
                'destination_canonical_service': 'echo',
                'destination_principal': 'spiffe://cluster.local/ns/bookinfo/sa/echo',
                'destination_service': 'hbone-echo.bookinfo.svc.cluster.local',
                'destination_service_name': 'hbone-echo',
                'destination_service_namespace': 'bookinfo',
                'request_protocol': 'tcp', 'connection_security_policy': 'mutual_tls',
            }

            def value(family, suffix=''):
                samples = [s for s in fams[family].samples
                           if all(s.labels.get(k) == v for k, v in want.items())]
                self.assertEqual(len(samples), 1, (family, [s.labels for s in
                                                            fams[family].samples]))
                return samples[0].value

            # prometheus_client strips _total from counter family names
            self.assertEqual(value('istio_tcp_connections_opened'), K)
            self.assertEqual(value('istio_tcp_connections_closed'), K)
            self.assertEqual(value('istio_tcp_received_bytes'), K * PAYLOAD)
            self.assertEqual(value('istio_tcp_sent_bytes'), K * PAYLOAD)

    def raw_get(self, addr, request):
        """Sends request on a fresh connection, reads to EOF: (head lines, body bytes)."""
        ip, port = addr.rsplit(':', 1)
        with socket.create_connection((ip, int(port)), timeout=10) as s:
            s.sendall(request)
            data = b''
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b'\r\n\r\n')
        return head.decode().split('\r\n'), body

    def dechunk(self, body):
        """Strict chunked decoding: sizes in hex, CRLF after each chunk, last chunk 0."""
        out = b''
        while True:
            line, sep, body = body.partition(b'\r\n')
            self.assertEqual(sep, b'\r\n', 'truncated chunk size line')
            size = int(line, 16)
            if size == 0:
                self.assertEqual(body, b'\r\n', 'after the last chunk')
                return out
            self.assertGreaterEqual(len(body), size + 2)
            out += body[:size]
            self.assertEqual(body[size:size + 2], b'\r\n')
            body = body[size + 2:]

    async def test_page_streamed_chunked_or_close_delimited(self):
        """HTTP/1.1 gets a chunked page, HTTP/1.0 the same bytes delimited by the close, HEAD
        the head only; both parse. On :15090, :15020 and the admin listener."""
        for addr in (self.prom_addr, self.metrics_addr, self.wp.admin_addr):
            head11, body11 = await asyncio.to_thread(
                self.raw_get, addr, b'GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n')
            head10, body10 = await asyncio.to_thread(
                self.raw_get, addr, b'GET /stats/prometheus HTTP/1.0\r\n\r\n')
            headh, bodyh = await asyncio.to_thread(
                self.raw_get, addr, b'HEAD /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n')
            self.assertEqual(head11[0], 'HTTP/1.1 200 OK')
            self.assertIn('Transfer-Encoding: chunked', head11)
            self.assertFalse([h for h in head11 if h.lower().startswith('content-length')])
            self.assertEqual(head10[0], 'HTTP/1.1 200 OK')
            self.assertFalse([h for h in head10 if h.lower().startswith(('content-length',
                                                                          'transfer-encoding'))])
            self.assertEqual(headh[0], 'HTTP/1.1 200 OK')
            self.assertEqual(bodyh, b'')
            page = self.dechunk(body11)
            self.assertEqual(page, body10)  # no traffic in between: same page
            self.assertTrue(page.endswith(b'\n'))
            fams = self.families(page.decode())
            self.assertIn('istio_build', fams)
            self.assertIn('istio_waypoint_metrics_overflow', fams)

    async def test_status_port_serves_readiness_not_admin(self):
        with urllib.request.urlopen('http://%s/healthz/ready' % self.metrics_addr,
                                    timeout=5) as r:
            self.assertEqual(r.status, 200)
        for addr, path in ((self.metrics_addr, '/config_dump'), (self.prom_addr, '/ready')):
            try:
                urllib.request.urlopen('http://%s%s' % (addr, path), timeout=5)
                self.fail('%s%s should not be served' % (addr, path))
            except urllib.error.HTTPError as e:
                self.assertEqual(e.code, 404)


if __name__ == '__main__':
    unittest.main(verbosity=2)
