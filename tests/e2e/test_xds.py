#!/usr/bin/python3
"""The waypoint as a member of a mesh: identity from the Istio CA and config over ADS, both from
fakeistiod (an istiod stand-in on grpcio, in this process). No --config-file, no static cert.

Covers: boot from istiod only (node identity, CSR, readiness), refusing tunnels before the first
config, an endpoint push while a long tunnel streams, certificate rotation under traffic, a NACK
with the old config still serving, istiod restarting, a wrong token, and SotW ADS.
"""

import asyncio
import os
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

try:
    from fakeistiod import FakeIstiod, T_CLUSTER, T_CLA, T_LISTENER, NackError  # noqa: E402
except Exception as e:  # python3-grpcio / protoc missing
    print('skip: fakeistiod unavailable: %s' % e)
    sys.exit(77)

POD = 'bookinfo-waypoint-5d9c7b6f4-q8w2e'
LONG_SECONDS = float(os.environ.get('WP_E2E_LONG_SECONDS', '60'))


class XdsWaypoint(Waypoint):
    """A waypoint started the way the stock Deployment starts it: only istiod's address, the
    token and the mesh root (plus the pod identity pilot-agent gets from the environment)."""

    def __init__(self, ip, istiod, token_path, extra_args=(), name='xds'):
        super().__init__(ip, config=None, extra_args=extra_args, name=name)
        self.istiod = istiod
        self.token_path = token_path
        self.status_addr = '%s:15021' % ip

    def argv(self):
        args = [waypoint_bin(),
                '--xds-address', self.istiod.address,
                '--root-cert', pki_path('root.pem'),
                '--token-file', self.token_path,
                '--pod-name', POD, '--pod-namespace', 'bookinfo', '--pod-ip', self.ip,
                '--service-account', 'bookinfo-waypoint', '--cluster-id', 'Kubernetes',
                '--trust-domain', TRUST_DOMAIN,
                '--hbone-address', self.hbone_addr,
                '--admin-address', self.admin_addr,
                '--status-address', self.status_addr,
                '--metrics-address', '%s:15020' % self.ip,
                '--prometheus-address', '%s:15090' % self.ip,
                '--io-backend', io_backend()]
        if os.environ.get('WP_E2E_LOG_LEVEL'):
            args += ['--log-level', os.environ['WP_E2E_LOG_LEVEL']]
        return args + self.extra_args

    def start_unready(self, timeout=10):
        """Starts the process and waits until its admin port answers (ready or not)."""
        argv = self.argv()
        self.log = open(self.log_path, 'wb')
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError('waypoint exited with %d\n%s' % (self.proc.returncode,
                                                                      self.tail()))
            try:
                self.admin_get('/server_info', timeout=1)
                return self
            except OSError:
                time.sleep(0.05)
        raise AssertionError('admin never answered\n' + self.tail())

    def ready_status(self):
        try:
            with urllib.request.urlopen('http://%s/healthz/ready' % self.status_addr,
                                        timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


class XdsCase(AsyncTestCase):
    ttl_override = None

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.block = block_for(self.id())
        self.topo = await Topology(self.block).start(self)
        self.tmp = tempfile.mkdtemp(prefix='wp-xds-')
        self.token_path = os.path.join(self.tmp, 'istio-token')
        self.write_token('token-1')
        self.fi = FakeIstiod(pki_dir(), listen='%s:15012' % self.topo.ip(5), token='token-1',
                             ca_ttl_override=self.ttl_override)
        self.fi.start()
        self._closers.append(self.fi.close)

    def write_token(self, tok):
        with open(self.token_path + '.tmp', 'w') as f:
            f.write(tok + '\n')
        os.replace(self.token_path + '.tmp', self.token_path)

    def waypoint(self, extra_args=()):
        wp = XdsWaypoint(self.topo.wp_ip, self.fi, self.token_path, extra_args=extra_args,
                         name=self.id().split('.')[-1])
        self._closers.append(lambda: wp.stop(check=True))
        return wp

    async def client(self, addr=None, **kw):
        kw.setdefault('local_ip', self.topo.client_ip)
        return await super().client(addr or '%s:15008' % self.topo.wp_ip, **kw)

    async def echo(self, c, service='echo', payload=None):
        payload = payload or os.urandom(2000)
        t, r = await c.connect_tunnel(self.topo.authority(service))
        self.assertEqual(r.status, 200, r.headers)
        await t.send(payload)
        self.assertEqual(await t.recv_exactly(len(payload)), payload)
        await t.send_eof()
        self.assertEqual(await t.recv_all(), b'')
        return t


class BootTest(XdsCase):

    async def test_boots_from_istiod_only_and_carries_a_tunnel(self):
        self.fi.set_config(self.topo.config())
        wp = self.waypoint().start()
        # identity: one CSR for our SPIFFE id, authenticated with the token
        ca = [r for r in self.fi.ca_requests() if r.ok]
        self.assertGreaterEqual(len(ca), 1, self.fi.ca_requests())
        self.assertEqual(ca[0].csr_uris, [WAYPOINT_ID])
        self.assertEqual(ca[0].clusterid, 'Kubernetes')
        # the Node is what pilot-agent sends for a waypoint
        node = self.fi.last_node()
        self.assertEqual(node['id'], 'waypoint~%s~%s.bookinfo~bookinfo.svc.cluster.local' %
                         (self.topo.wp_ip, POD))
        md = node['metadata']
        for k, v in (('NAMESPACE', 'bookinfo'), ('NAME', POD), ('INSTANCE_IPS', self.topo.wp_ip),
                     ('SERVICE_ACCOUNT', 'bookinfo-waypoint'), ('CLUSTER_ID', 'Kubernetes')):
            self.assertEqual(md.get(k), v, md)
        self.assertIn('ISTIO_VERSION', md)
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 10)
        self.assertEqual(wp.ready_status(), 200)
        # the certificate the CA issued is the one the waypoint presents
        c = await self.client()
        self.assertEqual(c.ep.peer_uri_sans, [WAYPOINT_ID])
        await self.echo(c)
        await self.echo(c, 'plain')
        wp.assert_healthy()

    async def test_refuses_tunnels_until_the_first_config(self):
        wp = self.waypoint().start_unready()
        # certificate arrives, config does not: not ready, tunnels refused (not mis-routed)
        await asyncio.to_thread(self.fi.wait_for_ca_request, 0, 10)
        await asyncio.sleep(0.5)
        self.assertEqual(wp.ready_status(), 503)
        c = await self.client()
        t = c.open_tunnel(self.topo.authority('echo'))
        r = await t.wait_response()
        self.assertEqual(r.status, 503)
        self.assertEqual(r.headers.get('x-waypoint-error'), 'not_ready')
        self.fi.set_config(self.topo.config())
        deadline = time.monotonic() + 10
        while wp.ready_status() != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        self.assertEqual(wp.ready_status(), 200)
        await self.echo(c)
        wp.assert_healthy()

    async def test_sotw_ads(self):
        self.fi.set_config(self.topo.config())
        wp = self.waypoint(['--xds-sotw']).start()
        self.assertEqual(self.fi.last_stream().api, 'sotw')
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 10)
        c = await self.client()
        await self.echo(c)
        wp.assert_healthy()


class UpdateTest(XdsCase):

    async def test_invalid_resource_is_nacked_and_old_config_keeps_serving(self):
        cfg = self.topo.config()
        self.fi.set_config(cfg)
        wp = self.waypoint().start()
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 10)
        bad = json.loads(json.dumps(cfg['resources'][T_LISTENER]['main_internal']))
        for fc in bad['filter_chains']:
            for f in fc['filters']:
                if f['name'] == 'envoy.filters.network.tcp_proxy':
                    f['typed_config']['cluster'] = 'no-such-cluster'
        mark = self.fi.mark()
        self.fi.update(T_LISTENER, {'main_internal': bad})
        rec = await asyncio.to_thread(self.fi.wait_for_nack, T_LISTENER, None, 10, mark)
        self.assertIn("unknown cluster 'no-such-cluster'", rec.error_message)
        self.assertEqual(rec.error_code, 3)  # INVALID_ARGUMENT
        c = await self.client()
        await self.echo(c)
        # a later good update is accepted again
        mark = self.fi.mark()
        self.fi.update(T_LISTENER, {'main_internal': cfg['resources'][T_LISTENER]['main_internal']})
        await asyncio.to_thread(self.fi.wait_for_ack, T_LISTENER, None, 10)
        await self.echo(c)
        wp.assert_healthy()

    async def test_istiod_restart_keeps_traffic_and_resubscribes(self):
        self.fi.set_config(self.topo.config())
        wp = self.waypoint().start()
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 10)
        c = await self.client()
        long, r = await c.connect_tunnel(self.topo.authority('echo'))
        self.assertEqual(r.status, 200)
        await long.send(b'before')
        self.assertEqual(await long.recv_exactly(6), b'before')
        mark = self.fi.mark()
        await asyncio.to_thread(self.fi.restart, 1.0)
        await asyncio.to_thread(self.fi.wait_for_streams, 1, 30)
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 30)
        reqs = [r for r in self.fi.requests(T_CLUSTER, after=mark) if r.kind == 'request']
        self.assertTrue(reqs, self.fi.requests(after=mark))
        self.assertTrue(reqs[0].initial_resource_versions,
                        'reconnect did not resend the versions it holds')
        await long.send(b'after')
        self.assertEqual(await long.recv_exactly(5), b'after')
        await self.echo(c)
        await long.send_eof()
        self.assertEqual(await long.recv_all(), b'')
        wp.assert_healthy()

    async def test_wrong_token_is_refused_and_retried_with_backoff(self):
        self.write_token('wrong-token')
        self.fi.set_config(self.topo.config())
        wp = self.waypoint().start_unready()
        await asyncio.sleep(4)
        fails = self.fi.auth_failures()
        self.assertGreaterEqual(len(fails), 2, fails)
        self.assertLess(len(fails), 20, 'retries without backoff: %d in 4 s' % len(fails))
        self.assertEqual(wp.ready_status(), 503)
        wp.assert_healthy()
        self.assertIn('authentication failure', wp.log_text())
        self.write_token('token-1')
        deadline = time.monotonic() + 40
        while wp.ready_status() != 200 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        self.assertEqual(wp.ready_status(), 200, wp.tail())
        c = await self.client()
        await self.echo(c)


class LongTunnelTest(XdsCase):
    ttl_override = 30

    async def test_endpoint_push_and_rotations_during_a_long_tunnel(self):
        """A LONG_SECONDS tunnel streams while istiod moves the echo service to one endpoint
        and the 30 s certificate rotates about every 15 s: the tunnel never notices, new
        tunnels follow the new endpoints and present the newest certificate."""
        cfg = self.topo.config()
        self.fi.set_config(cfg)
        wp = self.waypoint().start()
        await asyncio.to_thread(self.fi.wait_synced, [T_CLUSTER, T_CLA, T_LISTENER], 10)
        c = await self.client()
        long, r = await c.connect_tunnel(self.topo.authority('echo'))
        self.assertEqual(r.status, 200)
        await long.send(b'x')
        self.assertEqual(await long.recv_exactly(1), b'x')
        first_dest = [h for h in (11, 12) if self.topo.dest[h].records]
        self.assertEqual(len(first_dest), 1)
        survivor = 23 - first_dest[0]  # the endpoint that stays after the push (11 <-> 12)
        start = time.monotonic()
        pushed = False
        n = 0
        while time.monotonic() - start < LONG_SECONDS:
            msg = b'chunk-%06d|' % n + os.urandom(1000)
            await long.send(msg)
            self.assertEqual(await long.recv_exactly(len(msg)), msg)
            n += 1
            if not pushed and time.monotonic() - start > 2:
                cla = json.loads(json.dumps(
                    cfg['resources'][T_CLA][self.topo.services['echo'].cluster]))
                cla['endpoints'][0]['lb_endpoints'] = [
                    e for e in cla['endpoints'][0]['lb_endpoints']
                    if self.topo.ip(survivor) in json.dumps(e)]
                self.assertEqual(len(cla['endpoints'][0]['lb_endpoints']), 1)
                self.fi.update(T_CLA, {self.topo.services['echo'].cluster: cla})
                await asyncio.to_thread(self.fi.wait_for_ack, T_CLA, None, 10)
                pushed = True
                # new tunnels all go to the surviving endpoint
                before = len(self.topo.dest[survivor].records)
                for _ in range(4):
                    await self.echo(await self.client())
                self.assertEqual(len(self.topo.dest[survivor].records), before + 4)
            await asyncio.sleep(0.1)
        await long.send_eof()
        self.assertEqual(await long.recv_all(), b'')
        self.assertTrue(pushed)
        ok = [r for r in self.fi.ca_requests() if r.ok]
        if LONG_SECONDS >= 50:
            self.assertGreaterEqual(len(ok) - 1, 3, 'expected 3 rotations in %ds: %r' %
                                    (LONG_SECONDS, ok))
        # a new connection presents the newest certificate
        newest = ok[-1]
        c2 = await self.client()
        self.assertEqual(c2.ep.peer_uri_sans, [WAYPOINT_ID])
        if hasattr(c2.ep, 'peer_cert_serial'):
            self.assertEqual(c2.ep.peer_cert_serial, newest.serial)
        await self.echo(c2)
        wp.assert_healthy()


if __name__ == '__main__':
    unittest.main(verbosity=2)
