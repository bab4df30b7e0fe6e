/* Tests for xds-client/resources.c: loading xDS resources from JSON/YAML files. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "xds-client/resources.h"

#define FIXTURE "data/istiod-waypoint-bookinfo.json"

static struct xds_resources *load_fixture(void)
{
        size_t len;
        char *text = check_read_test_file(FIXTURE, &len);
        struct xds_resources *res = NULL;
        const char *e = NULL;
        int r = xds_resources_load_buffer(text, len, XDS_FORMAT_AUTO, 0, &res, &e);

        if (r < 0)
                fprintf(stderr, "load: %d %s\n", r, e);
        free(text);
        return r < 0 ? NULL : res;
}

static const char *examples_path(const char *name, char *buf, size_t cap)
{
        const char *dir = getenv("WP_EXAMPLES_DIR");
        snprintf(buf, cap, "%s/%s", dir ? dir : "examples", name);
        return buf;
}

/* Packs msg into a new buffer (caller frees). */
static uint8_t *pack(const ProtobufCMessage *msg, size_t *ret_len)
{
        size_t n = protobuf_c_message_get_packed_size(msg);
        uint8_t *b = malloc(n ? n : 1);
        if (b)
                protobuf_c_message_pack(msg, b);
        *ret_len = n;
        return b;
}

static bool same_bytes(const ProtobufCMessage *a, const ProtobufCMessage *b)
{
        size_t la, lb;
        uint8_t *pa = pack(a, &la), *pb = pack(b, &lb);
        bool same = pa && pb && la == lb && memcmp(pa, pb, la) == 0;
        free(pa);
        free(pb);
        return same;
}

static bool same_sets(const struct xds_resources *a, const struct xds_resources *b)
{
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct xds_resource_list *la = xds_resources_list((struct xds_resources *)a, t);
                struct xds_resource_list *lb = xds_resources_list((struct xds_resources *)b, t);
                if (la->n != lb->n)
                        return false;
                for (size_t i = 0; i < la->n; i++) {
                        if (strcmp(la->items[i].name, lb->items[i].name) != 0)
                                return false;
                        if (!same_bytes(la->items[i].msg, lb->items[i].msg)) {
                                fprintf(stderr, "differs: %s\n", la->items[i].name);
                                return false;
                        }
                }
        }
        return true;
}

static Envoy__Config__Listener__V3__FilterChain *
find_chain(Envoy__Config__Listener__V3__Listener *l, const char *name)
{
        for (size_t i = 0; i < l->n_filter_chains; i++)
                if (strcmp(l->filter_chains[i]->name, name) == 0)
                        return l->filter_chains[i];
        return NULL;
}

static void test_fixture_loads_every_resource(void)
{
        struct xds_resources *res = load_fixture();

        REQUIRE(res != NULL);
        CHECK_STR_EQ(res->node_id, "waypoint~127.0.0.60~bookinfo-waypoint-5d9c7b6f4-q8w2e.bookinfo~"
                                   "bookinfo.svc.cluster.local");
        CHECK_INT_EQ(res->listeners.n, 3);
        CHECK_INT_EQ(res->clusters.n, 10);
        CHECK_INT_EQ(res->cluster_load_assignments.n, 7);
        CHECK_INT_EQ(res->route_configurations.n, 0);
        CHECK_INT_EQ(res->addresses.n, 16);
        CHECK(xds_resources_find(res, XDS_RES_LISTENER, "connect_terminate") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_LISTENER, "connect_originate") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_LISTENER, "main_internal") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_CLUSTER, "encap") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_ADDRESS,
                                 "bookinfo/reviews.bookinfo.svc.cluster.local") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_ADDRESS,
                                 "Kubernetes//Pod/bookinfo/reviews-v1-7c8d9-bbbbb") != NULL);
        CHECK(xds_resources_find(res, XDS_RES_LISTENER, "nope") == NULL);
        xds_resources_free(res);
}

static void test_fixture_filter_chain_matcher(void)
{
        struct xds_resources *res = load_fixture();
        ProtobufCMessage *ipm_msg = NULL, *act = NULL;
        const char *e = NULL;

        REQUIRE(res != NULL);
        Envoy__Config__Listener__V3__Listener *l =
            (void *)xds_resources_find(res, XDS_RES_LISTENER, "main_internal");
        REQUIRE(l && l->filter_chain_matcher);
        REQUIRE(l->listener_specifier_case ==
                ENVOY__CONFIG__LISTENER__V3__LISTENER__LISTENER_SPECIFIER_INTERNAL_LISTENER);
        Xds__Type__Matcher__V3__Matcher *m = l->filter_chain_matcher;
        REQUIRE(m->matcher_type_case == XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TYPE_MATCHER_TREE);
        Xds__Type__Matcher__V3__Matcher__MatcherTree *mt = m->matcher_tree;
        CHECK_STR_EQ(mt->input->name, "ip");
        CHECK_STR_EQ(mt->input->typed_config->type_url,
                     "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."
                     "DestinationIPInput");
        REQUIRE(mt->tree_type_case ==
                XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_CUSTOM_MATCH);
        REQUIRE(xds_any_unpack(mt->custom_match->typed_config,
                               &xds__type__matcher__v3__ipmatcher__descriptor, &ipm_msg, &e) == 0);
        Xds__Type__Matcher__V3__IPMatcher *ipm = (void *)ipm_msg;
        REQUIRE(ipm->n_range_matchers == 7);
        Xds__Type__Matcher__V3__IPMatcher__IPRangeMatcher *rm = ipm->range_matchers[0];
        REQUIRE(rm->n_ranges == 1);
        CHECK_STR_EQ(rm->ranges[0]->address_prefix, "127.200.0.1");
        REQUIRE(rm->ranges[0]->prefix_len);
        CHECK_INT_EQ(rm->ranges[0]->prefix_len->value, 32);
        CHECK_STR_EQ(ipm->range_matchers[5]->ranges[0]->address_prefix, "127.200.0.6");
        REQUIRE(rm->on_match && rm->on_match->on_match_case ==
                                    XDS__TYPE__MATCHER__V3__MATCHER__ON_MATCH__ON_MATCH_MATCHER);
        Xds__Type__Matcher__V3__Matcher__MatcherTree *pt = rm->on_match->matcher->matcher_tree;
        REQUIRE(pt && pt->tree_type_case ==
                          XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_EXACT_MATCH_MAP);
        CHECK_STR_EQ(pt->input->name, "port");
        REQUIRE(pt->exact_match_map->n_map == 1);
        CHECK_STR_EQ(pt->exact_match_map->map[0]->key, "9080");
        Xds__Type__Matcher__V3__Matcher__OnMatch *om = pt->exact_match_map->map[0]->value;
        REQUIRE(om->on_match_case == XDS__TYPE__MATCHER__V3__MATCHER__ON_MATCH__ON_MATCH_ACTION);
        REQUIRE(xds_any_unpack(om->action->typed_config,
                               &google__protobuf__string_value__descriptor, &act, &e) == 0);
        CHECK_STR_EQ(((Google__Protobuf__StringValue *)act)->value,
                     "inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local");
        /* the chain the action names exists */
        CHECK(find_chain(l, ((Google__Protobuf__StringValue *)act)->value) != NULL);
        xds_pbjson_message_free(act);
        xds_pbjson_message_free(ipm_msg);
        xds_resources_free(res);
}

static void test_fixture_endpoints_are_internal_with_tunnel_metadata(void)
{
        struct xds_resources *res = load_fixture();

        REQUIRE(res != NULL);
        Envoy__Config__Endpoint__V3__ClusterLoadAssignment *cla = (void *)xds_resources_find(
            res, XDS_RES_CLA, "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local");
        REQUIRE(cla && cla->n_endpoints == 1);
        Envoy__Config__Endpoint__V3__LocalityLbEndpoints *le = cla->endpoints[0];
        CHECK_INT_EQ(le->load_balancing_weight->value, 3);
        REQUIRE(le->n_lb_endpoints == 3);
        Envoy__Config__Endpoint__V3__LbEndpoint *lbe = le->lb_endpoints[1];
        CHECK_INT_EQ(lbe->health_status, ENVOY__CONFIG__CORE__V3__HEALTH_STATUS__HEALTHY);
        REQUIRE(lbe->host_identifier_case ==
                ENVOY__CONFIG__ENDPOINT__V3__LB_ENDPOINT__HOST_IDENTIFIER_ENDPOINT);
        Envoy__Config__Core__V3__Address *a = lbe->endpoint->address;
        REQUIRE(a->address_case ==
                ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_ENVOY_INTERNAL_ADDRESS);
        CHECK_STR_EQ(a->envoy_internal_address->server_listener_name, "connect_originate");
        CHECK_STR_EQ(a->envoy_internal_address->endpoint_id, "127.0.22.2:9080");
        REQUIRE(lbe->metadata && lbe->metadata->n_filter_metadata == 2);
        CHECK_STR_EQ(lbe->metadata->filter_metadata[0]->key, "envoy.filters.listener.original_dst");
        Google__Protobuf__Struct *s = lbe->metadata->filter_metadata[0]->value;
        REQUIRE(s->n_fields == 1);
        CHECK_STR_EQ(s->fields[0]->key, "local");
        CHECK_STR_EQ(s->fields[0]->value->string_value, "127.0.22.2:9080");

        /* the non-mesh service has a plain socket address */
        cla = (void *)xds_resources_find(res, XDS_RES_CLA,
                                         "inbound-vip|8080|http|legacy.bookinfo.svc.cluster.local");
        REQUIRE(cla && cla->n_endpoints == 1 && cla->endpoints[0]->n_lb_endpoints == 1);
        a = cla->endpoints[0]->lb_endpoints[0]->endpoint->address;
        REQUIRE(a->address_case == ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_SOCKET_ADDRESS);
        CHECK_STR_EQ(a->socket_address->address, "127.0.25.1");
        CHECK_INT_EQ(a->socket_address->port_value, 8080);

        /* WDS service: VIP as bytes */
        Istio__Workload__Address *wa = (void *)xds_resources_find(
            res, XDS_RES_ADDRESS, "bookinfo/reviews.bookinfo.svc.cluster.local");
        REQUIRE(wa && wa->type_case == ISTIO__WORKLOAD__ADDRESS__TYPE_SERVICE);
        REQUIRE(wa->service->n_addresses == 1 && wa->service->addresses[0]->address.len == 4);
        CHECK(memcmp(wa->service->addresses[0]->address.data, "\x7f\xc8\x00\x02", 4) == 0);
        CHECK_INT_EQ(wa->service->waypoint->hbone_mtls_port, 15008);
        xds_resources_free(res);
}

static void test_fixture_rbac_policies(void)
{
        struct xds_resources *res = load_fixture();
        ProtobufCMessage *hcm_m = NULL, *rbac_m = NULL;
        const char *e = NULL;

        REQUIRE(res != NULL);
        Envoy__Config__Listener__V3__Listener *l =
            (void *)xds_resources_find(res, XDS_RES_LISTENER, "main_internal");
        Envoy__Config__Listener__V3__FilterChain *fc =
            find_chain(l, "inbound-vip|9080|http|ratings.bookinfo.svc.cluster.local");
        REQUIRE(fc != NULL);
        Envoy__Config__Listener__V3__Filter *f = NULL;
        for (size_t i = 0; i < fc->n_filters; i++)
                if (strcmp(fc->filters[i]->name, "envoy.filters.network.http_connection_manager") ==
                    0)
                        f = fc->filters[i];
        REQUIRE(f != NULL);
        REQUIRE(xds_any_unpack(f->typed_config, NULL, &hcm_m, &e) == 0);
        Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager *hcm =
            (void *)hcm_m;
        REQUIRE(
            hcm->base.descriptor ==
            &envoy__extensions__filters__network__http_connection_manager__v3__http_connection_manager__descriptor);
        REQUIRE(hcm->n_http_filters > 1);
        CHECK_STR_EQ(hcm->http_filters[0]->name, "envoy.filters.http.rbac");
        REQUIRE(xds_any_unpack(hcm->http_filters[0]->typed_config,
                               &envoy__extensions__filters__http__rbac__v3__rbac__descriptor,
                               &rbac_m, &e) == 0);
        Envoy__Extensions__Filters__Http__Rbac__V3__RBAC *rbac = (void *)rbac_m;
        REQUIRE(rbac->rules);
        CHECK_INT_EQ(rbac->rules->action, ENVOY__CONFIG__RBAC__V3__RBAC__ACTION__DENY);
        REQUIRE(rbac->rules->n_policies == 1);
        CHECK_STR_EQ(rbac->rules->policies[0]->key,
                     "ns[bookinfo]-policy[ratings-no-writes]-rule[0]");
        CHECK(rbac->rules->policies[0]->value->n_permissions >= 1);
        /* inline route config of the HCM */
        REQUIRE(
            hcm->route_specifier_case ==
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_ROUTE_CONFIG);
        CHECK(hcm->route_config->n_virtual_hosts >= 1);
        xds_pbjson_message_free(rbac_m);
        xds_pbjson_message_free(hcm_m);
        xds_resources_free(res);
}

static void test_fixture_round_trips_through_json(void)
{
        struct xds_resources *a = load_fixture(), *b = NULL;
        struct json_object *j = NULL;
        const char *e = NULL;
        char *text;

        REQUIRE(a != NULL);
        REQUIRE(xds_resources_to_json(a, &j, &e) == 0);
        text = strdup(json_object_to_json_string_ext(j, JSON_C_TO_STRING_PRETTY));
        json_object_put(j);
        REQUIRE(text);
        REQUIRE(xds_resources_load_buffer(text, strlen(text), XDS_FORMAT_JSON, 0, &b, &e) == 0);
        CHECK(same_sets(a, b));
        /* and the encoder is deterministic: a second trip gives the same text */
        REQUIRE(xds_resources_to_json(b, &j, &e) == 0);
        CHECK_STR_EQ(json_object_to_json_string_ext(j, JSON_C_TO_STRING_PRETTY), text);
        json_object_put(j);
        free(text);
        xds_resources_free(a);
        xds_resources_free(b);
}

static void test_fixture_round_trips_through_protobuf_bytes(void)
{
        struct xds_resources *a = load_fixture(), *b = NULL;
        const char *e = NULL;

        REQUIRE(a != NULL);
        REQUIRE(xds_resources_new(&b) == 0);
        for (int t = 0; t < _XDS_RES_TYPE_MAX; t++) {
                struct xds_resource_list *l = xds_resources_list(a, t);
                for (size_t i = 0; i < l->n; i++) {
                        size_t n;
                        uint8_t *p = pack(l->items[i].msg, &n);
                        REQUIRE(p);
                        CHECK_INT_EQ(xds_resources_add_packed(b, xds_resource_type_url(t),
                                                              l->items[i].name, p, n, &e),
                                     0);
                        free(p);
                }
        }
        CHECK(same_sets(a, b));
        xds_resources_free(a);
        xds_resources_free(b);
}

static void test_example_yaml_equals_json(void)
{
        struct xds_resources *y = NULL, *j = NULL;
        const char *e = NULL;
        char p[4096];
        int r;

        r = xds_resources_load_file(examples_path("waypoint-demo.yaml", p, sizeof(p)), &y, &e);
        if (r < 0)
                fprintf(stderr, "%s\n", e);
        REQUIRE(r == 0);
        r = xds_resources_load_file(examples_path("waypoint-demo.json", p, sizeof(p)), &j, &e);
        if (r < 0)
                fprintf(stderr, "%s\n", e);
        REQUIRE(r == 0);
        CHECK(same_sets(y, j));
        CHECK_INT_EQ(y->listeners.n, 3);
        CHECK_INT_EQ(y->clusters.n, 5);
        CHECK_INT_EQ(y->cluster_load_assignments.n, 2);
        Envoy__Config__Endpoint__V3__ClusterLoadAssignment *cla = (void *)xds_resources_find(
            y, XDS_RES_CLA, "inbound-vip|7000|tcp|echo.demo.svc.cluster.local");
        REQUIRE(cla && cla->n_endpoints == 1 && cla->endpoints[0]->n_lb_endpoints == 2);
        CHECK_STR_EQ(cla->endpoints[0]
                         ->lb_endpoints[1]
                         ->endpoint->address->envoy_internal_address->endpoint_id,
                     "127.0.30.2:7000");
        cla = (void *)xds_resources_find(y, XDS_RES_CLA,
                                         "inbound-vip|7001|tcp|legacy.demo.svc.cluster.local");
        REQUIRE(cla && cla->endpoints[0]->n_lb_endpoints == 1);
        CHECK_STR_EQ(cla->endpoints[0]->lb_endpoints[0]->endpoint->address->socket_address->address,
                     "127.0.31.1");
        CHECK(xds_resources_find(y, XDS_RES_CLUSTER,
                                 "inbound-vip|7000|tcp|echo.demo.svc.cluster.local") != NULL);
        xds_resources_free(y);
        xds_resources_free(j);
}

static void expect_load_fail(const char *text, int err, const char *want)
{
        struct xds_resources *res = NULL;
        const char *e = NULL;
        int r = xds_resources_load_buffer(text, strlen(text), XDS_FORMAT_AUTO, 0, &res, &e);

        CHECK_INT_EQ(r, err);
        CHECK(res == NULL);
        CHECK_STR_EQ(e, want);
}

#define LURL "type.googleapis.com/envoy.config.listener.v3.Listener"

static void test_load_rejects_duplicate_names(void)
{
        expect_load_fail("{\"resources\":[{\"@type\":\"" LURL "\",\"name\":\"x\"},"
                         "{\"@type\":\"" LURL "\",\"name\":\"y\"},"
                         "{\"@type\":\"" LURL "\",\"name\":\"x\"}]}",
                         -EINVAL, "resources[2]: duplicate Listener resource \"x\"");
}

static void test_load_rejects_name_mismatch(void)
{
        expect_load_fail("{\"resources\":{\"" LURL "\":{\"a\":{\"name\":\"b\"}}}}", -EINVAL,
                         "resources[\"" LURL "\"][\"a\"]: Listener resource named \"b\" is "
                         "listed under \"a\"");
        expect_load_fail("{\"resources\":{\"" LURL "\":{\"a\":{}}}}", -EINVAL,
                         "resources[\"" LURL "\"][\"a\"]: Listener resource without a name given "
                         "as a");
}

static void test_load_rejects_unsupported_types(void)
{
        expect_load_fail("{\"resources\":{\"type.googleapis.com/envoy.config.core.v3.Node\":{}}}",
                         -EINVAL,
                         "resources[\"type.googleapis.com/envoy.config.core.v3.Node\"]: "
                         "unsupported resource type");
        expect_load_fail(
            "{\"resources\":[{\"@type\":\"type.googleapis.com/google.protobuf.Empty\"}]}", -EINVAL,
            "resources[0]: unsupported resource type "
            "type.googleapis.com/google.protobuf.Empty");
        expect_load_fail("{\"resources\":[{\"name\":\"x\"}]}", -EINVAL,
                         "resources[0]: resource without \"@type\"");
        expect_load_fail("{\"resources\":7}", -EINVAL,
                         "resources: expected an object (by type URL) or an array");
        expect_load_fail("{\"resource\":{}}", -EINVAL, "resource: unknown top-level field");
}

static void test_load_error_names_the_full_path(void)
{
        expect_load_fail(
            "{\"resources\":{\"" LURL "\":{\"l\":{\"name\":\"l\",\"filter_chains\":[{\"filters\":"
            "[{\"name\":\"x\",\"typed_config\":{\"@type\":\"type.googleapis.com/foo.Bar\"}}]}]}}}}",
            -EINVAL,
            "resources[\"" LURL "\"][\"l\"].filter_chains[0].filters[0].typed_config: "
            "unknown type URL type.googleapis.com/foo.Bar");
        expect_load_fail(
            "{\"resources\":[{\"@type\":\"" LURL "\",\"name\":\"l\"},{\"@type\":\"" LURL
            "\",\"name\":\"m\",\"address\":{\"socket_address\":{\"port_value\":-5}}}]}",
            -EINVAL,
            "resources[1].address.socket_address.port_value: negative value -5 for "
            "an unsigned field");
        /* the same in YAML */
        expect_load_fail(
            "resources:\n- '@type': " LURL "\n  name: l\n  bogus: 1\n", -EINVAL,
            "resources[0].bogus: unknown field (in envoy.config.listener.v3.Listener)");
}

static void test_load_file_reports_path(void)
{
        struct xds_resources *res = NULL;
        const char *e = NULL;

        CHECK_INT_EQ(xds_resources_load_file("/nonexistent/x.yaml", &res, &e), -ENOENT);
        CHECK_STR_EQ(e, "/nonexistent/x.yaml: No such file or directory");
}

static void test_load_truncated_fixture_fails(void)
{
        size_t len;
        char *text = check_read_test_file(FIXTURE, &len);
        struct xds_resources *res = NULL;
        const char *e = NULL;

        /* every cut inside the document must fail cleanly (sampled to keep ASan runs short) */
        for (size_t cut = 1; cut < len - 2; cut += 997) {
                CHECK_INT_EQ(xds_resources_load_buffer(text, cut, XDS_FORMAT_JSON, 0, &res, &e),
                             -EINVAL);
                CHECK(res == NULL);
        }
        free(text);
}

static const char *fa_text =
    "resources:\n"
    "  " LURL ":\n"
    "    l:\n"
    "      name: l\n"
    "      address: {socket_address: {address: 0.0.0.0, port_value: 15008}}\n"
    "      filter_chains:\n"
    "      - filters:\n"
    "        - name: envoy.filters.network.tcp_proxy\n"
    "          typed_config:\n"
    "            '@type': "
    "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n"
    "            stat_prefix: s\n"
    "            cluster: c\n"
    "  type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment:\n"
    "    c:\n"
    "      cluster_name: c\n"
    "      endpoints:\n"
    "      - lb_endpoints:\n"
    "        - endpoint: {address: {envoy_internal_address: {server_listener_name: x, endpoint_id: "
    "'1.2.3.4:80'}}}\n"
    "          metadata: {filter_metadata: {envoy.filters.listener.original_dst: {local: "
    "'1.2.3.4:80'}}}\n";

static int fa_load_body(void *arg)
{
        struct xds_resources *res = NULL;
        const char *e = NULL;
        int r;

        (void)arg;
        r = xds_resources_load_buffer(fa_text, strlen(fa_text), XDS_FORMAT_AUTO, 0, &res, &e);
        if (r < 0)
                return r == -ENOMEM ? r : -1000 + 0 * fprintf(stderr, "unexpected: %s\n", e);
        xds_resources_free(res);
        return 0;
}

static void test_load_survives_allocation_failures(void)
{
        CHECK_INT_EQ(fa_load_body(NULL), 0);
        CHECK(check_failalloc_run(fa_load_body, NULL) > 20);
}

int main(void)
{
        RUN(test_fixture_loads_every_resource);
        RUN(test_fixture_filter_chain_matcher);
        RUN(test_fixture_endpoints_are_internal_with_tunnel_metadata);
        RUN(test_fixture_rbac_policies);
        RUN(test_fixture_round_trips_through_json);
        RUN(test_fixture_round_trips_through_protobuf_bytes);
        RUN(test_example_yaml_equals_json);
        RUN(test_load_rejects_duplicate_names);
        RUN(test_load_rejects_name_mismatch);
        RUN(test_load_rejects_unsupported_types);
        RUN(test_load_error_names_the_full_path);
        RUN(test_load_file_reports_path);
        RUN(test_load_truncated_fixture_fails);
        RUN(test_load_survives_allocation_failures);
        return check_exit();
}
