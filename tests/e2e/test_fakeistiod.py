#!/usr/bin/python3
"""Self-test of fakeistiod (the istiod stand-in) with a pure-grpcio client: delta and SotW ADS
semantics, ACK/NACK records, reconnection, auth, the CA, and that the configs the waypoint tests
generate (hbonelib.make_config) and the bookinfo fixture go through the real protobuf runtime."""

import datetime
import json
import os
import queue
import shutil
import sys
import threading
import unittest

try:
    import grpc
except ImportError:  # python3-grpcio missing: meson counts exit 77 as skipped
    sys.stderr.write('python3-grpcio not available: skipping\n')
    sys.exit(77)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import json_format

import hbonelib

if shutil.which('protoc') is None:
    sys.stderr.write('protoc not available: skipping\n')
    sys.exit(77)

from fakeistiod import (ADS_SERVICE, CA_SERVICE, SERVER_NAME, T_ADDRESS, T_CLA, T_CLUSTER,
                        T_LISTENER, T_ROUTE, FakeIstiod, NackError, load_protos)

FIXTURE = os.environ.get('WP_FIXTURE', os.path.join(hbonelib.TESTS_DIR, 'data',
                                                    'istiod-waypoint-bookinfo.json'))
TOKEN = 'tok-' + os.urandom(6).hex()
WAYPOINT_NODE = 'waypoint~127.0.0.60~bookinfo-waypoint-5d8f.bookinfo~bookinfo.svc.cluster.local'
P = load_protos()


def status_of(rpc_error):
    return rpc_error.code(), rpc_error.details()


class AdsClient:
    """A minimal ADS client: requests from a queue, responses collected by a thread."""

    def __init__(self, channel, api='delta', token=TOKEN, clusterid='Kubernetes'):
        self.api = api
        self.requests = queue.Queue()
        self.responses = queue.Queue()
        if api == 'delta':
            method = channel.stream_stream(
                '/%s/DeltaAggregatedResources' % ADS_SERVICE,
                request_serializer=P.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=P.DeltaDiscoveryResponse.FromString)
        else:
            method = channel.stream_stream(
                '/%s/StreamAggregatedResources' % ADS_SERVICE,
                request_serializer=P.DiscoveryRequest.SerializeToString,
                response_deserializer=P.DiscoveryResponse.FromString)
        md = [('clusterid', clusterid)]
        if token is not None:
            md.append(('authorization', 'Bearer ' + token))
        self.call = method(iter(self.requests.get, None), metadata=md)
        self.error = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError as e:
            self.error = e
        self.responses.put(None)

    def send(self, **kw):
        cls = P.DeltaDiscoveryRequest if self.api == 'delta' else P.DiscoveryRequest
        req = cls()
        node = kw.pop('node', None)
        if node is not None:
            json_format.ParseDict(node, req.node)
        error = kw.pop('error', None)
        if error is not None:
            req.error_detail.code, req.error_detail.message = error
        for k, v in kw.items():
            f = getattr(req, k)
            if isinstance(v, dict):
                f.update(v)
            elif isinstance(v, (list, tuple)):
                f.extend(v)
            else:
                setattr(req, k, v)
        self.requests.put(req)

    def recv(self, timeout=10):
        r = self.responses.get(timeout=timeout)
        if r is None:
            raise self.error or EOFError('stream ended')
        return r

    def expect_silence(self, timeout=0.5):
        try:
            r = self.responses.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError('unexpected response: %s' % r)

    def close(self):
        self.requests.put(None)
        self.call.cancel()


def node(ns='bookinfo', sa='bookinfo-waypoint'):
    return {'id': WAYPOINT_NODE, 'cluster': '%s.%s' % (sa, ns),
            'metadata': {'NAMESPACE': ns, 'SERVICE_ACCOUNT': sa, 'ISTIO_VERSION': '1.27.0',
                         'INSTANCE_IPS': '127.0.0.60', 'LABELS': {'app': 'waypoint'}}}


def delta_names(resp):
    return sorted(r.name for r in resp.resources)


def make_csr(uris, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if uris:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(u) for u in uris]), critical=True)
    return key, b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


class FakeIstiodTest(unittest.TestCase):
    fi_kw = {}

    @classmethod
    def setUpClass(cls):
        cls.block = hbonelib.block_for(cls.__name__)

    def setUp(self):
        self.fi = FakeIstiod(hbonelib.pki_dir(), listen=self.block + '.1:15012', token=TOKEN,
                             log=(print if os.environ.get('FI_VERBOSE') else None),
                             **self.fi_kw).start()
        self.addCleanup(self.fi.stop)
        self.topo = hbonelib.Topology(self.block)
        self.config = self.topo.config()
        self.fi.set_config(self.config)
        self._channels = []

    def tearDown(self):
        for c in self._channels:
            c.close()

    def channel(self, target_override=True):
        creds = grpc.ssl_channel_credentials(root_certificates=self.fi.root_pem.encode())
        opts = [('grpc.ssl_target_name_override', SERVER_NAME)] if target_override else []
        ch = grpc.secure_channel(self.fi.address, creds, options=opts)
        self._channels.append(ch)
        return ch

    def client(self, api='delta', **kw):
        c = AdsClient(self.channel(), api, **kw)
        self.addCleanup(c.close)
        return c

    def ca_call(self, csr, ttl=3600, token=TOKEN, target_override=True):
        rpc = self.channel(target_override).unary_unary(
            '/%s/CreateCertificate' % CA_SERVICE,
            request_serializer=P.IstioCertificateRequest.SerializeToString,
            response_deserializer=P.IstioCertificateResponse.FromString)
        md = [('clusterid', 'Kubernetes')]
        if token is not None:
            md.append(('authorization', 'Bearer ' + token))
        return rpc(P.IstioCertificateRequest(csr=csr, validity_duration=ttl), metadata=md,
                   timeout=10)

    def subscribe_all(self, c, t=T_CLUSTER, **kw):
        c.send(node=node(), type_url=t, **kw)
        r = c.recv()
        self.assertEqual(r.type_url, t)
        return r


class DeltaTest(FakeIstiodTest):
    def test_wildcard_subscribe_sends_everything_and_records_ack(self):
        c = self.client()
        r = self.subscribe_all(c)
        self.assertEqual(delta_names(r), sorted(self.config['resources'][T_CLUSTER]))
        for res in r.resources:
            self.assertEqual(res.resource.type_url, T_CLUSTER)
            self.assertEqual(res.version, self.fi.version(T_CLUSTER, res.name))
            cl = P.message_class('envoy.config.cluster.v3.Cluster')()
            res.resource.Unpack(cl)
            self.assertEqual(cl.name, res.name)
        self.assertEqual(r.removed_resources, [])
        c.send(type_url=T_CLUSTER, response_nonce=r.nonce)
        ack = self.fi.wait_for_ack(T_CLUSTER)
        self.assertEqual((ack.kind, ack.nonce, ack.api), ('ack', r.nonce, 'delta'))
        first = self.fi.requests(T_CLUSTER)[0]
        self.assertEqual(first.kind, 'request')
        n = self.fi.last_node()
        self.assertEqual(n['id'], WAYPOINT_NODE)
        self.assertEqual(n['metadata']['NAMESPACE'], 'bookinfo')
        self.assertEqual(n['metadata']['LABELS'], {'app': 'waypoint'})
        self.assertEqual(self.fi.stream_count(), 1)
        s = self.fi.streams()[0]
        self.assertEqual((s.api, s.clusterid), ('delta', 'Kubernetes'))
        self.assertEqual(self.fi.subscriptions(T_CLUSTER), {'*'})

    def test_wildcard_type_ignores_names(self):
        c = self.client()
        r = self.subscribe_all(c, resource_names_subscribe=['main_internal'])
        self.assertEqual(delta_names(r), sorted(self.config['resources'][T_CLUSTER]))

    def test_empty_type_still_answered_on_subscribe(self):
        c = self.client()
        r = self.subscribe_all(c, T_ROUTE, resource_names_subscribe=['nope'])
        self.assertEqual((list(r.resources), list(r.removed_resources)), ([], []))
        c.send(type_url=T_ROUTE, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_ROUTE)
        c.send(type_url=T_ROUTE, resource_names_subscribe=['nope2'])
        c.expect_silence()

    def test_nack_is_recorded_with_detail(self):
        c = self.client()
        r = self.subscribe_all(c, T_LISTENER)
        c.send(type_url=T_LISTENER, response_nonce=r.nonce, error=(3, 'main_internal: bad matcher'))
        rec = self.fi.wait_for_nack(T_LISTENER)
        self.assertEqual((rec.kind, rec.nonce, rec.error_code, rec.error_message),
                         ('nack', r.nonce, 3, 'main_internal: bad matcher'))
        with self.assertRaises(NackError) as cm:
            self.fi.wait_for_ack(T_LISTENER, timeout=1)
        self.assertEqual(cm.exception.record.error_message, 'main_internal: bad matcher')
        self.assertEqual(len(self.fi.nacks(T_LISTENER)), 1)
        self.assertEqual(self.fi.acks(T_LISTENER), [])

    def test_wait_for_ack_times_out_without_ack(self):
        c = self.client()
        self.subscribe_all(c)
        with self.assertRaises(TimeoutError):
            self.fi.wait_for_ack(T_CLUSTER, timeout=0.3)

    def test_stale_nonce_is_not_an_ack(self):
        c = self.client()
        r1 = self.subscribe_all(c)
        self.fi.update(T_CLUSTER, {'extra': {'name': 'extra', 'type': 'STATIC'}})
        r2 = c.recv()
        mark = self.fi.mark()
        c.send(type_url=T_CLUSTER, response_nonce=r1.nonce)
        rec = self.fi.wait_for_request(T_CLUSTER, after=mark)
        self.assertEqual(rec.kind, 'stale')
        with self.assertRaises(TimeoutError):
            self.fi.wait_for_ack(T_CLUSTER, timeout=0.3)
        c.send(type_url=T_CLUSTER, response_nonce=r2.nonce)
        self.assertEqual(self.fi.wait_for_ack(T_CLUSTER).nonce, r2.nonce)
        # the latest word about a nonce counts: a later NACK of it turns the ACK into an error
        mark = self.fi.mark()
        c.send(type_url=T_CLUSTER, response_nonce=r2.nonce, error=(13, 'late'))
        self.assertEqual(self.fi.wait_for_nack(T_CLUSTER, after=mark).error_code, 13)
        with self.assertRaises(NackError):
            self.fi.wait_for_ack(T_CLUSTER, timeout=1)

    def test_eds_sends_only_subscribed_names(self):
        c = self.client()
        echo, plain = self.topo.services['echo'].cluster, self.topo.services['plain'].cluster
        r = self.subscribe_all(c, T_CLA, resource_names_subscribe=[echo])
        self.assertEqual(delta_names(r), [echo])
        cla = P.message_class('envoy.config.endpoint.v3.ClusterLoadAssignment')()
        r.resources[0].resource.Unpack(cla)
        self.assertEqual(len(cla.endpoints[0].lb_endpoints), 2)
        c.send(type_url=T_CLA, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_CLA)
        c.send(type_url=T_CLA, resource_names_subscribe=[plain])
        r = c.recv()
        self.assertEqual(delta_names(r), [plain])
        self.assertEqual(self.fi.subscriptions(T_CLA), {echo, plain})
        # a change to an unsubscribed CLA is not pushed; to a subscribed one it is
        c.send(type_url=T_CLA, resource_names_unsubscribe=[plain])
        self.fi.wait_for(lambda: self.fi.subscriptions(T_CLA) == {echo}, 5)
        self.fi.update(T_CLA, {plain: {'cluster_name': plain}})
        c.expect_silence()
        self.fi.update(T_CLA, {echo: {'cluster_name': echo}})
        r = c.recv()
        self.assertEqual(delta_names(r), [echo])
        self.assertEqual(self.fi.responses(T_CLA)[-1].resources,
                         {echo: self.fi.version(T_CLA, echo)})

    def test_update_pushes_only_changes_and_removal(self):
        c = self.client()
        r = self.subscribe_all(c)
        c.send(type_url=T_CLUSTER, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_CLUSTER)
        # same content: no push
        self.fi.update(T_CLUSTER, {'encap': self.config['resources'][T_CLUSTER]['encap']})
        c.expect_silence()
        changed = dict(self.config['resources'][T_CLUSTER]['encap'], connect_timeout='3s')
        self.fi.update(T_CLUSTER, {'encap': changed})
        r = c.recv()
        self.assertEqual(delta_names(r), ['encap'])
        self.assertNotEqual(r.resources[0].version, self.fi.responses(T_CLUSTER)[0]
                            .resources['encap'])
        c.send(type_url=T_CLUSTER, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_CLUSTER, nonce=r.nonce)
        self.fi.remove(T_CLUSTER, ['encap', 'no-such-cluster'])
        r = c.recv()
        self.assertEqual((delta_names(r), list(r.removed_resources)), ([], ['encap']))
        c.send(type_url=T_CLUSTER, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_CLUSTER)
        self.assertNotIn('encap', self.fi.client_versions(T_CLUSTER))

    def test_wait_synced_needs_every_type_acked(self):
        c = self.client()
        r1 = self.subscribe_all(c, T_CLUSTER)
        r2 = self.subscribe_all(c, T_LISTENER)
        c.send(type_url=T_CLUSTER, response_nonce=r1.nonce)
        with self.assertRaises(TimeoutError):
            self.fi.wait_synced(timeout=0.3)
        c.send(type_url=T_LISTENER, response_nonce=r2.nonce)
        self.fi.wait_synced()
        with self.assertRaises(TimeoutError):
            self.fi.wait_synced(types=[T_ADDRESS], timeout=0.3)
        self.fi.update(T_LISTENER, {'x': {'name': 'x'}})
        r3 = c.recv()
        c.send(type_url=T_LISTENER, response_nonce=r3.nonce, error=(3, 'no'))
        with self.assertRaises(NackError):
            self.fi.wait_synced(timeout=5)

    def test_batch_pushes_in_istiod_order(self):
        c = self.client()
        for t in (T_LISTENER, T_CLUSTER):
            self.subscribe_all(c, t)
        with self.fi.batch():
            self.fi.update(T_LISTENER, {'x': {'name': 'x'}})
            self.fi.update(T_CLUSTER, {'x': {'name': 'x'}})
        self.assertEqual([c.recv().type_url for _ in range(2)], [T_CLUSTER, T_LISTENER])

    def test_bad_resource_is_rejected_and_state_kept(self):
        before = self.fi.resources(T_CLUSTER)
        with self.assertRaises(json_format.ParseError):
            self.fi.set_resources(T_CLUSTER, {'x': {'name': 'x', 'no_such_field': 1}})
        with self.assertRaises(json_format.ParseError):
            self.fi.update(T_CLUSTER, {'x': {'name': 'x', 'typed_extension_protocol_options': {
                'k': {'@type': 'type.googleapis.com/no.such.Type'}}}})
        self.assertEqual(self.fi.resources(T_CLUSTER), before)

    def test_reconnect_honours_initial_resource_versions(self):
        c = self.client()
        r = self.subscribe_all(c)
        have = {res.name: res.version for res in r.resources}
        c.send(type_url=T_CLUSTER, response_nonce=r.nonce)
        self.fi.wait_for_ack(T_CLUSTER)
        self.fi.restart()
        with self.assertRaises(grpc.RpcError):
            while True:
                c.recv()
        self.fi.wait_for_streams(0)
        changed = dict(self.config['resources'][T_CLUSTER]['encap'], connect_timeout='4s')
        self.fi.update(T_CLUSTER, {'encap': changed})
        self.fi.remove(T_CLUSTER, ['main_internal'])
        c2 = self.client()
        c2.send(node=node(), type_url=T_CLUSTER, initial_resource_versions=have)
        r = c2.recv()
        self.assertEqual(delta_names(r), ['encap'])
        self.assertEqual(list(r.removed_resources), ['main_internal'])
        req = self.fi.requests(T_CLUSTER)[-1]
        self.assertEqual(req.initial_resource_versions, have)
        self.assertEqual(self.fi.stream_count(), 1)
        # nothing changed: reconnecting again gets an empty answer
        have2 = dict(have, encap=r.resources[0].version)
        del have2['main_internal']
        c2.close()
        self.fi.wait_for_streams(0)
        c3 = self.client()
        c3.send(node=node(), type_url=T_CLUSTER, initial_resource_versions=have2)
        r = c3.recv()
        self.assertEqual((delta_names(r), list(r.removed_resources)), ([], []))

    def test_kill_streams(self):
        c = self.client()
        self.subscribe_all(c)
        self.assertEqual(self.fi.kill_streams(grpc.StatusCode.UNAVAILABLE, 'go away'), 1)
        with self.assertRaises(grpc.RpcError) as cm:
            while True:
                c.recv()
        self.assertEqual(status_of(cm.exception), (grpc.StatusCode.UNAVAILABLE, 'go away'))
        self.fi.wait_for_streams(0)
        self.assertFalse(self.fi.streams(active=False)[0].active)

    def test_bad_token_rejected(self):
        for api in ('delta', 'sotw'):
            for tok in ('wrong', None):
                c = self.client(api, token=tok)
                c.send(node=node(), type_url=T_CLUSTER)
                with self.assertRaises(grpc.RpcError) as cm:
                    c.recv()
                self.assertEqual(status_of(cm.exception),
                                 (grpc.StatusCode.UNAUTHENTICATED, 'authentication failure'))
        self.assertEqual(len(self.fi.auth_failures()), 4)
        self.assertEqual(self.fi.requests(), [])

    def test_server_cert_verifies_by_ip(self):
        c = AdsClient(self.channel(target_override=False))
        self.addCleanup(c.close)
        self.subscribe_all(c)


class IdentityCheckTest(FakeIstiodTest):
    fi_kw = {'identity': hbonelib.WAYPOINT_ID}

    def test_node_must_match_identity(self):
        c = self.client()
        self.subscribe_all(c)
        c2 = self.client()
        c2.send(node=node(sa='other'), type_url=T_CLUSTER)
        with self.assertRaises(grpc.RpcError) as cm:
            while True:
                c2.recv()
        self.assertEqual(cm.exception.code(), grpc.StatusCode.PERMISSION_DENIED)

    def test_csr_san_must_match_identity(self):
        _, csr = make_csr([hbonelib.CLIENT_ID])
        with self.assertRaises(grpc.RpcError) as cm:
            self.ca_call(csr)
        self.assertEqual(cm.exception.code(), grpc.StatusCode.PERMISSION_DENIED)
        _, csr = make_csr([hbonelib.WAYPOINT_ID])
        self.ca_call(csr)


class SotwTest(FakeIstiodTest):
    def test_sotw_full_state_ack_and_push(self):
        c = self.client('sotw')
        c.send(node=node(), type_url=T_CLUSTER)
        r = c.recv()
        names = sorted(self.config['resources'][T_CLUSTER])
        self.assertEqual(len(r.resources), len(names))
        c.send(type_url=T_CLUSTER, version_info=r.version_info, response_nonce=r.nonce)
        ack = self.fi.wait_for_ack(T_CLUSTER)
        self.assertEqual((ack.api, ack.version_info), ('sotw', r.version_info))
        c.expect_silence()
        self.fi.remove(T_CLUSTER, ['encap'])
        r2 = c.recv()
        self.assertEqual(len(r2.resources), len(names) - 1)
        self.assertNotEqual(r2.version_info, r.version_info)
        c.send(type_url=T_CLUSTER, version_info=r.version_info, response_nonce=r2.nonce,
               error=(3, 'rejected'))
        self.assertEqual(self.fi.wait_for_nack(T_CLUSTER).error_message, 'rejected')

    def test_sotw_eds_by_name(self):
        c = self.client('sotw')
        echo, plain = self.topo.services['echo'].cluster, self.topo.services['plain'].cluster
        c.send(node=node(), type_url=T_CLA, resource_names=[echo])
        r = c.recv()
        self.assertEqual(len(r.resources), 1)
        c.send(type_url=T_CLA, resource_names=[echo, plain], response_nonce=r.nonce,
               version_info=r.version_info)
        r = c.recv()
        self.assertEqual(len(r.resources), 2)
        self.assertEqual(sorted(self.fi.responses(T_CLA)[-1].resources), sorted([echo, plain]))
        self.assertEqual(self.fi.requests(T_CLA)[-1].kind, 'ack')


class CaTest(FakeIstiodTest):
    def check_chain(self, chain, uri, lifetime):
        self.assertEqual(len(chain), 2)
        self.assertTrue(all(p.endswith('\n') for p in chain))
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        root = x509.load_pem_x509_certificate(chain[1].encode())
        self.assertEqual(chain[1], self.fi.root_pem)
        root.public_key().verify(leaf.signature, leaf.tbs_certificate_bytes,
                                 ec.ECDSA(leaf.signature_hash_algorithm))
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertTrue(san.critical)
        self.assertEqual(san.value.get_values_for_type(x509.UniformResourceIdentifier), [uri])
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.CLIENT_AUTH, list(eku))
        self.assertEqual(leaf.not_valid_after - leaf.not_valid_before,
                         datetime.timedelta(seconds=lifetime))
        return leaf

    def test_signs_csr_san_for_requested_ttl(self):
        key, csr = make_csr([hbonelib.WAYPOINT_ID])
        resp = self.ca_call(csr, ttl=3600)
        leaf = self.check_chain(list(resp.cert_chain), hbonelib.WAYPOINT_ID, 3600)
        self.assertEqual(leaf.public_key().public_numbers(), key.public_key().public_numbers())
        rec = self.fi.ca_requests()[-1]
        self.assertEqual((rec.ok, rec.requested_ttl, rec.ttl, rec.clusterid, rec.csr_uris),
                         (True, 3600, 3600, 'Kubernetes', [hbonelib.WAYPOINT_ID]))
        # no TTL asked: istiod's 24 h default
        self.check_chain(list(self.ca_call(csr, ttl=0).cert_chain), hbonelib.WAYPOINT_ID, 86400)

    def test_ttl_override(self):
        self.fi.ca_ttl_override = 30
        _, csr = make_csr([hbonelib.WAYPOINT_ID])
        self.check_chain(list(self.ca_call(csr, ttl=86400).cert_chain), hbonelib.WAYPOINT_ID, 30)

    def test_bad_token_and_bad_requests_rejected(self):
        _, csr = make_csr([hbonelib.WAYPOINT_ID])
        for tok in ('nope', None):
            with self.assertRaises(grpc.RpcError) as cm:
                self.ca_call(csr, token=tok)
            self.assertEqual(status_of(cm.exception),
                             (grpc.StatusCode.UNAUTHENTICATED, 'authentication failure'))
        for bad, ttl in (('garbage', 60), (make_csr([])[1], 60), (csr, 91 * 86400)):
            with self.assertRaises(grpc.RpcError) as cm:
                self.ca_call(bad, ttl=ttl)
            self.assertEqual(cm.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
        self.fi.ca_fail_next(1, grpc.StatusCode.UNAVAILABLE, 'ca down')
        with self.assertRaises(grpc.RpcError) as cm:
            self.ca_call(csr)
        self.assertEqual(status_of(cm.exception), (grpc.StatusCode.UNAVAILABLE, 'ca down'))
        self.ca_call(csr)
        self.assertEqual([r.ok for r in self.fi.ca_requests()], [False] * 6 + [True])
        self.fi.token = 'rotated'
        self.ca_call(csr, token='rotated')

    def test_intermediate_issuer_chain(self):
        fi = FakeIstiod(hbonelib.pki_dir(), listen=self.block + '.2:0', token=None,
                        ca_issuer='intermediate').start()
        self.addCleanup(fi.stop)
        rpc = grpc.secure_channel(fi.address, grpc.ssl_channel_credentials(
            fi.root_pem.encode())).unary_unary(
            '/%s/CreateCertificate' % CA_SERVICE,
            request_serializer=P.IstioCertificateRequest.SerializeToString,
            response_deserializer=P.IstioCertificateResponse.FromString)
        resp = rpc(P.IstioCertificateRequest(csr=make_csr([hbonelib.WAYPOINT_ID])[1],
                                             validity_duration=60), timeout=10)
        self.assertEqual(len(resp.cert_chain), 3)
        self.assertEqual(resp.cert_chain[2], fi.root_pem)


def canon(msg):
    """Plain-dict JSON of a message (json_format gives OrderedDicts for Any, whose == is
    order-sensitive)."""
    return json.loads(json.dumps(P.to_dict(msg)))


class ConfigRoundTripTest(unittest.TestCase):
    """The JSON the waypoint tests feed it is exactly representable in the real proto runtime."""

    def roundtrip(self, cfg):
        n = 0
        for t, res in cfg['resources'].items():
            for name, d in res.items():
                m = P.parse(t, d)
                self.assertEqual(m.DESCRIPTOR.full_name, t.rsplit('/', 1)[1])
                back = canon(m)
                self.assertEqual(canon(P.parse(t, back)), back, name)
                n += 1
        return n

    def test_make_config_parses(self):
        topo = hbonelib.Topology(hbonelib.block_for('roundtrip'))
        self.assertGreater(self.roundtrip(topo.config()), 40)
        self.assertGreater(self.roundtrip(
            hbonelib.make_config('127.0.0.60', list(topo.services.values()))), 40)

    def test_fixture_parses(self):
        with open(FIXTURE) as f:
            cfg = json.load(f)
        self.assertIn(T_ADDRESS, cfg['resources'])
        self.assertEqual(self.roundtrip(cfg), 36)

    def test_served_any_equals_parsed_json(self):
        fi = FakeIstiod(hbonelib.pki_dir(), listen='%s.3:0' % hbonelib.block_for('rt'), token=None)
        fi.set_config(FIXTURE)
        with open(FIXTURE) as f:
            cfg = json.load(f)
        for t in (T_LISTENER, T_ADDRESS):
            for name, m in fi.resources(t).items():
                self.assertEqual(canon(m), canon(P.parse(t, cfg['resources'][t][name])))
        self.assertEqual(sorted(fi.resources(T_CLA)), sorted(cfg['resources'][T_CLA]))


if __name__ == '__main__':
    hbonelib.main()
