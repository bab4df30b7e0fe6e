/*
 * Snapshot compiler: istiod-shaped resources in, dispatch decisions out. Negative cases check
 * that every rejection names the resource and field.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include "check.h"
#include "filters/filter.h"
#include "waypoint/base/alloc.h"
#include "waypoint/lb.h"
#include "waypoint/router.h"
#include "waypoint/snapshot.h"
#include "xds-client/resources.h"

static char *demo_json;
static size_t demo_len;

static struct sockaddr_storage sa(const char *ip, unsigned port)
{
        struct sockaddr_storage ss;
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;

        memset(&ss, 0, sizeof(ss));
        if (inet_pton(AF_INET, ip, &sin->sin_addr) == 1) {
                sin->sin_family = AF_INET;
                sin->sin_port = htons((uint16_t)port);
        } else {
                inet_pton(AF_INET6, ip, &sin6->sin6_addr);
                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons((uint16_t)port);
        }
        return ss;
}

static const struct wp_chain *lookup(const struct wp_snapshot *s, const char *ip, unsigned port)
{
        struct sockaddr_storage ss = sa(ip, port);

        return wp_snapshot_lookup(s, (struct sockaddr *)&ss);
}

/* Loads text, builds; returns the build result and the error (caller frees) on failure. */
static int build_text(const char *text, struct wp_snapshot **ret, char **err)
{
        struct xds_resources *res = NULL;
        const char *lerr = NULL;
        int r;

        *err = NULL;
        r = xds_resources_load_buffer(text, strlen(text), XDS_FORMAT_JSON, 0, &res, &lerr);
        if (r < 0) {
                *err = wp_strdup(lerr ? lerr : "load failed");
                return r;
        }
        r = wp_snapshot_build(res, ret, err);
        if (r < 0)
                xds_resources_free(res);
        return r;
}

/* Replaces the nth (1-based) occurrence of from with to in a copy of text. */
static char *replace_nth(const char *text, const char *from, const char *to, int nth)
{
        const char *p = strstr(text, from);
        char *out;

        while (p && --nth > 0)
                p = strstr(p + 1, from);
        if (!p) {
                fprintf(stderr, "pattern not in demo config: %s\n", from);
                exit(99);
        }
        out = malloc(strlen(text) + strlen(to) + 1);
        memcpy(out, text, (size_t)(p - text));
        strcpy(out + (p - text), to);
        strcat(out, p + strlen(from));
        return out;
}

/* Replaces the first occurrence of from with to in a copy of demo_json. */
static char *demo_with(const char *from, const char *to)
{
        const char *p = strstr(demo_json, from);
        char *out;

        if (!p) {
                fprintf(stderr, "pattern not in demo config: %s\n", from);
                exit(99);
        }
        out = malloc(demo_len + strlen(to) + 1);
        memcpy(out, demo_json, (size_t)(p - demo_json));
        strcpy(out + (p - demo_json), to);
        strcat(out, p + strlen(from));
        return out;
}

static void expect_reject(const char *from, const char *to, const char *err_part)
{
        char *text = demo_with(from, to), *err = NULL;
        struct wp_snapshot *s = NULL;
        int r = build_text(text, &s, &err);

        CHECK(r < 0);
        CHECK(s == NULL);
        if (!err || !strstr(err, err_part)) {
                fprintf(stderr, "  expected error containing \"%s\", got \"%s\"\n", err_part,
                        err ? err : "(none)");
                check_failures++;
        }
        wp_free(err);
        free(text);
}

static void test_fixture_dispatch_matches_istiod_shape(void)
{
        struct xds_resources *res = NULL;
        struct wp_snapshot *s = NULL;
        const struct wp_chain *c;
        const struct wp_endpoint *ep;
        const char *lerr = NULL;
        char *err = NULL;
        char *path;
        size_t n;

        free(check_read_test_file("data/istiod-waypoint-bookinfo.json", &n));
        path = malloc(4096);
        snprintf(path, 4096, "%s/data/istiod-waypoint-bookinfo.json",
                 getenv("WP_TEST_SRCDIR") ? getenv("WP_TEST_SRCDIR") : "tests");
        REQUIRE(xds_resources_load_file(path, &res, &lerr) == 0);
        free(path);
        REQUIRE(wp_snapshot_build(res, &s, &err) == 0);
        CHECK(err == NULL);
        CHECK_INT_EQ(s->hbone_port, 15008);
        CHECK_INT_EQ(s->connect_timeout_ms, 10000);

        /* mongodb: the TCP service, HBONE endpoint */
        c = lookup(s, "127.200.0.6", 27017);
        REQUIRE(c != NULL);
        CHECK_STR_EQ(c->name, "inbound-vip|27017|tcp|mongodb.bookinfo.svc.cluster.local");
        CHECK_INT_EQ(c->kind, WP_CHAIN_TCP);
        ep = wp_chain_pick(c, 0);
        REQUIRE(ep != NULL);
        CHECK(ep->hbone);
        CHECK_STR_EQ(ep->authority, "127.0.24.1:27017");

        /* HTTP services are L7 chains: the HCM compiles (routes, RBAC, router), never TCP */
        c = lookup(s, "127.200.0.1", 9080);
        REQUIRE(c != NULL);
        CHECK_INT_EQ(c->kind, WP_CHAIN_HTTP);
        CHECK(c->unsupported == NULL);
        REQUIRE(c->http != NULL);
        CHECK(c->http->routes != NULL);
        CHECK(c->http->websocket);
        CHECK(wp_chain_pick(c, 0) == NULL);

        /* not served: wrong port, unknown VIP, other family */
        CHECK(lookup(s, "127.200.0.1", 9081) == NULL);
        CHECK(lookup(s, "127.200.0.6", 9080) == NULL);
        CHECK(lookup(s, "10.0.0.1", 27017) == NULL);
        CHECK(lookup(s, "::1", 27017) == NULL);
        wp_snapshot_unref(s);
}

static void test_demo_round_robin_and_plain_endpoint(void)
{
        struct wp_snapshot *s = NULL;
        const struct wp_chain *c;
        char *err = NULL;
        const char *seen[4];

        REQUIRE(build_text(demo_json, &s, &err) == 0);
        c = lookup(s, "127.200.0.10", 7000);
        REQUIRE(c != NULL);
        for (int i = 0; i < 4; i++) {
                const struct wp_endpoint *ep = wp_chain_pick(c, (uint64_t)i);

                REQUIRE(ep != NULL);
                CHECK(ep->hbone);
                seen[i] = ep->authority;
        }
        CHECK(strcmp(seen[0], seen[1]) != 0);
        CHECK_STR_EQ(seen[0], seen[2]);
        CHECK_STR_EQ(seen[1], seen[3]);

        c = lookup(s, "127.200.0.11", 7001);
        REQUIRE(c != NULL);
        const struct wp_endpoint *ep = wp_chain_pick(c, 0);
        REQUIRE(ep != NULL);
        CHECK(!ep->hbone);
        CHECK_STR_EQ(ep->authority, "127.0.31.1:7001");
        wp_snapshot_unref(s);
}

static void test_unhealthy_endpoints_are_skipped(void)
{
        char *text = demo_with("\"health_status\": \"HEALTHY\"", "\"health_status\": \"UNHEALTHY\"");
        struct wp_snapshot *s = NULL;
        char *err = NULL;

        REQUIRE(build_text(text, &s, &err) == 0);
        const struct wp_chain *c = lookup(s, "127.200.0.10", 7000);
        REQUIRE(c != NULL);
        for (int i = 0; i < 6; i++) {
                const struct wp_endpoint *ep = wp_chain_pick(c, 0);

                REQUIRE(ep != NULL);
                CHECK_STR_EQ(ep->authority, "127.0.30.2:7000");
        }
        wp_snapshot_unref(s);
        free(text);
}

static void test_rejects_unknown_cluster_in_tcp_proxy(void)
{
        expect_reject("\"cluster\": \"inbound-vip|7000|tcp|echo.demo.svc.cluster.local\"",
                      "\"cluster\": \"nope\"",
                      "filters[1].typed_config.cluster: unknown cluster 'nope'");
}

static void test_rejects_matcher_action_naming_unknown_chain(void)
{
        expect_reject("\"value\": \"inbound-vip|7000|tcp|echo.demo.svc.cluster.local\"",
                      "\"value\": \"missing-chain\"", "unknown filter chain 'missing-chain'");
}

static void test_rejects_bad_cidr(void)
{
        expect_reject("\"address_prefix\": \"127.200.0.10\"", "\"address_prefix\": \"127.200.0.999\"",
                      "invalid CIDR 127.200.0.999/32");
}

static void test_rejects_bad_endpoint_address(void)
{
        expect_reject("\"local\": \"127.0.30.1:7000\"", "\"local\": \"127.0.30.1\"",
                      "[envoy.filters.listener.original_dst].local: '127.0.30.1' is not ip:port");
        expect_reject("\"address\": \"127.0.31.1\"", "\"address\": \"not-an-ip\"",
                      "socket_address: 'not-an-ip' port 7001 is not an IP address and port");
}

static void test_rejects_unsupported_matcher_input(void)
{
        expect_reject("network.v3.DestinationPortInput", "network.v3.SourcePortInput",
                      "unsupported input 'type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.SourcePortInput'");
}

static void expect_text_reject(char *text, const char *err_part)
{
        struct wp_snapshot *s = NULL;
        char *err = NULL;
        int r = build_text(text, &s, &err);

        CHECK(r < 0);
        CHECK(s == NULL);
        if (!err || !strstr(err, err_part)) {
                fprintf(stderr, "  expected error containing \"%s\", got \"%s\"\n", err_part,
                        err ? err : "(none)");
                check_failures++;
        }
        wp_free(err);
        free(text);
}

static void test_rejects_missing_main_internal(void)
{
        char *a = replace_nth(demo_json, "\"main_internal\": {", "\"other_internal\": {", 1);
        char *b = replace_nth(a, "\"name\": \"main_internal\"", "\"name\": \"other_internal\"", 1);

        free(a);
        expect_text_reject(b, "Listener main_internal: missing");
}

static void test_rejects_chain_without_terminal_filter(void)
{
        /* the first tcp_proxy is connect_originate's, the second the echo chain's */
        expect_text_reject(replace_nth(demo_json, "\"name\": \"envoy.filters.network.tcp_proxy\"",
                                       "\"name\": \"istio.stats\"", 2),
                           "no terminal filter");
}

static void test_unknown_filter_makes_chain_unsupported_not_open(void)
{
        char *text = demo_with("\"name\": \"istio.stats\"", "\"name\": \"envoy.filters.network.rbac\"");
        struct wp_snapshot *s = NULL;
        char *err = NULL;

        REQUIRE(build_text(text, &s, &err) == 0);
        const struct wp_chain *c = lookup(s, "127.200.0.10", 7000);
        REQUIRE(c != NULL);
        CHECK_INT_EQ(c->kind, WP_CHAIN_UNSUPPORTED);
        CHECK_STR_EQ(c->unsupported, "envoy.filters.network.rbac");
        CHECK(wp_chain_pick(c, 0) == NULL);
        wp_snapshot_unref(s);
        free(text);
}


/* A workload-addressed destination (a pod IP bound to this waypoint) dispatches to istiod's
 * direct-tcp chain, whose tcp_proxy goes to `encap`: HBONE to the original destination. */
static void test_workload_address_goes_to_passthrough_chain(void)
{
        static const char range[] =
                "\"range_matchers\": [ {\"ranges\": [{\"address_prefix\": \"127.0.22.0\", "
                "\"prefix_len\": 24}], \"on_match\": {\"action\": {\"name\": \"direct-tcp\", "
                "\"typed_config\": {\"@type\": \"type.googleapis.com/google.protobuf.StringValue\", "
                "\"value\": \"direct-tcp\"}}}},";
        char *fixture = check_read_test_file("data/istiod-waypoint-bookinfo.json", NULL);
        char *text = replace_nth(fixture, "\"range_matchers\": [", range, 1);
        struct wp_snapshot *s = NULL;
        char *err = NULL;

        free(fixture);
        REQUIRE(build_text(text, &s, &err) == 0);
        const struct wp_chain *c = lookup(s, "127.0.22.3", 9080);
        REQUIRE(c != NULL);
        CHECK_STR_EQ(c->name, "direct-tcp");
        CHECK_INT_EQ(c->kind, WP_CHAIN_PASSTHROUGH);
        /* the /32 VIP ranges still win where they apply */
        c = lookup(s, "127.200.0.6", 27017);
        REQUIRE(c != NULL);
        CHECK_INT_EQ(c->kind, WP_CHAIN_TCP);
        wp_snapshot_unref(s);
        free(text);
}

/* Loads the istiod fixture with the nth occurrence of from replaced by to. */
static char *fixture_with(const char *from, const char *to, int nth)
{
        char *fixture = check_read_test_file("data/istiod-waypoint-bookinfo.json", NULL);
        char *text = replace_nth(fixture, from, to, nth);

        free(fixture);
        return text;
}

static void expect_fixture_reject(const char *from, const char *to, int nth, const char *part1,
                                  const char *part2)
{
        char *text = fixture_with(from, to, nth), *err = NULL;
        struct wp_snapshot *s = NULL;
        int r = build_text(text, &s, &err);

        CHECK(r < 0);
        CHECK(s == NULL);
        if (!err || !strstr(err, part1) || (part2 && !strstr(err, part2))) {
                fprintf(stderr, "  expected error containing \"%s\" and \"%s\", got \"%s\"\n",
                        part1, part2 ? part2 : "", err ? err : "(none)");
                check_failures++;
        }
        wp_free(err);
        free(text);
}

static void test_hcm_chain_compiles_filters_routes_and_lb(void)
{
        char *text = fixture_with("\"name\": \"envoy.filters.http.router\"",
                                  "\"name\": \"envoy.filters.http.router\"", 1);
        struct wp_snapshot *s = NULL;
        struct wp_route_result res;
        struct wp_http_request req = {.method = "GET", .authority = "productpage:9080",
                                      .path = "/productpage", .version = WP_HTTP_11,
                                      .content_length = -1};
        char buf[256];
        char *err = NULL;

        REQUIRE(build_text(text, &s, &err) == 0);
        /* productpage: RBAC enforced (the only filter left: stats/peer metadata skipped) */
        const struct wp_chain *c = lookup(s, "127.200.0.1", 9080);
        REQUIRE(c && c->kind == WP_CHAIN_HTTP);
        CHECK_INT_EQ(c->http->nfilters, 1);
        CHECK_STR_EQ(c->http->filters[0].ops->name, "envoy.filters.http.rbac");
        CHECK(c->http->filters[0].conf != NULL);
        wp_route_result_init(&res, buf, sizeof(buf));
        REQUIRE(wp_route_match(c->http->routes, &req, 0, &res) == 0);
        CHECK_INT_EQ(res.action, WP_ROUTE_ACTION_CLUSTER);
        REQUIRE(res.cluster != NULL);
        struct wp_cluster *cl = wp_snapshot_cluster(s, res.cluster);
        REQUIRE(cl != NULL);
        CHECK(cl->lb != NULL);
        CHECK_INT_EQ(wp_lb_policy(cl->lb), WP_LB_LEAST_REQUEST); /* istiod's default */
        CHECK(wp_snapshot_cluster(s, "no-such-cluster") == NULL);
        /* the passthrough cluster has no balancer: the tunnel's own destination */
        cl = wp_snapshot_cluster(s, "encap");
        REQUIRE(cl != NULL);
        CHECK(cl->passthrough);
        CHECK(cl->lb == NULL);
        /* reviews: no RBAC */
        c = lookup(s, "127.200.0.2", 9080);
        if (c && c->kind == WP_CHAIN_HTTP)
                CHECK_INT_EQ(c->http->nfilters, 0);
        wp_snapshot_unref(s);
        free(text);
}

static void test_hcm_rejects_unknown_required_http_filter(void)
{
        expect_fixture_reject("\"name\": \"envoy.filters.http.grpc_stats\"",
                              "\"name\": \"envoy.filters.http.ext_authz\"", 1,
                              "http_filters[1] (envoy.filters.http.ext_authz): HTTP filter not implemented",
                              "filter_chains[");
}

static void test_hcm_skips_unknown_optional_http_filter(void)
{
        char *text = fixture_with("\"name\": \"envoy.filters.http.grpc_stats\"",
                                  "\"name\": \"envoy.filters.http.ext_authz\", \"is_optional\": true", 1);
        struct wp_snapshot *s = NULL;
        char *err = NULL;

        CHECK(build_text(text, &s, &err) == 0);
        CHECK(err == NULL);
        wp_snapshot_unref(s);
        wp_free(err);
        free(text);
}

static void test_hcm_rejects_non_empty_fault_config(void)
{
        expect_fixture_reject("\"@type\": \"type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\"",
                              "\"@type\": \"type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\", \"max_active_faults\": 3",
                              1, "(envoy.filters.http.fault): a non-empty configuration is not implemented",
                              NULL);
}

static void test_hcm_rejects_per_route_fault_config(void)
{
        expect_fixture_reject("\"name\": \"bookinfo.productpage.1\",",
                              "\"name\": \"bookinfo.productpage.1\", \"typed_per_filter_config\": "
                              "{\"envoy.filters.http.fault\": {\"@type\": "
                              "\"type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault\", "
                              "\"max_active_faults\": 1}},",
                              1, "typed_per_filter_config[envoy.filters.http.fault]", "not implemented");
}

static void test_hcm_rejects_filter_after_router(void)
{
        expect_fixture_reject("\"name\": \"envoy.filters.http.router\"",
                              "\"name\": \"envoy.filters.http.router\"}, {\"name\": \"istio.stats\"", 2,
                              "after the router", NULL);
}

static void test_hcm_rejects_bad_route_config_naming_field(void)
{
        expect_fixture_reject("\"path\": \"/\"", "\"path\": \"/\", \"safe_regex\": {\"regex\": \"(\"}",
                              1, "route_config", "filter_chains[");
}

static void test_hcm_rejects_bad_rbac_config(void)
{
        expect_fixture_reject("\"ns[bookinfo]-policy[productpage-viewer]-rule[0]\": {",
                              "\"bad\": {\"permissions\": [{\"any\": true}], "
                              "\"principals\": [{\"filter_state\": {\"key\": \"other.key\", "
                              "\"string_match\": {\"exact\": \"x\"}}}]}, "
                              "\"ns[bookinfo]-policy[productpage-viewer]-rule[0]\": {",
                              1, "(envoy.filters.http.rbac).typed_config.", "filter_chains[");
}

static void test_cluster_rejects_unsupported_lb_policy(void)
{
        expect_fixture_reject("\"name\": \"inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local\",",
                              "\"name\": \"inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local\", \"lb_policy\": \"CLUSTER_PROVIDED\",",
                              1, "lb_policy", NULL);
}


/* With the reaper on, the last unref only queues the snapshot (a worker must not pay for the
 * free); wp_snapshot_reap() frees it. Under ASan, reading it after the unref would be a
 * use-after-free if it had been freed there. */
static void test_last_unref_defers_to_the_reaper(void)
{
        struct wp_snapshot *s = NULL;
        char *err = NULL;
        size_t nchains;

        REQUIRE(build_text(demo_json, &s, &err) == 0);
        nchains = s->nchains;
        wp_snapshot_reaper_enable(true);
        wp_snapshot_unref(s);
        CHECK_INT_EQ(s->nchains, nchains); /* still allocated: queued */
        wp_snapshot_reap();
        wp_snapshot_reaper_enable(false);
}

static int build_once(void *arg)
{
        struct xds_resources *res = NULL;
        struct wp_snapshot *s = NULL;
        const char *lerr = NULL;
        char *err = NULL;
        int r;

        r = xds_resources_load_buffer(demo_json, demo_len, XDS_FORMAT_JSON, 0, &res, &lerr);
        if (r < 0)
                return r;
        r = wp_snapshot_build(res, &s, &err);
        if (r < 0) {
                xds_resources_free(res);
                wp_free(err);
                return r;
        }
        wp_snapshot_unref(s);
        return 0;
}

/* The istiod fixture (HCM chains: routes, RBAC, LB per cluster) under allocation failures: the
 * resources are loaded once and kept by the caller on every failed build. */
static int build_fixture_once(void *arg)
{
        struct xds_resources *res = arg;
        struct wp_snapshot *s = NULL;
        char *err = NULL;
        int r = wp_snapshot_build(res, &s, &err);

        if (r < 0) {
                wp_free(err);
                return r;
        }
        s->res = NULL; /* keep res for the next run */
        wp_snapshot_unref(s);
        return 0;
}

static void test_fixture_build_survives_allocation_failures(void)
{
        struct xds_resources *res = NULL;
        const char *lerr = NULL;
        char path[4096];

        snprintf(path, sizeof(path), "%s/data/istiod-waypoint-bookinfo.json",
                 getenv("WP_TEST_SRCDIR") ? getenv("WP_TEST_SRCDIR") : "tests");
        REQUIRE(xds_resources_load_file(path, &res, &lerr) == 0);
        CHECK(check_failalloc_run(build_fixture_once, res) > 100);
        xds_resources_free(res);
}

static void test_build_survives_allocation_failures(void)
{
        unsigned n = check_failalloc_run(build_once, NULL);

        CHECK(n > 50);
}

int main(void)
{
        demo_json = check_read_test_file("../examples/waypoint-demo.json", &demo_len);
        RUN(test_fixture_dispatch_matches_istiod_shape);
        RUN(test_demo_round_robin_and_plain_endpoint);
        RUN(test_unhealthy_endpoints_are_skipped);
        RUN(test_rejects_unknown_cluster_in_tcp_proxy);
        RUN(test_rejects_matcher_action_naming_unknown_chain);
        RUN(test_rejects_bad_cidr);
        RUN(test_rejects_bad_endpoint_address);
        RUN(test_rejects_unsupported_matcher_input);
        RUN(test_rejects_missing_main_internal);
        RUN(test_rejects_chain_without_terminal_filter);
        RUN(test_unknown_filter_makes_chain_unsupported_not_open);
        RUN(test_workload_address_goes_to_passthrough_chain);
        RUN(test_hcm_chain_compiles_filters_routes_and_lb);
        RUN(test_hcm_rejects_unknown_required_http_filter);
        RUN(test_hcm_skips_unknown_optional_http_filter);
        RUN(test_hcm_rejects_non_empty_fault_config);
        RUN(test_hcm_rejects_per_route_fault_config);
        RUN(test_hcm_rejects_filter_after_router);
        RUN(test_hcm_rejects_bad_route_config_naming_field);
        RUN(test_hcm_rejects_bad_rbac_config);
        RUN(test_cluster_rejects_unsupported_lb_policy);
        RUN(test_last_unref_defers_to_the_reaper);
        RUN(test_build_survives_allocation_failures);
        RUN(test_fixture_build_survives_allocation_failures);
        free(demo_json);
        return check_exit();
}
