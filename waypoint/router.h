/*
 * The HTTP router: an Envoy RouteConfiguration (as istiod sends it inline in a waypoint's
 * http_connection_manager) compiled into an immutable route table, and evaluated per request.
 *
 * Compile (config time, wp_route_table_new): every string is copied and every regex compiled
 * (RE2, through waypoint/re2_shim.h); nothing is borrowed from the protobuf afterwards. What we
 * do not implement is rejected with an error naming the field, e.g.
 *   "virtual_hosts[0].routes[3].match.safe_regex: invalid regex: missing ): (a"
 * so that the snapshot compiler can NACK; things that are safe to ignore are ignored (stat
 * names, decorators, metadata, validate_clusters, runtime keys) or handed back to the caller
 * (typed_per_filter_config, for the filters that want them).
 *
 * Match (data path, wp_route_match): virtual host by :authority, then the first route whose
 * match accepts the request. No allocation in this module: the result points into the table,
 * into the request, or into a caller buffer. A table is shared read-only by all workers; it
 * must outlive every result and every header list that borrowed strings from it (hold the
 * snapshot reference).
 *
 * Semantics follow Envoy's route_components.proto; the deliberate differences are:
 *   - Host matching with a port: Envoy matches the Host value as received (port included)
 *     unless ignore_port_in_host_matching. We try the value as received first (exact, suffix
 *     and prefix wildcards), then, when it carries a numeric port, the value without the port,
 *     and only then the "*" virtual host. With ignore_port_in_host_matching the port is
 *     stripped up front, as in Envoy. A Host without a port never matches a domain that has
 *     one.
 *   - A header that appears several times is matched on its values joined with ',' (as
 *     Envoy); when the joined value exceeds WP_ROUTE_MAX_JOINED_HEADER the matcher fails
 *     (invert_match does not turn that into a match).
 *   - Header values with Envoy formatters ("%REQ(x)%", "%DOWNSTREAM_REMOTE_ADDRESS%", ...) are
 *     rejected at compile time; "%%" stands for a literal '%'.
 *   - Unknown protobuf fields (fields this proxy's proto subset does not know, as received over
 *     ADS) are rejected rather than ignored.
 *   - The regex program size limit defaults to WP_MATCH_RE2_MAX_PROGRAM_SIZE, the value Istio's
 *     bootstrap gives re2.max_program_size.error_level (Envoy's own default is 100);
 *     google_re2.max_program_size, when set, takes precedence.
 *   - A header matcher on "host" reads :authority, and a range_match whose start is not below
 *     its end is rejected.
 * String and header matchers are filters/matcher.h's, shared with RBAC.
 */
#ifndef WP_ROUTER_H
#define WP_ROUTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "envoy/config/route/v3/route.pb-c.h"
#include "waypoint/base/http.h"

/* Limits on what a RouteConfiguration may contain (istiod controls it; keep them generous). */
#define WP_ROUTE_MAX_VHOSTS           20000
#define WP_ROUTE_MAX_DOMAINS          200000 /* in all virtual hosts together */
#define WP_ROUTE_MAX_ROUTES           200000 /* in all virtual hosts together */
#define WP_ROUTE_MAX_MATCHERS         64     /* header + query matchers of one route */
#define WP_ROUTE_MAX_HEADER_OPS       256    /* headers to add (and to remove) at one level */
#define WP_ROUTE_MAX_WEIGHTED         256    /* clusters in one weighted_clusters */
#define WP_ROUTE_MAX_STRING           16384  /* any one string (domain, header value, path...) */
#define WP_ROUTE_MAX_JOINED_HEADER    8192   /* a repeated header's values joined, for matching */

#define WP_ROUTE_DEFAULT_TIMEOUT_MS      15000 /* RouteAction.timeout unset */
#define WP_ROUTE_DEFAULT_BACKOFF_BASE_MS 25
#define WP_ROUTE_DEFAULT_DIRECT_BODY_MAX 4096 /* max_direct_response_body_size_bytes unset */

/* What the matched route asks for. */
enum wp_route_action {
        WP_ROUTE_ACTION_NONE = 0,       /* no virtual host or no route: 404, response flag NR */
        WP_ROUTE_ACTION_CLUSTER,        /* forward to result.cluster */
        WP_ROUTE_ACTION_REDIRECT,       /* reply result.status with Location: result.location */
        WP_ROUTE_ACTION_DIRECT,         /* reply result.status with result.body */
        WP_ROUTE_ACTION_NON_FORWARDING, /* a filter is expected to answer; else 404 */
        _WP_ROUTE_ACTION_MAX,
};

/* RetryPolicy.retry_on conditions (HTTP and gRPC names, comma-separated in the config;
 * unknown names are ignored, as Envoy does). */
enum {
        WP_RETRY_5XX = 1u << 0,
        WP_RETRY_GATEWAY_ERROR = 1u << 1,
        WP_RETRY_RESET = 1u << 2,
        WP_RETRY_RESET_BEFORE_REQUEST = 1u << 3,
        WP_RETRY_CONNECT_FAILURE = 1u << 4,
        WP_RETRY_ENVOY_RATELIMITED = 1u << 5,
        WP_RETRY_RETRIABLE_4XX = 1u << 6,
        WP_RETRY_REFUSED_STREAM = 1u << 7,
        WP_RETRY_RETRIABLE_STATUS_CODES = 1u << 8,
        WP_RETRY_RETRIABLE_HEADERS = 1u << 9,
        WP_RETRY_HTTP3_POST_CONNECT_FAILURE = 1u << 10,
        WP_RETRY_GRPC_CANCELLED = 1u << 16,
        WP_RETRY_GRPC_DEADLINE_EXCEEDED = 1u << 17,
        WP_RETRY_GRPC_INTERNAL = 1u << 18,
        WP_RETRY_GRPC_RESOURCE_EXHAUSTED = 1u << 19,
        WP_RETRY_GRPC_UNAVAILABLE = 1u << 20,
};

/* A compiled RetryPolicy (route level, else the virtual host's). Times in milliseconds. */
struct wp_route_retry {
        uint32_t retry_on;                /* WP_RETRY_* */
        uint32_t num_retries;             /* default 1 */
        uint64_t per_try_timeout_ms;      /* 0: none (the route timeout bounds everything) */
        uint64_t per_try_idle_timeout_ms; /* 0: none */
        uint64_t backoff_base_ms;         /* default 25 */
        uint64_t backoff_max_ms;          /* default 10 x base */
        const uint16_t *retriable_status_codes;
        uint32_t n_retriable_status_codes;
        uint32_t host_selection_max_attempts; /* host_selection_retry_max_attempts, >= 1 */
        bool previous_hosts;                  /* retry_host_predicate previous_hosts: avoid hosts
                                                 already tried */
};

enum wp_route_hash_kind {
        WP_ROUTE_HASH_HEADER,
        WP_ROUTE_HASH_COOKIE,
        WP_ROUTE_HASH_SOURCE_IP,
        WP_ROUTE_HASH_QUERY_PARAMETER,
};

/* One RouteAction.hash_policy entry, for the load balancer (ring hash / Maglev). */
struct wp_route_hash_policy {
        enum wp_route_hash_kind kind;
        bool terminal;
        const char *name; /* header name (lower case), cookie or query parameter name */
        uint32_t name_len;
        const char *cookie_path; /* cookie: Path attribute of a generated cookie ("" none) */
        uint64_t cookie_ttl_ms;  /* cookie: TTL of a generated cookie */
        bool cookie_has_ttl;     /* cookie: ttl set, so generate the cookie when absent */
};

/* One RouteAction.request_mirror_policies entry (fire and forget shadow requests). */
struct wp_route_mirror {
        const char *cluster;        /* NULL when cluster_header is used */
        const char *cluster_header; /* lower case; NULL when cluster is used */
        uint32_t numerator;         /* runtime_fraction.default_value; 100/100 when unset */
        uint32_t denominator;       /* 100, 10000 or 1000000 */
};

/* RouteAction.upgrade_configs entry ("websocket", "CONNECT"...). */
struct wp_route_upgrade {
        const char *type;    /* as configured (compare case-insensitively) */
        bool enabled;        /* default true */
        bool connect_config; /* CONNECT terminated at the proxy */
        bool connect_allow_post;
};

enum wp_route_header_append {
        WP_HDR_APPEND_IF_EXISTS_OR_ADD = 0,
        WP_HDR_ADD_IF_ABSENT = 1,
        WP_HDR_OVERWRITE_IF_EXISTS_OR_ADD = 2,
        WP_HDR_OVERWRITE_IF_EXISTS = 3,
};

struct wp_route_header_add {
        const char *name;  /* lower case, NUL-terminated */
        const char *value; /* NUL-terminated; empty only with keep_empty_value */
        uint32_t name_len, value_len;
        enum wp_route_header_append append;
};

struct wp_route_str {
        const char *s; /* NUL-terminated */
        uint32_t len;
};

/* The header mutations of one level (route configuration, virtual host, route or weighted
 * cluster) for requests or for responses: removals first, then additions in order. */
struct wp_route_header_ops {
        const struct wp_route_str *remove; /* lower-case names */
        uint32_t n_remove;
        const struct wp_route_header_add *add;
        uint32_t n_add;
};

/* One typed_per_filter_config entry, copied out of the config. conf/conf_free are for the
 * caller (see wp_route_table_foreach_filter_config); the table calls conf_free(conf) when it
 * is freed. */
struct wp_route_filter_config {
        const char *filter_name; /* the map key, e.g. "envoy.filters.http.rbac" */
        const char *type_url;
        const uint8_t *value; /* serialized message */
        size_t value_len;
        void *conf;
        void (*conf_free)(void *conf);
};

struct wp_route_filter_configs {
        struct wp_route_filter_config *v;
        uint32_t n;
};

struct wp_route_table;
struct wp_route;

/*
 * The outcome of wp_route_match. The caller sets buf/buf_cap (wp_route_result_init) before the
 * call; everything else is output. Pointers are borrowed: from the table, from the request
 * (header values) or from buf.
 */
struct wp_route_result {
        char *buf;      /* in: caller memory for a rewritten path or a Location value */
        size_t buf_cap; /* in: its size (a path of n bytes needs about n + rewrite + 1) */

        enum wp_route_action action;
        const struct wp_route *route; /* NULL when action == NONE */
        const char *vhost_name;       /* NULL when no virtual host matched */
        const char *route_name;       /* "" when unnamed */

        /* WP_ROUTE_ACTION_CLUSTER */
        const char *cluster; /* NUL-terminated; NULL when cluster_header named a missing or
                                empty header: answer cluster_not_found_status */
        uint32_t cluster_len;
        unsigned cluster_not_found_status; /* 503 (default), 404 or 500 */
        const char *path;                  /* rewritten :path (in buf), or NULL: unchanged */
        uint32_t path_len;
        const char *host; /* rewritten :authority, or NULL: unchanged */
        uint32_t host_len;
        bool auto_host_rewrite; /* set :authority to the picked endpoint's hostname */
        bool append_x_forwarded_host;
        uint64_t timeout_ms;      /* 0: no timeout (timeout "0s"); 15000 when unset */
        uint64_t idle_timeout_ms; /* 0: not set */
        bool has_max_grpc_timeout;
        uint64_t max_grpc_timeout_ms; /* 0 with has_max_grpc_timeout: grpc-timeout unbounded */
        uint64_t grpc_timeout_offset_ms;
        uint64_t max_stream_duration_ms;    /* 0: not set */
        const struct wp_route_retry *retry; /* NULL: no retries */
        const struct wp_route_hash_policy *hash_policies;
        uint32_t n_hash_policies;
        const struct wp_route_mirror *mirrors;
        uint32_t n_mirrors;
        const struct wp_route_upgrade *upgrades;
        uint32_t n_upgrades;
        bool include_attempt_count_in_request;  /* x-envoy-attempt-count upstream */
        bool include_attempt_count_in_response; /* x-envoy-attempt-count downstream */

        /* WP_ROUTE_ACTION_REDIRECT / WP_ROUTE_ACTION_DIRECT */
        unsigned status;      /* 301/302/303/307/308, or the direct response status */
        const char *location; /* redirects, and direct responses with 201 or 3xx (the request
                                 URL, as Envoy), in buf; NULL otherwise */
        uint32_t location_len;
        const char *body; /* direct response body (may be empty, not NULL) */
        uint32_t body_len;

        /* Header mutations, in the order to apply them (wp_route_headers_apply): weighted
         * cluster, route, virtual host, route configuration; reversed when the configuration
         * sets most_specific_header_mutations_wins. Apply the request ones before forwarding
         * and the response ones to every response of this request (local replies included). */
        const struct wp_route_header_ops *request_ops[4];
        unsigned n_request_ops;
        const struct wp_route_header_ops *response_ops[4];
        unsigned n_response_ops;

        /* typed_per_filter_config of each level that has any, most specific first (weighted
         * cluster, route, virtual host, route configuration). */
        const struct wp_route_filter_configs *filter_configs[4];
        unsigned n_filter_configs;
};

/*
 * Compiles rc. On success stores a new table in *ret (free with wp_route_table_free) and
 * returns 0. Returns -EINVAL for a configuration we reject (invalid, or using a feature we do
 * not implement), -E2BIG past a WP_ROUTE_MAX_* limit, -ENOMEM; *reterr_desc then describes the
 * problem and names the field ("virtual_hosts[1].domains[0]: duplicate domain foo.com"). The
 * description lives in a thread-local buffer valid until the next call into this module on the
 * same thread.
 */
int wp_route_table_new(const Envoy__Config__Route__V3__RouteConfiguration *rc,
                       struct wp_route_table **ret, const char **reterr_desc);

/* Frees t (calling conf_free on filter configs that have one). NULL-safe; returns NULL. */
struct wp_route_table *wp_route_table_free(struct wp_route_table *t);

/* RouteConfiguration.name (borrowed from t). */
const char *wp_route_table_name(const struct wp_route_table *t);

/*
 * Calls cb on every typed_per_filter_config entry of t (all levels), so that the snapshot
 * compiler can compile each one for its filter once, at config time, and store the result in
 * fc->conf / fc->conf_free. Stops at and returns the first negative value cb returns; else 0.
 */
int wp_route_table_foreach_filter_config(struct wp_route_table *t,
                                         int (*cb)(struct wp_route_filter_config *fc, void *user),
                                         void *user);

/* Sets the caller buffer of r and clears the rest. */
static inline void wp_route_result_init(struct wp_route_result *r, char *buf, size_t cap)
{
        *r = (struct wp_route_result){.buf = buf, .buf_cap = cap};
}

/*
 * Routes req: picks the virtual host from req->authority and the first matching route.
 * random is a uniformly random 64-bit value drawn per request: it picks the weighted cluster
 * (random % total weight, unless WeightedCluster.header_name names a header that holds a
 * number) and decides RouteMatch.runtime_fraction. Fills *ret (see struct wp_route_result);
 * action NONE when nothing matched. Returns 0, or -ENOSPC when ret->buf is too small for the
 * rewritten path or the Location value (answer 500). Does not allocate.
 */
int wp_route_match(const struct wp_route_table *t, const struct wp_http_request *req,
                   uint64_t random, struct wp_route_result *ret);

/* The configuration of the filter called filter_name for this request (the most specific
 * level's), or NULL. */
const struct wp_route_filter_config *wp_route_result_filter_config(const struct wp_route_result *r,
                                                                   const char *filter_name);

/*
 * Applies n header mutation lists to h in order (Envoy's semantics per level: the removals,
 * then the APPEND_IF_EXISTS_OR_ADD / ADD_IF_ABSENT additions, then the overwrites; an
 * OVERWRITE_IF_EXISTS entry acts when the header exists before the overwrites of its level).
 * Names and values added to h are borrowed from the table. Returns 0 or -ENOMEM (h may then be
 * partly modified).
 */
int wp_route_headers_apply(const struct wp_route_header_ops *const *ops, unsigned n,
                           struct wp_headers *h);

/* Whether a mirror policy samples this request (random: a per-request random value). */
bool wp_route_mirror_sampled(const struct wp_route_mirror *m, uint64_t random);

#endif
