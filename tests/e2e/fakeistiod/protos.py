"""Python message classes for the project's own .proto subset (xds-client/proto), generated at run
time with protoc --python_out into a temporary directory and imported into the default descriptor
pool (so json_format resolves Any '@type's against exactly the messages the waypoint compiles).

google/protobuf/*.proto are not generated: the protobuf runtime already registers the full
well-known types under the same file names, and the project's copies are field-for-field subsets.
"""

import glob
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading

from google.protobuf import descriptor_pool, json_format, symbol_database

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
PROTO_ROOT = os.environ.get('WP_PROTO_ROOT', os.path.join(REPO, 'xds-client', 'proto'))

_CA_FALLBACK = '''syntax = "proto3";
package istio.v1.auth;
import "google/protobuf/struct.proto";
message IstioCertificateRequest {
  string csr = 1;
  int64 validity_duration = 3;
  google.protobuf.Struct metadata = 4;
}
message IstioCertificateResponse {
  repeated string cert_chain = 1;
}
'''

_lock = threading.Lock()
_loaded = None


class Protos:
    """The generated classes. Attributes for the messages fakeistiod itself needs; any other
    message by full name through message_class()."""

    def __init__(self):
        self.pool = descriptor_pool.Default()
        self.DiscoveryRequest = self.message_class('envoy.service.discovery.v3.DiscoveryRequest')
        self.DiscoveryResponse = self.message_class('envoy.service.discovery.v3.DiscoveryResponse')
        self.DeltaDiscoveryRequest = self.message_class(
            'envoy.service.discovery.v3.DeltaDiscoveryRequest')
        self.DeltaDiscoveryResponse = self.message_class(
            'envoy.service.discovery.v3.DeltaDiscoveryResponse')
        self.Node = self.message_class('envoy.config.core.v3.Node')
        self.IstioCertificateRequest = self.message_class('istio.v1.auth.IstioCertificateRequest')
        self.IstioCertificateResponse = self.message_class(
            'istio.v1.auth.IstioCertificateResponse')
        from google.protobuf import any_pb2, struct_pb2
        self.Any = any_pb2.Any
        self.Struct = struct_pb2.Struct

    def message_class(self, full_name):
        """The generated class of a message (KeyError when our subset does not have it)."""
        return symbol_database.Default().GetSymbol(full_name)

    def class_for_type_url(self, type_url):
        return self.message_class(type_url.rsplit('/', 1)[-1])

    def parse(self, type_url, obj):
        """A message of type_url from its JSON mapping (dict), strictly (unknown fields raise
        json_format.ParseError); a message of the right type is returned as is."""
        cls = self.class_for_type_url(type_url)
        if isinstance(obj, cls):
            return obj
        if hasattr(obj, 'DESCRIPTOR'):
            raise TypeError('%s given for %s' % (obj.DESCRIPTOR.full_name, type_url))
        m = cls()
        json_format.ParseDict(obj, m)
        return m

    def to_dict(self, msg):
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _generate(outdir):
    rels = []
    for p in glob.glob(os.path.join(PROTO_ROOT, '**', '*.proto'), recursive=True):
        rel = os.path.relpath(p, PROTO_ROOT)
        if not rel.startswith('google' + os.sep + 'protobuf' + os.sep):
            rels.append(rel)
    if not rels:
        raise RuntimeError('no .proto files under %s' % PROTO_ROOT)
    includes = ['-I', PROTO_ROOT]
    if not os.path.exists(os.path.join(PROTO_ROOT, 'security', 'v1alpha1', 'ca.proto')):
        extra = os.path.join(outdir, '_extra_proto')
        os.makedirs(os.path.join(extra, 'security', 'v1alpha1'))
        with open(os.path.join(extra, 'security', 'v1alpha1', 'ca.proto'), 'w') as f:
            f.write(_CA_FALLBACK)
        includes = ['-I', extra] + includes
        rels.append(os.path.join('security', 'v1alpha1', 'ca.proto'))
    r = subprocess.run(['protoc', '--python_out=' + outdir] + includes + sorted(rels),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    if r.returncode != 0:
        raise RuntimeError('protoc failed: %s' % r.stderr.strip())
    return sorted(rels)


def load():
    """Generates and imports the classes once per process; returns the Protos singleton."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        outdir = tempfile.mkdtemp(prefix='fakeistiod-pb-')
        try:
            rels = _generate(outdir)
            sys.path.insert(0, outdir)
            try:
                for rel in rels:
                    importlib.import_module(rel[:-len('.proto')].replace(os.sep, '.') + '_pb2')
            finally:
                sys.path.remove(outdir)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
        _loaded = Protos()
        return _loaded
