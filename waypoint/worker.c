/*
 * A worker: one thread, one loop, one SO_REUSEPORT HBONE listener. Downstream HBONE connections
 * and their tunnels live and die here; upstream HBONE connections are pooled per worker by
 * destination (pod IP:15008).
 */
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "hbone/conn.h"
#include "hbone/relay.h"
#include "waypoint/accesslog.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/list.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"
#include "waypoint/daemon.h"
#include "waypoint/metrics.h"
#include "waypoint/l7.h"
#include "waypoint/snapshot.h"
#include "waypoint/wds.h"

#define POOL_BUCKETS 1024

const char *const wp_counter_names[_WP_COUNTER_MAX] = {
        [WP_C_DOWNSTREAM_CX_TOTAL] = "downstream_cx_total",
        [WP_C_DOWNSTREAM_CX_ACTIVE] = "downstream_cx_active",
        [WP_C_DOWNSTREAM_CX_TLS_FAIL] = "downstream_cx_handshake_failed",
        [WP_C_TUNNELS_TOTAL] = "tunnels_total",
        [WP_C_TUNNELS_ACTIVE] = "tunnels_active",
        [WP_C_TUNNELS_ESTABLISHED] = "tunnels_established",
        [WP_C_TUNNEL_NOT_SERVED] = "tunnels_target_not_served",
        [WP_C_TUNNEL_NO_ENDPOINT] = "tunnels_no_healthy_endpoint",
        [WP_C_TUNNEL_UNSUPPORTED] = "tunnels_unsupported_chain",
        [WP_C_TUNNEL_UPSTREAM_FAIL] = "tunnels_upstream_failed",
        [WP_C_BYTES_UP] = "tunnel_bytes_sent_upstream",
        [WP_C_BYTES_DOWN] = "tunnel_bytes_sent_downstream",
        [WP_C_UPSTREAM_CX_TOTAL] = "upstream_cx_total",
        [WP_C_UPSTREAM_CX_ACTIVE] = "upstream_cx_active",
        [WP_C_UPSTREAM_CX_FAIL] = "upstream_cx_connect_failed",
};

struct pool_key {
        struct sockaddr_storage addr;
        socklen_t len;
};

/* One pooled upstream HBONE connection. */
struct pool_conn {
        struct wp_worker *w;
        struct hbone_conn *conn;
        struct pool_key key;
        unsigned bucket;
        struct wp_list link;       /* in the bucket while usable */
        struct wp_list waiting;    /* tunnels waiting for this connection to establish */
        struct wp_list l7_waiting; /* L7 requests (wp_pool_req) waiting for it */
        struct wp_list all;        /* worker's list of every upstream connection */
        struct wp_timer idle;
        bool usable; /* in the bucket */
        bool established;
        unsigned tunnels; /* tunnels using it (opened or waiting) */
};

struct downstream {
        struct wp_worker *w;
        struct hbone_conn *conn;
        struct wp_list link;
        uint64_t id;
};

struct tunnel {
        struct wp_worker *w;
        struct hbone_relay *relay;
        struct wp_snapshot *snap;
        const struct wp_endpoint *ep;
        struct wp_endpoint own_ep; /* passthrough: the original destination */
        struct pool_conn *pc;
        struct wp_list wait_link; /* in pc->waiting */
        uint64_t id;
        uint64_t start_ns;
        char authority[WP_AUTHORITY_MAX];
        /* telemetry: what the CONNECT and the connection said about the source */
        struct sockaddr_storage src;
        /* the peer's URI SAN and the CONNECT's baggage ("" when absent), in one allocation
         * sized to them: an idle tunnel costs what it carries, not fixed maxima */
        char *peer_uri, *baggage;
        struct wp_metrics_tcp *mtcp;
        const char *cluster; /* name of the cluster t->ep belongs to (snapshot-owned) */
        /* access log */
        const struct wp_chain *chainp; /* the chain serving it (snapshot-owned), or NULL */
        struct sockaddr_storage dst;   /* the tunnel's target */
        int64_t start_unix_ns;
        uint64_t conn_id, up_conn_id; /* downstream / upstream HBONE connection ids (0: none) */
        uint64_t up_start_ns;         /* upstream asked for (pool or TCP connect) */
        uint64_t up_ready_ns;         /* upstream established, 200 sent downstream */
        uint64_t al_flags;            /* WP_AL_F(...) */
        const char *al_details;       /* static */
};

struct wp_worker {
        struct wp_runtime *rt;
        unsigned idx;
        pthread_t thread;
        struct wp_loop *loop;
        int listen_fd;
        struct wp_op accept_op;
        struct wp_snapshot *snap;
        uint64_t snap_version;
        struct wp_tls_ctx *server_tls, *client_tls;
        bool draining;
        bool stop;
        bool listeners_stopped; /* admin /drain_listeners seen */
        uint64_t drain_deadline, min_drain_deadline;
        struct wp_list downstreams;
        struct wp_list upstreams;
        struct wp_list buckets[POOL_BUCKETS];
        uint64_t next_id;
        uint64_t rnd;
        _Atomic uint64_t counters[_WP_COUNTER_MAX];
        struct wp_timer drain_timer;
        struct wp_metrics_shard *mshard; /* this worker's metrics shard (plain stores) */
        char al_buf[16384];              /* one access log line being written */
        struct wp_al_queue *alq;         /* stdout/stderr access log lines, to the writer */
        bool alq_failed;                 /* no writer queue: write(2) directly */
};

static void cnt_add(struct wp_worker *w, enum wp_counter c, int64_t d)
{
        uint64_t v = atomic_load_explicit(&w->counters[c], memory_order_relaxed);

        atomic_store_explicit(&w->counters[c], v + (uint64_t)d, memory_order_relaxed);
}

uint64_t wp_worker_counter(const struct wp_worker *w, enum wp_counter c)
{
        return atomic_load_explicit(&((struct wp_worker *)w)->counters[c], memory_order_relaxed);
}

static uint64_t rnd_next(struct wp_worker *w)
{
        /* xorshift64*: load balancing only, not security */
        w->rnd ^= w->rnd >> 12;
        w->rnd ^= w->rnd << 25;
        w->rnd ^= w->rnd >> 27;
        return w->rnd * 0x2545F4914F6CDD1DULL;
}

/* ---- tunnels ---- */

static const struct hbone_relay_ops relay_ops;

/* One user (tunnel or L7 request) of pc is done with it: the last one idles it (or drains it
 * when the worker drains), or frees it when its connection closed earlier. */
static void pool_release(struct wp_worker *w, struct pool_conn *pc)
{
        if (--pc->tunnels != 0)
                return;
        if (!pc->conn)
                wp_free(pc);
        else if (w->draining)
                hbone_conn_drain(pc->conn);
        else if (pc->established)
                wp_timer_arm(w->loop, &pc->idle,
                             wp_now_ns() + w->rt->opts.pool_idle_ms * WP_NSEC_PER_MSEC);
}

static void tunnel_free(struct tunnel *t)
{
        struct wp_worker *w = t->w;

        if (t->pc) {
                struct pool_conn *pc = t->pc;

                if (!wp_list_empty(&t->wait_link))
                        wp_list_del(&t->wait_link);
                t->pc = NULL;
                pool_release(w, pc);
        }
        t->relay = hbone_relay_free(t->relay);
        t->snap = wp_snapshot_unref(t->snap);
        cnt_add(w, WP_C_TUNNELS_ACTIVE, -1);
        wp_free(t->peer_uri);
        wp_free(t);
}

static void format_peer(const struct sockaddr_storage *ss, char *out, size_t cap)
{
        if (hbone_target_format((const struct sockaddr *)ss, out, cap) < 0)
                snprintf(out, cap, "?");
}

/* "ip:port" of the tunnel's downstream peer, for logs. */
static const char *tunnel_peer(const struct tunnel *t, char *out, size_t cap)
{
        format_peer(&t->src, out, cap);
        return out;
}

static const char *tunnel_chain(const struct tunnel *t)
{
        return t->chainp ? t->chainp->name : "?";
}

/* Copies the source's URI SAN and baggage into one allocation (t->peer_uri, t->baggage). */
static int tunnel_set_source(struct tunnel *t, const char *uri, const char *baggage)
{
        size_t nu = uri ? strlen(uri) : 0, nb = baggage ? strlen(baggage) : 0;

        if (nb > 4096)
                nb = 0; /* labels from an oversized baggage are not worth keeping */
        t->peer_uri = wp_malloc(nu + nb + 2);
        if (!t->peer_uri)
                return -ENOMEM;
        memcpy(t->peer_uri, uri ? uri : "", nu);
        t->peer_uri[nu] = '\0';
        t->baggage = t->peer_uri + nu + 1;
        memcpy(t->baggage, baggage ? baggage : "", nb);
        t->baggage[nb] = '\0';
        return 0;
}

static struct wp_mstr mstr(const char *s)
{
        return s ? (struct wp_mstr){s, (uint32_t)strlen(s)} : (struct wp_mstr){NULL, 0};
}

void wp_worker_metric_labels(const struct wp_snapshot *snap, const struct wp_telemetry_peer *p,
                             struct wp_metrics_labels *l, char *principal_buf, size_t cap)
{
        const Istio__Workload__Workload *src, *dst;
        struct wp_service_meta svc;

        if (!snap)
                return;
        src = p->src ? wp_wds_lookup(snap->wds, p->src) : NULL;
        if (src)
                wp_metrics_labels_source_from_workload(l, src);
        else if (p->baggage && p->baggage[0])
                wp_metrics_labels_source_from_baggage(l, p->baggage, strlen(p->baggage));
        if (p->peer_uri)
                wp_metrics_labels_set_source_principal(l, p->peer_uri, strlen(p->peer_uri));
        if (p->dst) {
                dst = wp_wds_lookup(snap->wds, p->dst);
                wp_metrics_labels_destination_from_workload(l, dst);
                if (dst && cap && wp_metrics_workload_principal(dst, principal_buf, cap) > 0)
                        l->v[WP_ML_DESTINATION_PRINCIPAL] = mstr(principal_buf);
        }
        if (p->cluster) {
                wp_cluster_service_meta(snap->res, p->cluster, &svc);
                l->v[WP_ML_DESTINATION_SERVICE] = mstr(svc.host);
                l->v[WP_ML_DESTINATION_SERVICE_NAME] = mstr(svc.name);
                l->v[WP_ML_DESTINATION_SERVICE_NAMESPACE] = mstr(svc.namespace_);
        }
        l->v[WP_ML_CONNECTION_SECURITY_POLICY] = mstr("mutual_tls");
}

struct wp_metrics_shard *wp_worker_mshard(struct wp_worker *w)
{
        return w->mshard;
}

void wp_worker_access_log(struct wp_worker *w, const struct wp_chain *ch, const struct wp_al_ctx *c)
{
        if (!ch)
                return;
        for (size_t i = 0; i < ch->nlogs; i++) {
                int fd = ch->logs[i].fd;
                ssize_t n = wp_al_logger_render(ch->logs[i].logger, c, w->al_buf, sizeof(w->al_buf),
                                                NULL);

                if (n <= 0)
                        continue;
                /* stdout/stderr may be a pipe nobody drains: queue the line for the writer
                 * thread (dropped and counted when the queue is full), never block here.
                 * Files (their fds close with the snapshot) are still written directly. */
                if ((fd == STDOUT_FILENO || fd == STDERR_FILENO) && !w->alq && !w->alq_failed)
                        w->alq_failed = wp_al_queue_new(wp_al_writer_default(), &w->alq) < 0;
                if ((fd == STDOUT_FILENO || fd == STDERR_FILENO) && w->alq)
                        wp_al_queue_push(w->alq, fd, w->al_buf, (size_t)n);
                else if (write(fd, w->al_buf, (size_t)n) < 0)
                        wp_debug("accesslog", "write: %s", strerror(errno));
        }
}

/* istio_tcp_connections_opened_total and friends for an established L4 tunnel, labelled as
 * Envoy's istio.stats labels a waypoint's TCP traffic (wp_worker_metric_labels). */
static void tunnel_metrics_open(struct tunnel *t)
{
        struct wp_metrics_labels l = {0};
        char dst_principal[300];
        struct wp_telemetry_peer p = {
                .src = (const struct sockaddr *)&t->src,
                .peer_uri = t->peer_uri,
                .baggage = t->baggage,
                .dst = t->ep ? (const struct sockaddr *)&t->ep->addr : NULL,
                .cluster = t->cluster,
        };

        if (!t->w->mshard || !t->snap)
                return;
        wp_worker_metric_labels(t->snap, &p, &l, dst_principal, sizeof(dst_principal));
        l.v[WP_ML_REQUEST_PROTOCOL] = mstr("tcp");
        t->mtcp = wp_metrics_tcp_open(t->w->mshard, &l);
}

/* One access log line per tunnel that reached a chain, at its end. */
static void tunnel_access_log(struct tunnel *t, struct hbone_relay *r)
{
        struct wp_al_kv fs = {"envoy.filters.listener.original_dst.local_ip", t->authority};
        struct wp_al_ctx c = {
                .start_unix_ns = t->start_unix_ns,
                .start_ns = t->start_ns,
                .end_ns = wp_now_ns(),
                .bytes_received = hbone_relay_bytes_sent_up(r),
                .bytes_sent = hbone_relay_bytes_sent_down(r),
                .response_flags = t->al_flags,
                .response_code_details = t->al_details,
                .upstream_cluster = t->cluster,
                .downstream_peer_uri_san = t->peer_uri,
                .upstream_host = t->ep ? (const struct sockaddr *)&t->ep->addr : NULL,
                .downstream_local = (const struct sockaddr *)&t->dst,
                .downstream_remote = (const struct sockaddr *)&t->src,
                .filter_state = &fs,
                .n_filter_state = 1,
                .connection_id = t->conn_id,
                .upstream_connection_id = t->up_conn_id,
                .upstream_request_start_ns = t->up_start_ns,
                .upstream_pool_ready_ns = t->up_ready_ns,
                /* a tunnel's upstream carries its payload as is (HBONE DATA or TCP) */
                .upstream_wire_bytes_sent = hbone_relay_bytes_sent_up(r),
                .upstream_wire_bytes_received = hbone_relay_bytes_sent_down(r),
        };

        if (!t->chainp || !t->chainp->nlogs)
                return;
        if (c.end_ns > c.start_ns)
                c.request_end_ns = c.end_ns;
        if (t->dst.ss_family != AF_INET && t->dst.ss_family != AF_INET6)
                c.downstream_local = NULL;
        if (t->src.ss_family != AF_INET && t->src.ss_family != AF_INET6)
                c.downstream_remote = NULL;
        wp_worker_access_log(t->w, t->chainp, &c);
}

static void on_relay_result(struct hbone_relay *r, enum hbone_relay_result res, unsigned status,
                            void *user)
{
        char peer[WP_AUTHORITY_MAX];
        struct tunnel *t = user;

        if (res == HBONE_RELAY_OK) {
                t->up_ready_ns = wp_now_ns();
                cnt_add(t->w, WP_C_TUNNELS_ESTABLISHED, 1);
                tunnel_metrics_open(t);
                wp_debug("tunnel", "[T%lu] %s -> %s via %s: established (%s)", t->id,
                         tunnel_peer(t, peer, sizeof(peer)), t->authority,
                         t->ep ? t->ep->authority : "?", tunnel_chain(t));
                return;
        }
        if (res == HBONE_RELAY_DOWNSTREAM_GONE)
                return;
        if (!t->al_flags && !t->al_details)
                t->al_flags = status == 504 ? WP_AL_F(UT) : WP_AL_F(UF);
        cnt_add(t->w, WP_C_TUNNEL_UPSTREAM_FAIL, 1);
        wp_info("tunnel", "[T%lu] %s -> %s via %s: upstream failed (result %d, status %u)", t->id,
                tunnel_peer(t, peer, sizeof(peer)), t->authority, t->ep ? t->ep->authority : "?",
                (int)res, status);
}

static void on_relay_done(struct hbone_relay *r, void *user)
{
        char peer[WP_AUTHORITY_MAX];
        struct tunnel *t = user;

        if (t->mtcp) {
                /* sent = towards the client, received = from it (Envoy's view) */
                wp_metrics_tcp_bytes(t->mtcp, hbone_relay_bytes_sent_down(r),
                                     hbone_relay_bytes_sent_up(r));
                wp_metrics_tcp_close(t->mtcp);
                t->mtcp = NULL;
        }
        tunnel_access_log(t, r);
        cnt_add(t->w, WP_C_BYTES_UP, (int64_t)hbone_relay_bytes_sent_up(r));
        cnt_add(t->w, WP_C_BYTES_DOWN, (int64_t)hbone_relay_bytes_sent_down(r));
        wp_debug("tunnel", "[T%lu] %s -> %s closed: %lu bytes up, %lu down, %lu ms", t->id,
                 tunnel_peer(t, peer, sizeof(peer)), t->authority,
                 (unsigned long)hbone_relay_bytes_sent_up(r),
                 (unsigned long)hbone_relay_bytes_sent_down(r),
                 (unsigned long)((wp_now_ns() - t->start_ns) / WP_NSEC_PER_MSEC));
        tunnel_free(t);
}

static const struct hbone_relay_ops relay_ops = {
        .on_upstream_result = on_relay_result,
        .on_done = on_relay_done,
};

/* ---- upstream pool ---- */

static const struct hbone_callbacks upstream_cb;
static const struct hbone_conn_ops upstream_ops;

static unsigned key_hash(const struct pool_key *k)
{
        const uint8_t *p = (const uint8_t *)&k->addr;
        uint32_t h = 2166136261u;

        for (socklen_t i = 0; i < k->len; i++)
                h = (h ^ p[i]) * 16777619u;
        return h % POOL_BUCKETS;
}

static void make_key(struct pool_key *k, const struct wp_endpoint *ep, uint16_t port)
{
        memset(k, 0, sizeof(*k));
        memcpy(&k->addr, &ep->addr, ep->addrlen);
        k->len = ep->addrlen;
        if (k->addr.ss_family == AF_INET)
                ((struct sockaddr_in *)&k->addr)->sin_port = htons(port);
        else
                ((struct sockaddr_in6 *)&k->addr)->sin6_port = htons(port);
}

static void pool_unlist(struct pool_conn *pc)
{
        if (pc->usable) {
                wp_list_del(&pc->link);
                pc->usable = false;
        }
}

static void tunnel_open_on(struct tunnel *t, struct pool_conn *pc);
static struct pool_conn *pool_new_conn(struct wp_worker *w, const struct pool_key *k);

/* A pooled connection to k with room for one more stream, or one being set up (join its queue),
 * or NULL. */
static struct pool_conn *pool_find(struct wp_worker *w, const struct pool_key *k)
{
        struct wp_list *b = &w->buckets[key_hash(k)];

        for (struct wp_list *it = b->next; it != b; it = it->next) {
                struct pool_conn *c = container_of(it, struct pool_conn, link);

                if (c->key.len != k->len || memcmp(&c->key.addr, &k->addr, k->len) != 0)
                        continue;
                if (!c->conn || hbone_conn_closing(c->conn))
                        continue;
                if (!c->established ||
                    (hbone_conn_session(c->conn) &&
                     hbone_session_streams_available(hbone_conn_session(c->conn)) > 0))
                        return c;
        }
        return NULL;
}

/* Puts the tunnel on a connection to its endpoint, opening one if none has room. */
static void pool_attach(struct wp_worker *w, struct tunnel *t)
{
        struct pool_key k;
        struct pool_conn *pc;

        make_key(&k, t->ep, t->snap->hbone_port);
        pc = pool_find(w, &k);
        if (!pc) {
                pc = pool_new_conn(w, &k);
                if (!pc) {
                        hbone_relay_fail(t->relay, 502, "upstream_refused");
                        return;
                }
        }
        t->pc = pc;
        pc->tunnels++;
        wp_timer_disarm(w->loop, &pc->idle);
        if (pc->established)
                tunnel_open_on(t, pc);
        else
                wp_list_add_tail(&pc->waiting, &t->wait_link);
}

static void tunnel_open_on(struct tunnel *t, struct pool_conn *pc)
{
        int r = hbone_relay_open_hbone(t->relay, pc->conn, t->ep->authority, NULL, 0);

        if (r == -EAGAIN || r == -ENOTCONN) {
                /* full or going away: this connection takes no more; try another */
                pool_unlist(pc);
                pc->tunnels--;
                t->pc = NULL;
                pool_attach(t->w, t);
                return;
        }
        if (r < 0)
                hbone_relay_fail(t->relay, 502, "upstream_refused");
        else
                t->up_conn_id = hbone_conn_id(pc->conn);
}

static void pool_idle_fire(struct wp_timer *tm)
{
        struct pool_conn *pc = container_of(tm, struct pool_conn, idle);

        if (pc->tunnels == 0)
                hbone_conn_drain(pc->conn);
}

static uint32_t t_snap_timeout(const struct wp_worker *w)
{
        return w->snap ? w->snap->connect_timeout_ms : 10000;
}

static struct pool_conn *pool_new_conn(struct wp_worker *w, const struct pool_key *k)
{
        struct pool_conn *pc = wp_calloc(1, sizeof(*pc));
        struct hbone_conn_config cfg;
        const struct wp_options *o = &w->rt->opts;
        int r;

        if (!pc)
                return NULL;
        pc->w = w;
        pc->key = *k;
        wp_list_init(&pc->waiting);
        wp_list_init(&pc->l7_waiting);
        wp_list_init(&pc->link);
        pc->idle.on_fire = pool_idle_fire;
        cfg = (struct hbone_conn_config){
                .loop = w->loop,
                .tls_ctx = w->client_tls,
                .lim = &o->lim,
                .cb = &upstream_cb,
                .ops = &upstream_ops,
                .user = pc,
                .handshake_timeout_ms = o->handshake_timeout_ms,
                .connect_timeout_ms =
                        o->connect_timeout_ms ? o->connect_timeout_ms : t_snap_timeout(w),
                .id = ++w->next_id,
        };
        r = hbone_conn_connect(&cfg, (const struct sockaddr *)&k->addr, k->len, &pc->conn);
        if (r < 0) {
                wp_free(pc);
                cnt_add(w, WP_C_UPSTREAM_CX_FAIL, 1);
                return NULL;
        }
        pc->bucket = key_hash(k);
        wp_list_add_tail(&w->buckets[pc->bucket], &pc->link);
        pc->usable = true;
        wp_list_add_tail(&w->upstreams, &pc->all);
        cnt_add(w, WP_C_UPSTREAM_CX_TOTAL, 1);
        cnt_add(w, WP_C_UPSTREAM_CX_ACTIVE, 1);
        return pc;
}

static void upstream_established(struct hbone_conn *c, void *user)
{
        struct pool_conn *pc = user;

        pc->established = true;
        wp_debug("upstream", "[C%lu] established, peer %s", (unsigned long)hbone_conn_id(c),
                 hbone_conn_peer_uri(c));
        while (!wp_list_empty(&pc->waiting)) {
                struct tunnel *t = container_of(pc->waiting.next, struct tunnel, wait_link);

                wp_list_del(&t->wait_link);
                tunnel_open_on(t, pc);
        }
        while (!wp_list_empty(&pc->l7_waiting)) {
                struct wp_pool_req *pr =
                        container_of(pc->l7_waiting.next, struct wp_pool_req, link);

                wp_list_del(&pr->link);
                pr->waiting = false;
                pr->on_ready(pr, pc->conn, 0);
        }
}

static void upstream_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        struct pool_conn *pc = user;
        struct wp_worker *w = pc->w;
        bool timeout = err == -ETIMEDOUT;

        pool_unlist(pc);
        if (!pc->established) {
                cnt_add(w, WP_C_UPSTREAM_CX_FAIL, 1);
                wp_info("upstream", "[C%lu] connection failed: %s", (unsigned long)hbone_conn_id(c),
                        why);
        } else {
                wp_debug("upstream", "[C%lu] closed: %s", (unsigned long)hbone_conn_id(c), why);
        }
        while (!wp_list_empty(&pc->waiting)) {
                struct tunnel *t = container_of(pc->waiting.next, struct tunnel, wait_link);

                wp_list_del(&t->wait_link);
                t->pc = NULL;
                pc->tunnels--;
                hbone_relay_fail(t->relay, timeout ? 504 : 502,
                                 timeout ? "upstream_timeout" : "upstream_refused");
        }
        while (!wp_list_empty(&pc->l7_waiting)) {
                struct wp_pool_req *pr =
                        container_of(pc->l7_waiting.next, struct wp_pool_req, link);

                wp_list_del(&pr->link);
                pr->waiting = false;
                pr->pc = NULL;
                pc->tunnels--;
                pr->on_ready(pr, NULL, timeout ? -ETIMEDOUT : -ECONNREFUSED);
        }
        /* tunnels that had streams on it were told through on_tunnel_close; detach them */
        pc->conn = NULL;
        wp_timer_disarm(w->loop, &pc->idle);
        wp_list_del(&pc->all);
        cnt_add(w, WP_C_UPSTREAM_CX_ACTIVE, -1);
        hbone_conn_free(c);
        if (pc->tunnels == 0)
                wp_free(pc);
        else
                pc->established = false; /* freed by the last tunnel: see tunnel_free */
}

static int upstream_on_request(struct hbone_session *s, struct hbone_stream *st,
                               const struct hbone_request *req, void *session_user)
{
        return -EPROTO; /* a server must not open streams towards us */
}

static void upstream_on_goaway(struct hbone_session *s, uint32_t err, void *session_user)
{
        struct pool_conn *pc = hbone_conn_user(session_user);

        pool_unlist(pc); /* never reused */
}

static const struct hbone_callbacks upstream_cb = {
        .on_tunnel_request = upstream_on_request,
        .on_tunnel_response = wp_l7_cb_on_response,
        .on_tunnel_data = wp_l7_cb_on_data,
        .on_tunnel_eof = wp_l7_cb_on_eof,
        .on_tunnel_writable = wp_l7_cb_on_writable,
        .on_tunnel_close = wp_l7_cb_on_close,
        .on_goaway = upstream_on_goaway,
};

static const struct hbone_conn_ops upstream_ops = {
        .on_established = upstream_established,
        .on_closed = upstream_closed,
};

/* ---- upstream pool access for L7 (l7.h) ---- */

int wp_worker_pool_get(struct wp_worker *w, const struct sockaddr_storage *addr, socklen_t len,
                       uint16_t hbone_port, struct wp_pool_req *pr)
{
        struct wp_endpoint ep = {.addrlen = len};
        struct pool_key k;
        struct pool_conn *pc;

        memcpy(&ep.addr, addr, len);
        make_key(&k, &ep, hbone_port);
        pc = pool_find(w, &k);
        if (!pc)
                pc = pool_new_conn(w, &k);
        if (!pc)
                return -ECONNREFUSED;
        pr->pc = pc;
        pc->tunnels++;
        wp_timer_disarm(w->loop, &pc->idle);
        if (pc->established)
                return 1;
        pr->waiting = true;
        wp_list_add_tail(&pc->l7_waiting, &pr->link);
        return 0;
}

struct hbone_conn *wp_worker_pool_conn(const struct wp_pool_req *pr)
{
        return pr->pc ? ((struct pool_conn *)pr->pc)->conn : NULL;
}

void wp_worker_pool_put(struct wp_worker *w, struct wp_pool_req *pr)
{
        struct pool_conn *pc = pr->pc;

        if (!pc)
                return;
        if (pr->waiting) {
                wp_list_del(&pr->link);
                pr->waiting = false;
        }
        pr->pc = NULL;
        pool_release(w, pc);
}

void wp_worker_pool_full(struct wp_worker *w, struct wp_pool_req *pr)
{
        if (pr->pc)
                pool_unlist(pr->pc);
        wp_worker_pool_put(w, pr);
}

/* A tunnel to an HTTP chain: l7.c serves it (no relay). */
static int l7_take(struct wp_worker *w, struct hbone_conn *conn, struct hbone_stream *st,
                   const struct hbone_request *req, const struct wp_chain *chain)
{
        const struct wp_options *o = &w->rt->opts;
        struct wp_l7_start ls = {
                .w = w,
                .loop = w->loop,
                .conn = conn,
                .st = st,
                .req = req,
                .snap = w->snap,
                .chain = chain,
                .id = ++w->next_id,
                .pool_idle_ms = o->pool_idle_ms,
                .connect_timeout_ms = o->connect_timeout_ms,
                .sniff_ms = o->sniff_ms,
        };

        cnt_add(w, WP_C_TUNNELS_TOTAL, 1); /* a sniffed tunnel counts here, whichever path */
        if (!chain)
                return wp_l7_sniff_start(&ls);
        return wp_l7_tunnel_start(&ls);
}

/* ---- downstream ---- */

/* Starts an L4 tunnel on st: the relay, then the chain's endpoint. answered: the CONNECT got its
 * 200 already (the tunnel was sniffed first), so failures reset the stream instead of answering.
 * chain: known already (sniffed), or NULL to look it up from dst. */
static int tunnel_begin(struct wp_worker *w, struct hbone_conn *conn, struct hbone_stream *st,
                        const char *authority, const struct sockaddr *dst, socklen_t dstlen,
                        const char *baggage, bool answered, const struct wp_chain *chain)
{
        char peer[WP_AUTHORITY_MAX];
        const struct wp_options *o = &w->rt->opts;
        struct hbone_relay_config rcfg;
        struct tunnel *t;
        int r;

        t = wp_calloc(1, sizeof(*t));
        if (!t)
                return -ENOMEM;
        t->w = w;
        t->id = ++w->next_id;
        t->start_ns = wp_now_ns();
        t->start_unix_ns = wp_unix_now_ns();
        if (dst && dstlen <= sizeof(t->dst))
                memcpy(&t->dst, dst, dstlen);
        wp_list_init(&t->wait_link);
        snprintf(t->authority, sizeof(t->authority), "%s", authority);
        t->src = *hbone_conn_peer_addr(conn);
        t->conn_id = hbone_conn_id(conn);
        if (tunnel_set_source(t, hbone_conn_peer_uri(conn), baggage) < 0) {
                wp_free(t);
                return -ENOMEM;
        }
        rcfg = (struct hbone_relay_config){
                .loop = w->loop,
                .ops = &relay_ops,
                .user = t,
                .connect_timeout_ms = o->connect_timeout_ms ? o->connect_timeout_ms
                                      : w->snap             ? w->snap->connect_timeout_ms
                                                            : 10000,
                .error_header = "x-waypoint-error",
        };
        r = hbone_relay_new(&rcfg, conn, st, answered, &t->relay);
        if (r < 0) {
                wp_free(t->peer_uri);
                wp_free(t);
                return r;
        }
        t->snap = wp_snapshot_ref(w->snap);
        if (!answered) /* a sniffed tunnel was counted when it arrived */
                cnt_add(w, WP_C_TUNNELS_TOTAL, 1);
        cnt_add(w, WP_C_TUNNELS_ACTIVE, 1);
        if (!t->snap) {
                /* no config yet: refuse rather than mis-route */
                hbone_relay_fail(t->relay, 503, "not_ready");
                return 0;
        }

        if (!chain && dst)
                chain = wp_snapshot_lookup(t->snap, dst);
        if (!chain) {
                cnt_add(w, WP_C_TUNNEL_NOT_SERVED, 1);
                wp_info("tunnel", "[T%lu] %s (%s) -> %s: target not served by this waypoint", t->id,
                        tunnel_peer(t, peer, sizeof(peer)), hbone_conn_peer_uri(conn),
                        t->authority);
                hbone_relay_fail(t->relay, 404, "target_not_served");
                return 0;
        }
        t->chainp = chain;
        if (chain->kind == WP_CHAIN_UNSUPPORTED) {
                t->al_details = "unsupported_chain";
                cnt_add(w, WP_C_TUNNEL_UNSUPPORTED, 1);
                wp_info("tunnel", "[T%lu] -> %s: chain %s needs %s, not supported yet", t->id,
                        t->authority, chain->name, chain->unsupported);
                hbone_relay_fail(t->relay, 501, "unsupported_chain");
                return 0;
        }
        if (chain->kind == WP_CHAIN_PASSTHROUGH) {
                /* workload-addressed: the destination itself, through its ztunnel */
                memcpy(&t->own_ep.addr, dst, dstlen);
                t->own_ep.addrlen = dstlen;
                hbone_target_format((const struct sockaddr *)&t->own_ep.addr, t->own_ep.authority,
                                    sizeof(t->own_ep.authority));
                t->own_ep.hbone = true;
                t->own_ep.healthy = true;
                t->ep = &t->own_ep;
        } else {
                t->ep = wp_chain_pick(chain, rnd_next(w));
                for (size_t i = 0; t->ep && i < chain->nclusters; i++) {
                        const struct wp_cluster *c = chain->clusters[i].cluster;

                        if (t->ep >= c->eps && t->ep < c->eps + c->neps)
                                t->cluster = c->name;
                }
        }
        if (!t->ep) {
                t->al_flags |= WP_AL_F(UH);
                cnt_add(w, WP_C_TUNNEL_NO_ENDPOINT, 1);
                wp_info("tunnel", "[T%lu] -> %s: no healthy endpoint in %s", t->id, t->authority,
                        chain->name);
                hbone_relay_fail(t->relay, 503, "no_healthy_endpoint");
                return 0;
        }
        t->up_start_ns = wp_now_ns();
        if (t->ep->hbone) {
                pool_attach(w, t);
        } else {
                r = hbone_relay_connect_tcp(t->relay, (const struct sockaddr *)&t->ep->addr,
                                            t->ep->addrlen);
                if (r < 0)
                        hbone_relay_fail(t->relay, 502, "upstream_refused");
        }
        return 0;
}

int wp_worker_tunnel_adopt(struct wp_worker *w, struct hbone_conn *conn, struct hbone_stream *st,
                           const char *authority, const struct sockaddr_storage *dst,
                           const char *baggage, const struct wp_chain *chain, const uint8_t *data,
                           size_t len, bool eof)
{
        socklen_t dl = dst->ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                  : sizeof(struct sockaddr_in);
        int r = tunnel_begin(w, conn, st, authority, (const struct sockaddr *)dst, dl,
                             baggage && baggage[0] ? baggage : NULL, true, chain);
        void *su;

        if (r < 0)
                return r;
        /* what the client sent while it was sniffed goes first; its credit was never returned */
        su = hbone_stream_get_user(st);
        if (su && len)
                hbone_relay_on_data(st, data, len, su);
        su = hbone_stream_get_user(st);
        if (su && eof)
                hbone_relay_on_eof(st, su);
        return 0;
}

static int downstream_on_request(struct hbone_session *s, struct hbone_stream *st,
                                 const struct hbone_request *req, void *session_user)
{
        struct hbone_conn *conn = session_user;
        struct downstream *d = hbone_conn_user(conn);
        struct wp_worker *w = d->w;

        if (w->snap && req->target.is_ip) {
                bool sniff = false;
                const struct wp_chain *hc = wp_snapshot_lookup_proto(
                        w->snap, (const struct sockaddr *)&req->target.addr, NULL, &sniff);

                if (sniff || (hc && hc->kind == WP_CHAIN_HTTP))
                        return l7_take(w, conn, st, req, sniff ? NULL : hc);
        }
        return tunnel_begin(w, conn, st, req->authority,
                            req->target.is_ip ? (const struct sockaddr *)&req->target.addr : NULL,
                            req->target.is_ip ? req->target.addrlen : 0, req->baggage, false, NULL);
}

static void downstream_on_goaway(struct hbone_session *s, uint32_t err, void *session_user)
{
}

static const struct hbone_callbacks downstream_cb = {
        .on_tunnel_request = downstream_on_request,
        .on_tunnel_response = wp_l7_cb_on_response,
        .on_tunnel_data = wp_l7_cb_on_data,
        .on_tunnel_eof = wp_l7_cb_on_eof,
        .on_tunnel_writable = wp_l7_cb_on_writable,
        .on_tunnel_close = wp_l7_cb_on_close,
        .on_goaway = downstream_on_goaway,
};

static void downstream_established(struct hbone_conn *c, void *user)
{
        struct downstream *d = user;
        char peer[64];

        format_peer(hbone_conn_peer_addr(c), peer, sizeof(peer));
        wp_debug("downstream", "[C%lu] %s: established, peer identity %s", (unsigned long)d->id,
                 peer, hbone_conn_peer_uri(c));
        if (d->w->draining || d->w->listeners_stopped)
                hbone_conn_drain(c);
}

static void downstream_closed(struct hbone_conn *c, int err, const char *why, void *user)
{
        struct downstream *d = user;
        struct wp_worker *w = d->w;
        char peer[64];

        format_peer(hbone_conn_peer_addr(c), peer, sizeof(peer));
        if (!hbone_conn_peer_uri(c) && err) {
                cnt_add(w, WP_C_DOWNSTREAM_CX_TLS_FAIL, 1);
                wp_info("downstream", "[C%lu] %s: closed before established: %s",
                        (unsigned long)d->id, peer, why);
        } else {
                wp_debug("downstream", "[C%lu] %s: closed: %s", (unsigned long)d->id, peer, why);
        }
        wp_list_del(&d->link);
        cnt_add(w, WP_C_DOWNSTREAM_CX_ACTIVE, -1);
        hbone_conn_free(c);
        wp_free(d);
}

static const struct hbone_conn_ops downstream_ops = {
        .on_established = downstream_established,
        .on_closed = downstream_closed,
};

static void arm_accept(struct wp_worker *w)
{
        if (w->listen_fd >= 0 && !w->draining && !w->listeners_stopped)
                wp_loop_accept(w->loop, &w->accept_op, w->listen_fd);
}

static void on_accept(struct wp_op *op, int res)
{
        struct wp_worker *w = container_of(op, struct wp_worker, accept_op);
        const struct wp_options *o = &w->rt->opts;
        struct hbone_conn_config cfg;
        struct downstream *d;

        if (res < 0) {
                if (res != -ECANCELED && res != -EAGAIN && res != -EINTR)
                        wp_warn("worker", "accept: %s", strerror(-res));
                if (res == -EMFILE || res == -ENFILE) {
                        /* out of descriptors: back off rather than spin */
                        usleep(10000);
                }
                arm_accept(w);
                return;
        }
        if (w->draining || w->listeners_stopped || !w->server_tls) {
                close(res);
                return;
        }
        d = wp_calloc(1, sizeof(*d));
        if (!d) {
                close(res);
                arm_accept(w);
                return;
        }
        d->w = w;
        d->id = ++w->next_id;
        cfg = (struct hbone_conn_config){
                .loop = w->loop,
                .tls_ctx = w->server_tls,
                .lim = &o->lim,
                .cb = &downstream_cb,
                .ops = &downstream_ops,
                .user = d,
                .handshake_timeout_ms = o->handshake_timeout_ms,
                .id = d->id,
        };
        if (hbone_conn_accept(&cfg, res, &d->conn) < 0) {
                wp_free(d);
        } else {
                wp_list_add_tail(&w->downstreams, &d->link);
                cnt_add(w, WP_C_DOWNSTREAM_CX_TOTAL, 1);
                cnt_add(w, WP_C_DOWNSTREAM_CX_ACTIVE, 1);
        }
        arm_accept(w);
}

/* ---- the thread ---- */

static void refresh_snapshot(struct wp_worker *w)
{
        struct wp_runtime *rt = w->rt;
        uint64_t v = atomic_load_explicit(&rt->snap_version, memory_order_acquire);
        bool drain_downstreams = false;

        if (v == w->snap_version)
                return;
        pthread_mutex_lock(&rt->snap_lock);
        if (w->snap && rt->current && w->snap->terminate_digest != rt->current->terminate_digest)
                drain_downstreams = true;
        w->snap = wp_snapshot_unref(w->snap);
        w->snap = wp_snapshot_ref(rt->current);
        if (w->server_tls != rt->server_tls) {
                wp_tls_ctx_unref(w->server_tls);
                w->server_tls = wp_tls_ctx_ref(rt->server_tls);
        }
        if (w->client_tls != rt->client_tls) {
                wp_tls_ctx_unref(w->client_tls);
                w->client_tls = wp_tls_ctx_ref(rt->client_tls);
        }
        w->snap_version = v;
        pthread_mutex_unlock(&rt->snap_lock);
        if (drain_downstreams) {
                struct wp_list *it;

                wp_info("worker", "connect_terminate listener changed: draining its connections");
                for (it = w->downstreams.next; it != &w->downstreams; it = it->next)
                        hbone_conn_drain(container_of(it, struct downstream, link)->conn);
        }
}

static void start_drain(struct wp_worker *w)
{
        struct wp_list *it;

        if (w->draining)
                return;
        w->draining = true;
        wp_l7_worker_drain();
        w->drain_deadline = wp_now_ns() + w->rt->opts.drain_ms * WP_NSEC_PER_MSEC;
        w->min_drain_deadline = wp_now_ns() + w->rt->opts.min_drain_ms * WP_NSEC_PER_MSEC;
        wp_loop_cancel(w->loop, &w->accept_op);
        for (it = w->downstreams.next; it != &w->downstreams; it = it->next)
                hbone_conn_drain(container_of(it, struct downstream, link)->conn);
        for (it = w->upstreams.next; it != &w->upstreams; it = it->next) {
                struct pool_conn *pc = container_of(it, struct pool_conn, all);

                if (pc->tunnels == 0 && pc->conn)
                        hbone_conn_drain(pc->conn);
        }
}

static void close_everything(struct wp_worker *w)
{
        wp_l7_worker_drain();
        while (!wp_list_empty(&w->downstreams)) {
                struct downstream *d = container_of(w->downstreams.next, struct downstream, link);

                if (hbone_conn_closing(d->conn))
                        break;
                hbone_conn_close(d->conn, -ECANCELED, "drain deadline");
        }
        for (struct wp_list *it = w->upstreams.next; it != &w->upstreams; it = it->next) {
                struct pool_conn *pc = container_of(it, struct pool_conn, all);

                if (pc->conn && !hbone_conn_closing(pc->conn))
                        hbone_conn_close(pc->conn, -ECANCELED, "drain deadline");
        }
}

/* admin /drain_listeners: no new connections (the listener closes once the accept op is
 * back, so connects are refused rather than queued), GOAWAY on the downstream ones; their
 * tunnels go on. Unlike start_drain nothing is forced closed and the worker keeps running. */
static void stop_listeners(struct wp_worker *w)
{
        struct wp_list *it;

        if (!w->listeners_stopped) {
                w->listeners_stopped = true;
                wp_loop_cancel(w->loop, &w->accept_op);
                for (it = w->downstreams.next; it != &w->downstreams; it = it->next)
                        hbone_conn_drain(container_of(it, struct downstream, link)->conn);
        }
        if (w->listen_fd >= 0 && !wp_op_inflight(&w->accept_op)) {
                close(w->listen_fd);
                w->listen_fd = -1;
        }
}

static void on_wake(void *arg)
{
        (void)arg;
}

static void *worker_main(void *arg)
{
        struct wp_worker *w = arg;
        struct wp_runtime *rt = w->rt;
        bool forced = false;

        arm_accept(w);
        for (;;) {
                refresh_snapshot(w);
                if (atomic_load(&rt->listeners_stopped) && w->listen_fd >= 0)
                        stop_listeners(w);
                if (atomic_load(&rt->draining) && !w->draining)
                        start_drain(w);
                if (w->draining) {
                        /* refuse new connections outright (not just stop accepting: the
                         * kernel would still queue them on a listening socket) */
                        if (w->listen_fd >= 0 && !wp_op_inflight(&w->accept_op)) {
                                close(w->listen_fd);
                                w->listen_fd = -1;
                        }
                        bool idle = wp_list_empty(&w->downstreams) &&
                                    wp_list_empty(&w->upstreams) && !wp_op_inflight(&w->accept_op);

                        uint64_t now = wp_now_ns();

                        /* pilot-agent's semantics: with EXIT_ON_ZERO_ACTIVE_CONNECTIONS leave
                         * once idle (but not before MINIMUM_DRAIN_DURATION); without it stay
                         * for the whole terminationDrainDuration */
                        if (idle && (w->rt->opts.exit_on_zero ? now >= w->min_drain_deadline
                                                              : now >= w->drain_deadline))
                                break;
                        if (!forced && wp_now_ns() >= w->drain_deadline) {
                                forced = true;
                                close_everything(w);
                        }
                        /* idle pooled connections go as soon as their last tunnel ends */
                        for (struct wp_list *it = w->upstreams.next; it != &w->upstreams;
                             it = it->next) {
                                struct pool_conn *pc = container_of(it, struct pool_conn, all);

                                if (pc->tunnels == 0 && pc->conn)
                                        hbone_conn_drain(pc->conn);
                        }
                }
                if (wp_loop_run_once(w->loop, 200 * WP_NSEC_PER_MSEC) < 0)
                        break;
        }
        wp_l7_worker_done();
        return NULL;
}

static int open_listener(const struct wp_addr *a, int *ret_fd)
{
        int fd, one = 1;

        fd = socket(a->ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
                return -errno;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one));
        if (bind(fd, (const struct sockaddr *)&a->ss, a->len) < 0 || listen(fd, 1024) < 0) {
                int r = -errno;

                close(fd);
                return r;
        }
        *ret_fd = fd;
        return 0;
}

int wp_worker_start(struct wp_runtime *rt, unsigned idx, struct wp_worker **ret,
                    const char **reterr_desc)
{
        struct wp_worker *w;
        const char *note = NULL;
        int r;

        w = wp_calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->rt = rt;
        w->idx = idx;
        w->listen_fd = -1;
        w->rnd = 0x9E3779B97F4A7C15ULL ^ ((uint64_t)idx << 32) ^ wp_now_ns();
        wp_list_init(&w->downstreams);
        wp_list_init(&w->upstreams);
        for (unsigned i = 0; i < POOL_BUCKETS; i++)
                wp_list_init(&w->buckets[i]);
        wp_op_init(&w->accept_op, on_accept);
        r = wp_loop_new(rt->opts.io_backend, 4096, &w->loop, &note);
        if (r < 0) {
                *reterr_desc = note ? note : "cannot create the event loop";
                goto err_free;
        }
        if (idx == 0) {
                rt->backend = wp_loop_backend(w->loop);
                rt->backend_note = note;
        }
        wp_loop_set_wake(w->loop, on_wake, w);
        r = open_listener(&rt->opts.hbone_addr, &w->listen_fd);
        if (r < 0) {
                *reterr_desc = "cannot listen on the HBONE address";
                goto err_loop;
        }
        w->mshard = rt->metrics ? wp_metrics_shard(rt->metrics, idx) : NULL;
        refresh_snapshot(w);
        r = -pthread_create(&w->thread, NULL, worker_main, w);
        if (r < 0) {
                *reterr_desc = "cannot start the worker thread";
                goto err_listen;
        }
        *ret = w;
        return 0;

err_listen:
        close(w->listen_fd);
err_loop:
        wp_loop_free(w->loop);
err_free:
        wp_free(w);
        return r;
}

void wp_worker_wake(struct wp_worker *w)
{
        wp_loop_wake(w->loop);
}

void wp_worker_join(struct wp_worker *w)
{
        pthread_join(w->thread, NULL);
        /* let cancelled ops complete before freeing */
        for (int i = 0; i < 100 && wp_loop_inflight(w->loop) > 0; i++)
                wp_loop_run_once(w->loop, 10 * WP_NSEC_PER_MSEC);
        if (w->listen_fd >= 0)
                close(w->listen_fd);
        w->snap = wp_snapshot_unref(w->snap);
        wp_tls_ctx_unref(w->server_tls);
        wp_tls_ctx_unref(w->client_tls);
        w->loop = wp_loop_free(w->loop);
}
