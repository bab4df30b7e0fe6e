/*
 * Compiles xDS resources into a wp_snapshot (see snapshot.h).
 *
 * What is read, as istiod generates it for a waypoint (ISTIO-CONTRACT §2.3-2.6):
 *  - Listener `main_internal`: filter_chain_matcher (xds.type.matcher.v3.Matcher) and its named
 *    filter chains. Chains with tcp_proxy are served; http_connection_manager chains compile to
 *    WP_CHAIN_HTTP (route table, HTTP filters through the filter registry, router last; see
 *    compile_hcm); chains whose filters we do not implement yet (network RBAC, ...) compile as
 *    "unsupported" so their tunnels are refused with 501 rather than passed without the policy
 *    they carry.
 *  - Clusters: EDS (endpoints from the ClusterLoadAssignment named by eds_cluster_config or the
 *    cluster name), STATIC (inline load_assignment), ORIGINAL_DST `connect_originate` (upstream
 *    port override and connect timeout for HBONE upstreams).
 *  - Endpoints: envoy_internal_address to `connect_originate` = HBONE to the pod (address from
 *    filter_metadata["envoy.filters.listener.original_dst"].local, else endpoint_id); without a
 *    target it is the passthrough `encap` cluster; socket_address = plain TCP.
 * Anything malformed is rejected with the resource and field named.
 */
#include "waypoint/snapshot.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <fcntl.h>
#include <unistd.h>

#include "envoy/extensions/filters/network/http_connection_manager/v3/http_connection_manager.pb-c.h"
#include "envoy/extensions/upstreams/http/v3/http_protocol_options.pb-c.h"
#include "filters/filter.h"
#include "hbone/hbone.h"
#include "waypoint/accesslog.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/log.h"
#include "waypoint/lb.h"
#include "waypoint/router.h"
#include "waypoint/wds.h"
#include "xds-client/pbjson.h"
#include "xds-client/resources.h"

#define TYPE_PREFIX "type.googleapis.com/"
#define INPUT_DST_IP                                                                               \
        TYPE_PREFIX "envoy.extensions.matching.common_inputs.network.v3.DestinationIPInput"
#define INPUT_DST_PORT                                                                             \
        TYPE_PREFIX "envoy.extensions.matching.common_inputs.network.v3.DestinationPortInput"
#define INPUT_APP_PROTO                                                                            \
        TYPE_PREFIX "envoy.extensions.matching.common_inputs.network.v3.ApplicationProtocolInput"
#define INPUT_TRANSPORT                                                                            \
        TYPE_PREFIX "envoy.extensions.matching.common_inputs.network.v3.TransportProtocolInput"
#define IP_MATCHER      TYPE_PREFIX "xds.type.matcher.v3.IPMatcher"
#define STRING_VALUE    TYPE_PREFIX "google.protobuf.StringValue"
#define MAX_MATCH_DEPTH 16

typedef Xds__Type__Matcher__V3__Matcher PbMatcher;
typedef Xds__Type__Matcher__V3__Matcher__OnMatch PbOnMatch;

enum node_input { IN_DST_IP, IN_DST_PORT, IN_APP_PROTO, IN_TRANSPORT };

struct on_match {
        struct wp_match_node *node;   /* nested matcher, or */
        const struct wp_chain *chain; /* an action naming a chain */
};

struct ip_range {
        int family;
        uint8_t addr[16];
        unsigned plen;
        bool exclusive;
        bool owns; /* first range of its range_matcher: frees om.node (shared by the others) */
        struct on_match om;
};

struct key_entry {
        char *key;
        struct on_match om;
};

struct wp_match_node {
        enum node_input input;
        struct ip_range *ranges; /* IN_DST_IP: sorted by prefix length, longest first */
        size_t nranges;
        /* IN_DST_IP index, so that a lookup does not scan every VIP: host ranges (/32, /128)
         * by address in xslots (open addressing, range index + 1 of the first range with that
         * address; xnext chains the next ones in order), every other range in order in
         * inexact. A host range is longer than any other range of its family, so evaluating
         * the hits of the address first and then the inexact ranges visits the matching
         * ranges in the same order as the sorted scan: longest prefix and `exclusive` keep
         * their meaning. */
        uint32_t *xslots;
        size_t xcap; /* power of two, or 0 */
        uint32_t *xnext;
        uint32_t *inexact;
        size_t ninexact;
        struct key_entry *keys; /* exact map */
        size_t nkeys;
        bool prefix; /* prefix_match_map rather than exact */
        bool has_no_match;
        struct on_match no_match;
};

/* name -> index, for the build only (cluster and chain references by name) */
struct wp_name_map {
        struct name_slot {
                const char *name; /* borrowed; NULL = empty */
                size_t idx;
        } * slots;
        size_t cap; /* power of two, or 0 */
};

struct build {
        struct xds_resources *res;
        struct wp_snapshot *s;
        struct wp_name_map clusters, chains;
        char *err;
};

static uint32_t str_hash(const char *s)
{
        uint32_t h = 2166136261u;

        for (; *s; s++)
                h = (h ^ (uint8_t)*s) * 16777619u;
        return h ^ (h >> 15);
}

static int map_init(struct wp_name_map *m, size_t n)
{
        size_t cap = 16;

        while (cap < n * 2)
                cap *= 2;
        m->slots = wp_calloc(cap, sizeof(*m->slots));
        if (!m->slots)
                return -ENOMEM;
        m->cap = cap;
        return 0;
}

/* Adds name -> idx (room reserved by map_init). Returns idx, or the index name already had. */
static size_t map_put(struct wp_name_map *m, const char *name, size_t idx)
{
        size_t mask = m->cap - 1, i = str_hash(name) & mask;

        for (; m->slots[i].name; i = (i + 1) & mask)
                if (!strcmp(m->slots[i].name, name))
                        return m->slots[i].idx;
        m->slots[i].name = name;
        m->slots[i].idx = idx;
        return idx;
}

/* The index of name, or SIZE_MAX. */
static size_t map_get(const struct wp_name_map *m, const char *name)
{
        size_t mask = m->cap - 1, i;

        if (!m->cap)
                return SIZE_MAX;
        for (i = str_hash(name) & mask; m->slots[i].name; i = (i + 1) & mask)
                if (!strcmp(m->slots[i].name, name))
                        return m->slots[i].idx;
        return SIZE_MAX;
}

static int fail(struct build *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static int fail(struct build *b, const char *fmt, ...)
{
        va_list ap;
        char buf[512];

        if (b->err)
                return -EINVAL;
        va_start(ap, fmt);
        vsnprintf(buf, sizeof(buf), fmt, ap);
        va_end(ap);
        b->err = wp_strdup(buf);
        return -EINVAL;
}

static uint32_t duration_ms(const Google__Protobuf__Duration *d, uint32_t dflt)
{
        int64_t ms;

        if (!d)
                return dflt;
        ms = d->seconds * 1000 + d->nanos / 1000000;
        if (ms <= 0)
                return dflt;
        return ms > UINT32_MAX ? UINT32_MAX : (uint32_t)ms;
}

/* ---- clusters ---- */

static const char *struct_string(const Google__Protobuf__Struct *st, const char *key)
{
        if (!st)
                return NULL;
        for (size_t i = 0; i < st->n_fields; i++) {
                const Google__Protobuf__Struct__FieldsEntry *e = st->fields[i];

                if (e->key && !strcmp(e->key, key) && e->value &&
                    e->value->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE)
                        return e->value->string_value;
        }
        return NULL;
}

static const Google__Protobuf__Struct *filter_metadata(const Envoy__Config__Core__V3__Metadata *m,
                                                       const char *ns)
{
        if (!m)
                return NULL;
        for (size_t i = 0; i < m->n_filter_metadata; i++)
                if (m->filter_metadata[i]->key && !strcmp(m->filter_metadata[i]->key, ns))
                        return m->filter_metadata[i]->value;
        return NULL;
}

static int set_ip_port(struct wp_endpoint *ep, const char *ip, uint32_t port)
{
        struct sockaddr_in *sin = (struct sockaddr_in *)&ep->addr;
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ep->addr;

        if (port == 0 || port > 65535)
                return -EINVAL;
        memset(&ep->addr, 0, sizeof(ep->addr));
        if (inet_pton(AF_INET, ip, &sin->sin_addr) == 1) {
                sin->sin_family = AF_INET;
                sin->sin_port = htons((uint16_t)port);
                ep->addrlen = sizeof(*sin);
        } else if (inet_pton(AF_INET6, ip, &sin6->sin6_addr) == 1) {
                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons((uint16_t)port);
                ep->addrlen = sizeof(*sin6);
        } else {
                return -EINVAL;
        }
        if (hbone_target_format((struct sockaddr *)&ep->addr, ep->authority,
                                sizeof(ep->authority)) < 0)
                return -EINVAL;
        return 0;
}

/* 1 = endpoint filled, 0 = passthrough (connect_originate without a target), 2 = an internal
 * listener other than connect_originate, < 0 error */
static int compile_endpoint(struct build *b, const char *cname, size_t li, size_t ei,
                            const Envoy__Config__Endpoint__V3__LbEndpoint *lbe,
                            struct wp_endpoint *ep)
{
        const Envoy__Config__Endpoint__V3__Endpoint *e;
        const Envoy__Config__Core__V3__Address *a;

        if (lbe->host_identifier_case !=
                    ENVOY__CONFIG__ENDPOINT__V3__LB_ENDPOINT__HOST_IDENTIFIER_ENDPOINT ||
            !lbe->endpoint || !lbe->endpoint->address)
                return fail(b,
                            "ClusterLoadAssignment %s: "
                            "endpoints[%zu].lb_endpoints[%zu].endpoint.address: missing",
                            cname, li, ei);
        e = lbe->endpoint;
        a = e->address;
        switch (a->address_case) {
        case ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_SOCKET_ADDRESS: {
                const Envoy__Config__Core__V3__SocketAddress *sa = a->socket_address;

                if (sa->port_specifier_case !=
                            ENVOY__CONFIG__CORE__V3__SOCKET_ADDRESS__PORT_SPECIFIER_PORT_VALUE ||
                    set_ip_port(ep, sa->address, sa->port_value) < 0)
                        return fail(
                                b,
                                "ClusterLoadAssignment %s: "
                                "endpoints[%zu].lb_endpoints[%zu].endpoint.address.socket_address: "
                                "'%s' port %u is not an IP address and port",
                                cname, li, ei, sa->address, sa->port_value);
                ep->hbone = false;
                return 1;
        }
        case ENVOY__CONFIG__CORE__V3__ADDRESS__ADDRESS_ENVOY_INTERNAL_ADDRESS: {
                const Envoy__Config__Core__V3__EnvoyInternalAddress *ia = a->envoy_internal_address;
                const char *target;
                struct hbone_target t;

                if (ia->address_name_specifier_case !=
                    ENVOY__CONFIG__CORE__V3__ENVOY_INTERNAL_ADDRESS__ADDRESS_NAME_SPECIFIER_SERVER_LISTENER_NAME)
                        return fail(b,
                                    "ClusterLoadAssignment %s: "
                                    "endpoints[%zu].lb_endpoints[%zu].endpoint.address.envoy_"
                                    "internal_address: "
                                    "server_listener_name missing",
                                    cname, li, ei);
                if (strcmp(ia->server_listener_name, "connect_originate") != 0)
                        return 2; /* e.g. main_internal: plumbing of Envoy's own listeners */
                target = struct_string(
                        filter_metadata(lbe->metadata, "envoy.filters.listener.original_dst"),
                        "local");
                if (!target && ia->endpoint_id && ia->endpoint_id[0])
                        target = ia->endpoint_id;
                if (!target)
                        return 0;
                if (hbone_target_parse(target, strlen(target), &t) < 0 || !t.is_ip)
                        return fail(
                                b,
                                "ClusterLoadAssignment %s: "
                                "endpoints[%zu].lb_endpoints[%zu].metadata.filter_metadata"
                                "[envoy.filters.listener.original_dst].local: '%s' is not ip:port",
                                cname, li, ei, target);
                memcpy(&ep->addr, &t.addr, t.addrlen);
                ep->addrlen = t.addrlen;
                hbone_target_format((struct sockaddr *)&ep->addr, ep->authority,
                                    sizeof(ep->authority));
                ep->hbone = true;
                return 1;
        }
        default:
                return fail(b,
                            "ClusterLoadAssignment %s: "
                            "endpoints[%zu].lb_endpoints[%zu].endpoint.address: "
                            "pipe addresses are not supported",
                            cname, li, ei);
        }
}

static const Envoy__Config__Endpoint__V3__ClusterLoadAssignment *find_cla(struct build *b,
                                                                          const char *name)
{
        return (const Envoy__Config__Endpoint__V3__ClusterLoadAssignment *)xds_resources_find(
                b->res, XDS_RES_CLA, name);
}

/* The per-request balancer of a cluster (Cluster.lb_policy; the proto subset carries no
 * ring_hash/maglev/least_request configs, so their defaults apply). */
static int compile_lb(struct build *b, const Envoy__Config__Cluster__V3__Cluster *pc,
                      const Envoy__Config__Endpoint__V3__ClusterLoadAssignment *cla,
                      struct wp_cluster *c)
{
        struct wp_lb_config cfg;
        struct wp_lb_endpoint *le = NULL;
        const char *err = NULL;
        int r;

        wp_lb_config_init(&cfg);
        switch (pc->lb_policy) {
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__ROUND_ROBIN:
                cfg.policy = WP_LB_ROUND_ROBIN;
                break;
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__LEAST_REQUEST:
                cfg.policy = WP_LB_LEAST_REQUEST;
                break;
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__RANDOM:
                cfg.policy = WP_LB_RANDOM;
                break;
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__RING_HASH:
                cfg.policy = WP_LB_RING_HASH;
                break;
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_POLICY__MAGLEV:
                cfg.policy = WP_LB_MAGLEV;
                break;
        default:
                return fail(b, "Cluster %s: lb_policy: %d not supported", pc->name,
                            (int)pc->lb_policy);
        }
        if (cla && cla->policy && cla->policy->overprovisioning_factor)
                cfg.overprovisioning_factor = cla->policy->overprovisioning_factor->value;
        if (c->neps) {
                le = wp_calloc(c->neps, sizeof(*le));
                if (!le)
                        return -ENOMEM;
        }
        for (size_t i = 0; i < c->neps; i++)
                le[i] = (struct wp_lb_endpoint){.key = c->eps[i].authority,
                                                .weight = c->eps[i].weight,
                                                .priority = c->eps[i].priority,
                                                .healthy = c->eps[i].healthy};
        r = wp_lb_new(&cfg, le, c->neps, &c->lb, &err);
        wp_free(le);
        if (r == -EINVAL)
                return fail(b, "Cluster %s: lb_policy: %s", pc->name, err ? err : "invalid");
        return r;
}

/* passthrough clusters (encap) are marked with neps == 0 and this sentinel */
static char passthrough_mark;

/* Cluster.typed_extension_protocol_options: the upstream HTTP protocol (istiod marks HTTP/2 and
 * gRPC service ports with explicit http2_protocol_options, sniffed ones with
 * use_downstream_protocol_config). */
static int compile_http_protocol(struct build *b, const Envoy__Config__Cluster__V3__Cluster *pc,
                                 struct wp_cluster *c)
{
        for (size_t i = 0; i < pc->n_typed_extension_protocol_options; i++) {
                const Envoy__Config__Cluster__V3__Cluster__TypedExtensionProtocolOptionsEntry *e =
                        pc->typed_extension_protocol_options[i];
                Envoy__Extensions__Upstreams__Http__V3__HttpProtocolOptions *o = NULL;
                const char *err = NULL;
                int r;

                if (!e->key ||
                    strcmp(e->key, "envoy.extensions.upstreams.http.v3.HttpProtocolOptions") ||
                    !e->value)
                        continue;
                r = xds_any_unpack(
                        e->value,
                        &envoy__extensions__upstreams__http__v3__http_protocol_options__descriptor,
                        (ProtobufCMessage **)&o, &err);
                if (r < 0)
                        return r == -ENOMEM
                                       ? r
                                       : fail(b, "Cluster %s: typed_extension_protocol_options: %s",
                                              pc->name, err ? err : "invalid HttpProtocolOptions");
                switch (o->upstream_protocol_options_case) {
                case ENVOY__EXTENSIONS__UPSTREAMS__HTTP__V3__HTTP_PROTOCOL_OPTIONS__UPSTREAM_PROTOCOL_OPTIONS_EXPLICIT_HTTP_CONFIG:
                        if (o->explicit_http_config->protocol_config_case ==
                            ENVOY__EXTENSIONS__UPSTREAMS__HTTP__V3__HTTP_PROTOCOL_OPTIONS__EXPLICIT_HTTP_CONFIG__PROTOCOL_CONFIG_HTTP2_PROTOCOL_OPTIONS)
                                c->http_protocol = WP_UPSTREAM_HTTP2;
                        else if (
                                o->explicit_http_config->protocol_config_case ==
                                ENVOY__EXTENSIONS__UPSTREAMS__HTTP__V3__HTTP_PROTOCOL_OPTIONS__EXPLICIT_HTTP_CONFIG__PROTOCOL_CONFIG_HTTP3_PROTOCOL_OPTIONS)
                                r = fail(b,
                                         "Cluster %s: typed_extension_protocol_options: HTTP/3 is "
                                         "not supported",
                                         pc->name);
                        break;
                case ENVOY__EXTENSIONS__UPSTREAMS__HTTP__V3__HTTP_PROTOCOL_OPTIONS__UPSTREAM_PROTOCOL_OPTIONS_USE_DOWNSTREAM_PROTOCOL_CONFIG:
                        if (o->use_downstream_protocol_config->http2_protocol_options)
                                c->http_protocol = WP_UPSTREAM_DOWNSTREAM;
                        break;
                default:
                        break; /* auto_config without TLS/ALPN: HTTP/1.1 */
                }
                xds_pbjson_message_free(&o->base);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int compile_cluster(struct build *b, const Envoy__Config__Cluster__V3__Cluster *pc,
                           struct wp_cluster *c, bool *ret_skip)
{
        const Envoy__Config__Endpoint__V3__ClusterLoadAssignment *cla = NULL;
        size_t n = 0, k = 0;
        bool passthrough = false;
        int hr;

        *ret_skip = false;
        c->name = wp_strdup(pc->name);
        if (!c->name)
                return -ENOMEM;
        c->connect_timeout_ms = duration_ms(pc->connect_timeout, 10000);
        hr = compile_http_protocol(b, pc, c);
        if (hr < 0)
                return hr;
        if (pc->cluster_discovery_type_case !=
            ENVOY__CONFIG__CLUSTER__V3__CLUSTER__CLUSTER_DISCOVERY_TYPE_TYPE)
                return fail(b, "Cluster %s: cluster_type: custom cluster types are not supported",
                            pc->name);
        switch (pc->type) {
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__EDS: {
                const char *svc = pc->eds_cluster_config && pc->eds_cluster_config->service_name &&
                                                  pc->eds_cluster_config->service_name[0]
                                          ? pc->eds_cluster_config->service_name
                                          : pc->name;
                cla = find_cla(b, svc);
                break; /* no assignment yet: no endpoints (503 until EDS arrives) */
        }
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__STATIC:
                cla = pc->load_assignment;
                break;
        case ENVOY__CONFIG__CLUSTER__V3__CLUSTER__DISCOVERY_TYPE__ORIGINAL_DST:
                if (!strcmp(pc->name, "connect_originate")) {
                        if (pc->lb_config_case ==
                                    ENVOY__CONFIG__CLUSTER__V3__CLUSTER__LB_CONFIG_ORIGINAL_DST_LB_CONFIG &&
                            pc->original_dst_lb_config->upstream_port_override) {
                                uint32_t p =
                                        pc->original_dst_lb_config->upstream_port_override->value;

                                if (p == 0 || p > 65535)
                                        return fail(b,
                                                    "Cluster connect_originate: "
                                                    "original_dst_lb_config.upstream_port_override:"
                                                    " %u out of range",
                                                    p);
                                b->s->hbone_port = (uint16_t)p;
                        }
                        b->s->connect_timeout_ms = c->connect_timeout_ms;
                }
                *ret_skip = true; /* not a tcp_proxy target */
                return 0;
        default:
                /* STRICT_DNS / LOGICAL_DNS: DNS resolution comes later; no endpoints for now */
                *ret_skip = false;
                return 0;
        }
        if (!cla)
                return compile_lb(b, pc, NULL, c);
        for (size_t i = 0; i < cla->n_endpoints; i++)
                n += cla->endpoints[i]->n_lb_endpoints;
        if (n > 100000)
                return fail(b, "ClusterLoadAssignment %s: %zu endpoints exceed the limit of 100000",
                            pc->name, n);
        c->eps = n ? wp_calloc(n, sizeof(*c->eps)) : NULL;
        if (n && !c->eps)
                return -ENOMEM;
        for (size_t i = 0; i < cla->n_endpoints; i++) {
                const Envoy__Config__Endpoint__V3__LocalityLbEndpoints *loc = cla->endpoints[i];

                for (size_t j = 0; j < loc->n_lb_endpoints; j++) {
                        const Envoy__Config__Endpoint__V3__LbEndpoint *lbe = loc->lb_endpoints[j];
                        struct wp_endpoint *ep = &c->eps[k];
                        int r = compile_endpoint(b, pc->name, i, j, lbe, ep);

                        if (r < 0)
                                return r;
                        if (r == 2) {
                                /* a cluster into one of Envoy's internal listeners: internal
                                 * listeners are function calls here, nothing routes to it */
                                *ret_skip = true;
                                return 0;
                        }
                        if (r == 0) {
                                passthrough = true;
                                continue;
                        }
                        ep->priority = loc->priority;
                        ep->weight = lbe->load_balancing_weight && lbe->load_balancing_weight->value
                                             ? lbe->load_balancing_weight->value
                                             : 1;
                        ep->healthy = lbe->health_status ==
                                              ENVOY__CONFIG__CORE__V3__HEALTH_STATUS__UNKNOWN ||
                                      lbe->health_status ==
                                              ENVOY__CONFIG__CORE__V3__HEALTH_STATUS__HEALTHY;
                        if (ep->healthy)
                                c->nhealthy++;
                        k++;
                }
        }
        c->neps = k;
        if (passthrough && k == 0) {
                wp_free(c->eps);
                c->eps = (struct wp_endpoint *)&passthrough_mark;
                c->passthrough = true;
                return 0;
        } else if (passthrough) {
                return fail(b, "Cluster %s: mixes passthrough and addressed endpoints", pc->name);
        }
        return compile_lb(b, pc, cla, c);
}

static struct wp_cluster *find_cluster(struct build *b, const char *name)
{
        size_t i = map_get(&b->clusters, name);

        return i == SIZE_MAX ? NULL : &b->s->clusters[i];
}

/* ---- filter chains ---- */

static bool is_optional_filter(const char *name)
{
        /* filters that do not change what passes: telemetry and filter-state plumbing */
        static const char *const optional[] = {
                "istio.stats",
                "connect_authority",
                "envoy.filters.network.set_filter_state",
                "istio.metadata_exchange",
                "envoy.filters.network.connection_limit",
        };
        for (size_t i = 0; i < sizeof(optional) / sizeof(optional[0]); i++)
                if (!strcmp(name, optional[i]))
                        return true;
        return false;
}

/*
 * Compiles the access_log entries of chain ch's terminal filter (tcp_proxy or HCM): each into a
 * logger, its file opened now (O_APPEND). Entries the formatter does not support (gRPC ALS,
 * OpenTelemetry, CEL filters...) are skipped with a warning; an invalid one is a NACK.
 */
static int compile_access_logs(struct build *b, const char *where,
                               Envoy__Config__Accesslog__V3__AccessLog *const *als, size_t n,
                               struct wp_chain *ch)
{
        if (!n)
                return 0;
        ch->logs = wp_calloc(n, sizeof(*ch->logs));
        if (!ch->logs)
                return -ENOMEM;
        for (size_t i = 0; i < n; i++) {
                struct wp_al_logger *l = NULL;
                const char *err = NULL, *path = NULL;
                int r = wp_al_logger_new(als[i], &l, &err), fd;

                if (r == -EOPNOTSUPP) {
                        wp_warn("snapshot", "%s.typed_config.access_log[%zu] (%s): skipped: %s",
                                where, i, als[i]->name ? als[i]->name : "",
                                err ? err : "unsupported");
                        continue;
                }
                if (r == -ENOMEM)
                        return r;
                if (r < 0)
                        return fail(b, "%s.typed_config.access_log[%zu] (%s): %s", where, i,
                                    als[i]->name ? als[i]->name : "", err ? err : "invalid");
                switch (wp_al_logger_sink(l, &path)) {
                case WP_AL_SINK_STDERR:
                        fd = STDERR_FILENO;
                        break;
                case WP_AL_SINK_FILE:
                        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
                        if (fd < 0) {
                                r = errno;
                                wp_al_logger_free(l);
                                return fail(b, "%s.typed_config.access_log[%zu].path %s: %s", where,
                                            i, path, strerror(r));
                        }
                        break;
                default:
                        fd = STDOUT_FILENO;
                        break;
                }
                ch->logs[ch->nlogs++] = (struct wp_chain_log){.logger = l, .fd = fd};
        }
        return 0;
}

static void chain_logs_free(struct wp_chain *ch)
{
        for (size_t i = 0; i < ch->nlogs; i++) {
                if (ch->logs[i].fd > STDERR_FILENO)
                        close(ch->logs[i].fd);
                wp_al_logger_free(ch->logs[i].logger);
        }
        wp_free(ch->logs);
        ch->logs = NULL;
        ch->nlogs = 0;
}

/* ---- HTTP connection manager chains ---- */

/* HTTP filters istiod always emits that change nothing we enforce (telemetry, peer metadata,
 * filter-state plumbing): skipped. */
static bool is_noop_http_filter(const char *name)
{
        static const char *const noop[] = {
                "istio.stats",
                "waypoint_downstream_peer_metadata",
                "waypoint_upstream_peer_metadata",
                "envoy.filters.http.grpc_stats",
                "connect_authority",
        };
        for (size_t i = 0; i < sizeof(noop) / sizeof(noop[0]); i++)
                if (!strcmp(name, noop[i]))
                        return true;
        return false;
}

/* Filters that are no-ops only while their base config and every per-route config are empty. */
static bool is_empty_only_http_filter(const char *name)
{
        return !strcmp(name, "envoy.filters.http.fault") ||
               !strcmp(name, "envoy.filters.http.cors");
}

struct perroute_check {
        struct build *b;
        const char *where; /* "Listener main_internal: filter_chains[i] (name).filters[j]" */
        const Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager
                *hcm;
};

/* typed_per_filter_config entries we would have to honour: fault/cors (not implemented) and
 * per-route configs of the filters we enforce (RBACPerRoute: not implemented). Entries for
 * filters that are not in the chain are ignored, as Envoy does. */
static int check_perroute(struct wp_route_filter_config *fc, void *user)
{
        struct perroute_check *pc = user;

        for (size_t i = 0; i < pc->hcm->n_http_filters; i++) {
                const char *n =
                        pc->hcm->http_filters[i]->name ? pc->hcm->http_filters[i]->name : "";

                if (strcmp(n, fc->filter_name) != 0 || is_noop_http_filter(n))
                        continue;
                if (pc->hcm->http_filters[i]->disabled)
                        continue;
                return fail(pc->b,
                            "%s.typed_config.route_config: typed_per_filter_config[%s] (%s): "
                            "per-route filter configuration is not implemented",
                            pc->where, fc->filter_name, fc->type_url ? fc->type_url : "?");
        }
        return 0;
}

static void http_conf_free(struct wp_http_conf *h)
{
        if (!h)
                return;
        for (size_t i = 0; i < h->nfilters; i++)
                if (h->filters[i].ops->conf_free)
                        h->filters[i].ops->conf_free(h->filters[i].conf);
        wp_free(h->filters);
        wp_route_table_free(h->routes);
        wp_free(h);
}

/* Compiles one HTTP filter into h->filters (or skips it). */
static int compile_http_filter(
        struct build *b, const char *where, size_t k,
        const Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpFilter *hf,
        struct wp_http_conf *h)
{
        const char *name = hf->name ? hf->name : "";
        const struct flt_ops *ops;
        const ProtobufCMessageDescriptor *desc;
        ProtobufCMessage *msg = NULL;
        const char *err = NULL;
        bool heap = false;
        void *conf = NULL;
        int r;

        if (is_noop_http_filter(name) || hf->disabled)
                return 0;
        if (is_empty_only_http_filter(name)) {
                if (hf->config_type_case ==
                            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_FILTER__CONFIG_TYPE_TYPED_CONFIG &&
                    hf->typed_config->value.len == 0)
                        return 0;
                if (hf->is_optional)
                        return 0;
                return fail(b,
                            "%s.typed_config.http_filters[%zu] (%s): a non-empty configuration is "
                            "not implemented",
                            where, k, name);
        }
        ops = flt_registry_lookup(name);
        if (!ops) {
                if (hf->is_optional)
                        return 0;
                return fail(b,
                            "%s.typed_config.http_filters[%zu] (%s): HTTP filter not implemented",
                            where, k, name[0] ? name : "(unnamed)");
        }
        if (hf->config_type_case !=
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_FILTER__CONFIG_TYPE_TYPED_CONFIG)
                return fail(b,
                            "%s.typed_config.http_filters[%zu] (%s).typed_config: missing "
                            "(config_discovery is not supported)",
                            where, k, name);
        if (!hf->typed_config->type_url || strcmp(hf->typed_config->type_url, ops->type_url) != 0)
                return fail(b,
                            "%s.typed_config.http_filters[%zu] (%s).typed_config: type '%s', "
                            "expected '%s'",
                            where, k, name,
                            hf->typed_config->type_url ? hf->typed_config->type_url : "",
                            ops->type_url);
        desc = xds_registry_lookup(ops->type_url);
        if (!desc)
                return fail(
                        b, "%s.typed_config.http_filters[%zu] (%s).typed_config: type '%s' unknown",
                        where, k, name, ops->type_url);
        r = xds_any_unpack(hf->typed_config, desc, &msg, &err);
        if (r < 0)
                return r == -ENOMEM
                               ? r
                               : fail(b, "%s.typed_config.http_filters[%zu] (%s).typed_config: %s",
                                      where, k, name, err ? err : "invalid");
        err = NULL;
        r = ops->conf_new(msg, &conf, &err, &heap);
        xds_pbjson_message_free(msg);
        if (r < 0) {
                if (r != -ENOMEM || err)
                        r = fail(b, "%s.typed_config.http_filters[%zu] (%s).typed_config.%s", where,
                                 k, name, err ? err : "out of memory");
                if (heap)
                        wp_free((void *)err);
                return r;
        }
        h->filters[h->nfilters].ops = ops;
        h->filters[h->nfilters].conf = conf;
        h->nfilters++;
        return 0;
}

/* Compiles an http_connection_manager (typed_config of filter fi of chain idx) into ch. */
static int compile_hcm(struct build *b, size_t idx, size_t fi,
                       const Envoy__Config__Listener__V3__Filter *f, struct wp_chain *ch)
{
        Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager *hcm =
                NULL;
        const Envoy__Config__Route__V3__RouteConfiguration *rc = NULL;
        struct wp_http_conf *h = NULL;
        struct perroute_check prc;
        char where[320];
        const char *err = NULL;
        bool router = false;
        int r;

        snprintf(where, sizeof(where),
                 "Listener main_internal: filter_chains[%zu] (%s).filters[%zu]", idx, ch->name, fi);
        if (f->config_type_case != ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG)
                return fail(b, "%s.typed_config: missing", where);
        r = xds_any_unpack(
                f->typed_config,
                &envoy__extensions__filters__network__http_connection_manager__v3__http_connection_manager__descriptor,
                (ProtobufCMessage **)&hcm, &err);
        if (r < 0)
                return r == -ENOMEM ? r
                                    : fail(b, "%s.typed_config: %s", where,
                                           err ? err : "invalid HttpConnectionManager");
        if (hcm->codec_type ==
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__CODEC_TYPE__HTTP3) {
                r = fail(b, "%s.typed_config.codec_type: HTTP3 is not supported", where);
                goto out;
        }
        h = wp_calloc(1, sizeof(*h));
        if (!h || (hcm->n_http_filters &&
                   !(h->filters = wp_calloc(hcm->n_http_filters, sizeof(*h->filters))))) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t k = 0; k < hcm->n_http_filters; k++) {
                const Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpFilter
                        *hf = hcm->http_filters[k];
                const char *name = hf->name ? hf->name : "";

                if (router) {
                        r = fail(b,
                                 "%s.typed_config.http_filters[%zu] (%s): after the router (the "
                                 "router must be last)",
                                 where, k, name);
                        goto out;
                }
                if (!strcmp(name, "envoy.filters.http.router")) {
                        router = true;
                        continue;
                }
                r = compile_http_filter(b, where, k, hf, h);
                if (r < 0)
                        goto out;
        }
        if (!router) {
                r = fail(b, "%s.typed_config.http_filters: no envoy.filters.http.router", where);
                goto out;
        }
        for (size_t k = 0; k < hcm->n_upgrade_configs; k++) {
                const Envoy__Extensions__Filters__Network__HttpConnectionManager__V3__HttpConnectionManager__UpgradeConfig
                        *uc = hcm->upgrade_configs[k];

                if (!uc->upgrade_type || strcasecmp(uc->upgrade_type, "websocket") != 0)
                        continue; /* CONNECT and others: refused per request (403) */
                if (uc->n_filters) {
                        r = fail(b, "%s.typed_config.upgrade_configs[%zu].filters: not implemented",
                                 where, k);
                        goto out;
                }
                h->websocket = !uc->enabled || uc->enabled->value;
        }
        r = compile_access_logs(b, where, hcm->access_log, hcm->n_access_log, ch);
        if (r < 0)
                goto out;
        if (hcm->route_specifier_case ==
            ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_ROUTE_CONFIG) {
                rc = hcm->route_config;
        } else if (
                hcm->route_specifier_case ==
                ENVOY__EXTENSIONS__FILTERS__NETWORK__HTTP_CONNECTION_MANAGER__V3__HTTP_CONNECTION_MANAGER__ROUTE_SPECIFIER_RDS) {
                const char *rn = hcm->rds->route_config_name ? hcm->rds->route_config_name : "";

                rc = (const Envoy__Config__Route__V3__RouteConfiguration *)xds_resources_find(
                        b->res, XDS_RES_ROUTE, rn);
                if (!rc) {
                        /* not received (yet): refuse the chain's tunnels rather than NACK */
                        char tmp[300];

                        snprintf(tmp, sizeof(tmp), "RouteConfiguration %s (rds, not received)", rn);
                        ch->kind = WP_CHAIN_UNSUPPORTED;
                        ch->unsupported = wp_strdup(tmp);
                        r = ch->unsupported ? 0 : -ENOMEM;
                        goto out;
                }
        } else {
                r = fail(b, "%s.typed_config: neither route_config nor rds", where);
                goto out;
        }
        err = NULL;
        r = wp_route_table_new(rc, &h->routes, &err);
        if (r < 0) {
                if (r != -ENOMEM || err)
                        r = fail(b, "%s.typed_config.%s%s: %s", where,
                                 rc == hcm->route_config ? "route_config"
                                                         : "rds RouteConfiguration ",
                                 rc == hcm->route_config ? "" : (rc->name ? rc->name : ""),
                                 err ? err : "out of memory");
                goto out;
        }
        prc = (struct perroute_check){.b = b, .where = where, .hcm = hcm};
        r = wp_route_table_foreach_filter_config(h->routes, check_perroute, &prc);
        if (r < 0)
                goto out;
        ch->kind = WP_CHAIN_HTTP;
        ch->http = h;
        h = NULL;
        r = 0;
out:
        http_conf_free(h);
        xds_pbjson_message_free(&hcm->base);
        return r;
}

static int compile_chain(struct build *b, size_t idx,
                         const Envoy__Config__Listener__V3__FilterChain *fc, struct wp_chain *ch)
{
        bool terminal = false;

        if (!fc->name || !fc->name[0])
                return fail(b, "Listener main_internal: filter_chains[%zu].name: missing", idx);
        ch->name = wp_strdup(fc->name);
        if (!ch->name)
                return -ENOMEM;
        ch->kind = WP_CHAIN_TCP;
        for (size_t i = 0; i < fc->n_filters && !terminal; i++) {
                const Envoy__Config__Listener__V3__Filter *f = fc->filters[i];
                const char *name = f->name ? f->name : "";

                if (!strcmp(name, "envoy.filters.network.tcp_proxy")) {
                        Envoy__Extensions__Filters__Network__TcpProxy__V3__TcpProxy *tp = NULL;
                        const char *err = NULL;
                        int r;

                        if (f->config_type_case !=
                            ENVOY__CONFIG__LISTENER__V3__FILTER__CONFIG_TYPE_TYPED_CONFIG)
                                return fail(b,
                                            "Listener main_internal: filter_chains[%zu] "
                                            "(%s).filters[%zu].typed_config: missing",
                                            idx, fc->name, i);
                        r = xds_any_unpack(
                                f->typed_config,
                                &envoy__extensions__filters__network__tcp_proxy__v3__tcp_proxy__descriptor,
                                (ProtobufCMessage **)&tp, &err);
                        if (r < 0)
                                return r == -ENOMEM
                                               ? r
                                               : fail(b,
                                                      "Listener main_internal: filter_chains[%zu] "
                                                      "(%s).filters[%zu].typed_config: %s",
                                                      idx, fc->name, i,
                                                      err ? err : "invalid TcpProxy");
                        if (tp->cluster_specifier_case ==
                            ENVOY__EXTENSIONS__FILTERS__NETWORK__TCP_PROXY__V3__TCP_PROXY__CLUSTER_SPECIFIER_CLUSTER) {
                                ch->clusters = wp_calloc(1, sizeof(*ch->clusters));
                                if (!ch->clusters) {
                                        xds_pbjson_message_free(&tp->base);
                                        return -ENOMEM;
                                }
                                ch->nclusters = 1;
                                ch->clusters[0].cluster = find_cluster(b, tp->cluster);
                                ch->clusters[0].weight = 1;
                                if (!ch->clusters[0].cluster)
                                        r = fail(b,
                                                 "Listener main_internal: filter_chains[%zu] "
                                                 "(%s).filters[%zu].typed_config.cluster: unknown "
                                                 "cluster '%s'",
                                                 idx, fc->name, i, tp->cluster);
                        } else if (
                                tp->cluster_specifier_case ==
                                ENVOY__EXTENSIONS__FILTERS__NETWORK__TCP_PROXY__V3__TCP_PROXY__CLUSTER_SPECIFIER_WEIGHTED_CLUSTERS) {
                                size_t n = tp->weighted_clusters->n_clusters;

                                ch->clusters = n ? wp_calloc(n, sizeof(*ch->clusters)) : NULL;
                                if (n && !ch->clusters) {
                                        xds_pbjson_message_free(&tp->base);
                                        return -ENOMEM;
                                }
                                ch->nclusters = n;
                                for (size_t j = 0; j < n && r == 0; j++) {
                                        const char *cn = tp->weighted_clusters->clusters[j]->name;

                                        ch->clusters[j].cluster = find_cluster(b, cn);
                                        ch->clusters[j].weight =
                                                tp->weighted_clusters->clusters[j]->weight;
                                        ch->total_weight += ch->clusters[j].weight;
                                        if (!ch->clusters[j].cluster)
                                                r = fail(b,
                                                         "Listener main_internal: "
                                                         "filter_chains[%zu] "
                                                         "(%s).filters[%zu].typed_config.weighted_"
                                                         "clusters.clusters[%zu].name: unknown "
                                                         "cluster '%s'",
                                                         idx, fc->name, i, j, cn);
                                }
                                if (r == 0 && (n == 0 || ch->total_weight == 0))
                                        r = fail(b,
                                                 "Listener main_internal: filter_chains[%zu] "
                                                 "(%s).filters[%zu].typed_config.weighted_clusters:"
                                                 " no cluster with a weight",
                                                 idx, fc->name, i);
                        } else {
                                r = fail(
                                        b,
                                        "Listener main_internal: filter_chains[%zu] "
                                        "(%s).filters[%zu].typed_config: tcp_proxy without cluster",
                                        idx, fc->name, i);
                        }
                        if (r == 0) {
                                char where[320];

                                snprintf(where, sizeof(where),
                                         "Listener main_internal: filter_chains[%zu] "
                                         "(%s).filters[%zu]",
                                         idx, fc->name, i);
                                r = compile_access_logs(b, where, tp->access_log, tp->n_access_log,
                                                        ch);
                        }
                        xds_pbjson_message_free(&tp->base);
                        if (r < 0)
                                return r;
                        if (ch->kind == WP_CHAIN_TCP && ch->nclusters == 1 &&
                            ch->clusters[0].cluster->eps == (struct wp_endpoint *)&passthrough_mark)
                                ch->kind = WP_CHAIN_PASSTHROUGH;
                        terminal = true;
                } else if (is_optional_filter(name)) {
                        continue;
                } else if (!strcmp(name, "envoy.filters.network.http_connection_manager") &&
                           ch->kind != WP_CHAIN_UNSUPPORTED) {
                        int r = compile_hcm(b, idx, i, f, ch);

                        if (r < 0)
                                return r;
                        terminal = true;
                } else {
                        /* http_connection_manager, rbac, ...: not implemented yet */
                        if (ch->kind != WP_CHAIN_UNSUPPORTED) {
                                ch->kind = WP_CHAIN_UNSUPPORTED;
                                ch->unsupported = wp_strdup(name[0] ? name : "(unnamed filter)");
                                if (!ch->unsupported)
                                        return -ENOMEM;
                        }
                        if (!strcmp(name, "envoy.filters.network.http_connection_manager"))
                                terminal = true;
                }
        }
        if (!terminal)
                return fail(b,
                            "Listener main_internal: filter_chains[%zu] (%s).filters: no terminal "
                            "filter (tcp_proxy or http_connection_manager)",
                            idx, fc->name);
        if (ch->kind == WP_CHAIN_UNSUPPORTED) {
                /* keep no cluster references: nothing will be routed */
                wp_free(ch->clusters);
                ch->clusters = NULL;
                ch->nclusters = 0;
        }
        return 0;
}

static const struct wp_chain *find_chain(struct build *b, const char *name)
{
        size_t i = map_get(&b->chains, name);

        return i == SIZE_MAX ? NULL : &b->s->chains[i];
}

/* ---- matcher ---- */

static int compile_matcher(struct build *b, const PbMatcher *m, const char *path, unsigned depth,
                           struct wp_match_node **ret);
static void free_node(struct wp_match_node *n);

static int compile_on_match(struct build *b, const PbOnMatch *om, const char *path, unsigned depth,
                            struct on_match *ret)
{
        char sub[512];

        if (!om)
                return fail(b, "Listener main_internal: %s: missing on_match", path);
        if (om->on_match_case == XDS__TYPE__MATCHER__V3__MATCHER__ON_MATCH__ON_MATCH_MATCHER) {
                snprintf(sub, sizeof(sub), "%s.matcher", path);
                return compile_matcher(b, om->matcher, sub, depth + 1, &ret->node);
        }
        if (om->on_match_case == XDS__TYPE__MATCHER__V3__MATCHER__ON_MATCH__ON_MATCH_ACTION) {
                const Xds__Core__V3__TypedExtensionConfig *a = om->action;
                Google__Protobuf__StringValue *sv = NULL;
                const char *err = NULL;
                int r;

                if (!a->typed_config || strcmp(a->typed_config->type_url, STRING_VALUE) != 0)
                        return fail(b,
                                    "Listener main_internal: %s.action.typed_config: expected %s "
                                    "naming a filter chain",
                                    path, STRING_VALUE);
                r = xds_any_unpack(a->typed_config, &google__protobuf__string_value__descriptor,
                                   (ProtobufCMessage **)&sv, &err);
                if (r < 0)
                        return r == -ENOMEM
                                       ? r
                                       : fail(b,
                                              "Listener main_internal: %s.action.typed_config: %s",
                                              path, err);
                ret->chain = find_chain(b, sv->value);
                if (!ret->chain)
                        r = fail(b, "Listener main_internal: %s.action: unknown filter chain '%s'",
                                 path, sv->value);
                xds_pbjson_message_free(&sv->base);
                return r;
        }
        return fail(b, "Listener main_internal: %s: neither matcher nor action", path);
}

static int parse_cidr(const char *prefix, uint32_t plen, struct ip_range *r)
{
        if (inet_pton(AF_INET, prefix, r->addr) == 1) {
                r->family = AF_INET;
                if (plen > 32)
                        return -EINVAL;
        } else if (inet_pton(AF_INET6, prefix, r->addr) == 1) {
                r->family = AF_INET6;
                if (plen > 128)
                        return -EINVAL;
        } else {
                return -EINVAL;
        }
        r->plen = plen;
        return 0;
}

static int cmp_range(const void *a, const void *b)
{
        const struct ip_range *x = a, *y = b;

        return (int)y->plen - (int)x->plen;
}

static bool host_range(const struct ip_range *r)
{
        return r->plen == (r->family == AF_INET ? 32u : 128u);
}

static uint32_t addr_hash(int family, const uint8_t *a)
{
        uint32_t h = 2166136261u ^ (uint32_t)family;

        for (size_t i = 0, n = family == AF_INET ? 4 : 16; i < n; i++)
                h = (h ^ a[i]) * 16777619u;
        return h ^ (h >> 15);
}

static bool addr_eq(const struct ip_range *r, int family, const uint8_t *a)
{
        return r->family == family && !memcmp(r->addr, a, family == AF_INET ? 4 : 16);
}

/* Builds the IN_DST_IP index of n (see struct wp_match_node) over its sorted ranges. */
static int index_ranges(struct wp_match_node *n)
{
        size_t nhost = 0, cap = 16;

        if (n->nranges > UINT32_MAX - 1)
                return -ENOMEM;
        for (size_t i = 0; i < n->nranges; i++)
                nhost += host_range(&n->ranges[i]);
        n->ninexact = 0;
        if (n->nranges > nhost) {
                n->inexact = wp_calloc(n->nranges - nhost, sizeof(*n->inexact));
                if (!n->inexact)
                        return -ENOMEM;
        }
        for (size_t i = 0; i < n->nranges; i++)
                if (!host_range(&n->ranges[i]))
                        n->inexact[n->ninexact++] = (uint32_t)i;
        if (!nhost)
                return 0;
        while (cap < nhost * 2)
                cap *= 2;
        n->xslots = wp_calloc(cap, sizeof(*n->xslots));
        n->xnext = wp_calloc(n->nranges, sizeof(*n->xnext));
        if (!n->xslots || !n->xnext)
                return -ENOMEM; /* freed with the node */
        n->xcap = cap;
        /* backwards, each range pushed in front of its address's chain: chains end up in order */
        for (size_t i = n->nranges; i-- > 0;) {
                const struct ip_range *r = &n->ranges[i];
                size_t mask = cap - 1, j = addr_hash(r->family, r->addr) & mask;

                if (!host_range(r))
                        continue;
                while (n->xslots[j] && !addr_eq(&n->ranges[n->xslots[j] - 1], r->family, r->addr))
                        j = (j + 1) & mask;
                n->xnext[i] = n->xslots[j];
                n->xslots[j] = (uint32_t)i + 1;
        }
        return 0;
}

static int compile_ip_matcher(struct build *b, const Xds__Core__V3__TypedExtensionConfig *cm,
                              const char *path, unsigned depth, struct wp_match_node *n)
{
        Xds__Type__Matcher__V3__IPMatcher *ipm = NULL;
        const char *err = NULL;
        size_t total = 0, k = 0;
        int r;

        if (!cm || !cm->typed_config || strcmp(cm->typed_config->type_url, IP_MATCHER) != 0)
                return fail(b,
                            "Listener main_internal: %s.custom_match: only %s is supported for "
                            "destination IPs",
                            path, IP_MATCHER);
        r = xds_any_unpack(cm->typed_config, &xds__type__matcher__v3__ipmatcher__descriptor,
                           (ProtobufCMessage **)&ipm, &err);
        if (r < 0)
                return r == -ENOMEM
                               ? r
                               : fail(b, "Listener main_internal: %s.custom_match: %s", path, err);
        for (size_t i = 0; i < ipm->n_range_matchers; i++)
                total += ipm->range_matchers[i]->n_ranges;
        n->ranges = total ? wp_calloc(total, sizeof(*n->ranges)) : NULL;
        if (total && !n->ranges) {
                r = -ENOMEM;
                goto out;
        }
        for (size_t i = 0; i < ipm->n_range_matchers && r == 0; i++) {
                const Xds__Type__Matcher__V3__IPMatcher__IPRangeMatcher *rm =
                        ipm->range_matchers[i];
                struct on_match om = {0};
                char sub[512];

                bool stored = false;

                snprintf(sub, sizeof(sub), "%s.custom_match.range_matchers[%zu].on_match", path, i);
                r = compile_on_match(b, rm->on_match, sub, depth, &om);
                for (size_t j = 0; j < rm->n_ranges && r == 0; j++) {
                        const Xds__Core__V3__CidrRange *cr = rm->ranges[j];
                        uint32_t plen = cr->prefix_len ? cr->prefix_len->value : 0;

                        if (parse_cidr(cr->address_prefix, plen, &n->ranges[k]) < 0) {
                                r = fail(b,
                                         "Listener main_internal: "
                                         "%s.custom_match.range_matchers[%zu].ranges[%zu]: invalid "
                                         "CIDR %s/%u",
                                         path, i, j, cr->address_prefix, plen);
                                break;
                        }
                        n->ranges[k].exclusive = rm->exclusive;
                        n->ranges[k].om = om;
                        n->ranges[k].owns = !stored;
                        stored = true;
                        k++;
                }
                if (!stored)
                        free_node(om.node);
        }
        n->nranges = k;
        qsort(n->ranges, n->nranges, sizeof(*n->ranges), cmp_range);
        if (r == 0)
                r = index_ranges(n);
out:
        xds_pbjson_message_free(&ipm->base);
        return r;
}

static int compile_matcher(struct build *b, const PbMatcher *m, const char *path, unsigned depth,
                           struct wp_match_node **ret)
{
        const Xds__Type__Matcher__V3__Matcher__MatcherTree *t;
        struct wp_match_node *n;
        const char *url;
        char sub[512];
        int r = 0;

        if (depth > MAX_MATCH_DEPTH)
                return fail(b, "Listener main_internal: %s: matcher nesting deeper than %d", path,
                            MAX_MATCH_DEPTH);
        if (m->matcher_type_case != XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TYPE_MATCHER_TREE)
                return fail(b, "Listener main_internal: %s: only matcher_tree is supported", path);
        t = m->matcher_tree;
        n = wp_calloc(1, sizeof(*n));
        if (!n)
                return -ENOMEM;
        *ret = n; /* owned by the snapshot from here (freed on error too) */
        url = t->input && t->input->typed_config ? t->input->typed_config->type_url : "";
        if (!strcmp(url, INPUT_DST_IP))
                n->input = IN_DST_IP;
        else if (!strcmp(url, INPUT_DST_PORT))
                n->input = IN_DST_PORT;
        else if (!strcmp(url, INPUT_APP_PROTO))
                n->input = IN_APP_PROTO;
        else if (!strcmp(url, INPUT_TRANSPORT))
                n->input = IN_TRANSPORT;
        else
                return fail(b,
                            "Listener main_internal: %s.matcher_tree.input: unsupported input '%s'",
                            path, url);
        snprintf(sub, sizeof(sub), "%s.matcher_tree", path);
        if (n->input == IN_DST_IP) {
                if (t->tree_type_case !=
                    XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_CUSTOM_MATCH)
                        return fail(b,
                                    "Listener main_internal: %s: destination IP needs custom_match "
                                    "IPMatcher",
                                    sub);
                r = compile_ip_matcher(b, t->custom_match, sub, depth, n);
        } else if (
                t->tree_type_case ==
                        XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_EXACT_MATCH_MAP ||
                t->tree_type_case ==
                        XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_PREFIX_MATCH_MAP) {
                const Xds__Type__Matcher__V3__Matcher__MatcherTree__MatchMap *mm =
                        t->tree_type_case ==
                                        XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_EXACT_MATCH_MAP
                                ? t->exact_match_map
                                : t->prefix_match_map;

                n->prefix =
                        t->tree_type_case ==
                        XDS__TYPE__MATCHER__V3__MATCHER__MATCHER_TREE__TREE_TYPE_PREFIX_MATCH_MAP;
                n->keys = mm->n_map ? wp_calloc(mm->n_map, sizeof(*n->keys)) : NULL;
                if (mm->n_map && !n->keys)
                        return -ENOMEM;
                for (size_t i = 0; i < mm->n_map && r == 0; i++) {
                        char sub2[640];

                        n->keys[i].key = wp_strdup(mm->map[i]->key);
                        n->nkeys = i + 1;
                        if (!n->keys[i].key)
                                return -ENOMEM;
                        snprintf(sub2, sizeof(sub2), "%s.map[%s]", sub, mm->map[i]->key);
                        r = compile_on_match(b, mm->map[i]->value, sub2, depth, &n->keys[i].om);
                }
        } else {
                return fail(b, "Listener main_internal: %s: unsupported tree type", sub);
        }
        if (r == 0 && m->on_no_match) {
                n->has_no_match = true;
                snprintf(sub, sizeof(sub), "%s.on_no_match", path);
                r = compile_on_match(b, m->on_no_match, sub, depth, &n->no_match);
        }
        return r;
}

static void free_node(struct wp_match_node *n);

static void free_om(struct on_match *om, struct wp_match_node **seen, size_t *nseen)
{
        (void)seen;
        (void)nseen;
        free_node(om->node);
        om->node = NULL;
}

static void free_node(struct wp_match_node *n)
{
        if (!n)
                return;
        /* ranges of one range_matcher share an on_match: its first range frees it */
        for (size_t i = 0; i < n->nranges; i++)
                if (n->ranges[i].owns)
                        free_node(n->ranges[i].om.node);
        for (size_t i = 0; i < n->nkeys; i++) {
                free_om(&n->keys[i].om, NULL, NULL);
                wp_free(n->keys[i].key);
        }
        free_om(&n->no_match, NULL, NULL);
        wp_free(n->ranges);
        wp_free(n->xslots);
        wp_free(n->xnext);
        wp_free(n->inexact);
        wp_free(n->keys);
        wp_free(n);
}

/* ---- lookup ---- */

struct match_ctx {
        int family;
        const uint8_t *ip;
        char port[8];
        const char *app_proto; /* ApplicationProtocolInput value; NULL: not known yet */
        bool *needs_proto;     /* set when the match needs app_proto and it is NULL */
};

static const struct wp_chain *eval_node(const struct wp_match_node *n, const struct match_ctx *c);

static const struct wp_chain *eval_om(const struct on_match *om, const struct match_ctx *c)
{
        return om->chain ? om->chain : om->node ? eval_node(om->node, c) : NULL;
}

static bool prefix_eq(const uint8_t *a, const uint8_t *b, unsigned plen)
{
        unsigned full = plen / 8, rem = plen % 8;

        if (memcmp(a, b, full) != 0)
                return false;
        if (rem) {
                uint8_t mask = (uint8_t)(0xff << (8 - rem));

                return (a[full] & mask) == (b[full] & mask);
        }
        return true;
}

static const struct wp_chain *eval_node(const struct wp_match_node *n, const struct match_ctx *c)
{
        const struct wp_chain *ch;

        switch (n->input) {
        case IN_DST_IP:
                /* the ranges holding exactly this address (longest), then the others, in order */
                if (n->xcap) {
                        size_t mask = n->xcap - 1, j = addr_hash(c->family, c->ip) & mask;
                        uint32_t k;

                        while ((k = n->xslots[j]) && !addr_eq(&n->ranges[k - 1], c->family, c->ip))
                                j = (j + 1) & mask;
                        for (; k; k = n->xnext[k - 1]) {
                                const struct ip_range *r = &n->ranges[k - 1];

                                ch = eval_om(&r->om, c);
                                if (ch || r->exclusive)
                                        return ch ? ch
                                                  : (n->has_no_match ? eval_om(&n->no_match, c)
                                                                     : NULL);
                        }
                }
                for (size_t i = 0; i < n->ninexact; i++) {
                        const struct ip_range *r = &n->ranges[n->inexact[i]];

                        if (r->family != c->family || !prefix_eq(r->addr, c->ip, r->plen))
                                continue;
                        ch = eval_om(&r->om, c);
                        if (ch || r->exclusive)
                                return ch ? ch
                                          : (n->has_no_match ? eval_om(&n->no_match, c) : NULL);
                }
                break;
        case IN_DST_PORT:
        case IN_APP_PROTO:
        case IN_TRANSPORT: {
                /* the application protocol comes from sniffing the tunnel's first bytes (as
                 * http_inspector does); the transport inside a tunnel is "raw_buffer" */
                const char *v = n->input == IN_DST_PORT    ? c->port
                                : n->input == IN_TRANSPORT ? "raw_buffer"
                                                           : c->app_proto;

                if (!v) {
                        if (c->needs_proto)
                                *c->needs_proto = true;
                        return NULL;
                }

                for (size_t i = 0; i < n->nkeys; i++) {
                        bool hit = n->prefix ? !strncmp(v, n->keys[i].key, strlen(n->keys[i].key))
                                             : !strcmp(v, n->keys[i].key);

                        if (hit && (ch = eval_om(&n->keys[i].om, c)))
                                return ch;
                }
                break;
        }
        }
        return n->has_no_match ? eval_om(&n->no_match, c) : NULL;
}

const struct wp_chain *wp_snapshot_lookup(const struct wp_snapshot *s, const struct sockaddr *addr)
{
        return wp_snapshot_lookup_proto(s, addr, "", NULL);
}

const struct wp_chain *wp_snapshot_lookup_proto(const struct wp_snapshot *s,
                                                const struct sockaddr *addr, const char *app_proto,
                                                bool *needs_proto)
{
        struct match_ctx c = {.app_proto = app_proto, .needs_proto = needs_proto};
        unsigned port;

        if (!s || !s->matcher)
                return NULL;
        if (addr->sa_family == AF_INET) {
                const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;

                c.family = AF_INET;
                c.ip = (const uint8_t *)&sin->sin_addr;
                port = ntohs(sin->sin_port);
        } else if (addr->sa_family == AF_INET6) {
                const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;

                c.family = AF_INET6;
                c.ip = (const uint8_t *)&sin6->sin6_addr;
                port = ntohs(sin6->sin6_port);
        } else {
                return NULL;
        }
        {
                /* the port as the exact map's decimal key (snprintf costs more than the match) */
                char tmp[8];
                size_t n = 0, k = 0;

                do {
                        tmp[n++] = (char)('0' + port % 10);
                        port /= 10;
                } while (port);
                while (n)
                        c.port[k++] = tmp[--n];
                c.port[k] = 0;
        }
        {
                const struct wp_chain *ch = eval_node(s->matcher, &c);

                /* an undecided protocol match may have fallen through to an outer no_match */
                return needs_proto && *needs_proto ? NULL : ch;
        }
}

const struct wp_endpoint *wp_chain_pick(const struct wp_chain *ch, uint64_t rnd)
{
        struct wp_cluster *c;
        uint64_t start;

        if (!ch->nclusters)
                return NULL;
        if (ch->nclusters == 1) {
                c = ch->clusters[0].cluster;
        } else {
                uint64_t x = rnd % ch->total_weight;
                size_t i = 0;

                while (x >= ch->clusters[i].weight) {
                        x -= ch->clusters[i].weight;
                        i++;
                }
                c = ch->clusters[i].cluster;
        }
        if (!c->nhealthy || c->eps == (struct wp_endpoint *)&passthrough_mark)
                return NULL;
        /* round robin over healthy endpoints of the best (lowest) priority */
        uint32_t best = UINT32_MAX;

        for (size_t i = 0; i < c->neps; i++)
                if (c->eps[i].healthy && c->eps[i].priority < best)
                        best = c->eps[i].priority;
        start = atomic_fetch_add_explicit(&c->rr, 1, memory_order_relaxed);
        for (size_t i = 0; i < c->neps; i++) {
                const struct wp_endpoint *ep = &c->eps[(start + i) % c->neps];

                if (ep->healthy && ep->priority == best)
                        return ep;
        }
        return NULL;
}

/* ---- build / free ---- */

static uint64_t listener_digest(const ProtobufCMessage *m)
{
        uint8_t stack[4096], *buf = stack;
        uint64_t h = 1469598103934665603ULL;
        size_t n;

        if (!m)
                return 0;
        n = protobuf_c_message_get_packed_size(m);
        if (n > sizeof(stack)) {
                buf = wp_malloc(n);
                if (!buf)
                        return 0;
        }
        protobuf_c_message_pack(m, buf);
        for (size_t i = 0; i < n; i++)
                h = (h ^ buf[i]) * 1099511628211ULL;
        if (buf != stack)
                wp_free(buf);
        return h;
}

static void snapshot_free(struct wp_snapshot *s)
{
        for (size_t i = 0; i < s->nchains; i++) {
                wp_free(s->chains[i].name);
                wp_free(s->chains[i].clusters);
                wp_free(s->chains[i].unsupported);
                http_conf_free(s->chains[i].http);
                chain_logs_free(&s->chains[i]);
        }
        wp_free(s->chains);
        for (size_t i = 0; i < s->nclusters; i++) {
                wp_free(s->clusters[i].name);
                if (s->clusters[i].eps != (struct wp_endpoint *)&passthrough_mark)
                        wp_free(s->clusters[i].eps);
                wp_lb_free(s->clusters[i].lb);
        }
        wp_free(s->clusters);
        free_node(s->matcher);
        if (s->cluster_map) {
                wp_free(s->cluster_map->slots);
                wp_free(s->cluster_map);
        }
        wp_wds_free(s->wds);
        xds_resources_free(s->res);
        wp_free(s);
}

int wp_snapshot_build(struct xds_resources *res, struct wp_snapshot **ret, char **reterr_desc)
{
        struct build b = {.res = res};
        const Envoy__Config__Listener__V3__Listener *mi = NULL;
        struct wp_snapshot *s;
        static _Atomic uint64_t versions;
        size_t k = 0;
        int r = 0;

        s = wp_calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        b.s = s;
        atomic_init(&s->refs, 1);
        s->version = atomic_fetch_add(&versions, 1) + 1;
        s->hbone_port = 15008;
        s->connect_timeout_ms = 10000;

        /* clusters */
        s->clusters = res->clusters.n ? wp_calloc(res->clusters.n, sizeof(*s->clusters)) : NULL;
        if (res->clusters.n && !s->clusters) {
                r = -ENOMEM;
                goto err;
        }
        for (size_t i = 0; i < res->clusters.n; i++) {
                bool skip;

                r = compile_cluster(
                        &b, (const Envoy__Config__Cluster__V3__Cluster *)res->clusters.items[i].msg,
                        &s->clusters[k], &skip);
                s->nclusters = k + 1;
                if (r < 0)
                        goto err;
                if (skip) {
                        wp_free(s->clusters[k].name);
                        if (s->clusters[k].eps != (struct wp_endpoint *)&passthrough_mark)
                                wp_free(s->clusters[k].eps);
                        wp_lb_free(s->clusters[k].lb);
                        memset(&s->clusters[k], 0, sizeof(s->clusters[k]));
                        s->nclusters = k;
                } else {
                        k++;
                }
        }
        s->nclusters = k;
        r = map_init(&b.clusters, s->nclusters);
        if (r < 0)
                goto err;
        for (size_t i = 0; i < s->nclusters; i++)
                map_put(&b.clusters, s->clusters[i].name, i); /* names are unique (resources) */

        /* main_internal */
        mi = (const Envoy__Config__Listener__V3__Listener *)xds_resources_find(
                res, XDS_RES_LISTENER, "main_internal");
        if (!mi) {
                r = fail(&b, "Listener main_internal: missing (the waypoint's dispatch listener)");
                goto err;
        }
        s->chains = mi->n_filter_chains ? wp_calloc(mi->n_filter_chains, sizeof(*s->chains)) : NULL;
        if ((mi->n_filter_chains && !s->chains) || map_init(&b.chains, mi->n_filter_chains) < 0) {
                r = -ENOMEM;
                goto err;
        }
        for (size_t i = 0; i < mi->n_filter_chains; i++) {
                s->nchains = i + 1;
                r = compile_chain(&b, i, mi->filter_chains[i], &s->chains[i]);
                if (r < 0)
                        goto err;
                if (map_put(&b.chains, s->chains[i].name, i) != i) {
                        r = fail(&b,
                                 "Listener main_internal: filter_chains[%zu].name: duplicate '%s'",
                                 i, s->chains[i].name);
                        goto err;
                }
        }
        if (!mi->filter_chain_matcher) {
                r = fail(&b, "Listener main_internal: filter_chain_matcher: missing");
                goto err;
        }
        r = compile_matcher(&b, mi->filter_chain_matcher, "filter_chain_matcher", 0, &s->matcher);
        if (r < 0)
                goto err;
        s->terminate_digest =
                listener_digest(xds_resources_find(res, XDS_RES_LISTENER, "connect_terminate"));
        r = wp_wds_build(res, &s->wds);
        if (r < 0)
                goto err;
        s->cluster_map = wp_malloc(sizeof(*s->cluster_map));
        if (!s->cluster_map) {
                r = -ENOMEM;
                goto err;
        }
        *s->cluster_map = b.clusters;
        s->res = res;
        wp_free(b.chains.slots);
        *ret = s;
        return 0;

err:
        if (r == -ENOMEM && !b.err)
                b.err = wp_strdup("out of memory");
        s->res = NULL; /* on failure the caller keeps res */
        wp_free(b.clusters.slots);
        wp_free(b.chains.slots);
        snapshot_free(s);
        if (reterr_desc)
                *reterr_desc = b.err;
        else
                wp_free(b.err);
        return r < 0 ? r : -EINVAL;
}

struct wp_cluster *wp_snapshot_cluster(const struct wp_snapshot *s, const char *name)
{
        size_t i;

        if (!s->cluster_map)
                return NULL;
        i = map_get(s->cluster_map, name);
        return i == SIZE_MAX ? NULL : &s->clusters[i];
}

struct wp_snapshot *wp_snapshot_ref(struct wp_snapshot *s)
{
        if (s)
                atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
        return s;
}

static _Atomic bool reaper_on;
static struct wp_snapshot *_Atomic dead_list;

void wp_snapshot_reaper_enable(bool on)
{
        atomic_store(&reaper_on, on);
}

void wp_snapshot_reap(void)
{
        struct wp_snapshot *s = atomic_exchange(&dead_list, NULL);

        while (s) {
                struct wp_snapshot *next = s->next_dead;

                snapshot_free(s);
                s = next;
        }
}

struct wp_snapshot *wp_snapshot_unref(struct wp_snapshot *s)
{
        if (!s || atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel) != 1)
                return NULL;
        if (!atomic_load(&reaper_on)) {
                snapshot_free(s);
                return NULL;
        }
        /* push on the lock-free list; only the reaper pops (all at once), so no ABA */
        s->next_dead = atomic_load(&dead_list);
        while (!atomic_compare_exchange_weak(&dead_list, &s->next_dead, s))
                ;
        return NULL;
}
