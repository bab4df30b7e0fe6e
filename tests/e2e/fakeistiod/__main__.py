"""python3 -m fakeistiod --listen 127.0.0.1:15012 --root-dir PKI --token T --config FIXTURE.json

Serves the fixture until SIGINT/SIGTERM, logging every request/response to stderr. The PKI is
tests/tools/mkpki.py output (created in --root-dir when root.pem is missing). Run from
tests/e2e (or with it on PYTHONPATH) with /usr/bin/python3."""

import argparse
import os
import signal
import subprocess
import sys
import threading

from .server import FakeIstiod

MKPKI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), 'tools', 'mkpki.py')


def main(argv=None):
    ap = argparse.ArgumentParser(prog='fakeistiod', description=__doc__.split('\n')[0])
    ap.add_argument('--listen', default='127.0.0.1:15012')
    ap.add_argument('--root-dir', required=True, help='mkpki.py output (root.pem/root.key)')
    ap.add_argument('--token', default=None, help='required bearer token (default: no auth)')
    ap.add_argument('--config', action='append', default=[],
                    help='fixture-shaped JSON {"resources": {type_url: {name: resource}}}')
    ap.add_argument('--identity', default=None,
                    help='caller SPIFFE identity: issued SAN, checked against CSR and node')
    ap.add_argument('--ttl-override', type=int, default=None, help='issued cert lifetime (s)')
    ap.add_argument('--ca-issuer', default='root', choices=['root', 'intermediate'])
    ap.add_argument('-q', '--quiet', action='store_true')
    a = ap.parse_args(argv)
    if not os.path.exists(os.path.join(a.root_dir, 'root.pem')):
        os.makedirs(a.root_dir, exist_ok=True)
        subprocess.run(['/usr/bin/python3', MKPKI, a.root_dir], check=True)
    log = None if a.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    fi = FakeIstiod(a.root_dir, listen=a.listen, token=a.token, identity=a.identity,
                    ca_ttl_override=a.ttl_override, ca_issuer=a.ca_issuer, log=log)
    for c in a.config:
        fi.set_config(c)
    fi.start()
    print('fakeistiod: serving on %s (root %s)' % (fi.address, fi.root_pem_path),
          file=sys.stderr, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: done.set())
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    while not done.wait(1):
        pass
    fi.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
