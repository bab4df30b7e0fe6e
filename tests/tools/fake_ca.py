#!/usr/bin/python3
"""A minimal Istio CA for unit tests: serves istio.v1.auth.IstioCertificateService/CreateCertificate
over gRPC + TLS (grpcio) and signs CSRs with the test root from tests/tools/mkpki.py.

Usage:
  fake_ca.py --pki DIR --listen HOST:PORT --ready FILE --token TOKEN [options]

  --pki DIR             mkpki.py output (root.pem/.key, intermediate.*, other-root.*)
  --listen HOST:PORT    PORT 0 picks a free port; the bound port is written to --ready
  --ready FILE          written (atomically) with the port once serving
  --token TOKEN         expected bearer token; anything else gets UNAUTHENTICATED
  --log FILE            one JSON line per request: metadata, TTL, CSR checks
  --serving-issuer NAME CA signing our serving certificate (DNS istiod.istio-system.svc):
                        root (default) or other-root (a certificate the client must not trust)
  --mode MODE           behaviour (default normal); --mode-file FILE, when it exists and is not
                        empty, overrides it on every request:
      normal            [leaf, root], leaf = CSR key + CSR URI SAN, notAfter = now + TTL
      intermediate      [leaf, intermediate, root], leaf issued by the intermediate
      multi-root        [leaf, root, other-root] (istiod's expanded root bundle)
      concatenated      [leaf, intermediate + root in one element]
      leaf-only         [leaf]
      deny              PERMISSION_DENIED
      internal          INTERNAL "CSR signing error (fake)"
      garbage           [junk, root]
      wrong-san         leaf for spiffe://cluster.local/ns/evil/sa/other
      wrong-key         leaf for a key that is not the CSR's
      untrusted-chain   [leaf, other-root]
      empty             cert_chain []
      oversize          [leaf, root, 1.1 MiB of junk]
      slow              sleeps --slow-seconds (default 3) first, then normal
  --raw                 serve with python3-h2 (hand-built HTTP/2 answers) instead of grpcio;
                        raw modes: raw-ok, raw-http-500, raw-http-401, raw-undecodable,
                        raw-percent-message, raw-no-status, raw-bad-status, raw-dup-status,
                        raw-compressed, raw-short-frame, raw-two-messages, raw-no-message,
                        raw-content-type, raw-http1 (ALPN http/1.1); others as above

The message classes are built here from descriptors with the upstream field numbers (istio/api
security/v1alpha1/ca.proto), independently of xds-client/proto, so a wrong number on either side
shows up. Needs /usr/bin/python3 with python3-grpcio, python3-protobuf, python3-cryptography
(and python3-h2 for --raw).
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf import struct_pb2  # noqa: F401  (registers google/protobuf/struct.proto)

SERVICE = "istio.v1.auth.IstioCertificateService"
SERVING_DNS = "istiod.istio-system.svc"
WRONG_SAN = "spiffe://cluster.local/ns/evil/sa/other"


def build_messages():
    f = descriptor_pb2.FileDescriptorProto()
    f.name = "fake_ca/security/v1alpha1/ca.proto"
    f.package = "istio.v1.auth"
    f.syntax = "proto3"
    f.dependency.append("google/protobuf/struct.proto")
    T = descriptor_pb2.FieldDescriptorProto

    def msg(name, fields):
        m = f.message_type.add()
        m.name = name
        for fname, num, ftype, label, tname in fields:
            fd = m.field.add()
            fd.name, fd.number, fd.type, fd.label = fname, num, ftype, label
            if tname:
                fd.type_name = tname

    opt, rep = T.LABEL_OPTIONAL, T.LABEL_REPEATED
    msg("IstioCertificateRequest", [("csr", 1, T.TYPE_STRING, opt, None),
                                    ("validity_duration", 3, T.TYPE_INT64, opt, None),
                                    ("metadata", 4, T.TYPE_MESSAGE, opt, ".google.protobuf.Struct")])
    msg("IstioCertificateResponse", [("cert_chain", 1, T.TYPE_STRING, rep, None)])
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(f.SerializeToString())

    def cls(name):
        d = pool.FindMessageTypeByName("istio.v1.auth." + name)
        if hasattr(message_factory, "GetMessageClass"):
            return message_factory.GetMessageClass(d)
        return message_factory.MessageFactory(pool).GetPrototype(d)

    return cls("IstioCertificateRequest"), cls("IstioCertificateResponse")


Request, Response = build_messages()


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def load_ca(pki, name):
    with open(os.path.join(pki, name + ".pem"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    with open(os.path.join(pki, name + ".key"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    return cert, key


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def issue(issuer, public_key, ttl, uris=(), dns=(), not_before=None):
    icert, ikey = issuer
    nb = not_before or utcnow() - datetime.timedelta(seconds=60)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([]))
         .issuer_name(icert.subject)
         .public_key(public_key)
         .serial_number(x509.random_serial_number())
         .not_valid_before(nb)
         .not_valid_after(utcnow() + datetime.timedelta(seconds=ttl))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                      key_encipherment=True, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=False, crl_sign=False,
                                      encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                               ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ikey.public_key()),
                        critical=False))
    names = [x509.UniformResourceIdentifier(u) for u in uris] + [x509.DNSName(d) for d in dns]
    b = b.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return b.sign(ikey, hashes.SHA256())


def check_csr(csr):
    """What ztunnel sends: P-256, SHA-256, empty subject, one critical SAN ext with one URI."""
    if not csr.is_signature_valid:
        return "bad signature"
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        return "key is not ECDSA P-256"
    if not isinstance(csr.signature_hash_algorithm, hashes.SHA256):
        return "signature hash is not SHA-256"
    if len(csr.subject) != 0:
        return "subject is not empty: " + csr.subject.rfc4514_string()
    exts = list(csr.extensions)
    if len(exts) != 1 or exts[0].oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
        return "extensions are not exactly one SAN: %r" % [e.oid.dotted_string for e in exts]
    if not exts[0].critical:
        return "SAN is not critical"
    names = list(exts[0].value)
    if len(names) != 1 or not isinstance(names[0], x509.UniformResourceIdentifier):
        return "SAN is not exactly one URI"
    return "ok"


class CA:
    def __init__(self, args):
        self.args = args
        self.root = load_ca(args.pki, "root")
        self.inter = load_ca(args.pki, "intermediate")
        self.other = load_ca(args.pki, "other-root")
        self.lock = threading.Lock()

    def mode(self):
        if self.args.mode_file:
            try:
                with open(self.args.mode_file) as f:
                    m = f.read().strip()
                if m:
                    return m
            except FileNotFoundError:
                pass
        return self.args.mode

    def record(self, entry):
        if not self.args.log:
            return
        with self.lock, open(self.args.log, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def answer(self, request, meta):
        """Returns (grpc.StatusCode, message) or (None, Response) for one request."""
        mode = self.mode()
        entry = {"mode": mode, "authorization": meta.get("authorization"),
                 "clusterid": meta.get("clusterid"),
                 "validity_duration": request.validity_duration,
                 "has_metadata": request.HasField("metadata")}
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            entry["csr_check"] = check_csr(csr)
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            entry["csr_uri"] = sans.get_values_for_type(x509.UniformResourceIdentifier)
        except Exception as e:  # noqa: BLE001 - recorded and answered below
            csr = None
            entry["csr_check"] = "unparsable: %s" % e
        self.record(entry)

        if meta.get("authorization") != "Bearer " + self.args.token:
            return (grpc.StatusCode.UNAUTHENTICATED,
                    "request authenticate failure: token not accepted (fake_ca)")
        if mode == "slow":
            time.sleep(self.args.slow_seconds)
        if mode == "deny":
            return grpc.StatusCode.PERMISSION_DENIED, "denied by fake_ca"
        if mode == "internal":
            return grpc.StatusCode.INTERNAL, "CSR signing error (fake)"
        if csr is None or entry["csr_check"] != "ok":
            return grpc.StatusCode.INVALID_ARGUMENT, "bad CSR: " + entry["csr_check"]

        ttl = request.validity_duration if request.validity_duration > 0 else 86400
        uri = entry["csr_uri"][0]
        key = csr.public_key()
        if mode == "wrong-san":
            uri = WRONG_SAN
        if mode == "wrong-key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        issuer = self.inter if mode in ("intermediate", "concatenated") else self.root
        leaf = pem(issue(issuer, key, ttl, uris=[uri])) + "\n"
        root = pem(self.root[0]) + "\n"
        resp = Response()
        chains = {
            "intermediate": [leaf, pem(self.inter[0]) + "\n", root],
            "multi-root": [leaf, root, pem(self.other[0]) + "\n"],
            "concatenated": [leaf, pem(self.inter[0]) + pem(self.root[0])],
            "leaf-only": [leaf],
            "garbage": ["this is not a certificate\n", root],
            "untrusted-chain": [leaf, pem(self.other[0])],
            "empty": [],
            "oversize": [leaf, root, "x" * (1100 * 1024)],
        }
        resp.cert_chain.extend(chains.get(mode, [leaf, root]))
        return None, resp

    def create(self, request, context):
        meta = {}
        for k, v in context.invocation_metadata():
            meta.setdefault(k, v)
        code, result = self.answer(request, meta)
        if code is not None:
            context.abort(code, result)
        return result


# ---- --raw: a hand-driven HTTP/2 server (python3-h2) that can send what grpcio never would ----

def grpc_frame(body, flag=0):
    return bytes([flag]) + len(body).to_bytes(4, "big") + body


def raw_reply(ca, mode, headers, body):
    """Returns (response headers, data, trailers or None) for the raw modes."""
    ok_headers = [(":status", "200"), ("content-type", "application/grpc")]
    ok_trailers = [("grpc-status", "0")]
    if mode == "raw-http-500":
        return [(":status", "500"), ("content-type", "text/plain")], b"oops", None
    if mode == "raw-http-401":
        return [(":status", "401")], b"", None
    if mode == "raw-undecodable":
        return ok_headers, grpc_frame(b"\x0a\xff\xff\xff\xff\x0f"), ok_trailers
    if mode == "raw-percent-message":
        return ok_headers + [("grpc-status", "16"), ("grpc-message", "bad%20token%0A%zz%")], \
            b"", None
    if len(body) < 5:
        return ok_headers + [("grpc-status", "3"), ("grpc-message", "no request")], b"", None
    meta = {k: v for k, v in headers if not k.startswith(":")}
    code, result = ca.answer(Request.FromString(body[5:]), meta)
    if code is not None:
        return ok_headers + [("grpc-status", str(code.value[0])), ("grpc-message", result)], \
            b"", None
    msg = result.SerializeToString()
    if mode == "raw-no-status":
        return ok_headers, grpc_frame(msg), [("x-other", "1")]
    if mode == "raw-bad-status":
        return ok_headers, grpc_frame(msg), [("grpc-status", "zero")]
    if mode == "raw-dup-status":
        return ok_headers, grpc_frame(msg), ok_trailers + [("grpc-status", "0")]
    if mode == "raw-compressed":
        return ok_headers, grpc_frame(msg, flag=1), ok_trailers
    if mode == "raw-short-frame":
        return ok_headers, grpc_frame(msg)[:-10], ok_trailers
    if mode == "raw-two-messages":
        return ok_headers, grpc_frame(msg) + grpc_frame(msg), ok_trailers
    if mode == "raw-no-message":
        return ok_headers, b"", ok_trailers
    if mode == "raw-content-type":
        return [(":status", "200"), ("content-type", "application/grpcfoo")], grpc_frame(msg), \
            ok_trailers
    return ok_headers, grpc_frame(msg), ok_trailers  # raw-ok and anything else


def raw_conn(ca, sock):
    import h2.config
    import h2.connection
    import h2.events
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    streams = {}
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RequestReceived):
                streams[ev.stream_id] = (ev.headers, bytearray())
            elif isinstance(ev, h2.events.DataReceived):
                streams[ev.stream_id][1].extend(ev.data)
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamEnded):
                headers, body = streams.pop(ev.stream_id)
                hdrs, data_out, trailers = raw_reply(ca, ca.mode(), headers, bytes(body))
                conn.send_headers(ev.stream_id, hdrs, end_stream=not data_out and not trailers)
                if data_out:
                    conn.send_data(ev.stream_id, data_out, end_stream=not trailers)
                if trailers:
                    conn.send_headers(ev.stream_id, trailers, end_stream=True)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)


def raw_serve(ca, args, listen_sock, done):
    import ssl
    issuer = load_ca(args.pki, args.serving_issuer)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(issuer, key.public_key(), 86400, dns=[SERVING_DNS])
    tmpdir = tempfile.mkdtemp()
    cpath, kpath = os.path.join(tmpdir, "c.pem"), os.path.join(tmpdir, "k.pem")
    with open(cpath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(kpath, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    ctxs = {}
    for alpn in ("h2", "http/1.1"):
        c = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        c.load_cert_chain(cpath, kpath)
        c.set_alpn_protocols([alpn])
        ctxs[alpn] = c
    shutil.rmtree(tmpdir)

    def handle(raw):
        try:
            http1 = ca.mode() == "raw-http1"
            with ctxs["http/1.1" if http1 else "h2"].wrap_socket(raw, server_side=True) as s:
                if http1:
                    s.recv(65536)
                    s.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\n"
                              b"content-length: 0\r\n\r\n")
                    return
                raw_conn(ca, s)
        except Exception as e:  # noqa: BLE001 - a test peer hanging up is fine
            sys.stderr.write("fake_ca raw: %s\n" % e)

    listen_sock.settimeout(0.5)
    while not done.is_set():
        try:
            raw, _ = listen_sock.accept()
        except socket.timeout:
            continue
        raw.settimeout(30)
        threading.Thread(target=handle, args=(raw,), daemon=True).start()


def serving_credentials(args):
    issuer = load_ca(args.pki, args.serving_issuer)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(issuer, key.public_key(), 86400, dns=[SERVING_DNS])
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    chain = cert.public_bytes(serialization.Encoding.PEM)
    return grpc.ssl_server_credentials([(key_pem, chain)])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pki", required=True)
    p.add_argument("--listen", required=True)
    p.add_argument("--ready", required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--log")
    p.add_argument("--mode", default="normal")
    p.add_argument("--mode-file")
    p.add_argument("--serving-issuer", default="root", choices=["root", "other-root"])
    p.add_argument("--slow-seconds", type=float, default=3.0)
    p.add_argument("--raw", action="store_true",
                   help="serve with python3-h2 instead of grpcio (raw-* modes)")
    args = p.parse_args()

    ca = CA(args)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    if args.raw:
        host, port = args.listen.rsplit(":", 1)
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.bind((host, int(port)))
        ls.listen(16)
        write_ready(args.ready, ls.getsockname()[1])
        t = threading.Thread(target=raw_serve, args=(ca, args, ls, done), daemon=True)
        t.start()
        wait_done(done)
        return 0

    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "CreateCertificate": grpc.unary_unary_rpc_method_handler(
            ca.create, request_deserializer=Request.FromString,
            response_serializer=Response.SerializeToString)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4),
                         options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(args.listen, serving_credentials(args))
    if port == 0:
        sys.stderr.write("fake_ca: cannot listen on %s\n" % args.listen)
        return 1
    server.start()
    write_ready(args.ready, port)
    wait_done(done)
    server.stop(0)
    return 0


def write_ready(path, port):
    tmp = "%s.tmp.%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write("%d\n" % port)
    os.rename(tmp, path)


def wait_done(done):
    # The parent may die without signalling: stop when it is gone.
    parent = os.getppid()
    while not done.wait(0.5):
        if os.getppid() != parent:
            break


if __name__ == "__main__":
    sys.exit(main())
