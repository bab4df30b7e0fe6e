/* Tests for waypoint/accesslog.c: operators (text and typed JSON), Istio/Envoy default formats,
 * truncation, escaping, compile errors, AccessLog configs and filters, failalloc. */
#include <arpa/inet.h>
#include <errno.h>
#include <json-c/json.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "waypoint/accesslog.h"
#include "waypoint/base/alloc.h"
#include "xds-client/pbjson.h"
#include "xdsproto.h"

/* ---- a known context ---------------------------------------------------------------- */

static struct wp_http_request req;
static struct wp_http_response resp;
static struct wp_headers trailers;
static struct sockaddr_in up_host, up_local, dn_local, dn_remote;
static struct sockaddr_in6 v6;
static const struct wp_al_kv fstate[] = {
        {"envoy.filters.listener.original_dst.local_ip", "10.244.0.10:80"},
        {"other", "x"},
};

static void sin_set(struct sockaddr_in *s, const char *ip, unsigned port)
{
        memset(s, 0, sizeof(*s));
        s->sin_family = AF_INET;
        s->sin_port = htons((uint16_t)port);
        inet_pton(AF_INET, ip, &s->sin_addr);
}

static void hdr(struct wp_headers *h, const char *n, const char *v)
{
        REQUIRE(wp_headers_add(h, n, (uint32_t)strlen(n), v, (uint32_t)strlen(v)) == 0);
}

static void fixture_init(void)
{
        memset(&req, 0, sizeof(req));
        req.method = "GET";
        req.scheme = "http";
        req.authority = "productpage:9080";
        req.path = "/productpage?u=1";
        req.version = WP_HTTP_11;
        req.content_length = -1;
        wp_headers_init(&req.headers);
        hdr(&req.headers, "user-agent", "curl/8.0");
        hdr(&req.headers, "x-request-id", "abc-123");
        memset(&resp, 0, sizeof(resp));
        resp.status = 200;
        resp.version = WP_HTTP_11;
        wp_headers_init(&resp.headers);
        hdr(&resp.headers, "x-envoy-upstream-service-time", "4");
        hdr(&resp.headers, "content-type", "text/html");
        wp_headers_init(&trailers);
        hdr(&trailers, "grpc-status", "0");
        sin_set(&up_host, "10.0.0.5", 9080);
        sin_set(&up_local, "10.0.0.9", 40000);
        sin_set(&dn_local, "10.96.0.10", 9080);
        sin_set(&dn_remote, "10.0.0.7", 51234);
        memset(&v6, 0, sizeof(v6));
        v6.sin6_family = AF_INET6;
        v6.sin6_port = htons(443);
        inet_pton(AF_INET6, "fd00::1", &v6.sin6_addr);
}

static void fixture_done(void)
{
        wp_headers_done(&req.headers);
        wp_headers_done(&resp.headers);
        wp_headers_done(&trailers);
}

#define MS 1000000ULL

static struct wp_al_ctx http_ctx(void)
{
        struct wp_al_ctx c = {
                .start_unix_ns = 1700000000123456789LL, /* 2023-11-14T22:13:20.123456789Z */
                .start_ns = 1000 * MS,
                .request_end_ns = 1000 * MS + 2 * MS + MS / 2,
                .upstream_first_byte_ns = 1000 * MS + 5 * MS,
                .end_ns = 1000 * MS + 7 * MS + 9 * MS / 10,
                .bytes_received = 0,
                .bytes_sent = 295,
                .response_code = 200,
                .upstream_request_attempt_count = 1,
                .req = &req,
                .resp = &resp,
                .resp_trailers = &trailers,
                .response_code_details = "via_upstream",
                .upstream_cluster = "inbound-vip|9080|http|productpage.default.svc.cluster.local",
                .route_name = "default",
                .downstream_peer_uri_san = "spiffe://cluster.local/ns/default/sa/sleep",
                .downstream_local_uri_san = "spiffe://cluster.local/ns/default/sa/waypoint",
                .upstream_host = (const struct sockaddr *)&up_host,
                .upstream_local = (const struct sockaddr *)&up_local,
                .downstream_local = (const struct sockaddr *)&dn_local,
                .downstream_remote = (const struct sockaddr *)&dn_remote,
                .filter_state = fstate,
                .n_filter_state = 2,
        };
        return c;
}

/* Renders fmt (text) for c; returns a static buffer. */
static char line[8192];

static const char *render_text(const char *fmt, unsigned flags, const struct wp_al_ctx *c)
{
        struct wp_al_format *f = NULL;
        const char *err = NULL;
        int r = wp_al_format_compile_text(fmt, strlen(fmt), flags, &f, &err);
        if (r < 0) {
                fprintf(stderr, "compile %s: %s\n", fmt, err);
                CHECK(0);
                return "";
        }
        ssize_t n = wp_al_format_render(f, c, line, sizeof(line), NULL);
        CHECK(n >= 0 && (size_t)n == strlen(line));
        wp_al_format_free(f);
        return line;
}

/* Renders {"k": fmt} typed JSON and returns what follows "{\"k\":" without the "}\n". */
static const char *render_json_value(const char *fmt, unsigned flags, const struct wp_al_ctx *c)
{
        struct wp_al_json_field fld = {"k", fmt};
        struct wp_al_format *f = NULL;
        const char *err = NULL;
        if (wp_al_format_compile_json_fields(&fld, 1, flags, &f, &err) < 0) {
                fprintf(stderr, "compile %s: %s\n", fmt, err);
                CHECK(0);
                return "";
        }
        CHECK(wp_al_format_is_json(f));
        ssize_t n = wp_al_format_render(f, c, line, sizeof(line), NULL);
        wp_al_format_free(f);
        if (n < 7) {
                CHECK(n >= 7);
                return "";
        }
        if (strncmp(line, "{\"k\":", 5) != 0) /* omitted */
                return line;
        CHECK(strcmp(line + n - 2, "}\n") == 0);
        line[n - 2] = '\0';
        return line + 5;
}

/* ---- response flags ----------------------------------------------------------------- */

static void test_flags_table_names_parse_and_format(void)
{
        static const char *const want[] = {"LH", "UH", "UT",  "LR",    "UR",   "UF",   "UC", "UO",
                                           "NR", "DI", "FI",  "RL",    "UAEX", "RLSE", "DC", "URX",
                                           "SI", "IH", "DPE", "UMSDR", "RFCF", "NFCF", "DT", "UPE",
                                           "NC", "OM", "DF",  "DO",    "DR",   "UDO"};
        char buf[256];

        CHECK_INT_EQ(sizeof(want) / sizeof(want[0]), _WP_AL_FLAG_MAX);
        for (unsigned i = 0; i < _WP_AL_FLAG_MAX; i++) {
                CHECK_STR_EQ(wp_al_flag_name(i), want[i]);
                CHECK_INT_EQ(wp_al_flag_parse(want[i], strlen(want[i])), (int)i);
        }
        CHECK(wp_al_flag_name(_WP_AL_FLAG_MAX) == NULL);
        CHECK_INT_EQ(wp_al_flag_parse("XX", 2), -EINVAL);
        CHECK_INT_EQ(wp_al_flag_parse("U", 1), -EINVAL);
        CHECK_INT_EQ(wp_al_flag_parse("uh", 2), -EINVAL);

        CHECK_INT_EQ(wp_al_flags_format(0, buf, sizeof(buf)), 1);
        CHECK_STR_EQ(buf, "-");
        CHECK_INT_EQ(wp_al_flags_format(WP_AL_F(URX) | WP_AL_F(UF), buf, sizeof(buf)), 6);
        CHECK_STR_EQ(buf, "UF,URX"); /* Envoy's order, not the bit order of the call */
        CHECK_INT_EQ(wp_al_flags_format(WP_AL_F(NR), buf, sizeof(buf)), 2);
        CHECK_STR_EQ(buf, "NR");
        /* snprintf-style truncation */
        CHECK_INT_EQ(wp_al_flags_format(WP_AL_F(UH) | WP_AL_F(DC), buf, 4), 5);
        CHECK_STR_EQ(buf, "UH,");
        /* all flags */
        size_t n = wp_al_flags_format((UINT64_C(1) << _WP_AL_FLAG_MAX) - 1, buf, sizeof(buf));
        CHECK_INT_EQ(n, strlen(buf));
        CHECK(strncmp(buf, "LH,UH,UT,LR,UR,UF,UC,UO,NR,", 27) == 0);
        CHECK(strcmp(buf + n - 7, ",DR,UDO") == 0);
}

/* ---- operator tables ---------------------------------------------------------------- */

struct row {
        const char *fmt;
        const char *text; /* expected text rendering */
        const char *json; /* expected typed JSON value */
};

static const struct row rows[] = {
        {"%START_TIME%", "2023-11-14T22:13:20.123Z", "\"2023-11-14T22:13:20.123Z\""},
        {"%START_TIME(%Y/%m/%d %H:%M:%E6S)%", "2023/11/14 22:13:20.123456",
         "\"2023/11/14 22:13:20.123456\""},
        {"%START_TIME(%s.%3f|%f|%9f|%1f)%", "1700000000.123|123456789|123456789|1",
         "\"1700000000.123|123456789|123456789|1\""},
        {"%START_TIME(%%Y)%", "%Y", "\"%Y\""},
        {"%DURATION%", "7", "7"},
        {"%REQUEST_DURATION%", "2", "2"},
        {"%RESPONSE_DURATION%", "5", "5"},
        {"%RESPONSE_TX_DURATION%", "2", "2"},
        {"%RESPONSE_CODE%", "200", "200"},
        {"%RESPONSE_CODE_DETAILS%", "via_upstream", "\"via_upstream\""},
        {"%CONNECTION_TERMINATION_DETAILS%", "-", "null"},
        {"%UPSTREAM_TRANSPORT_FAILURE_REASON%", "-", "null"},
        {"%RESPONSE_FLAGS%", "-", "\"-\""},
        {"%BYTES_RECEIVED%", "0", "0"},
        {"%BYTES_SENT%", "295", "295"},
        {"%PROTOCOL%", "HTTP/1.1", "\"HTTP/1.1\""},
        {"%REQ(:METHOD)%", "GET", "\"GET\""},
        {"%REQ(:PATH)%", "/productpage?u=1", "\"/productpage?u=1\""},
        {"%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%", "/productpage?u=1", "\"/productpage?u=1\""},
        {"%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%", "/productpage", "\"/productpage\""},
        {"%REQ(:AUTHORITY)%", "productpage:9080", "\"productpage:9080\""},
        {"%REQ(:SCHEME)%", "http", "\"http\""},
        {"%REQ(User-Agent)%", "curl/8.0", "\"curl/8.0\""},
        {"%REQ(X-FORWARDED-FOR)%", "-", "null"},
        {"%REQ(X-MISSING?USER-AGENT)%", "curl/8.0", "\"curl/8.0\""},
        {"%REQ(USER-AGENT):4%", "curl", "\"curl\""},
        {"%REQ(USER-AGENT):0%", "", "\"\""},
        {"%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%", "4", "\"4\""},
        {"%RESP(:STATUS)%", "200", "\"200\""},
        {"%RESP(CONTENT-TYPE):4%", "text", "\"text\""},
        {"%TRAILER(GRPC-STATUS)%", "0", "\"0\""},
        {"%TRAILER(X-NONE)%", "-", "null"},
        {"%UPSTREAM_HOST%", "10.0.0.5:9080", "\"10.0.0.5:9080\""},
        {"%UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.0.5", "\"10.0.0.5\""},
        {"%UPSTREAM_CLUSTER%", "inbound-vip|9080|http|productpage.default.svc.cluster.local",
         "\"inbound-vip|9080|http|productpage.default.svc.cluster.local\""},
        {"%UPSTREAM_CLUSTER_RAW%", "inbound-vip|9080|http|productpage.default.svc.cluster.local",
         "\"inbound-vip|9080|http|productpage.default.svc.cluster.local\""},
        {"%UPSTREAM_LOCAL_ADDRESS%", "10.0.0.9:40000", "\"10.0.0.9:40000\""},
        {"%UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.0.0.9", "\"10.0.0.9\""},
        {"%DOWNSTREAM_LOCAL_ADDRESS%", "10.96.0.10:9080", "\"10.96.0.10:9080\""},
        {"%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT%", "10.96.0.10", "\"10.96.0.10\""},
        {"%DOWNSTREAM_REMOTE_ADDRESS%", "10.0.0.7:51234", "\"10.0.0.7:51234\""},
        {"%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%", "10.0.0.7", "\"10.0.0.7\""},
        {"%DOWNSTREAM_DIRECT_REMOTE_ADDRESS%", "10.0.0.7:51234", "\"10.0.0.7:51234\""},
        {"%DOWNSTREAM_PEER_URI_SAN%", "spiffe://cluster.local/ns/default/sa/sleep",
         "\"spiffe://cluster.local/ns/default/sa/sleep\""},
        {"%DOWNSTREAM_LOCAL_URI_SAN%", "spiffe://cluster.local/ns/default/sa/waypoint",
         "\"spiffe://cluster.local/ns/default/sa/waypoint\""},
        {"%REQUESTED_SERVER_NAME%", "-", "null"},
        {"%ROUTE_NAME%", "default", "\"default\""},
        {"%UPSTREAM_REQUEST_ATTEMPT_COUNT%", "1", "1"},
        {"%FILTER_STATE(envoy.filters.listener.original_dst.local_ip:PLAIN)%", "10.244.0.10:80",
         "\"10.244.0.10:80\""},
        {"%FILTER_STATE(other)%", "x", "\"x\""},
        {"%FILTER_STATE(absent:PLAIN)%", "-", "null"},
        {"%ENVIRONMENT(WP_AL_TEST_ENV)%", "env-value", "\"env-value\""},
        {"%ENVIRONMENT(WP_AL_TEST_UNSET)%", "-", "null"},
        {"%ENVIRONMENT(WP_AL_TEST_ENV):3%", "env", "\"env\""},
        /* mixed literal + commands is a string in JSON, with '-' for missing */
        {"%RESPONSE_CODE% %REQ(X-NONE)%", "200 -", "\"200 -\""},
        {"a%%b", "a%b", "\"a%b\""},
        {"", "", "\"\""},
        {"plain \"q\"", "plain \"q\"", "\"plain \\\"q\\\"\""},
};

/* Renders every row with the text or the typed JSON renderer and checks the matching column. */
static void check_rows(bool json)
{
        struct wp_al_ctx c = http_ctx();

        for (size_t i = 0; i < sizeof(rows) / sizeof(rows[0]); i++) {
                const char *want = json ? rows[i].json : rows[i].text;
                const char *got = json ? render_json_value(rows[i].fmt, 0, &c)
                                       : render_text(rows[i].fmt, 0, &c);
                if (strcmp(got, want) != 0)
                        fprintf(stderr, "  %s row %zu %s: got [%s] want [%s]\n",
                                json ? "json" : "text", i, rows[i].fmt, got, want);
                CHECK_STR_EQ(got, want);
        }
}

static void test_operators_render_text_table(void)
{
        check_rows(false);
}

static void test_operators_render_typed_json_table(void)
{
        check_rows(true);
}

static void test_hostname_is_resolved_at_compile_time(void)
{
        struct wp_al_ctx c = http_ctx();
        char host[256] = "";

        REQUIRE(gethostname(host, sizeof(host)) == 0);
        CHECK_STR_EQ(render_text("%HOSTNAME%", 0, &c), host[0] ? host : "-");
}

static void test_tcp_context_renders_missing_http_fields(void)
{
        struct wp_al_ctx c = http_ctx();

        c.req = NULL;
        c.resp = NULL;
        c.resp_trailers = NULL;
        c.response_code = 0;
        c.response_code_details = NULL;
        c.request_end_ns = 0;
        c.upstream_first_byte_ns = 0;
        c.response_flags = WP_AL_F(UF) | WP_AL_F(URX);
        c.upstream_transport_failure_reason = "delayed connect error: 111";
        c.connection_termination_details = "";
        CHECK_STR_EQ(render_text("%PROTOCOL% %RESPONSE_CODE% %REQ(:METHOD)% %RESP(:STATUS)% "
                                 "%TRAILER(A)% %REQUEST_DURATION% %RESPONSE_DURATION% "
                                 "%RESPONSE_FLAGS% %UPSTREAM_TRANSPORT_FAILURE_REASON% "
                                 "%CONNECTION_TERMINATION_DETAILS%",
                                 0, &c),
                     "- 0 - - - - - UF,URX delayed_connect_error:_111 -");
        CHECK_STR_EQ(render_json_value("%UPSTREAM_TRANSPORT_FAILURE_REASON%", 0, &c),
                     "\"delayed_connect_error:_111\"");
        CHECK_STR_EQ(render_json_value("%RESPONSE_FLAGS%", 0, &c), "\"UF,URX\"");
        CHECK_STR_EQ(render_json_value("%PROTOCOL%", 0, &c), "null");
        /* an open tunnel has no DURATION yet */
        c.end_ns = 0;
        CHECK_STR_EQ(render_text("%DURATION%", 0, &c), "-");
        CHECK_STR_EQ(render_json_value("%DURATION%", 0, &c), "null");
        /* HTTP/2 and HTTP/1.0 */
        struct wp_http_request r2 = req;
        r2.version = WP_HTTP_2;
        c.req = &r2;
        CHECK_STR_EQ(render_text("%PROTOCOL%", 0, &c), "HTTP/2");
        r2.version = WP_HTTP_10;
        CHECK_STR_EQ(render_text("%PROTOCOL%", 0, &c), "HTTP/1.0");
}

/* Envoy's upstream timing, byte, id, port and long-flag operators: text and typed JSON, HTTP
 * and TCP contexts, and their compile errors. Expected values are worked out from the context
 * by hand. */
static void test_upstream_timing_bytes_ids_ports_operators(void)
{
        static const struct {
                const char *fmt, *text, *json;
        } t[] = {
                {"%REQUEST_TX_DURATION%", "3", "3"},
                {"%UPSTREAM_CONNECTION_POOL_READY_DURATION%", "1", "1"},
                {"%ROUNDTRIP_DURATION%", "-", "null"},            /* HTTP/3 only */
                {"%DOWNSTREAM_HANDSHAKE_DURATION%", "-", "null"}, /* TCP only */
                {"%COMMON_DURATION(DS_RX_BEG:US_TX_END:us)%", "3250", "3250"},
                {"%COMMON_DURATION(US_RX_BEG:DS_TX_END:ns)%", "2900000", "2900000"},
                {"%COMMON_DURATION(US_CX_BEG:US_HS_END:us)%", "1250", "1250"},
                {"%COMMON_DURATION(US_TX_BEG:US_RX_BODY_BEG:ms)%", "3", "3"},
                {"%COMMON_DURATION(DS_RX_END:DS_TX_BEG:us)%", "3000", "3000"},
                {"%COMMON_DURATION(US_CX_END:US_RX_END:ms)%", "5", "5"},
                {"%COMMON_DURATION(DS_TX_END:DS_RX_BEG:ms)%", "-7", "-7"},
                {"%COMMON_DURATION(DS_RX_BEG:my.point:ms)%", "-", "null"},
                /* request: 37 header bytes + :method GET, :path, :authority, :scheme = 105 */
                {"%REQUEST_HEADERS_BYTES%", "105", "105"},
                /* response: 51 header bytes + :status 200 */
                {"%RESPONSE_HEADERS_BYTES%", "61", "61"},
                {"%RESPONSE_TRAILERS_BYTES%", "12", "12"},
                {"%UPSTREAM_WIRE_BYTES_SENT%", "101", "101"},
                {"%UPSTREAM_WIRE_BYTES_RECEIVED%", "102", "102"},
                {"%UPSTREAM_HEADER_BYTES_SENT%", "103", "103"},
                {"%UPSTREAM_HEADER_BYTES_RECEIVED%", "104", "104"},
                {"%DOWNSTREAM_WIRE_BYTES_SENT%", "105", "105"},
                {"%DOWNSTREAM_WIRE_BYTES_RECEIVED%", "106", "106"},
                {"%DOWNSTREAM_HEADER_BYTES_SENT%", "107", "107"},
                {"%DOWNSTREAM_HEADER_BYTES_RECEIVED%", "108", "108"},
                {"%UPSTREAM_PROTOCOL%", "HTTP/2", "\"HTTP/2\""},
                {"%CONNECTION_ID%", "42", "42"},
                {"%UPSTREAM_CONNECTION_ID%", "-", "null"},
                {"%UPSTREAM_REMOTE_PORT%", "9080", "9080"},
                {"%UPSTREAM_LOCAL_PORT%", "40000", "40000"},
                {"%DOWNSTREAM_LOCAL_PORT%", "9080", "9080"},
                {"%DOWNSTREAM_REMOTE_PORT%", "51234", "51234"},
                {"%DOWNSTREAM_DIRECT_REMOTE_PORT%", "51234", "51234"},
                {"%RESPONSE_FLAGS_LONG%", "UpstreamConnectionFailure,UpstreamRetryLimitExceeded",
                 "\"UpstreamConnectionFailure,UpstreamRetryLimitExceeded\""},
                {"%CONNECTION_ID%:%UPSTREAM_PROTOCOL%", "42:HTTP/2", "\"42:HTTP/2\""},
        };
        static const char *const bad[] = {
                "%COMMON_DURATION%",
                "%COMMON_DURATION(DS_RX_BEG:DS_TX_END)%",
                "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:s)%",
                "%COMMON_DURATION(DS_RX_BEG:DS_TX_END:ms:x)%",
                "%COMMON_DURATION(:DS_TX_END:ms)%",
                "%REQUEST_TX_DURATION(x)%",
                "%CONNECTION_ID(1)%",
        };
        struct wp_al_ctx c = http_ctx();
        struct wp_al_format *f = NULL;
        const char *err = NULL;

        c.upstream_request_start_ns = 1000 * MS + MS / 2;
        c.upstream_pool_ready_ns = 1002 * MS;
        c.upstream_connect_start_ns = 1000 * MS + 6 * MS / 10;
        c.upstream_connect_end_ns = 1001 * MS;
        c.upstream_handshake_end_ns = 1001 * MS + 85 * MS / 100;
        c.upstream_tx_begin_ns = 1002 * MS;
        c.upstream_tx_end_ns = 1003 * MS + MS / 4;
        c.upstream_last_byte_ns = 1006 * MS + MS / 2;
        c.upstream_rx_body_begin_ns = 1005 * MS + MS / 2;
        c.downstream_tx_begin_ns = 1005 * MS + MS / 2;
        c.upstream_wire_bytes_sent = 101;
        c.upstream_wire_bytes_received = 102;
        c.upstream_header_bytes_sent = 103;
        c.upstream_header_bytes_received = 104;
        c.downstream_wire_bytes_sent = 105;
        c.downstream_wire_bytes_received = 106;
        c.downstream_header_bytes_sent = 107;
        c.downstream_header_bytes_received = 108;
        c.upstream_protocol = 1 + WP_HTTP_2;
        c.connection_id = 42;
        c.response_flags = WP_AL_F(UF) | WP_AL_F(URX);
        c.downstream_conn_start_ns = 990 * MS;
        c.downstream_handshake_end_ns = 994 * MS + MS / 2;
        for (size_t i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
                const char *got = render_text(t[i].fmt, 0, &c);

                if (strcmp(got, t[i].text))
                        fprintf(stderr, "  %s: got [%s] want [%s]\n", t[i].fmt, got, t[i].text);
                CHECK_STR_EQ(got, t[i].text);
                got = render_json_value(t[i].fmt, 0, &c);
                if (strcmp(got, t[i].json))
                        fprintf(stderr, "  json %s: got [%s] want [%s]\n", t[i].fmt, got,
                                t[i].json);
                CHECK_STR_EQ(got, t[i].json);
        }
        c.response_flags = 0;
        CHECK_STR_EQ(render_text("%RESPONSE_FLAGS_LONG%", 0, &c), "-");
        c.downstream_remote = (const struct sockaddr *)&v6;
        CHECK_STR_EQ(render_text("%DOWNSTREAM_REMOTE_PORT%", 0, &c), "443");

        /* TCP: HTTP-only values are missing (or 0 for byte counts), the handshake is there */
        c.req = NULL;
        c.resp = NULL;
        c.resp_trailers = NULL;
        c.upstream_protocol = 0;
        c.upstream_tx_end_ns = 0;
        CHECK_STR_EQ(render_text("%DOWNSTREAM_HANDSHAKE_DURATION% %COMMON_DURATION(DS_RX_BEG:"
                                 "DS_TX_END:ms)% %REQUEST_HEADERS_BYTES% %RESPONSE_HEADERS_BYTES% "
                                 "%RESPONSE_TRAILERS_BYTES% %UPSTREAM_PROTOCOL% "
                                 "%REQUEST_TX_DURATION% %UPSTREAM_WIRE_BYTES_SENT%",
                                 0, &c),
                     "4 - 0 0 0 - - 101");
        CHECK_STR_EQ(render_json_value("%DOWNSTREAM_HANDSHAKE_DURATION%", 0, &c), "4");
        CHECK_STR_EQ(render_json_value("%UPSTREAM_PROTOCOL%", 0, &c), "null");
        c.downstream_handshake_end_ns = 0;
        CHECK_STR_EQ(render_text("%DOWNSTREAM_HANDSHAKE_DURATION%", 0, &c), "-");
        c.downstream_local = NULL;
        CHECK_STR_EQ(render_text("%DOWNSTREAM_LOCAL_PORT%", 0, &c), "-");

        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                err = NULL;
                CHECK_INT_EQ(wp_al_format_compile_text(bad[i], strlen(bad[i]), 0, &f, &err),
                             -EINVAL);
                CHECK(err && (strstr(err, "COMMON_DURATION") || strstr(err, "argument")));
        }
}

static void test_ipv6_addresses_are_bracketed_with_port(void)
{
        struct wp_al_ctx c = http_ctx();

        c.downstream_remote = (const struct sockaddr *)&v6;
        CHECK_STR_EQ(
                render_text("%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                            0, &c),
                "[fd00::1]:443 fd00::1");
        struct sockaddr bogus = {.sa_family = AF_UNIX};
        c.downstream_remote = &bogus;
        CHECK_STR_EQ(render_text("%DOWNSTREAM_REMOTE_ADDRESS%", 0, &c), "-");
}

static void test_omit_empty_values_text_and_json(void)
{
        struct wp_al_ctx c = http_ctx();

        CHECK_STR_EQ(render_text("[%REQ(X-NONE)%|%ROUTE_NAME%|%REQUESTED_SERVER_NAME%]",
                                 WP_AL_OMIT_EMPTY, &c),
                     "[|default|]");
        static const struct wp_al_json_field fl[] = {
                {"a", "%REQ(X-NONE)%"},
                {"b", "%ROUTE_NAME%"},
                {"c", "%REQUESTED_SERVER_NAME%"},
                {"d", "%REQ(X-NONE)% %ROUTE_NAME%"},
                {"e", "%REQ(X-NONE)%%REQ(X-NONE2)%"},
                {"f", "%REQ(USER-AGENT):0%"},
        };
        struct wp_al_format *f;
        const char *err;
        REQUIRE(wp_al_format_compile_json_fields(fl, 6, WP_AL_OMIT_EMPTY, &f, &err) == 0);
        REQUIRE(wp_al_format_render(f, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, "{\"b\":\"default\",\"d\":\" default\"}\n");
        wp_al_format_free(f);
        /* everything omitted: an empty object */
        REQUIRE(wp_al_format_compile_json_fields(fl, 1, WP_AL_OMIT_EMPTY, &f, &err) == 0);
        CHECK_INT_EQ(wp_al_format_render(f, &c, line, sizeof(line), NULL), 3);
        CHECK_STR_EQ(line, "{}\n");
        wp_al_format_free(f);
}

/* ---- default formats ---------------------------------------------------------------- */

static void test_istio_default_text_format_exact_line(void)
{
        struct wp_al_ctx c = http_ctx();

        CHECK_STR_EQ(render_text(wp_al_istio_text_format, 0, &c),
                     "[2023-11-14T22:13:20.123Z] \"GET /productpage?u=1 HTTP/1.1\" 200 - "
                     "via_upstream - \"-\" 0 295 7 4 \"-\" \"curl/8.0\" \"abc-123\" "
                     "\"productpage:9080\" \"10.0.0.5:9080\" "
                     "inbound-vip|9080|http|productpage.default.svc.cluster.local "
                     "10.0.0.9:40000 10.96.0.10:9080 10.0.0.7:51234 - default\n");

        /* A denied request: local reply, no upstream. */
        c.response_code = 403;
        c.response_code_details = "rbac_access_denied_matched_policy[none]";
        c.resp = NULL;
        c.upstream_host = NULL;
        c.upstream_local = NULL;
        c.bytes_sent = 19;
        CHECK_STR_EQ(render_text(wp_al_istio_text_format, 0, &c),
                     "[2023-11-14T22:13:20.123Z] \"GET /productpage?u=1 HTTP/1.1\" 403 - "
                     "rbac_access_denied_matched_policy[none] - \"-\" 0 19 7 - \"-\" "
                     "\"curl/8.0\" \"abc-123\" \"productpage:9080\" \"-\" "
                     "inbound-vip|9080|http|productpage.default.svc.cluster.local "
                     "- 10.96.0.10:9080 10.0.0.7:51234 - default\n");

        /* A TCP tunnel. */
        c = http_ctx();
        c.req = NULL;
        c.resp = NULL;
        c.response_code = 0;
        c.response_code_details = NULL;
        c.route_name = NULL;
        c.bytes_received = 1234;
        c.bytes_sent = 5678;
        c.end_ns = c.start_ns + 1500 * MS;
        CHECK_STR_EQ(render_text(wp_al_istio_text_format, 0, &c),
                     "[2023-11-14T22:13:20.123Z] \"- - -\" 0 - - - \"-\" 1234 5678 1500 - \"-\" "
                     "\"-\" \"-\" \"-\" \"10.0.0.5:9080\" "
                     "inbound-vip|9080|http|productpage.default.svc.cluster.local "
                     "10.0.0.9:40000 10.96.0.10:9080 10.0.0.7:51234 - -\n");
}

static void test_envoy_default_format_exact_line(void)
{
        struct wp_al_ctx c = http_ctx();

        CHECK_STR_EQ(render_text(wp_al_envoy_default_format, 0, &c),
                     "[2023-11-14T22:13:20.123Z] \"GET /productpage?u=1 HTTP/1.1\" 200 - 0 295 7 "
                     "4 \"-\" \"curl/8.0\" \"abc-123\" \"productpage:9080\" \"10.0.0.5:9080\"\n");
}

static void test_istio_default_json_format_exact_line(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_al_format *f;
        const char *err;

        REQUIRE(wp_al_format_compile_json_fields(wp_al_istio_json_format,
                                                 wp_al_istio_json_format_len, 0, &f, &err) == 0);
        ssize_t n = wp_al_format_render(f, &c, line, sizeof(line), NULL);
        CHECK(n > 0);
        CHECK_STR_EQ(
                line,
                "{\"start_time\":\"2023-11-14T22:13:20.123Z\",\"route_name\":\"default\","
                "\"method\":\"GET\",\"path\":\"/productpage?u=1\",\"protocol\":\"HTTP/1.1\","
                "\"response_code\":200,\"response_flags\":\"-\","
                "\"response_code_details\":\"via_upstream\","
                "\"connection_termination_details\":null,\"bytes_received\":0,"
                "\"bytes_sent\":295,\"duration\":7,\"upstream_service_time\":\"4\","
                "\"x_forwarded_for\":null,\"user_agent\":\"curl/8.0\","
                "\"request_id\":\"abc-123\",\"authority\":\"productpage:9080\","
                "\"upstream_host\":\"10.0.0.5:9080\","
                "\"upstream_cluster\":\"inbound-vip|9080|http|productpage.default.svc.cluster."
                "local\","
                "\"upstream_local_address\":\"10.0.0.9:40000\","
                "\"downstream_local_address\":\"10.96.0.10:9080\","
                "\"downstream_remote_address\":\"10.0.0.7:51234\","
                "\"requested_server_name\":null,\"upstream_transport_failure_reason\":null}\n");
        wp_al_format_free(f);

        /* sort_properties */
        REQUIRE(wp_al_format_compile_json_fields(wp_al_istio_json_format,
                                                 wp_al_istio_json_format_len, WP_AL_JSON_SORT, &f,
                                                 &err) == 0);
        n = wp_al_format_render(f, &c, line, sizeof(line), NULL);
        CHECK(n > 0);
        CHECK(strncmp(line, "{\"authority\":\"productpage:9080\",\"bytes_received\":0,", 50) == 0);
        CHECK(strstr(line, ",\"user_agent\":\"curl/8.0\",\"x_forwarded_for\":null}\n") != NULL);
        wp_al_format_free(f);

        /* untyped (legacy json_format): numbers are strings, missing is "-" */
        REQUIRE(wp_al_format_compile_json_fields(wp_al_istio_json_format, 12, WP_AL_JSON_UNTYPED,
                                                 &f, &err) == 0);
        n = wp_al_format_render(f, &c, line, sizeof(line), NULL);
        CHECK(strstr(line, "\"response_code\":\"200\",") != NULL);
        CHECK(strstr(line, "\"connection_termination_details\":\"-\",") != NULL);
        CHECK(strstr(line, "\"duration\":\"7\"}\n") != NULL);
        wp_al_format_free(f);
}

/* ---- nested JSON / Struct input ----------------------------------------------------- */

static ProtobufCMessage *decode(const ProtobufCMessageDescriptor *d, const char *json)
{
        struct json_object *o = NULL;
        ProtobufCMessage *m = NULL;
        const char *err = NULL;

        if (xds_json_parse(json, strlen(json), &o, &err) < 0) {
                fprintf(stderr, "json: %s\n", err);
                return NULL;
        }
        if (xds_pbjson_decode(d, o, 0, NULL, &m, &err) < 0) {
                fprintf(stderr, "decode: %s\n", err);
                m = NULL;
        }
        json_object_put(o);
        return m;
}

static void test_json_struct_nested_and_literal_values(void)
{
        struct wp_al_ctx c = http_ctx();
        ProtobufCMessage *m =
                decode(&google__protobuf__struct__descriptor,
                       "{\"code\":\"%RESPONSE_CODE%\",\"n\":1.5,\"i\":-3,"
                       "\"t\":true,\"z\":null,"
                       "\"up\":{\"host\":\"%UPSTREAM_HOST%\",\"deep\":{\"x\":\"lit\"}},"
                       "\"k\\\"q\":\"%%\"}");
        struct wp_al_format *f;
        const char *err;

        REQUIRE(m);
        REQUIRE(wp_al_format_compile_json((const Google__Protobuf__Struct *)m, 0, &f, &err) == 0);
        REQUIRE(wp_al_format_render(f, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, "{\"code\":200,\"n\":1.5,\"i\":-3,\"t\":true,\"z\":null,"
                           "\"up\":{\"host\":\"10.0.0.5:9080\",\"deep\":{\"x\":\"lit\"}},"
                           "\"k\\\"q\":\"%\"}\n");
        wp_al_format_free(f);
        xds_pbjson_message_free(m);

        /* lists are rejected */
        m = decode(&google__protobuf__struct__descriptor, "{\"l\":[\"%PROTOCOL%\"]}");
        REQUIRE(m);
        err = NULL;
        CHECK_INT_EQ(wp_al_format_compile_json((const Google__Protobuf__Struct *)m, 0, &f, &err),
                     -EINVAL);
        CHECK(err && strstr(err, "\"l\""));
        xds_pbjson_message_free(m);

        /* too deep */
        m = decode(&google__protobuf__struct__descriptor,
                   "{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":{\"a\":\"x\"}}}}}}}}}");
        REQUIRE(m);
        CHECK_INT_EQ(wp_al_format_compile_json((const Google__Protobuf__Struct *)m, 0, &f, &err),
                     -EINVAL);
        xds_pbjson_message_free(m);

        /* an operator error inside a value names it */
        m = decode(&google__protobuf__struct__descriptor, "{\"a\":\"%BOGUS_OP%\"}");
        REQUIRE(m);
        CHECK_INT_EQ(wp_al_format_compile_json((const Google__Protobuf__Struct *)m, 0, &f, &err),
                     -EINVAL);
        CHECK(err && strstr(err, "BOGUS_OP"));
        xds_pbjson_message_free(m);
}

static void test_json_duplicate_keys_rejected(void)
{
        static const struct wp_al_json_field fl[] = {{"a", "x"}, {"b", "y"}, {"a", "z"}};
        struct wp_al_format *f;
        const char *err = NULL;

        CHECK_INT_EQ(wp_al_format_compile_json_fields(fl, 3, 0, &f, &err), -EINVAL);
        CHECK(err && strstr(err, "duplicate"));
}

/* ---- escaping ----------------------------------------------------------------------- */

static void test_json_escaping_control_quotes_utf8_invalid(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_http_request r = req;
        wp_headers_init(&r.headers);
        hdr(&r.headers, "x-a", "q\"b\\s/\x01\x1f\x7f");
        hdr(&r.headers, "x-b", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
        hdr(&r.headers, "x-c", "bad\xff\xc3(\xed\xa0\x80\xc0\xaf.");
        hdr(&r.headers, "x-d", "tab\tnl\ncr\rbs\bff\f");
        c.req = &r;

        CHECK_STR_EQ(render_json_value("%REQ(X-A)%", 0, &c), "\"q\\\"b\\\\s/\\u0001\\u001f\x7f\"");
        CHECK_STR_EQ(render_json_value("%REQ(X-B)%", 0, &c),
                     "\"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80\"");
        CHECK_STR_EQ(render_json_value("%REQ(X-C)%", 0, &c),
                     "\"bad\\u00ff\\u00c3(\\u00ed\\u00a0\\u0080\\u00c0\\u00af.\"");
        CHECK_STR_EQ(render_json_value("%REQ(X-D)%", 0, &c), "\"tab\\tnl\\ncr\\rbs\\bff\\f\"");
        CHECK_STR_EQ(render_json_value("<%REQ(X-D)%>", 0, &c), "\"<tab\\tnl\\ncr\\rbs\\bff\\f>\"");
        /* the result parses as JSON and round-trips the valid input */
        struct wp_al_json_field fl = {"v", "%REQ(X-A)%|%REQ(X-B)%|%REQ(X-D)%"};
        struct wp_al_format *f;
        const char *err;
        REQUIRE(wp_al_format_compile_json_fields(&fl, 1, 0, &f, &err) == 0);
        REQUIRE(wp_al_format_render(f, &c, line, sizeof(line), NULL) > 0);
        struct json_object *o = json_tokener_parse(line);
        REQUIRE(o);
        struct json_object *v = NULL;
        REQUIRE(json_object_object_get_ex(o, "v", &v));
        CHECK_STR_EQ(json_object_get_string(v),
                     "q\"b\\s/\x01\x1f\x7f|caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80|"
                     "tab\tnl\ncr\rbs\bff\f");
        json_object_put(o);
        wp_al_format_free(f);

        /* text: control bytes cannot split the line; UTF-8 and tabs pass through */
        CHECK_STR_EQ(render_text("%REQ(X-D)%", 0, &c), "tab\tnl\\x0acr\\x0dbs\\x08ff\\x0c");
        CHECK_STR_EQ(render_text("%REQ(X-B)%", 0, &c), "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80");
        wp_headers_done(&r.headers);
}

/* ---- truncation --------------------------------------------------------------------- */

static void test_max_length_truncates_raw_value_not_numbers_in_json(void)
{
        struct wp_al_ctx c = http_ctx();

        CHECK_STR_EQ(render_text("%UPSTREAM_CLUSTER:11%|%BYTES_SENT:2%", 0, &c), "inbound-vip|29");
        CHECK_STR_EQ(render_json_value("%BYTES_SENT:2%", 0, &c), "295");
        CHECK_STR_EQ(render_json_value("%BYTES_SENT:2%x", 0, &c), "\"29x\"");
        CHECK_STR_EQ(render_json_value("%START_TIME:10%", 0, &c), "\"2023-11-14\"");
}

static void test_render_truncates_values_keeping_structure(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_al_format *f;
        const char *err;
        char small[512];
        bool trunc = false;

        REQUIRE(wp_al_format_compile_text(wp_al_istio_text_format, strlen(wp_al_istio_text_format),
                                          0, &f, &err) == 0);
        /* fits exactly */
        ssize_t full = wp_al_format_render(f, &c, line, sizeof(line), &trunc);
        REQUIRE(full > 0);
        CHECK(!trunc);
        REQUIRE((size_t)full + 1 <= sizeof(small));
        CHECK_INT_EQ(wp_al_format_render(f, &c, small, (size_t)full + 1, &trunc), full);
        CHECK(!trunc);
        CHECK_STR_EQ(small, line);
        /* every cap: bounded, NUL-terminated, newline-terminated */
        for (size_t cap = 2; cap <= (size_t)full + 1; cap++) {
                char b[512];
                memset(b, 'Z', sizeof(b));
                ssize_t n = wp_al_format_render(f, &c, b, cap, &trunc);
                REQUIRE(n >= 0 && (size_t)n < cap);
                CHECK(b[n] == '\0');
                CHECK(b[cap] == 'Z');
                CHECK(n >= 1 && b[n - 1] == '\n');
                CHECK(trunc == ((size_t)n != (size_t)full));
                CHECK(memchr(b, '\n', (size_t)n - 1) == NULL);
        }
        wp_al_format_free(f);

        /* values shrink evenly, literals survive */
        const char *fmt = "<%REQ(USER-AGENT)%|%UPSTREAM_CLUSTER%>\n";
        REQUIRE(wp_al_format_compile_text(fmt, strlen(fmt), 0, &f, &err) == 0);
        char b[32];
        /* 15 usable bytes, 4 of literals: both values capped at 5 (5 + 5 <= 11 < 6 + 6) */
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 16, &trunc), 14);
        CHECK(trunc);
        CHECK_STR_EQ(b, "<curl/|inbou>\n");
        /* the short value is kept whole when the long one absorbs the cut */
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 24, &trunc), 23);
        CHECK_STR_EQ(b, "<curl/8.0|inbound-vip>\n");
        wp_al_format_free(f);
}

static void test_render_json_truncation_stays_valid_json(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_http_request r = req;
        struct wp_al_format *f;
        const char *err;
        bool trunc;

        wp_headers_init(&r.headers);
        hdr(&r.headers, "user-agent", "\xe2\x82\xac\xe2\x82\xac\"\"\x01\x01 long agent value");
        c.req = &r;
        REQUIRE(wp_al_format_compile_json_fields(wp_al_istio_json_format,
                                                 wp_al_istio_json_format_len, 0, &f, &err) == 0);
        ssize_t full = wp_al_format_render(f, &c, line, sizeof(line), &trunc);
        REQUIRE(full > 0);
        size_t min_ok = 0;
        for (size_t cap = 2; cap <= (size_t)full + 1; cap++) {
                char b[2048];
                ssize_t n = wp_al_format_render(f, &c, b, cap, &trunc);
                if (n == -ENOBUFS) {
                        CHECK(min_ok == 0); /* once it fits, it keeps fitting */
                        continue;
                }
                if (!min_ok)
                        min_ok = cap;
                REQUIRE(n > 0 && (size_t)n < cap);
                CHECK(b[n - 1] == '\n');
                struct json_object *o = json_tokener_parse(b);
                if (!o)
                        fprintf(stderr, "  invalid JSON at cap %zu: %s", cap, b);
                CHECK(o != NULL);
                json_object_put(o);
        }
        CHECK(min_ok > 100 && min_ok < (size_t)full);
        wp_al_format_free(f);
        wp_headers_done(&r.headers);
}

static void test_render_text_literals_longer_than_cap_cut_at_utf8_boundary(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_al_format *f;
        const char *err;
        char b[16];

        /* "ab" + 4-byte emoji + ... + newline */
        const char *fmt = "ab\xf0\x9f\x98\x80\xf0\x9f\x98\x80\xf0\x9f\x98\x80 %DURATION%\n";
        REQUIRE(wp_al_format_compile_text(fmt, strlen(fmt), 0, &f, &err) == 0);
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 7, NULL), 3);
        CHECK_STR_EQ(b, "ab\n");
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 8, NULL), 7);
        CHECK_STR_EQ(b, "ab\xf0\x9f\x98\x80\n");
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 12, NULL), 11);
        CHECK_STR_EQ(b, "ab\xf0\x9f\x98\x80\xf0\x9f\x98\x80\n");
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 1, NULL), -ENOBUFS);
        wp_al_format_free(f);

        /* without a trailing newline: a plain prefix */
        REQUIRE(wp_al_format_compile_text("abcdefghij%DURATION%", 20, 0, &f, &err) == 0);
        CHECK_INT_EQ(wp_al_format_render(f, &c, b, 5, NULL), 4);
        CHECK_STR_EQ(b, "abcd");
        wp_al_format_free(f);
}

/* ---- compile errors ----------------------------------------------------------------- */

static void test_compile_errors_name_the_problem(void)
{
        static const struct {
                const char *fmt;
                const char *needle;
        } bad[] = {
                {"%BOGUS%", "BOGUS"},
                {"x %DYNAMIC_METADATA(istio:x)%", "DYNAMIC_METADATA"},
                {"%CEL(request.path)%", "CEL"},
                {"%REQ%", "REQ needs an argument"},
                {"%REQ()%", "REQ needs an argument"},
                {"%PROTOCOL(x)%", "PROTOCOL takes no argument"},
                {"%REQ(a?b?c)%", "HEADER?ALTERNATIVE"},
                {"%REQ(a?)%", "HEADER?ALTERNATIVE"},
                {"%REQ(?a)%", "bad header name"},
                {"%REQ(:PATH", "unterminated argument"},
                {"%PROTOCOL", "unterminated command operator %PROTOCOL"},
                {"%PROTOCOL:x%", "bad max length"},
                {"%PROTOCOL:99999999999%", "bad max length"},
                {"100%", "no valid command operator at position 3"},
                {"%protocol%", "no valid command operator at position 0"},
                {"%FILTER_STATE(k:JSON)%", "FILTER_STATE"},
                {"%START_TIME(%Y%)%", "START_TIME"},
                {"%START_TIME(%Y%m%d%H%M%S%Y%m%d%H%M%S%Y%m%d%H%M%S%Y%m%d%H%M%S%Y%m%d%H%M%S%Y%m%d%H%"
                 "M%S)"
                 "%",
                 "START_TIME"},
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                struct wp_al_format *f = (void *)0x1;
                const char *err = NULL;
                int r = wp_al_format_compile_text(bad[i].fmt, strlen(bad[i].fmt), 0, &f, &err);
                CHECK_INT_EQ(r, -EINVAL);
                if (r == 0)
                        f = wp_al_format_free(f);
                CHECK(f == (void *)0x1);
                if (!err || !strstr(err, bad[i].needle))
                        fprintf(stderr, "  %s: err [%s], want [%s]\n", bad[i].fmt,
                                err ? err : "(null)", bad[i].needle);
                CHECK(err && strstr(err, bad[i].needle));
        }
        /* too many commands */
        char big[WP_AL_MAX_COMMANDS * 11 + 16] = "";
        for (int i = 0; i <= WP_AL_MAX_COMMANDS; i++)
                strcat(big, "%PROTOCOL%");
        struct wp_al_format *f;
        const char *err = NULL;
        CHECK_INT_EQ(wp_al_format_compile_text(big, strlen(big), 0, &f, &err), -EINVAL);
        CHECK(err && strstr(err, "more than"));
        big[strlen(big) - 10] = '\0';
        CHECK_INT_EQ(wp_al_format_compile_text(big, strlen(big), 0, &f, &err), 0);
        wp_al_format_free(f);
        /* too long */
        char *huge = malloc(WP_AL_MAX_FORMAT_LEN + 2);
        REQUIRE(huge);
        memset(huge, 'a', WP_AL_MAX_FORMAT_LEN + 1);
        CHECK_INT_EQ(wp_al_format_compile_text(huge, WP_AL_MAX_FORMAT_LEN + 1, 0, &f, &err),
                     -EINVAL);
        CHECK_INT_EQ(wp_al_format_compile_text(huge, WP_AL_MAX_FORMAT_LEN, 0, &f, &err), 0);
        wp_al_format_free(f);
        free(huge);
}

/* ---- AccessLog configs -------------------------------------------------------------- */

static Envoy__Config__Accesslog__V3__AccessLog *access_log(const char *json)
{
        return (Envoy__Config__Accesslog__V3__AccessLog *)decode(
                &envoy__config__accesslog__v3__access_log__descriptor, json);
}

static void test_logger_istiod_file_access_log_text_source(void)
{
        struct wp_al_ctx c = http_ctx();
        char json[4096];
        /* what istiod sends for the built-in "envoy" provider (text_format_source inline) */
        snprintf(json, sizeof(json),
                 "{\"name\":\"envoy.access_loggers.file\",\"typed_config\":{\"@type\":"
                 "\"type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\","
                 "\"path\":\"/dev/stdout\",\"log_format\":{\"text_format_source\":"
                 "{\"inline_string\":\"%s\"}}}}",
                 "[%START_TIME%] \\\"%REQ(:METHOD)%\\\" %RESPONSE_CODE% %RESPONSE_FLAGS%\\n");
        Envoy__Config__Accesslog__V3__AccessLog *al = access_log(json);
        struct wp_al_logger *l = NULL;
        const char *err = NULL, *path = (void *)1;

        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        CHECK_INT_EQ(wp_al_logger_sink(l, &path), WP_AL_SINK_STDOUT);
        CHECK(path == NULL);
        CHECK(!wp_al_format_is_json(wp_al_logger_format(l)));
        CHECK(wp_al_logger_match(l, &c));
        CHECK_INT_EQ(wp_al_logger_render(l, &c, line, sizeof(line), NULL), 39);
        CHECK_STR_EQ(line, "[2023-11-14T22:13:20.123Z] \"GET\" 200 -\n");
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);
}

static void test_logger_json_file_and_stream_sinks(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_al_logger *l = NULL;
        const char *err = NULL, *path = NULL;
        Envoy__Config__Accesslog__V3__AccessLog *al = access_log(
                "{\"name\":\"envoy.access_loggers.file\",\"typed_config\":{\"@type\":"
                "\"type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog\","
                "\"path\":\"/var/log/wp.log\",\"log_format\":{\"json_format\":"
                "{\"code\":\"%RESPONSE_CODE%\",\"z\":\"%REQ(X-NONE)%\",\"a\":\"%PROTOCOL%\"},"
                "\"omit_empty_values\":true,\"json_format_options\":{\"sort_properties\":true},"
                "\"formatters\":[{\"name\":\"envoy.formatter.req_without_query\"}]}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        CHECK_INT_EQ(wp_al_logger_sink(l, &path), WP_AL_SINK_FILE);
        CHECK_STR_EQ(path, "/var/log/wp.log");
        CHECK(wp_al_format_is_json(wp_al_logger_format(l)));
        REQUIRE(wp_al_logger_render(l, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, "{\"a\":\"HTTP/1.1\",\"code\":200}\n");
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);

        /* StdoutAccessLog / StderrAccessLog without log_format: Envoy's default format */
        static const char *const streams[] = {"StdoutAccessLog", "StderrAccessLog"};
        for (int i = 0; i < 2; i++) {
                char json[512];
                snprintf(json, sizeof(json),
                         "{\"name\":\"x\",\"typed_config\":{\"@type\":\"type.googleapis.com/"
                         "envoy.extensions.access_loggers.stream.v3.%s\"}}",
                         streams[i]);
                al = access_log(json);
                REQUIRE(al);
                REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
                CHECK_INT_EQ(wp_al_logger_sink(l, NULL), i ? WP_AL_SINK_STDERR : WP_AL_SINK_STDOUT);
                REQUIRE(wp_al_logger_render(l, &c, line, sizeof(line), NULL) > 0);
                CHECK_STR_EQ(line, render_text(wp_al_envoy_default_format, 0, &c));
                wp_al_logger_free(l);
                xds_pbjson_message_free(&al->base);
        }

        /* FileAccessLog without a format, legacy format / typed_json_format */
        al = access_log("{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions."
                        "access_loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stderr\","
                        "\"typed_json_format\":{\"d\":\"%DURATION%\"}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        CHECK_INT_EQ(wp_al_logger_sink(l, NULL), WP_AL_SINK_STDERR);
        REQUIRE(wp_al_logger_render(l, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, "{\"d\":7}\n");
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);
        al = access_log("{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions."
                        "access_loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\","
                        "\"json_format\":{\"d\":\"%DURATION%\"}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        REQUIRE(wp_al_logger_render(l, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, "{\"d\":\"7\"}\n");
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);
        al = access_log("{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions."
                        "access_loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\"}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        REQUIRE(wp_al_logger_render(l, &c, line, sizeof(line), NULL) > 0);
        CHECK_STR_EQ(line, render_text(wp_al_envoy_default_format, 0, &c));
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);
}

static void test_logger_rejects_bad_and_unsupported_configs(void)
{
        static const struct {
                const char *json;
                int want;
                const char *needle;
        } bad[] = {
                {"{\"name\":\"x\"}", -EINVAL, "no typed_config"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.file.v3.FileAccessLog\",\"path\":\"\"}}",
                 -EINVAL, "path"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\",\"log_format\":"
                 "{\"text_format_source\":{\"inline_string\":\"%NOPE%\"}}}}",
                 -EINVAL, "NOPE"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\",\"log_format\":"
                 "{\"text_format_source\":{\"filename\":\"/etc/fmt\"}}}}",
                 -EOPNOTSUPP, "filename"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\",\"log_format\":"
                 "{\"text_format\":\"x\",\"formatters\":[{\"name\":\"envoy.formatter.cel\"}]}}}",
                 -EOPNOTSUPP, "envoy.formatter.cel"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.file.v3.FileAccessLog\",\"path\":\"/dev/stdout\",\"log_format\":{}}}",
                 -EINVAL, "no format"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.grpc.v3.HttpGrpcAccessLogConfig\"}}",
                 -EOPNOTSUPP, "HttpGrpcAccessLogConfig"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.stream.v3.StdoutAccessLog\"},\"filter\":{\"response_flag_filter\":"
                 "{\"flags\":[\"UH\",\"RBAC\"]}}}",
                 -EINVAL, "RBAC"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.stream.v3.StdoutAccessLog\"},\"filter\":{\"and_filter\":"
                 "{\"filters\":[{\"not_health_check_filter\":{}}]}}}",
                 -EINVAL, "at least 2"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.stream.v3.StdoutAccessLog\"},\"filter\":{\"status_code_filter\":{}}}",
                 -EINVAL, "comparison"},
                {"{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                 "loggers.stream.v3.StdoutAccessLog\"},\"filter\":{}}",
                 -EOPNOTSUPP, "filter"},
        };
        for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
                Envoy__Config__Accesslog__V3__AccessLog *al = NULL;
                struct wp_al_logger *l = NULL;
                const char *err = NULL;
                if (bad[i].want == -EOPNOTSUPP && strstr(bad[i].json, "grpc.v3")) {
                        /* not in our proto subset: build the Any by hand */
                        static Google__Protobuf__Any any = GOOGLE__PROTOBUF__ANY__INIT;
                        static Envoy__Config__Accesslog__V3__AccessLog a =
                                ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG__INIT;
                        any.type_url = "type.googleapis.com/envoy.extensions.access_loggers."
                                       "grpc.v3.HttpGrpcAccessLogConfig";
                        a.config_type_case =
                                ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG__CONFIG_TYPE_TYPED_CONFIG;
                        a.typed_config = &any;
                        CHECK_INT_EQ(wp_al_logger_new(&a, &l, &err), bad[i].want);
                } else {
                        al = access_log(bad[i].json);
                        REQUIRE(al);
                        CHECK_INT_EQ(wp_al_logger_new(al, &l, &err), bad[i].want);
                }
                CHECK(l == NULL);
                if (!err || !strstr(err, bad[i].needle))
                        fprintf(stderr, "  case %zu: err [%s], want [%s]\n", i,
                                err ? err : "(null)", bad[i].needle);
                CHECK(err && strstr(err, bad[i].needle));
                if (al)
                        xds_pbjson_message_free(&al->base);
        }
}

static void test_logger_filters_status_duration_flags_and_or(void)
{
        struct wp_al_ctx c = http_ctx();
        struct wp_al_logger *l = NULL;
        const char *err = NULL;
        /* log errors (status >= 400) or anything with UH/UF, but never health checks */
        Envoy__Config__Accesslog__V3__AccessLog *al = access_log(
                "{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                "loggers.stream.v3.StdoutAccessLog\"},\"filter\":{\"and_filter\":{\"filters\":["
                "{\"not_health_check_filter\":{}},"
                "{\"or_filter\":{\"filters\":["
                "{\"status_code_filter\":{\"comparison\":{\"op\":\"GE\",\"value\":"
                "{\"default_value\":400,\"runtime_key\":\"k\"}}}},"
                "{\"response_flag_filter\":{\"flags\":[\"UH\",\"UF\"]}}]}}]}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        CHECK(!wp_al_logger_match(l, &c));
        CHECK_INT_EQ(wp_al_logger_render(l, &c, line, sizeof(line), NULL), 0);
        CHECK_STR_EQ(line, "");
        c.response_code = 503;
        CHECK(wp_al_logger_match(l, &c));
        c.health_check = true;
        CHECK(!wp_al_logger_match(l, &c));
        c.health_check = false;
        c.response_code = 0;
        c.response_flags = WP_AL_F(UF);
        CHECK(wp_al_logger_match(l, &c));
        c.response_flags = WP_AL_F(NR);
        CHECK(!wp_al_logger_match(l, &c));
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);

        /* duration EQ/LE; response_flag_filter without flags matches any flag */
        al = access_log("{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions."
                        "access_loggers.stream.v3.StderrAccessLog\"},\"filter\":{\"or_filter\":"
                        "{\"filters\":[{\"duration_filter\":{\"comparison\":{\"op\":\"LE\","
                        "\"value\":{\"default_value\":3}}}},{\"response_flag_filter\":{}}]}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        c = http_ctx(); /* DURATION 7 */
        CHECK(!wp_al_logger_match(l, &c));
        c.response_flags = WP_AL_F(DC);
        CHECK(wp_al_logger_match(l, &c));
        c.response_flags = 0;
        c.end_ns = c.start_ns + 3 * MS;
        CHECK(wp_al_logger_match(l, &c));
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);

        al = access_log(
                "{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions."
                "access_loggers.stream.v3.StderrAccessLog\"},\"filter\":{"
                "\"status_code_filter\":{\"comparison\":{\"value\":{\"default_value\":200}}}}}");
        REQUIRE(al);
        REQUIRE(wp_al_logger_new(al, &l, &err) == 0);
        c = http_ctx();
        CHECK(wp_al_logger_match(l, &c)); /* EQ 200 */
        c.response_code = 201;
        CHECK(!wp_al_logger_match(l, &c));
        wp_al_logger_free(l);
        xds_pbjson_message_free(&al->base);

        CHECK(wp_al_logger_free(NULL) == NULL);
        CHECK(wp_al_format_free(NULL) == NULL);
}

/* ---- failalloc ---------------------------------------------------------------------- */

static int fa_text(void *arg)
{
        struct wp_al_format *f = NULL;
        const char *err;
        (void)arg;
        int r = wp_al_format_compile_text(wp_al_istio_text_format, strlen(wp_al_istio_text_format),
                                          0, &f, &err);
        if (r < 0) {
                CHECK_INT_EQ(r, -ENOMEM);
                return r;
        }
        struct wp_al_ctx c = http_ctx();
        CHECK(wp_al_format_render(f, &c, line, sizeof(line), NULL) > 0);
        wp_al_format_free(f);
        return 0;
}

static int fa_json(void *arg)
{
        struct wp_al_format *f = NULL;
        const char *err;
        (void)arg;
        int r = wp_al_format_compile_json_fields(
                wp_al_istio_json_format, wp_al_istio_json_format_len, WP_AL_JSON_SORT, &f, &err);
        if (r < 0) {
                CHECK_INT_EQ(r, -ENOMEM);
                return r;
        }
        struct wp_al_ctx c = http_ctx();
        CHECK(wp_al_format_render(f, &c, line, sizeof(line), NULL) > 0);
        wp_al_format_free(f);
        return 0;
}

static int fa_logger(void *arg)
{
        const Envoy__Config__Accesslog__V3__AccessLog *al = arg;
        struct wp_al_logger *l = NULL;
        const char *err;
        int r = wp_al_logger_new(al, &l, &err);
        if (r < 0)
                return r;
        wp_al_logger_free(l);
        return 0;
}

static void test_failalloc_compile_text_json_and_logger(void)
{
        CHECK(check_failalloc_run(fa_text, NULL) >= 3);
        CHECK(check_failalloc_run(fa_json, NULL) >= 5);
        Envoy__Config__Accesslog__V3__AccessLog *al = access_log(
                "{\"typed_config\":{\"@type\":\"type.googleapis.com/envoy.extensions.access_"
                "loggers.file.v3.FileAccessLog\",\"path\":\"/tmp/x.log\",\"log_format\":"
                "{\"json_format\":{\"a\":\"%PROTOCOL%\",\"b\":{\"c\":\"%DURATION%\"}}}},"
                "\"filter\":{\"or_filter\":{\"filters\":[{\"not_health_check_filter\":{}},"
                "{\"traceable_filter\":{}}]}}}");
        REQUIRE(al);
        CHECK(check_failalloc_run(fa_logger, al) >= 6);
        xds_pbjson_message_free(&al->base);
}

/* ---- writer ------------------------------------------------------------------------- */

#define WR_PRODUCERS 4
#define WR_LINES     3000

static double mono_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* Line seq of producer t: "P<t> <seq> <len> " + payload + '\n', len bytes in all, 20..2999;
 * the payload is a function of (t, seq, position) so a torn or spliced line does not parse. */
static size_t wr_line(char *buf, unsigned t, unsigned seq)
{
        size_t len = 20 + (seq * 7919u + t * 104729u) % 2980, n, i;

        n = (size_t)snprintf(buf, 64, "P%u %u %zu ", t, seq, len);
        for (i = n; i < len - 1; i++)
                buf[i] = (char)('a' + (t * 31 + seq * 17 + i) % 26);
        buf[len - 1] = '\n';
        return len;
}

struct wr_producer {
        struct wp_al_writer *w;
        int fd;
        unsigned t;
        unsigned accepted, refused;
        double max_push_ms;
        unsigned char ok[WR_LINES]; /* 1: accepted */
};

static void *wr_producer_main(void *arg)
{
        struct wr_producer *p = arg;
        struct wp_al_queue *q = NULL;
        char line[3072];
        unsigned i;

        if (wp_al_queue_new(p->w, &q) < 0)
                return NULL;
        for (i = 0; i < WR_LINES; i++) {
                size_t n = wr_line(line, p->t, i);
                double t0 = mono_ms(), d;
                int r = wp_al_queue_push(q, p->fd, line, n);

                d = mono_ms() - t0;
                if (d > p->max_push_ms)
                        p->max_push_ms = d;
                if (r == 0) {
                        p->accepted++;
                        p->ok[i] = 1;
                } else {
                        CHECK_INT_EQ(r, -ENOBUFS);
                        p->refused++;
                }
        }
        return NULL;
}

struct wr_reader {
        int fd;
        char *buf;
        size_t len, cap;
};

static void *wr_reader_main(void *arg)
{
        struct wr_reader *r = arg;
        ssize_t n;

        for (;;) {
                if (r->cap - r->len < 65536) {
                        r->cap = r->cap ? r->cap * 2 : 1 << 20;
                        r->buf = realloc(r->buf, r->cap);
                        if (!r->buf)
                                abort();
                }
                n = read(r->fd, r->buf + r->len, r->cap - r->len);
                if (n <= 0)
                        break;
                r->len += (size_t)n;
        }
        return NULL;
}

/* Producers on 4 threads queue lines for a pipe nobody reads: no push blocks, the lines that do
 * not fit are refused and counted; once the pipe is read, every accepted line arrives whole,
 * none torn or interleaved, each producer's in order, and nothing else. */
static void test_writer_stalled_pipe_drops_counted_lines_whole(void)
{
        static struct wr_producer prod[WR_PRODUCERS];
        struct wr_reader rd = {0};
        struct wp_al_writer_stats st;
        struct wp_al_writer *w = NULL;
        pthread_t th[WR_PRODUCERS], rth;
        unsigned t, refused = 0, accepted = 0, next[WR_PRODUCERS] = {0}, lines = 0;
        double max_push = 0, deadline;
        int p[2];
        char *s, *e;

        REQUIRE(pipe(p) == 0);
        REQUIRE(wp_al_writer_new(64 * 1024, &w) == 0);
        for (t = 0; t < WR_PRODUCERS; t++) {
                prod[t] = (struct wr_producer){.w = w, .fd = p[1], .t = t};
                REQUIRE(pthread_create(&th[t], NULL, wr_producer_main, &prod[t]) == 0);
        }
        /* the producers finish although the pipe (64 KiB) stays full */
        for (t = 0; t < WR_PRODUCERS; t++) {
                pthread_join(th[t], NULL);
                refused += prod[t].refused;
                accepted += prod[t].accepted;
                if (prod[t].max_push_ms > max_push)
                        max_push = prod[t].max_push_ms;
        }
        wp_al_writer_get_stats(w, &st);
        fprintf(stderr, "  stalled pipe: %u lines queued, %u dropped, slowest push %.3f ms\n",
                accepted, refused, max_push);
        CHECK(refused > 0);
        CHECK(accepted > 0);
        CHECK_INT_EQ(accepted + refused, WR_PRODUCERS * WR_LINES);
        CHECK_INT_EQ(st.dropped, refused);
        CHECK_INT_EQ(st.queued, accepted);
        CHECK(st.written < accepted); /* the writer is stuck on the pipe */
        CHECK(max_push < 200);        /* never waited for the pipe (generous for sanitizers) */

        /* drain the pipe: everything queued is written */
        rd.fd = p[0];
        REQUIRE(pthread_create(&rth, NULL, wr_reader_main, &rd) == 0);
        deadline = mono_ms() + 20000;
        do {
                wp_al_writer_get_stats(w, &st);
                usleep(1000);
        } while (st.written + st.write_errors < st.queued && mono_ms() < deadline);
        CHECK_INT_EQ(st.written, accepted);
        CHECK_INT_EQ(st.write_errors, 0);
        wp_al_writer_free(w);
        close(p[1]);
        pthread_join(rth, NULL);
        close(p[0]);

        for (s = rd.buf; rd.len && s < rd.buf + rd.len; s = e + 1) {
                char want[3072];
                unsigned seq;
                size_t n;

                e = memchr(s, '\n', (size_t)(rd.buf + rd.len - s));
                REQUIRE(e);
                REQUIRE(sscanf(s, "P%u %u", &t, &seq) == 2 && t < WR_PRODUCERS && seq < WR_LINES);
                /* in order: the next accepted line of producer t */
                while (next[t] < WR_LINES && !prod[t].ok[next[t]])
                        next[t]++;
                CHECK_INT_EQ(seq, next[t]);
                n = wr_line(want, t, seq);
                CHECK_INT_EQ((size_t)(e + 1 - s), n);
                CHECK(memcmp(s, want, n) == 0);
                next[t] = seq + 1;
                lines++;
        }
        CHECK_INT_EQ(lines, accepted);
        free(rd.buf);
}

/* A reader keeps up: every line arrives, in order, including lines longer than PIPE_BUF; a line
 * longer than a quarter of the queue is refused; flush writes what is queued. */
static void test_writer_delivers_in_order_long_lines_and_flush(void)
{
        struct wp_al_writer *w = NULL;
        struct wp_al_queue *q = NULL;
        struct wp_al_writer_stats st;
        struct wr_reader rd = {0};
        pthread_t rth;
        static char big[20000];
        char line[3072];
        unsigned i;
        size_t total = 0, n;
        int p[2];

        REQUIRE(pipe(p) == 0);
        rd.fd = p[0];
        REQUIRE(pthread_create(&rth, NULL, wr_reader_main, &rd) == 0);
        REQUIRE(wp_al_writer_new(4096, &w) == 0); /* rounded up to 4096: lines up to 1 KiB */
        REQUIRE(wp_al_queue_new(w, &q) == 0);
        CHECK_INT_EQ(wp_al_queue_push(q, p[1], "", 0), 0); /* nothing */
        memset(big, 'x', sizeof(big));
        big[sizeof(big) - 1] = '\n';
        CHECK_INT_EQ(wp_al_queue_push(q, p[1], big, 1100), -EMSGSIZE);
        for (i = 0; i < 500; i++) {
                n = wr_line(line, 0, i);
                if (n > 1000)
                        n = 0; /* over a quarter of the 4 KiB queue */
                if (!n)
                        continue;
                while (wp_al_queue_push(q, p[1], line, n) == -ENOBUFS)
                        usleep(100); /* the reader keeps up: wait for room */
                total += n;
        }
        CHECK_INT_EQ(wp_al_writer_flush(w, 5000), 0);
        wp_al_writer_get_stats(w, &st);
        CHECK_INT_EQ(st.written, st.queued);
        CHECK(st.dropped >= 1); /* the -EMSGSIZE line (and retried -ENOBUFS pushes) */
        wp_al_writer_free(w);

        /* a bigger queue takes a line longer than PIPE_BUF, written whole */
        REQUIRE(wp_al_writer_new(128 * 1024, &w) == 0);
        REQUIRE(wp_al_queue_new(w, &q) == 0);
        CHECK_INT_EQ(wp_al_queue_push(q, p[1], big, sizeof(big)), 0);
        CHECK_INT_EQ(wp_al_writer_flush(w, 5000), 0);
        wp_al_writer_free(w);
        close(p[1]);
        pthread_join(rth, NULL);
        close(p[0]);
        CHECK_INT_EQ(rd.len, total + sizeof(big));
        {
                char *s = rd.buf;
                unsigned t, seq, expect = 0;

                for (i = 0; i < 500; i++) {
                        n = wr_line(line, 0, i);
                        if (n > 1000)
                                continue;
                        REQUIRE(sscanf(s, "P%u %u", &t, &seq) == 2);
                        CHECK_INT_EQ(seq, i);
                        CHECK(memcmp(s, line, n) == 0);
                        s += n;
                        expect++;
                }
                CHECK(expect > 100);
                CHECK(memcmp(s, big, sizeof(big)) == 0);
        }
        free(rd.buf);

        CHECK_INT_EQ(wp_al_writer_new(4096, NULL), -EINVAL);
        CHECK_INT_EQ(wp_al_writer_new((size_t)2 << 30, &w), -EINVAL);
        CHECK_INT_EQ(wp_al_queue_new(NULL, &q), -EINVAL);
        CHECK_INT_EQ(wp_al_writer_flush(NULL, 1), -EINVAL);
        CHECK(wp_al_writer_free(NULL) == NULL);
        wp_al_writer_get_stats(NULL, &st);
        CHECK_INT_EQ(st.queued + st.written + st.dropped + st.write_errors, 0);
}

/* A line for a closed fd is counted as a write error, the writer goes on. */
static void test_writer_counts_write_errors(void)
{
        struct wp_al_writer *w = NULL;
        struct wp_al_queue *q = NULL;
        struct wp_al_writer_stats st;
        int p[2];

        REQUIRE(pipe(p) == 0);
        close(p[0]); /* EPIPE (SIGPIPE is ignored below) */
        REQUIRE(wp_al_writer_new(8192, &w) == 0);
        REQUIRE(wp_al_queue_new(w, &q) == 0);
        CHECK_INT_EQ(wp_al_queue_push(q, p[1], "a\n", 2), 0);
        CHECK_INT_EQ(wp_al_writer_flush(w, 5000), 0);
        wp_al_writer_get_stats(w, &st);
        CHECK_INT_EQ(st.write_errors, 1);
        CHECK_INT_EQ(st.written, 0);
        wp_al_writer_free(w);
        close(p[1]);
}

static int fa_writer(void *arg)
{
        struct wp_al_writer *w = NULL;
        struct wp_al_queue *q = NULL;
        int r = wp_al_writer_new(8192, &w);

        if (r < 0)
                return r;
        r = wp_al_queue_new(w, &q);
        wp_al_writer_free(w);
        return r;
}

static void test_failalloc_writer(void)
{
        CHECK(check_failalloc_run(fa_writer, NULL) >= 3);
}

int main(void)
{
        setenv("WP_AL_TEST_ENV", "env-value", 1);
        unsetenv("WP_AL_TEST_UNSET");
        fixture_init();
        RUN(test_flags_table_names_parse_and_format);
        RUN(test_operators_render_text_table);
        RUN(test_operators_render_typed_json_table);
        RUN(test_hostname_is_resolved_at_compile_time);
        RUN(test_tcp_context_renders_missing_http_fields);
        RUN(test_ipv6_addresses_are_bracketed_with_port);
        RUN(test_upstream_timing_bytes_ids_ports_operators);
        RUN(test_omit_empty_values_text_and_json);
        RUN(test_istio_default_text_format_exact_line);
        RUN(test_envoy_default_format_exact_line);
        RUN(test_istio_default_json_format_exact_line);
        RUN(test_json_struct_nested_and_literal_values);
        RUN(test_json_duplicate_keys_rejected);
        RUN(test_json_escaping_control_quotes_utf8_invalid);
        RUN(test_max_length_truncates_raw_value_not_numbers_in_json);
        RUN(test_render_truncates_values_keeping_structure);
        RUN(test_render_json_truncation_stays_valid_json);
        RUN(test_render_text_literals_longer_than_cap_cut_at_utf8_boundary);
        RUN(test_compile_errors_name_the_problem);
        RUN(test_logger_istiod_file_access_log_text_source);
        RUN(test_logger_json_file_and_stream_sinks);
        RUN(test_logger_rejects_bad_and_unsupported_configs);
        RUN(test_logger_filters_status_duration_flags_and_or);
        RUN(test_failalloc_compile_text_json_and_logger);
        signal(SIGPIPE, SIG_IGN);
        RUN(test_writer_stalled_pipe_drops_counted_lines_whole);
        RUN(test_writer_delivers_in_order_long_lines_and_flush);
        RUN(test_writer_counts_write_errors);
        RUN(test_failalloc_writer);
        fixture_done();
        return check_exit();
}
