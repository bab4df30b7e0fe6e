/*
 * The runtime snapshot: an immutable, reference-counted view of the config, compiled from
 * istiod's xDS resources (Listener main_internal's filter_chain_matcher, its filter chains,
 * Clusters and ClusterLoadAssignments). Built whole or not at all, off the data path; workers
 * hold a reference per connection/tunnel so an update never disturbs traffic in flight.
 *
 * Dispatch follows main_internal's xds.type.matcher.v3.Matcher: destination IP (IPMatcher
 * ranges, longest prefix wins) then destination port (exact map), down to an action that names
 * a filter chain. The tunnel's :authority is the destination (what Envoy's connect_authority
 * filter puts into original_dst.local_ip).
 */
#ifndef WP_SNAPSHOT_H
#define WP_SNAPSHOT_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/socket.h>

struct xds_resources;
struct flt_ops;
struct wp_lb;
struct wp_route_table;
struct wp_name_map;
struct wp_wds;
struct wp_al_logger;

#define WP_AUTHORITY_MAX 64

struct wp_endpoint {
        struct sockaddr_storage addr; /* HBONE: pod IP:target port; plain: ip:port */
        socklen_t addrlen;
        char authority[WP_AUTHORITY_MAX]; /* "ip:port" / "[v6]:port" of addr */
        bool hbone;                       /* reach through the pod's ztunnel (IP:15008) */
        bool healthy;
        uint32_t weight;
        uint32_t priority;
};

struct wp_cluster {
        char *name;
        struct wp_endpoint *eps;
        size_t neps;
        size_t nhealthy;
        uint32_t connect_timeout_ms;
        _Atomic uint64_t rr; /* round-robin cursor, shared by workers (relaxed) */
        struct wp_lb *lb;    /* per-request balancer (lb_policy); NULL for passthrough */
        bool passthrough;    /* `encap`: the tunnel's own destination, through its ztunnel */
        uint8_t http_protocol; /* enum wp_upstream_http (HttpProtocolOptions) */
};

/* A cluster's upstream HTTP protocol (typed_extension_protocol_options
 * "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"). */
enum wp_upstream_http {
        WP_UPSTREAM_HTTP1 = 0,      /* none, explicit http_protocol_options, auto_config */
        WP_UPSTREAM_HTTP2,          /* explicit_http_config.http2_protocol_options (h2c) */
        WP_UPSTREAM_DOWNSTREAM,     /* use_downstream_protocol_config with http2 options */
};

enum wp_chain_kind {
        WP_CHAIN_TCP,        /* tcp_proxy to a cluster */
        WP_CHAIN_PASSTHROUGH, /* tcp_proxy to `encap`: HBONE to the original destination */
        WP_CHAIN_UNSUPPORTED, /* a filter we do not implement yet: tunnels are refused */
        WP_CHAIN_HTTP,        /* http_connection_manager: HTTP/1.1 inside the tunnel (l7.c) */
};

/* One compiled HTTP filter of an HCM chain (the router is implicit, always last). */
struct wp_http_filter {
        const struct flt_ops *ops;
        void *conf; /* ops->conf_new result, freed with ops->conf_free */
};

/* WP_CHAIN_HTTP: the compiled http_connection_manager. */
struct wp_http_conf {
        struct wp_route_table *routes;
        struct wp_http_filter *filters; /* enforced filters in order (router excluded) */
        size_t nfilters;
        bool websocket; /* upgrade_configs: "websocket" enabled at the HCM level */
};

struct wp_weighted_cluster {
        struct wp_cluster *cluster;
        uint32_t weight;
};

/* One compiled access_log entry of a chain (tcp_proxy's or the HCM's). */
struct wp_chain_log {
        struct wp_al_logger *logger;
        int fd; /* where its lines go: 1 (stdout), 2 (stderr) or a file opened at build */
};

struct wp_chain {
        char *name;
        enum wp_chain_kind kind;
        struct wp_weighted_cluster *clusters; /* tcp_proxy cluster or weighted_clusters */
        size_t nclusters;
        uint32_t total_weight;
        char *unsupported; /* WP_CHAIN_UNSUPPORTED: what is missing (e.g. the filter name) */
        struct wp_http_conf *http; /* WP_CHAIN_HTTP */
        struct wp_chain_log *logs; /* access_log entries (unsupported ones skipped) */
        size_t nlogs;
};

struct wp_match_node; /* compiled matcher tree (snapshot.c) */

struct wp_snapshot {
        _Atomic unsigned refs;
        struct wp_snapshot *next_dead; /* on the reaper's list once unreferenced */
        uint64_t version;
        struct wp_chain *chains;
        size_t nchains;
        struct wp_cluster *clusters;
        size_t nclusters;
        struct wp_match_node *matcher;
        uint16_t hbone_port;         /* connect_originate upstream_port_override (15008) */
        uint32_t connect_timeout_ms; /* connect_originate connect_timeout */
        /* digest of the connect_terminate Listener: when it changes, workers drain the
         * connections accepted under the old one (GOAWAY), as Envoy drains a replaced listener */
        uint64_t terminate_digest;
        struct xds_resources *res;   /* the resources it was built from (config_dump) */
        struct wp_name_map *cluster_map; /* cluster name -> index (wp_snapshot_cluster) */
        struct wp_wds *wds;          /* workloads by IP, for telemetry labels (wds.h) */
};

/* Compiles resources into a snapshot; takes ownership of res on success. On failure returns
 * -EINVAL (or -ENOMEM) and *reterr_desc names the resource and field (heap string, caller frees
 * with wp_free). */
int wp_snapshot_build(struct xds_resources *res, struct wp_snapshot **ret, char **reterr_desc);
struct wp_snapshot *wp_snapshot_ref(struct wp_snapshot *s);
struct wp_snapshot *wp_snapshot_unref(struct wp_snapshot *s); /* NULL-safe, returns NULL */
/* Freeing a large snapshot takes tens of milliseconds (its decoded resources): with a reaper
 * enabled, the last unref only queues it (lock-free) and wp_snapshot_reap(), called by the
 * control thread, frees the queue, so a worker dropping the last tunnel of an old config
 * never stalls. Without a reaper the last unref frees at once. */
void wp_snapshot_reaper_enable(bool on);
void wp_snapshot_reap(void);

/* The chain serving destination addr (AF_INET/AF_INET6 with port), or NULL: not served. */
const struct wp_chain *wp_snapshot_lookup(const struct wp_snapshot *s, const struct sockaddr *addr);
/* The same with the tunnel's application protocol as Envoy's ApplicationProtocolInput gives it
 * ("'h2c'", "'http/1.1'", "'http/1.0'", "" when not HTTP). app_proto NULL: not sniffed yet; when
 * the destination's match depends on it, *needs_proto is set and NULL returned. */
const struct wp_chain *wp_snapshot_lookup_proto(const struct wp_snapshot *s,
                                                const struct sockaddr *addr, const char *app_proto,
                                                bool *needs_proto);
/* The cluster called name (routes name clusters at request time), or NULL. */
struct wp_cluster *wp_snapshot_cluster(const struct wp_snapshot *s, const char *name);
/* Picks a cluster of a chain by weight (rnd: a random number) then a healthy endpoint by round
 * robin. NULL when no healthy endpoint. */
const struct wp_endpoint *wp_chain_pick(const struct wp_chain *c, uint64_t rnd);

#endif
