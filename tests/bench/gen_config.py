#!/usr/bin/python3
"""Writes the benchmark's waypoint config (JSON, the shape istiod sends) to stdout.

Adapted from examples/waypoint-demo.json: the same connect_terminate / main_internal /
connect_originate listeners and clusters, with one TCP service:

  bench (TCP)   VIP 127.201.0.1:9000 -> HBONE endpoint 127.0.40.1:9000
                (the waypoint dials 127.0.40.1:15008, where `hbone serve` stands in for the
                destination ztunnel and forwards to tcp_sink on 127.0.40.1:9000)

main_internal's filter_chain_matcher maps 127.201.0.1 / port 9000 to the tcp_proxy chain
inbound-vip|9000|tcp|bench.bench.svc.cluster.local; its EDS cluster's ClusterLoadAssignment has
one envoy_internal_address endpoint (server_listener_name connect_originate) with the
envoy.filters.listener.original_dst metadata naming the pod address.

Usage: gen_config.py [--vip IP] [--port N] [--pod IP] [--node-ip IP] [--plain] [DEMO_JSON]
  (DEMO_JSON default: examples/waypoint-demo.json next to this tree). --plain makes the endpoint
  a socket_address: the waypoint then terminates HBONE and opens plain TCP to POD:PORT.
"""

import argparse
import copy
import json
import os
import sys

L = "type.googleapis.com/envoy.config.listener.v3.Listener"
C = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
E = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"

VIP, PORT = "127.201.0.1", 9000
POD = "127.0.40.1"
NAME = "inbound-vip|%d|tcp|bench.bench.svc.cluster.local" % PORT
NODE_IP = "127.0.0.61"
PLAIN = False


def parse_args(default_name_fmt):
    """Sets the module's addresses from the command line (defaults: the values above)."""
    global VIP, PORT, POD, NAME, NODE_IP, PLAIN
    ap = argparse.ArgumentParser()
    ap.add_argument("--vip", default=VIP)
    ap.add_argument("--port", type=int, default=PORT)
    ap.add_argument("--pod", default=POD)
    ap.add_argument("--node-ip", default=NODE_IP)
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("demo", nargs="?")
    a = ap.parse_args()
    VIP, PORT, POD, NODE_IP, PLAIN = a.vip, a.port, a.pod, a.node_ip, a.plain
    NAME = default_name_fmt % PORT
    return a.demo


def main(demo=None):
    here = os.path.dirname(os.path.abspath(__file__))
    src = demo or os.path.join(here, "..", "..", "examples", "waypoint-demo.json")
    with open(src) as f:
        demo = json.load(f)
    res = demo["resources"]

    # the demo's HBONE-endpoint TCP service is the template: its cluster, CLA and chain
    tmpl = next(n for n, c in res[E].items()
                if any("envoy_internal_address" in le["endpoint"]["address"]
                       for loc in c["endpoints"] for le in loc["lb_endpoints"]))

    # cluster: EDS, internal_upstream transport (kept from the demo)
    cl = copy.deepcopy(res[C][tmpl])
    cl["name"] = NAME
    cl["alt_stat_name"] = NAME + ";"
    cl["eds_cluster_config"]["service_name"] = NAME
    cl.setdefault("metadata", {})["filter_metadata"] = {"istio": {"services": [
        {"host": "bench.bench.svc.cluster.local", "name": "bench", "namespace": "bench"}]}}
    clusters = {n: c for n, c in res[C].items() if n not in res[E]}
    clusters[NAME] = cl

    # one endpoint reached through connect_originate (HBONE to POD:15008)
    le = copy.deepcopy(res[E][tmpl]["endpoints"][0]["lb_endpoints"][0])
    le["endpoint"]["address"]["envoy_internal_address"] = {
        "server_listener_name": "connect_originate", "endpoint_id": "%s:%d" % (POD, PORT)}
    le["metadata"]["filter_metadata"] = {
        "envoy.filters.listener.original_dst": {"local": "%s:%d" % (POD, PORT)},
        "istio": {"workload": "bench-0;bench;bench;v1;Kubernetes"}}
    if PLAIN:
        le["endpoint"]["address"] = {"socket_address": {"address": POD, "port_value": PORT}}
        del le["metadata"]["filter_metadata"]["envoy.filters.listener.original_dst"]
    cla = {"cluster_name": NAME, "endpoints": [
        {"lb_endpoints": [le], "load_balancing_weight": 1, "locality": {}}]}

    # main_internal: one chain (tcp_proxy -> NAME), matcher VIP -> port -> chain
    mi = copy.deepcopy(res[L]["main_internal"])
    chain = copy.deepcopy(next(fc for fc in mi["filter_chains"] if fc["name"] == tmpl))
    chain["name"] = NAME
    for flt in chain["filters"]:
        tc = flt.get("typed_config", {})
        if tc.get("@type", "").endswith("TcpProxy"):
            tc["cluster"] = NAME
            tc["stat_prefix"] = NAME
    mi["filter_chains"] = [chain]
    tree = mi["filter_chain_matcher"]["matcher_tree"]
    rm = copy.deepcopy(tree["custom_match"]["typed_config"]["range_matchers"][0])
    rm["ranges"] = [{"address_prefix": VIP, "prefix_len": 32}]
    sub = rm["on_match"]["matcher"]["matcher_tree"]
    sub["exact_match_map"]["map"] = {str(PORT): {"action": {
        "name": NAME,
        "typed_config": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                         "value": NAME}}}}
    tree["custom_match"]["typed_config"]["range_matchers"] = [rm]
    # listener filters: keep original_dst; http_inspector is disabled on our port
    for lf in mi.get("listener_filters", []):
        if "filter_disabled" in lf:
            lf["filter_disabled"] = {"or_match": {"rules": [
                {"destination_port_range": {"start": PORT, "end": PORT + 1}}]}}

    listeners = dict(res[L])
    listeners["main_internal"] = mi
    out = {
        "node_id": "waypoint~%s~bench-waypoint-0.bench~bench.svc.cluster.local" % NODE_IP,
        "resources": {L: listeners, C: clusters, E: {NAME: cla}},
    }
    for t, v in res.items():
        if t not in out["resources"]:
            out["resources"][t] = {}
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(parse_args("inbound-vip|%d|tcp|bench.bench.svc.cluster.local"))
