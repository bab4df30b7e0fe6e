/*
 * Tests for waypoint/router.c (+ re2_shim.cc): Envoy RouteConfiguration semantics, as
 * documented in route_components.proto and as the Gateway API HTTPRoute conformance tests
 * expect them, the istiod fixture's routes, compile errors and failalloc.
 *
 * Configs are written as JSON with single quotes (turned into double quotes before parsing)
 * and decoded with xds-client's protobuf JSON codec.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/re2_shim.h"
#include "waypoint/router.h"
#include "xds-client/pbjson.h"
#include "xds-client/resources.h"
#include "xdsproto.h"

/* ---- helpers ---------------------------------------------------------------------------- */

static Envoy__Config__Route__V3__RouteConfiguration *rc_from_json(const char *sq)
{
        char *js = strdup(sq);
        struct json_object *o;
        ProtobufCMessage *m = NULL;
        const char *err = NULL;

        for (char *p = js; *p; p++)
                if (*p == '\'')
                        *p = '"';
        o = json_tokener_parse(js);
        if (!o) {
                fprintf(stderr, "bad JSON: %s\n", js);
                exit(99);
        }
        if (xds_pbjson_decode(&envoy__config__route__v3__route_configuration__descriptor, o, 0,
                              NULL, &m, &err) < 0) {
                fprintf(stderr, "decode: %s\n  in %s\n", err, js);
                exit(99);
        }
        json_object_put(o);
        free(js);
        return (Envoy__Config__Route__V3__RouteConfiguration *)m;
}

static struct wp_route_table *table(const char *sq)
{
        Envoy__Config__Route__V3__RouteConfiguration *rc = rc_from_json(sq);
        struct wp_route_table *t = NULL;
        const char *err = NULL;
        int r = wp_route_table_new(rc, &t, &err);

        if (r < 0) {
                fprintf(stderr, "compile failed (%d): %s\n  config: %s\n", r, err, sq);
                exit(99);
        }
        xds_pbjson_message_free(&rc->base);
        return t;
}

static char errcopy[1024];

/* Compiles sq; returns the error description, or NULL when it compiled. */
static const char *compile_error(const char *sq, int *ret_r)
{
        Envoy__Config__Route__V3__RouteConfiguration *rc = rc_from_json(sq);
        struct wp_route_table *t = NULL;
        const char *err = NULL;
        int r = wp_route_table_new(rc, &t, &err);

        xds_pbjson_message_free(&rc->base);
        if (ret_r)
                *ret_r = r;
        if (r >= 0) {
                wp_route_table_free(t);
                return NULL;
        }
        snprintf(errcopy, sizeof(errcopy), "%s", err);
        return errcopy;
}

/* One virtual host "vh" with domains ["*"] and the given routes (a JSON array body). */
static char cfgbuf[16384];
static const char *vh1(const char *routes)
{
        snprintf(cfgbuf, sizeof(cfgbuf),
                 "{'name':'rc','virtual_hosts':[{'name':'vh','domains':['*'],'routes':[%s]}]}",
                 routes);
        return cfgbuf;
}

static char rbuf[4096];
static struct wp_route_result res;

static int vroute(const struct wp_route_table *t, uint64_t rnd, const char *method,
                  const char *host, const char *path, va_list ap)
{
        struct wp_http_request req = {.method = method,
                                      .scheme = "http",
                                      .authority = host,
                                      .path = path,
                                      .content_length = -1};
        const char *n;
        int r;

        wp_headers_init(&req.headers);
        while ((n = va_arg(ap, const char *))) {
                const char *v = va_arg(ap, const char *);
                if (wp_headers_add(&req.headers, n, (uint32_t)strlen(n), v, (uint32_t)strlen(v)))
                        exit(99);
        }
        wp_route_result_init(&res, rbuf, sizeof(rbuf));
        r = wp_route_match(t, &req, rnd, &res);
        wp_headers_done(&req.headers);
        return r;
}

/* What the request ends up at: the cluster name, "NR", "REDIRECT <status> <location>" or
 * "DIRECT <status> <body>". */
static char outbuf[8192];
static const char *outcome(void)
{
        switch (res.action) {
        case WP_ROUTE_ACTION_NONE:
                return "NR";
        case WP_ROUTE_ACTION_CLUSTER:
                return res.cluster ? res.cluster : "(cluster not found)";
        case WP_ROUTE_ACTION_REDIRECT:
                snprintf(outbuf, sizeof(outbuf), "REDIRECT %u %s", res.status, res.location);
                return outbuf;
        case WP_ROUTE_ACTION_DIRECT:
                snprintf(outbuf, sizeof(outbuf), "DIRECT %u %.*s", res.status, (int)res.body_len,
                         res.body);
                return outbuf;
        case WP_ROUTE_ACTION_NON_FORWARDING:
                return "NON_FORWARDING";
        default:
                return "?";
        }
}

static const char *go(const struct wp_route_table *t, const char *method, const char *host,
                      const char *path, ...)
{
        va_list ap;
        int r;

        va_start(ap, path);
        r = vroute(t, 0, method, host, path, ap);
        va_end(ap);
        if (r < 0) {
                snprintf(outbuf, sizeof(outbuf), "error %d", r);
                return outbuf;
        }
        return outcome();
}

#define GET(t, path, ...) go(t, "GET", "example.com", path, ##__VA_ARGS__, NULL)

/* ---- path matching ---------------------------------------------------------------------- */

static void test_prefix_matches_whole_path_including_query(void)
{
        struct wp_route_table *t = table(vh1("{'match':{'prefix':'/v1'},'route':{'cluster':'v1'}},"
                                             "{'match':{'prefix':'/'},'route':{'cluster':'"
                                             "other'}}"));

        CHECK_STR_EQ(GET(t, "/v1"), "v1");
        CHECK_STR_EQ(GET(t, "/v1/x"), "v1");
        CHECK_STR_EQ(GET(t, "/v1x"), "v1"); /* a plain prefix has no segment boundary */
        CHECK_STR_EQ(GET(t, "/v1?a=b"), "v1");
        CHECK_STR_EQ(GET(t, "/V1"), "other"); /* case sensitive by default */
        CHECK_STR_EQ(GET(t, "/v"), "other");
        wp_route_table_free(t);
}

static void test_path_separated_prefix_requires_segment_boundary(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'path_separated_prefix':'/v1'},'route':{'cluster':'v1'}},"
                      "{'match':{'prefix':'/'},'route':{'cluster':'other'}}"));

        CHECK_STR_EQ(GET(t, "/v1"), "v1");
        CHECK_STR_EQ(GET(t, "/v1/"), "v1");
        CHECK_STR_EQ(GET(t, "/v1/x/y"), "v1");
        CHECK_STR_EQ(GET(t, "/v1?x=1"), "v1");
        CHECK_STR_EQ(GET(t, "/v1#frag"), "v1");
        CHECK_STR_EQ(GET(t, "/v1x"), "other");
        CHECK_STR_EQ(GET(t, "/v12/x"), "other");
        CHECK_STR_EQ(GET(t, "/v"), "other");
        wp_route_table_free(t);
}

static void test_exact_path_ignores_query_string(void)
{
        struct wp_route_table *t = table(vh1("{'match':{'path':'/exact'},'route':{'cluster':'e'}},"
                                             "{'match':{'prefix':'/'},'route':{'cluster':'"
                                             "other'}}"));

        CHECK_STR_EQ(GET(t, "/exact"), "e");
        CHECK_STR_EQ(GET(t, "/exact?q=1"), "e");
        CHECK_STR_EQ(GET(t, "/exact/"), "other");
        CHECK_STR_EQ(GET(t, "/exactly"), "other");
        CHECK_STR_EQ(GET(t, "/Exact"), "other");
        wp_route_table_free(t);
}

static void test_case_insensitive_prefix_and_path(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/API','case_sensitive':false},'route':{'cluster':'a'}},"
                "{'match':{'path':'/Login','case_sensitive':false},'route':{'cluster':'l'}}"));

        CHECK_STR_EQ(GET(t, "/api/v1"), "a");
        CHECK_STR_EQ(GET(t, "/ApI"), "a");
        CHECK_STR_EQ(GET(t, "/LOGIN"), "l");
        CHECK_STR_EQ(GET(t, "/login?x"), "l");
        CHECK_STR_EQ(GET(t, "/logins"), "NR");
        wp_route_table_free(t);
}

static void test_safe_regex_is_a_full_match_on_path_without_query(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'safe_regex':{'regex':'/v[0-9]+/.*'}},'route':{'cluster':'re'}},"
                      "{'match':{'safe_regex':{'google_re2':{},'regex':'/"
                      "[a-z]+'}},'route':{'cluster':'w'}}"));

        CHECK_STR_EQ(GET(t, "/v12/a"), "re");
        CHECK_STR_EQ(GET(t, "/v1/"), "re");
        CHECK_STR_EQ(GET(t, "/v12/a?x=/v1/"), "re");
        CHECK_STR_EQ(GET(t, "/x/v1/a"), "NR"); /* not a substring search */
        CHECK_STR_EQ(GET(t, "/v/a"), "NR");
        CHECK_STR_EQ(GET(t, "/abc"), "w");
        CHECK_STR_EQ(GET(t, "/abc?q"), "w");
        CHECK_STR_EQ(GET(t, "/abc1"), "NR");
        wp_route_table_free(t);
}

static void test_first_matching_route_wins(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'prefix':'/'},'route':{'cluster':'first'}},"
                      "{'match':{'path':'/a'},'route':{'cluster':'second'}}"));

        CHECK_STR_EQ(GET(t, "/a"), "first");
        CHECK_STR_EQ(res.route_name, "");
        CHECK_STR_EQ(res.vhost_name, "vh");
        wp_route_table_free(t);
}

static void test_connect_matcher_matches_only_connect(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'connect_matcher':{}},'route':{'cluster':'tunnel','upgrade_configs':"
                "[{'upgrade_type':'CONNECT','connect_config':{}}]}},"
                "{'match':{'prefix':'/'},'route':{'cluster':'http'}}"));

        CHECK_STR_EQ(go(t, "CONNECT", "10.0.0.1:8080", NULL, NULL), "tunnel");
        REQUIRE(res.n_upgrades == 1);
        CHECK_STR_EQ(res.upgrades[0].type, "CONNECT");
        CHECK(res.upgrades[0].enabled && res.upgrades[0].connect_config);
        CHECK_STR_EQ(GET(t, "/"), "http");
        wp_route_table_free(t);
}

/* ---- header, query and method matching ------------------------------------------------- */

static void test_header_matchers(void)
{
        struct wp_route_table *t = table(vh1(
            "{'match':{'prefix':'/','headers':[{'name':'end-user','string_match':{'exact':"
            "'jason'}}]},'route':{'cluster':'exact'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-ver','safe_regex_match':{'regex':"
            "'v[0-9]+'}}]},'route':{'cluster':'regex'}},"
            "{'match':{'prefix':'/','headers':[{'name':'X-Present','present_match':true}]},"
            "'route':{'cluster':'present'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-pre','string_match':{'prefix':'ab',"
            "'ignore_case':true}}]},'route':{'cluster':'prefix-ic'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-suf','string_match':{'suffix':'yz'}}]},"
            "'route':{'cluster':'suffix'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-con','contains_match':'mid'}]},"
            "'route':{'cluster':'contains'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-num','range_match':{'start':'10',"
            "'end':'20'}}]},'route':{'cluster':'range'}},"
            "{'match':{'prefix':'/','headers':[{'name':'x-env','string_match':{'exact':'prod'},"
            "'invert_match':true}]},'route':{'cluster':'not-prod'}},"
            "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));

        CHECK_STR_EQ(GET(t, "/", "end-user", "jason"), "exact");
        CHECK_STR_EQ(GET(t, "/", "end-user", "Jason"), "default");
        CHECK_STR_EQ(GET(t, "/", "end-user", "jason2"), "default");
        CHECK_STR_EQ(GET(t, "/", "x-ver", "v12"), "regex");
        CHECK_STR_EQ(GET(t, "/", "x-ver", "xv12"), "default"); /* full match */
        CHECK_STR_EQ(GET(t, "/", "x-present", ""), "present"); /* name lower-cased */
        CHECK_STR_EQ(GET(t, "/", "x-pre", "ABc"), "prefix-ic");
        CHECK_STR_EQ(GET(t, "/", "x-pre", "xab"), "default");
        CHECK_STR_EQ(GET(t, "/", "x-suf", "xyz"), "suffix");
        CHECK_STR_EQ(GET(t, "/", "x-suf", "XYZ"), "default");
        CHECK_STR_EQ(GET(t, "/", "x-con", "amidst"), "contains");
        CHECK_STR_EQ(GET(t, "/", "x-num", "10"), "range");
        CHECK_STR_EQ(GET(t, "/", "x-num", "19"), "range");
        CHECK_STR_EQ(GET(t, "/", "x-num", "20"), "default"); /* end is exclusive */
        CHECK_STR_EQ(GET(t, "/", "x-num", "1x"), "default");
        /* invert: a different value matches, a missing header does not (Envoy) */
        CHECK_STR_EQ(GET(t, "/", "x-env", "dev"), "not-prod");
        CHECK_STR_EQ(GET(t, "/", "x-env", "prod"), "default");
        CHECK_STR_EQ(GET(t, "/"), "default");
        wp_route_table_free(t);
}

static void test_header_presence_absence_and_missing_semantics(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/a','headers':[{'name':'x-debug','present_match':false}]},"
                "'route':{'cluster':'absent'}},"
                "{'match':{'prefix':'/b','headers':[{'name':'x-debug','present_match':true,"
                "'invert_match':true}]},'route':{'cluster':'inverted-present'}},"
                "{'match':{'prefix':'/c','headers':[{'name':'x-e','string_match':{'exact':''},"
                "'treat_missing_header_as_empty':true}]},'route':{'cluster':'empty'}},"
                "{'match':{'prefix':'/d','headers':[{'name':'x-n'}]},'route':{'cluster':'named'}},"
                "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));

        CHECK_STR_EQ(GET(t, "/a"), "absent");
        CHECK_STR_EQ(GET(t, "/a", "x-debug", "1"), "default");
        CHECK_STR_EQ(GET(t, "/b"), "inverted-present");
        CHECK_STR_EQ(GET(t, "/b", "x-debug", "1"), "default");
        CHECK_STR_EQ(GET(t, "/c"), "empty");
        CHECK_STR_EQ(GET(t, "/c", "x-e", ""), "empty");
        CHECK_STR_EQ(GET(t, "/c", "x-e", "v"), "default");
        CHECK_STR_EQ(GET(t, "/d", "x-n", "anything"), "named"); /* no specifier: present */
        CHECK_STR_EQ(GET(t, "/d"), "default");
        wp_route_table_free(t);
}

static void test_repeated_header_is_matched_joined_with_commas(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/','headers':[{'name':'x-a','string_match':{'exact':'1,2'}}]},"
                "'route':{'cluster':'joined'}},"
                "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));
        static char big[WP_ROUTE_MAX_JOINED_HEADER];

        CHECK_STR_EQ(GET(t, "/", "x-a", "1", "x-b", "z", "x-a", "2"), "joined");
        CHECK_STR_EQ(GET(t, "/", "x-a", "1"), "default");
        memset(big, 'a', sizeof(big) - 1);
        CHECK_STR_EQ(GET(t, "/", "x-a", big, "x-a", big), "default"); /* too long: no match */
        wp_route_table_free(t);
}

static void test_method_and_pseudo_headers(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/','headers':[{'name':':method','string_match':{'exact':"
                "'POST'}}]},'route':{'cluster':'post'}},"
                "{'match':{'prefix':'/','headers':[{'name':':authority','string_match':{'suffix':"
                "'.internal'}}]},'route':{'cluster':'internal'}},"
                "{'match':{'prefix':'/','headers':[{'name':':path','string_match':{'contains':"
                "'debug'}}]},'route':{'cluster':'debug'}},"
                "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));

        CHECK_STR_EQ(go(t, "POST", "h", "/x", NULL), "post");
        CHECK_STR_EQ(go(t, "GET", "h", "/x", NULL), "default");
        CHECK_STR_EQ(go(t, "post", "h", "/x", NULL), "default");
        CHECK_STR_EQ(go(t, "GET", "svc.internal", "/x", NULL), "internal");
        CHECK_STR_EQ(go(t, "GET", "h", "/x?debug=1", NULL), "debug");
        wp_route_table_free(t);
}

static void test_query_parameter_matchers(void)
{
        struct wp_route_table *t = table(vh1(
            "{'match':{'prefix':'/','query_parameters':[{'name':'animal','string_match':"
            "{'exact':'whale'}},{'name':'color','string_match':{'exact':'blue'}}]},"
            "'route':{'cluster':'both'}},"
            "{'match':{'prefix':'/','query_parameters':[{'name':'debug','present_match':true}]},"
            "'route':{'cluster':'debug'}},"
            "{'match':{'prefix':'/','query_parameters':[{'name':'id','string_match':"
            "{'safe_regex':{'regex':'[0-9]+'}}}]},'route':{'cluster':'id'}},"
            "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));

        CHECK_STR_EQ(GET(t, "/?animal=whale&color=blue"), "both");
        CHECK_STR_EQ(GET(t, "/p?color=blue&animal=whale"), "both");
        CHECK_STR_EQ(GET(t, "/?animal=whale"), "default");
        CHECK_STR_EQ(GET(t, "/?animal=whale&color=green"), "default");
        /* first occurrence wins */
        CHECK_STR_EQ(GET(t, "/?animal=dolphin&animal=whale&color=blue"), "default");
        CHECK_STR_EQ(GET(t, "/?debug"), "debug");
        CHECK_STR_EQ(GET(t, "/?x=1&debug="), "debug");
        CHECK_STR_EQ(GET(t, "/debug"), "default");
        CHECK_STR_EQ(GET(t, "/?debugx=1"), "default");
        CHECK_STR_EQ(GET(t, "/?id=42"), "id");
        CHECK_STR_EQ(GET(t, "/?id=42#frag"), "id");
        CHECK_STR_EQ(GET(t, "/?id=4a"), "default");
        CHECK_STR_EQ(GET(t, "/?id%3D1"), "default"); /* not decoded */
        wp_route_table_free(t);
}

static void test_grpc_and_runtime_fraction_matchers(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/','grpc':{}},'route':{'cluster':'grpc'}},"
                "{'match':{'prefix':'/','runtime_fraction':{'default_value':{'numerator':25}}},"
                "'route':{'cluster':'canary'}},"
                "{'match':{'prefix':'/'},'route':{'cluster':'default'}}"));
        struct wp_http_request req = {.method = "GET", .authority = "h", .path = "/"};
        unsigned canary = 0;

        CHECK_STR_EQ(GET(t, "/", "content-type", "application/grpc"), "grpc");
        CHECK_STR_EQ(GET(t, "/", "content-type", "application/grpc+proto"), "grpc");
        /* not gRPC; random 0 falls in the 25% fraction */
        CHECK_STR_EQ(GET(t, "/", "content-type", "application/grpcx"), "canary");
        wp_headers_init(&req.headers);
        for (uint64_t i = 0; i < 100; i++) {
                wp_route_result_init(&res, rbuf, sizeof(rbuf));
                CHECK_INT_EQ(wp_route_match(t, &req, i, &res), 0);
                canary += strcmp(res.cluster, "canary") == 0;
        }
        CHECK_INT_EQ(canary, 25);
        wp_route_table_free(t);
}

/* ---- virtual hosts ---------------------------------------------------------------------- */

static void test_virtual_host_selection_order(void)
{
        struct wp_route_table *t = table(
            "{'virtual_hosts':["
            "{'name':'exact','domains':['www.foo.com','Mixed.Example'],'routes':[{'match':"
            "{'prefix':'/'},'route':{'cluster':'exact'}}]},"
            "{'name':'suffix','domains':['*.foo.com'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'suffix'}}]},"
            "{'name':'longsuffix','domains':['*.bar.foo.com'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'longsuffix'}}]},"
            "{'name':'dashsuffix','domains':['*-bar.baz.com'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'dashsuffix'}}]},"
            "{'name':'prefix','domains':['foo.*'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'prefix'}}]},"
            "{'name':'longprefix','domains':['foo.bar.*'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'longprefix'}}]},"
            "{'name':'star','domains':['*'],'routes':[{'match':{'prefix':'/'},"
            "'route':{'cluster':'star'}}]}]}");

        CHECK_STR_EQ(go(t, "GET", "www.foo.com", "/", NULL), "exact");
        CHECK_STR_EQ(go(t, "GET", "WWW.Foo.COM", "/", NULL), "exact");
        CHECK_STR_EQ(go(t, "GET", "mixed.example", "/", NULL), "exact");
        CHECK_STR_EQ(go(t, "GET", "api.foo.com", "/", NULL), "suffix");
        CHECK_STR_EQ(go(t, "GET", "x.bar.foo.com", "/", NULL), "longsuffix");
        CHECK_STR_EQ(go(t, "GET", "baz-bar.baz.com", "/", NULL), "dashsuffix");
        /* the wildcard does not match the empty string */
        CHECK_STR_EQ(go(t, "GET", "-bar.baz.com", "/", NULL), "star");
        CHECK_STR_EQ(go(t, "GET", ".foo.com", "/", NULL), "star");
        CHECK_STR_EQ(go(t, "GET", "foo.com", "/", NULL), "prefix"); /* suffix fails, prefix ok */
        CHECK_STR_EQ(go(t, "GET", "foo.bar.org", "/", NULL), "longprefix");
        CHECK_STR_EQ(go(t, "GET", "foo.", "/", NULL), "star");
        CHECK_STR_EQ(go(t, "GET", "other.org", "/", NULL), "star");
        CHECK_STR_EQ(go(t, "GET", NULL, "/", NULL), "star");
        CHECK_STR_EQ(res.vhost_name, "star");
        wp_route_table_free(t);
}

static void test_host_port_is_tried_with_then_without(void)
{
        struct wp_route_table *t =
            table("{'virtual_hosts':["
                  "{'name':'withport','domains':['svc:8080'],'routes':[{'match':{'prefix':'/'},"
                  "'route':{'cluster':'withport'}}]},"
                  "{'name':'noport','domains':['svc','[::1]'],'routes':[{'match':{'prefix':'/'},"
                  "'route':{'cluster':'noport'}}]}]}");

        CHECK_STR_EQ(go(t, "GET", "svc:8080", "/", NULL), "withport");
        CHECK_STR_EQ(go(t, "GET", "svc:9090", "/", NULL), "noport");
        CHECK_STR_EQ(go(t, "GET", "svc", "/", NULL), "noport");
        CHECK_STR_EQ(go(t, "GET", "[::1]:80", "/", NULL), "noport");
        CHECK_STR_EQ(go(t, "GET", "svc:abc", "/", NULL), "NR"); /* not a port */
        CHECK(res.vhost_name == NULL);
        wp_route_table_free(t);

        t = table("{'ignore_port_in_host_matching':true,'virtual_hosts':["
                  "{'name':'withport','domains':['svc:8080'],'routes':[{'match':{'prefix':'/'},"
                  "'route':{'cluster':'withport'}}]},"
                  "{'name':'noport','domains':['svc'],'routes':[{'match':{'prefix':'/'},"
                  "'route':{'cluster':'noport'}}]}]}");
        CHECK_STR_EQ(go(t, "GET", "svc:8080", "/", NULL), "noport");
        wp_route_table_free(t);
}

static void test_no_virtual_host_or_route_is_nr(void)
{
        struct wp_route_table *t = table(
            "{'virtual_hosts':[{'name':'a','domains':['a.com'],'routes':[{'match':{'path':'/x'},"
            "'route':{'cluster':'x'}}]}]}");

        CHECK_STR_EQ(go(t, "GET", "b.com", "/x", NULL), "NR");
        CHECK(res.route == NULL);
        CHECK_STR_EQ(go(t, "GET", "a.com", "/y", NULL), "NR");
        CHECK_STR_EQ(res.vhost_name, "a");
        CHECK_STR_EQ(go(t, "GET", "a.com", "/x", NULL), "x");
        wp_route_table_free(t);
}

/* ---- weighted clusters ------------------------------------------------------------------ */

static uint64_t xorshift(uint64_t *s)
{
        uint64_t x = *s;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        return *s = x;
}

static void test_weighted_clusters_distribution(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/'},'route':{'weighted_clusters':{'clusters':["
                "{'name':'a','weight':50},{'name':'b','weight':30},{'name':'zero','weight':0},"
                "{'name':'c','weight':20}]}}}"));
        struct wp_http_request req = {.method = "GET", .authority = "h", .path = "/"};
        unsigned a = 0, b = 0, c = 0, other = 0;
        uint64_t seed = 0x9e3779b97f4a7c15ull;

        wp_headers_init(&req.headers);
        for (int i = 0; i < 10000; i++) {
                wp_route_result_init(&res, rbuf, sizeof(rbuf));
                REQUIRE(wp_route_match(t, &req, xorshift(&seed), &res) == 0);
                if (strcmp(res.cluster, "a") == 0)
                        a++;
                else if (strcmp(res.cluster, "b") == 0)
                        b++;
                else if (strcmp(res.cluster, "c") == 0)
                        c++;
                else
                        other++;
        }
        /* binomial standard deviations: 50, 46, 40; allow about 5 of them */
        CHECK(a > 5000 - 250 && a < 5000 + 250);
        CHECK(b > 3000 - 230 && b < 3000 + 230);
        CHECK(c > 2000 - 200 && c < 2000 + 200);
        CHECK_INT_EQ(other, 0);
        /* the pick is random % total over the clusters in order */
        wp_route_result_init(&res, rbuf, sizeof(rbuf));
        wp_route_match(t, &req, 49, &res);
        CHECK_STR_EQ(res.cluster, "a");
        wp_route_match(t, &req, 50, &res);
        CHECK_STR_EQ(res.cluster, "b");
        wp_route_match(t, &req, 80, &res);
        CHECK_STR_EQ(res.cluster, "c");
        wp_route_match(t, &req, 199, &res);
        CHECK_STR_EQ(res.cluster, "c");
        wp_route_table_free(t);
}

static void test_weighted_clusters_random_header_and_per_cluster_settings(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/'},'route':{'weighted_clusters':{'header_name':'x-rand',"
                "'total_weight':10,'clusters':["
                "{'name':'a','weight':5,'host_rewrite_literal':'a.internal',"
                "'request_headers_to_add':[{'header':{'key':'x-c','value':'a'}}]},"
                "{'cluster_header':'x-target','weight':5}]}}}"));

        CHECK_STR_EQ(GET(t, "/", "x-rand", "3"), "a");
        CHECK_STR_EQ(res.host, "a.internal");
        REQUIRE(res.n_request_ops == 1);
        CHECK_STR_EQ(res.request_ops[0]->add[0].name, "x-c");
        CHECK_STR_EQ(GET(t, "/", "x-rand", "7", "x-target", "dyn"), "dyn");
        CHECK(res.host == NULL);
        CHECK_STR_EQ(GET(t, "/", "x-rand", "7"), "(cluster not found)");
        CHECK_INT_EQ(res.cluster_not_found_status, 503);
        wp_route_table_free(t);
}

static void test_cluster_header_action(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'prefix':'/'},'route':{'cluster_header':'X-Cluster',"
                      "'cluster_not_found_response_code':'NOT_FOUND'}}"));

        CHECK_STR_EQ(GET(t, "/", "x-cluster", "backend"), "backend");
        CHECK_INT_EQ(res.cluster_len, 7);
        CHECK_STR_EQ(GET(t, "/"), "(cluster not found)");
        CHECK_INT_EQ(res.action, WP_ROUTE_ACTION_CLUSTER);
        CHECK_INT_EQ(res.cluster_not_found_status, 404);
        wp_route_table_free(t);
}

/* ---- redirects -------------------------------------------------------------------------- */

struct redirect_case {
        const char *redirect; /* RedirectAction JSON body */
        const char *match;    /* RouteMatch JSON body */
        const char *host, *path;
        const char *want;
};

static void test_redirects_produce_exact_locations(void)
{
        static const struct redirect_case cases[] = {
            /* fixture-like: path_redirect + port */
            {"'path_redirect':'/productpage','port_redirect':9080,'response_code':'FOUND'",
             "'path':'/'", "productpage:9080", "/",
             "REDIRECT 302 http://productpage:9080/productpage"},
            {"'path_redirect':'/productpage','port_redirect':9080,'response_code':'FOUND'",
             "'path':'/'", "productpage", "/?u=1",
             "REDIRECT 302 http://productpage:9080/productpage?u=1"},
            {"'https_redirect':true", "'prefix':'/'", "foo.com", "/a?b=c",
             "REDIRECT 301 https://foo.com/a?b=c"},
            /* scheme change drops the old scheme's default port */
            {"'https_redirect':true", "'prefix':'/'", "foo.com:80", "/a",
             "REDIRECT 301 https://foo.com/a"},
            {"'https_redirect':true", "'prefix':'/'", "foo.com:8080", "/a",
             "REDIRECT 301 https://foo.com:8080/a"},
            {"'scheme_redirect':'https','port_redirect':8443", "'prefix':'/'", "foo.com:80", "/a",
             "REDIRECT 301 https://foo.com:8443/a"},
            {"'host_redirect':'example.org'", "'prefix':'/'", "foo.com:8080", "/a?b",
             "REDIRECT 301 http://example.org/a?b"},
            {"'host_redirect':'example.org','port_redirect':8083", "'prefix':'/'", "foo.com", "/p",
             "REDIRECT 301 http://example.org:8083/p"},
            {"'port_redirect':8083,'response_code':'SEE_OTHER'", "'prefix':'/'", "foo.com:80", "/p",
             "REDIRECT 303 http://foo.com:8083/p"},
            {"'prefix_rewrite':'/new','response_code':'TEMPORARY_REDIRECT'", "'prefix':'/old'", "h",
             "/old/x?y=1", "REDIRECT 307 http://h/new/x?y=1"},
            {"'prefix_rewrite':'/','response_code':'PERMANENT_REDIRECT'", "'prefix':'/old/'", "h",
             "/old/x", "REDIRECT 308 http://h/x"},
            {"'prefix_rewrite':'/new','strip_query':true", "'prefix':'/old'", "h", "/old/x?y=1",
             "REDIRECT 301 http://h/new/x"},
            {"'path_redirect':'/p?fixed=1','strip_query':true", "'prefix':'/'", "h", "/a?b=2",
             "REDIRECT 301 http://h/p?fixed=1"},
            {"'path_redirect':'/p','strip_query':true", "'prefix':'/'", "h", "/a?b=2",
             "REDIRECT 301 http://h/p"},
            {"'regex_rewrite':{'pattern':{'regex':'^/service/([^/]+)(/.*)$'},"
             "'substitution':'\\\\2/instance/\\\\1'}",
             "'prefix':'/service'", "h", "/service/foo/v1/api?q=1",
             "REDIRECT 301 http://h/v1/api/instance/foo?q=1"},
            /* a path without its leading slash gets one */
            {"'prefix_rewrite':'x'", "'prefix':'/a/'", "h", "/a/b", "REDIRECT 301 http://h/xb"},
            {"'strip_query':true", "'prefix':'/'", "h", "/keep?drop=1",
             "REDIRECT 301 http://h/keep"},
        };
        char cfg[2048];

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                const struct redirect_case *rc = &cases[i];
                struct wp_route_table *t;

                snprintf(cfg, sizeof(cfg), "{'match':{%s},'redirect':{%s}}", rc->match,
                         rc->redirect);
                t = table(vh1(cfg));
                CHECK_STR_EQ(go(t, "GET", rc->host, rc->path, NULL), rc->want);
                CHECK_INT_EQ(res.location_len, res.location ? strlen(res.location) : 0);
                wp_route_table_free(t);
        }
}

static void test_redirect_too_long_for_buffer_is_enospc(void)
{
        struct wp_route_table *t = table(vh1("{'match':{'prefix':'/'},'redirect':{"
                                             "'host_redirect':'example.org'}}"));
        struct wp_http_request req = {.method = "GET", .authority = "h", .path = "/abcdef"};
        char small[20]; /* "http://example.org/abcdef" is 25 bytes */

        wp_headers_init(&req.headers);
        wp_route_result_init(&res, small, sizeof(small));
        CHECK_INT_EQ(wp_route_match(t, &req, 0, &res), -ENOSPC);
        wp_route_result_init(&res, small, 0);
        CHECK_INT_EQ(wp_route_match(t, &req, 0, &res), -ENOSPC);
        wp_route_table_free(t);
}

static void test_require_tls_redirects_to_https(void)
{
        struct wp_route_table *t = table(
            "{'virtual_hosts':[{'name':'v','domains':['*'],'require_tls':'ALL','routes':[{'match':"
            "{'prefix':'/'},'route':{'cluster':'c'}}]}]}");

        CHECK_STR_EQ(go(t, "GET", "a.com:80", "/x?y", NULL), "REDIRECT 301 https://a.com/x?y");
        CHECK_STR_EQ(go(t, "GET", "a.com", "/x", "x-forwarded-proto", "https", NULL), "c");
        wp_route_table_free(t);
}

/* ---- rewrites, direct responses --------------------------------------------------------- */

static void test_route_rewrites(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/prefix/'},'route':{'cluster':'c','prefix_rewrite':'/'}},"
                "{'match':{'path':'/exact'},'route':{'cluster':'c','prefix_rewrite':'/other'}},"
                "{'match':{'prefix':'/full'},'route':{'cluster':'c','regex_rewrite':{'pattern':"
                "{'regex':'^/full/(.*)$'},'substitution':'/\\\\1/done'}}},"
                "{'match':{'prefix':'/many'},'route':{'cluster':'c','regex_rewrite':{'pattern':"
                "{'regex':'a'},'substitution':'bb'}}},"
                "{'match':{'prefix':'/CI','case_sensitive':false},'route':{'cluster':'c',"
                "'prefix_rewrite':'/ci'}},"
                "{'match':{'prefix':'/host'},'route':{'cluster':'c','host_rewrite_literal':"
                "'new.host'}},"
                "{'match':{'prefix':'/hdr'},'route':{'cluster':'c','host_rewrite_header':"
                "'x-host'}},"
                "{'match':{'prefix':'/auto'},'route':{'cluster':'c','auto_host_rewrite':true}}"));

        CHECK_STR_EQ(GET(t, "/prefix/one?x=1"), "c");
        CHECK_STR_EQ(res.path, "/one?x=1");
        CHECK_INT_EQ(res.path_len, 8);
        CHECK_STR_EQ(GET(t, "/exact?q"), "c");
        CHECK_STR_EQ(res.path, "/other?q");
        CHECK_STR_EQ(GET(t, "/full/a/b?k=v"), "c");
        CHECK_STR_EQ(res.path, "/a/b/done?k=v");
        CHECK_STR_EQ(GET(t, "/many/aXa?a=a"), "c");
        CHECK_STR_EQ(res.path, "/mbbny/bbXbb?a=a"); /* every match; query untouched */
        CHECK_STR_EQ(GET(t, "/ci/x"), "c");
        CHECK_STR_EQ(res.path, "/ci/x");
        CHECK_STR_EQ(GET(t, "/Ci/x"), "c");
        CHECK_STR_EQ(res.path, "/ci/x");
        CHECK_STR_EQ(GET(t, "/host"), "c");
        CHECK(res.path == NULL);
        CHECK_STR_EQ(res.host, "new.host");
        CHECK_STR_EQ(GET(t, "/hdr", "x-host", "from.header"), "c");
        CHECK_STR_EQ(res.host, "from.header");
        CHECK_STR_EQ(GET(t, "/hdr"), "c");
        CHECK(res.host == NULL);
        CHECK_STR_EQ(GET(t, "/auto"), "c");
        CHECK(res.auto_host_rewrite);
        wp_route_table_free(t);
}

static void test_direct_responses(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'path':'/health'},'direct_response':{'status':200,'body':{"
                "'inline_string':'ok'}}},"
                "{'match':{'path':'/bytes'},'direct_response':{'status':503,'body':{"
                "'inline_bytes':'AAEC'}}},"
                "{'match':{'path':'/moved'},'direct_response':{'status':301}},"
                "{'match':{'prefix':'/'},'direct_response':{'status':404,'body':{'inline_string':"
                "'not here'}}}"));

        CHECK_STR_EQ(GET(t, "/health"), "DIRECT 200 ok");
        CHECK(res.location == NULL);
        CHECK_STR_EQ(GET(t, "/bytes"), "DIRECT 503 ");
        CHECK_INT_EQ(res.body_len, 3);
        CHECK(memcmp(res.body, "\0\1\2", 3) == 0);
        CHECK_STR_EQ(GET(t, "/moved?x"), "DIRECT 301 ");
        CHECK_STR_EQ(res.location, "http://example.com/moved?x");
        CHECK_STR_EQ(GET(t, "/nope"), "DIRECT 404 not here");
        wp_route_table_free(t);
}

static void test_non_forwarding_action(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'prefix':'/'},'non_forwarding_action':{}}"));

        CHECK_STR_EQ(GET(t, "/"), "NON_FORWARDING");
        wp_route_table_free(t);
}

/* ---- header mutations ------------------------------------------------------------------- */

static const char *hget(const struct wp_headers *h, const char *name)
{
        static char out[512];
        size_t n = 0;
        bool found = false;

        out[0] = 0;
        for (uint32_t i = 0; i < h->n; i++)
                if (strcmp(h->v[i].name, name) == 0) {
                        n += (size_t)snprintf(out + n, sizeof(out) - n, "%s%s", found ? "|" : "",
                                              h->v[i].value);
                        found = true;
                }
        return found ? out : "(absent)";
}

static const char *mutation_cfg =
    "{'request_headers_to_add':[{'header':{'key':'x-level','value':'global'},"
    "'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'},{'header':{'key':'x-global','value':'g'}}],"
    "'request_headers_to_remove':['x-secret'],"
    "'response_headers_to_add':[{'header':{'key':'x-resp','value':'global'},"
    "'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'}],"
    "%s"
    "'virtual_hosts':[{'name':'v','domains':['*'],"
    "'request_headers_to_add':[{'header':{'key':'x-level','value':'vhost'},"
    "'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'}],"
    "'response_headers_to_remove':['server'],"
    "'routes':[{'match':{'prefix':'/'},'route':{'cluster':'c'},"
    "'request_headers_to_add':["
    "{'header':{'key':'x-level','value':'route'},'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'},"
    "{'header':{'key':'x-append','value':'r'}},"
    "{'header':{'key':'x-absent','value':'added'},'append_action':'ADD_IF_ABSENT'},"
    "{'header':{'key':'x-present','value':'kept?'},'append_action':'ADD_IF_ABSENT'},"
    "{'header':{'key':'x-ow','value':'new'},'append_action':'OVERWRITE_IF_EXISTS'},"
    "{'header':{'key':'x-ow-missing','value':'new'},'append_action':'OVERWRITE_IF_EXISTS'},"
    "{'header':{'key':'x-empty','value':''}},"
    "{'header':{'key':'x-keep-empty','value':''},'keep_empty_value':true},"
    "{'header':{'key':'x-legacy','value':'l'},'append':false},"
    "{'header':{'key':'x-pct','value':'100%%%%'}}],"
    "'request_headers_to_remove':['x-remove-me'],"
    "'response_headers_to_add':[{'header':{'key':'x-resp','value':'route'},"
    "'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'}]}]}]}";

static void test_header_mutation_precedence(void)
{
        char cfg[4096];
        struct wp_route_table *t;
        struct wp_headers h;

        snprintf(cfg, sizeof(cfg), mutation_cfg, "");
        t = table(cfg);
        CHECK_STR_EQ(GET(t, "/"), "c");
        REQUIRE(res.n_request_ops == 3);
        wp_headers_init(&h);
        wp_headers_add(&h, "x-append", 8, "orig", 4);
        wp_headers_add(&h, "x-present", 9, "orig", 4);
        wp_headers_add(&h, "x-ow", 4, "old", 3);
        wp_headers_add(&h, "x-remove-me", 11, "1", 1);
        wp_headers_add(&h, "x-secret", 8, "s", 1);
        wp_headers_add(&h, "x-legacy", 8, "old", 3);
        CHECK_INT_EQ(wp_route_headers_apply(res.request_ops, res.n_request_ops, &h), 0);
        /* route, then vhost, then global: the least specific overwrite wins by default */
        CHECK_STR_EQ(hget(&h, "x-level"), "global");
        CHECK_STR_EQ(hget(&h, "x-append"), "orig|r");
        CHECK_STR_EQ(hget(&h, "x-absent"), "added");
        CHECK_STR_EQ(hget(&h, "x-present"), "orig");
        CHECK_STR_EQ(hget(&h, "x-ow"), "new");
        CHECK_STR_EQ(hget(&h, "x-ow-missing"), "(absent)");
        CHECK_STR_EQ(hget(&h, "x-empty"), "(absent)");
        CHECK_STR_EQ(hget(&h, "x-keep-empty"), "");
        CHECK_STR_EQ(hget(&h, "x-legacy"), "l");
        CHECK_STR_EQ(hget(&h, "x-pct"), "100%");
        CHECK_STR_EQ(hget(&h, "x-remove-me"), "(absent)");
        CHECK_STR_EQ(hget(&h, "x-secret"), "(absent)");
        CHECK_STR_EQ(hget(&h, "x-global"), "g");
        wp_headers_done(&h);

        wp_headers_init(&h);
        wp_headers_add(&h, "server", 6, "upstream", 8);
        REQUIRE(res.n_response_ops == 3);
        CHECK_INT_EQ(wp_route_headers_apply(res.response_ops, res.n_response_ops, &h), 0);
        CHECK_STR_EQ(hget(&h, "x-resp"), "global");
        CHECK_STR_EQ(hget(&h, "server"), "(absent)");
        wp_headers_done(&h);
        wp_route_table_free(t);

        snprintf(cfg, sizeof(cfg), mutation_cfg, "'most_specific_header_mutations_wins':true,");
        t = table(cfg);
        CHECK_STR_EQ(GET(t, "/"), "c");
        wp_headers_init(&h);
        CHECK_INT_EQ(wp_route_headers_apply(res.request_ops, res.n_request_ops, &h), 0);
        CHECK_STR_EQ(hget(&h, "x-level"), "route");
        wp_headers_done(&h);
        wp_headers_init(&h);
        CHECK_INT_EQ(wp_route_headers_apply(res.response_ops, res.n_response_ops, &h), 0);
        CHECK_STR_EQ(hget(&h, "x-resp"), "route");
        wp_headers_done(&h);
        wp_route_table_free(t);
}

static void test_overwrite_if_exists_sees_state_before_overwrites(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/'},'route':{'cluster':'c'},'request_headers_to_add':["
                "{'header':{'key':'k','value':'a'},'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'},"
                "{'header':{'key':'k','value':'b'},'append_action':'OVERWRITE_IF_EXISTS'}]}"));
        struct wp_headers h;

        GET(t, "/");
        wp_headers_init(&h);
        CHECK_INT_EQ(wp_route_headers_apply(res.request_ops, res.n_request_ops, &h), 0);
        CHECK_STR_EQ(hget(&h, "k"), "a");
        wp_headers_done(&h);
        wp_route_table_free(t);
}

/* ---- timeouts, retries, mirrors, hash policies, per-filter configs ---------------------- */

static void test_timeouts(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'path':'/default'},'route':{'cluster':'c'}},"
                "{'match':{'path':'/zero'},'route':{'cluster':'c','timeout':'0s'}},"
                "{'match':{'path':'/three'},'route':{'cluster':'c','timeout':'3s','idle_timeout':"
                "'1.5s','max_grpc_timeout':'0s'}},"
                "{'match':{'path':'/tiny'},'route':{'cluster':'c','timeout':'0.0001s'}}"));

        GET(t, "/default");
        CHECK_INT_EQ(res.timeout_ms, 15000);
        CHECK(!res.has_max_grpc_timeout);
        GET(t, "/zero");
        CHECK_INT_EQ(res.timeout_ms, 0);
        GET(t, "/three");
        CHECK_INT_EQ(res.timeout_ms, 3000);
        CHECK_INT_EQ(res.idle_timeout_ms, 1500);
        CHECK(res.has_max_grpc_timeout);
        CHECK_INT_EQ(res.max_grpc_timeout_ms, 0);
        GET(t, "/tiny");
        CHECK_INT_EQ(res.timeout_ms, 1);
        wp_route_table_free(t);
}

static void test_retry_policy(void)
{
        struct wp_route_table *t = table(
            "{'virtual_hosts':[{'name':'v','domains':['*'],'retry_policy':{'retry_on':'5xx',"
            "'num_retries':7},'routes':["
            "{'match':{'path':'/r'},'route':{'cluster':'c','retry_policy':{"
            "'retry_on':'5xx, gateway-error,reset,connect-failure,retriable-4xx,refused-stream,"
            "retriable-status-codes,unavailable,cancelled,deadline-exceeded,internal,"
            "resource-exhausted,no-such-thing',"
            "'per_try_timeout':'0.25s','retry_back_off':{'base_interval':'0.1s'},"
            "'retriable_status_codes':[503,409],'host_selection_retry_max_attempts':'5',"
            "'retry_host_predicate':[{'name':'envoy.retry_host_predicates.previous_hosts',"
            "'typed_config':{'@type':'type.googleapis.com/envoy.extensions.retry.host."
            "previous_hosts.v3.PreviousHostsPredicate'}}]}}},"
            "{'match':{'path':'/d'},'route':{'cluster':'c','retry_policy':{'retry_on':'reset'}}},"
            "{'match':{'path':'/b'},'route':{'cluster':'c','retry_policy':{'retry_on':'reset',"
            "'retry_back_off':{'base_interval':'0.01s','max_interval':'2s'}}}},"
            "{'match':{'path':'/v'},'route':{'cluster':'c'}}]}]}");
        const struct wp_route_retry *r;

        GET(t, "/r");
        REQUIRE((r = res.retry) != NULL);
        CHECK_INT_EQ(r->retry_on, WP_RETRY_5XX | WP_RETRY_GATEWAY_ERROR | WP_RETRY_RESET |
                                      WP_RETRY_CONNECT_FAILURE | WP_RETRY_RETRIABLE_4XX |
                                      WP_RETRY_REFUSED_STREAM | WP_RETRY_RETRIABLE_STATUS_CODES |
                                      WP_RETRY_GRPC_UNAVAILABLE | WP_RETRY_GRPC_CANCELLED |
                                      WP_RETRY_GRPC_DEADLINE_EXCEEDED | WP_RETRY_GRPC_INTERNAL |
                                      WP_RETRY_GRPC_RESOURCE_EXHAUSTED);
        CHECK_INT_EQ(r->num_retries, 1);
        CHECK_INT_EQ(r->per_try_timeout_ms, 250);
        CHECK_INT_EQ(r->backoff_base_ms, 100);
        CHECK_INT_EQ(r->backoff_max_ms, 1000);
        REQUIRE(r->n_retriable_status_codes == 2);
        CHECK_INT_EQ(r->retriable_status_codes[0], 503);
        CHECK_INT_EQ(r->retriable_status_codes[1], 409);
        CHECK_INT_EQ(r->host_selection_max_attempts, 5);
        CHECK(r->previous_hosts);
        GET(t, "/d");
        REQUIRE((r = res.retry) != NULL);
        CHECK_INT_EQ(r->retry_on, WP_RETRY_RESET);
        CHECK_INT_EQ(r->num_retries, 1);
        CHECK_INT_EQ(r->backoff_base_ms, 25);
        CHECK_INT_EQ(r->backoff_max_ms, 250);
        CHECK_INT_EQ(r->host_selection_max_attempts, 1);
        CHECK(!r->previous_hosts);
        GET(t, "/b");
        CHECK_INT_EQ(res.retry->backoff_base_ms, 10);
        CHECK_INT_EQ(res.retry->backoff_max_ms, 2000);
        GET(t, "/v"); /* no route policy: the virtual host's */
        REQUIRE((r = res.retry) != NULL);
        CHECK_INT_EQ(r->retry_on, WP_RETRY_5XX);
        CHECK_INT_EQ(r->num_retries, 7);
        wp_route_table_free(t);
}

static void test_mirror_and_hash_policies(void)
{
        struct wp_route_table *t = table(
            vh1("{'match':{'prefix':'/'},'route':{'cluster':'c','request_mirror_policies':["
                "{'cluster':'shadow','runtime_fraction':{'default_value':{'numerator':10,"
                "'denominator':'TEN_THOUSAND'}}},{'cluster':'all'}],"
                "'hash_policy':[{'header':{'header_name':'X-User'}},{'cookie':{'name':'sess',"
                "'ttl':'60s','path':'/'},'terminal':true},{'connection_properties':{'source_ip':"
                "true}},{'query_parameter':{'name':'id'}}]}}"));
        unsigned sampled = 0;

        GET(t, "/");
        REQUIRE(res.n_mirrors == 2);
        CHECK_STR_EQ(res.mirrors[0].cluster, "shadow");
        CHECK_INT_EQ(res.mirrors[0].numerator, 10);
        CHECK_INT_EQ(res.mirrors[0].denominator, 10000);
        CHECK_STR_EQ(res.mirrors[1].cluster, "all");
        CHECK_INT_EQ(res.mirrors[1].numerator, 100);
        for (uint64_t i = 0; i < 10000; i++)
                sampled += wp_route_mirror_sampled(&res.mirrors[0], i);
        CHECK_INT_EQ(sampled, 10);
        CHECK(wp_route_mirror_sampled(&res.mirrors[1], 12345));
        REQUIRE(res.n_hash_policies == 4);
        CHECK_INT_EQ(res.hash_policies[0].kind, WP_ROUTE_HASH_HEADER);
        CHECK_STR_EQ(res.hash_policies[0].name, "x-user");
        CHECK_INT_EQ(res.hash_policies[1].kind, WP_ROUTE_HASH_COOKIE);
        CHECK_STR_EQ(res.hash_policies[1].name, "sess");
        CHECK(res.hash_policies[1].terminal && res.hash_policies[1].cookie_has_ttl);
        CHECK_INT_EQ(res.hash_policies[1].cookie_ttl_ms, 60000);
        CHECK_STR_EQ(res.hash_policies[1].cookie_path, "/");
        CHECK_INT_EQ(res.hash_policies[2].kind, WP_ROUTE_HASH_SOURCE_IP);
        CHECK_INT_EQ(res.hash_policies[3].kind, WP_ROUTE_HASH_QUERY_PARAMETER);
        CHECK_STR_EQ(res.hash_policies[3].name, "id");
        wp_route_table_free(t);
}

static int count_fc;
static int on_fc(struct wp_route_filter_config *fc, void *user)
{
        (void)user;
        count_fc++;
        fc->conf = malloc(8);
        fc->conf_free = free;
        return 0;
}

static void test_typed_per_filter_config_most_specific_wins(void)
{
        struct wp_route_table *t =
            table("{'typed_per_filter_config':{'f.a':{'@type':'type.googleapis.com/google.protobuf."
                  "Empty'},'f.b':{'@type':'type.googleapis.com/google.protobuf.Empty'}},"
                  "'virtual_hosts':[{'name':'v','domains':['*'],'typed_per_filter_config':{'f.b':"
                  "{'@type':'type.googleapis.com/google.protobuf.Duration','value':'1s'}},"
                  "'routes':[{'match':{'prefix':'/r'},'route':{'cluster':'c'},"
                  "'typed_per_filter_config':{'f.a':{'@type':'type.googleapis.com/google.protobuf."
                  "Duration','value':'2s'}}},{'match':{'prefix':'/'},'route':{'cluster':'c'}}]}]}");
        const struct wp_route_filter_config *fc;

        GET(t, "/r");
        CHECK_INT_EQ(res.n_filter_configs, 3);
        REQUIRE((fc = wp_route_result_filter_config(&res, "f.a")) != NULL);
        CHECK_STR_EQ(fc->type_url, "type.googleapis.com/google.protobuf.Duration");
        CHECK_INT_EQ(fc->value_len, 2); /* seconds: 2 */
        REQUIRE((fc = wp_route_result_filter_config(&res, "f.b")) != NULL);
        CHECK_STR_EQ(fc->type_url, "type.googleapis.com/google.protobuf.Duration");
        CHECK(wp_route_result_filter_config(&res, "f.c") == NULL);
        GET(t, "/x");
        REQUIRE((fc = wp_route_result_filter_config(&res, "f.a")) != NULL);
        CHECK_STR_EQ(fc->type_url, "type.googleapis.com/google.protobuf.Empty");
        CHECK_INT_EQ(fc->value_len, 0);
        CHECK_INT_EQ(wp_route_table_foreach_filter_config(t, on_fc, NULL), 0);
        CHECK_INT_EQ(count_fc, 4);
        wp_route_table_free(t); /* frees the confs (ASan checks) */
}

/* ---- the istiod fixture ------------------------------------------------------------------ */

static struct xds_resources *fixture;

static struct wp_route_table *fixture_table(const char *rc_name)
{
        for (size_t i = 0; i < fixture->listeners.n; i++) {
                Envoy__Config__Listener__V3__Listener *l =
                    (Envoy__Config__Listener__V3__Listener *)fixture->listeners.items[i].msg;

                for (size_t j = 0; j < l->n_filter_chains; j++)
                        for (size_t k = 0; k < l->filter_chains[j]->n_filters; k++) {
                                Envoy__Config__Listener__V3__Filter *f =
                                    l->filter_chains[j]->filters[k];
                                ProtobufCMessage *m = NULL;
                                const char *err;
                                struct wp_route_table *t = NULL;

                                if (f->config_type_case !=
                                        ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG ||
                                    xds_any_unpack(
                                        f->typed_config,
                                        &envoy__extensions__filters__network__http_connection_manager__v3__http_connection_manager__descriptor,
                                        &m, &err) < 0)
                                        continue;
                                Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager
                                    *hcm = (void *)m;
                                if (hcm->route_specifier_case ==
                                        ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_ROUTE_CONFIG &&
                                    strcmp(hcm->route_config->name, rc_name) == 0) {
                                        int r = wp_route_table_new(hcm->route_config, &t, &err);
                                        if (r < 0)
                                                fprintf(stderr, "%s: %s\n", rc_name, err);
                                }
                                xds_pbjson_message_free(m);
                                if (t)
                                        return t;
                        }
        }
        return NULL;
}

static void test_fixture_every_route_config_compiles(void)
{
        static const char *const names[] = {
            "default",
            "inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local",
            "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local",
            "inbound-vip|9080|http|reviews-v1.bookinfo.svc.cluster.local",
            "inbound-vip|9080|http|reviews-v3.bookinfo.svc.cluster.local",
            "inbound-vip|9080|http|ratings.bookinfo.svc.cluster.local",
            "inbound-vip|8080|http|legacy.bookinfo.svc.cluster.local",
            "encap",
        };

        for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
                struct wp_route_table *t = fixture_table(names[i]);

                CHECK(t != NULL);
                if (t)
                        CHECK_STR_EQ(wp_route_table_name(t), names[i]);
                wp_route_table_free(t);
        }
}

static void test_fixture_reviews_routes(void)
{
        struct wp_route_table *t =
            fixture_table("inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local");
        struct wp_http_request req = {.method = "GET",
                                      .scheme = "http",
                                      .authority = "reviews.bookinfo.svc.cluster.local:9080",
                                      .path = "/reviews/0"};
        unsigned v1 = 0, v3 = 0;
        uint64_t seed = 42;

        REQUIRE(t != NULL);
        wp_headers_init(&req.headers);
        for (int i = 0; i < 10000; i++) {
                wp_route_result_init(&res, rbuf, sizeof(rbuf));
                REQUIRE(wp_route_match(t, &req, xorshift(&seed), &res) == 0);
                REQUIRE(res.action == WP_ROUTE_ACTION_CLUSTER);
                if (strcmp(res.cluster,
                           "inbound-vip|9080|http|reviews-v1.bookinfo.svc.cluster.local") == 0)
                        v1++;
                else if (strcmp(res.cluster,
                                "inbound-vip|9080|http|reviews-v3.bookinfo.svc.cluster.local") == 0)
                        v3++;
        }
        CHECK(v1 > 9000 - 150 && v1 < 9000 + 150);
        CHECK_INT_EQ(v1 + v3, 10000);
        CHECK_STR_EQ(res.route_name, "bookinfo.reviews.1");
        CHECK_INT_EQ(res.timeout_ms, 3000);
        CHECK(res.has_max_grpc_timeout);
        CHECK_INT_EQ(res.max_grpc_timeout_ms, 3000);
        CHECK_INT_EQ(res.cluster_not_found_status, 500);
        REQUIRE(res.retry != NULL);
        CHECK_INT_EQ(res.retry->num_retries, 2);
        CHECK_INT_EQ(res.retry->retry_on, WP_RETRY_CONNECT_FAILURE | WP_RETRY_REFUSED_STREAM |
                                              WP_RETRY_GRPC_UNAVAILABLE | WP_RETRY_GRPC_CANCELLED |
                                              WP_RETRY_RETRIABLE_STATUS_CODES);
        CHECK_INT_EQ(res.retry->host_selection_max_attempts, 5);
        CHECK(res.retry->previous_hosts);

        /* /reviews* is listed first, so it wins even for jason; elsewhere jason gets v3 */
        go(t, "GET", "reviews:9080", "/reviews", "end-user", "jason", NULL);
        CHECK_STR_EQ(res.route_name, "bookinfo.reviews.1");
        CHECK_STR_EQ(go(t, "GET", "reviews:9080", "/health", "end-user", "jason", NULL),
                     "inbound-vip|9080|http|reviews-v3.bookinfo.svc.cluster.local");
        CHECK_STR_EQ(res.route_name, "bookinfo.reviews.0");
        CHECK_INT_EQ(res.timeout_ms, 0);
        CHECK_STR_EQ(go(t, "GET", "reviews:9080", "/health", "end-user", "mike", NULL),
                     "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local");
        CHECK_STR_EQ(go(t, "GET", "reviews:9080", "/reviewsx", NULL),
                     "inbound-vip|9080|http|reviews.bookinfo.svc.cluster.local");
        wp_route_table_free(t);
}

static void test_fixture_productpage_redirect_and_header(void)
{
        struct wp_route_table *t =
            fixture_table("inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local");
        struct wp_headers h;

        REQUIRE(t != NULL);
        CHECK_STR_EQ(go(t, "GET", "productpage.bookinfo.svc.cluster.local:9080", "/", NULL),
                     "REDIRECT 302 http://productpage.bookinfo.svc.cluster.local:9080/productpage");
        CHECK_STR_EQ(go(t, "GET", "productpage", "/?x=1", NULL),
                     "REDIRECT 302 http://productpage:9080/productpage?x=1");
        CHECK_STR_EQ(go(t, "GET", "productpage:9080", "/productpage", NULL),
                     "inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local");
        CHECK_INT_EQ(res.timeout_ms, 0);
        REQUIRE(res.n_response_ops == 1);
        wp_headers_init(&h);
        wp_headers_add(&h, "x-served-by", 11, "app", 3);
        CHECK_INT_EQ(wp_route_headers_apply(res.response_ops, res.n_response_ops, &h), 0);
        CHECK_STR_EQ(hget(&h, "x-served-by"), "bookinfo-waypoint");
        wp_headers_done(&h);
        wp_route_table_free(t);
}

/* ---- compile errors --------------------------------------------------------------------- */

struct neg_case {
        const char *cfg; /* a full RouteConfiguration, or routes for vh1() when it starts with
                            "R:" */
        int err;
        const char *msg;
};

static void test_compile_errors_name_the_field(void)
{
        static const struct neg_case cases[] = {
            {"R:{'match':{'safe_regex':{'regex':'(a'}},'route':{'cluster':'c'}}", -EINVAL,
             "virtual_hosts[0].routes[0].match.safe_regex: invalid regex: missing ): (a"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c'}},"
             "{'match':{'prefix':'/','headers':[{'name':'x','safe_regex_match':{'regex':'['}}]},"
             "'route':{'cluster':'c'}}",
             -EINVAL,
             "virtual_hosts[0].routes[1].match.headers[0].safe_regex_match: invalid regex: "
             "missing ]: ["},
            {"R:{'match':{'safe_regex':{'google_re2':{'max_program_size':5},'regex':"
             "'[a-z]+[0-9]+x'}},'route':{'cluster':'c'}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].match.safe_regex: invalid regex: regex program "
             "size"},
            {"R:{'route':{'cluster':'c'}}", -EINVAL, "virtual_hosts[0].routes[0]: match: required"},
            {"R:{'match':{},'route':{'cluster':'c'}}", -EINVAL,
             "virtual_hosts[0].routes[0].match: path_specifier: one of prefix, path, safe_regex, "
             "path_separated_prefix or connect_matcher is required"},
            {"R:{'match':{'path_separated_prefix':'/a/'},'route':{'cluster':'c'}}", -EINVAL,
             "virtual_hosts[0].routes[0].match: path_separated_prefix: must be non-empty, "
             "without ? or #, and not end in /: \"/a/\""},
            {"R:{'match':{'path_separated_prefix':'/a?b'},'route':{'cluster':'c'}}", -EINVAL,
             "virtual_hosts[0].routes[0].match: path_separated_prefix: must be non-empty"},
            {"R:{'match':{'prefix':'/'}}", -EINVAL,
             "virtual_hosts[0].routes[0]: action: one of route, redirect, direct_response or "
             "non_forwarding_action is required"},
            {"R:{'match':{'prefix':'/'},'route':{}}", -EINVAL,
             "virtual_hosts[0].routes[0].route: cluster_specifier: one of cluster, "
             "cluster_header or weighted_clusters is required"},
            {"R:{'match':{'prefix':'/'},'route':{'weighted_clusters':{'clusters':[]}}}", -EINVAL,
             "virtual_hosts[0].routes[0].route.weighted_clusters: clusters: at least one cluster "
             "is required"},
            {"R:{'match':{'prefix':'/'},'route':{'weighted_clusters':{'clusters':[{'name':'a',"
             "'weight':0}]}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.weighted_clusters: clusters: the sum of the weights "
             "must be above 0"},
            {"R:{'match':{'prefix':'/'},'route':{'weighted_clusters':{'total_weight':100,"
             "'clusters':[{'name':'a','weight':60},{'name':'b','weight':30}]}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.weighted_clusters: total_weight: 100 differs from "
             "the sum of the weights 90"},
            {"R:{'match':{'prefix':'/'},'route':{'weighted_clusters':{'clusters':[{'weight':1}]}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.weighted_clusters.clusters[0]: name or "
             "cluster_header is required"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','prefix_rewrite':'/a',"
             "'regex_rewrite':{'pattern':{'regex':'a'},'substitution':'b'}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route: only one of prefix_rewrite and regex_rewrite may "
             "be set"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','regex_rewrite':{'pattern':"
             "{'regex':'(a)'},'substitution':'\\\\2'}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.regex_rewrite: substitution: invalid rewrite: \\2 "
             "refers to a group the regex does not have (1 groups)"},
            {"R:{'match':{'prefix':'/'},'direct_response':{'status':99}}", -EINVAL,
             "virtual_hosts[0].routes[0].direct_response: status: 99 is not in [200, 600)"},
            {"R:{'match':{'prefix':'/'},'direct_response':{'status':200,'body':{'filename':"
             "'/etc/passwd'}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].direct_response: body.filename: not supported (inline "
             "the body)"},
            {"{'max_direct_response_body_size_bytes':4,'virtual_hosts':[{'name':'v','domains':"
             "['*'],'routes':[{'match':{'prefix':'/'},'direct_response':{'status':200,'body':"
             "{'inline_string':'hello'}}}]}]}",
             -EINVAL,
             "virtual_hosts[0].routes[0].direct_response: body: 5 bytes exceed "
             "max_direct_response_body_size_bytes (4)"},
            {"R:{'match':{'prefix':'/','headers':[{'name':''}]},'route':{'cluster':'c'}}", -EINVAL,
             "virtual_hosts[0].routes[0].match.headers[0]: name: invalid header name \"\""},
            {"R:{'match':{'prefix':'/','headers':[{'name':'x','string_match':{'prefix':''}}]},"
             "'route':{'cluster':'c'}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].match.headers[0].string_match: prefix: must not be "
             "empty"},
            {"R:{'match':{'prefix':'/','query_parameters':[{'name':''}]},'route':{'cluster':'c'}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].match.query_parameters[0]: name: must not be "
             "empty"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c'},'request_headers_to_add':["
             "{'header':{'key':':path','value':'/x'}}]}",
             -EINVAL,
             "virtual_hosts[0].routes[0].request_headers_to_add[0]: header.key: :path may not be "
             "modified"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c'},'request_headers_to_remove':"
             "['Host']}",
             -EINVAL,
             "virtual_hosts[0].routes[0].request_headers_to_remove[0]: host may not be "
             "removed"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c'},'response_headers_to_add':["
             "{'header':{'key':'x-ip','value':'%DOWNSTREAM_REMOTE_ADDRESS%'}}]}",
             -EINVAL,
             "virtual_hosts[0].routes[0].response_headers_to_add[0]: header.value: header "
             "formatters (%...%) are not supported: %DOWNSTREAM_REMOTE_ADDRESS%"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c'},'request_headers_to_add':["
             "{'header':{'key':'x','value':'v'},'append':true,'append_action':'ADD_IF_ABSENT'}]}",
             -EINVAL,
             "virtual_hosts[0].routes[0].request_headers_to_add[0]: append and append_action are "
             "mutually exclusive"},
            {"{'virtual_hosts':[{'name':'a','domains':['*']},{'name':'b','domains':['*']}]}",
             -EINVAL, "virtual_hosts[1].domains[0]: only one virtual host may have the domain *"},
            {"{'virtual_hosts':[{'name':'a','domains':['Foo.com']},{'name':'b','domains':"
             "['x','foo.COM']}]}",
             -EINVAL, "virtual_hosts[1].domains[1]: duplicate domain foo.COM"},
            {"{'virtual_hosts':[{'name':'a','domains':['*.a.com','*.A.com']}]}", -EINVAL,
             "virtual_hosts[0].domains[1]: duplicate domain *.A.com"},
            {"{'virtual_hosts':[{'name':'a','domains':['']}]}", -EINVAL,
             "virtual_hosts[0].domains[0]: empty domain"},
            {"{'virtual_hosts':[{'name':'a','domains':[]}]}", -EINVAL,
             "virtual_hosts[0]: domains: at least one domain is required"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','retry_policy':{'retry_on':'5xx',"
             "'retry_host_predicate':[{'name':'envoy.retry_host_predicates.omit_canary_hosts'}]}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.retry_policy.retry_host_predicate[0]: retry host "
             "predicate envoy.retry_host_predicates.omit_canary_hosts is not supported"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','retry_policy':{"
             "'retry_back_off':{'base_interval':'1s','max_interval':'0.5s'}}}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.retry_policy: retry_back_off.max_interval: must "
             "not be below base_interval"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','hash_policy':[{'filter_state':"
             "{'key':'k'}}]}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.hash_policy[0]: filter_state: not "
             "supported"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','metadata_match':{}}}", -EINVAL,
             "virtual_hosts[0].routes[0].route: metadata_match: subset load balancing is not "
             "supported"},
            {"R:{'match':{'prefix':'/','dynamic_metadata':[{'filter':'f'}]},'route':{'cluster':"
             "'c'}}",
             -EINVAL, "virtual_hosts[0].routes[0].match: dynamic_metadata: not supported"},
            {"R:{'match':{'prefix':'/'},'redirect':{'port_redirect':70000}}", -EINVAL,
             "virtual_hosts[0].routes[0].redirect: port_redirect: 70000 is not a port"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','timeout':'-1s'}}", -EINVAL,
             "virtual_hosts[0].routes[0].route: timeout: invalid duration"},
            {"{'internal_only_headers':['x-internal'],'virtual_hosts':[]}", -EINVAL,
             "internal_only_headers: not supported"},
            {"R:{'match':{'prefix':'/','headers':[{'name':'x','range_match':{'start':'5',"
             "'end':'5'}}]},'route':{'cluster':'c'}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].match.headers[0]: range_match: start must be "
             "below end"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','request_mirror_policies':[{}]}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.request_mirror_policies[0]: cluster or "
             "cluster_header is required"},
            {"R:{'match':{'prefix':'/'},'route':{'cluster':'c','request_mirror_policies':[{"
             "'cluster_header':'bad header'}]}}",
             -EINVAL,
             "virtual_hosts[0].routes[0].route.request_mirror_policies[0]: cluster_header: "
             "invalid header name"},
        };
        char cfg[8192];

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                const char *c = cases[i].cfg;
                const char *e;
                int r = 0;

                if (strncmp(c, "R:", 2) == 0)
                        c = vh1(c + 2);
                snprintf(cfg, sizeof(cfg), "%s", c);
                e = compile_error(cfg, &r);
                if (!e) {
                        fprintf(stderr, "case %zu compiled: %s\n", i, cfg);
                        CHECK(e != NULL);
                        continue;
                }
                CHECK_INT_EQ(r, cases[i].err);
                if (strncmp(e, cases[i].msg, strlen(cases[i].msg)) != 0) {
                        fprintf(stderr, "case %zu:\n  got  %s\n  want %s\n", i, e, cases[i].msg);
                        CHECK(!"error message");
                }
        }
}

static void test_unknown_protobuf_fields_are_rejected(void)
{
        Envoy__Config__Route__V3__RouteConfiguration *rc =
            rc_from_json(vh1("{'match':{'prefix':'/'},'route':{'cluster':'c'}}"));
        uint8_t buf[1024];
        size_t n = protobuf_c_message_get_packed_size(&rc->base);
        ProtobufCMessage *m = NULL;
        struct wp_route_table *t = NULL;
        const char *err;

        REQUIRE(n + 3 <= sizeof(buf));
        protobuf_c_message_pack(&rc->base, buf);
        xds_pbjson_message_free(&rc->base);
        /* field 99, varint 1 */
        buf[n++] = 0x98;
        buf[n++] = 0x06;
        buf[n++] = 0x01;
        REQUIRE(xds_pb_unpack(&envoy__config__route__v3__route_configuration__descriptor, buf, n,
                              &m, &err) == 0);
        CHECK_INT_EQ(wp_route_table_new((void *)m, &t, &err), -EINVAL);
        CHECK_STR_EQ(err, "field number 99 of envoy.config.route.v3.RouteConfiguration is not "
                          "supported");
        CHECK(t == NULL);
        xds_pbjson_message_free(m);
}

static void test_limits(void)
{
        static char cfg[65536];
        size_t n = 0;
        int r;
        const char *e;

        n += (size_t)snprintf(cfg + n, sizeof(cfg) - n,
                              "{'virtual_hosts':[{'name':'v','domains':['*'],'routes':[{'match':"
                              "{'prefix':'/','headers':[");
        for (int i = 0; i <= WP_ROUTE_MAX_MATCHERS; i++)
                n +=
                    (size_t)snprintf(cfg + n, sizeof(cfg) - n, "%s{'name':'h%d'}", i ? "," : "", i);
        snprintf(cfg + n, sizeof(cfg) - n, "]},'route':{'cluster':'c'}}]}]}");
        e = compile_error(cfg, &r);
        CHECK_INT_EQ(r, -E2BIG);
        CHECK_STR_EQ(e, "virtual_hosts[0].routes[0].match: more than 64 header and query "
                        "parameter matchers");
}

/* A route whose action has n copies of item in its array field key; NULL when it compiles. */
static const char *route_with_n(const char *key, const char *item, int n, int *ret_r)
{
        static char cfg[65536];
        size_t len = 0;

        len += (size_t)snprintf(cfg + len, sizeof(cfg) - len,
                                "{'virtual_hosts':[{'name':'v','domains':['*'],'routes':[{'match':"
                                "{'prefix':'/'},'route':{'cluster':'c','%s':[",
                                key);
        for (int i = 0; i < n; i++)
                len += (size_t)snprintf(cfg + len, sizeof(cfg) - len, "%s%s", i ? "," : "", item);
        if (len >= sizeof(cfg))
                exit(99);
        snprintf(cfg + len, sizeof(cfg) - len, "]}}]}]}");
        return compile_error(cfg, ret_r);
}

static void test_route_action_array_limits(void)
{
        static const struct {
                const char *key, *item;
                int max;
                const char *err;
        } cases[] = {
            {"hash_policy", "{'connection_properties':{'source_ip':true}}", 64,
             "virtual_hosts[0].routes[0].route: hash_policy: more than 64 entries"},
            {"request_mirror_policies", "{'cluster':'m'}", 16,
             "virtual_hosts[0].routes[0].route: request_mirror_policies: more than 16 entries"},
            {"upgrade_configs", "{'upgrade_type':'websocket'}", 16,
             "virtual_hosts[0].routes[0].route: upgrade_configs: more than 16 entries"},
        };
        int r;

        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                CHECK(route_with_n(cases[i].key, cases[i].item, cases[i].max, NULL) == NULL);
                CHECK_STR_EQ(route_with_n(cases[i].key, cases[i].item, cases[i].max + 1, &r),
                             cases[i].err);
                CHECK_INT_EQ(r, -E2BIG);
        }
}

/* ---- re2 shim ----------------------------------------------------------------------------- */

static void test_re2_shim_replace_all_like_global_replace(void)
{
        struct wp_re2 *re = NULL;
        char out[64], err[128];

        REQUIRE(wp_re2_new("b*", 2, 0, &re, err, sizeof(err)) == 0);
        /* RE2::GlobalReplace("abc", "b*", "x") is "xaxcx" (no empty match right after one) */
        CHECK_INT_EQ(wp_re2_replace_all(re, "abc", 3, "x", 1, out, sizeof(out)), 5);
        CHECK_STR_EQ(out, "xaxcx");
        CHECK_INT_EQ(wp_re2_replace_all(re, "abc", 3, "x", 1, out, 5), -ENOSPC);
        re = wp_re2_free(re);
        REQUIRE(wp_re2_new("(o+)", 4, 0, &re, err, sizeof(err)) == 0);
        CHECK_INT_EQ(wp_re2_replace_all(re, "foo boo", 7, "<\\1\\\\>", 6, out, sizeof(out)), 13);
        CHECK_STR_EQ(out, "f<oo\\> b<oo\\>");
        CHECK_INT_EQ(wp_re2_replace_all(re, "xyz", 3, "-", 1, out, sizeof(out)), 3);
        CHECK_STR_EQ(out, "xyz");
        CHECK_INT_EQ(wp_re2_check_rewrite(re, "\\1", 2, err, sizeof(err)), 0);
        CHECK_INT_EQ(wp_re2_check_rewrite(re, "\\x", 2, err, sizeof(err)), -EINVAL);
        CHECK_INT_EQ(wp_re2_check_rewrite(re, "a\\", 2, err, sizeof(err)), -EINVAL);
        CHECK(wp_re2_full_match(re, "ooo", 3));
        CHECK(!wp_re2_full_match(re, "oox", 3));
        re = wp_re2_free(re);
        CHECK_INT_EQ(wp_re2_new("(", 1, 0, &re, err, sizeof(err)), -EINVAL);
        CHECK_STR_EQ(err, "missing ): (");
        CHECK(wp_re2_free(NULL) == NULL);
}

/* ---- failalloc -------------------------------------------------------------------------- */

static Envoy__Config__Route__V3__RouteConfiguration *rich;

static int compile_rich(void *arg)
{
        struct wp_route_table *t = NULL;
        const char *err;
        int r;

        (void)arg;
        r = wp_route_table_new(rich, &t, &err);
        if (r < 0)
                return r == -ENOMEM ? r : 1; /* any other error is a test failure */
        wp_route_table_free(t);
        return 0;
}

static void test_compile_failalloc(void)
{
        char cfg[8192];
        unsigned points;

        snprintf(cfg, sizeof(cfg), mutation_cfg,
                 "'typed_per_filter_config':{'f':{'@type':"
                 "'type.googleapis.com/google.protobuf.Empty'}},");
        rich = rc_from_json(cfg);
        points = check_failalloc_run(compile_rich, NULL);
        CHECK(points >= 1);
        xds_pbjson_message_free(&rich->base);

        rich = rc_from_json(
            "{'name':'rich','virtual_hosts':["
            "{'name':'a','domains':['a.com','*.a.com','a.*','x.y'],'retry_policy':{'retry_on':"
            "'5xx'},'routes':["
            "{'name':'r0','match':{'safe_regex':{'regex':'/[a-z]+'},'headers':[{'name':'x',"
            "'string_match':{'safe_regex':{'regex':'v.*'}}}],'query_parameters':[{'name':'q',"
            "'string_match':{'exact':'1'}}]},'route':{'weighted_clusters':{'clusters':[{'name':"
            "'w1','weight':1,'typed_per_filter_config':{'f':{'@type':'type.googleapis.com/"
            "google.protobuf.Empty'}}},{'name':'w2','weight':2}]},'regex_rewrite':{'pattern':"
            "{'regex':'(.*)'},'substitution':'/x\\\\1'},'hash_policy':[{'header':{'header_name':"
            "'h'}}],'request_mirror_policies':[{'cluster':'m'}],'upgrade_configs':[{"
            "'upgrade_type':'websocket'}],'retry_policy':{'retry_on':'reset',"
            "'retriable_status_codes':[503]}}},"
            "{'match':{'prefix':'/r'},'redirect':{'host_redirect':'h','regex_rewrite':{"
            "'pattern':{'regex':'a'},'substitution':'b'}}},"
            "{'match':{'path':'/d'},'direct_response':{'status':200,'body':{'inline_string':"
            "'ok'}}}]},"
            "{'name':'b','domains':['*'],'routes':[]}]}");
        points = check_failalloc_run(compile_rich, NULL);
        CHECK(points >= 1);
        xds_pbjson_message_free(&rich->base);
}

static void test_headers_apply_failalloc(void)
{
        struct wp_route_table *t =
            table(vh1("{'match':{'prefix':'/'},'route':{'cluster':'c'},'request_headers_to_add':["
                      "{'header':{'key':'a','value':'1'}},{'header':{'key':'b','value':'2'},"
                      "'append_action':'OVERWRITE_IF_EXISTS_OR_ADD'}]}"));
        struct wp_headers h;

        GET(t, "/");
        wp_headers_init(&h);
        wp_alloc_fail_at(1);
        CHECK_INT_EQ(wp_route_headers_apply(res.request_ops, res.n_request_ops, &h), -ENOMEM);
        wp_alloc_fail_at(0);
        wp_headers_done(&h);
        wp_route_table_free(t);
}

int main(void)
{
        const char *err;
        char path[4096];
        const char *dir = getenv("WP_TEST_SRCDIR");

        snprintf(path, sizeof(path), "%s/data/istiod-waypoint-bookinfo.json", dir ? dir : "tests");
        if (xds_resources_load_file(path, &fixture, &err) < 0) {
                fprintf(stderr, "fixture: %s\n", err);
                return 99;
        }
        RUN(test_prefix_matches_whole_path_including_query);
        RUN(test_path_separated_prefix_requires_segment_boundary);
        RUN(test_exact_path_ignores_query_string);
        RUN(test_case_insensitive_prefix_and_path);
        RUN(test_safe_regex_is_a_full_match_on_path_without_query);
        RUN(test_first_matching_route_wins);
        RUN(test_connect_matcher_matches_only_connect);
        RUN(test_header_matchers);
        RUN(test_header_presence_absence_and_missing_semantics);
        RUN(test_repeated_header_is_matched_joined_with_commas);
        RUN(test_method_and_pseudo_headers);
        RUN(test_query_parameter_matchers);
        RUN(test_grpc_and_runtime_fraction_matchers);
        RUN(test_virtual_host_selection_order);
        RUN(test_host_port_is_tried_with_then_without);
        RUN(test_no_virtual_host_or_route_is_nr);
        RUN(test_weighted_clusters_distribution);
        RUN(test_weighted_clusters_random_header_and_per_cluster_settings);
        RUN(test_cluster_header_action);
        RUN(test_redirects_produce_exact_locations);
        RUN(test_redirect_too_long_for_buffer_is_enospc);
        RUN(test_require_tls_redirects_to_https);
        RUN(test_route_rewrites);
        RUN(test_direct_responses);
        RUN(test_non_forwarding_action);
        RUN(test_header_mutation_precedence);
        RUN(test_overwrite_if_exists_sees_state_before_overwrites);
        RUN(test_timeouts);
        RUN(test_retry_policy);
        RUN(test_mirror_and_hash_policies);
        RUN(test_typed_per_filter_config_most_specific_wins);
        RUN(test_fixture_every_route_config_compiles);
        RUN(test_fixture_reviews_routes);
        RUN(test_fixture_productpage_redirect_and_header);
        RUN(test_compile_errors_name_the_field);
        RUN(test_unknown_protobuf_fields_are_rejected);
        RUN(test_limits);
        RUN(test_route_action_array_limits);
        RUN(test_re2_shim_replace_all_like_global_replace);
        RUN(test_compile_failalloc);
        RUN(test_headers_apply_failalloc);
        xds_resources_free(fixture);
        return check_exit();
}
