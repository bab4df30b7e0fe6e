"""The fake istiod's PKI: its serving certificate and the CA signer (python3-cryptography)."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

DEFAULT_TTL = 24 * 3600          # istiod DEFAULT_WORKLOAD_CERT_TTL
MAX_TTL = 90 * 24 * 3600         # istiod MAX_WORKLOAD_CERT_TTL


class CsrError(Exception):
    pass


def utcnow():
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


def pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM).decode()


class Issuer:
    """A CA from mkpki output: NAME.pem / NAME.key in root_dir (plus the root above it)."""

    def __init__(self, root_dir, name='root'):
        def load(n):
            with open(os.path.join(root_dir, n + '.pem'), 'rb') as f:
                cert = x509.load_pem_x509_certificate(f.read())
            with open(os.path.join(root_dir, n + '.key'), 'rb') as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
            return cert, key
        self.root_cert, self.root_key = load('root')
        if name == 'root':
            self.cert, self.key = self.root_cert, self.root_key
            self.chain = [self.root_cert]
        else:
            self.cert, self.key = load(name)
            self.chain = [self.cert, self.root_cert]
        self.root_pem = pem(self.root_cert)

    def _builder(self, public_key, not_before, not_after):
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([]))
                .issuer_name(self.cert.subject)
                .public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=True, data_encipherment=False,
                                             key_agreement=False, key_cert_sign=False,
                                             crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.key.public_key()), critical=False))

    def serving_cert(self, dns_names, ips):
        """(key_pem, cert_pem) for istiod's gRPC port: DNS + IP SANs, valid for a year."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = utcnow()
        sans = [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        cert = (self._builder(key.public_key(), now - datetime.timedelta(hours=1),
                              now + datetime.timedelta(days=365))
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .sign(self.key, hashes.SHA256()))
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        chain = [cert] + (self.chain[:-1])
        return key_pem, ''.join(pem(c) for c in chain).encode()

    def sign_csr(self, csr, uris, ttl):
        """The workload certificate for an already checked CSR: URI SANs `uris`, valid
        [now, now + ttl) (seconds granularity). Returns (cert, cert_chain list of PEM strings,
        leaf first, root last)."""
        now = utcnow()
        cert = (self._builder(csr.public_key(), now, now + datetime.timedelta(seconds=ttl))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
                .sign(self.key, hashes.SHA256()))
        return cert, [pem(cert)] + [pem(c) for c in self.chain]


def parse_csr(csr_pem):
    """(csr, [URI SANs]) or CsrError."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode() if isinstance(csr_pem, str) else csr_pem)
    except Exception as e:
        raise CsrError('failed to parse the CSR: %s' % e)
    if not csr.is_signature_valid:
        raise CsrError('CSR signature is invalid')
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return csr, uris
