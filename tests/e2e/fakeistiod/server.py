"""FakeIstiod: an in-process istiod stand-in on grpcio (ADS delta + SotW, Istio CA).

All state lives behind one condition variable; gRPC worker threads and the test thread both use
it. Every request received and every response sent is recorded (see RequestRecord and
ResponseRecord) so tests can assert on exactly what the client said.
"""

import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import os
import queue
import threading
import time
import uuid
from concurrent import futures

import grpc

from . import pki, protos

T_CLUSTER = 'type.googleapis.com/envoy.config.cluster.v3.Cluster'
T_CLA = 'type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment'
T_LISTENER = 'type.googleapis.com/envoy.config.listener.v3.Listener'
T_ROUTE = 'type.googleapis.com/envoy.config.route.v3.RouteConfiguration'
T_ADDRESS = 'type.googleapis.com/istio.workload.Address'

# Types istiod serves as wildcard (everything on subscribe, whatever names are asked for).
WILDCARD_TYPES = frozenset([T_CLUSTER, T_LISTENER, T_ADDRESS])
# istiod's push order: clusters before their endpoints before the listeners using them.
PUSH_ORDER = [T_CLUSTER, T_CLA, T_LISTENER, T_ROUTE, T_ADDRESS]

ADS_SERVICE = 'envoy.service.discovery.v3.AggregatedDiscoveryService'
CA_SERVICE = 'istio.v1.auth.IstioCertificateService'
SERVER_NAME = 'istiod.istio-system.svc'

_END = object()


class NackError(AssertionError):
    """wait_for_ack found the awaited response NACKed (record: the NACK RequestRecord)."""

    def __init__(self, record):
        super().__init__('NACK of %s nonce %s: code %d %r' % (
            record.type_url, record.nonce, record.error_code, record.error_message))
        self.record = record


class _Kill:
    def __init__(self, code, message):
        self.code, self.message = code, message


class RequestRecord:
    """One xDS request as received.

    seq            global order of all records (requests, responses, CA calls)
    time           time.monotonic()
    stream         stream id (int), api 'delta' or 'sotw'
    type_url
    kind           'request' (no response_nonce), 'ack' (nonce = last sent on the stream for the
                   type, no error_detail), 'nack' (error_detail set), 'stale' (nonce of an older
                   response)
    nonce          response_nonce ('' if none)
    error_code, error_message   from error_detail (0 / '' if none)
    subscribe, unsubscribe      delta: resource_names_subscribe / _unsubscribe (lists)
    initial_resource_versions   delta: dict
    resource_names, version_info    sotw
    node           dict (json_format of the Node, proto field names) when the request had one
    """

    def __init__(self, **kw):
        self.subscribe, self.unsubscribe, self.initial_resource_versions = [], [], {}
        self.resource_names, self.version_info, self.node = [], '', None
        self.error_code, self.error_message = 0, ''
        self.__dict__.update(kw)

    def __repr__(self):
        extra = ''
        if self.kind == 'nack':
            extra = ' error=%d %r' % (self.error_code, self.error_message)
        if self.subscribe or self.unsubscribe:
            extra += ' sub=%r unsub=%r' % (self.subscribe, self.unsubscribe)
        if self.initial_resource_versions:
            extra += ' initial=%r' % self.initial_resource_versions
        if self.resource_names:
            extra += ' names=%r' % self.resource_names
        return '<%s #%d stream %d %s %s nonce=%r%s>' % (
            self.api, self.seq, self.stream, self.type_url.rsplit('.', 1)[-1], self.kind,
            self.nonce, extra)


class ResponseRecord:
    """One xDS response as sent: seq, time, stream, api, type_url, nonce, version_info (SotW
    version / delta system_version_info), resources {name: version} (SotW: the full set sent),
    removed [names] (delta)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __repr__(self):
        return '<%s #%d stream %d %s response nonce=%r resources=%r removed=%r>' % (
            self.api, self.seq, self.stream, self.type_url.rsplit('.', 1)[-1], self.nonce,
            sorted(self.resources), self.removed)


class CaRecord:
    """One CreateCertificate call: seq, time, ok (bool), code (grpc.StatusCode or None),
    message, metadata (dict, lower-case keys), clusterid, csr_uris (URI SANs in the CSR),
    requested_ttl (validity_duration), ttl (issued lifetime, s), uris (issued SANs),
    not_before / not_after (datetime, naive UTC), serial, cert_chain (list of PEM strings)."""

    def __init__(self, **kw):
        self.ok, self.code, self.message, self.clusterid = False, None, '', None
        self.csr_uris, self.requested_ttl, self.ttl, self.uris = [], 0, 0, []
        self.not_before = self.not_after = self.serial = None
        self.cert_chain = []
        self.__dict__.update(kw)

    def __repr__(self):
        return '<ca #%d ok=%s code=%s uris=%r ttl=%s>' % (self.seq, self.ok, self.code,
                                                          self.uris or self.csr_uris, self.ttl)


class _TypeState:
    """What one stream knows about one type."""

    def __init__(self, wildcard):
        self.wildcard = wildcard
        self.names = set()
        self.sent = {}          # delta: name -> version the client has; sotw: same for last set
        self.last_nonce = None
        self.sotw_fingerprint = None


class Stream:
    """A connected ADS stream (read-only for tests): id, api ('delta' | 'sotw'), peer, metadata
    (dict, lower-case keys), clusterid, node (dict or None), active, opened (monotonic time)."""

    def __init__(self, sid, api, peer, metadata):
        self.id, self.api, self.peer, self.metadata = sid, api, peer, metadata
        self.clusterid = metadata.get('clusterid')
        self.node = None
        self.active = True
        self.opened = time.monotonic()
        self.types = {}
        self.queue = queue.Queue()

    def subscription(self, type_url):
        ts = self.types.get(type_url)
        if ts is None:
            return None
        return {'*'} | set(ts.names) if ts.wildcard else set(ts.names)

    def __repr__(self):
        return '<stream %d %s %s active=%s>' % (self.id, self.api, self.peer, self.active)


class FakeIstiod:
    """An istiod stand-in. See the module README (fakeistiod/README.md) for the API summary."""

    def __init__(self, root_dir, listen='127.0.0.1:0', token='test-token', identity=None,
                 ca_ttl_override=None, ca_issuer='root', ca_check_csr_san=True,
                 wildcard_types=WILDCARD_TYPES, server_names=(SERVER_NAME,), grpc_options=(),
                 max_workers=64, log=None):
        self.protos = protos.load()
        self.root_dir = root_dir
        self.root_pem_path = os.path.join(root_dir, 'root.pem')
        self._host, port = listen.rsplit(':', 1)
        self._host = self._host.strip('[]')
        self._port = int(port)
        self.token = token
        self.identity = identity
        self.ca_ttl_override = ca_ttl_override
        self.ca_check_csr_san = ca_check_csr_san
        self.wildcard_types = frozenset(wildcard_types)
        self.issuer = pki.Issuer(root_dir, ca_issuer)
        self._server_names = list(server_names)
        self._grpc_options = list(grpc_options)
        self._max_workers = max_workers
        self._log = log
        self._cond = threading.Condition(threading.RLock())
        self._seqn = 0
        self._sid = itertools.count(1)
        self._nonce = itertools.count(1)
        self._system_version = 0
        self._resources = {}     # type_url -> {name: (version, Any)}
        self._messages = {}      # type_url -> {name: message}
        self._batch = 0
        self._dirty = set()
        self._streams = {}       # id -> Stream (active and closed)
        self._requests = []
        self._responses = []
        self._ca = []
        self._auth_failures = []
        self._ca_failures = collections.deque()
        self._server = None
        self._serving_creds = None

    # ------------------------------------------------------------------------------------------
    # lifecycle

    @property
    def port(self):
        return self._port

    @property
    def address(self):
        """'ip:port' to dial (valid after start())."""
        return '%s:%d' % (self._host, self._port)

    @property
    def root_pem(self):
        return self.issuer.root_pem

    def start(self):
        """Starts serving (on the same port again after stop()). Returns self."""
        with self._cond:
            if self._server is not None:
                return self
            if self._serving_creds is None:
                key_pem, chain_pem = self.issuer.serving_cert(self._server_names, [self._host])
                self._serving_creds = grpc.ssl_server_credentials([(key_pem, chain_pem)])
            opts = [('grpc.so_reuseport', 0),
                    # istiod's keepalive enforcement (MinTime 15 s, PermitWithoutStream)
                    ('grpc.http2.min_ping_interval_without_data_ms', 15000),
                    ('grpc.keepalive_permit_without_calls', 1)] + self._grpc_options
            server = grpc.server(futures.ThreadPoolExecutor(max_workers=self._max_workers,
                                                            thread_name_prefix='fakeistiod'),
                                 options=opts, maximum_concurrent_rpcs=self._max_workers // 2)
            p = self.protos
            server.add_generic_rpc_handlers([
                grpc.method_handlers_generic_handler(ADS_SERVICE, {
                    'StreamAggregatedResources': grpc.stream_stream_rpc_method_handler(
                        self._sotw_rpc, request_deserializer=p.DiscoveryRequest.FromString,
                        response_serializer=p.DiscoveryResponse.SerializeToString),
                    'DeltaAggregatedResources': grpc.stream_stream_rpc_method_handler(
                        self._delta_rpc, request_deserializer=p.DeltaDiscoveryRequest.FromString,
                        response_serializer=p.DeltaDiscoveryResponse.SerializeToString)}),
                grpc.method_handlers_generic_handler(CA_SERVICE, {
                    'CreateCertificate': grpc.unary_unary_rpc_method_handler(
                        self._ca_rpc, request_deserializer=p.IstioCertificateRequest.FromString,
                        response_serializer=p.IstioCertificateResponse.SerializeToString)})])
            host = '[%s]' % self._host if ':' in self._host else self._host
            try:
                port = server.add_secure_port('%s:%d' % (host, self._port), self._serving_creds)
            except RuntimeError:
                port = 0
            if not port:
                server.stop(None)
                raise OSError('fakeistiod: cannot listen on %s:%d' % (self._host, self._port))
            self._port = port
            server.start()
            self._server = server
            self._note('listening on %s' % self.address)
        return self

    def stop(self, grace=None):
        """Stops serving: every stream is cancelled (clients see UNAVAILABLE/CANCELLED). State
        and records are kept; start() serves again on the same port."""
        with self._cond:
            server, self._server = self._server, None
            streams = [s for s in self._streams.values() if s.active]
        if server is None:
            return
        server.stop(grace).wait()
        with self._cond:
            for s in streams:
                s.active = False
            self._cond.notify_all()

    def restart(self, down_for=0.0):
        """stop(), wait down_for seconds, start() on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        return self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def close(self):
        self.stop()

    def _note(self, msg):
        if self._log:
            self._log('fakeistiod: ' + msg)

    # ------------------------------------------------------------------------------------------
    # resources

    def _version(self, msg):
        return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()[:16]

    def _put(self, type_url, name, res):
        msg = self.protos.parse(type_url, res)
        a = self.protos.Any(type_url=type_url, value=msg.SerializeToString(deterministic=True))
        self._resources.setdefault(type_url, {})[name] = (self._version(msg), a)
        self._messages.setdefault(type_url, {})[name] = msg

    def set_resources(self, type_url, resources, push=True):
        """Replaces the whole state of type_url with {name: message or JSON dict} (dicts go
        through json_format.ParseDict into our generated classes; a bad dict raises
        json_format.ParseError and changes nothing). Pushes to connected clients unless
        push=False or inside batch()."""
        with self._cond:
            old = (dict(self._resources.get(type_url, {})), dict(self._messages.get(type_url, {})))
            self._resources[type_url], self._messages[type_url] = {}, {}
            try:
                for name, res in resources.items():
                    self._put(type_url, name, res)
            except Exception:
                self._resources[type_url], self._messages[type_url] = old
                raise
            self._changed([type_url], push)

    def update(self, type_url, resources, push=True):
        """Adds or replaces the given {name: resource} (others kept)."""
        with self._cond:
            parsed = {n: self.protos.parse(type_url, r) for n, r in resources.items()}
            for name, msg in parsed.items():
                self._put(type_url, name, msg)
            self._changed([type_url], push)

    def remove(self, type_url, names, push=True):
        """Removes resources by name (unknown names ignored)."""
        with self._cond:
            for n in names:
                self._resources.get(type_url, {}).pop(n, None)
                self._messages.get(type_url, {}).pop(n, None)
            self._changed([type_url], push)

    def set_config(self, config, push=True):
        """Loads a fixture-shaped config ({'resources': {type_url: {name: JSON}}}, e.g.
        hbonelib.make_config() or the bookinfo fixture; a path to such a JSON file works too):
        every type it lists is replaced, in one batch."""
        if isinstance(config, str):
            with open(config) as f:
                config = json.load(f)
        with self.batch(push):
            for type_url, res in config['resources'].items():
                self.set_resources(type_url, res)

    @contextlib.contextmanager
    def batch(self, push=True):
        """Groups changes: one push at the end (types in istiod's order CDS, EDS, LDS, RDS, WDS)."""
        with self._cond:
            self._batch += 1
            try:
                yield self
            finally:
                self._batch -= 1
                if self._batch == 0:
                    dirty, self._dirty = self._dirty, set()
                    if push:
                        self._push(dirty)

    def resources(self, type_url):
        """{name: message} currently held for type_url (copies not made: do not mutate)."""
        with self._cond:
            return dict(self._messages.get(type_url, {}))

    def version(self, type_url, name):
        """The version string of a resource (content hash), or None."""
        with self._cond:
            v = self._resources.get(type_url, {}).get(name)
            return v[0] if v else None

    def push(self, type_urls=None):
        """Sends whatever changed to every connected client (all types by default)."""
        with self._cond:
            self._push(set(type_urls) if type_urls else set(self._resources))

    def _changed(self, types, push):
        self._system_version += 1
        if self._batch:
            self._dirty.update(types)
        elif push:
            self._push(set(types))

    def _ordered(self, types):
        return [t for t in PUSH_ORDER if t in types] + sorted(set(types) - set(PUSH_ORDER))

    def _push(self, types):
        for t in self._ordered(types):
            for s in self._streams.values():
                if not s.active or t not in s.types:
                    continue
                if s.api == 'delta':
                    self._delta_send(s, t, force=False)
                else:
                    self._sotw_send(s, t, force=False)

    # ------------------------------------------------------------------------------------------
    # auth

    def _metadata(self, context):
        return {k.lower(): v for k, v in context.invocation_metadata()}

    def _auth(self, context, what):
        md = self._metadata(context)
        if self.token is None:
            return md
        if md.get('authorization') != 'Bearer ' + self.token:
            with self._cond:
                self._auth_failures.append({'seq': self._next_seq(), 'service': what,
                                            'metadata': md, 'peer': context.peer()})
                self._cond.notify_all()
            self._note('%s: authentication failure from %s' % (what, context.peer()))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, 'authentication failure')
        return md

    def _identity_mismatch(self, node):
        """istiod's PILOT_ENABLE_XDS_IDENTITY_CHECK: node NAMESPACE/SERVICE_ACCOUNT against the
        caller's identity (only when self.identity is set)."""
        if not self.identity:
            return None
        parts = self.identity.split('/')
        try:
            ns, sa = parts[parts.index('ns') + 1], parts[parts.index('sa') + 1]
        except (ValueError, IndexError):
            return None
        md = (node or {}).get('metadata', {})
        if md.get('NAMESPACE') != ns or md.get('SERVICE_ACCOUNT') != sa:
            return 'node %s/%s does not match identity %s' % (
                md.get('NAMESPACE'), md.get('SERVICE_ACCOUNT'), self.identity)
        return None

    # ------------------------------------------------------------------------------------------
    # ADS streams

    def _run_stream(self, api, request_iterator, context, on_request):
        md = self._auth(context, api)
        with self._cond:
            s = Stream(next(self._sid), api, context.peer(), md)
            self._streams[s.id] = s
            self._cond.notify_all()
        self._note('%s stream %d opened from %s' % (api, s.id, s.peer))
        context.add_callback(lambda: s.queue.put(_END))

        def reader():
            try:
                for req in request_iterator:
                    with self._cond:
                        if not s.active:
                            break
                        on_request(s, req)
                        self._cond.notify_all()
            except Exception:
                pass
            s.queue.put(_END)

        threading.Thread(target=reader, name='fakeistiod-reader-%d' % s.id, daemon=True).start()
        try:
            while True:
                item = s.queue.get()
                if item is _END:
                    return
                if isinstance(item, _Kill):
                    context.abort(item.code, item.message)
                yield item
        finally:
            with self._cond:
                s.active = False
                self._cond.notify_all()
            self._note('%s stream %d closed' % (api, s.id))

    def _delta_rpc(self, request_iterator, context):
        return self._run_stream('delta', request_iterator, context, self._on_delta)

    def _sotw_rpc(self, request_iterator, context):
        return self._run_stream('sotw', request_iterator, context, self._on_sotw)

    def _common(self, s, req, type_url, error_detail, nonce, node_field):
        rec = RequestRecord(seq=self._next_seq(), time=time.monotonic(), stream=s.id, api=s.api,
                            type_url=type_url, nonce=nonce)
        if req.HasField(node_field):
            rec.node = self.protos.to_dict(getattr(req, node_field))
            rec.node.setdefault('metadata', {})
            first = s.node is None
            s.node = rec.node
            if first:
                why = self._identity_mismatch(s.node)
                if why:
                    s.queue.put(_Kill(grpc.StatusCode.PERMISSION_DENIED, why))
        ts = s.types.get(type_url)
        if nonce:
            if error_detail.code or error_detail.message:
                rec.kind = 'nack'
                rec.error_code, rec.error_message = error_detail.code, error_detail.message
            elif ts is not None and nonce == ts.last_nonce:
                rec.kind = 'ack'
            else:
                rec.kind = 'stale'
        else:
            rec.kind = 'request'
        return rec

    def _on_delta(self, s, req):
        t = req.type_url
        rec = self._common(s, req, t, req.error_detail, req.response_nonce, 'node')
        rec.subscribe = list(req.resource_names_subscribe)
        rec.unsubscribe = list(req.resource_names_unsubscribe)
        rec.initial_resource_versions = dict(req.initial_resource_versions)
        self._requests.append(rec)
        self._note('recv %r' % rec)
        ts = s.types.get(t)
        new = ts is None
        if new:
            ts = s.types[t] = _TypeState(t in self.wildcard_types)
            ts.sent = dict(req.initial_resource_versions)
        added = False
        for n in req.resource_names_subscribe:
            if n == '*':
                added = added or not ts.wildcard
                ts.wildcard = True
            elif n not in ts.names:
                ts.names.add(n)
                added = True
        for n in req.resource_names_unsubscribe:
            if n == '*':
                ts.wildcard = t in self.wildcard_types
            else:
                ts.names.discard(n)
                if not ts.wildcard:
                    ts.sent.pop(n, None)
        if new or added:
            self._delta_send(s, t, force=new)

    def _subscribed(self, ts, name):
        return ts.wildcard or name in ts.names

    def _delta_send(self, s, t, force):
        ts = s.types[t]
        have = self._resources.get(t, {})
        changed = sorted(n for n, (v, _) in have.items()
                         if self._subscribed(ts, n) and ts.sent.get(n) != v)
        removed = sorted(n for n in ts.sent if n not in have and self._subscribed(ts, n))
        # names in initial_resource_versions that are no longer subscribed are just forgotten
        for n in [n for n in ts.sent if not self._subscribed(ts, n)]:
            del ts.sent[n]
        if not changed and not removed and not force:
            return
        p = self.protos
        nonce = '%d-%s' % (next(self._nonce), uuid.uuid4().hex[:8])
        resp = p.DeltaDiscoveryResponse(system_version_info=str(self._system_version),
                                        type_url=t, nonce=nonce)
        for n in changed:
            v, a = have[n]
            r = resp.resources.add()
            r.name, r.version = n, v
            r.resource.CopyFrom(a)
            ts.sent[n] = v
        for n in removed:
            del ts.sent[n]
        resp.removed_resources.extend(removed)
        ts.last_nonce = nonce
        rr = ResponseRecord(seq=self._next_seq(), time=time.monotonic(), stream=s.id, api='delta',
                            type_url=t, nonce=nonce, version_info=resp.system_version_info,
                            resources={n: have[n][0] for n in changed}, removed=removed)
        self._responses.append(rr)
        self._note('send %r' % rr)
        s.queue.put(resp)

    def _on_sotw(self, s, req):
        t = req.type_url
        rec = self._common(s, req, t, req.error_detail, req.response_nonce, 'node')
        rec.resource_names = list(req.resource_names)
        rec.version_info = req.version_info
        self._requests.append(rec)
        self._note('recv %r' % rec)
        ts = s.types.get(t)
        new = ts is None
        if new:
            ts = s.types[t] = _TypeState(t in self.wildcard_types)
        names = set(req.resource_names)
        wildcard = t in self.wildcard_types or '*' in names
        changed = names - {'*'} != ts.names or wildcard != ts.wildcard
        ts.names, ts.wildcard = names - {'*'}, wildcard
        # a request without a nonce asks for the current state; an ACK/NACK with the same names
        # must not be answered (istiod would loop otherwise)
        if new or changed or not req.response_nonce:
            self._sotw_send(s, t, force=True)

    def _sotw_send(self, s, t, force):
        ts = s.types[t]
        have = self._resources.get(t, {})
        chosen = {n: have[n] for n in sorted(have) if self._subscribed(ts, n)}
        fp = hashlib.sha256(json.dumps(sorted((n, v) for n, (v, _) in chosen.items()))
                            .encode()).hexdigest()[:16]
        if not force and fp == ts.sotw_fingerprint:
            return
        nonce = '%d-%s' % (next(self._nonce), uuid.uuid4().hex[:8])
        resp = self.protos.DiscoveryResponse(version_info=fp, type_url=t, nonce=nonce)
        for n, (v, a) in chosen.items():
            resp.resources.add().CopyFrom(a)
        ts.sotw_fingerprint = fp
        ts.sent = {n: v for n, (v, _) in chosen.items()}
        ts.last_nonce = nonce
        rr = ResponseRecord(seq=self._next_seq(), time=time.monotonic(), stream=s.id, api='sotw',
                            type_url=t, nonce=nonce, version_info=fp, resources=dict(ts.sent),
                            removed=[])
        self._responses.append(rr)
        self._note('send %r' % rr)
        s.queue.put(resp)

    # ------------------------------------------------------------------------------------------
    # CA

    def ca_fail_next(self, count=1, code=grpc.StatusCode.UNAVAILABLE, message='injected failure'):
        """The next `count` authenticated CreateCertificate calls fail with code/message."""
        with self._cond:
            for _ in range(count):
                self._ca_failures.append((code, message))

    def _ca_rpc(self, req, context):
        rec = CaRecord(seq=0, time=time.monotonic(), requested_ttl=req.validity_duration)
        rec.metadata = self._metadata(context)
        rec.clusterid = rec.metadata.get('clusterid')

        def fail(code, message):
            rec.code, rec.message = code, message
            with self._cond:
                rec.seq = self._next_seq()
                self._ca.append(rec)
                self._cond.notify_all()
            self._note('CA: %s %s' % (code, message))
            context.abort(code, message)

        if self.token is not None and rec.metadata.get('authorization') != 'Bearer ' + self.token:
            with self._cond:
                self._auth_failures.append({'seq': self._next_seq(), 'service': 'ca',
                                            'metadata': rec.metadata, 'peer': context.peer()})
            fail(grpc.StatusCode.UNAUTHENTICATED, 'authentication failure')
        with self._cond:
            injected = self._ca_failures.popleft() if self._ca_failures else None
        if injected:
            fail(*injected)
        try:
            csr, rec.csr_uris = pki.parse_csr(req.csr)
        except pki.CsrError as e:
            fail(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if self.identity:
            if self.ca_check_csr_san and rec.csr_uris != [self.identity]:
                fail(grpc.StatusCode.PERMISSION_DENIED, 'CSR SAN %r does not match the caller '
                     'identity %s' % (rec.csr_uris, self.identity))
            uris = [self.identity]   # istiod: the caller's identity, not the CSR's
        else:
            if not rec.csr_uris:
                fail(grpc.StatusCode.INVALID_ARGUMENT, 'CSR has no URI SAN')
            uris = rec.csr_uris
        ttl = req.validity_duration
        if self.ca_ttl_override:
            ttl = int(self.ca_ttl_override)
        elif ttl <= 0:
            ttl = pki.DEFAULT_TTL
        elif ttl > pki.MAX_TTL:
            fail(grpc.StatusCode.INVALID_ARGUMENT, 'requested TTL %ds is greater than the max '
                 'allowed TTL %ds' % (ttl, pki.MAX_TTL))
        cert, chain = self.issuer.sign_csr(csr, uris, ttl)
        rec.ok, rec.code, rec.ttl, rec.uris, rec.cert_chain = True, grpc.StatusCode.OK, ttl, uris, chain
        rec.not_before, rec.not_after = cert.not_valid_before, cert.not_valid_after
        rec.serial = cert.serial_number
        with self._cond:
            rec.seq = self._next_seq()
            self._ca.append(rec)
            self._cond.notify_all()
        self._note('CA: issued %r ttl %d' % (uris, ttl))
        return self.protos.IstioCertificateResponse(cert_chain=chain)

    # ------------------------------------------------------------------------------------------
    # inspection

    def mark(self):
        """The current record sequence number: pass as after= to wait only for newer records."""
        with self._cond:
            return self._peek_seq()

    def _peek_seq(self):
        return self._seqn

    def _next_seq(self):
        with self._cond:
            self._seqn += 1
            return self._seqn

    def requests(self, type_url=None, kind=None, stream=None, after=0):
        with self._cond:
            return [r for r in self._requests if (type_url is None or r.type_url == type_url)
                    and (kind is None or r.kind == kind) and (stream is None or r.stream == stream)
                    and r.seq > after]

    def acks(self, type_url=None, after=0):
        return self.requests(type_url, 'ack', after=after)

    def nacks(self, type_url=None, after=0):
        return self.requests(type_url, 'nack', after=after)

    def responses(self, type_url=None, stream=None, after=0):
        with self._cond:
            return [r for r in self._responses if (type_url is None or r.type_url == type_url)
                    and (stream is None or r.stream == stream) and r.seq > after]

    def ca_requests(self, after=0):
        with self._cond:
            return [r for r in self._ca if r.seq > after]

    def auth_failures(self, after=0):
        with self._cond:
            return [r for r in self._auth_failures if r['seq'] > after]

    def streams(self, active=True):
        """Streams (active ones by default), oldest first."""
        with self._cond:
            return [s for s in self._streams.values() if s.active or not active]

    def stream_count(self):
        with self._cond:
            return sum(1 for s in self._streams.values() if s.active)

    def last_stream(self):
        """The most recently opened stream (active or not), or None."""
        with self._cond:
            return self._streams[max(self._streams)] if self._streams else None

    def last_node(self):
        """The node (dict: id, cluster, metadata {..}, ...) of the most recent request that
        carried one, or None."""
        with self._cond:
            for r in reversed(self._requests):
                if r.node is not None:
                    return r.node
            return None

    def subscriptions(self, type_url, stream=None):
        """Names subscribed for type_url on a stream (default: the latest active stream that
        has the type), '*' included when wildcard; None when not subscribed."""
        with self._cond:
            cands = [s for s in self._streams.values()
                     if (s.id == stream if stream is not None else s.active)
                     and type_url in s.types]
            return cands[-1].subscription(type_url) if cands else None

    def client_versions(self, type_url, stream=None):
        """{name: version} the server believes the client holds for type_url."""
        with self._cond:
            cands = [s for s in self._streams.values()
                     if (s.id == stream if stream is not None else s.active)
                     and type_url in s.types]
            return dict(cands[-1].types[type_url].sent) if cands else None

    def kill_streams(self, code=grpc.StatusCode.UNAVAILABLE, message='killed by test'):
        """Ends every active ADS stream with status code/message (None: a clean OK end).
        Returns the number of streams killed."""
        with self._cond:
            ss = [s for s in self._streams.values() if s.active]
        for s in ss:
            s.queue.put(_END if code is None else _Kill(code, message))
        return len(ss)

    # ------------------------------------------------------------------------------------------
    # waiting (blocking; the *_async variants run them in a thread for asyncio tests)

    def wait_for(self, predicate, timeout=10, what='condition'):
        """Waits until predicate() (called under the lock) returns something truthy; returns
        it, or raises TimeoutError with the recent records."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                r = predicate()
                if r:
                    return r
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError('fakeistiod: timed out waiting for %s; recent:\n  %s' % (
                        what, '\n  '.join(repr(x) for x in self._recent())))
                self._cond.wait(min(left, 0.5))

    def _recent(self, n=15):
        return sorted(self._requests[-n:] + self._responses[-n:] + self._ca[-5:],
                      key=lambda r: r.seq)[-n:]

    def _latest_nonces(self, type_url):
        return {s.id: s.types[type_url].last_nonce for s in self._streams.values()
                if s.active and type_url in s.types and s.types[type_url].last_nonce}

    def _reply_to(self, type_url, nonce, stream=None):
        for r in reversed(self._requests):
            if r.type_url == type_url and r.nonce == nonce and r.kind in ('ack', 'nack') and \
                    (stream is None or r.stream == stream):
                return r
        return None

    def wait_for_ack(self, type_url, nonce=None, timeout=10):
        """Waits for the ACK of `nonce`, or (nonce=None) until every active stream subscribed to
        type_url has ACKed the latest response it was sent of that type (istioctl's SYNCED).
        Raises NackError if the awaited response was NACKed. Returns the (latest) ACK record."""
        def pred():
            if nonce is not None:
                r = self._reply_to(type_url, nonce)
                if r is not None and r.kind == 'nack':
                    raise NackError(r)
                return r
            latest = self._latest_nonces(type_url)
            if not latest:
                return None
            got = []
            for sid, n in latest.items():
                r = self._reply_to(type_url, n, sid)
                if r is None:
                    return None
                if r.kind == 'nack':
                    raise NackError(r)
                got.append(r)
            return max(got, key=lambda r: r.seq)
        return self.wait_for(pred, timeout, 'ACK of %s nonce %s' % (type_url, nonce or 'latest'))

    def wait_for_nack(self, type_url, nonce=None, timeout=10, after=None):
        """Waits for a NACK of `nonce`, or (nonce=None) of the latest response of type_url on
        some active stream, or (after=seq) for any NACK of type_url newer than seq. Raises
        AssertionError if the awaited response was ACKed instead. Returns the NACK record."""
        def pred():
            if after is not None:
                rs = [r for r in self._requests
                      if r.type_url == type_url and r.kind == 'nack' and r.seq > after]
                return rs[0] if rs else None
            targets = [(None, nonce)] if nonce is not None else \
                list(self._latest_nonces(type_url).items())
            for sid, n in targets:
                r = self._reply_to(type_url, n, sid)
                if r is not None:
                    if r.kind == 'ack':
                        raise AssertionError('expected a NACK of %s nonce %s, got %r' % (
                            type_url, n, r))
                    return r
            return None
        return self.wait_for(pred, timeout, 'NACK of %s' % type_url)

    def wait_for_request(self, type_url=None, kind=None, after=0, timeout=10, stream=None):
        """The first request record newer than `after` matching type_url/kind/stream."""
        def pred():
            rs = self.requests(type_url, kind, stream, after)
            return rs[0] if rs else None
        return self.wait_for(pred, timeout, '%s request of %s' % (kind or 'any', type_url))

    def wait_for_response(self, type_url=None, after=0, timeout=10, stream=None):
        def pred():
            rs = self.responses(type_url, stream, after)
            return rs[0] if rs else None
        return self.wait_for(pred, timeout, 'response of %s' % type_url)

    def wait_for_streams(self, count, timeout=10):
        """Waits until exactly `count` ADS streams are active."""
        self.wait_for(lambda: self.stream_count() == count, timeout, '%d active streams' % count)
        return count

    def wait_for_ca_request(self, after=0, timeout=10):
        def pred():
            rs = self.ca_requests(after)
            return rs[0] if rs else None
        return self.wait_for(pred, timeout, 'CreateCertificate call')

    def wait_synced(self, types=(), timeout=10):
        """Waits until there is an active stream, every type on every active stream has ACKed
        its latest response (istioctl proxy-status SYNCED), and each of `types` is subscribed on
        some active stream. Raises NackError when a latest response was NACKed."""
        def pred():
            active = [s for s in self._streams.values() if s.active]
            if not active or any(not any(t in s.types for s in active) for t in types):
                return None
            for s in active:
                if not s.types:
                    return None
                for t, ts in s.types.items():
                    r = self._reply_to(t, ts.last_nonce, s.id) if ts.last_nonce else None
                    if r is None:
                        return None
                    if r.kind == 'nack':
                        raise NackError(r)
            return True
        return self.wait_for(pred, timeout, 'all streams synced (%s)' % ', '.join(types))

    async def _in_thread(self, fn, *a, **kw):
        return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*a, **kw))

    async def wait_for_ack_async(self, *a, **kw):
        return await self._in_thread(self.wait_for_ack, *a, **kw)

    async def wait_for_nack_async(self, *a, **kw):
        return await self._in_thread(self.wait_for_nack, *a, **kw)

    async def wait_for_request_async(self, *a, **kw):
        return await self._in_thread(self.wait_for_request, *a, **kw)

    async def wait_for_streams_async(self, *a, **kw):
        return await self._in_thread(self.wait_for_streams, *a, **kw)

    async def wait_for_ca_request_async(self, *a, **kw):
        return await self._in_thread(self.wait_for_ca_request, *a, **kw)

    async def wait_synced_async(self, *a, **kw):
        return await self._in_thread(self.wait_synced, *a, **kw)

    async def wait_for_async(self, *a, **kw):
        return await self._in_thread(self.wait_for, *a, **kw)
