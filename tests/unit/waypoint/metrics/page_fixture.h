/*
 * A registry of fixed content whose rendered page is pinned by length and FNV-1a hash
 * (PAGE_FIXTURE_LEN / PAGE_FIXTURE_FNV): the values were recorded from the one-buffer renderer
 * that preceded the streaming cursor, so the streaming page is byte-identical to it. Covers
 * every family, series merged over shards, escaping, UTF-8 repair, truncation, gRPC status,
 * +Inf observations, both overflow counters and an escaped istio_build tag.
 */
#ifndef WP_TEST_PAGE_FIXTURE_H
#define WP_TEST_PAGE_FIXTURE_H

#include <stdint.h>
#include <string.h>

#include "waypoint/metrics.h"

#define PAGE_FIXTURE_LEN 414796u
#define PAGE_FIXTURE_FNV 0xac66f112754627d2ull
#define PAGE_EMPTY_LEN   400u /* a registry with no series */
#define PAGE_EMPTY_FNV   0x94d356d6ee9066a3ull

#define FX_SET(l, i, s) ((l)->v[(i)] = (struct wp_mstr){(s), (uint32_t)strlen(s)})

static inline uint64_t fixture_fnv1a(const char *p, size_t n)
{
        uint64_t h = 0xcbf29ce484222325ull;

        for (size_t i = 0; i < n; i++) {
                h ^= (unsigned char)p[i];
                h *= 0x100000001b3ull;
        }
        return h;
}

static inline struct wp_metrics *fixture_new(void)
{
        struct wp_metrics_config cfg = {
                .n_shards = 3,
                .max_series = 7,
                .max_value_len = 32,
                .istio_version = "1.24.0-\"q\"\\",
                .local_namespace = "default",
                .local_cluster = "Kubernetes",
        };
        static const char *const wl[] = {
                "productpage-v1",
                "quote\"back\\slash",
                "new\nline",
                "bad-\xff\xfe-utf8",
                "a-very-long-workload-name-that-is-cut-at-32-bytes",
                "z-\xc3\xa9t\xc3\xa9",
        };
        static const unsigned codes[] = {200, 503, 0};
        static const uint64_t durs[] = {0, 1, 7, 26, 999, 3600001, 42};
        struct wp_metrics *m = NULL;
        unsigned i;

        if (wp_metrics_new(&cfg, &m) < 0)
                return NULL;
        for (i = 0; i < 40; i++) {
                struct wp_metrics_labels l;
                struct wp_metrics_http o = {
                        .response_code = codes[i % 3 == 2 ? 1 : 0],
                        .grpc_status = i % 5 == 0 ? 14 : -1,
                        .duration_ms = durs[i % 7],
                        .request_bytes = 100u * i,
                        .response_bytes = i * i * 37u,
                };
                struct wp_metrics_tcp *t;

                memset(&l, 0, sizeof(l));
                FX_SET(&l, WP_ML_SOURCE_WORKLOAD, wl[i % 6]);
                FX_SET(&l, WP_ML_SOURCE_PRINCIPAL, "spiffe://cluster.local/ns/default/sa/pp");
                FX_SET(&l, WP_ML_DESTINATION_SERVICE, "reviews.default.svc.cluster.local");
                FX_SET(&l, WP_ML_CONNECTION_SECURITY_POLICY, "mutual_tls");
                if (i % 3 == 2)
                        FX_SET(&l, WP_ML_RESPONSE_FLAGS, "UF,URX");
                if (i >= 36)
                        o.response_code = codes[2];
                /* the same label set lands on every shard: merged at render time; the cap
                 * (7 per family) makes the later new sets overflow */
                (void)wp_metrics_record_http(wp_metrics_shard(m, i % 3), &l, &o);
                if (i % 4 == 0) {
                        t = wp_metrics_tcp_open(wp_metrics_shard(m, (i / 4) % 3), &l);
                        wp_metrics_tcp_bytes(t, 10u * i, 3u * i + 1);
                        if (i % 8 == 0)
                                wp_metrics_tcp_close(t);
                }
        }
        return m;
}

static inline struct wp_metrics *fixture_empty(void)
{
        struct wp_metrics_config cfg = {.n_shards = 2};
        struct wp_metrics *m = NULL;

        return wp_metrics_new(&cfg, &m) < 0 ? NULL : m;
}

#endif
