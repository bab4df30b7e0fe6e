#!/usr/bin/python3
"""Writes a test PKI for the mesh (ECDSA P-256, PEM everywhere).

Usage:
  mkpki.py OUTDIR                  create the standard set (idempotent: existing files are kept)
  mkpki.py OUTDIR --leaf NAME URI  add one leaf NAME.pem/NAME.key signed by root, URI SAN = URI

Files (deterministic names; leaves are NAME.pem = leaf then chain without the root, NAME.key):
  root.pem/.key           mesh root CA (trust domain cluster.local)
  intermediate.pem/.key   intermediate CA signed by root
  other-root.pem/.key     an unrelated root CA
  waypoint                spiffe://cluster.local/ns/bookinfo/sa/bookinfo-waypoint
  client                  spiffe://cluster.local/ns/default/sa/sleep
  dest                    spiffe://cluster.local/ns/bookinfo/sa/reviews
  chained-waypoint        as waypoint, issued by intermediate (pem = leaf + intermediate)
  chained-client          as client, issued by intermediate (pem = leaf + intermediate)
  foreign-client          spiffe://cluster.local/ns/default/sa/sleep, issued by other-root
  other-td-client         spiffe://evil.example/ns/default/sa/sleep
  no-san-client           no URI SAN (DNS SAN only)
  two-uri-client          two URI SANs
  expired-client          notAfter in the past
  bad-spiffe-client       URI SAN spiffe://cluster.local/sleep

Needs /usr/bin/python3 with python3-cryptography (Debian 12: 38.x).
"""

import datetime
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def now():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def write_atomic(path, data):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def load(outdir, name):
    with open(os.path.join(outdir, name + ".pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(outdir, name + ".key"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return cert, key


def exists(outdir, name):
    return all(os.path.exists(os.path.join(outdir, name + ext)) for ext in (".pem", ".key"))


def make_ca(outdir, name, org, issuer=None):
    """Returns (cert, key) for a CA; creates it when missing."""
    if exists(outdir, name):
        cert, key = load(outdir, name)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    if issuer is None:
        issuer_cert, issuer_key, issuer_name = None, key, subject
    else:
        issuer_cert, issuer_key = issuer
        issuer_name = issuer_cert.subject
    b = (x509.CertificateBuilder()
         .subject_name(subject)
         .issuer_name(issuer_name)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now() - DAY)
         .not_valid_after(now() + 3650 * DAY)
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                        critical=False))
    if issuer_cert is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    cert = b.sign(issuer_key, hashes.SHA256())
    write_atomic(os.path.join(outdir, name + ".key"), key_pem(key))
    write_atomic(os.path.join(outdir, name + ".pem"), cert_pem(cert))
    return cert, key


def make_leaf(outdir, name, issuer, uris, dns=(), expired=False, chain=(), force=False):
    if exists(outdir, name) and not force:
        return
    issuer_cert, issuer_key = issuer
    key = ec.generate_private_key(ec.SECP256R1())
    if expired:
        nb, na = now() - 400 * DAY, now() - DAY
    else:
        nb, na = now() - DAY, now() + 365 * DAY
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([]))
         .issuer_name(issuer_cert.subject)
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(nb)
         .not_valid_after(na)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             issuer_key.public_key()), critical=False))
    sans = [x509.UniformResourceIdentifier(u) for u in uris]
    sans += [x509.DNSName(d) for d in dns]
    # Istio marks the SAN extension critical because the subject is empty (RFC 5280 4.2.1.6).
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=True)
    cert = b.sign(issuer_key, hashes.SHA256())
    write_atomic(os.path.join(outdir, name + ".key"), key_pem(key))
    write_atomic(os.path.join(outdir, name + ".pem"),
                 cert_pem(cert) + b"".join(cert_pem(c) for c in chain))


def standard(outdir):
    root = make_ca(outdir, "root", "cluster.local")
    inter = make_ca(outdir, "intermediate", "cluster.local", issuer=root)
    other = make_ca(outdir, "other-root", "other")
    td = "spiffe://cluster.local"
    make_leaf(outdir, "waypoint", root, [td + "/ns/bookinfo/sa/bookinfo-waypoint"])
    make_leaf(outdir, "client", root, [td + "/ns/default/sa/sleep"])
    make_leaf(outdir, "dest", root, [td + "/ns/bookinfo/sa/reviews"])
    make_leaf(outdir, "chained-waypoint", inter, [td + "/ns/bookinfo/sa/bookinfo-waypoint"],
              chain=[inter[0]])
    make_leaf(outdir, "chained-client", inter, [td + "/ns/default/sa/sleep"], chain=[inter[0]])
    make_leaf(outdir, "foreign-client", other, [td + "/ns/default/sa/sleep"])
    make_leaf(outdir, "other-td-client", root, ["spiffe://evil.example/ns/default/sa/sleep"])
    make_leaf(outdir, "no-san-client", root, [], dns=["sleep.default.svc.cluster.local"])
    make_leaf(outdir, "two-uri-client", root,
              [td + "/ns/default/sa/sleep", td + "/ns/default/sa/other"])
    make_leaf(outdir, "expired-client", root, [td + "/ns/default/sa/sleep"], expired=True)
    make_leaf(outdir, "bad-spiffe-client", root, [td + "/sleep"])
    return root


def main(argv):
    if len(argv) == 2:
        os.makedirs(argv[1], exist_ok=True)
        standard(argv[1])
        return 0
    if len(argv) == 5 and argv[2] == "--leaf":
        outdir, name, uri = argv[1], argv[3], argv[4]
        if "/" in name or name.startswith("."):
            sys.stderr.write("mkpki: bad leaf name %r\n" % name)
            return 2
        os.makedirs(outdir, exist_ok=True)
        root = standard(outdir)
        make_leaf(outdir, name, root, [uri], force=True)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
