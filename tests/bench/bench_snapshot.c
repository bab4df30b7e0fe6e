/*
 * Snapshot benchmark (issue 3): time and memory to compile and publish a snapshot of
 * N services x P ports x E endpoints (default 1000 x 3 x 10), and of a one-endpoint change on
 * top of it; and the cost of wp_snapshot_lookup at that size.
 *
 * Resources are generated in memory, shaped as istiod generates them for a waypoint (the
 * TCP service of tests/data/istiod-waypoint-bookinfo.json, mongodb): per service-port an EDS
 * Cluster, a ClusterLoadAssignment with E HBONE endpoints (envoy_internal_address to
 * connect_originate + original_dst metadata) and a filter chain (istio.stats + tcp_proxy) in
 * Listener main_internal, whose filter_chain_matcher is an IPMatcher with one /32 range per
 * service VIP leading to an exact port map naming the chain. connect_originate, encap and
 * main_internal Clusters and the connect_originate / connect_terminate Listeners are taken
 * verbatim from the fixture.
 *
 * Two paths are measured:
 *   ads:    DeltaDiscoveryResponses (CDS, EDS, LDS, WDS empty) fed to xds_ads_on_message, the
 *           requests drained as a client would; on_update = wp_snapshot_build + publish (swap the
 *           published pointer, unref the previous). Time from the first response to the
 *           published snapshot; then a delta EDS response changing one endpoint of one CLA.
 *   direct: xds_resources unpacked from the same bytes (timed apart), wp_snapshot_build only.
 * Memory: peak RSS growth (VmHWM after resetting it through /proc/self/clear_refs; getrusage
 * ru_maxrss when that is not possible) and, outside sanitizer builds, peak and retained heap
 * bytes counted by interposing malloc.
 *
 * Usage: bench_snapshot [-s services] [-p ports] [-e endpoints] [-r repeats]
 *                       [-f fixture.json] [-m markdown-out] [-l lookups]
 * Prints a markdown table (also written to -m). Exit status 1 when a result is wrong (the
 * published snapshot does not route a VIP:port to its chain, or the changed endpoint is not
 * what the new snapshot holds).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/snapshot.h"
#include "xds-client/ads.h"
#include "xds-client/resources.h"

/* ---- heap accounting (malloc interposition; not with sanitizers, which own malloc) ---- */

#if defined(__SANITIZE_ADDRESS__)
#define HEAP_TRACK 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define HEAP_TRACK 0
#endif
#endif
#ifndef HEAP_TRACK
#define HEAP_TRACK 1
#endif

static size_t heap_live, heap_peak;
static long heap_chunks; /* live allocations */

#if HEAP_TRACK
extern void *__libc_malloc(size_t n);
extern void *__libc_calloc(size_t m, size_t n);
extern void *__libc_realloc(void *p, size_t n);
extern void *__libc_memalign(size_t a, size_t n);
extern void __libc_free(void *p);

static inline void heap_add(void *p)
{
        if (p) {
                heap_chunks++;
                heap_live += malloc_usable_size(p);
                if (heap_live > heap_peak)
                        heap_peak = heap_live;
        }
}

static inline void heap_sub(void *p)
{
        if (p) {
                heap_chunks--;
                heap_live -= malloc_usable_size(p);
        }
}

void *malloc(size_t n)
{
        void *p = __libc_malloc(n);

        heap_add(p);
        return p;
}

void *calloc(size_t m, size_t n)
{
        void *p = __libc_calloc(m, n);

        heap_add(p);
        return p;
}

void *realloc(void *p, size_t n)
{
        size_t old = p ? malloc_usable_size(p) : 0;
        void *q = __libc_realloc(p, n);

        if (q || n == 0) {
                heap_live -= old;
                heap_chunks -= p != NULL;
                heap_add(q);
        }
        return q;
}

void free(void *p)
{
        heap_sub(p);
        __libc_free(p);
}

void *memalign(size_t a, size_t n)
{
        void *p = __libc_memalign(a, n);

        heap_add(p);
        return p;
}

void *aligned_alloc(size_t a, size_t n)
{
        return memalign(a, n);
}

int posix_memalign(void **ret, size_t a, size_t n)
{
        void *p = memalign(a, n);

        if (!p)
                return ENOMEM;
        *ret = p;
        return 0;
}
#endif

/* ---- small helpers ---- */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        fprintf(stderr, "bench_snapshot: ");
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fputc('\n', stderr);
        exit(2);
}

static double now_ms(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_MONOTONIC, &ts);
        return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static long status_kib(const char *key)
{
        char line[256];
        size_t kl = strlen(key);
        long v = -1;
        FILE *f = fopen("/proc/self/status", "r");

        if (!f)
                return -1;
        while (fgets(line, sizeof(line), f))
                if (!strncmp(line, key, kl) && line[kl] == ':') {
                        v = strtol(line + kl + 1, NULL, 10);
                        break;
                }
        fclose(f);
        return v;
}

/* Peak-RSS meter: reset VmHWM to the current RSS when the kernel allows it (clear_refs 5). */
struct rss_meter {
        bool hwm;
        long base_kib;
};

static void rss_start(struct rss_meter *m)
{
        int fd = open("/proc/self/clear_refs", O_WRONLY | O_CLOEXEC);
        struct rusage ru;

        m->hwm = fd >= 0 && write(fd, "5", 1) == 1;
        if (fd >= 0)
                close(fd);
        if (m->hwm) {
                m->base_kib = status_kib("VmRSS");
                m->hwm = m->base_kib >= 0 && status_kib("VmHWM") >= 0;
        }
        if (!m->hwm) {
                getrusage(RUSAGE_SELF, &ru);
                m->base_kib = ru.ru_maxrss;
        }
}

static double rss_peak_mib(const struct rss_meter *m)
{
        struct rusage ru;
        long now;

        if (m->hwm) {
                now = status_kib("VmHWM");
        } else {
                getrusage(RUSAGE_SELF, &ru);
                now = ru.ru_maxrss;
        }
        return (now - m->base_kib) / 1024.0;
}

struct heap_meter {
        size_t base;
};

static void heap_start(struct heap_meter *m)
{
        m->base = heap_live;
        heap_peak = heap_live;
}

static double heap_peak_mib(const struct heap_meter *m)
{
        return HEAP_TRACK ? (double)(heap_peak - m->base) / (1024.0 * 1024.0) : -1;
}

static double heap_now_mib(const struct heap_meter *m)
{
        return HEAP_TRACK ? ((double)heap_live - (double)m->base) / (1024.0 * 1024.0) : -1;
}

struct sbuf {
        char *p;
        size_t len, cap;
};

static void sb_printf(struct sbuf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sb_printf(struct sbuf *b, const char *fmt, ...)
{
        va_list ap;
        int n;

        for (;;) {
                va_start(ap, fmt);
                n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
                va_end(ap);
                if (n < 0)
                        die("vsnprintf");
                if ((size_t)n < b->cap - b->len)
                        break;
                b->cap = (b->cap + (size_t)n + 1) * 2;
                b->p = realloc(b->p, b->cap);
                if (!b->p)
                        die("out of memory");
        }
        b->len += (size_t)n;
}

/* ---- resource generation ---- */

struct packed {
        char *name;
        uint8_t *data;
        size_t len;
};

struct plist {
        struct packed *v;
        size_t n, cap;
};

static struct packed pack_msg(const char *name, const ProtobufCMessage *m)
{
        struct packed p;

        p.name = strdup(name);
        p.len = protobuf_c_message_get_packed_size(m);
        p.data = malloc(p.len ? p.len : 1);
        if (!p.name || !p.data)
                die("out of memory");
        protobuf_c_message_pack(m, p.data);
        return p;
}

static void plist_add(struct plist *l, struct packed p)
{
        if (l->n == l->cap) {
                l->cap = l->cap ? l->cap * 2 : 64;
                l->v = realloc(l->v, l->cap * sizeof(*l->v));
                if (!l->v)
                        die("out of memory");
        }
        l->v[l->n++] = p;
}

static void plist_clear(struct plist *l)
{
        for (size_t i = 0; i < l->n; i++) {
                free(l->v[i].name);
                free(l->v[i].data);
        }
        free(l->v);
        *l = (struct plist){0};
}

/* JSON text -> message of desc -> packed bytes */
static struct packed pack_json(const ProtobufCMessageDescriptor *desc, const char *name,
                               const char *json, size_t len)
{
        struct json_object *obj;
        ProtobufCMessage *m;
        const char *err = NULL;
        struct packed p;

        if (xds_json_parse(json, len, &obj, &err) < 0)
                die("generated JSON for %s does not parse: %s", name, err ? err : "?");
        if (xds_pbjson_decode(desc, obj, 0, name, &m, &err) < 0)
                die("generated %s %s does not decode: %s", desc->short_name, name,
                    err ? err : "?");
        json_object_put(obj);
        p = pack_msg(name, m);
        xds_pbjson_message_free(m);
        return p;
}

struct shape {
        unsigned nsvc, nport, nep;
};

#define NS "bench"
#define INPUT_PREFIX "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3."

static void svc_vip(unsigned s, char *buf, size_t cap)
{
        snprintf(buf, cap, "10.%u.%u.%u", 96 + (s + 1) / 65536, ((s + 1) / 256) % 256,
                 (s + 1) % 256);
}

static uint16_t svc_port(unsigned p)
{
        return (uint16_t)(8000 + p);
}

static void svc_host(unsigned s, char *buf, size_t cap)
{
        snprintf(buf, cap, "svc-%u." NS ".svc.cluster.local", s);
}

static void cluster_name(unsigned s, unsigned p, char *buf, size_t cap)
{
        char host[128];

        svc_host(s, host, sizeof(host));
        snprintf(buf, cap, "inbound-vip|%u|tcp|%s", svc_port(p), host);
}

/* the pod address of endpoint e of service s (gen: bumps the address of a "changed" pod) */
static void pod_addr(const struct shape *sh, unsigned s, unsigned e, unsigned gen, char *buf,
                     size_t cap)
{
        unsigned i = (s * sh->nep + e) + gen * 0x100000u;

        snprintf(buf, cap, "10.%u.%u.%u", 128 + i / 65536, (i / 256) % 256, i % 256);
}

static struct packed gen_cluster(unsigned s, unsigned p)
{
        char name[256], host[128], json[4096];
        int n;

        cluster_name(s, p, name, sizeof(name));
        svc_host(s, host, sizeof(host));
        n = snprintf(json, sizeof(json),
                     "{\"name\":\"%s\",\"alt_stat_name\":\"%s;\",\"type\":\"EDS\","
                     "\"connect_timeout\":\"10s\",\"lb_policy\":\"LEAST_REQUEST\","
                     "\"circuit_breakers\":{\"thresholds\":[{\"max_connections\":4294967295,"
                     "\"max_pending_requests\":4294967295,\"max_requests\":4294967295,"
                     "\"max_retries\":4294967295,\"track_remaining\":true}]},"
                     "\"common_lb_config\":{},"
                     "\"eds_cluster_config\":{\"eds_config\":{\"ads\":{},"
                     "\"initial_fetch_timeout\":\"0s\",\"resource_api_version\":\"V3\"},"
                     "\"service_name\":\"%s\"},"
                     "\"metadata\":{\"filter_metadata\":{\"istio\":{\"services\":[{\"host\":\"%s\","
                     "\"name\":\"svc-%u\",\"namespace\":\"" NS "\"}]}}},"
                     "\"transport_socket\":{\"name\":\"internal_upstream\",\"typed_config\":{"
                     "\"@type\":\"type.googleapis.com/envoy.extensions.transport_sockets."
                     "internal_upstream.v3.InternalUpstreamTransport\","
                     "\"passthrough_metadata\":[{\"kind\":{\"host\":{}},"
                     "\"name\":\"envoy.filters.listener.original_dst\"},"
                     "{\"kind\":{\"host\":{}},\"name\":\"istio\"}],"
                     "\"transport_socket\":{\"name\":\"raw_buffer\",\"typed_config\":{"
                     "\"@type\":\"type.googleapis.com/envoy.extensions.transport_sockets."
                     "raw_buffer.v3.RawBuffer\"}}}}}",
                     name, name, name, host, s);
        if (n < 0 || (size_t)n >= sizeof(json))
                die("cluster JSON too long");
        return pack_json(&envoy__config__cluster__v3__cluster__descriptor, name, json,
                         (size_t)n);
}

/* changed: the endpoint index whose pod moved (its address uses generation 1), or -1 */
static struct packed gen_cla(const struct shape *sh, unsigned s, unsigned p, int changed)
{
        struct sbuf b = {0};
        char name[256], ip[32];
        struct packed r;

        cluster_name(s, p, name, sizeof(name));
        sb_printf(&b, "{\"cluster_name\":\"%s\",\"endpoints\":[{\"locality\":{},"
                      "\"load_balancing_weight\":1,\"lb_endpoints\":[",
                  name);
        for (unsigned e = 0; e < sh->nep; e++) {
                pod_addr(sh, s, e, (int)e == changed, ip, sizeof(ip));
                sb_printf(&b,
                          "%s{\"endpoint\":{\"address\":{\"envoy_internal_address\":{"
                          "\"endpoint_id\":\"%s:%u\",\"server_listener_name\":\"connect_originate\"}}},"
                          "\"health_status\":\"HEALTHY\",\"load_balancing_weight\":1,"
                          "\"metadata\":{\"filter_metadata\":{"
                          "\"envoy.filters.listener.original_dst\":{\"local\":\"%s:%u\"},"
                          "\"istio\":{\"workload\":\"svc-%u-%u;" NS ";svc-%u;v1;Kubernetes\"}}}}",
                          e ? "," : "", ip, svc_port(p), ip, svc_port(p), s, e, s);
        }
        sb_printf(&b, "]}]}");
        r = pack_json(&envoy__config__endpoint__v3__cluster_load_assignment__descriptor, name,
                      b.p, b.len);
        free(b.p);
        return r;
}

static struct packed gen_main_internal(const struct shape *sh)
{
        struct sbuf b = {0};
        char name[256], vip[32];
        struct packed r;

        sb_printf(&b, "{\"name\":\"main_internal\",\"traffic_direction\":\"INBOUND\","
                      "\"internal_listener\":{},\"listener_filters\":[{"
                      "\"name\":\"envoy.filters.listener.original_dst\",\"typed_config\":{"
                      "\"@type\":\"type.googleapis.com/envoy.extensions.filters.listener."
                      "original_dst.v3.OriginalDst\"}}],"
                      "\"filter_chain_matcher\":{\"matcher_tree\":{\"input\":{\"name\":\"ip\","
                      "\"typed_config\":{\"@type\":\"" INPUT_PREFIX "DestinationIPInput\"}},"
                      "\"custom_match\":{\"name\":\"ip\",\"typed_config\":{"
                      "\"@type\":\"type.googleapis.com/xds.type.matcher.v3.IPMatcher\","
                      "\"range_matchers\":[");
        for (unsigned s = 0; s < sh->nsvc; s++) {
                svc_vip(s, vip, sizeof(vip));
                sb_printf(&b, "%s{\"ranges\":[{\"address_prefix\":\"%s\",\"prefix_len\":32}],"
                              "\"on_match\":{\"matcher\":{\"matcher_tree\":{\"input\":{"
                              "\"name\":\"port\",\"typed_config\":{\"@type\":\"" INPUT_PREFIX
                              "DestinationPortInput\"}},\"exact_match_map\":{\"map\":{",
                          s ? "," : "", vip);
                for (unsigned p = 0; p < sh->nport; p++) {
                        cluster_name(s, p, name, sizeof(name));
                        sb_printf(&b, "%s\"%u\":{\"action\":{\"name\":\"%s\",\"typed_config\":{"
                                      "\"@type\":\"type.googleapis.com/google.protobuf.StringValue\","
                                      "\"value\":\"%s\"}}}",
                                  p ? "," : "", svc_port(p), name, name);
                }
                sb_printf(&b, "}}}}}}");
        }
        /* what matches no service: the passthrough chain */
        sb_printf(&b, "]}}},\"on_no_match\":{\"action\":{\"name\":\"direct-tcp\",\"typed_config\":{"
                      "\"@type\":\"type.googleapis.com/google.protobuf.StringValue\","
                      "\"value\":\"direct-tcp\"}}}},\"filter_chains\":[");
        for (unsigned s = 0; s < sh->nsvc; s++)
                for (unsigned p = 0; p < sh->nport; p++) {
                        cluster_name(s, p, name, sizeof(name));
                        sb_printf(&b, "{\"name\":\"%s\",\"filters\":[{\"name\":\"istio.stats\","
                                      "\"typed_config\":{\"@type\":\"type.googleapis.com/stats.PluginConfig\","
                                      "\"disable_host_header_fallback\":true,\"reporter\":\"SERVER_GATEWAY\"}},"
                                      "{\"name\":\"envoy.filters.network.tcp_proxy\",\"typed_config\":{"
                                      "\"@type\":\"type.googleapis.com/envoy.extensions.filters.network."
                                      "tcp_proxy.v3.TcpProxy\",\"cluster\":\"%s\",\"stat_prefix\":\"%s\"}}]},",
                                  name, name, name);
                }
        sb_printf(&b, "{\"name\":\"direct-tcp\",\"filters\":[{\"name\":\"istio.stats\","
                      "\"typed_config\":{\"@type\":\"type.googleapis.com/stats.PluginConfig\","
                      "\"disable_host_header_fallback\":true,\"reporter\":\"SERVER_GATEWAY\"}},"
                      "{\"name\":\"envoy.filters.network.tcp_proxy\",\"typed_config\":{"
                      "\"@type\":\"type.googleapis.com/envoy.extensions.filters.network."
                      "tcp_proxy.v3.TcpProxy\",\"cluster\":\"encap\",\"stat_prefix\":\"encap\"}}]}]}");
        r = pack_json(&envoy__config__listener__v3__listener__descriptor, "main_internal", b.p,
                      b.len);
        free(b.p);
        return r;
}

struct gen {
        struct shape sh;
        struct plist cds, eds, lds;
        struct packed cla_changed; /* the CLA of (svc 0, port 0) with endpoint 0 moved */
};

static void take_fixture(struct plist *l, struct xds_resources *fx, enum xds_resource_type t,
                         const char *name)
{
        ProtobufCMessage *m = xds_resources_find(fx, t, name);

        if (!m)
                die("fixture has no %s %s", xds_resource_type_url(t), name);
        plist_add(l, pack_msg(name, m));
}

static void generate(struct gen *g, const char *fixture)
{
        struct xds_resources *fx;
        const char *err = NULL;

        if (xds_resources_load_file(fixture, &fx, &err) < 0)
                die("%s", err ? err : fixture);
        take_fixture(&g->cds, fx, XDS_RES_CLUSTER, "connect_originate");
        take_fixture(&g->cds, fx, XDS_RES_CLUSTER, "encap");
        take_fixture(&g->cds, fx, XDS_RES_CLUSTER, "main_internal");
        take_fixture(&g->lds, fx, XDS_RES_LISTENER, "connect_originate");
        take_fixture(&g->lds, fx, XDS_RES_LISTENER, "connect_terminate");
        xds_resources_free(fx);
        for (unsigned s = 0; s < g->sh.nsvc; s++)
                for (unsigned p = 0; p < g->sh.nport; p++) {
                        plist_add(&g->cds, gen_cluster(s, p));
                        plist_add(&g->eds, gen_cla(&g->sh, s, p, -1));
                }
        plist_add(&g->lds, gen_main_internal(&g->sh));
        g->cla_changed = gen_cla(&g->sh, 0, 0, 0);
}

/* A serialized DeltaDiscoveryResponse of type_url carrying items (version ver). */
static uint8_t *delta_response(const char *type_url, const struct packed *items, size_t n,
                               const char *ver, const char *nonce, size_t *ret_len)
{
        Envoy__Service__Discovery__V3__DeltaDiscoveryResponse d;
        Envoy__Service__Discovery__V3__Resource *rv = calloc(n ? n : 1, sizeof(*rv));
        Envoy__Service__Discovery__V3__Resource **rp = calloc(n ? n : 1, sizeof(*rp));
        Google__Protobuf__Any *av = calloc(n ? n : 1, sizeof(*av));
        uint8_t *out;

        if (!rv || !rp || !av)
                die("out of memory");
        envoy__service__discovery__v3__delta_discovery_response__init(&d);
        for (size_t i = 0; i < n; i++) {
                envoy__service__discovery__v3__resource__init(&rv[i]);
                google__protobuf__any__init(&av[i]);
                av[i].type_url = (char *)type_url;
                av[i].value.data = items[i].data;
                av[i].value.len = items[i].len;
                rv[i].name = items[i].name;
                rv[i].version = (char *)ver;
                rv[i].resource = &av[i];
                rp[i] = &rv[i];
        }
        d.type_url = (char *)type_url;
        d.nonce = (char *)nonce;
        d.system_version_info = (char *)ver;
        d.n_resources = n;
        d.resources = rp;
        *ret_len = protobuf_c_message_get_packed_size(&d.base);
        out = malloc(*ret_len ? *ret_len : 1);
        if (!out)
                die("out of memory");
        protobuf_c_message_pack(&d.base, out);
        free(rv);
        free(rp);
        free(av);
        return out;
}

struct msg {
        uint8_t *data;
        size_t len;
};

/* ---- checks on a published snapshot ---- */

static int check_snapshot(const struct gen *g, const struct wp_snapshot *s, bool changed)
{
        char name[256], ip[32], want[64];
        struct sockaddr_in sin = {.sin_family = AF_INET};
        unsigned probes[][2] = {{0, 0}, {g->sh.nsvc - 1, g->sh.nport - 1},
                                {g->sh.nsvc / 2, g->sh.nport / 2}};

        for (size_t i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
                unsigned sv = probes[i][0], pt = probes[i][1];
                const struct wp_chain *ch;

                svc_vip(sv, ip, sizeof(ip));
                inet_pton(AF_INET, ip, &sin.sin_addr);
                sin.sin_port = htons(svc_port(pt));
                cluster_name(sv, pt, name, sizeof(name));
                ch = wp_snapshot_lookup(s, (struct sockaddr *)&sin);
                if (!ch || strcmp(ch->name, name) != 0 || ch->kind != WP_CHAIN_TCP ||
                    ch->nclusters != 1 || ch->clusters[0].cluster->neps != g->sh.nep) {
                        fprintf(stderr, "bench_snapshot: %s:%u routes to %s, want %s with %u endpoints\n",
                                ip, svc_port(pt), ch ? ch->name : "(nothing)", name, g->sh.nep);
                        return -1;
                }
        }
        /* svc 0 port 0, endpoint 0: the changed pod after the update */
        {
                const struct wp_chain *ch;

                svc_vip(0, ip, sizeof(ip));
                inet_pton(AF_INET, ip, &sin.sin_addr);
                sin.sin_port = htons(svc_port(0));
                ch = wp_snapshot_lookup(s, (struct sockaddr *)&sin);
                pod_addr(&g->sh, 0, 0, changed, ip, sizeof(ip));
                snprintf(want, sizeof(want), "%s:%u", ip, svc_port(0));
                if (strcmp(ch->clusters[0].cluster->eps[0].authority, want) != 0 ||
                    !ch->clusters[0].cluster->eps[0].hbone) {
                        fprintf(stderr, "bench_snapshot: endpoint 0 is %s, want HBONE %s\n",
                                ch->clusters[0].cluster->eps[0].authority, want);
                        return -1;
                }
        }
        /* a VIP nobody serves: the passthrough chain */
        inet_pton(AF_INET, "192.0.2.1", &sin.sin_addr);
        {
                const struct wp_chain *ch = wp_snapshot_lookup(s, (struct sockaddr *)&sin);

                if (!ch || ch->kind != WP_CHAIN_PASSTHROUGH) {
                        fprintf(stderr, "bench_snapshot: unknown VIP not passed through\n");
                        return -1;
                }
        }
        return 0;
}

/* ---- the ADS path ---- */

struct pub {
        struct wp_snapshot *_Atomic cur;
        unsigned updates;
        char *last_err;
        double build_ms, free_ms; /* of the last on_update: compile, unref of the previous */
};

static int on_update(struct xds_resources *res, char **reterr_desc, void *user)
{
        struct pub *p = user;
        struct wp_snapshot *s, *old;
        double t0 = now_ms(), t1;
        int r;

        r = wp_snapshot_build(res, &s, reterr_desc);
        t1 = now_ms();
        p->build_ms = t1 - t0;
        if (r < 0) {
                xds_resources_free(res); /* on_update owns res in both cases */
                free(p->last_err);
                p->last_err = strdup(*reterr_desc ? *reterr_desc : "?");
                return r;
        }
        old = atomic_exchange(&p->cur, s);
        wp_snapshot_unref(old);
        p->free_ms = now_ms() - t1;
        p->updates++;
        return 0;
}

static void drain(struct xds_ads *a)
{
        const uint8_t *body;
        ssize_t n;

        while ((n = xds_ads_next_request(a, &body)) > 0)
                ;
        if (n < 0)
                die("xds_ads_next_request: %zd", n);
}

static void feed(struct xds_ads *a, const struct msg *m)
{
        int r = xds_ads_on_message(a, m->data, m->len);

        if (r < 0)
                die("xds_ads_on_message: %d", r);
        drain(a);
}

/* ---- results ---- */

enum metric {
        M_ADS_INIT_MS,
        M_ADS_INIT_BUILD_MS,
        M_ADS_INIT_RSS,
        M_ADS_INIT_HEAP,
        M_ADS_HELD,
        M_ADS_CHG_MS,
        M_ADS_CHG_BUILD_MS,
        M_ADS_CHG_FREE_MS,
        M_ADS_CHG_HEAP,
        M_DIRECT_UNPACK_MS,
        M_DIRECT_BUILD_MS,
        M_DIRECT_BUILD_HEAP,
        M_SNAP_HELD,
        M_SNAP_FREE_COMPILED_MS,
        M_SNAP_FREE_RES_MS,
        M_DIRECT_CHG_MS,
        M_LOOKUP_NS,
        M_COUNT
};

static const struct {
        const char *label, *unit;
} metric_info[M_COUNT] = {
        [M_ADS_INIT_MS] = {"ADS: first response → snapshot published", "ms"},
        [M_ADS_INIT_BUILD_MS] = {"ADS: … of which wp_snapshot_build in on_update", "ms"},
        [M_ADS_INIT_RSS] = {"ADS: peak RSS growth during initial sync", "MiB"},
        [M_ADS_INIT_HEAP] = {"ADS: peak heap growth during initial sync", "MiB"},
        [M_ADS_HELD] = {"ADS: heap held after sync (ADS state + snapshot)", "MiB"},
        [M_ADS_CHG_MS] = {"ADS: one-endpoint EDS delta → new snapshot published", "ms"},
        [M_ADS_CHG_BUILD_MS] = {"ADS: … of which wp_snapshot_build in on_update", "ms"},
        [M_ADS_CHG_FREE_MS] = {"ADS: … of which freeing the previous snapshot", "ms"},
        [M_ADS_CHG_HEAP] = {"ADS: peak heap growth during the change", "MiB"},
        [M_DIRECT_UNPACK_MS] = {"direct: unpack resources (xds_resources from bytes)", "ms"},
        [M_DIRECT_BUILD_MS] = {"direct: wp_snapshot_build (compile only)", "ms"},
        [M_DIRECT_BUILD_HEAP] = {"direct: peak heap growth of the compile", "MiB"},
        [M_SNAP_HELD] = {"direct: heap held by a snapshot (with its resources)", "MiB"},
        [M_SNAP_FREE_COMPILED_MS] = {"direct: free a snapshot, compiled part", "ms"},
        [M_SNAP_FREE_RES_MS] = {"direct: free a snapshot, its xds_resources (protobuf messages)", "ms"},
        [M_DIRECT_CHG_MS] = {"direct: wp_snapshot_build with one endpoint changed", "ms"},
        [M_LOOKUP_NS] = {"wp_snapshot_lookup, random service VIP:port", "ns"},
};

static int cmp_double(const void *a, const void *b)
{
        double x = *(const double *)a, y = *(const double *)b;

        return x < y ? -1 : x > y;
}

static struct xds_resources *unpack_all(const struct gen *g, bool changed)
{
        struct xds_resources *res;
        const char *err = NULL;
        const struct {
                const char *url;
                const struct plist *l;
        } sets[] = {{XDS_TYPE_URL_CLUSTER, &g->cds},
                    {XDS_TYPE_URL_CLA, &g->eds},
                    {XDS_TYPE_URL_LISTENER, &g->lds}};

        if (xds_resources_new(&res) < 0)
                die("out of memory");
        for (size_t k = 0; k < 3; k++)
                for (size_t i = 0; i < sets[k].l->n; i++) {
                        const struct packed *p = &sets[k].l->v[i];

                        if (changed && sets[k].l == &g->eds && i == 0)
                                p = &g->cla_changed;
                        if (xds_resources_add_packed(res, sets[k].url, p->name, p->data, p->len,
                                                     &err) < 0)
                                die("unpack %s: %s", p->name, err ? err : "?");
                }
        return res;
}

int main(int argc, char **argv)
{
        struct gen g = {.sh = {1000, 3, 10}};
        const char *fixture = "tests/data/istiod-waypoint-bookinfo.json", *mdout = NULL;
        unsigned reps = 5, nlookups = 1u << 20;
        double res[M_COUNT][64];
        struct msg cds, eds, lds, wds, chg;
        struct sbuf md = {0};
        long snap_chunks = 0, res_chunks = 0;
        int opt, bad = 0;

        while ((opt = getopt(argc, argv, "s:p:e:r:f:m:l:")) != -1) {
                switch (opt) {
                case 's': g.sh.nsvc = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'p': g.sh.nport = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'e': g.sh.nep = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'r': reps = (unsigned)strtoul(optarg, NULL, 10); break;
                case 'f': fixture = optarg; break;
                case 'm': mdout = optarg; break;
                case 'l': nlookups = (unsigned)strtoul(optarg, NULL, 10); break;
                default:
                        fprintf(stderr, "usage: %s [-s services] [-p ports] [-e endpoints] "
                                        "[-r repeats] [-f fixture] [-m out.md] [-l lookups]\n",
                                argv[0]);
                        return 2;
                }
        }
        if (!g.sh.nsvc || g.sh.nsvc > 60000 || !g.sh.nport || g.sh.nport > 100 || !g.sh.nep ||
            g.sh.nep > 1000 || !reps || reps > 64 || !nlookups)
                die("sizes out of range (services 1..60000, ports 1..100, endpoints 1..1000, "
                    "repeats 1..64)");

        fprintf(stderr, "generating %u services x %u ports x %u endpoints...\n", g.sh.nsvc,
                g.sh.nport, g.sh.nep);
        generate(&g, fixture);
        cds.data = delta_response(XDS_TYPE_URL_CLUSTER, g.cds.v, g.cds.n, "1", "c1", &cds.len);
        eds.data = delta_response(XDS_TYPE_URL_CLA, g.eds.v, g.eds.n, "1", "e1", &eds.len);
        lds.data = delta_response(XDS_TYPE_URL_LISTENER, g.lds.v, g.lds.n, "1", "l1", &lds.len);
        wds.data = delta_response(XDS_TYPE_URL_ADDRESS, NULL, 0, "1", "w1", &wds.len);
        chg.data = delta_response(XDS_TYPE_URL_CLA, &g.cla_changed, 1, "2", "e2", &chg.len);

        /* lookup probes */
        struct sockaddr_in *probes = calloc(nlookups, sizeof(*probes));
        uint64_t seed = 0x9e3779b97f4a7c15ULL;

        if (!probes)
                die("out of memory");
        for (unsigned i = 0; i < nlookups; i++) {
                char ip[32];

                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                svc_vip((unsigned)(seed % g.sh.nsvc), ip, sizeof(ip));
                probes[i].sin_family = AF_INET;
                inet_pton(AF_INET, ip, &probes[i].sin_addr);
                probes[i].sin_port = htons(svc_port((unsigned)((seed >> 32) % g.sh.nport)));
        }

        for (unsigned rep = 0; rep < reps; rep++) {
                struct xds_ads_config cfg = {.delta = true,
                                             .node_id = "waypoint~10.0.0.9~bench-waypoint-0.bench~bench.svc.cluster.local",
                                             .node_cluster = "bench-waypoint.bench",
                                             .on_update = on_update};
                struct pub pub = {0};
                struct xds_ads *a;
                struct rss_meter rm;
                struct heap_meter hm, hm0;
                struct wp_snapshot *s;
                struct xds_resources *r;
                char *err = NULL;
                double t0;

                /* -- ADS -- */
                cfg.user = &pub;
                heap_start(&hm0);
                if (xds_ads_new(&cfg, &a) < 0)
                        die("xds_ads_new");
                drain(a);
                malloc_trim(0); /* give freed memory back so each run's RSS growth is its own */
                rss_start(&rm);
                heap_start(&hm);
                t0 = now_ms();
                feed(a, &cds);
                feed(a, &eds);
                feed(a, &lds);
                feed(a, &wds);
                res[M_ADS_INIT_MS][rep] = now_ms() - t0;
                res[M_ADS_INIT_BUILD_MS][rep] = pub.build_ms;
                res[M_ADS_INIT_RSS][rep] = rss_peak_mib(&rm);
                res[M_ADS_INIT_HEAP][rep] = heap_peak_mib(&hm);
                res[M_ADS_HELD][rep] = heap_now_mib(&hm0);
                if (pub.updates != 1 || !xds_ads_synced(a) || xds_ads_stats(a)->nacks)
                        die("initial sync: %u updates, synced %d, nacks %llu (%s / %s)",
                            pub.updates, xds_ads_synced(a),
                            (unsigned long long)xds_ads_stats(a)->nacks,
                            xds_ads_stats(a)->last_nack, pub.last_err ? pub.last_err : "");
                if (check_snapshot(&g, pub.cur, false) < 0)
                        bad = 1;

                /* lookups on the published snapshot */
                {
                        const struct wp_snapshot *cur = pub.cur;
                        uintptr_t sink = 0;

                        t0 = now_ms();
                        for (unsigned i = 0; i < nlookups; i++)
                                sink += (uintptr_t)wp_snapshot_lookup(cur, (struct sockaddr *)&probes[i]);
                        res[M_LOOKUP_NS][rep] = (now_ms() - t0) * 1e6 / nlookups;
                        if (!sink)
                                bad = 1;
                }

                heap_start(&hm);
                t0 = now_ms();
                feed(a, &chg);
                res[M_ADS_CHG_MS][rep] = now_ms() - t0;
                res[M_ADS_CHG_BUILD_MS][rep] = pub.build_ms;
                res[M_ADS_CHG_FREE_MS][rep] = pub.free_ms;
                res[M_ADS_CHG_HEAP][rep] = heap_peak_mib(&hm);
                if (pub.updates != 2 || xds_ads_stats(a)->nacks)
                        die("endpoint change: %u updates, nacks %llu (%s)", pub.updates,
                            (unsigned long long)xds_ads_stats(a)->nacks,
                            xds_ads_stats(a)->last_nack);
                if (check_snapshot(&g, pub.cur, true) < 0)
                        bad = 1;
                wp_snapshot_unref(pub.cur);
                xds_ads_free(a);
                free(pub.last_err);

                /* -- direct -- */
                t0 = now_ms();
                r = unpack_all(&g, false);
                res[M_DIRECT_UNPACK_MS][rep] = now_ms() - t0;
                heap_start(&hm);
                t0 = now_ms();
                if (wp_snapshot_build(r, &s, &err) < 0)
                        die("wp_snapshot_build: %s", err ? err : "?");
                res[M_DIRECT_BUILD_MS][rep] = now_ms() - t0;
                res[M_DIRECT_BUILD_HEAP][rep] = heap_peak_mib(&hm);
                if (check_snapshot(&g, s, false) < 0)
                        bad = 1;
                {
                        long c0 = heap_chunks, c1;
                        struct xds_resources *kept = s->res;

                        s->res = NULL; /* free the compiled part first, then the resources */
                        heap_start(&hm);
                        t0 = now_ms();
                        wp_snapshot_unref(s);
                        c1 = heap_chunks;
                        res[M_SNAP_FREE_COMPILED_MS][rep] = now_ms() - t0;
                        t0 = now_ms();
                        xds_resources_free(kept);
                        res[M_SNAP_FREE_RES_MS][rep] = now_ms() - t0;
                        res[M_SNAP_HELD][rep] = -heap_now_mib(&hm);
                        snap_chunks = c0 - c1;
                        res_chunks = c1 - heap_chunks;
                }
                if (!HEAP_TRACK)
                        res[M_SNAP_HELD][rep] = -1;

                r = unpack_all(&g, true);
                t0 = now_ms();
                if (wp_snapshot_build(r, &s, &err) < 0)
                        die("wp_snapshot_build: %s", err ? err : "?");
                res[M_DIRECT_CHG_MS][rep] = now_ms() - t0;
                if (check_snapshot(&g, s, true) < 0)
                        bad = 1;
                wp_snapshot_unref(s);
                fprintf(stderr, "run %u: ads %.1f ms, change %.1f ms, compile %.1f ms, lookup %.0f ns\n",
                        rep + 1, res[M_ADS_INIT_MS][rep], res[M_ADS_CHG_MS][rep],
                        res[M_DIRECT_BUILD_MS][rep], res[M_LOOKUP_NS][rep]);
        }

        /* -- report -- */
        sb_printf(&md, "Snapshot benchmark: %u services × %u ports × %u endpoints "
                       "(%zu Clusters, %zu ClusterLoadAssignments, %zu filter chains, %u "
                       "endpoints); %u runs%s.\n\n",
                  g.sh.nsvc, g.sh.nport, g.sh.nep, g.cds.n, g.eds.n,
                  (size_t)g.sh.nsvc * g.sh.nport + 1, g.sh.nsvc * g.sh.nport * g.sh.nep, reps,
                  HEAP_TRACK ? "" : " (heap figures not available: sanitizer build)");
        sb_printf(&md, "Responses: CDS %.1f MiB, EDS %.1f MiB, LDS %.1f MiB, WDS empty; "
                       "the change: one CLA (%zu bytes).\n\n",
                  cds.len / 1048576.0, eds.len / 1048576.0, lds.len / 1048576.0, chg.len);
        sb_printf(&md, "| measure | median | min | max |\n|---|---:|---:|---:|\n");
        for (int m = 0; m < M_COUNT; m++) {
                double v[64];
                const char *fmt = strcmp(metric_info[m].unit, "ns") == 0 ? "%.0f %s" : "%.1f %s";
                char c[3][48];

                memcpy(v, res[m], reps * sizeof(double));
                qsort(v, reps, sizeof(double), cmp_double);
                if (v[reps - 1] < 0 && !strcmp(metric_info[m].unit, "MiB") &&
                    m != M_ADS_INIT_RSS) {
                        sb_printf(&md, "| %s | n/a | n/a | n/a |\n", metric_info[m].label);
                        continue;
                }
                snprintf(c[0], sizeof(c[0]), fmt, v[reps / 2], metric_info[m].unit);
                snprintf(c[1], sizeof(c[1]), fmt, v[0], metric_info[m].unit);
                snprintf(c[2], sizeof(c[2]), fmt, v[reps - 1], metric_info[m].unit);
                sb_printf(&md, "| %s | %s | %s | %s |\n", metric_info[m].label, c[0], c[1],
                          c[2]);
        }
        {
                struct rusage ru;

                getrusage(RUSAGE_SELF, &ru);
                if (HEAP_TRACK)
                        sb_printf(&md, "\nA snapshot holds %ld heap blocks for its compiled "
                                       "part and %ld for the xds_resources it keeps "
                                       "(config_dump).\n",
                                  snap_chunks, res_chunks);
                sb_printf(&md, "\nProcess peak RSS (ru_maxrss, generator and inputs included): "
                               "%.1f MiB.\n",
                          ru.ru_maxrss / 1024.0);
        }
        fputs(md.p, stdout);
        if (mdout) {
                FILE *f = fopen(mdout, "w");

                if (!f || fputs(md.p, f) < 0 || fclose(f) != 0)
                        die("%s: %s", mdout, strerror(errno));
        }
        free(md.p);
        free(probes);
        free(cds.data);
        free(eds.data);
        free(lds.data);
        free(wds.data);
        free(chg.data);
        plist_clear(&g.cds);
        plist_clear(&g.eds);
        plist_clear(&g.lds);
        free(g.cla_changed.name);
        free(g.cla_changed.data);
        if (bad)
                fprintf(stderr, "bench_snapshot: WRONG RESULTS (see above)\n");
        return bad;
}
