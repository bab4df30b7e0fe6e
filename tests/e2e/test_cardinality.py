#!/usr/bin/python3
"""The metric cardinality cap end to end, through the daemon: 100,000 distinct source workloads
(a distinct `baggage` k8s.deployment.name on each CONNECT from a source IP that WDS does not
know, so the source labels come from the baggage, as Istio's peer metadata) against
--max-metric-series CAP. Each tunnel is established through the waypoint to a destination
stand-in that answers 200, so each opens (and, when both sides end it, closes) one istio_tcp
series.

Checked: the page holds exactly CAP istio_tcp series per counter plus the overflow counter,
which equals the excess (sources - CAP); every stored series counted one open and one close;
the daemon's VmRSS after 100,000 sources, with STALLED scrapers stuck mid-page, is within a
small bound of its VmRSS after 20,000 (the cap was reached by then); prometheus_client parses
the whole (chunked) page, fetched while those scrapers stall; tunnels still flow meanwhile.

The peers are lean python3-h2 endpoints (many streams per connection, no per-tunnel records) so
that the run stays well under a minute under ASan."""

import asyncio
import os
import socket
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402
import h2.settings  # noqa: E402

try:
    from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
except ImportError:
    print('skip: python3-prometheus-client missing')
    sys.exit(77)

CAP = 4000
SOURCES = 100000
CHECKPOINT = 20000
CONNS = 4            # client HBONE connections
WINDOW = 200         # streams in flight per connection
RSS_SLACK = 8 * MiB  # allowed VmRSS growth from CHECKPOINT to SOURCES sources
SLOTS = 32           # the admin server's clients (waypoint/admin.c CLIENTS_MAX)
PER_SCRAPER = 256 * KiB  # bound on what one stalled scraper may hold (a page is ~12 MiB)
STALLED = 40         # scrapers that stop reading mid-page (more than the 32 client slots)

H2_FAST = dict(header_encoding=None, validate_outbound_headers=False,
               normalize_outbound_headers=False, validate_inbound_headers=False,
               normalize_inbound_headers=False)


class Stand(asyncio.Protocol):
    """Destination stand-in: every CONNECT gets 200 (the tunnel is established) and is ended
    when the peer ends it; anything it sends is acknowledged and dropped."""

    def __init__(self, counts):
        self.counts = counts
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                         **H2_FAST))

    def connection_made(self, transport):
        self.transport = transport
        self.counts.setdefault('transports', []).append(transport)
        # in force from the start: the waypoint may open streams before it sees our SETTINGS
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 4000})
        self.conn.initiate_connection()
        transport.write(self.conn.data_to_send())

    def data_received(self, data):
        for ev in self.conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                self.counts['connects'] += 1
                self.conn.send_headers(ev.stream_id, [(b':status', b'200')])
            elif isinstance(ev, h2.events.StreamEnded):
                try:
                    self.conn.end_stream(ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass  # reset in the same read
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.transport.write(self.conn.data_to_send())


class Source(asyncio.Protocol):
    """Source ztunnel stand-in: keeps `window` CONNECTs in flight, one distinct baggage each;
    once answered, sends `request` (bytes for the tunnel, e.g. an HTTP/1.1 request; may be
    empty) and ends its side; a stream is done when both sides ended (or on a reset). Also used
    by tests/bench/scrape.sh to fill a waypoint's metrics."""

    def __init__(self, authority, names, done, request=b'', window=WINDOW):
        self.authority = authority.encode()
        self.names = names
        self.done = done
        self.request = request
        self.window = window
        self.open = {}
        self.ok = self.failed = 0
        self.statuses = {}
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True,
                                                                         **H2_FAST))

    def connection_made(self, transport):
        self.transport = transport
        self.conn.initiate_connection()
        self.top_up()

    def top_up(self):
        while len(self.open) < self.window:
            name = next(self.names, None)
            if name is None:
                break
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, [
                (b':method', b'CONNECT'), (b':authority', self.authority),
                (b'baggage', b'k8s.namespace.name=jobs,k8s.deployment.name=' + name +
                 b',service.name=' + name)])
            self.open[sid] = [False, False]  # answered, remote ended
        if not self.open and not self.done.done():
            self.done.set_result(True)
        self.transport.write(self.conn.data_to_send())

    def finish(self, sid, ok):
        if self.open.pop(sid, None) is not None:
            if ok:
                self.ok += 1
            else:
                self.failed += 1

    def data_received(self, data):
        for ev in self.conn.receive_data(data):
            st = self.open.get(getattr(ev, 'stream_id', None))
            if isinstance(ev, h2.events.ResponseReceived) and st:
                status = dict(ev.headers).get(b':status')
                self.statuses[status] = self.statuses.get(status, 0) + 1
                st[0] = status == b'200'
                try:
                    if self.request and st[0]:
                        self.conn.send_data(ev.stream_id, self.request)
                    self.conn.end_stream(ev.stream_id)
                except h2.exceptions.StreamClosedError:
                    pass  # reset in the same read
            elif isinstance(ev, h2.events.StreamEnded) and st:
                if not st[1]:
                    st[1] = True
                    self.finish(ev.stream_id, st[0])
            elif isinstance(ev, h2.events.StreamReset):
                self.finish(ev.stream_id, False)
            elif isinstance(ev, h2.events.DataReceived):
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                if not self.done.done():
                    self.done.set_exception(AssertionError('GOAWAY %r' % ev))
        self.top_up()

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(AssertionError('connection lost: %r' % exc))


class CardinalityTest(AsyncTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.block = block_for(cls.__module__ + '.' + cls.__name__)
        ip = lambda h: '%s.%d' % (cls.block, h)  # noqa: E731
        cls.wp_ip, cls.client_ip, cls.pod_ip = ip(1), ip(2), ip(11)
        cls.svc = Service('jobsink', ip(100), 9000, [Endpoint(cls.pod_ip, 9000, True)])
        cls.metrics_addr = '%s:15020' % cls.wp_ip
        cfg = make_config(cls.wp_ip, [cls.svc])
        # ASan keeps freed memory in a quarantine (256 MiB by default), which would show up as
        # RSS growth over 100,000 tunnels that has nothing to do with the registry
        opts = os.environ.get('ASAN_OPTIONS', '')
        os.environ['ASAN_OPTIONS'] = (opts + ':' if opts else '') + 'quarantine_size_mb=4'
        cls.wp = Waypoint(cls.wp_ip, cfg, name=cls.__name__,
                          extra_args=['--max-metric-series', str(CAP),
                                      '--metrics-address', cls.metrics_addr,
                                      '--max-concurrent-streams', str(WINDOW)])
        try:
            cls.wp.start()
        finally:
            os.environ['ASAN_OPTIONS'] = opts
            if not opts:
                del os.environ['ASAN_OPTIONS']

    @classmethod
    def tearDownClass(cls):
        cls.wp.stop(check=True)

    def scrape(self):
        with urllib.request.urlopen('http://%s/stats/prometheus' % self.metrics_addr,
                                    timeout=30) as r:
            self.assertEqual(r.status, 200)
            self.assertEqual(r.headers.get('transfer-encoding'), 'chunked')
            return r.read().decode()

    def tcp_view(self, text):
        """(opened, closed) sample lists and the overflow counters, from prometheus_client."""
        fams = {f.name: f for f in text_string_to_metric_families(text)}
        opened = fams['istio_tcp_connections_opened'].samples
        closed = fams['istio_tcp_connections_closed'].samples
        overflow = {s.labels['family']: s.value
                    for s in fams['istio_waypoint_metrics_overflow'].samples
                    if s.name.endswith('_total')}
        self.assertIn('istio_build', fams)
        return opened, closed, overflow

    async def run_sources(self, first, last):
        loop = asyncio.get_running_loop()
        names = (b'job-%06d' % i for i in range(first, last))
        conns = []
        for _ in range(CONNS):
            done = loop.create_future()
            tr, proto = await loop.create_connection(
                lambda d=done: Source(self.svc.authority, names, d), *split_addr(self.wp.hbone_addr),
                ssl=client_ssl_context(), local_addr=(self.client_ip, 0),
                server_hostname=None)
            conns.append((tr, proto, done))
        await asyncio.wait_for(asyncio.gather(*(d for _, _, d in conns)), 120)
        ok = sum(p.ok for _, p, _ in conns)
        statuses = {}
        for _, p, _ in conns:
            for k, v in p.statuses.items():
                statuses[k] = statuses.get(k, 0) + v
            p.transport.close()
        self.assertEqual(ok, last - first, statuses)

    async def settled_view(self, sources):
        """Scrapes until every stored series counted its close (tunnels end asynchronously)."""
        deadline = time.monotonic() + 20
        while True:
            text = await asyncio.to_thread(self.scrape)
            opened, closed, overflow = self.tcp_view(text)
            if sum(s.value for s in closed) == CAP or time.monotonic() > deadline:
                return text, opened, closed, overflow
            await asyncio.sleep(0.2)

    def check_capped(self, sources, opened, closed, overflow):
        self.assertEqual(len(opened), CAP)
        self.assertEqual(len(closed), CAP)
        self.assertEqual(overflow, {'http': 0, 'tcp': sources - CAP})
        self.assertTrue(all(s.value == 1 for s in opened))
        self.assertTrue(all(s.value == 1 for s in closed))
        names = {s.labels['source_workload'] for s in opened}
        self.assertEqual(len(names), CAP)
        self.assertTrue(all(n.startswith('job-') for n in names))
        # the namespace comes from the client certificate's SAN, which wins over baggage
        self.assertEqual({s.labels['source_workload_namespace'] for s in opened}, {'default'})
        self.assertEqual({s.labels['source_canonical_service'] for s in opened}, names)

    async def test_cap_holds_under_100k_sources_with_flat_rss(self):
        counts = {'connects': 0}
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Stand(counts), self.pod_ip, 15008,
                                          ssl=server_ssl_context(cert='dest'),
                                          reuse_address=True)
        self.addAsyncCleanup(server.wait_closed)
        self.addCleanup(server.close)
        self.addCleanup(lambda: [t.close() for t in counts.get('transports', [])])
        t0 = time.monotonic()

        await self.run_sources(0, CHECKPOINT)
        text, opened, closed, overflow = await self.settled_view(CHECKPOINT)
        self.check_capped(CHECKPOINT, opened, closed, overflow)
        rss1 = self.wp.rss_bytes()
        t1 = time.monotonic()

        await self.run_sources(CHECKPOINT, SOURCES)
        text, opened, closed, overflow = await self.settled_view(SOURCES)
        self.check_capped(SOURCES, opened, closed, overflow)
        rss2 = self.wp.rss_bytes()
        t2 = time.monotonic()

        # scrapers that ask for the page and stop reading: the page is streamed, so each holds
        # one buffer in the daemon, not a page (STALLED whole pages would be far above the
        # slack), and they hold up neither the other scrapers nor the data plane (there are
        # more of them than the admin server's client slots: a new client takes the slot of
        # the one stalled longest)
        stalled = []
        for _ in range(STALLED):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((self.wp_ip, 15020))
            s.sendall(b'GET /stats/prometheus HTTP/1.1\r\nHost: x\r\n\r\n')
            self.addCleanup(s.close)
            stalled.append(s)
        await asyncio.sleep(2)
        rss3 = self.wp.rss_bytes()
        t3 = time.monotonic()
        again = await asyncio.to_thread(self.scrape)
        scrape_s = time.monotonic() - t3
        self.assertEqual(self.tcp_view(again)[2], overflow)
        await self.run_sources(SOURCES, SOURCES + 100)  # new sources: overflow only
        sys.stderr.write('\n  %d sources in %.1f s, %d more in %.1f s; page %d KiB; VmRSS '
                         '%.1f MiB -> %.1f MiB, %.1f MiB with %d stalled scrapers; scrape %.2f s\n'
                         % (CHECKPOINT, t1 - t0, SOURCES - CHECKPOINT, t2 - t1, len(text) // 1024,
                            rss1 / MiB, rss2 / MiB, rss3 / MiB, STALLED, scrape_s))
        self.assertEqual(counts['connects'], SOURCES + 100)
        self.assertLess(rss2 - rss1, RSS_SLACK, 'VmRSS grew from %d to %d' % (rss1, rss2))
        self.assertLess(rss3 - rss2, SLOTS * PER_SCRAPER,
                        'stalled scrapers: VmRSS grew from %d to %d' % (rss2, rss3))
        answered = 0
        for s in stalled:
            try:  # the daemon closes a connection it has no slot for, or a stalled one's later
                head = s.recv(4096)
            except ConnectionResetError:
                head = b''
            self.assertTrue(head == b'' or head.startswith(b'HTTP/1.1 200 OK\r\n'), head[:100])
            answered += head != b''
            s.close()  # gone mid-page: the daemon frees the page (LeakSanitizer at exit)
        self.assertGreaterEqual(answered, STALLED // 2)
        await asyncio.sleep(0.2)
        text = await asyncio.to_thread(self.scrape)
        self.assertEqual(self.tcp_view(text)[2], {'http': 0, 'tcp': SOURCES + 100 - CAP})
        self.wp.assert_healthy()


if __name__ == '__main__':
    require_waypoint()
    main()
