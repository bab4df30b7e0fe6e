#!/usr/bin/python3
"""Writes the L7 benchmark's waypoint config (JSON, the shape istiod sends) to stdout.

Starts from gen_config.py's TCP config (one HBONE-endpoint service, VIP -> pod) with the L7
benchmark's addresses, and replaces the service's tcp_proxy chain in main_internal by an
http_connection_manager chain in istiod's waypoint shape (as tests/e2e/l7lib.py builds it):
RBAC allowing the client's principal, the stats/fault/cors placeholders, router, and an inline
RouteConfiguration whose matching route needs a header:

  benchhttp (HTTP)  VIP 127.201.1.1:9000 -> HBONE endpoint 127.0.41.1:9000
  routes: /admin -> direct 403; /bench + header x-bench: 1 -> cluster; anything else -> direct 404

Usage: gen_http_config.py [--vip IP] [--port N] [--pod IP] [--node-ip IP] [DEMO_JSON]
  (defaults: the addresses above)
"""

import io
import json
import os
import sys
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_config  # noqa: E402

VIP, PORT, POD = "127.201.1.1", 9000, "127.0.41.1"
CLIENT_ID = "spiffe://cluster.local/ns/default/sa/sleep"  # tests/tools/mkpki.py "client"
T_HCM = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
         "HttpConnectionManager")
T_RBAC = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
L = gen_config.L


def http_chain(name, route_config, rbac):
    filters = [
        {"name": "envoy.filters.http.rbac", "typed_config": {"@type": T_RBAC, "rules": rbac}},
        {"name": "envoy.filters.http.grpc_stats", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3."
                     "FilterConfig",
            "emit_filter_state": True, "stats_for_all_methods": False}},
        {"name": "envoy.filters.http.fault", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
        {"name": "envoy.filters.http.cors", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}},
        {"name": "istio.stats", "typed_config": {
            "@type": "type.googleapis.com/stats.PluginConfig",
            "disable_host_header_fallback": True, "reporter": "SERVER_GATEWAY"}},
        {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
    ]
    hcm = {"@type": T_HCM, "stat_prefix": name, "http_filters": filters,
           "route_config": route_config, "use_remote_address": False,
           "normalize_path": True, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
           "upgrade_configs": [{"upgrade_type": "websocket"}]}
    return {"name": name, "filters": [
        {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}


def main():
    gen_config.VIP, gen_config.PORT, gen_config.POD = VIP, PORT, POD
    gen_config.NODE_IP = "127.0.0.62"
    demo = gen_config.parse_args("inbound-vip|%d|http|benchhttp.bench.svc.cluster.local")
    name = gen_config.NAME
    buf = io.StringIO()
    with redirect_stdout(buf):
        gen_config.main(demo)
    cfg = json.loads(buf.getvalue())

    routes = [
        {"match": {"prefix": "/admin"},
         "direct_response": {"status": 403, "body": {"inline_string": "no"}}},
        {"match": {"prefix": "/bench", "headers": [
            {"name": "x-bench", "string_match": {"exact": "1"}}]},
         "route": {"cluster": name, "timeout": "10s"}},
        {"match": {"prefix": "/"},
         "direct_response": {"status": 404, "body": {"inline_string": "no route"}}},
    ]
    rc = {"name": "benchhttp", "validate_clusters": False,
          "virtual_hosts": [{"name": "benchhttp", "domains": ["*"], "routes": routes}]}
    rbac = {"policies": {"bench-client": {
        "permissions": [{"any": True}],
        "principals": [{"filter_state": {"key": "io.istio.peer_principal",
                                         "string_match": {"exact": CLIENT_ID}}}]}}}

    mi = cfg["resources"][L]["main_internal"]
    mi["filter_chains"] = [http_chain(name, rc, rbac) if fc["name"] == name else fc
                           for fc in mi["filter_chains"]]
    # an HTTP port: the http_inspector stays enabled for it (istiod disables it for TCP ports)
    for lf in mi.get("listener_filters", []):
        lf.pop("filter_disabled", None)
    json.dump(cfg, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
