/*
 * Daemon-wide types: options, the runtime shared by the control thread and the workers, and
 * per-worker counters. Only waypoint/ sees these.
 */
#ifndef WP_DAEMON_H
#define WP_DAEMON_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

#include "hbone/hbone.h"
#include "waypoint/base/loop.h"
#include "waypoint/base/tls.h"

struct wp_snapshot;
struct wp_worker;
struct wp_metrics;

struct wp_addr {
        struct sockaddr_storage ss;
        socklen_t len;
        bool set;
};

struct wp_options {
        const char *config_file;
        const char *cert_file, *key_file, *root_cert;
        const char *trust_domain;
        struct wp_addr hbone_addr, admin_addr, status_addr;
        struct wp_addr metrics_addr, prometheus_addr; /* 15020 (merged), 15090 (Envoy's) */
        uint32_t max_metric_series;
        unsigned concurrency;
        enum wp_io_backend io_backend;
        uint16_t upstream_hbone_port; /* 0: from connect_originate (15008) */
        uint32_t connect_timeout_ms;  /* 0: from the cluster */
        uint32_t handshake_timeout_ms;
        uint32_t pool_idle_ms;
        uint32_t sniff_ms; /* protocol detection on ports of unknown protocol, then TCP */
        uint32_t drain_ms;     /* terminationDrainDuration */
        uint32_t min_drain_ms; /* MINIMUM_DRAIN_DURATION: never exit before this */
        bool exit_on_zero;     /* EXIT_ON_ZERO_ACTIVE_CONNECTIONS: exit once idle */
        struct hbone_limits lim;
        const char *node_id, *service_cluster; /* from the bootstrap (istiod mode) or NULL */
};

/* Counters: written by one worker thread (relaxed stores), summed by the admin thread. */
enum wp_counter {
        WP_C_DOWNSTREAM_CX_TOTAL,
        WP_C_DOWNSTREAM_CX_ACTIVE,
        WP_C_DOWNSTREAM_CX_TLS_FAIL,
        WP_C_TUNNELS_TOTAL,
        WP_C_TUNNELS_ACTIVE,
        WP_C_TUNNELS_ESTABLISHED,
        WP_C_TUNNEL_NOT_SERVED,
        WP_C_TUNNEL_NO_ENDPOINT,
        WP_C_TUNNEL_UNSUPPORTED,
        WP_C_TUNNEL_UPSTREAM_FAIL,
        WP_C_BYTES_UP,
        WP_C_BYTES_DOWN,
        WP_C_UPSTREAM_CX_TOTAL,
        WP_C_UPSTREAM_CX_ACTIVE,
        WP_C_UPSTREAM_CX_FAIL,
        _WP_COUNTER_MAX
};

extern const char *const wp_counter_names[_WP_COUNTER_MAX];

struct wp_runtime {
        struct wp_options opts;
        pthread_mutex_t snap_lock; /* guards `current` swaps against a worker taking a ref */
        struct wp_snapshot *current;
        _Atomic uint64_t snap_version;
        struct wp_tls_ctx *server_tls, *client_tls; /* guarded by snap_lock */
        _Atomic bool draining;
        _Atomic bool ready;
        /* admin /drain_listeners: workers stop accepting and GOAWAY their downstream
         * connections (tunnels in flight go on); unlike `draining`, the process stays up */
        _Atomic bool listeners_stopped;
        _Atomic int64_t snap_published_ms; /* wall clock of the last publish (config_dump) */
        enum wp_io_backend backend; /* what the workers run on */
        const char *backend_note;   /* why (fallback reason), static */
        struct wp_worker **workers;
        unsigned nworkers;
        struct wp_metrics *metrics; /* Istio standard metrics, one shard per worker */
        int64_t start_time;
};

/* Replaces the current snapshot (takes ownership of s). Workers pick it up between batches. */
void wp_runtime_publish(struct wp_runtime *rt, struct wp_snapshot *s);
/* Takes a reference on the current snapshot. */
struct wp_snapshot *wp_runtime_snapshot(struct wp_runtime *rt);
/* Replaces the TLS contexts used for new connections (takes ownership of both). */
void wp_runtime_set_tls(struct wp_runtime *rt, struct wp_tls_ctx *server, struct wp_tls_ctx *client);

/* worker.c */
int wp_worker_start(struct wp_runtime *rt, unsigned idx, struct wp_worker **ret,
                    const char **reterr_desc);
void wp_worker_wake(struct wp_worker *w);
void wp_worker_join(struct wp_worker *w);
uint64_t wp_worker_counter(const struct wp_worker *w, enum wp_counter c);

/* admin.c: blocking HTTP/1.1 admin server on its own thread. */
/* What an admin listener serves: the full admin (15000), /healthz/ready (15021), merged
 * Prometheus metrics + /healthz/ready (15020), or Prometheus metrics (15090). */
enum wp_admin_kind { WP_ADMIN_FULL, WP_ADMIN_STATUS, WP_ADMIN_METRICS, WP_ADMIN_PROMETHEUS };
int wp_admin_start(struct wp_runtime *rt, const struct wp_addr *addr, enum wp_admin_kind kind);

/* Parses "ip:port" / "[v6]:port" into a. Returns 0 or -EINVAL. */
int wp_addr_parse(const char *s, struct wp_addr *a);

#endif
