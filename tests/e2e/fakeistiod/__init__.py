"""fakeistiod: an istiod stand-in for the waypoint's e2e tests (grpcio, in-process).

    from fakeistiod import FakeIstiod, T_CLUSTER
    fi = FakeIstiod(hbonelib.pki_dir(), listen='127.0.0.1:0', token='T').start()
    fi.set_config(hbonelib.make_config(...))
    ...
    fi.wait_for_ack(T_CLUSTER)

Serves on one TLS port (server cert for DNS istiod.istio-system.svc + the listen IP, issued by the
test root): envoy.service.discovery.v3.AggregatedDiscoveryService (Delta + SotW) and
istio.v1.auth.IstioCertificateService/CreateCertificate. See server.py for the full API.
"""

from .protos import load as load_protos
from .server import (ADS_SERVICE, CA_SERVICE, PUSH_ORDER, SERVER_NAME, T_ADDRESS, T_CLA,
                     T_CLUSTER, T_LISTENER, T_ROUTE, WILDCARD_TYPES, CaRecord, FakeIstiod,
                     NackError, RequestRecord, ResponseRecord, Stream)

__all__ = ['ADS_SERVICE', 'CA_SERVICE', 'PUSH_ORDER', 'SERVER_NAME', 'T_ADDRESS', 'T_CLA',
           'T_CLUSTER', 'T_LISTENER', 'T_ROUTE', 'WILDCARD_TYPES', 'CaRecord', 'FakeIstiod',
           'NackError', 'RequestRecord', 'ResponseRecord', 'Stream', 'load_protos']
