/*
 * Tests for waypoint/metrics.c: counts and labels after known sequences, histogram shape,
 * escaping, the whole page parsed by Debian's python3-prometheus-client (promparse.py), the
 * cardinality cap with flat memory under 100,000 distinct source workloads, 4 shards written
 * concurrently while rendering, peer-label helpers, and failalloc.
 */
#include "check.h"

#include <errno.h>
#include <json-c/json.h>
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "page_fixture.h"
#include "waypoint/base/alloc.h"
#include "waypoint/metrics.h"

#define SET(l, i, s) ((l)->v[(i)] = (struct wp_mstr){(s), (uint32_t)strlen(s)})

static int parser_missing;

static void labels_a(struct wp_metrics_labels *l)
{
        memset(l, 0, sizeof(*l));
        SET(l, WP_ML_SOURCE_WORKLOAD, "productpage-v1");
        SET(l, WP_ML_SOURCE_CANONICAL_SERVICE, "productpage");
        SET(l, WP_ML_SOURCE_CANONICAL_REVISION, "v1");
        SET(l, WP_ML_SOURCE_WORKLOAD_NAMESPACE, "default");
        SET(l, WP_ML_SOURCE_PRINCIPAL, "spiffe://cluster.local/ns/default/sa/bookinfo-productpage");
        SET(l, WP_ML_SOURCE_CLUSTER, "Kubernetes");
        SET(l, WP_ML_DESTINATION_WORKLOAD, "reviews-v1");
        SET(l, WP_ML_DESTINATION_WORKLOAD_NAMESPACE, "default");
        SET(l, WP_ML_DESTINATION_PRINCIPAL,
            "spiffe://cluster.local/ns/default/sa/bookinfo-reviews");
        SET(l, WP_ML_DESTINATION_SERVICE, "reviews.default.svc.cluster.local");
        SET(l, WP_ML_DESTINATION_CANONICAL_SERVICE, "reviews");
        SET(l, WP_ML_DESTINATION_CANONICAL_REVISION, "v1");
        SET(l, WP_ML_DESTINATION_SERVICE_NAME, "reviews");
        SET(l, WP_ML_CONNECTION_SECURITY_POLICY, "mutual_tls");
}

static struct wp_metrics *new_registry(unsigned shards, uint32_t max_series)
{
        struct wp_metrics_config cfg = {
                .n_shards = shards,
                .max_series = max_series,
                .istio_version = "1.24.0",
                .local_namespace = "default",
                .local_cluster = "Kubernetes",
        };
        struct wp_metrics *m = NULL;

        if (wp_metrics_new(&cfg, &m) < 0)
                return NULL;
        return m;
}

static char *render(struct wp_metrics *m)
{
        struct wp_metrics_text t = {0};

        if (wp_metrics_render_text(m, &t) < 0) {
                wp_metrics_text_done(&t);
                return NULL;
        }
        return t.data;
}

/* Parses text with prometheus_client; returns the JSON list of families or NULL (sets
 * parser_missing when the module is not installed). */
static json_object *prom_parse(const char *text)
{
        char page[] = "/tmp/wp-metrics-page-XXXXXX";
        char cmd[8192];
        const char *dir = getenv("WP_TEST_SRCDIR");
        json_object *root = NULL;
        char *out = NULL;
        size_t len = 0, cap = 0;
        FILE *f, *p;
        int fd, st;

        fd = mkstemp(page);
        if (fd < 0)
                return NULL;
        f = fdopen(fd, "w");
        if (!f || fwrite(text, 1, strlen(text), f) != strlen(text)) {
                if (f)
                        fclose(f);
                unlink(page);
                return NULL;
        }
        fclose(f);
        snprintf(cmd, sizeof(cmd), "/usr/bin/python3 %s/unit/waypoint/metrics/promparse.py %s",
                 dir ? dir : "tests", page);
        p = popen(cmd, "r");
        if (!p) {
                unlink(page);
                return NULL;
        }
        for (;;) {
                if (cap - len < 65536) {
                        cap = cap ? cap * 2 : 1 << 20;
                        out = realloc(out, cap);
                        if (!out)
                                abort();
                }
                size_t n = fread(out + len, 1, cap - len - 1, p);
                if (!n)
                        break;
                len += n;
        }
        st = pclose(p);
        unlink(page);
        if (WIFEXITED(st) && WEXITSTATUS(st) == 77) {
                parser_missing = 1;
                free(out);
                return NULL;
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
                fprintf(stderr, "promparse.py failed (status %d)\n", st);
                free(out);
                return NULL;
        }
        out[len] = 0;
        root = json_tokener_parse(out);
        free(out);
        return root;
}

/* A label constraint list: name, value, name, value, ..., NULL. */
static int labels_match(json_object *labels, const char *const *kv)
{
        for (; kv && kv[0]; kv += 2) {
                json_object *v;

                if (!json_object_object_get_ex(labels, kv[0], &v))
                        return 0;
                if (strcmp(json_object_get_string(v), kv[1]) != 0)
                        return 0;
        }
        return 1;
}

/* Value of the only sample called name whose labels include kv; -1 when none, -2 when
 * several. */
static double sample(json_object *root, const char *name, const char *const *kv)
{
        size_t i, j;
        double v = -1;
        int found = 0;

        for (i = 0; root && i < json_object_array_length(root); i++) {
                json_object *fam = json_object_array_get_idx(root, i), *samples;

                json_object_object_get_ex(fam, "samples", &samples);
                for (j = 0; j < json_object_array_length(samples); j++) {
                        json_object *s = json_object_array_get_idx(samples, j), *n, *l, *val;

                        json_object_object_get_ex(s, "name", &n);
                        json_object_object_get_ex(s, "labels", &l);
                        json_object_object_get_ex(s, "value", &val);
                        if (strcmp(json_object_get_string(n), name) == 0 && labels_match(l, kv)) {
                                found++;
                                v = json_object_get_double(val);
                        }
                }
        }
        return found == 1 ? v : found ? -2 : -1;
}

static size_t count_samples(json_object *root, const char *name)
{
        size_t i, j, n = 0;

        for (i = 0; root && i < json_object_array_length(root); i++) {
                json_object *fam = json_object_array_get_idx(root, i), *samples;

                json_object_object_get_ex(fam, "samples", &samples);
                for (j = 0; j < json_object_array_length(samples); j++) {
                        json_object *s = json_object_array_get_idx(samples, j), *nm;

                        json_object_object_get_ex(s, "name", &nm);
                        n += strcmp(json_object_get_string(nm), name) == 0;
                }
        }
        return n;
}

static const char *family_type(json_object *root, const char *name)
{
        size_t i;

        for (i = 0; root && i < json_object_array_length(root); i++) {
                json_object *fam = json_object_array_get_idx(root, i), *n, *t;

                json_object_object_get_ex(fam, "name", &n);
                json_object_object_get_ex(fam, "type", &t);
                if (strcmp(json_object_get_string(n), name) == 0)
                        return json_object_get_string(t);
        }
        return NULL;
}

static const char *const A_SEL[] = {"source_workload", "productpage-v1", "response_code", "200",
                                    NULL};

static void test_http_counts_and_exact_label_line(void)
{
        struct wp_metrics *m = new_registry(1, 0);
        struct wp_metrics_shard *sh;
        struct wp_metrics_labels l;
        struct wp_metrics_http ok = {.response_code = 200,
                                     .grpc_status = -1,
                                     .duration_ms = 7,
                                     .request_bytes = 100,
                                     .response_bytes = 1000};
        char *page;
        int i;

        REQUIRE(m);
        sh = wp_metrics_shard(m, 0);
        REQUIRE(sh);
        labels_a(&l);
        for (i = 0; i < 3; i++)
                CHECK_INT_EQ(wp_metrics_record_http(sh, &l, &ok), 0);
        page = render(m);
        REQUIRE(page);
        /* the exact label order of istio_stats.cc for a waypoint (ServerGateway) */
        CHECK(strstr(
                page,
                "istio_requests_total{reporter=\"waypoint\",source_workload=\"productpage-v1\","
                "source_canonical_service=\"productpage\",source_canonical_revision=\"v1\","
                "source_workload_namespace=\"default\",source_principal=\"spiffe://"
                "cluster.local/ns/default/sa/bookinfo-productpage\",source_app=\"unknown\","
                "source_version=\"unknown\",source_cluster=\"Kubernetes\","
                "destination_workload=\"reviews-v1\",destination_workload_namespace=\"default\","
                "destination_principal=\"spiffe://cluster.local/ns/default/sa/bookinfo-"
                "reviews\",destination_app=\"unknown\",destination_version=\"unknown\","
                "destination_service=\"reviews.default.svc.cluster.local\","
                "destination_canonical_service=\"reviews\",destination_canonical_revision="
                "\"v1\",destination_service_name=\"reviews\",destination_service_namespace="
                "\"default\",destination_cluster=\"Kubernetes\",request_protocol=\"http\","
                "response_code=\"200\",grpc_response_status=\"\",response_flags=\"-\","
                "connection_security_policy=\"mutual_tls\"} 3\n"));
        CHECK(strstr(page, "# TYPE istio_requests_total counter\n"));
        CHECK(strstr(page, "# TYPE istio_request_duration_milliseconds histogram\n"));
        CHECK(strstr(page, "# TYPE istio_build gauge\n"));
        CHECK(strstr(page, "istio_build{component=\"proxy\",tag=\"1.24.0\"} 1\n"));
        /* no TCP series yet: no TCP families */
        CHECK(!strstr(page, "istio_tcp_connections_opened_total"));
        CHECK(strstr(page, "istio_waypoint_metrics_overflow_total{family=\"http\"} 0\n"));
        free(page);
        wp_metrics_free(m);
}

static void test_defaults_fill_unset_labels(void)
{
        struct wp_metrics *m = new_registry(1, 0);
        struct wp_metrics_http obs = {.response_code = 0, .grpc_status = 14};
        struct wp_metrics_labels l = {0};
        struct wp_metrics_tcp *t;
        char *page;

        REQUIRE(m);
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), NULL, &obs), 0);
        SET(&l, WP_ML_REQUEST_PROTOCOL, "grpc");
        SET(&l, WP_ML_RESPONSE_FLAGS, "UH");
        SET(&l, WP_ML_SOURCE_APP, ""); /* explicit empty value stays empty */
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &obs), 0);
        t = wp_metrics_tcp_open(wp_metrics_shard(m, 0), NULL);
        CHECK(!wp_metrics_tcp_dropped(t));
        page = render(m);
        REQUIRE(page);
        CHECK(strstr(page,
                     "istio_requests_total{reporter=\"waypoint\",source_workload=\"unknown\","
                     "source_canonical_service=\"unknown\",source_canonical_revision=\"latest\","
                     "source_workload_namespace=\"unknown\",source_principal=\"unknown\","
                     "source_app=\"unknown\""));
        CHECK(strstr(page, "destination_service_namespace=\"default\",destination_cluster="
                           "\"Kubernetes\",request_protocol=\"http\",response_code=\"0\","
                           "grpc_response_status=\"14\",response_flags=\"-\","
                           "connection_security_policy=\"unknown\"} 1\n"));
        CHECK(strstr(page, "source_app=\"\","));
        CHECK(strstr(page, "request_protocol=\"grpc\",response_code=\"0\",grpc_response_status="
                           "\"14\",response_flags=\"UH\""));
        /* TCP: request_protocol tcp, no response_code / grpc_response_status */
        CHECK(strstr(page, "istio_tcp_connections_opened_total{reporter=\"waypoint\","));
        CHECK(strstr(page, "destination_cluster=\"Kubernetes\",request_protocol=\"tcp\","
                           "response_flags=\"-\",connection_security_policy=\"unknown\"} 1\n"));
        free(page);
        wp_metrics_free(m);
}

static void test_histogram_buckets_cumulative_with_sum_and_count(void)
{
        static const uint64_t obs_ms[] = {0, 1, 2, 5, 6, 3600000, 3600001, 99999999};
        /* expected cumulative counts at le = 0.5, 1, 5, 10, ..., 3600000, +Inf */
        static const char *const le[] = {"0.5",    "1",      "5",       "10",      "25",
                                         "50",     "100",    "250",     "500",     "1000",
                                         "2500",   "5000",   "10000",   "30000",   "60000",
                                         "300000", "600000", "1800000", "3600000", "+Inf"};
        static const double cum[] = {1, 2, 4, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 6, 8};
        struct wp_metrics *m = new_registry(1, 0);
        struct wp_metrics_labels l;
        json_object *root;
        uint64_t sum = 0;
        char *page;
        size_t i;

        REQUIRE(m);
        labels_a(&l);
        for (i = 0; i < sizeof(obs_ms) / sizeof(obs_ms[0]); i++) {
                struct wp_metrics_http o = {.response_code = 200,
                                            .grpc_status = -1,
                                            .duration_ms = obs_ms[i],
                                            .request_bytes = i,
                                            .response_bytes = 2 * i};

                sum += obs_ms[i];
                CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        }
        page = render(m);
        REQUIRE(page);
        root = prom_parse(page);
        if (!root && parser_missing) {
                fprintf(stderr, "prometheus_client not installed: parse checks skipped\n");
        } else {
                REQUIRE(root);
                CHECK_STR_EQ(family_type(root, "istio_request_duration_milliseconds"), "histogram");
                for (i = 0; i < 20; i++) {
                        const char *kv[] = {"source_workload", "productpage-v1", "le", le[i], NULL};

                        CHECK(sample(root, "istio_request_duration_milliseconds_bucket", kv) ==
                              cum[i]);
                }
                CHECK(sample(root, "istio_request_duration_milliseconds_count", A_SEL) == 8);
                CHECK(sample(root, "istio_request_duration_milliseconds_sum", A_SEL) ==
                      (double)sum);
                CHECK(sample(root, "istio_request_bytes_sum", A_SEL) == 28);
                CHECK(sample(root, "istio_response_bytes_sum", A_SEL) == 56);
                CHECK(sample(root, "istio_request_bytes_count", A_SEL) == 8);
                CHECK(sample(root, "istio_requests_total", A_SEL) == 8);
                json_object_put(root);
        }
        /* text form of le as Envoy prints it ({:.32g}) */
        CHECK(strstr(page, ",le=\"0.5\"} 1\n"));
        CHECK(strstr(page, ",le=\"3600000\"} 6\n"));
        CHECK(strstr(page, ",le=\"+Inf\"} 8\n"));
        free(page);
        wp_metrics_free(m);
}

static void test_label_values_escaped_and_utf8_repaired(void)
{
        struct wp_metrics_config cfg = {
                .n_shards = 1, .max_value_len = 16, .istio_version = "1.2\"3"};
        struct wp_metrics *m = NULL;
        struct wp_metrics_labels l = {0};
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1};
        json_object *root;
        char *page;

        REQUIRE(wp_metrics_new(&cfg, &m) == 0);
        SET(&l, WP_ML_SOURCE_WORKLOAD, "a\\b\"c\nd");
        SET(&l, WP_ML_SOURCE_APP, "bad\xff\xfe");                  /* invalid UTF-8 */
        SET(&l, WP_ML_SOURCE_VERSION, "0123456789abcde\xc3\xa9z"); /* cut inside é */
        SET(&l, WP_ML_DESTINATION_SERVICE, "x{y}=,z");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        /* a value that only differs beyond the cap is the same series */
        SET(&l, WP_ML_SOURCE_VERSION, "0123456789abcde\xc3\xa9y");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        page = render(m);
        REQUIRE(page);
        CHECK(strstr(page, "source_workload=\"a\\\\b\\\"c\\nd\""));
        CHECK(strstr(page, "source_app=\"bad\xef\xbf\xbd\xef\xbf\xbd\""));
        CHECK(strstr(page, "source_version=\"0123456789abcde\",")); /* 15 bytes: é not cut */
        CHECK(strstr(page, "tag=\"1.2\\\"3\""));
        CHECK(strstr(page, "connection_security_policy=\"unknown\"} 2\n"));
        root = prom_parse(page);
        if (root) {
                const char *kv[] = {"source_workload",
                                    "a\\b\"c\nd",
                                    "source_app",
                                    "bad\xef\xbf\xbd\xef\xbf\xbd",
                                    "destination_service",
                                    "x{y}=,z",
                                    NULL};
                const char *b[] = {"component", "proxy", "tag", "1.2\"3", NULL};

                CHECK(sample(root, "istio_requests_total", kv) == 2);
                CHECK(sample(root, "istio_build", b) == 1);
                json_object_put(root);
        } else {
                CHECK(parser_missing);
        }
        free(page);
        wp_metrics_free(m);
}

static void test_tcp_open_bytes_close(void)
{
        struct wp_metrics *m = new_registry(2, 0);
        struct wp_metrics_labels l;
        struct wp_metrics_tcp *t1, *t2, *t3;
        const char *kv[] = {"source_workload", "productpage-v1", "request_protocol", "tcp", NULL};
        json_object *root;
        char *page;

        REQUIRE(m);
        labels_a(&l);
        t1 = wp_metrics_tcp_open(wp_metrics_shard(m, 0), &l);
        t2 = wp_metrics_tcp_open(wp_metrics_shard(m, 0), &l);
        t3 = wp_metrics_tcp_open(wp_metrics_shard(m, 1), &l); /* same labels, other shard */
        CHECK(t1 == t2);
        CHECK(t1 != t3);
        wp_metrics_tcp_bytes(t1, 10, 20);
        wp_metrics_tcp_bytes(t2, 1, 2);
        wp_metrics_tcp_bytes(t3, 100, 200);
        wp_metrics_tcp_close(t1);
        wp_metrics_tcp_close(t3);
        page = render(m);
        REQUIRE(page);
        CHECK(!strstr(page, "response_code=\"0\",grpc_response_status=\"\",response_flags=\"-\","
                            "connection_security_policy=\"mutual_tls\"} 3"));
        root = prom_parse(page);
        if (root) {
                CHECK(sample(root, "istio_tcp_connections_opened_total", kv) == 3);
                CHECK(sample(root, "istio_tcp_connections_closed_total", kv) == 2);
                CHECK(sample(root, "istio_tcp_sent_bytes_total", kv) == 111);
                CHECK(sample(root, "istio_tcp_received_bytes_total", kv) == 222);
                CHECK_INT_EQ(count_samples(root, "istio_tcp_connections_opened_total"), 1);
                CHECK_STR_EQ(family_type(root, "istio_tcp_sent_bytes"), "counter");
                json_object_put(root);
        } else {
                CHECK(parser_missing);
        }
        free(page);
        wp_metrics_free(m);
}

/* The whole page, from a mixed workload over 3 shards, against values computed here. */
static void test_whole_page_parsed_by_prometheus_client(void)
{
        struct wp_metrics *m = new_registry(3, 0);
        const unsigned codes[] = {200, 404, 503};
        unsigned expect[8][3] = {{0}}, tcp_open[8] = {0}, n_tcp = 0;
        uint64_t dur_sum[8][3] = {{0}};
        json_object *root;
        char *page, wl[8][32];
        unsigned i, w, c;
        size_t fams;

        REQUIRE(m);
        for (i = 0; i < 8; i++)
                snprintf(wl[i], sizeof(wl[i]), "client-%u", i);
        for (i = 0; i < 3000; i++) {
                struct wp_metrics_labels l;
                struct wp_metrics_http o = {.grpc_status = -1};

                w = (i * 7) % 8;
                c = (i / 3) % 3;
                labels_a(&l);
                SET(&l, WP_ML_SOURCE_WORKLOAD, wl[w]);
                o.response_code = codes[c];
                o.duration_ms = i % 1000;
                o.request_bytes = i;
                o.response_bytes = 3 * i;
                CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, i % 3), &l, &o), 0);
                expect[w][c]++;
                dur_sum[w][c] += i % 1000;
                if (i % 10 == 0) {
                        struct wp_metrics_tcp *t =
                                wp_metrics_tcp_open(wp_metrics_shard(m, i % 3), &l);

                        wp_metrics_tcp_bytes(t, 5, 7);
                        wp_metrics_tcp_close(t);
                        tcp_open[w]++;
                }
        }
        page = render(m);
        REQUIRE(page);
        root = prom_parse(page);
        if (!root) {
                CHECK(parser_missing);
                free(page);
                wp_metrics_free(m);
                return;
        }
        fams = json_object_array_length(root);
        CHECK_INT_EQ(fams, 10); /* 1 + 4 tcp + overflow + build + 3 histograms */
        CHECK_INT_EQ(count_samples(root, "istio_requests_total"), 24);
        CHECK_INT_EQ(count_samples(root, "istio_request_bytes_bucket"), 24 * 20);
        for (w = 0; w < 8; w++) {
                for (c = 0; c < 3; c++) {
                        char code[8];
                        const char *kv[] = {"source_workload", wl[w], "response_code", code, NULL};
                        const char *kvi[] = {"source_workload",
                                             wl[w],
                                             "response_code",
                                             code,
                                             "le",
                                             "+Inf",
                                             NULL};

                        snprintf(code, sizeof(code), "%u", codes[c]);
                        CHECK(sample(root, "istio_requests_total", kv) == expect[w][c]);
                        CHECK(sample(root, "istio_request_duration_milliseconds_count", kv) ==
                              expect[w][c]);
                        CHECK(sample(root, "istio_request_duration_milliseconds_bucket", kvi) ==
                              expect[w][c]);
                        CHECK(sample(root, "istio_request_duration_milliseconds_sum", kv) ==
                              (double)dur_sum[w][c]);
                }
        }
        {
                const char *h[] = {"family", "http", NULL};
                const char *t[] = {"family", "tcp", NULL};

                CHECK(sample(root, "istio_waypoint_metrics_overflow_total", h) == 0);
                CHECK(sample(root, "istio_waypoint_metrics_overflow_total", t) == 0);
                for (w = 0; w < 8; w++) {
                        const char *kv[] = {"source_workload", wl[w], NULL};

                        n_tcp += tcp_open[w] != 0;
                        CHECK(sample(root, "istio_tcp_connections_opened_total", kv) ==
                              (tcp_open[w] ? (double)tcp_open[w] : -1));
                        CHECK(sample(root, "istio_tcp_received_bytes_total", kv) ==
                              (tcp_open[w] ? 7.0 * tcp_open[w] : -1));
                }
                CHECK_INT_EQ(count_samples(root, "istio_tcp_connections_opened_total"), n_tcp);
                CHECK(n_tcp >= 2);
        }
        json_object_put(root);
        /* series are sorted: client-0 before client-1 in every family */
        CHECK(strstr(page, "source_workload=\"client-0\"") <
              strstr(page, "source_workload=\"client-1\""));
        free(page);
        wp_metrics_free(m);
}

static uint64_t heap_in_use(void)
{
#if defined(__SANITIZE_ADDRESS__)
        return 0; /* ASan's allocator does not report through mallinfo2 */
#else
        return mallinfo2().uordblks;
#endif
}

/* 100,000 distinct source workloads (churning Jobs) against the default cap of 10,000. */
static void test_cardinality_cap_keeps_memory_flat(void)
{
        struct wp_metrics *m = new_registry(1, 0);
        struct wp_metrics_shard *sh;
        struct wp_metrics_stats st1 = {{0}}, st2;
        struct wp_metrics_labels l;
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1, .duration_ms = 1};
        static char big[5000];
        uint64_t heap1 = 0, heap2;
        char name[64];
        unsigned i, dropped = 0;

        REQUIRE(m);
        sh = wp_metrics_shard(m, 0);
        labels_a(&l);
        memset(big, 'h', sizeof(big) - 1);
        for (i = 0; i < 100000; i++) {
                int r;

                snprintf(name, sizeof(name), "job-%06u-%s", i, "abcdefghijklmnopqrstuvwxyz");
                SET(&l, WP_ML_SOURCE_WORKLOAD, name);
                /* a hostile Host header: long and distinct; truncated to max_value_len */
                snprintf(big, sizeof(big), "%06u", i);
                big[6] = 'h';
                l.v[WP_ML_DESTINATION_SERVICE] = (struct wp_mstr){big, sizeof(big) - 1};
                r = wp_metrics_record_http(sh, &l, &o);
                if (r == -ENOSPC)
                        dropped++;
                else
                        CHECK_INT_EQ(r, 0);
                if (i == 20000) {
                        wp_metrics_get_stats(m, &st1);
                        heap1 = heap_in_use();
                }
        }
        wp_metrics_get_stats(m, &st2);
        heap2 = heap_in_use();
        CHECK_INT_EQ(st2.series[0], WP_METRICS_DEFAULT_MAX_SERIES);
        CHECK_INT_EQ(st2.overflow[0], 90000);
        CHECK_INT_EQ(dropped, 90000);
        CHECK_INT_EQ(st1.bytes, st2.bytes);
        CHECK_INT_EQ(st1.intern_bytes, st2.intern_bytes);
        CHECK_INT_EQ(heap1, heap2);
        /* interned strings bounded by the cap and the value length limit */
        CHECK(st2.intern_bytes < (uint64_t)WP_METRICS_DEFAULT_MAX_SERIES * 2 * (256 + 32) + 65536);
        CHECK(st2.bytes < 64u << 20);
        fprintf(stderr, "  cap: %" PRIu64 " series, %" PRIu64 " bytes, %" PRIu64 " interned\n",
                st2.series[0], st2.bytes, st2.intern_bytes);
        /* known label sets keep counting after the cap */
        SET(&l, WP_ML_SOURCE_WORKLOAD, "job-000000-abcdefghijklmnopqrstuvwxyz");
        snprintf(big, sizeof(big), "%06u", 0);
        big[6] = 'h';
        CHECK_INT_EQ(wp_metrics_record_http(sh, &l, &o), 0);
        /* TCP has its own budget; a new TCP label set past the cap gets the discard sink */
        {
                struct wp_metrics *m2 = new_registry(1, 2);
                struct wp_metrics_tcp *t;
                struct wp_metrics_stats st;

                REQUIRE(m2);
                for (i = 0; i < 3; i++) {
                        snprintf(name, sizeof(name), "w%u", i);
                        SET(&l, WP_ML_SOURCE_WORKLOAD, name);
                        t = wp_metrics_tcp_open(wp_metrics_shard(m2, 0), &l);
                        CHECK(wp_metrics_tcp_dropped(t) == (i == 2));
                        wp_metrics_tcp_bytes(t, 1, 1);
                        wp_metrics_tcp_close(t);
                }
                wp_metrics_get_stats(m2, &st);
                CHECK_INT_EQ(st.series[1], 2);
                CHECK_INT_EQ(st.overflow[1], 1);
                wp_metrics_free(m2);
        }
        wp_metrics_free(m);
}

struct worker_arg {
        struct wp_metrics_shard *sh;
        unsigned id;
        int *finished;
};

#define CONC_ITERS 20000
#define CONC_SETS  50

static void *worker_main(void *p)
{
        struct worker_arg *a = p;
        char name[32];
        unsigned i;

        for (i = 0; i < CONC_ITERS; i++) {
                struct wp_metrics_labels l;
                struct wp_metrics_http o = {.response_code = 200,
                                            .grpc_status = -1,
                                            .duration_ms = i % 100,
                                            .request_bytes = 1,
                                            .response_bytes = 2};

                labels_a(&l);
                snprintf(name, sizeof(name), "c-%02u", i % CONC_SETS);
                SET(&l, WP_ML_SOURCE_WORKLOAD, name);
                if (wp_metrics_record_http(a->sh, &l, &o) != 0)
                        abort();
                if (i % 4 == 0) {
                        struct wp_metrics_tcp *t = wp_metrics_tcp_open(a->sh, &l);

                        wp_metrics_tcp_bytes(t, 3, 4);
                        wp_metrics_tcp_close(t);
                }
        }
        __atomic_fetch_add(a->finished, 1, __ATOMIC_RELEASE);
        return NULL;
}

static void test_four_shards_concurrent_with_render_totals_exact(void)
{
        struct wp_metrics *m = new_registry(4, 0);
        struct worker_arg args[4];
        pthread_t th[4];
        unsigned i, renders = 0;
        int finished = 0;
        json_object *root;
        char *page;

        REQUIRE(m);
        for (i = 0; i < 4; i++) {
                args[i].sh = wp_metrics_shard(m, i);
                args[i].id = i;
                args[i].finished = &finished;
                REQUIRE(pthread_create(&th[i], NULL, worker_main, &args[i]) == 0);
        }
        /* scrape concurrently until every worker has finished */
        while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < 4) {
                page = render(m);
                CHECK(page != NULL);
                free(page);
                renders++;
        }
        for (i = 0; i < 4; i++)
                pthread_join(th[i], NULL);
        fprintf(stderr, "  %u concurrent renders\n", renders);
        page = render(m);
        REQUIRE(page);
        root = prom_parse(page);
        if (root) {
                char name[32];
                uint64_t total = 0;

                for (i = 0; i < CONC_SETS; i++) {
                        const char *kv[] = {"source_workload", name, NULL};
                        uint64_t per = 4 * (CONC_ITERS / CONC_SETS);
                        double v;

                        snprintf(name, sizeof(name), "c-%02u", i);
                        v = sample(root, "istio_requests_total", kv);
                        CHECK(v == (double)per);
                        total += (uint64_t)v;
                        CHECK(sample(root, "istio_request_bytes_sum", kv) == (double)per);
                        CHECK(sample(root, "istio_response_bytes_count", kv) == (double)per);
                }
                CHECK_INT_EQ(total, 4 * CONC_ITERS);
                CHECK_INT_EQ(count_samples(root, "istio_requests_total"), CONC_SETS);
                {
                        const char *kv[] = {"source_workload", "c-00", NULL};

                        /* i % 4 == 0 and i % 50 == 0 -> every 100th iteration, per worker */
                        CHECK(sample(root, "istio_tcp_connections_opened_total", kv) ==
                              4.0 * (CONC_ITERS / 100));
                        CHECK(sample(root, "istio_tcp_sent_bytes_total", kv) ==
                              12.0 * (CONC_ITERS / 100));
                }
                json_object_put(root);
        } else {
                CHECK(parser_missing);
        }
        free(page);
        wp_metrics_free(m);
}

/* Appends to a growable text (the caller frees t->data). */
static int text_sink_append(struct wp_metrics_text *t, const char *p, size_t n)
{
        char *q = realloc(t->data, t->len + n + 1);

        if (!q)
                return -ENOMEM;
        memcpy(q + t->len, p, n);
        t->data = q;
        t->len += n;
        t->data[t->len] = 0;
        return 0;
}

/* Reads a whole page in reads of at most step bytes; returns its length and FNV-1a hash. */
static size_t page_digest(struct wp_metrics *m, size_t step, uint64_t *ret_fnv)
{
        struct wp_metrics_page *pg = NULL;
        uint64_t h = 0xcbf29ce484222325ull;
        char *buf = malloc(step);
        size_t total = 0, n, i;

        if (!buf || wp_metrics_page_new(m, &pg) < 0)
                abort();
        while ((n = wp_metrics_page_read(pg, buf, step)) > 0) {
                CHECK(n <= step);
                for (i = 0; i < n; i++) {
                        h ^= (unsigned char)buf[i];
                        h *= 0x100000001b3ull;
                }
                total += n;
        }
        CHECK_INT_EQ(wp_metrics_page_read(pg, buf, step), 0); /* stays at the end */
        wp_metrics_page_free(pg);
        free(buf);
        *ret_fnv = h;
        return total;
}

/* The streamed page is byte-identical to the page of the one-buffer renderer it replaced
 * (length and hash recorded from it, page_fixture.h), in one piece and read in any steps. */
static void test_page_byte_identical_to_previous_renderer(void)
{
        static const size_t steps[] = {1, 2, 7, 100, 4093, 65536, 1 << 20};
        struct wp_metrics *m = fixture_new(), *e = fixture_empty();
        char *page;
        uint64_t h;
        size_t i;

        REQUIRE(m && e);
        page = render(m);
        REQUIRE(page);
        CHECK_INT_EQ(strlen(page), PAGE_FIXTURE_LEN);
        CHECK(fixture_fnv1a(page, strlen(page)) == PAGE_FIXTURE_FNV);
        /* the fixture covers what it claims to */
        CHECK(strstr(page, "istio_waypoint_metrics_overflow_total{family=\"http\"} 12\n"));
        CHECK(strstr(page, "source_workload=\"quote\\\"back\\\\slash\""));
        CHECK(strstr(page, "source_workload=\"new\\nline\""));
        CHECK(strstr(page, "tag=\"1.24.0-\\\"q\\\"\\\\\"} 1\n"));
        CHECK(strstr(page, "grpc_response_status=\"14\""));
        free(page);
        for (i = 0; i < sizeof(steps) / sizeof(steps[0]); i++) {
                CHECK_INT_EQ(page_digest(m, steps[i], &h), PAGE_FIXTURE_LEN);
                CHECK(h == PAGE_FIXTURE_FNV);
        }
        CHECK_INT_EQ(page_digest(e, 3, &h), PAGE_EMPTY_LEN);
        CHECK(h == PAGE_EMPTY_FNV);
        wp_metrics_free(m);
        wp_metrics_free(e);
}

/* A page of tens of MiB is produced through a fixed buffer; the page holds a few KiB plus 8
 * bytes per series, whatever the page's length. */
/* Reads a whole page in reads of at most step bytes into one NUL-terminated text. */
static char *page_text(struct wp_metrics *m, size_t step)
{
        struct wp_metrics_page *pg = NULL;
        size_t len = 0, cap = 1 << 20, n;
        char *out = malloc(cap);

        if (!out || wp_metrics_page_new(m, &pg) < 0)
                abort();
        for (;;) {
                if (cap - len <= step) {
                        cap *= 2;
                        out = realloc(out, cap);
                        if (!out)
                                abort();
                }
                n = wp_metrics_page_read(pg, out + len, step);
                if (!n)
                        break;
                CHECK(n <= step);
                len += n;
        }
        out[len] = 0;
        wp_metrics_page_free(pg);
        return out;
}

/* Appends the text format's escaped form of v (\ " newline) to out at *len. */
static void escape_into(char *out, size_t *len, const char *v, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                if (v[i] == '\\' || v[i] == '"') {
                        out[(*len)++] = '\\';
                        out[(*len)++] = v[i];
                } else if (v[i] == '\n') {
                        out[(*len)++] = '\\';
                        out[(*len)++] = 'n';
                } else {
                        out[(*len)++] = v[i];
                }
        }
}

/* The longest possible lines: every label value at the 4096-byte cap and made of bytes that
 * the format escapes (one value all quotes, the others mixing escaped and plain bytes, escaped
 * bytes first and last), so a sample line is over 128 KiB, longer than any reader's buffer.
 * The label set is recorded on two shards (one merged run) next to a plain one. The page is
 * the same whatever the read size (lines written in place or through the page's line buffer),
 * and its lines are exactly those built here with an independent escaper. */
static void test_longest_escaped_lines_any_read_size(void)
{
        static const char *const names[] = {"source_workload",
                                            "source_canonical_service",
                                            "source_canonical_revision",
                                            "source_workload_namespace",
                                            "source_principal",
                                            "source_app",
                                            "source_version",
                                            "source_cluster",
                                            "destination_workload",
                                            "destination_workload_namespace",
                                            "destination_principal",
                                            "destination_app",
                                            "destination_version",
                                            "destination_service",
                                            "destination_canonical_service",
                                            "destination_canonical_revision",
                                            "destination_service_name",
                                            "destination_service_namespace",
                                            "destination_cluster",
                                            "request_protocol",
                                            "response_flags",
                                            "connection_security_policy"};
        static const size_t steps[] = {1 << 20, 65536, 4093, 7};
        const size_t vlen = 4096, cap = 22 * (2 * vlen + 64) + 1024;
        struct wp_metrics_config cfg = {.n_shards = 2, .max_value_len = (uint32_t)vlen};
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = 3, .duration_ms = 7};
        struct wp_metrics_labels l = {0}, plain = {0};
        struct wp_metrics *m = NULL;
        char *vals[_WP_ML_MAX], *want = malloc(cap), *page, *p;
        size_t len, line_len, i, j;
        unsigned lines = 0;

        REQUIRE(want && _WP_ML_MAX == sizeof(names) / sizeof(names[0]));
        REQUIRE(wp_metrics_new(&cfg, &m) == 0);
        for (i = 0; i < _WP_ML_MAX; i++) {
                vals[i] = malloc(vlen);
                REQUIRE(vals[i]);
                for (j = 0; j < vlen; j++)
                        vals[i][j] = i == 0 ? '"' : "\\\"\nx-"[(i + j) % (j % 7 ? 5 : 3)];
                vals[i][vlen - 1] = "\\\"\n"[i % 3];
                l.v[i] = (struct wp_mstr){vals[i], (uint32_t)vlen};
        }
        SET(&plain, WP_ML_SOURCE_WORKLOAD, "plain");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 1), &l, &o), 0);
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 1), &plain, &o), 0);
        /* istio_requests_total{<labels>} 2 */
        len = (size_t)sprintf(want, "istio_requests_total{reporter=\"waypoint\"");
        for (i = 0; i < _WP_ML_MAX; i++) {
                if (i == WP_ML_RESPONSE_FLAGS)
                        len += (size_t)sprintf(want + len,
                                               ",response_code=\"200\",grpc_response_status=\"3\"");
                len += (size_t)sprintf(want + len, ",%s=\"", names[i]);
                escape_into(want, &len, vals[i], vlen);
                want[len++] = '"';
        }
        len += (size_t)sprintf(want + len, "} 2\n");
        want[len] = 0;
        REQUIRE(len > 128 * 1024); /* longer than the admin server's 64 KiB reads */
        page = page_text(m, steps[0]);
        REQUIRE(page);
        CHECK(strstr(page, want) != NULL);
        /* every histogram line of the long series carries the same label text */
        line_len = len - strlen("istio_requests_total{") - strlen("} 2\n");
        for (p = page; (p = strstr(p, "_bucket{reporter=")) != NULL; p++) {
                if (memcmp(p + 8, want + strlen("istio_requests_total{"), line_len) == 0 &&
                    strncmp(p + 8 + line_len, ",le=\"", 5) == 0)
                        lines++;
        }
        CHECK_INT_EQ(lines, 3 * 20);
        CHECK(strstr(page, "source_workload=\"plain\"") != NULL);
        for (i = 1; i < sizeof(steps) / sizeof(steps[0]); i++) {
                char *again = page_text(m, steps[i]);

                REQUIRE(again);
                CHECK(strcmp(again, page) == 0);
                free(again);
        }
        free(page);
        for (i = 0; i < _WP_ML_MAX; i++)
                free(vals[i]);
        free(want);
        wp_metrics_free(m);
}

static void test_page_memory_independent_of_page_length(void)
{
        struct wp_metrics *m = new_registry(2, 0);
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1, .duration_ms = 5};
        struct wp_metrics_page *pg = NULL, *small = NULL;
        struct wp_metrics_labels l;
        size_t total = 0, n, fixed;
        char name[32], buf[4096];
        unsigned i;

        REQUIRE(m);
        labels_a(&l);
        SET(&l, WP_ML_SOURCE_WORKLOAD, "first");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        REQUIRE(wp_metrics_page_new(m, &small) == 0);
        fixed = wp_metrics_page_bytes(small) - sizeof(void *);
        wp_metrics_page_free(small);
        CHECK(fixed < 64 * 1024);
        for (i = 0; i < 1000; i++) {
                snprintf(name, sizeof(name), "w-%04u", i);
                SET(&l, WP_ML_SOURCE_WORKLOAD, name);
                CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, i % 2), &l, &o), 0);
        }
        REQUIRE(wp_metrics_page_new(m, &pg) == 0);
        CHECK_INT_EQ(wp_metrics_page_bytes(pg), fixed + 1001 * sizeof(void *));
        while ((n = wp_metrics_page_read(pg, buf, sizeof(buf))) > 0)
                total += n;
        fprintf(stderr, "  page %zu bytes through a %zu-byte buffer; page holds %zu bytes\n", total,
                sizeof(buf), wp_metrics_page_bytes(pg));
        CHECK(total > 40u * 1024 * 1024);
        CHECK(wp_metrics_page_bytes(pg) * 200 < total);
        wp_metrics_page_free(pg);
        wp_metrics_free(m);
}

/* A page shows the series published when it started, with the values current when each line
 * is produced; a page freed half-way leaks nothing (ASan); several pages at once. */
static void test_page_view_fixed_at_start_values_live(void)
{
        struct wp_metrics *m = new_registry(2, 0);
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1};
        struct wp_metrics_page *pg = NULL, *pg2 = NULL, *half = NULL;
        struct wp_metrics_text t = {0};
        struct wp_metrics_labels l;
        char buf[512];
        size_t n;

        REQUIRE(m);
        labels_a(&l);
        SET(&l, WP_ML_SOURCE_WORKLOAD, "old");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        REQUIRE(wp_metrics_page_new(m, &pg) == 0);
        REQUIRE(wp_metrics_page_new(m, &half) == 0);
        CHECK_INT_EQ(wp_metrics_page_read(half, buf, sizeof(buf)), sizeof(buf));
        half = wp_metrics_page_free(half);
        CHECK(half == NULL);
        /* after the page started: a new series, and a second observation of the old one on
         * another shard */
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 1), &l, &o), 0);
        SET(&l, WP_ML_SOURCE_WORKLOAD, "new");
        CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
        REQUIRE(wp_metrics_page_new(m, &pg2) == 0);
        while ((n = wp_metrics_page_read(pg, buf, sizeof(buf))) > 0)
                CHECK(text_sink_append(&t, buf, n) == 0);
        CHECK(strstr(t.data, "source_workload=\"old\"") != NULL);
        CHECK(strstr(t.data, "source_workload=\"new\"") == NULL);
        /* the old series' shard-1 twin was published after the page started: not summed */
        CHECK(strstr(t.data, "connection_security_policy=\"mutual_tls\"} 1\n") != NULL);
        free(t.data);
        t.data = NULL;
        t.len = 0;
        while ((n = wp_metrics_page_read(pg2, buf, sizeof(buf))) > 0)
                CHECK(text_sink_append(&t, buf, n) == 0);
        CHECK(strstr(t.data, "source_workload=\"new\"") != NULL);
        CHECK(strstr(t.data, "source_workload=\"old\"") != NULL);
        CHECK(strstr(t.data, "connection_security_policy=\"mutual_tls\"} 2\n") != NULL);
        free(t.data);
        wp_metrics_page_free(pg);
        wp_metrics_page_free(pg2);
        CHECK_INT_EQ(wp_metrics_page_new(NULL, &pg), -EINVAL);
        CHECK_INT_EQ(wp_metrics_page_new(m, NULL), -EINVAL);
        CHECK(wp_metrics_page_free(NULL) == NULL);
        CHECK_INT_EQ(wp_metrics_page_bytes(NULL), 0);
        wp_metrics_free(m);
}

static int fa_page(void *arg)
{
        struct wp_metrics *m = arg;
        struct wp_metrics_page *pg = NULL;
        char buf[1000];
        size_t total = 0, n;
        int r = wp_metrics_page_new(m, &pg);

        if (r < 0)
                return r;
        while ((n = wp_metrics_page_read(pg, buf, sizeof(buf))) > 0)
                total += n;
        wp_metrics_page_free(pg);
        return total == PAGE_FIXTURE_LEN ? 0 : -EPROTO;
}

static void test_failalloc_page(void)
{
        struct wp_metrics *m = fixture_new();

        REQUIRE(m);
        CHECK(check_failalloc_run(fa_page, m) >= 3);
        wp_metrics_free(m);
}

static void test_config_rejected_when_invalid(void)
{
        struct wp_metrics_config cfg = {.n_shards = 0};
        struct wp_metrics *m = NULL;

        CHECK_INT_EQ(wp_metrics_new(&cfg, &m), -EINVAL);
        cfg.n_shards = WP_METRICS_MAX_SHARDS + 1;
        CHECK_INT_EQ(wp_metrics_new(&cfg, &m), -EINVAL);
        cfg.n_shards = 1;
        cfg.max_value_len = 8;
        CHECK_INT_EQ(wp_metrics_new(&cfg, &m), -EINVAL);
        cfg.max_value_len = 5000;
        CHECK_INT_EQ(wp_metrics_new(&cfg, &m), -EINVAL);
        cfg.max_value_len = 0;
        cfg.max_series = (1u << 24) + 1;
        CHECK_INT_EQ(wp_metrics_new(&cfg, &m), -EINVAL);
        CHECK_INT_EQ(wp_metrics_new(NULL, &m), -EINVAL);
        CHECK(m == NULL);
        cfg.max_series = 0;
        REQUIRE(wp_metrics_new(&cfg, &m) == 0);
        CHECK(wp_metrics_shard(m, 0) != NULL);
        CHECK(wp_metrics_shard(m, 1) == NULL);
        CHECK(wp_metrics_shard(NULL, 0) == NULL);
        CHECK(wp_metrics_free(m) == NULL);
        CHECK(wp_metrics_free(NULL) == NULL);
}

static int failing_sink(void *user, const char *data, size_t len)
{
        unsigned *calls = user;

        (*calls)++;
        return -EPIPE;
}

static void test_render_propagates_sink_error(void)
{
        struct wp_metrics *m = new_registry(1, 0);
        unsigned calls = 0;

        REQUIRE(m);
        CHECK_INT_EQ(wp_metrics_render(m, failing_sink, &calls), -EPIPE);
        CHECK_INT_EQ(calls, 1);
        wp_metrics_free(m);
}

static void test_render_file(void)
{
        struct wp_metrics *m = new_registry(1, 0);
        char *buf = NULL;
        size_t len = 0;
        FILE *f;

        REQUIRE(m);
        f = open_memstream(&buf, &len);
        REQUIRE(f);
        CHECK_INT_EQ(wp_metrics_render_file(m, f), 0);
        fclose(f);
        CHECK(buf && strstr(buf, "istio_build{component=\"proxy\""));
        free(buf);
        wp_metrics_free(m);
}

/* Checks label i of l against want ("(unset)" for a label left empty). */
static void check_label(const struct wp_metrics_labels *l, enum wp_metrics_label i,
                        const char *want)
{
        char *s = l->v[i].p ? strndup(l->v[i].p, l->v[i].n) : strdup("(unset)");

        CHECK_STR_EQ(s, want);
        free(s);
}

static void test_baggage_sets_source_labels(void)
{
        const char *b = "k8s.namespace.name=default, k8s.deployment.name=productpage-v1,"
                        "service.name=productpage;prop=1,service.version=v1,"
                        "k8s.cluster.name=Kubernetes,app.name=pp,app.version=v9,other=x";
        struct wp_metrics_labels l = {0};

        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, b, strlen(b)), 7);
        check_label(&l, WP_ML_SOURCE_WORKLOAD_NAMESPACE, "default");
        check_label(&l, WP_ML_SOURCE_WORKLOAD, "productpage-v1");
        check_label(&l, WP_ML_SOURCE_CANONICAL_SERVICE, "productpage");
        check_label(&l, WP_ML_SOURCE_CANONICAL_REVISION, "v1");
        check_label(&l, WP_ML_SOURCE_CLUSTER, "Kubernetes");
        check_label(&l, WP_ML_SOURCE_APP, "pp");
        check_label(&l, WP_ML_SOURCE_VERSION, "v9");
        check_label(&l, WP_ML_SOURCE_PRINCIPAL, "(unset)");
}

static void test_baggage_rejects_and_limits(void)
{
        struct wp_metrics_labels l = {0};
        char *big;
        size_t i, n;

        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, NULL, 0), -EINVAL);
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "", 0), 0);
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, ",,,", 3), 0);
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "k8s.pod.name", 12), 0);
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "k8s.pod.name=", 13), 0);
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "k8s.pod.name= ;p", 16), 0);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD].p == NULL);
        /* duplicates: last wins, counted once */
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "k8s.job.name=a,k8s.job.name=b", 29),
                     1);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD].n == 1 && l.v[WP_ML_SOURCE_WORKLOAD].p[0] == 'b');
        /* length given shorter than the string: only that prefix is read */
        memset(&l, 0, sizeof(l));
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, "service.name=abcdef", 15), 1);
        CHECK_INT_EQ(l.v[WP_ML_SOURCE_CANONICAL_SERVICE].n, 2);
        /* a key past the 64th member is ignored */
        big = malloc(20000);
        REQUIRE(big);
        n = 0;
        for (i = 0; i < 64; i++)
                n += (size_t)sprintf(big + n, "x%zu=y,", i);
        n += (size_t)sprintf(big + n, "service.name=late");
        memset(&l, 0, sizeof(l));
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, big, n), 0);
        /* and past 8192 bytes */
        memset(big, ',', 8200);
        n = 8200 + (size_t)sprintf(big + 8200, "service.name=late");
        CHECK_INT_EQ(wp_metrics_labels_source_from_baggage(&l, big, n), 0);
        free(big);
}

static void test_source_principal_sets_namespace(void)
{
        const char *p = "spiffe://cluster.local/ns/bookinfo/sa/productpage";
        struct wp_metrics_labels l = {0};

        SET(&l, WP_ML_SOURCE_WORKLOAD_NAMESPACE, "from-metadata");
        wp_metrics_labels_set_source_principal(&l, p, strlen(p));
        CHECK(l.v[WP_ML_SOURCE_PRINCIPAL].p == p);
        CHECK_INT_EQ(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].n, 8);
        CHECK(memcmp(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].p, "bookinfo", 8) == 0);
        memset(&l, 0, sizeof(l));
        wp_metrics_labels_set_source_principal(&l, "spiffe://td/sa/x", 16);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].p == NULL);
        wp_metrics_labels_set_source_principal(&l, "spiffe://td/ns/", 15);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].p == NULL);
        wp_metrics_labels_set_source_principal(&l, "spiffe://td/ns/end", 18);
        CHECK_INT_EQ(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].n, 3);
        memset(&l, 0, sizeof(l));
        wp_metrics_labels_set_source_principal(&l, NULL, 0);
        wp_metrics_labels_set_source_principal(&l, "", 0);
        CHECK(l.v[WP_ML_SOURCE_PRINCIPAL].p == NULL);
}

static void test_workload_helpers(void)
{
        Istio__Workload__Workload w = ISTIO__WORKLOAD__WORKLOAD__INIT;
        struct wp_metrics_labels l = {0};
        char buf[128];

        w.name = "productpage-v1-abc";
        w.namespace_ = "bookinfo";
        w.workload_name = "productpage-v1";
        w.canonical_name = "productpage";
        w.canonical_revision = "v1";
        w.cluster_id = "Kubernetes";
        w.trust_domain = "cluster.local";
        w.service_account = "bookinfo-productpage";
        wp_metrics_labels_source_from_workload(&l, &w);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD].p == w.workload_name);
        CHECK(l.v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].p == w.namespace_);
        CHECK(l.v[WP_ML_SOURCE_CANONICAL_SERVICE].p == w.canonical_name);
        CHECK(l.v[WP_ML_SOURCE_CANONICAL_REVISION].p == w.canonical_revision);
        CHECK(l.v[WP_ML_SOURCE_CLUSTER].p == w.cluster_id);
        CHECK(l.v[WP_ML_SOURCE_APP].p == NULL);
        CHECK(l.v[WP_ML_SOURCE_PRINCIPAL].p == NULL);
        wp_metrics_labels_destination_from_workload(&l, &w);
        CHECK(l.v[WP_ML_DESTINATION_WORKLOAD].p == w.workload_name);
        CHECK(l.v[WP_ML_DESTINATION_CANONICAL_REVISION].p == w.canonical_revision);
        CHECK_INT_EQ(wp_metrics_workload_principal(&w, buf, sizeof(buf)), 58);
        CHECK_STR_EQ(buf, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage");
        CHECK_INT_EQ(wp_metrics_workload_principal(&w, buf, 58), -ENOSPC);
        CHECK_INT_EQ(wp_metrics_workload_principal(&w, buf, 59), 58);
        w.service_account = (char *)"";
        CHECK_INT_EQ(wp_metrics_workload_principal(&w, buf, sizeof(buf)), -EINVAL);
        CHECK_INT_EQ(wp_metrics_workload_principal(NULL, buf, sizeof(buf)), -EINVAL);
        /* empty fields stay unset */
        {
                Istio__Workload__Workload e = ISTIO__WORKLOAD__WORKLOAD__INIT;
                struct wp_metrics_labels l2 = {0};

                wp_metrics_labels_source_from_workload(&l2, &e);
                wp_metrics_labels_source_from_workload(&l2, NULL);
                CHECK(l2.v[WP_ML_SOURCE_WORKLOAD].p == NULL);
                CHECK(l2.v[WP_ML_SOURCE_CANONICAL_REVISION].p == NULL);
        }
}

static int fa_new(void *arg)
{
        struct wp_metrics_config cfg = {.n_shards = 4, .istio_version = "1.24"};
        struct wp_metrics *m = NULL;
        int r = wp_metrics_new(&cfg, &m);

        if (r < 0)
                return r;
        wp_metrics_free(m);
        return 0;
}

static int fa_record_render(void *arg)
{
        struct wp_metrics *m = new_registry(2, 0);
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1, .duration_ms = 3};
        struct wp_metrics_labels l;
        struct wp_metrics_text t = {0};
        struct wp_metrics_tcp *tcp;
        char name[16];
        int r = 0, i;

        if (!m)
                return -ENOMEM;
        labels_a(&l);
        for (i = 0; i < 70 && r == 0; i++) { /* 70 > 64: the index grows once */
                snprintf(name, sizeof(name), "w%d", i);
                SET(&l, WP_ML_SOURCE_WORKLOAD, name);
                r = wp_metrics_record_http(wp_metrics_shard(m, (unsigned)i % 2), &l, &o);
        }
        if (r == 0) {
                tcp = wp_metrics_tcp_open(wp_metrics_shard(m, 0), &l);
                if (wp_metrics_tcp_dropped(tcp))
                        r = -ENOMEM;
        }
        if (r == 0)
                r = wp_metrics_render_text(m, &t);
        if (r == 0 && !strstr(t.data, "source_workload=\"w69\""))
                r = -EPROTO;
        wp_metrics_text_done(&t);
        wp_metrics_free(m);
        return r;
}

static void test_failalloc_new(void)
{
        CHECK(check_failalloc_run(fa_new, NULL) > 3);
}

static void test_failalloc_record_and_render(void)
{
        CHECK(check_failalloc_run(fa_record_render, NULL) > 10);
}

/* A label set whose creation failed half-way (interning) is recorded fine afterwards. */
static void test_record_recovers_after_allocation_failure(void)
{
        struct wp_metrics_http o = {.response_code = 200, .grpc_status = -1};
        unsigned k;

        for (k = 1; k < 40; k++) {
                struct wp_metrics *m = new_registry(1, 0);
                struct wp_metrics_labels l;
                struct wp_metrics_stats st;
                int r, fired;

                REQUIRE(m);
                labels_a(&l);
                wp_alloc_fail_at(k);
                r = wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o);
                fired = wp_alloc_failed();
                wp_alloc_fail_at(0);
                CHECK(fired ? r == -ENOMEM : r == 0);
                CHECK_INT_EQ(wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o), 0);
                wp_metrics_get_stats(m, &st);
                CHECK_INT_EQ(st.series[0], 1);
                CHECK_INT_EQ(st.overflow[0], fired ? 1 : 0);
                wp_metrics_free(m);
                if (!fired)
                        break;
        }
        CHECK(k > 2);
}

int main(void)
{
        RUN(test_http_counts_and_exact_label_line);
        RUN(test_defaults_fill_unset_labels);
        RUN(test_histogram_buckets_cumulative_with_sum_and_count);
        RUN(test_label_values_escaped_and_utf8_repaired);
        RUN(test_tcp_open_bytes_close);
        RUN(test_whole_page_parsed_by_prometheus_client);
        RUN(test_cardinality_cap_keeps_memory_flat);
        RUN(test_four_shards_concurrent_with_render_totals_exact);
        RUN(test_page_byte_identical_to_previous_renderer);
        RUN(test_longest_escaped_lines_any_read_size);
        RUN(test_page_memory_independent_of_page_length);
        RUN(test_page_view_fixed_at_start_values_live);
        RUN(test_failalloc_page);
        RUN(test_config_rejected_when_invalid);
        RUN(test_render_propagates_sink_error);
        RUN(test_render_file);
        RUN(test_baggage_sets_source_labels);
        RUN(test_baggage_rejects_and_limits);
        RUN(test_source_principal_sets_namespace);
        RUN(test_workload_helpers);
        RUN(test_failalloc_new);
        RUN(test_failalloc_record_and_render);
        RUN(test_record_recovers_after_allocation_failure);
        if (parser_missing)
                fprintf(stderr, "note: python3-prometheus-client missing; parser checks skipped\n");
        return check_exit();
}
