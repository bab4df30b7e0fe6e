/*
 * Scrape-cost benchmark for waypoint/metrics.c (not a test): fills a registry with N HTTP label
 * sets (default 10,000; realistic bookinfo-sized label values) spread over 4 worker shards, plus
 * N/10 TCP label sets, then renders the Prometheus page repeatedly and prints latency and size.
 * Also measures the recording cost of an existing label set (the data-path hot path).
 *
 * Usage: bench_metrics [series] [renders]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "waypoint/metrics.h"

#define SET(l, i, s) ((l)->v[(i)] = (struct wp_mstr){(s), (uint32_t)strlen(s)})

static double clock_ms(clockid_t id)
{
        struct timespec ts;

        clock_gettime(id, &ts);
        return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static double now_ms(void)
{
        return clock_ms(CLOCK_MONOTONIC);
}

static int count_sink(void *user, const char *data, size_t len)
{
        *(size_t *)user += len;
        (void)data;
        return 0;
}

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return x < y ? -1 : x > y;
}

static void fill(struct wp_metrics_labels *l, unsigned i, char *wl, char *ns, char *pr)
{
        memset(l, 0, sizeof(*l));
        sprintf(wl, "client-workload-%05u", i / 10);
        sprintf(ns, "namespace-%03u", i % 97);
        sprintf(pr, "spiffe://cluster.local/ns/namespace-%03u/sa/client-sa-%05u", i % 97, i / 10);
        SET(l, WP_ML_SOURCE_WORKLOAD, wl);
        SET(l, WP_ML_SOURCE_CANONICAL_SERVICE, wl);
        SET(l, WP_ML_SOURCE_CANONICAL_REVISION, "v1");
        SET(l, WP_ML_SOURCE_WORKLOAD_NAMESPACE, ns);
        SET(l, WP_ML_SOURCE_PRINCIPAL, pr);
        SET(l, WP_ML_SOURCE_CLUSTER, "Kubernetes");
        SET(l, WP_ML_DESTINATION_WORKLOAD, "reviews-v1");
        SET(l, WP_ML_DESTINATION_WORKLOAD_NAMESPACE, "bookinfo");
        SET(l, WP_ML_DESTINATION_PRINCIPAL,
            "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews");
        SET(l, WP_ML_DESTINATION_SERVICE, "reviews.bookinfo.svc.cluster.local");
        SET(l, WP_ML_DESTINATION_CANONICAL_SERVICE, "reviews");
        SET(l, WP_ML_DESTINATION_CANONICAL_REVISION, "v1");
        SET(l, WP_ML_DESTINATION_SERVICE_NAME, "reviews");
        SET(l, WP_ML_CONNECTION_SECURITY_POLICY, "mutual_tls");
}

int main(int argc, char **argv)
{
        unsigned series = argc > 1 ? (unsigned)atoi(argv[1]) : 10000;
        unsigned renders = argc > 2 ? (unsigned)atoi(argv[2]) : 10;
        struct wp_metrics_config cfg = {.n_shards = 4,
                                        .max_series = series + 16,
                                        .istio_version = "1.24.0",
                                        .local_namespace = "bookinfo",
                                        .local_cluster = "Kubernetes"};
        struct wp_metrics *m;
        struct wp_metrics_stats st;
        struct wp_metrics_labels l;
        char wl[64], ns[64], pr[128];
        double *lat, *cpu, t0, c0, total = 0, cpu_total = 0;
        size_t bytes = 0;
        unsigned i;
        const unsigned codes[] = {200, 503, 404};

        if (!series || !renders || wp_metrics_new(&cfg, &m) < 0) {
                fprintf(stderr, "usage: bench_metrics [series] [renders]\n");
                return 2;
        }
        for (i = 0; i < series; i++) {
                struct wp_metrics_http o = {.response_code = codes[i % 3],
                                            .grpc_status = -1,
                                            .duration_ms = i % 3000,
                                            .request_bytes = 300,
                                            .response_bytes = i};

                fill(&l, i / 3, wl, ns, pr);
                if (wp_metrics_record_http(wp_metrics_shard(m, i % 4), &l, &o) < 0)
                        return 1;
                if (i % 10 == 0)
                        wp_metrics_tcp_close(wp_metrics_tcp_open(wp_metrics_shard(m, i % 4), &l));
        }
        /* hot path: an existing label set */
        {
                struct wp_metrics_http o = {.response_code = 200,
                                            .grpc_status = -1,
                                            .duration_ms = 12,
                                            .request_bytes = 300,
                                            .response_bytes = 900};
                unsigned n = 2000000;

                fill(&l, 42, wl, ns, pr);
                t0 = now_ms();
                for (i = 0; i < n; i++)
                        wp_metrics_record_http(wp_metrics_shard(m, 0), &l, &o);
                printf("record_http (existing series): %.1f ns/op\n", (now_ms() - t0) * 1e6 / n);
        }
        wp_metrics_get_stats(m, &st);
        lat = calloc(renders, sizeof(*lat));
        cpu = calloc(renders, sizeof(*cpu));
        if (!lat || !cpu)
                return 1;
        for (i = 0; i < renders; i++) {
                bytes = 0;
                t0 = now_ms();
                c0 = clock_ms(CLOCK_THREAD_CPUTIME_ID);
                if (wp_metrics_render(m, count_sink, &bytes) < 0)
                        return 1;
                /* CPU time as well as wall time: the machine running this may be shared */
                cpu[i] = clock_ms(CLOCK_THREAD_CPUTIME_ID) - c0;
                lat[i] = now_ms() - t0;
                total += lat[i];
                cpu_total += cpu[i];
        }
        qsort(lat, renders, sizeof(*lat), cmp_double);
        qsort(cpu, renders, sizeof(*cpu), cmp_double);
        /* the part of a render spent starting the page: merged, sorted view of the shards */
        c0 = clock_ms(CLOCK_THREAD_CPUTIME_ID);
        for (i = 0; i < renders; i++) {
                struct wp_metrics_page *pg;

                if (wp_metrics_page_new(m, &pg) < 0)
                        return 1;
                wp_metrics_page_free(pg);
        }
        c0 = (clock_ms(CLOCK_THREAD_CPUTIME_ID) - c0) / renders;
        printf("series: http %llu, tcp %llu (over 4 shards); registry %.1f MiB\n",
               (unsigned long long)st.series[0], (unsigned long long)st.series[1],
               (double)st.bytes / (1 << 20));
        printf("render: %u runs, page %.1f MiB, mean %.1f ms, p50 %.1f ms, max %.1f ms, "
               "%.0f MiB/s\n",
               renders, (double)bytes / (1 << 20), total / renders, lat[renders / 2],
               lat[renders - 1], (double)bytes / (1 << 20) / (total / renders / 1e3));
        printf("render cpu: mean %.1f ms, p50 %.1f ms, min %.1f ms, %.0f MiB/s of CPU\n",
               cpu_total / renders, cpu[renders / 2], cpu[0],
               (double)bytes / (1 << 20) / (cpu_total / renders / 1e3));
        printf("page start (merge and sort of the shards' series): %.2f ms cpu\n", c0);
        free(lat);
        free(cpu);
        wp_metrics_free(m);
        return 0;
}
