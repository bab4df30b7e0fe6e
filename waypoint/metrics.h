/*
 * Istio standard metrics, as Envoy's istio.stats filter exports them for a waypoint
 * (reporter="waypoint"; istio/proxy source/extensions/filters/http/istio_stats/istio_stats.cc),
 * rendered in the Prometheus text format 0.0.4.
 *
 * Families:
 *   HTTP (one label set feeds all four): istio_requests_total (counter),
 *     istio_request_duration_milliseconds, istio_request_bytes, istio_response_bytes
 *     (histograms, Envoy's default buckets 0.5 .. 3600000 and +Inf).
 *   TCP (one label set feeds all four): istio_tcp_connections_opened_total,
 *     istio_tcp_connections_closed_total, istio_tcp_sent_bytes_total,
 *     istio_tcp_received_bytes_total (counters).
 *   istio_build{component="proxy",tag=<istio version>} 1 (gauge).
 *   istio_waypoint_metrics_overflow_total{family="http"|"tcp"} (counter, ours): observations
 *     dropped because the label-set cap was reached.
 *
 * Labels, in the order istio_stats.cc pushes them for a waypoint (Reporter::ServerGateway):
 *   reporter, source_workload, source_canonical_service, source_canonical_revision,
 *   source_workload_namespace, source_principal, source_app, source_version, source_cluster,
 *   destination_workload, destination_workload_namespace, destination_principal,
 *   destination_app, destination_version, destination_service,
 *   destination_canonical_service, destination_canonical_revision, destination_service_name,
 *   destination_service_namespace, destination_cluster, request_protocol,
 *   [HTTP only: response_code, grpc_response_status,] response_flags,
 *   connection_security_policy.
 *
 * Threading model:
 *   - The registry has one shard per worker thread (wp_metrics_config.n_shards). A shard is
 *     written by exactly one thread: its series table, its string-intern table and its
 *     counters are private to that thread, so recording takes no lock and does no atomic
 *     read-modify-write. Counter words are 64-bit aligned and updated with relaxed atomic
 *     load + store (plain MOV/STR on x86_64 and aarch64, no LOCK prefix / LDXR-STXR), so the
 *     scraper, which reads them with relaxed loads, can never see a torn value.
 *   - A new label set creates a series on the recording thread (allocation, off the common
 *     path); the series is appended to a chunked, never-moving directory and published with
 *     a release store of the shard's count. The scraper (admin thread) acquire-loads that
 *     count and only reads published series and their immutable interned label strings. No
 *     lock is ever taken: the scraper cannot block a worker and vice versa.
 *   - Consequence: a scrape taken under load sees each counter at some instant; different
 *     counters (e.g. requests_total and the duration histogram's _count) may be a few
 *     observations apart. Each histogram is rendered from one read of its buckets, so its
 *     buckets are cumulative and +Inf == _count always. After the workers stop, totals are
 *     exact.
 *   - The same label set seen by k shards is k series internally, merged (summed) by label
 *     tuple at render time.
 *
 * Cardinality: at most max_series series per family (HTTP, TCP) over all shards (a label set
 * seen by k shards uses k of the budget). Beyond the cap a new label set is not stored: the
 * observation is counted in istio_waypoint_metrics_overflow_total and dropped; known label
 * sets keep counting. Label values are truncated to max_value_len bytes (at a UTF-8 boundary)
 * and invalid UTF-8 is replaced by U+FFFD, so memory is bounded by
 * max_series * (series size + labels * max_value_len) per family, whatever peers send.
 * Series are never evicted (Envoy's scope rotation is not implemented).
 */
#ifndef WP_METRICS_H
#define WP_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "istio/workload/workload.pb-c.h"

#define WP_METRICS_DEFAULT_MAX_SERIES    10000u
#define WP_METRICS_DEFAULT_MAX_VALUE_LEN 256u
#define WP_METRICS_MAX_SHARDS            1024u

/* Borrowed string view. p == NULL means "not known": the label takes Istio's default
 * (see enum wp_metrics_label). p != NULL with n == 0 renders an empty value. */
struct wp_mstr {
        const char *p;
        uint32_t n;
};

/* String-valued labels (reporter is always "waypoint"; response_code and grpc_response_status
 * are numbers in struct wp_metrics_http). Default when the view is NULL in brackets. */
enum wp_metrics_label {
        WP_ML_SOURCE_WORKLOAD,                /* [unknown] */
        WP_ML_SOURCE_CANONICAL_SERVICE,       /* [unknown] */
        WP_ML_SOURCE_CANONICAL_REVISION,      /* [latest] */
        WP_ML_SOURCE_WORKLOAD_NAMESPACE,      /* [unknown] */
        WP_ML_SOURCE_PRINCIPAL,               /* [unknown] */
        WP_ML_SOURCE_APP,                     /* [unknown] */
        WP_ML_SOURCE_VERSION,                 /* [unknown] */
        WP_ML_SOURCE_CLUSTER,                 /* [unknown] */
        WP_ML_DESTINATION_WORKLOAD,           /* [unknown] */
        WP_ML_DESTINATION_WORKLOAD_NAMESPACE, /* [unknown] */
        WP_ML_DESTINATION_PRINCIPAL,          /* [unknown] */
        WP_ML_DESTINATION_APP,                /* [unknown] */
        WP_ML_DESTINATION_VERSION,            /* [unknown] */
        WP_ML_DESTINATION_SERVICE,            /* [unknown] (Envoy: Host, else canonical svc) */
        WP_ML_DESTINATION_CANONICAL_SERVICE,  /* [unknown] */
        WP_ML_DESTINATION_CANONICAL_REVISION, /* [unknown] */
        WP_ML_DESTINATION_SERVICE_NAME,       /* [unknown] */
        WP_ML_DESTINATION_SERVICE_NAMESPACE,  /* [config.local_namespace, else unknown] */
        WP_ML_DESTINATION_CLUSTER,            /* [config.local_cluster, else unknown] */
        WP_ML_REQUEST_PROTOCOL,               /* [http for HTTP records, tcp for TCP] */
        WP_ML_RESPONSE_FLAGS,                 /* [-] */
        WP_ML_CONNECTION_SECURITY_POLICY,     /* [unknown]; Envoy: mutual_tls | none */
        _WP_ML_MAX
};

/* A label set: views borrowed for the duration of a record call only. Zero-initialise
 * ({0}) to get every default. */
struct wp_metrics_labels {
        struct wp_mstr v[_WP_ML_MAX];
};

/* One finished HTTP request (Envoy's log() hook). */
struct wp_metrics_http {
        unsigned response_code;  /* 0 when no response was sent (Envoy renders "0") */
        int grpc_status;         /* >= 0 for gRPC; -1 renders grpc_response_status="" */
        uint64_t duration_ms;    /* request complete - start, whole milliseconds */
        uint64_t request_bytes;  /* downstream wire bytes received */
        uint64_t response_bytes; /* downstream wire bytes sent */
};

struct wp_metrics_config {
        unsigned n_shards;           /* one per worker thread, 1..WP_METRICS_MAX_SHARDS */
        uint32_t max_series;         /* per family; 0 = WP_METRICS_DEFAULT_MAX_SERIES; <= 1<<24 */
        uint32_t max_value_len;      /* bytes per label value; 0 = default; 16..4096 */
        const char *istio_version;   /* istio_build tag; NULL/"" = "unknown" */
        const char *local_namespace; /* default destination_service_namespace (NULL: unknown) */
        const char *local_cluster;   /* default destination_cluster (NULL: unknown) */
};

struct wp_metrics;
struct wp_metrics_shard;
struct wp_metrics_tcp;

/* Creates a registry. Strings in cfg are copied. Returns 0 and *ret, -EINVAL for a bad
 * config, -ENOMEM. */
int wp_metrics_new(const struct wp_metrics_config *cfg, struct wp_metrics **ret);

/* Frees the registry and every shard. Only once no thread records or renders any more and no
 * page is open.
 * NULL-safe; returns NULL. */
struct wp_metrics *wp_metrics_free(struct wp_metrics *m);

/* The shard of worker i (0 <= i < n_shards), or NULL when out of range. Borrowed: lives as
 * long as the registry. Use it from one thread only. */
struct wp_metrics_shard *wp_metrics_shard(struct wp_metrics *m, unsigned i);

/* Records one finished HTTP request: istio_requests_total += 1 and one observation in each
 * of the three histograms, under labels l (views borrowed during the call).
 * Returns 0, or -ENOSPC / -ENOMEM when the label set is new and could not be stored (the
 * observation is then counted in the overflow counter and dropped). */
int wp_metrics_record_http(struct wp_metrics_shard *sh, const struct wp_metrics_labels *l,
                           const struct wp_metrics_http *obs);

/* TCP connection (tunnel) accounting. open() finds or creates the series for l, counts
 * istio_tcp_connections_opened_total += 1 and returns a handle for the connection's later
 * byte and close reports. Never NULL: when the series cannot be stored (cap, OOM) the
 * handle is the shard's discard sink, reports on it are dropped, and the open is counted in
 * the overflow counter. The handle is borrowed from the shard (valid while the registry
 * lives) and must only be used on the shard's thread. */
struct wp_metrics_tcp *wp_metrics_tcp_open(struct wp_metrics_shard *sh,
                                           const struct wp_metrics_labels *l);
/* Adds bytes sent to / received from the downstream peer (deltas, as Envoy's periodic
 * report). */
void wp_metrics_tcp_bytes(struct wp_metrics_tcp *t, uint64_t sent, uint64_t received);
/* istio_tcp_connections_closed_total += 1. */
void wp_metrics_tcp_close(struct wp_metrics_tcp *t);
/* True when t is the discard sink (the open was dropped). */
bool wp_metrics_tcp_dropped(const struct wp_metrics_tcp *t);

/*
 * The page (text format 0.0.4): # HELP / # TYPE per family, families in a fixed order
 * (counters, gauge, histograms, each by name, as Envoy), series sorted by label values.
 *
 * It is produced by a pull cursor, so that a server can render it as the socket drains: the
 * page starts from a merged view of the shards (the series published when it starts, sorted,
 * equal label tuples of different shards summed) and each read renders only the next lines.
 * A series' values are read when its lines are produced (a histogram with one read of all its
 * words, so it is self-consistent); series created after the page started are not on it.
 * Memory held by a page: about 8 bytes per stored series (the sorted view) plus two line
 * buffers sized from max_value_len (about 2 * (22 * (2 * max_value_len + 4) + 1 KiB)),
 * whatever the page's length. Reads allocate nothing and cannot fail.
 * Any number of pages of one registry may be open at once, on any threads, concurrently
 * with recording (see the threading model above); one page is used by one thread at a time.
 */
struct wp_metrics_page;

/* Starts a page. Returns 0 and *ret, -EINVAL, -ENOMEM. */
int wp_metrics_page_new(struct wp_metrics *m, struct wp_metrics_page **ret);
/* Copies the next bytes of the page into buf[0, cap), cap > 0: returns how many (cap unless
 * the page ends first), 0 once the page is complete. Lines are rendered straight into buf
 * (only a line that does not fit the rest of buf goes through the page's line buffer), so the
 * bytes of buf after the returned count may have been overwritten. */
size_t wp_metrics_page_read(struct wp_metrics_page *pg, char *buf, size_t cap);
/* Heap bytes held by the page (constant from wp_metrics_page_new on). */
size_t wp_metrics_page_bytes(const struct wp_metrics_page *pg);
/* NULL-safe; returns NULL. May be called before the page is complete. */
struct wp_metrics_page *wp_metrics_page_free(struct wp_metrics_page *pg);

/* Renders the whole page through a 64 KiB buffer: sink is called with consecutive chunks and
 * returns 0 or a negative errno, which stops rendering. Returns 0, -ENOMEM, or the sink's
 * error. */
int wp_metrics_render(struct wp_metrics *m, int (*sink)(void *user, const char *data, size_t len),
                      void *user);

/* Growable output buffer for wp_metrics_render_text. Zero-initialise; free with
 * wp_metrics_text_done. data is NUL-terminated after a successful render. */
struct wp_metrics_text {
        char *data;
        size_t len, cap;
};
/* Appends the page to out. Returns 0 or -ENOMEM (out keeps what it had; may hold a partial
 * page, still NUL-terminated). */
int wp_metrics_render_text(struct wp_metrics *m, struct wp_metrics_text *out);
void wp_metrics_text_done(struct wp_metrics_text *t);
/* Writes the page to f. Returns 0, -ENOMEM or -EIO. */
int wp_metrics_render_file(struct wp_metrics *m, FILE *f);

/* Counts for tests and /stats (read at any time; approximate under load). */
struct wp_metrics_stats {
        uint64_t series[2];    /* stored series: [0] HTTP, [1] TCP (over all shards) */
        uint64_t overflow[2];  /* dropped observations: [0] HTTP, [1] TCP */
        uint64_t intern_bytes; /* bytes held by the string-intern tables (all shards) */
        uint64_t bytes;        /* approximate heap bytes held by the registry */
};
void wp_metrics_get_stats(struct wp_metrics *m, struct wp_metrics_stats *ret);

/*
 * Peer labels. Pure functions: they only set views in *l (borrowed from the inputs, so the
 * inputs must outlive the record call) and never allocate.
 */

/* Sets the source_* labels from the WDS workload of the downstream peer (looked up by source
 * IP), as Istio's workload_discovery does: source_workload <- workload_name,
 * source_workload_namespace <- namespace, source_canonical_service <- canonical_name,
 * source_canonical_revision <- canonical_revision, source_cluster <- cluster_id;
 * source_app / source_version stay unset ("unknown": WDS carries no app labels).
 * Empty fields stay unset. Does not touch source_principal. w may be NULL (no-op). */
void wp_metrics_labels_source_from_workload(struct wp_metrics_labels *l,
                                            const Istio__Workload__Workload *w);

/* Sets the destination_* labels from the WDS workload of the chosen endpoint (istio_stats'
 * endpoint peer for a waypoint): destination_workload, destination_workload_namespace,
 * destination_canonical_service, destination_canonical_revision. destination_principal needs
 * formatting: see wp_metrics_workload_principal. w may be NULL (no-op). */
void wp_metrics_labels_destination_from_workload(struct wp_metrics_labels *l,
                                                 const Istio__Workload__Workload *w);

/* Formats the workload's SPIFFE identity "spiffe://<trust_domain>/ns/<namespace>/sa/<sa>"
 * into buf (NUL-terminated). Returns its length, -EINVAL when a field is missing, -ENOSPC
 * when cap is too small. */
int wp_metrics_workload_principal(const Istio__Workload__Workload *w, char *buf, size_t cap);

/* Sets source_principal to the peer's URI SAN and, when it has the form ".../ns/<ns>/...",
 * source_workload_namespace to <ns> (Envoy prefers the SAN's namespace over peer metadata).
 * principal may be NULL or empty (no-op). */
void wp_metrics_labels_set_source_principal(struct wp_metrics_labels *l, const char *principal,
                                            size_t len);

/* Sets source_* labels from a W3C `baggage` header value as Istio's baggage peer metadata
 * (metadata_object.cc): k8s.namespace.name, k8s.cluster.name, service.name (canonical
 * service), service.version (canonical revision), app.name, app.version, and
 * k8s.{deployment,pod,job,cronjob}.name (workload). Members are split on ',', optional
 * whitespace trimmed, ";properties" ignored, values are not percent-decoded; the last
 * occurrence of a key wins; unknown keys are ignored; empty values are ignored. Only the first
 * 8192 bytes and 64 members are looked at (W3C limits), the rest is ignored.
 * Returns the number of labels set (>= 0), or -EINVAL when value is NULL. */
int wp_metrics_labels_source_from_baggage(struct wp_metrics_labels *l, const char *value,
                                          size_t len);

#endif
