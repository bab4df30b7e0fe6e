/* Tests for filters/rbac.c: compiling Envoy RBAC configs and evaluating them. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "filters/filter.h"
#include "filters/rbac.h"
#include "waypoint/base/alloc.h"
#include "xds-client/resources.h"

#define FIXTURE "data/istiod-waypoint-bookinfo.json"
#define INGRESS "spiffe://cluster.local/ns/istio-ingress/sa/ingress-gateway"
#define PRODUCT "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
#define JWT     "envoy.filters.http.jwt_authn" FLT_RBAC_META_SEP "payload" FLT_RBAC_META_SEP

/* ---- helpers ---- */

static char last_err[1024];

static ProtobufCMessage *decode(const ProtobufCMessageDescriptor *d, const char *json)
{
        struct json_object *obj = NULL;
        ProtobufCMessage *m = NULL;
        const char *e = NULL;
        if (xds_json_parse(json, strlen(json), &obj, &e) < 0) {
                fprintf(stderr, "json: %s\n%s\n", e, json);
                return NULL;
        }
        int r = xds_pbjson_decode(d, obj, 0, NULL, &m, &e);
        json_object_put(obj);
        if (r < 0) {
                fprintf(stderr, "decode: %s\n%s\n", e, json);
                return NULL;
        }
        return m;
}

/* Compiles a JSON envoy.config.rbac.v3.RBAC. Returns the compile result; the error text goes
 * to last_err. A JSON that does not decode returns -1000. */
static int compile(const char *json, struct flt_rbac_engine **ret)
{
        ProtobufCMessage *m = decode(&envoy__config__rbac__v3__rbac__descriptor, json);
        if (!m)
                return -1000;
        const char *e = NULL;
        bool heap = false;
        last_err[0] = '\0';
        int r = flt_rbac_engine_new(m, "rules", ret, &e, &heap);
        if (r < 0) {
                snprintf(last_err, sizeof(last_err), "%s", e ? e : "(null)");
                if (heap)
                        wp_free((void *)e);
        }
        xds_pbjson_message_free(m);
        return r;
}

static void set_addr(struct sockaddr_storage *ss, const char *ip, uint16_t port)
{
        memset(ss, 0, sizeof(*ss));
        if (strchr(ip, ':')) {
                struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
                s6->sin6_family = AF_INET6;
                s6->sin6_port = htons(port);
                inet_pton(AF_INET6, ip, &s6->sin6_addr);
        } else {
                struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
                s4->sin_family = AF_INET;
                s4->sin_port = htons(port);
                inet_pton(AF_INET, ip, &s4->sin_addr);
        }
}

struct rq {
        struct wp_http_request req;
        struct sockaddr_storage src, dst;
        struct wp_headers meta;
        struct flt_rbac_facts f;
};

static void rq_init(struct rq *q, const char *method, const char *path)
{
        memset(q, 0, sizeof(*q));
        q->req.method = method;
        q->req.path = path;
        q->req.scheme = "http";
        q->req.authority = "ratings.bookinfo.svc.cluster.local:9080";
        q->req.content_length = -1;
        wp_headers_init(&q->req.headers);
        wp_headers_init(&q->meta);
        set_addr(&q->src, "127.0.21.1", 40000);
        set_addr(&q->dst, "127.200.0.5", 9080);
        q->f.req = &q->req;
        q->f.peer_principal = PRODUCT;
        q->f.src = &q->src;
        q->f.dst = &q->dst;
}

static void rq_header(struct rq *q, const char *name, const char *value)
{
        REQUIRE(wp_headers_add(&q->req.headers, name, (uint32_t)strlen(name), value,
                               (uint32_t)strlen(value)) == 0);
}

static void rq_meta(struct rq *q, const char *name, const char *value)
{
        REQUIRE(wp_headers_add(&q->meta, name, (uint32_t)strlen(name), value,
                               (uint32_t)strlen(value)) == 0);
        q->f.dyn_meta = &q->meta;
}

static void rq_done(struct rq *q)
{
        wp_headers_done(&q->req.headers);
        wp_headers_done(&q->meta);
}

/* 1 allowed, 0 denied, -1 error. */
static int allowed(const struct flt_rbac_engine *e, const struct flt_rbac_facts *f)
{
        struct flt_rbac_result res;
        if (flt_rbac_engine_eval(e, f, &res) < 0)
                return -1;
        return res.allowed;
}

/* An ALLOW engine with one policy: permission perm (JSON) and principal princ (JSON). */
static struct flt_rbac_engine *allow_one(const char *perm, const char *princ)
{
        char json[4096];
        snprintf(json, sizeof(json),
                 "{\"action\":\"ALLOW\",\"policies\":{\"p\":{\"permissions\":[%s],"
                 "\"principals\":[%s]}}}",
                 perm, princ);
        struct flt_rbac_engine *e = NULL;
        int r = compile(json, &e);
        if (r < 0)
                fprintf(stderr, "compile %d: %s\n%s\n", r, last_err, json);
        return r < 0 ? NULL : e;
}

/* ---- string matchers (through the filter_state peer principal, istiod's waypoint form) ---- */

struct smcase {
        const char *matcher;
        const char *principal;
        int want;
};

static void test_string_matcher_kinds(void)
{
        static const struct smcase cases[] = {
            {"{\"exact\":\"" INGRESS "\"}", INGRESS, 1},
            {"{\"exact\":\"" INGRESS "\"}", INGRESS "x", 0},
            {"{\"exact\":\"" INGRESS "\"}", NULL, 0},
            {"{\"exact\":\"SPIFFE://cluster.local/ns/istio-ingress/sa/ingress-gateway\","
             "\"ignore_case\":true}",
             INGRESS, 1},
            {"{\"exact\":\"SPIFFE://cluster.local/ns/istio-ingress/sa/ingress-gateway\"}", INGRESS,
             0},
            {"{\"prefix\":\"spiffe://cluster.local/\"}", INGRESS, 1},
            {"{\"prefix\":\"spiffe://other.td/\"}", INGRESS, 0},
            {"{\"prefix\":\"SPIFFE://CLUSTER.local/\",\"ignore_case\":true}", INGRESS, 1},
            {"{\"suffix\":\"/sa/ingress-gateway\"}", INGRESS, 1},
            {"{\"suffix\":\"/sa/INGRESS-gateway\",\"ignore_case\":true}", INGRESS, 1},
            {"{\"suffix\":\"/sa/ingress\"}", INGRESS, 0},
            {"{\"contains\":\"/ns/istio-ingress/\"}", INGRESS, 1},
            {"{\"contains\":\"/NS/ISTIO-INGRESS/\",\"ignore_case\":true}", INGRESS, 1},
            {"{\"contains\":\"/ns/bookinfo/\"}", INGRESS, 0},
            /* istiod's regexes: any principal, namespace, service account, trust domain */
            {"{\"safe_regex\":{\"regex\":\".+\"}}", INGRESS, 1},
            {"{\"safe_regex\":{\"regex\":\".+\"}}", "", 0},
            {"{\"safe_regex\":{\"regex\":\".*/ns/istio-ingress/.*\"}}", INGRESS, 1},
            {"{\"safe_regex\":{\"regex\":\".*/ns/bookinfo/.*\"}}", INGRESS, 0},
            {"{\"safe_regex\":{\"regex\":\"spiffe://.+/ns/istio-ingress/(.+/|)sa/"
             "ingress-gateway(/.+)?\"}}",
             INGRESS, 1},
            {"{\"safe_regex\":{\"regex\":\"spiffe://.+/ns/istio-ingress/(.+/|)sa/"
             "ingress-gateway(/.+)?\"}}",
             INGRESS "-2", 0},
            {"{\"safe_regex\":{\"regex\":\"spiffe://cluster\\\\.local/.*\"}}", INGRESS, 1},
            {"{\"safe_regex\":{\"regex\":\"spiffe://cluster\\\\.local/.*\"}}",
             "spiffe://clusterxlocal/ns/a", 0},
            /* full match, not a search */
            {"{\"safe_regex\":{\"regex\":\"ingress\"}}", INGRESS, 0},
            {"{\"safe_regex\":{\"google_re2\":{},\"regex\":\"spiffe://[a-z.]+/ns/[a-z-]+/sa/"
             "[a-z-]+\"}}",
             INGRESS, 1},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                char princ[1024];
                snprintf(princ, sizeof(princ),
                         "{\"filter_state\":{\"key\":\"io.istio.peer_principal\","
                         "\"string_match\":%s}}",
                         cases[i].matcher);
                struct flt_rbac_engine *e = allow_one("{\"any\":true}", princ);
                REQUIRE(e != NULL);
                struct rq q;
                rq_init(&q, "GET", "/");
                q.f.peer_principal = cases[i].principal;
                int got = allowed(e, &q.f);
                if (got != cases[i].want)
                        fprintf(stderr, "case %zu: %s on %s: got %d\n", i, cases[i].matcher,
                                cases[i].principal ? cases[i].principal : "(null)", got);
                CHECK_INT_EQ(got, cases[i].want);
                rq_done(&q);
                flt_rbac_engine_free(e);
        }
}

static void test_authenticated_principal(void)
{
        struct flt_rbac_engine *e =
            allow_one("{\"any\":true}",
                      "{\"authenticated\":{\"principal_name\":{\"exact\":\"" INGRESS "\"}}}");
        struct flt_rbac_engine *any = allow_one("{\"any\":true}", "{\"authenticated\":{}}");
        REQUIRE(e && any);
        struct rq q;
        rq_init(&q, "GET", "/");
        q.f.peer_principal = INGRESS;
        CHECK_INT_EQ(allowed(e, &q.f), 1);
        CHECK_INT_EQ(allowed(any, &q.f), 1);
        q.f.peer_principal = PRODUCT;
        CHECK_INT_EQ(allowed(e, &q.f), 0);
        CHECK_INT_EQ(allowed(any, &q.f), 1);
        /* no peer certificate: not authenticated, even without a principal_name */
        q.f.peer_principal = NULL;
        CHECK_INT_EQ(allowed(e, &q.f), 0);
        CHECK_INT_EQ(allowed(any, &q.f), 0);
        rq_done(&q);
        flt_rbac_engine_free(e);
        flt_rbac_engine_free(any);
}

/* ---- header matchers ---- */

struct hcase {
        const char *matcher; /* HeaderMatcher JSON */
        int want;
};

static void run_header_cases(const struct hcase *cases, size_t n, struct rq *q)
{
        for (size_t i = 0; i < n; i++) {
                char perm[1024];
                snprintf(perm, sizeof(perm), "{\"header\":%s}", cases[i].matcher);
                struct flt_rbac_engine *e = allow_one(perm, "{\"any\":true}");
                REQUIRE(e != NULL);
                int got = allowed(e, &q->f);
                if (got != cases[i].want)
                        fprintf(stderr, "header case %zu: %s: got %d\n", i, cases[i].matcher, got);
                CHECK_INT_EQ(got, cases[i].want);
                flt_rbac_engine_free(e);
        }
}

static void test_header_matcher_kinds(void)
{
        static const struct hcase cases[] = {
            {"{\"name\":\":method\",\"string_match\":{\"exact\":\"GET\"}}", 1},
            {"{\"name\":\":method\",\"string_match\":{\"exact\":\"get\"}}", 0},
            {"{\"name\":\":METHOD\",\"string_match\":{\"exact\":\"GET\"}}", 1},
            {"{\"name\":\":method\",\"string_match\":{\"exact\":\"GET\"},\"invert_match\":true}",
             0},
            {"{\"name\":\":path\",\"string_match\":{\"exact\":\"/ratings/0?x=1\"}}", 1},
            {"{\"name\":\":authority\",\"string_match\":{\"prefix\":\"ratings.\",\"ignore_case\":"
             "true}}",
             1},
            {"{\"name\":\":scheme\",\"exact_match\":\"http\"}", 1},
            {"{\"name\":\"x-user\",\"string_match\":{\"exact\":\"jason\"}}", 1},
            {"{\"name\":\"X-User\",\"string_match\":{\"exact\":\"jason\"}}", 1},
            {"{\"name\":\"x-user\",\"prefix_match\":\"ja\"}", 1},
            {"{\"name\":\"x-user\",\"suffix_match\":\"son\"}", 1},
            {"{\"name\":\"x-user\",\"contains_match\":\"aso\"}", 1},
            {"{\"name\":\"x-user\",\"safe_regex_match\":{\"regex\":\"j.*n\"}}", 1},
            {"{\"name\":\"x-user\",\"exact_match\":\"\"}", 1}, /* empty exact: any value */
            {"{\"name\":\"x-user\",\"present_match\":true}", 1},
            {"{\"name\":\"x-user\",\"present_match\":false}", 0},
            {"{\"name\":\"x-user\"}", 1}, /* no specifier: presence */
            /* several values are joined with ',' */
            {"{\"name\":\"x-multi\",\"string_match\":{\"exact\":\"a,b\"}}", 1},
            {"{\"name\":\"x-multi\",\"string_match\":{\"exact\":\"a\"}}", 0},
            {"{\"name\":\"x-multi\",\"safe_regex_match\":{\"regex\":\"a,b\"}}", 1},
            /* range: [start, end), integer values only */
            {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"10\",\"end\":\"43\"}}", 1},
            {"{\"name\":\"x-n\",\"range_match\":{\"start\":\"10\",\"end\":\"42\"}}", 0},
            {"{\"name\":\"x-user\",\"range_match\":{\"start\":\"-100\",\"end\":\"100\"}}", 0},
            /* absent headers */
            {"{\"name\":\"x-absent\",\"string_match\":{\"exact\":\"\"}}", 0},
            {"{\"name\":\"x-absent\",\"string_match\":{\"exact\":\"\"},"
             "\"treat_missing_header_as_empty\":true}",
             1},
            {"{\"name\":\"x-absent\",\"present_match\":false}", 1},
            {"{\"name\":\"x-absent\",\"present_match\":true}", 0},
            {"{\"name\":\"x-absent\",\"present_match\":true,\"invert_match\":true}", 1},
            /* Envoy: an inverted value matcher on an absent header does NOT match */
            {"{\"name\":\"x-absent\",\"string_match\":{\"exact\":\"a\"},\"invert_match\":true}", 0},
            {"{\"name\":\":protocol\",\"present_match\":true}", 0},
        };
        struct rq q;
        rq_init(&q, "GET", "/ratings/0?x=1");
        rq_header(&q, "x-user", "jason");
        rq_header(&q, "x-multi", "a");
        rq_header(&q, "x-multi", "b");
        rq_header(&q, "x-n", " 42 ");
        run_header_cases(cases, sizeof(cases) / sizeof(cases[0]), &q);
        rq_done(&q);
}

static void test_header_long_joined_value_uses_heap_and_fails_closed(void)
{
        struct flt_rbac_engine *e = allow_one(
            "{\"header\":{\"name\":\"x-big\",\"safe_regex_match\":{\"regex\":\"a+,b+\"}}}",
            "{\"any\":true}");
        REQUIRE(e != NULL);
        char *a = malloc(3001), *b = malloc(3001);
        REQUIRE(a && b);
        memset(a, 'a', 3000);
        memset(b, 'b', 3000);
        a[3000] = b[3000] = '\0';
        struct rq q;
        rq_init(&q, "GET", "/");
        rq_header(&q, "x-big", a);
        rq_header(&q, "x-big", b);
        CHECK_INT_EQ(allowed(e, &q.f), 1);
        struct flt_rbac_result res;
        wp_alloc_fail_at(1);
        CHECK_INT_EQ(flt_rbac_engine_eval(e, &q.f, &res), -ENOMEM);
        wp_alloc_fail_at(0);
        rq_done(&q);
        free(a);
        free(b);
        flt_rbac_engine_free(e);
}

/* ---- paths ---- */

static void test_url_path_ignores_query_and_fragment(void)
{
        struct flt_rbac_engine *e =
            allow_one("{\"url_path\":{\"path\":{\"exact\":\"/health\"}}}", "{\"any\":true}");
        struct flt_rbac_engine *pre =
            allow_one("{\"url_path\":{\"path\":{\"prefix\":\"/api/\"}}}", "{\"any\":true}");
        REQUIRE(e && pre);
        static const struct {
                const char *path;
                int exact, prefix;
        } cases[] = {
            {"/health", 1, 0}, {"/health?verbose=1", 1, 0}, {"/health#x", 1, 0}, {"/healthz", 0, 0},
            {"/api/v1", 0, 1}, {"/api?/x", 0, 0},           {"/API/v1", 0, 0},   {"", 0, 0},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct rq q;
                rq_init(&q, "GET", cases[i].path);
                CHECK_INT_EQ(allowed(e, &q.f), cases[i].exact);
                CHECK_INT_EQ(allowed(pre, &q.f), cases[i].prefix);
                rq_done(&q);
        }
        /* no request at all (network RBAC): url_path never matches */
        struct rq q;
        rq_init(&q, "GET", "/health");
        q.f.req = NULL;
        CHECK_INT_EQ(allowed(e, &q.f), 0);
        rq_done(&q);
        flt_rbac_engine_free(e);
        flt_rbac_engine_free(pre);
}

/* uri_template's typed_config is not in our proto registry: build the RBAC by hand. */
static int template_engine(const char *tmpl, struct flt_rbac_engine **ret)
{
        uint8_t buf[512];
        size_t n = strlen(tmpl);
        if (n > 120)
                return -1;
        buf[0] = 0x0a;
        buf[1] = (uint8_t)n;
        memcpy(buf + 2, tmpl, n);
        Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
        any.type_url = "type.googleapis.com/envoy.extensions.path.match.uri_template.v3."
                       "UriTemplateMatchConfig";
        any.value.data = buf;
        any.value.len = n + 2;
        Envoy__Config__Core__V3__TypedExtensionConfig tec =
            ENVOY__CONFIG__CORE__V3__TYPED_EXTENSION_CONFIG__INIT;
        tec.name = "uri-template";
        tec.typed_config = &any;
        Envoy__Config__Rbac__V3__Permission perm = ENVOY__CONFIG__RBAC__V3__PERMISSION__INIT;
        perm.rule_case = ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_URI_TEMPLATE;
        perm.uri_template = &tec;
        Envoy__Config__Rbac__V3__Principal princ = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__INIT;
        princ.identifier_case = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_ANY;
        princ.any = 1;
        Envoy__Config__Rbac__V3__Permission *perms[] = {&perm};
        Envoy__Config__Rbac__V3__Principal *princs[] = {&princ};
        Envoy__Config__Rbac__V3__Policy pol = ENVOY__CONFIG__RBAC__V3__POLICY__INIT;
        pol.n_permissions = 1;
        pol.permissions = perms;
        pol.n_principals = 1;
        pol.principals = princs;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry ent =
            ENVOY__CONFIG__RBAC__V3__RBAC__POLICIES_ENTRY__INIT;
        ent.key = "t";
        ent.value = &pol;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry *ents[] = {&ent};
        Envoy__Config__Rbac__V3__RBAC rbac = ENVOY__CONFIG__RBAC__V3__RBAC__INIT;
        rbac.n_policies = 1;
        rbac.policies = ents;
        const char *e = NULL;
        bool heap = false;
        int r = flt_rbac_engine_new(&rbac.base, "rules", ret, &e, &heap);
        if (r < 0) {
                snprintf(last_err, sizeof(last_err), "%s", e);
                if (heap)
                        wp_free((void *)e);
        }
        return r;
}

static void test_uri_template_paths(void)
{
        static const struct {
                const char *tmpl, *path;
                int want;
        } cases[] = {
            {"/foo/*/bar", "/foo/x/bar", 1},
            {"/foo/*/bar", "/foo/x/bar?q=1", 1},
            {"/foo/*/bar", "/foo//bar", 0},
            {"/foo/*/bar", "/foo/x/y/bar", 0},
            {"/foo/*/bar", "/foo/x/bar/", 0},
            {"/foo/**", "/foo/a/b/c", 1},
            {"/foo/**", "/foo/", 1},
            {"/foo/**", "/foo", 0},
            {"/foo/**/baz", "/foo/a/b/baz", 1},
            {"/foo/**/baz", "/foo/baz", 0},
            {"/foo/**/baz", "/foo//baz", 1},
            {"/*.txt", "/a.txt", 1},
            {"/*.txt", "/.txt", 0},
            {"/*.txt", "/a/b.txt", 0},
            {"/{name}/x", "/abc/x", 1},
            {"/{name=*}/x", "/abc/x", 1},
            {"/{name=a/*}/x", "/a/b/x", 1},
            {"/{name=a/*}/x", "/c/b/x", 0},
            {"/{path=**}", "/a/b", 1},
            {"/api/*", "/api/v1", 1},
            {"/api/*", "/api/v1/", 0},
            {"/api/*/", "/api/v1/", 1},
            {"/a/*", "/a/b c", 0}, /* space is not a path character */
            {"/a/*", "/a/b=c", 0}, /* '=' is excluded from segments (Envoy) */
            {"/a/*", "/a/%20", 1},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct flt_rbac_engine *e = NULL;
                int r = template_engine(cases[i].tmpl, &e);
                if (r < 0)
                        fprintf(stderr, "template %s: %s\n", cases[i].tmpl, last_err);
                REQUIRE(r == 0);
                struct rq q;
                rq_init(&q, "GET", cases[i].path);
                int got = allowed(e, &q.f);
                if (got != cases[i].want)
                        fprintf(stderr, "template case %zu: %s on %s: got %d\n", i, cases[i].tmpl,
                                cases[i].path, got);
                CHECK_INT_EQ(got, cases[i].want);
                rq_done(&q);
                flt_rbac_engine_free(e);
        }
        static const char *const bad[] = {
            "foo/*",
            "/foo/**/*",
            "/foo/**/{x}",
            "/{1x}",
            "/{x}/{x}",
            "/{x=}",
            "/a//b",
            "/a*b",
            "/*a/b",
            "/{x",
            "/{a}/{b}/{c}/{d}/{e}/{f}",
            "/a b",
            "/a=b",
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                struct flt_rbac_engine *e = NULL;
                int r = template_engine(bad[i], &e);
                if (r != -EINVAL)
                        fprintf(stderr, "template %s: accepted\n", bad[i]);
                CHECK_INT_EQ(r, -EINVAL);
                CHECK(strstr(last_err, "uri_template") != NULL);
                flt_rbac_engine_free(e);
        }
}

/* ---- addresses and ports ---- */

static void test_ip_and_port_matchers(void)
{
        static const struct {
                const char *perm, *princ, *src, *dst;
                uint16_t dport;
                int want;
        } cases[] = {
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.0.5\",\"prefix_len\":32}}", NULL,
             "127.0.21.1", "127.200.0.5", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.0.5\",\"prefix_len\":32}}", NULL,
             "127.0.21.1", "127.200.0.6", 9080, 0},
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.0.0\",\"prefix_len\":16}}", NULL,
             "127.0.21.1", "127.200.9.9", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.0.0\",\"prefix_len\":15}}", NULL,
             "127.0.21.1", "127.201.9.9", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.0.0\",\"prefix_len\":15}}", NULL,
             "127.0.21.1", "127.202.9.9", 9080, 0},
            /* host bits in the prefix are ignored */
            {"{\"destination_ip\":{\"address_prefix\":\"127.200.7.7\",\"prefix_len\":16}}", NULL,
             "127.0.21.1", "127.200.0.1", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"0.0.0.0\"}}", NULL, "127.0.21.1",
             "10.1.2.3", 9080, 1},
            /* families do not mix, except IPv4-mapped IPv6 */
            {"{\"destination_ip\":{\"address_prefix\":\"::\"}}", NULL, "127.0.21.1", "10.1.2.3",
             9080, 0},
            {"{\"destination_ip\":{\"address_prefix\":\"10.1.2.3\",\"prefix_len\":32}}", NULL,
             "127.0.21.1", "::ffff:10.1.2.3", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"fd00::\",\"prefix_len\":8}}", NULL,
             "127.0.21.1", "fd12::1", 9080, 1},
            {"{\"destination_ip\":{\"address_prefix\":\"fd00::\",\"prefix_len\":8}}", NULL,
             "127.0.21.1", "fe12::1", 9080, 0},
            {"{\"destination_port\":9080}", NULL, "127.0.21.1", "127.200.0.5", 9080, 1},
            {"{\"destination_port\":9080}", NULL, "127.0.21.1", "127.200.0.5", 9081, 0},
            {"{\"destination_port_range\":{\"start\":9000,\"end\":9081}}", NULL, "127.0.21.1",
             "127.200.0.5", 9080, 1},
            {"{\"destination_port_range\":{\"start\":9000,\"end\":9080}}", NULL, "127.0.21.1",
             "127.200.0.5", 9080, 0},
            {NULL, "{\"direct_remote_ip\":{\"address_prefix\":\"127.0.21.0\",\"prefix_len\":24}}",
             "127.0.21.1", "127.200.0.5", 9080, 1},
            {NULL, "{\"direct_remote_ip\":{\"address_prefix\":\"127.0.22.0\",\"prefix_len\":24}}",
             "127.0.21.1", "127.200.0.5", 9080, 0},
            {NULL, "{\"remote_ip\":{\"address_prefix\":\"127.0.21.1\",\"prefix_len\":32}}",
             "127.0.21.1", "127.200.0.5", 9080, 1},
            {NULL, "{\"source_ip\":{\"address_prefix\":\"127.0.21.1\",\"prefix_len\":32}}",
             "127.0.21.2", "127.200.0.5", 9080, 0},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct flt_rbac_engine *e =
                    allow_one(cases[i].perm ? cases[i].perm : "{\"any\":true}",
                              cases[i].princ ? cases[i].princ : "{\"any\":true}");
                REQUIRE(e != NULL);
                struct rq q;
                rq_init(&q, "GET", "/");
                set_addr(&q.src, cases[i].src, 40000);
                set_addr(&q.dst, cases[i].dst, cases[i].dport);
                int got = allowed(e, &q.f);
                if (got != cases[i].want)
                        fprintf(stderr, "ip case %zu: got %d\n", i, got);
                CHECK_INT_EQ(got, cases[i].want);
                /* unknown addresses never match */
                q.f.src = q.f.dst = NULL;
                CHECK_INT_EQ(allowed(e, &q.f), 0);
                rq_done(&q);
                flt_rbac_engine_free(e);
        }
}

static void test_requested_server_name(void)
{
        struct flt_rbac_engine *e = allow_one(
            "{\"requested_server_name\":{\"suffix\":\".example.com\"}}", "{\"any\":true}");
        struct flt_rbac_engine *empty =
            allow_one("{\"requested_server_name\":{\"exact\":\"\"}}", "{\"any\":true}");
        REQUIRE(e && empty);
        struct rq q;
        rq_init(&q, "GET", "/");
        CHECK_INT_EQ(allowed(e, &q.f), 0);
        CHECK_INT_EQ(allowed(empty, &q.f), 1); /* plaintext: no SNI = "" */
        q.f.sni = "api.example.com";
        CHECK_INT_EQ(allowed(e, &q.f), 1);
        CHECK_INT_EQ(allowed(empty, &q.f), 0);
        rq_done(&q);
        flt_rbac_engine_free(e);
        flt_rbac_engine_free(empty);
}

/* ---- metadata (JWT claims as istiod encodes them) ---- */

static void test_metadata_jwt_claims(void)
{
        /* request.auth.claims[groups] = admin: or(list one_of exact, exact) */
        const char *groups =
            "{\"metadata\":{\"filter\":\"envoy.filters.http.jwt_authn\",\"path\":[{\"key\":"
            "\"payload\"},{\"key\":\"groups\"}],\"value\":{\"or_match\":{\"value_matchers\":["
            "{\"list_match\":{\"one_of\":{\"string_match\":{\"exact\":\"admin\"}}}},"
            "{\"string_match\":{\"exact\":\"admin\"}}]}}}}";
        /* request.auth.principal = iss/sub */
        const char *reqp =
            "{\"and_ids\":{\"ids\":["
            "{\"metadata\":{\"filter\":\"envoy.filters.http.jwt_authn\",\"path\":[{\"key\":"
            "\"payload\"},{\"key\":\"iss\"}],\"value\":{\"string_match\":{\"exact\":"
            "\"https://issuer\"}}}},"
            "{\"metadata\":{\"filter\":\"envoy.filters.http.jwt_authn\",\"path\":[{\"key\":"
            "\"payload\"},{\"key\":\"sub\"}],\"value\":{\"string_match\":{\"prefix\":\"user-\"}}}}"
            "]}}";
        struct flt_rbac_engine *eg = allow_one("{\"any\":true}", groups);
        struct flt_rbac_engine *ep = allow_one("{\"any\":true}", reqp);
        REQUIRE(eg && ep);
        struct rq q;
        rq_init(&q, "GET", "/");
        CHECK_INT_EQ(allowed(eg, &q.f), 0); /* no metadata at all */
        CHECK_INT_EQ(allowed(ep, &q.f), 0);
        rq_meta(&q, JWT "iss", "https://issuer");
        rq_meta(&q, JWT "sub", "user-1");
        rq_meta(&q, JWT "groups", "dev");
        CHECK_INT_EQ(allowed(ep, &q.f), 1);
        CHECK_INT_EQ(allowed(eg, &q.f), 0);
        rq_meta(&q, JWT "groups", "admin"); /* a list: dev, admin */
        CHECK_INT_EQ(allowed(eg, &q.f), 1);
        rq_done(&q);

        rq_init(&q, "GET", "/");
        rq_meta(&q, JWT "groups", "admin"); /* a single string */
        rq_meta(&q, JWT "iss", "https://other");
        rq_meta(&q, JWT "sub", "user-1");
        CHECK_INT_EQ(allowed(eg, &q.f), 1);
        CHECK_INT_EQ(allowed(ep, &q.f), 0);
        rq_done(&q);
        flt_rbac_engine_free(eg);
        flt_rbac_engine_free(ep);

        /* a string matcher does not match a list (two entries), invert flips, other kinds */
        static const struct {
                const char *value;
                bool invert;
                int want;
        } cases[] = {
            {"{\"string_match\":{\"exact\":\"a\"}}", false, 0}, /* list [a, b] */
            {"{\"list_match\":{\"one_of\":{\"string_match\":{\"exact\":\"b\"}}}}", false, 1},
            {"{\"list_match\":{\"one_of\":{\"string_match\":{\"exact\":\"c\"}}}}", false, 0},
            {"{\"list_match\":{\"one_of\":{\"string_match\":{\"exact\":\"c\"}}}}", true, 1},
            {"{\"present_match\":true}", false, 1},
            {"{\"present_match\":false}", false, 0},
            {"{\"null_match\":{}}", false, 0},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                char princ[1024];
                snprintf(princ, sizeof(princ),
                         "{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"k\"}],\"value\":%s,"
                         "\"invert\":%s}}",
                         cases[i].value, cases[i].invert ? "true" : "false");
                struct flt_rbac_engine *e = allow_one("{\"any\":true}", princ);
                REQUIRE(e != NULL);
                rq_init(&q, "GET", "/");
                rq_meta(&q, "f" FLT_RBAC_META_SEP "k", "a");
                rq_meta(&q, "f" FLT_RBAC_META_SEP "k", "b");
                rq_meta(&q, "f" FLT_RBAC_META_SEP "kk", "c");
                int got = allowed(e, &q.f);
                if (got != cases[i].want)
                        fprintf(stderr, "meta case %zu: got %d\n", i, got);
                CHECK_INT_EQ(got, cases[i].want);
                rq_done(&q);
                flt_rbac_engine_free(e);
        }
        static const struct {
                const char *value, *text;
                int want;
        } scalars[] = {
            {"{\"bool_match\":true}", "true", 1},
            {"{\"bool_match\":true}", "false", 0},
            {"{\"bool_match\":false}", "false", 1},
            {"{\"double_match\":{\"exact\":3}}", "3", 1},
            {"{\"double_match\":{\"exact\":3}}", "3.0", 1},
            {"{\"double_match\":{\"exact\":3}}", "3x", 0},
            {"{\"double_match\":{\"range\":{\"start\":1,\"end\":3}}}", "2.5", 1},
            {"{\"double_match\":{\"range\":{\"start\":1,\"end\":3}}}", "3", 0},
        };
        for (size_t i = 0; i < sizeof(scalars) / sizeof(scalars[0]); i++) {
                char perm[1024];
                snprintf(
                    perm, sizeof(perm),
                    "{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"k\"}],\"value\":%s}}",
                    scalars[i].value);
                struct flt_rbac_engine *e = allow_one(perm, "{\"any\":true}");
                REQUIRE(e != NULL);
                rq_init(&q, "GET", "/");
                rq_meta(&q, "f" FLT_RBAC_META_SEP "k", scalars[i].text);
                CHECK_INT_EQ(allowed(e, &q.f), scalars[i].want);
                rq_done(&q);
                flt_rbac_engine_free(e);
        }
}

/* ---- and / or / not nesting ---- */

static void test_and_or_not_nesting(void)
{
        /* (GET or HEAD) and not (/admin prefix) and not (port 8080) */
        const char *perm =
            "{\"and_rules\":{\"rules\":["
            "{\"or_rules\":{\"rules\":["
            "{\"header\":{\"name\":\":method\",\"string_match\":{\"exact\":\"GET\"}}},"
            "{\"header\":{\"name\":\":method\",\"string_match\":{\"exact\":\"HEAD\"}}}]}},"
            "{\"not_rule\":{\"url_path\":{\"path\":{\"prefix\":\"/admin\"}}}},"
            "{\"not_rule\":{\"not_rule\":{\"not_rule\":{\"destination_port\":8080}}}}]}}";
        /* (ns bookinfo and not productpage) or source 10.0.0.0/8 */
        const char *princ =
            "{\"or_ids\":{\"ids\":["
            "{\"and_ids\":{\"ids\":["
            "{\"filter_state\":{\"key\":\"io.istio.peer_principal\",\"string_match\":"
            "{\"safe_regex\":{\"regex\":\".*/ns/bookinfo/.*\"}}}},"
            "{\"not_id\":{\"filter_state\":{\"key\":\"io.istio.peer_principal\",\"string_match\":"
            "{\"suffix\":\"/sa/bookinfo-productpage\"}}}}]}},"
            "{\"direct_remote_ip\":{\"address_prefix\":\"10.0.0.0\",\"prefix_len\":8}}]}}";
        struct flt_rbac_engine *e = allow_one(perm, princ);
        REQUIRE(e != NULL);
        static const struct {
                const char *method, *path, *principal, *src;
                uint16_t port;
                int want;
        } cases[] = {
            {"GET", "/x", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "127.0.0.1", 9080, 1},
            {"HEAD", "/x", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "127.0.0.1", 9080, 1},
            {"POST", "/x", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "127.0.0.1", 9080, 0},
            {"GET", "/admin/x", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "127.0.0.1", 9080,
             0},
            {"GET", "/x", "spiffe://cluster.local/ns/bookinfo/sa/reviews", "127.0.0.1", 8080, 0},
            {"GET", "/x", PRODUCT, "127.0.0.1", 9080, 0},
            {"GET", "/x", PRODUCT, "10.1.2.3", 9080, 1},
            {"GET", "/x", NULL, "10.1.2.3", 9080, 1},
            {"GET", "/x", "spiffe://cluster.local/ns/other/sa/reviews", "127.0.0.1", 9080, 0},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct rq q;
                rq_init(&q, cases[i].method, cases[i].path);
                q.f.peer_principal = cases[i].principal;
                set_addr(&q.src, cases[i].src, 1234);
                set_addr(&q.dst, "127.200.0.5", cases[i].port);
                int got = allowed(e, &q.f);
                if (got != cases[i].want)
                        fprintf(stderr, "nesting case %zu: got %d\n", i, got);
                CHECK_INT_EQ(got, cases[i].want);
                rq_done(&q);
        }
        flt_rbac_engine_free(e);
}

/* ---- actions ---- */

#define TWO_POLICIES                                                                               \
        "\"policies\":{"                                                                           \
        "\"z-post\":{\"permissions\":[{\"header\":{\"name\":\":method\",\"string_match\":"         \
        "{\"exact\":\"POST\"}}}],\"principals\":[{\"any\":true}]},"                                \
        "\"a post\\tor "                                                                           \
        "put\":{\"permissions\":[{\"header\":{\"name\":\":method\",\"string_match\":"              \
        "{\"prefix\":\"P\"}}}],\"principals\":[{\"any\":true}]}}"

static void test_actions_allow_deny_log(void)
{
        struct flt_rbac_engine *allow = NULL, *deny = NULL, *log = NULL, *empty = NULL;
        REQUIRE(compile("{\"action\":\"ALLOW\"," TWO_POLICIES "}", &allow) == 0);
        REQUIRE(compile("{\"action\":\"DENY\"," TWO_POLICIES "}", &deny) == 0);
        REQUIRE(compile("{\"action\":\"LOG\"," TWO_POLICIES "}", &log) == 0);
        REQUIRE(compile("{}", &empty) == 0);
        CHECK_INT_EQ(flt_rbac_engine_action(allow), FLT_RBAC_ALLOW);
        CHECK_INT_EQ(flt_rbac_engine_action(deny), FLT_RBAC_DENY);
        CHECK_INT_EQ(flt_rbac_engine_action(log), FLT_RBAC_LOG);
        CHECK_INT_EQ(flt_rbac_engine_policy_count(allow), 2);
        struct rq q;
        struct flt_rbac_result r;

        rq_init(&q, "POST", "/");
        REQUIRE(flt_rbac_engine_eval(allow, &q.f, &r) == 0);
        CHECK(r.allowed && r.matched);
        /* policies are tried in name order: "a post\tor put" before "z-post" */
        CHECK_STR_EQ(r.policy, "a post\tor put");
        REQUIRE(flt_rbac_engine_eval(deny, &q.f, &r) == 0);
        CHECK(!r.allowed && r.matched);
        CHECK_STR_EQ(r.details, "rbac_access_denied_matched_policy[a_post_or_put]");
        REQUIRE(flt_rbac_engine_eval(log, &q.f, &r) == 0);
        CHECK(r.allowed && r.matched);
        rq_done(&q);

        rq_init(&q, "GET", "/");
        REQUIRE(flt_rbac_engine_eval(allow, &q.f, &r) == 0);
        CHECK(!r.allowed && !r.matched && r.policy == NULL);
        CHECK_STR_EQ(r.details, "rbac_access_denied_matched_policy[none]");
        REQUIRE(flt_rbac_engine_eval(deny, &q.f, &r) == 0);
        CHECK(r.allowed && !r.matched && r.details == NULL);
        REQUIRE(flt_rbac_engine_eval(log, &q.f, &r) == 0);
        CHECK(r.allowed && !r.matched);
        /* ALLOW with no policies allows nothing */
        REQUIRE(flt_rbac_engine_eval(empty, &q.f, &r) == 0);
        CHECK(!r.allowed);
        rq_done(&q);
        flt_rbac_engine_free(allow);
        flt_rbac_engine_free(deny);
        flt_rbac_engine_free(log);
        flt_rbac_engine_free(empty);
}

static void test_duplicate_policy_names_last_wins(void)
{
        /* A protobuf map's last entry wins; JSON decoding rejects duplicates, so pack a map
         * with the same key twice by hand. */
        Envoy__Config__Rbac__V3__Permission pget = ENVOY__CONFIG__RBAC__V3__PERMISSION__INIT,
                                            pany = ENVOY__CONFIG__RBAC__V3__PERMISSION__INIT;
        Envoy__Config__Route__V3__HeaderMatcher hm = ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__INIT;
        hm.name = ":method";
        hm.header_match_specifier_case =
            ENVOY__CONFIG__ROUTE__V3__HEADER_MATCHER__HEADER_MATCH_SPECIFIER_EXACT_MATCH;
        hm.exact_match = "DELETE";
        pget.rule_case = ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_HEADER;
        pget.header = &hm;
        pany.rule_case = ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_ANY;
        pany.any = 1;
        Envoy__Config__Rbac__V3__Principal any = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__INIT;
        any.identifier_case = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_ANY;
        any.any = 1;
        Envoy__Config__Rbac__V3__Principal *princs[] = {&any};
        Envoy__Config__Rbac__V3__Permission *p1[] = {&pany}, *p2[] = {&pget};
        Envoy__Config__Rbac__V3__Policy pol1 = ENVOY__CONFIG__RBAC__V3__POLICY__INIT,
                                        pol2 = ENVOY__CONFIG__RBAC__V3__POLICY__INIT;
        pol1.n_permissions = pol2.n_permissions = 1;
        pol1.permissions = p1;
        pol2.permissions = p2;
        pol1.n_principals = pol2.n_principals = 1;
        pol1.principals = pol2.principals = princs;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry
            e1 = ENVOY__CONFIG__RBAC__V3__RBAC__POLICIES_ENTRY__INIT,
            e2 = ENVOY__CONFIG__RBAC__V3__RBAC__POLICIES_ENTRY__INIT;
        e1.key = e2.key = "dup";
        e1.value = &pol1;
        e2.value = &pol2;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry *ents[] = {&e1, &e2};
        Envoy__Config__Rbac__V3__RBAC rbac = ENVOY__CONFIG__RBAC__V3__RBAC__INIT;
        rbac.action = ENVOY__CONFIG__RBAC__V3__RBAC__ACTION__DENY;
        rbac.n_policies = 2;
        rbac.policies = ents;
        struct flt_rbac_engine *e = NULL;
        const char *d = NULL;
        bool heap = false;
        REQUIRE(flt_rbac_engine_new(&rbac.base, NULL, &e, &d, &heap) == 0);
        CHECK_INT_EQ(flt_rbac_engine_policy_count(e), 1);
        struct rq q;
        rq_init(&q, "GET", "/");
        CHECK_INT_EQ(allowed(e, &q.f), 1); /* the "any" policy was replaced */
        q.req.method = "DELETE";
        CHECK_INT_EQ(allowed(e, &q.f), 0);
        rq_done(&q);
        flt_rbac_engine_free(e);
}

/* ---- the HTTP filter: shadow rules, local reply ---- */

static struct flt_rbac_conf *http_conf(const char *json, int *ret_r)
{
        ProtobufCMessage *m =
            decode(&envoy__extensions__filters__http__rbac__v3__rbac__descriptor, json);
        if (!m) {
                *ret_r = -1000;
                return NULL;
        }
        const struct flt_ops *ops = flt_registry_lookup("envoy.filters.http.rbac");
        void *conf = NULL;
        const char *e = NULL;
        bool heap = false;
        *ret_r = ops ? ops->conf_new(m, &conf, &e, &heap) : -1001;
        last_err[0] = '\0';
        if (*ret_r < 0 && e) {
                snprintf(last_err, sizeof(last_err), "%s", e);
                if (heap)
                        wp_free((void *)e);
        }
        xds_pbjson_message_free(m);
        return conf;
}

static int run_filter(struct flt_rbac_conf *c, struct rq *q, struct flt_stream *fs,
                      struct flt_rbac_stream_state *st)
{
        memset(fs, 0, sizeof(*fs));
        memset(st, 0, sizeof(*st));
        fs->ops = &flt_rbac_http_ops;
        fs->conf = c;
        fs->state = st;
        struct flt_request r = {
            .req = &q->req,
            .peer_principal = q->f.peer_principal,
            .src = q->f.src,
            .dst = q->f.dst,
            .dyn_meta = q->f.dyn_meta,
        };
        return flt_rbac_http_ops.on_request_headers(fs, &r, true);
}

static void test_http_filter_registry_and_ops(void)
{
        const struct flt_ops *ops = flt_registry_lookup("envoy.filters.http.rbac");
        REQUIRE(ops == &flt_rbac_http_ops);
        CHECK_STR_EQ(ops->type_url,
                     "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC");
        CHECK(ops->stream_state_size == sizeof(struct flt_rbac_stream_state));
        CHECK(flt_registry_lookup("envoy.filters.http.nope") == NULL);
        int r;
        struct flt_rbac_conf *c = http_conf(
            "{\"rules\":{\"action\":\"DENY\"," TWO_POLICIES "},"
            "\"shadow_rules\":{\"action\":\"ALLOW\",\"policies\":{\"only-get\":{"
            "\"permissions\":[{\"header\":{\"name\":\":method\",\"exact_match\":\"GET\"}}],"
            "\"principals\":[{\"any\":true}]}}},"
            "\"shadow_rules_stat_prefix\":\"istio_dry_run_allow_\",\"rules_stat_prefix\":\"r_\"}",
            &r);
        REQUIRE(r == 0 && c);
        CHECK_STR_EQ(c->shadow_rules_stat_prefix, "istio_dry_run_allow_");
        CHECK_STR_EQ(c->rules_stat_prefix, "r_");
        struct flt_stream fs;
        struct flt_rbac_stream_state st;
        struct rq q;

        rq_init(&q, "GET", "/");
        CHECK_INT_EQ(run_filter(c, &q, &fs, &st), FLT_CONTINUE);
        CHECK(!fs.shadow_denied && st.shadow_evaluated && !st.shadow_denied);
        CHECK_STR_EQ(st.shadow_policy, "only-get");
        CHECK(st.evaluated && !st.denied && st.policy == NULL);
        rq_done(&q);

        rq_init(&q, "PUT", "/");
        CHECK_INT_EQ(run_filter(c, &q, &fs, &st), FLT_REPLY);
        CHECK_INT_EQ(fs.reply_status, 403);
        CHECK_STR_EQ(fs.reply_body, "RBAC: access denied");
        CHECK_STR_EQ(fs.reply_details, "rbac_access_denied_matched_policy[a_post_or_put]");
        CHECK(fs.shadow_denied && st.shadow_denied && st.shadow_policy == NULL);
        CHECK(st.denied);
        rq_done(&q);

        /* shadow only: never enforced */
        ops->conf_free(c);
        c = http_conf("{\"shadow_rules\":{\"action\":\"DENY\",\"policies\":{\"all\":{"
                      "\"permissions\":[{\"any\":true}],\"principals\":[{\"any\":true}]}}}}",
                      &r);
        REQUIRE(r == 0 && c);
        rq_init(&q, "DELETE", "/");
        CHECK_INT_EQ(run_filter(c, &q, &fs, &st), FLT_CONTINUE);
        CHECK(fs.shadow_denied && fs.reply_status == 0 && !st.evaluated);
        CHECK_STR_EQ(st.shadow_policy, "all");
        rq_done(&q);
        ops->conf_free(c);

        /* LOG: matched, logged, never blocks */
        c = http_conf("{\"rules\":{\"action\":\"LOG\"," TWO_POLICIES "}}", &r);
        REQUIRE(r == 0 && c);
        rq_init(&q, "POST", "/");
        CHECK_INT_EQ(run_filter(c, &q, &fs, &st), FLT_CONTINUE);
        CHECK(st.logged && !st.denied);
        rq_done(&q);
        ops->conf_free(c);

        /* nothing configured: everything passes */
        c = http_conf("{}", &r);
        REQUIRE(r == 0 && c);
        rq_init(&q, "POST", "/");
        CHECK_INT_EQ(run_filter(c, &q, &fs, &st), FLT_CONTINUE);
        rq_done(&q);
        ops->conf_free(c);

        /* matcher-tree form and wrong message types are refused */
        c = http_conf("{\"matcher\":{}}", &r);
        CHECK_INT_EQ(r, -EINVAL);
        CHECK(strstr(last_err, "matcher") != NULL);
        void *conf = NULL;
        const char *e = NULL;
        bool heap = false;
        Envoy__Config__Rbac__V3__RBAC bare = ENVOY__CONFIG__RBAC__V3__RBAC__INIT;
        CHECK_INT_EQ(ops->conf_new(&bare.base, &conf, &e, &heap), -EINVAL);
}

/* ---- the fixture's policies, as istiod sends them ---- */

static Envoy__Config__Listener__V3__FilterChain *
find_chain(Envoy__Config__Listener__V3__Listener *l, const char *name)
{
        for (size_t i = 0; i < l->n_filter_chains; i++)
                if (strcmp(l->filter_chains[i]->name, name) == 0)
                        return l->filter_chains[i];
        return NULL;
}

/* The RBAC typed_config of a chain's HCM (unpacked; caller frees). */
static ProtobufCMessage *fixture_rbac(struct xds_resources *res, const char *chain)
{
        Envoy__Config__Listener__V3__Listener *l =
            (void *)xds_resources_find(res, XDS_RES_LISTENER, "main_internal");
        if (!l)
                return NULL;
        Envoy__Config__Listener__V3__FilterChain *fc = find_chain(l, chain);
        if (!fc)
                return NULL;
        ProtobufCMessage *hcm_m = NULL, *rbac_m = NULL;
        const char *e = NULL;
        for (size_t i = 0; i < fc->n_filters; i++) {
                if (strcmp(fc->filters[i]->name, "envoy.filters.network.http_connection_manager"))
                        continue;
                if (xds_any_unpack(fc->filters[i]->typed_config, NULL, &hcm_m, &e) < 0)
                        return NULL;
        }
        if (!hcm_m)
                return NULL;
        Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager *hcm =
            (void *)hcm_m;
        for (size_t i = 0; i < hcm->n_http_filters && !rbac_m; i++) {
                const struct flt_ops *ops = flt_registry_lookup(hcm->http_filters[i]->name);
                if (ops != &flt_rbac_http_ops)
                        continue;
                CHECK_STR_EQ(hcm->http_filters[i]->typed_config->type_url, ops->type_url);
                if (xds_any_unpack(hcm->http_filters[i]->typed_config,
                                   xds_registry_lookup(ops->type_url), &rbac_m, &e) < 0)
                        rbac_m = NULL;
        }
        xds_pbjson_message_free(hcm_m);
        return rbac_m;
}

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

static void test_fixture_productpage_allows_only_ingress_get_head(void)
{
        struct xds_resources *res = load_fixture();
        REQUIRE(res != NULL);
        ProtobufCMessage *m =
            fixture_rbac(res, "inbound-vip|9080|http|productpage.bookinfo.svc.cluster.local");
        REQUIRE(m != NULL);
        void *conf = NULL;
        const char *e = NULL;
        bool heap = false;
        REQUIRE(flt_rbac_http_ops.conf_new(m, &conf, &e, &heap) == 0);
        static const struct {
                const char *method, *path, *principal;
                int want;
        } cases[] = {
            {"GET", "/productpage", INGRESS, FLT_CONTINUE},
            {"HEAD", "/", INGRESS, FLT_CONTINUE},
            {"POST", "/productpage", INGRESS, FLT_REPLY},
            {"get", "/productpage", INGRESS, FLT_REPLY},
            {"GET", "/productpage", PRODUCT, FLT_REPLY},
            {"GET", "/productpage", NULL, FLT_REPLY},
            {"GET", "/productpage", "spiffe://cluster.local/ns/istio-ingress/sa/ingress-gateway2",
             FLT_REPLY},
            {"GET", "/productpage", "cluster.local/ns/istio-ingress/sa/ingress-gateway", FLT_REPLY},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct rq q;
                struct flt_stream fs;
                struct flt_rbac_stream_state st;
                rq_init(&q, cases[i].method, cases[i].path);
                q.req.authority = "productpage.bookinfo.svc.cluster.local:9080";
                q.f.peer_principal = cases[i].principal;
                int got = run_filter(conf, &q, &fs, &st);
                if (got != cases[i].want)
                        fprintf(stderr, "productpage case %zu: got %d\n", i, got);
                CHECK_INT_EQ(got, cases[i].want);
                if (got == FLT_REPLY) {
                        CHECK_INT_EQ(fs.reply_status, 403);
                        CHECK_STR_EQ(fs.reply_details, "rbac_access_denied_matched_policy[none]");
                } else {
                        CHECK_STR_EQ(st.policy, "ns[bookinfo]-policy[productpage-viewer]-rule[0]");
                }
                rq_done(&q);
        }
        flt_rbac_http_ops.conf_free(conf);
        xds_pbjson_message_free(m);
        xds_resources_free(res);
}

static void test_fixture_ratings_denies_writes_except_health(void)
{
        struct xds_resources *res = load_fixture();
        REQUIRE(res != NULL);
        ProtobufCMessage *m =
            fixture_rbac(res, "inbound-vip|9080|http|ratings.bookinfo.svc.cluster.local");
        REQUIRE(m != NULL);
        void *conf = NULL;
        const char *e = NULL;
        bool heap = false;
        REQUIRE(flt_rbac_http_ops.conf_new(m, &conf, &e, &heap) == 0);
        static const struct {
                const char *method, *path, *principal;
                int want;
        } cases[] = {
            {"GET", "/ratings/0", PRODUCT, FLT_CONTINUE},
            {"POST", "/ratings/0", PRODUCT, FLT_REPLY},
            {"PUT", "/ratings/0", NULL, FLT_REPLY},
            {"DELETE", "/ratings/0", INGRESS, FLT_REPLY},
            {"POST", "/health", PRODUCT, FLT_CONTINUE},
            {"POST", "/health?probe=1", PRODUCT, FLT_CONTINUE},
            {"POST", "/health/x", PRODUCT, FLT_REPLY},
            {"PATCH", "/ratings/0", PRODUCT, FLT_CONTINUE},
            {"OPTIONS", "/ratings/0", PRODUCT, FLT_CONTINUE},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct rq q;
                struct flt_stream fs;
                struct flt_rbac_stream_state st;
                rq_init(&q, cases[i].method, cases[i].path);
                q.f.peer_principal = cases[i].principal;
                int got = run_filter(conf, &q, &fs, &st);
                if (got != cases[i].want)
                        fprintf(stderr, "ratings case %zu: got %d\n", i, got);
                CHECK_INT_EQ(got, cases[i].want);
                if (got == FLT_REPLY) {
                        CHECK_STR_EQ(fs.reply_body, "RBAC: access denied");
                        CHECK_STR_EQ(fs.reply_details,
                                     "rbac_access_denied_matched_policy[ns[bookinfo]-"
                                     "policy[ratings-no-writes]-rule[0]]");
                }
                rq_done(&q);
        }
        flt_rbac_http_ops.conf_free(conf);
        xds_pbjson_message_free(m);
        xds_resources_free(res);
}

/* ---- network RBAC ---- */

static struct flt_rbac_net *net_new(const char *json, int *ret_r)
{
        ProtobufCMessage *m =
            decode(&envoy__extensions__filters__network__rbac__v3__rbac__descriptor, json);
        if (!m) {
                *ret_r = -1000;
                return NULL;
        }
        struct flt_rbac_net *n = NULL;
        const char *e = NULL;
        bool heap = false;
        last_err[0] = '\0';
        *ret_r = flt_rbac_net_new(m, &n, &e, &heap);
        if (*ret_r < 0) {
                snprintf(last_err, sizeof(last_err), "%s", e);
                if (heap)
                        wp_free((void *)e);
        }
        xds_pbjson_message_free(m);
        return n;
}

static void test_network_rbac_on_connection_facts(void)
{
        int r;
        /* TCP policy for mongodb: allow the reviews SA on port 27017, deny nothing else;
         * a header matcher can never match without a request. */
        struct flt_rbac_net *n = net_new(
            "{\"stat_prefix\":\"tcp.\",\"delay_deny\":\"1.5s\",\"rules\":{\"policies\":{"
            "\"ns[bookinfo]-policy[mongo]-rule[0]\":{"
            "\"permissions\":[{\"and_rules\":{\"rules\":[{\"destination_port\":27017},"
            "{\"destination_ip\":{\"address_prefix\":\"127.200.0.6\",\"prefix_len\":32}}]}}],"
            "\"principals\":[{\"filter_state\":{\"key\":\"io.istio.peer_principal\","
            "\"string_match\":{\"safe_regex\":{\"regex\":\"spiffe://.+/ns/bookinfo/(.+/|)sa/"
            "bookinfo-reviews(/.+)?\"}}}}]},"
            "\"hdr\":{\"permissions\":[{\"header\":{\"name\":\":method\",\"present_match\":true}}],"
            "\"principals\":[{\"any\":true}]}}},"
            "\"shadow_rules\":{\"action\":\"DENY\",\"policies\":{\"from-10\":{"
            "\"permissions\":[{\"any\":true}],\"principals\":[{\"remote_ip\":{"
            "\"address_prefix\":\"10.0.0.0\",\"prefix_len\":8}}]}}}}",
            &r);
        REQUIRE(r == 0 && n);
        CHECK_STR_EQ(flt_rbac_net_stat_prefix(n), "tcp.");
        CHECK_INT_EQ(flt_rbac_net_delay_deny_ms(n), 1500);
        struct sockaddr_storage src, dst;
        set_addr(&src, "127.0.22.1", 5555);
        set_addr(&dst, "127.200.0.6", 27017);
        struct flt_rbac_facts f = {
            .peer_principal = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews",
            .src = &src,
            .dst = &dst,
        };
        struct flt_rbac_net_decision d;
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(d.allowed);
        CHECK_STR_EQ(d.policy, "ns[bookinfo]-policy[mongo]-rule[0]");
        CHECK(d.shadow_evaluated && !d.shadow_denied);

        f.peer_principal = PRODUCT;
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(!d.allowed);
        CHECK_STR_EQ(d.details, "rbac_access_denied_matched_policy[none]");

        /* a request in the facts is ignored: header matchers see nothing */
        struct rq q;
        rq_init(&q, "GET", "/");
        f.req = &q.req;
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(!d.allowed);
        rq_done(&q);
        f.req = NULL;

        f.peer_principal = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews";
        set_addr(&dst, "127.200.0.6", 27018);
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(!d.allowed);
        set_addr(&dst, "127.200.0.6", 27017);
        set_addr(&src, "10.9.9.9", 5555);
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(d.allowed && d.shadow_denied);
        CHECK_STR_EQ(d.shadow_policy, "from-10");
        flt_rbac_net_free(n);

        /* no rules: allowed */
        n = net_new("{\"stat_prefix\":\"x\"}", &r);
        REQUIRE(r == 0 && n);
        REQUIRE(flt_rbac_net_check(n, &f, &d) == 0);
        CHECK(d.allowed && !d.shadow_evaluated);
        flt_rbac_net_free(n);

        n = net_new("{\"rules\":{\"policies\":{\"p\":{\"permissions\":[{\"matcher\":{\"name\":"
                    "\"x\"}}],\"principals\":[{\"any\":true}]}}}}",
                    &r);
        CHECK_INT_EQ(r, -EINVAL);
        CHECK(n == NULL);
        CHECK_STR_EQ(last_err, "rules.policies[\"p\"].permissions[0].matcher: not supported");
        n = net_new("{\"delay_deny\":\"-1s\"}", &r);
        CHECK_INT_EQ(r, -EINVAL);
        flt_rbac_net_free(n);
}

/* ---- compile errors ---- */

static void test_compile_errors_name_the_field(void)
{
#define POL(perm, princ)                                                                           \
        "{\"policies\":{\"p\":{\"permissions\":[" perm "],\"principals\":[" princ "]}}}"
#define ANY "{\"any\":true}"
        static const struct {
                const char *json;
                int err;
                const char *desc;
        } cases[] = {
            {POL("{\"matcher\":{\"name\":\"m\"}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].matcher: not supported"},
            {POL("{\"sourced_metadata\":{}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].sourced_metadata: not supported"},
            {POL(ANY, "{\"custom\":{\"name\":\"c\"}}"), -EINVAL,
             "rules.policies[\"p\"].principals[0].custom: not supported"},
            {POL(ANY, "{\"sourced_metadata\":{}}"), -EINVAL,
             "rules.policies[\"p\"].principals[0].sourced_metadata: not supported"},
            {POL(ANY, "{\"and_ids\":{\"ids\":[{\"not_id\":{\"filter_state\":{\"key\":"
                      "\"io.istio.local_principal\",\"string_match\":{\"exact\":\"x\"}}}}]}}"),
             -EINVAL,
             "rules.policies[\"p\"].principals[0].and_ids.ids[0].not_id.filter_state: key "
             "\"io.istio.local_principal\" is not supported (only io.istio.peer_principal)"},
            {POL(ANY, "{\"filter_state\":{\"key\":\"io.istio.peer_principal\"}}"), -EINVAL,
             "rules.policies[\"p\"].principals[0].filter_state: filter_state matcher without "
             "string_match"},
            {POL("{\"and_rules\":{\"rules\":[" ANY
                 ",{\"url_path\":{\"path\":{\"prefix\":\"\"}}}]}}",
                 ANY),
             -EINVAL,
             "rules.policies[\"p\"].permissions[0].and_rules.rules[1].url_path.path: "
             "empty prefix"},
            {POL("{\"url_path\":{}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].url_path: path matcher without a rule"},
            {POL("{\"header\":{\"name\":\"x\",\"string_match\":{}}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].header.string_match: string matcher without "
             "a match pattern"},
            {POL("{\"header\":{\"name\":\"x\",\"string_match\":{\"custom\":{\"name\":\"c\"}}}}",
                 ANY),
             -EINVAL,
             "rules.policies[\"p\"].permissions[0].header.string_match.custom: not "
             "supported"},
            {POL("{\"header\":{\"string_match\":{\"exact\":\"x\"}}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].header: header matcher without a name"},
            {POL("{\"header\":{\"name\":\"x\",\"prefix_match\":\"\"}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].header: empty header match value"},
            {POL(ANY, "{\"authenticated\":{\"principal_name\":{\"safe_regex\":{\"regex\":\"a\"},"
                      "\"ignore_case\":true}}}"),
             -EINVAL,
             "rules.policies[\"p\"].principals[0].authenticated.principal_name: ignore_case has "
             "no effect for safe_regex"},
            {POL(ANY,
                 "{\"authenticated\":{\"principal_name\":{\"safe_regex\":{\"regex\":\"a(\"}}}}"),
             -EINVAL,
             "rules.policies[\"p\"].principals[0].authenticated.principal_name: safe_regex "
             "\"a(\": missing ): a("},
            {POL(ANY, "{\"direct_remote_ip\":{\"address_prefix\":\"10.0.0.300\"}}"), -EINVAL,
             "rules.policies[\"p\"].principals[0].direct_remote_ip: address_prefix "
             "\"10.0.0.300\" is not an IP address"},
            {POL(ANY, "{\"remote_ip\":{\"address_prefix\":\"10.0.0.0\",\"prefix_len\":33}}"),
             -EINVAL,
             "rules.policies[\"p\"].principals[0].remote_ip: prefix_len 33 is longer than 32"},
            {POL("{\"any\":false}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].any: must be true"},
            {POL("{}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0]: permission without a rule"},
            {POL(ANY, "{}"), -EINVAL,
             "rules.policies[\"p\"].principals[0]: principal without an identifier"},
            {POL("{\"or_rules\":{}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].or_rules: empty rules"},
            {POL(ANY, "{\"and_ids\":{}}"), -EINVAL,
             "rules.policies[\"p\"].principals[0].and_ids: empty ids"},
            {POL("{\"destination_port\":65536}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].destination_port: 65536 is not a port"},
            {POL("{\"destination_port_range\":{\"start\":-1,\"end\":5}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].destination_port_range: port range [-1, 5) "
             "out of [0, 65536]"},
            {POL("{\"metadata\":{\"filter\":\"f\",\"value\":{\"present_match\":true}}}", ANY),
             -EINVAL,
             "rules.policies[\"p\"].permissions[0].metadata: metadata matcher without a "
             "path"},
            {POL("{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"k\"}]}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].metadata: metadata matcher without a value"},
            {POL("{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"k\"}],\"value\":{"
                 "\"or_match\":{\"value_matchers\":[{\"present_match\":true}]}}}}",
                 ANY),
             -EINVAL,
             "rules.policies[\"p\"].permissions[0].metadata.value: or_match needs at "
             "least 2 value_matchers"},
            {POL("{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"k\"}],\"value\":{"
                 "\"list_match\":{\"one_of\":{\"string_match\":{\"suffix\":\"\"}}}}}}",
                 ANY),
             -EINVAL,
             "rules.policies[\"p\"].permissions[0].metadata.value.list_match.one_of."
             "string_match: empty suffix"},
            {POL("{\"uri_template\":{\"name\":\"u\"}}", ANY), -EINVAL,
             "rules.policies[\"p\"].permissions[0].uri_template: typed_config: not a "
             "UriTemplateMatchConfig"},
            {"{\"policies\":{\"p\":{\"permissions\":[" ANY "]}}}", -EINVAL,
             "rules.policies[\"p\"]: policy needs at least one principal"},
            {"{\"policies\":{\"p\":{\"principals\":[" ANY "]}}}", -EINVAL,
             "rules.policies[\"p\"]: policy needs at least one permission"},
            {"{\"action\":7}", -EINVAL, "rules: action 7 is not supported"},
        };
        for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
                struct flt_rbac_engine *e = NULL;
                int r = compile(cases[i].json, &e);
                if (r != cases[i].err || strcmp(last_err, cases[i].desc))
                        fprintf(stderr, "error case %zu: %d \"%s\"\n", i, r, last_err);
                CHECK_INT_EQ(r, cases[i].err);
                CHECK_STR_EQ(last_err, cases[i].desc);
                CHECK(e == NULL);
        }
#undef POL
#undef ANY
}

static void test_unknown_fields_are_rejected(void)
{
        /* A CEL condition (Policy field 3) is not in our proto subset: it arrives as an unknown
         * field and must fail the config, not be ignored (that would widen an ALLOW). */
        static const uint8_t policy_bytes[] = {
            0x0a, 0x02, 0x18, 0x01, /* permissions: [{any: true}] */
            0x12, 0x02, 0x18, 0x01, /* principals: [{any: true}] */
            0x1a, 0x00,             /* condition: {} */
        };
        ProtobufCMessage *pol = NULL;
        const char *e = NULL;
        REQUIRE(xds_pb_unpack(&envoy__config__rbac__v3__policy__descriptor, policy_bytes,
                              sizeof(policy_bytes), &pol, &e) == 0);
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry ent =
            ENVOY__CONFIG__RBAC__V3__RBAC__POLICIES_ENTRY__INIT;
        ent.key = "cel";
        ent.value = (Envoy__Config__Rbac__V3__Policy *)pol;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry *ents[] = {&ent};
        Envoy__Config__Rbac__V3__RBAC rbac = ENVOY__CONFIG__RBAC__V3__RBAC__INIT;
        rbac.n_policies = 1;
        rbac.policies = ents;
        struct flt_rbac_engine *eng = NULL;
        bool heap = false;
        CHECK_INT_EQ(flt_rbac_engine_new(&rbac.base, "rules", &eng, &e, &heap), -EINVAL);
        CHECK_STR_EQ(
            e, "rules.policies[\"cel\"]: field 3 of envoy.config.rbac.v3.Policy is not supported");
        if (heap)
                wp_free((void *)e);
        CHECK(eng == NULL);
        xds_pbjson_message_free(pol);
}

static void test_nesting_and_size_limits(void)
{
        enum { DEPTH = FLT_RBAC_MAX_DEPTH + 2 };
        static Envoy__Config__Rbac__V3__Permission chain[DEPTH];
        for (int i = 0; i < DEPTH; i++) {
                Envoy__Config__Rbac__V3__Permission init =
                    ENVOY__CONFIG__RBAC__V3__PERMISSION__INIT;
                chain[i] = init;
                if (i == DEPTH - 1) {
                        chain[i].rule_case = ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_ANY;
                        chain[i].any = 1;
                } else {
                        chain[i].rule_case = ENVOY__CONFIG__RBAC__V3__PERMISSION__RULE_NOT_RULE;
                        chain[i].not_rule = &chain[i + 1];
                }
        }
        Envoy__Config__Rbac__V3__Principal any = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__INIT;
        any.identifier_case = ENVOY__CONFIG__RBAC__V3__PRINCIPAL__IDENTIFIER_ANY;
        any.any = 1;
        Envoy__Config__Rbac__V3__Principal *princs[] = {&any};
        Envoy__Config__Rbac__V3__Permission *perms[] = {&chain[0]};
        Envoy__Config__Rbac__V3__Policy pol = ENVOY__CONFIG__RBAC__V3__POLICY__INIT;
        pol.n_permissions = 1;
        pol.permissions = perms;
        pol.n_principals = 1;
        pol.principals = princs;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry ent =
            ENVOY__CONFIG__RBAC__V3__RBAC__POLICIES_ENTRY__INIT;
        ent.key = "deep";
        ent.value = &pol;
        Envoy__Config__Rbac__V3__RBAC__PoliciesEntry *ents[] = {&ent};
        Envoy__Config__Rbac__V3__RBAC rbac = ENVOY__CONFIG__RBAC__V3__RBAC__INIT;
        rbac.n_policies = 1;
        rbac.policies = ents;
        struct flt_rbac_engine *e = NULL;
        const char *d = NULL;
        bool heap = false;
        CHECK_INT_EQ(flt_rbac_engine_new(&rbac.base, "rules", &e, &d, &heap), -E2BIG);
        CHECK(d && strstr(d, "nested deeper than") != NULL);
        if (heap)
                wp_free((void *)d);
        /* just inside the limit compiles and evaluates (an odd number of nots) */
        perms[0] = &chain[DEPTH - 1 - FLT_RBAC_MAX_DEPTH];
        REQUIRE(flt_rbac_engine_new(&rbac.base, "rules", &e, &d, &heap) == 0);
        struct rq q;
        rq_init(&q, "GET", "/");
        CHECK_INT_EQ(allowed(e, &q.f), FLT_RBAC_MAX_DEPTH % 2 ? 0 : 1);
        rq_done(&q);
        flt_rbac_engine_free(e);
}

/* ---- failalloc ---- */

#define BIG_POLICY                                                                                 \
        "{\"permissions\":[{\"and_rules\":{\"rules\":["                                            \
        "{\"or_rules\":{\"rules\":[{\"header\":{\"name\":\":method\",\"string_match\":{\"exact\":" \
        "\"POST\"}}},{\"header\":{\"name\":\"X-Y\",\"safe_regex_match\":{\"regex\":\"a.*\"}}}]}}," \
        "{\"not_rule\":{\"url_path\":{\"path\":{\"prefix\":\"/h\",\"ignore_case\":true}}}},"       \
        "{\"destination_ip\":{\"address_prefix\":\"fd00::\",\"prefix_len\":8}},"                   \
        "{\"destination_port_range\":{\"start\":1,\"end\":2}},"                                    \
        "{\"metadata\":{\"filter\":\"f\",\"path\":[{\"key\":\"a\"},{\"key\":\"b\"}],\"value\":{"   \
        "\"or_match\":{\"value_matchers\":[{\"list_match\":{\"one_of\":{\"string_match\":{"        \
        "\"exact\":\"x\"}}}},{\"string_match\":{\"exact\":\"x\"}}]}}}},"                           \
        "{\"requested_server_name\":{\"suffix\":\".x\"}}]}}],"                                     \
        "\"principals\":[{\"or_ids\":{\"ids\":["                                                   \
        "{\"filter_state\":{\"key\":\"io.istio.peer_principal\",\"string_match\":{\"safe_regex\":" \
        "{\"regex\":\"spiffe://.+/ns/a/(.+/|)sa/b(/.+)?\"}}}},"                                    \
        "{\"authenticated\":{\"principal_name\":{\"contains\":\"x\"}}},"                           \
        "{\"not_id\":{\"direct_remote_ip\":{\"address_prefix\":\"10.0.0.0\",\"prefix_len\":8}}},"  \
        "{\"header\":{\"name\":\"x\",\"range_match\":{\"start\":\"1\",\"end\":\"2\"}}}]}}]}"

static const char *const big_config =
    "{\"rules\":{\"action\":\"DENY\",\"policies\":{"
    "\"a\":" BIG_POLICY ","
    "\"b\":{\"permissions\":[{\"any\":true}],\"principals\":[{\"any\":true}]}}},"
    "\"shadow_rules\":{\"policies\":{\"s\":{\"permissions\":[{\"any\":true}],"
    "\"principals\":[{\"remote_ip\":{\"address_prefix\":\"1.2.3.4\"}}]}}},"
    "\"rules_stat_prefix\":\"p\"}";

struct fa_arg {
        const ProtobufCMessage *m;
        int want; /* what POST /x gets */
};

static int fa_compile_body(void *arg)
{
        const struct fa_arg *a = arg;
        const ProtobufCMessage *m = a->m;
        void *conf = NULL;
        const char *e = NULL;
        bool heap = false;
        int r = flt_rbac_http_ops.conf_new(m, &conf, &e, &heap);
        if (heap)
                wp_free((void *)e);
        if (r < 0)
                return r;
        /* the compiled config works */
        struct rq q;
        rq_init(&q, "POST", "/x");
        struct flt_stream fs;
        struct flt_rbac_stream_state st;
        int got = run_filter(conf, &q, &fs, &st);
        rq_done(&q);
        flt_rbac_http_ops.conf_free(conf);
        return got == a->want ? 0 : -EPROTO;
}

static void test_compile_survives_allocation_failures(void)
{
        ProtobufCMessage *m =
            decode(&envoy__extensions__filters__http__rbac__v3__rbac__descriptor, big_config);
        REQUIRE(m != NULL);
        struct fa_arg a = {m, FLT_REPLY};
        CHECK_INT_EQ(fa_compile_body(&a), 0);
        unsigned points = check_failalloc_run(fa_compile_body, &a);
        fprintf(stderr, "failalloc: %u allocation points\n", points);
        CHECK(points >= 6);
        xds_pbjson_message_free(m);

        /* many policies: the pool spans several blocks, so failures land inside the trees */
        size_t cap = 64 * (sizeof(BIG_POLICY) + 16) + 256, off = 0;
        char *json = malloc(cap);
        REQUIRE(json != NULL);
        off += (size_t)snprintf(json + off, cap - off,
                                "{\"rules\":{\"action\":\"DENY\","
                                "\"policies\":{");
        for (int i = 0; i < 64; i++)
                off += (size_t)snprintf(json + off, cap - off, "%s\"p%02d\":%s", i ? "," : "", i,
                                        BIG_POLICY);
        snprintf(json + off, cap - off, "}}}");
        m = decode(&envoy__extensions__filters__http__rbac__v3__rbac__descriptor, json);
        free(json);
        REQUIRE(m != NULL);
        a = (struct fa_arg){m, FLT_CONTINUE};
        CHECK_INT_EQ(fa_compile_body(&a), 0);
        points = check_failalloc_run(fa_compile_body, &a);
        fprintf(stderr, "failalloc (64 policies): %u allocation points\n", points);
        CHECK(points >= 10);
        xds_pbjson_message_free(m);
}

static int fa_net_body(void *arg)
{
        const ProtobufCMessage *m = arg;
        struct flt_rbac_net *n = NULL;
        const char *e = NULL;
        bool heap = false;
        int r = flt_rbac_net_new(m, &n, &e, &heap);
        if (heap)
                wp_free((void *)e);
        if (r < 0)
                return r;
        flt_rbac_net_free(n);
        return 0;
}

static void test_network_compile_survives_allocation_failures(void)
{
        ProtobufCMessage *m =
            decode(&envoy__extensions__filters__network__rbac__v3__rbac__descriptor,
                   "{\"stat_prefix\":\"s\",\"rules\":{\"policies\":{\"p\":{\"permissions\":[{"
                   "\"destination_port\":1}],\"principals\":[{\"filter_state\":{\"key\":"
                   "\"io.istio.peer_principal\",\"string_match\":{\"prefix\":\"spiffe://\"}}}]}}},"
                   "\"shadow_rules\":{\"policies\":{\"p\":{\"permissions\":[{\"any\":true}],"
                   "\"principals\":[{\"any\":true}]}}}}");
        REQUIRE(m != NULL);
        CHECK(check_failalloc_run(fa_net_body, m) > 4);
        xds_pbjson_message_free(m);
}

int main(void)
{
        RUN(test_string_matcher_kinds);
        RUN(test_authenticated_principal);
        RUN(test_header_matcher_kinds);
        RUN(test_header_long_joined_value_uses_heap_and_fails_closed);
        RUN(test_url_path_ignores_query_and_fragment);
        RUN(test_uri_template_paths);
        RUN(test_ip_and_port_matchers);
        RUN(test_requested_server_name);
        RUN(test_metadata_jwt_claims);
        RUN(test_and_or_not_nesting);
        RUN(test_actions_allow_deny_log);
        RUN(test_duplicate_policy_names_last_wins);
        RUN(test_http_filter_registry_and_ops);
        RUN(test_fixture_productpage_allows_only_ingress_get_head);
        RUN(test_fixture_ratings_denies_writes_except_health);
        RUN(test_network_rbac_on_connection_facts);
        RUN(test_compile_errors_name_the_field);
        RUN(test_unknown_fields_are_rejected);
        RUN(test_nesting_and_size_limits);
        RUN(test_compile_survives_allocation_failures);
        RUN(test_network_compile_survives_allocation_failures);
        return check_exit();
}
