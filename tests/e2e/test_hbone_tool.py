#!/usr/bin/python3
"""The `hbone` tool (libhbone) against the independent Python peers: our client against
`hbone serve`, and `hbone connect` against our destination stand-in."""

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hbonelib import *  # noqa: E402,F401,F403


def hbone_bin():
    return os.environ.get('HBONE_BIN', '')


def pki_args(name):
    return ['--cert', pki_path(name + '.pem'), '--key', pki_path(name + '.key'),
            '--root', pki_path('root.pem')]


class HboneToolTest(AsyncTestCase):

    async def asyncSetUp(self):
        await super().asyncSetUp()
        self.block = block_for(self.id())
        self.ip = self.block + '.11'
        self.procs = []

    async def asyncTearDown(self):
        for p, log in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            log.close()
            with open(log.name, 'rb') as f:
                text = f.read().decode('utf-8', 'replace')
            for m in SANITIZER_MARKERS:
                self.assertNotIn(m, text, text[-4000:])
            os.unlink(log.name)
        await super().asyncTearDown()

    def spawn(self, argv, **kw):
        log = tempfile.NamedTemporaryFile(prefix='hbone-tool-', suffix='.log', delete=False)
        p = subprocess.Popen(argv, stderr=log, **kw)
        self.procs.append((p, log))
        return p

    async def start_serve(self):
        p = self.spawn([hbone_bin(), 'serve', '--listen', self.ip + ':15008',
                        '--io-backend', io_backend()] + pki_args('dest'),
                       stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.assertIsNone(p.poll(), 'hbone serve exited')
            try:
                socket.create_connection((self.ip, 15008), timeout=1).close()
                return p
            except OSError:
                await asyncio.sleep(0.05)
        self.fail('hbone serve did not listen')

    async def test_our_client_through_hbone_serve(self):
        await self.start_serve()
        await self.backend(self.ip, 9000, kind='echo')
        rb = await self.backend(self.ip, 9002, kind='reply_after_eof')
        c = await self.client(self.ip + ':15008')
        self.assertEqual(c.ep.peer_uri_sans, [DEST_ID])
        self.assertEqual(c.ep.alpn, 'h2')
        payload = os.urandom(3 * MiB)
        t, r = await c.connect_tunnel(self.ip + ':9000')
        self.assertEqual(r.status, 200)
        await t.send(payload)
        await t.send_eof()
        self.assertEqual(await t.recv_all(timeout=30), payload)
        t, r = await c.connect_tunnel(self.ip + ':9002')
        self.assertEqual(r.status, 200)
        await t.send(b'half')
        await t.send_eof()
        self.assertEqual(await t.recv_all(),
                         b'REPLY:' + hashlib.sha256(b'half').hexdigest().encode())
        # nothing listens on :9 -> not 200
        t = c.open_tunnel(self.ip + ':9')
        try:
            r = await t.wait_response()
            self.assertNotEqual(r.status, 200)
        except TunnelReset:
            pass
        # many tunnels at once
        async def one(i):
            tt, rr = await c.connect_tunnel(self.ip + ':9000')
            await tt.send(b'%d' % i * 100)
            await tt.send_eof()
            return await tt.recv_all() == b'%d' % i * 100
        self.assertTrue(all(await asyncio.gather(*[one(i) for i in range(50)])))

    async def test_hbone_connect_against_our_server(self):
        dest = await self.server(self.ip, 15008, mode='echo')
        data = os.urandom(MiB)
        argv = [hbone_bin(), 'connect', '--server', self.ip + ':15008', '--authority',
                self.ip + ':9000', '--io-backend', io_backend()] + pki_args('client')
        p = self.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await asyncio.to_thread(p.communicate, data, 30)
        self.assertEqual(p.returncode, 0)
        self.assertEqual(out, data)
        rec = dest.records[0]
        self.assertEqual(rec.authority, self.ip + ':9000')
        self.assertEqual(rec.peer_uri_sans, [CLIENT_ID])
        self.assertIsNone(rec.shape_error, rec.headers)
        dest.mode = 'status'
        p = self.spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        out, _ = await asyncio.to_thread(p.communicate, b'x', 30)
        self.assertEqual(p.returncode, 1)

    async def wait_listen(self, p, addr, port):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.assertIsNone(p.poll(), 'hbone exited')
            try:
                socket.create_connection((addr, port), timeout=1).close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        self.fail('hbone did not listen on %s:%d' % (addr, port))

    async def tcp_exchange(self, port, payload):
        r, w = await asyncio.open_connection(self.ip, port)
        w.write(payload)
        await w.drain()
        w.write_eof()
        try:
            return await asyncio.wait_for(r.read(), 30)
        finally:
            w.close()

    async def test_hbone_forward_against_our_server(self):
        dest = await self.server(self.ip, 15008, mode='echo')
        p = self.spawn([hbone_bin(), 'forward', '--listen', self.ip + ':7000', '--server',
                        self.ip + ':15008', '--authority', self.ip + ':9000', '--connections', '2',
                        '--header', 'Baggage: k8s.deployment.name=fwd',
                        '--io-backend', io_backend()] + pki_args('client'))
        # connections are made on demand: the first accept triggers the first one
        await self.wait_listen(p, self.ip, 7000)
        payloads = [os.urandom(64 * KiB + i) for i in range(20)]
        outs = await asyncio.gather(*[self.tcp_exchange(7000, d) for d in payloads])
        self.assertEqual(outs, payloads)
        recs = await dest.wait_records(21)  # the readiness probe above made one more
        for rec in recs:
            self.assertEqual(rec.authority, self.ip + ':9000')
            self.assertEqual(rec.peer_uri_sans, [CLIENT_ID])
            self.assertEqual(rec.headers.get('baggage'), 'k8s.deployment.name=fwd')
            self.assertIsNone(rec.shape_error, rec.headers)
        # spread over exactly --connections HBONE connections
        self.assertEqual(len(dest.connections), 2)
        # a refused tunnel resets its TCP connection; the next one works again
        dest.mode = 'status'
        r, w = await asyncio.open_connection(self.ip, 7000)
        w.write(b'x')
        try:
            got = await asyncio.wait_for(r.read(), 10)
            self.assertEqual(got, b'')
        except ConnectionResetError:
            pass
        w.close()
        dest.mode = 'echo'
        self.assertEqual(await self.tcp_exchange(7000, b'again'), b'again')
        self.assertIsNone(p.poll())

    async def test_hbone_forward_server_down(self):
        # nothing listens on the HBONE server: accepted connections are reset, the tool lives on
        p = self.spawn([hbone_bin(), 'forward', '--listen', self.ip + ':7001', '--server',
                        self.ip + ':15009', '--authority', self.ip + ':9000',
                        '--connect-timeout-ms', '2000', '--io-backend', io_backend()] +
                       pki_args('client'))
        await self.wait_listen(p, self.ip, 7001)
        for _ in range(3):
            # the reset may even beat the client's connect() completion
            try:
                r, w = await asyncio.open_connection(self.ip, 7001)
                w.write(b'x')
                self.assertEqual(await asyncio.wait_for(r.read(), 10), b'')
                w.close()
            except ConnectionResetError:
                pass
        self.assertIsNone(p.poll())
        # bad arguments: exit 2
        q = self.spawn([hbone_bin(), 'forward', '--listen', self.ip + ':7002'] + pki_args('client'))
        self.assertEqual(await asyncio.to_thread(q.wait, 10), 2)
        q = self.spawn([hbone_bin(), 'forward', '--listen', self.ip + ':7002', '--server',
                        self.ip + ':15008', '--authority', self.ip + ':9000', '--header', 'nocolon']
                       + pki_args('client'))
        self.assertEqual(await asyncio.to_thread(q.wait, 10), 2)


if __name__ == '__main__':
    b = hbone_bin()
    if not b or not os.access(b, os.X_OK):
        sys.stderr.write('HBONE_BIN not set: skipping\n')
        sys.exit(77)
    main()
