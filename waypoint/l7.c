/*
 * HTTP/1.1 inside HBONE tunnels (see l7.h).
 *
 * One struct l7t per downstream tunnel, one struct l7up per upstream HTTP/1.1 connection (a
 * CONNECT stream on a pooled HBONE connection, or a TCP socket). A request goes through:
 *   head parsed -> filters -> route -> endpoint pick -> upstream acquired (idle one reused, or a
 *   new one) -> head + body streamed up -> response parsed, mutated, streamed down -> the
 *   upstream connection goes back to the idle list when both messages ended cleanly.
 *
 * Flow control: bytes received from the downstream stay in t->rx (credit withheld) until the
 * parser consumed them and their body bytes were accepted upstream; response bytes are only
 * parsed while the downstream send queue (t->dq) is empty. Memory per direction is bounded by
 * the HTTP/2 windows (HBONE) or by reading from a TCP upstream only when its buffer is drained.
 */
#include "waypoint/l7.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "filters/filter.h"
#include "hbone/relay.h"
#include "waypoint/accesslog.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/list.h"
#include "waypoint/base/log.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"
#include "waypoint/http1.h"
#include "waypoint/lb.h"
#include "waypoint/metrics.h"
#include "waypoint/router.h"
#include "waypoint/snapshot.h"

#define L7_RETRY_BUFFER (64 * 1024) /* request bytes kept for retries */
#define L7_UP_TXQ_HIGH  (64 * 1024) /* stop reading the downstream body above this */
#define L7_TCP_RBUF     (16 * 1024)
#define L7_MAX_IDLE     256          /* idle upstream connections per worker */
#define L7_ROUTE_BUF    8192         /* rewritten path / Location */
#define L7_HEAD_MAX     (256 * 1024) /* a serialized head */

enum { OBJ_TUNNEL = 1, OBJ_UP = 2 };

struct l7obj {
        int kind;
};

#define TAG(p)       ((void *)((uintptr_t)(p) | 1u))
#define IS_TAGGED(p) (((uintptr_t)(p)&1u) != 0)
#define UNTAG(p)     ((struct l7obj *)((uintptr_t)(p) & ~(uintptr_t)1u))

struct dbuf {
        uint8_t *p;
        size_t off, len, cap;
};


struct l7t;

/* An upstream HTTP/1.1 connection. */
struct l7up {
        struct l7obj obj;
        struct wp_worker *w;
        struct wp_loop *loop;
        struct l7t *owner; /* NULL while idle */
        char key[WP_AUTHORITY_MAX + 2];
        bool hbone;
        bool ready;  /* connected (TCP) / CONNECT answered 200 (HBONE) */
        bool dead;   /* failed or closed: never reused */
        bool eof_in; /* upstream half-closed */
        bool idle;
        struct wp_h1_parser *parser; /* responses */
        struct dbuf rx;              /* received, not parsed yet */
        struct dbuf txq;             /* to send */
        struct wp_list idle_link;
        struct wp_timer idle_timer;
        uint64_t idle_ns;
        /* HBONE */
        struct wp_pool_req pr;
        struct hbone_stream *st;
        struct hbone_conn *conn;
        struct sockaddr_storage pod;
        socklen_t podlen;
        uint16_t hbone_port;
        /* TCP */
        int fd;
        struct wp_op connect_op, recv_op, send_op;
        struct sockaddr_storage addr;
        socklen_t addrlen;
        uint8_t *rbuf;
        struct dbuf sbuf; /* being sent (stable while send_op is in flight) */
        bool closing;
        struct wp_timer connect_timer;
};

enum l7_state {
        S_IDLE,     /* waiting for a request head */
        S_REQ,      /* a request is being served */
        S_DISCARD,  /* local reply sent: reading and dropping the rest of the request body */
        S_UPGRADED, /* raw bytes both ways */
        S_CLOSING,  /* no more requests: the stream ends once the queue drains */
};

struct l7t {
        struct l7obj obj;
        struct wp_worker *w;
        struct wp_loop *loop;
        struct hbone_conn *conn;
        struct hbone_stream *down; /* NULL once closed */
        struct wp_snapshot *snap;
        const struct wp_chain *chain;
        const struct wp_http_conf *http;
        uint64_t id;
        uint32_t pool_idle_ms, connect_timeout_ms;
        const char *peer_principal;
        struct sockaddr_storage src, dst;
        char target[WP_AUTHORITY_MAX];
        enum l7_state state;
        struct wp_h1_parser *parser; /* requests */
        struct dbuf rx;              /* received from the downstream, not consumed */
        struct dbuf dq;              /* to the downstream, not accepted by the stream yet */
        struct dbuf scratch;         /* serialization */
        bool eof_in;                 /* downstream END_STREAM */
        bool shut;                   /* our END_STREAM sent */
        bool in_process;
        bool again;
        /* current request */
        struct wp_route_result res;
        char route_buf[L7_ROUTE_BUF];
        char path_copy[L7_ROUTE_BUF];
        char host_copy[256];
        char request_id[40];
        void *filter_state;
        size_t filter_state_size;
        struct flt_stream *fstreams;
        bool filters_ran;
        struct wp_cluster *cluster;
        const struct wp_endpoint *ep;
        struct wp_endpoint own_ep;
        int ep_idx;
        struct wp_lb_state *lbst;
        struct l7up *up;
        struct dbuf head; /* serialized upstream request head */
        struct dbuf copy; /* request body sent so far (retries), while copy_ok */
        bool copy_ok;
        bool req_done; /* the downstream request was read completely */
        bool req_chunked_up;
        bool resp_started;   /* response head sent downstream */
        bool resp_chunked;   /* chunked towards the downstream */
        bool resp_raw_close; /* body until close towards a 1.0 client */
        bool close_after;    /* close the tunnel after this response */
        bool upgrade_ok;
        bool is_head;
        bool is_upgrade; /* the request asked for an upgrade (parser waits on the answer) */
        unsigned attempts;
        uint64_t rnd;
        struct wp_timer timeout;
        struct wp_timer backoff;
        struct wp_timer per_try;
        struct wp_timer linger; /* after our END_STREAM: reset if the peer never ends its side */
        const char *flag;       /* response flag, for logs */
        unsigned status;        /* status sent downstream, for logs */
        uint64_t start_ns;
        /* telemetry of the current request (t_record) */
        char baggage[512];      /* the CONNECT's baggage (source labels without WDS) */
        int64_t start_unix_ns;
        uint64_t req_wire, resp_wire; /* downstream wire bytes received / sent */
        uint64_t req_body, resp_body; /* body bytes of both */
        uint64_t xflags;              /* WP_AL_F(URX), WP_AL_F(DC) */
        bool req_open;                /* a request is being served and was not recorded yet */
        bool have_head;               /* its head was parsed (else a parse error) */
};

/* ---- per-worker (thread-local) state ---- */

struct l7_tls {
        bool init;
        bool draining;
        struct wp_list idle;
        unsigned nidle;
        uint64_t rnd;
        uint64_t lb_version; /* snapshot version the LB states belong to */
        struct wp_lb_state **lbst;
        size_t nlbst;
};

static __thread struct l7_tls tls;

static struct l7_tls *tls_get(void)
{
        if (!tls.init) {
                uint64_t seed = 0;

                tls.init = true;
                wp_list_init(&tls.idle);
                if (getrandom(&seed, sizeof(seed), 0) != (ssize_t)sizeof(seed))
                        seed = wp_now_ns();
                tls.rnd = seed ^ 0x9E3779B97F4A7C15ULL;
        }
        return &tls;
}

static uint64_t rnd64(void)
{
        return wp_lb_rand(&tls_get()->rnd);
}

static void lbst_reset(struct l7_tls *x)
{
        for (size_t i = 0; i < x->nlbst; i++)
                x->lbst[i] = wp_lb_state_unref(x->lbst[i]);
        wp_free(x->lbst);
        x->lbst = NULL;
        x->nlbst = 0;
}

/* This worker's LB state for cluster c of snapshot s (NULL: pick without state). */
static struct wp_lb_state *lb_state(const struct wp_snapshot *s, const struct wp_cluster *c)
{
        struct l7_tls *x = tls_get();
        size_t i = (size_t)(c - s->clusters);

        if (!c->lb || i >= s->nclusters)
                return NULL;
        if (s->version > x->lb_version) {
                lbst_reset(x);
                x->lb_version = s->version;
        }
        if (s->version != x->lb_version)
                return NULL; /* a tunnel on an older snapshot */
        if (!x->lbst) {
                x->lbst = wp_calloc(s->nclusters ? s->nclusters : 1, sizeof(*x->lbst));
                if (!x->lbst)
                        return NULL;
                x->nlbst = s->nclusters;
        }
        if (!x->lbst[i] && wp_lb_state_new(c->lb, rnd64(), &x->lbst[i]) < 0)
                return NULL;
        return x->lbst[i];
}

/* ---- buffers ---- */

static int dbuf_reserve(struct dbuf *b, size_t n)
{
        if (b->cap - b->off - b->len >= n)
                return 0;
        if (b->off) {
                memmove(b->p, b->p + b->off, b->len);
                b->off = 0;
        }
        if (b->cap - b->len < n) {
                size_t nc = b->cap ? b->cap : 4096;
                uint8_t *p;

                while (nc - b->len < n)
                        nc *= 2;
                p = wp_realloc(b->p, nc);
                if (!p)
                        return -ENOMEM;
                b->p = p;
                b->cap = nc;
        }
        return 0;
}

static int dbuf_append(struct dbuf *b, const void *d, size_t n)
{
        if (!n)
                return 0;
        if (dbuf_reserve(b, n) < 0)
                return -ENOMEM;
        memcpy(b->p + b->off + b->len, d, n);
        b->len += n;
        return 0;
}

static uint8_t *dbuf_data(const struct dbuf *b)
{
        return b->p + b->off;
}

static void dbuf_consume(struct dbuf *b, size_t n)
{
        b->off += n;
        b->len -= n;
        if (!b->len)
                b->off = 0;
}

static void dbuf_clear(struct dbuf *b)
{
        b->off = b->len = 0;
}

static void dbuf_free(struct dbuf *b)
{
        wp_free(b->p);
        *b = (struct dbuf){0};
}

/* Runs a wp_h1_write_* serializer into b, growing it as needed. */
#define DBUF_WRITE(b, call_with_wb, ret)                                                           \
        do {                                                                                       \
                size_t want_ = 1024;                                                               \
                for (;;) {                                                                         \
                        struct wp_buf wb;                                                          \
                        ssize_t n_;                                                                \
                        if (dbuf_reserve((b), want_) < 0) {                                        \
                                (ret) = -ENOMEM;                                                   \
                                break;                                                             \
                        }                                                                          \
                        wp_buf_wrap(&wb, (b)->p + (b)->off + (b)->len,                             \
                                    (b)->cap - (b)->off - (b)->len);                               \
                        n_ = call_with_wb;                                                         \
                        if (n_ == -ENOBUFS && want_ < L7_HEAD_MAX) {                               \
                                want_ *= 4;                                                        \
                                continue;                                                          \
                        }                                                                          \
                        if (n_ >= 0)                                                               \
                                (b)->len += (size_t)n_;                                            \
                        (ret) = n_ < 0 ? (int)n_ : 0;                                              \
                        break;                                                                     \
                }                                                                                  \
        } while (0)

/* ---- forward declarations ---- */

static void t_process(struct l7t *t);
static void t_process_up(struct l7t *t);
static void t_abort(struct l7t *t, uint32_t code);
static void up_release(struct l7up *up, bool reuse);
static void up_close(struct l7up *up);
static int up_send(struct l7up *up, const void *d, size_t n);
static void t_upstream_failed(struct l7t *t, bool connect_failure, const char *why);
static void t_start_attempt(struct l7t *t);

/* ---- downstream output ---- */

static int down_send(struct l7t *t, const void *d, size_t n)
{
        ssize_t w = 0;

        if (!t->down)
                return -EPIPE;
        t->resp_wire += n;
        if (!t->dq.len && n) {
                w = hbone_stream_write(t->down, d, n);
                if (w == -EAGAIN)
                        w = 0;
                if (w < 0)
                        return (int)w;
        }
        if ((size_t)w < n && dbuf_append(&t->dq, (const uint8_t *)d + w, n - (size_t)w) < 0)
                return -ENOMEM;
        hbone_conn_kick(t->conn);
        return 0;
}

/* Pushes t->dq into the stream. Returns true when it is empty. */
static bool down_flush(struct l7t *t)
{
        while (t->dq.len && t->down) {
                ssize_t w = hbone_stream_write(t->down, dbuf_data(&t->dq), t->dq.len);

                if (w == -EAGAIN || w == 0)
                        break;
                if (w < 0) {
                        dbuf_clear(&t->dq);
                        break;
                }
                dbuf_consume(&t->dq, (size_t)w);
                hbone_conn_kick(t->conn);
        }
        return t->dq.len == 0;
}

#define L7_LINGER_MS 5000

static void on_linger(struct wp_timer *tm)
{
        struct l7t *t = container_of(tm, struct l7t, linger);

        if (t->down) {
                hbone_stream_reset(t->down, HBONE_H2_NO_ERROR);
                hbone_conn_kick(t->conn);
        }
}

/* Our END_STREAM once the queue drains; a peer that keeps its side open is reset after
 * L7_LINGER_MS (Envoy's delayed close, for a tunnel). */
static void down_shutdown(struct l7t *t)
{
        if (t->down && !t->shut) {
                t->shut = true;
                hbone_stream_shutdown(t->down);
                hbone_conn_kick(t->conn);
                if (!t->eof_in)
                        wp_timer_arm(t->loop, &t->linger,
                                     wp_now_ns() + L7_LINGER_MS * WP_NSEC_PER_MSEC);
        }
}

/* Credit back to the downstream peer for n bytes consumed from t->rx. */
static void rx_consume(struct l7t *t, size_t n)
{
        dbuf_consume(&t->rx, n);
        if (t->down && n) {
                hbone_stream_consume(t->down, n);
                hbone_conn_kick(t->conn);
        }
}

/* ---- local replies ---- */

static const char *uuid4(char *out)
{
        uint64_t a = rnd64(), b = rnd64();
        uint8_t u[16];

        memcpy(u, &a, 8);
        memcpy(u + 8, &b, 8);
        u[6] = (uint8_t)((u[6] & 0x0f) | 0x40);
        u[8] = (uint8_t)((u[8] & 0x3f) | 0x80);
        snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
                 u[13], u[14], u[15]);
        return out;
}

static int64_t unix_now_ns(void)
{
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Response code details of a local reply's flag (Envoy's ResponseCodeDetails). */
static const char *flag_details(int f)
{
        switch (f) {
        case WP_AL_FLAG_NR:
                return "route_not_found";
        case WP_AL_FLAG_UH:
                return "no_healthy_upstream";
        case WP_AL_FLAG_UF:
                return "upstream_reset_before_response_started{connection_failure}";
        case WP_AL_FLAG_UC:
                return "upstream_reset_before_response_started{connection_termination}";
        case WP_AL_FLAG_UPE:
                return "upstream_reset_before_response_started{protocol_error}";
        case WP_AL_FLAG_UT:
                return "response_timeout";
        case WP_AL_FLAG_NC:
                return "cluster_not_found";
        case WP_AL_FLAG_DPE:
                return "codec_error";
        case WP_AL_FLAG_DC:
                return "downstream_remote_disconnect";
        default:
                return wp_al_flag_name((enum wp_al_flag)f);
        }
}

/* Starts the telemetry of a request (its head, or the bytes that failed to parse). */
static void t_record_begin(struct l7t *t, bool have_head)
{
        t->req_open = true;
        t->have_head = have_head;
        t->start_ns = wp_now_ns();
        t->start_unix_ns = unix_now_ns();
        t->resp_wire = 0;
        t->req_body = 0;
        t->resp_body = 0;
        t->xflags = 0;
}

/*
 * The current request is finished (response sent, local reply, or failure): one observation in
 * the Istio HTTP metrics and one line per matching access log of the chain. Once per request.
 * resp: the response sent downstream, when there is one to show to RESP().
 */
static void t_record(struct l7t *t, const struct wp_http_response *resp)
{
        struct wp_metrics_shard *sh = wp_worker_mshard(t->w);
        const struct wp_http_request *req = t->have_head ? wp_h1_parser_request(t->parser) : NULL;
        uint64_t now = wp_now_ns(), flags = t->xflags;
        const char *details = NULL;
        char flagbuf[128], principal[300], host[256];
        struct wp_al_kv fs = {"envoy.filters.listener.original_dst.local_ip", t->target};
        const struct sockaddr *ep = t->ep ? (const struct sockaddr *)&t->ep->addr : NULL;
        const char *cluster = t->cluster ? t->cluster->name : NULL;

        if (!t->req_open)
                return;
        t->req_open = false;
        if (t->flag) {
                int f = wp_al_flag_parse(t->flag, strlen(t->flag));

                if (f >= 0) {
                        flags |= UINT64_C(1) << f;
                        details = flag_details(f);
                } else {
                        details = t->flag;
                }
        } else if (t->status) {
                details = "via_upstream";
        } else if (flags & WP_AL_F(DC)) {
                details = flag_details(WP_AL_FLAG_DC);
        }
        if (sh) {
                struct wp_metrics_labels l = {0};
                struct wp_telemetry_peer p = {
                    .src = (const struct sockaddr *)&t->src,
                    .peer_uri = t->peer_principal,
                    .baggage = t->baggage,
                    .dst = ep,
                    .cluster = cluster,
                };
                struct wp_metrics_http obs = {
                    .response_code = t->status,
                    .grpc_status = -1,
                    .duration_ms = (now - t->start_ns) / WP_NSEC_PER_MSEC,
                    .request_bytes = t->req_wire,
                    .response_bytes = t->resp_wire,
                };

                wp_worker_metric_labels(t->snap, &p, &l, principal, sizeof(principal));
                if (!l.v[WP_ML_DESTINATION_SERVICE].p && req && req->authority) {
                        /* no service metadata: the request's host, as Envoy */
                        size_t n = strlen(req->authority);
                        const char *colon = strrchr(req->authority, ':');
                        const char *bracket = strrchr(req->authority, ']');

                        if (colon && (!bracket || colon > bracket))
                                n = (size_t)(colon - req->authority);
                        if (n >= sizeof(host))
                                n = sizeof(host) - 1;
                        memcpy(host, req->authority, n);
                        host[n] = 0;
                        l.v[WP_ML_DESTINATION_SERVICE] = (struct wp_mstr){host, (uint32_t)n};
                }
                l.v[WP_ML_REQUEST_PROTOCOL] = (struct wp_mstr){"http", 4};
                wp_al_flags_format(flags, flagbuf, sizeof(flagbuf));
                l.v[WP_ML_RESPONSE_FLAGS] = (struct wp_mstr){flagbuf, (uint32_t)strlen(flagbuf)};
                if (resp) {
                        uint32_t n;
                        const char *g = wp_headers_get(&resp->headers, "grpc-status", &n);

                        if (g && n > 0 && n < 4) {
                                int v = 0;

                                for (uint32_t i = 0; i < n && v >= 0; i++)
                                        v = g[i] >= '0' && g[i] <= '9' ? v * 10 + (g[i] - '0') : -1;
                                obs.grpc_status = v;
                        }
                }
                wp_metrics_record_http(sh, &l, &obs);
        }
        if (t->chain->nlogs) {
                struct wp_al_ctx c = {
                    .start_unix_ns = t->start_unix_ns,
                    .start_ns = t->start_ns,
                    .request_end_ns = t->req_done ? now : 0,
                    .end_ns = now,
                    .bytes_received = t->req_body,
                    .bytes_sent = t->resp_body,
                    .response_flags = flags,
                    .response_code = t->status,
                    .upstream_request_attempt_count = t->attempts,
                    .req = req,
                    .resp = resp,
                    .response_code_details = details,
                    .upstream_cluster = cluster,
                    .route_name = t->res.action != WP_ROUTE_ACTION_NONE ? t->res.route_name : NULL,
                    .downstream_peer_uri_san = t->peer_principal,
                    .upstream_host = ep,
                    .downstream_local = (const struct sockaddr *)&t->dst,
                    .downstream_remote = (const struct sockaddr *)&t->src,
                    .filter_state = &fs,
                    .n_filter_state = 1,
                };

                if (t->src.ss_family != AF_INET && t->src.ss_family != AF_INET6)
                        c.downstream_remote = NULL;
                wp_worker_access_log(t->w, t->chain, &c);
        }
        t->req_wire = 0;
        t->resp_wire = 0;
}

/* Ends the current request's bookkeeping (LB counts, filters, timers). */
static void req_cleanup(struct l7t *t)
{
        if (t->lbst) {
                wp_lb_request_end(t->lbst, t->ep_idx);
                t->lbst = wp_lb_state_unref(t->lbst);
        }
        if (t->filters_ran) {
                for (size_t i = 0; i < t->http->nfilters; i++)
                        if (t->fstreams[i].ops->on_stream_done)
                                t->fstreams[i].ops->on_stream_done(&t->fstreams[i]);
                t->filters_ran = false;
        }
        wp_timer_disarm(t->loop, &t->timeout);
        wp_timer_disarm(t->loop, &t->backoff);
        wp_timer_disarm(t->loop, &t->per_try);
        dbuf_clear(&t->head);
        dbuf_clear(&t->copy);
        t->cluster = NULL;
        t->ep = NULL;
}

/* The request is finished (response sent): next request, or close. */
static void t_request_done(struct l7t *t)
{
        wp_debug("l7", "[T%lu] %u %s %s attempts %u, %lu us", (unsigned long)t->id, t->status,
                 t->flag ? t->flag : "-", t->ep ? t->ep->authority : "-", t->attempts,
                 (unsigned long)((wp_now_ns() - t->start_ns) / 1000));
        t_record(t, NULL);
        req_cleanup(t);
        if (t->close_after || (t->eof_in && !t->rx.len)) {
                t->state = S_CLOSING;
                down_shutdown(t);
                return;
        }
        t->state = S_IDLE;
        t_process(t);
}

/*
 * Sends a local reply (status, body) for the current request. Applies the route's response
 * header mutations when a route matched. close: "connection: close" and the tunnel ends after it.
 */
static void t_local_reply(struct l7t *t, unsigned status, const char *body, const char *location,
                          bool close, const char *flag)
{
        struct wp_http_response resp = {.status = status, .version = WP_HTTP_11};
        size_t blen = body ? strlen(body) : 0;
        int r = 0;

        t->flag = flag;
        t->status = status;
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        wp_headers_init(&resp.headers);
        resp.content_length = (int64_t)blen;
        if (blen)
                r |= wp_headers_add(&resp.headers, "content-type", 12, "text/plain", 10);
        if (location)
                r |= wp_headers_add(&resp.headers, "location", 8, location,
                                    (uint32_t)strlen(location));
        if (t->res.action != WP_ROUTE_ACTION_NONE && t->res.n_response_ops)
                r |= wp_route_headers_apply(t->res.response_ops, t->res.n_response_ops,
                                            &resp.headers);
        if (!t->req_done && t->state != S_IDLE && !close) {
                /* the rest of the request body is read and dropped, unless it is an upgrade */
                if (wp_h1_parser_info(t->parser)->conn_upgrade ||
                    (wp_h1_parser_request(t->parser) && wp_h1_parser_request(t->parser)->upgrade))
                        close = true;
        }
        if (close || t->close_after) {
                close = true;
                wp_headers_remove(&resp.headers, "connection");
                r |= wp_headers_add(&resp.headers, "connection", 10, "close", 5);
        }
        dbuf_clear(&t->scratch);
        if (r == 0)
                DBUF_WRITE(&t->scratch, wp_h1_write_response_head(&wb, &resp), r);
        if (r == 0 && blen && !t->is_head) {
                r = dbuf_append(&t->scratch, body, blen);
                t->resp_body += blen;
        }
        if (r == 0)
                r = down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        t_record(t, r == 0 ? &resp : NULL);
        wp_headers_done(&resp.headers);
        wp_debug("l7", "[T%lu] local reply %u (%s)%s", (unsigned long)t->id, status,
                 flag ? flag : "-", close ? ", closing" : "");
        t->resp_started = true;
        if (r < 0) {
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        if (close) {
                t->close_after = true;
                req_cleanup(t);
                t->state = S_CLOSING;
                down_shutdown(t);
                return;
        }
        if (!t->req_done && t->state != S_IDLE) {
                req_cleanup(t);
                t->state = S_DISCARD;
                t_process(t);
                return;
        }
        t_request_done(t);
}

/* ---- upstream connections ---- */

static void up_free(struct l7up *up)
{
        wp_h1_parser_free(up->parser);
        dbuf_free(&up->rx);
        dbuf_free(&up->txq);
        dbuf_free(&up->sbuf);
        wp_free(up->rbuf);
        wp_free(up);
}

static void up_unidle(struct l7up *up)
{
        if (up->idle) {
                wp_list_del(&up->idle_link);
                up->idle = false;
                tls_get()->nidle--;
                wp_timer_disarm(up->loop, &up->idle_timer);
        }
}

static bool tcp_ops_inflight(const struct l7up *up)
{
        return wp_op_inflight(&up->connect_op) || wp_op_inflight(&up->recv_op) ||
               wp_op_inflight(&up->send_op);
}

static void tcp_try_free(struct l7up *up)
{
        if (tcp_ops_inflight(up))
                return;
        if (up->fd >= 0) {
                close(up->fd);
                up->fd = -1;
        }
        up_free(up);
}

/* Closes an upstream connection that nobody owns any more. */
static void up_close(struct l7up *up)
{
        up_unidle(up);
        up->owner = NULL;
        up->dead = true;
        if (up->hbone) {
                if (up->st) {
                        hbone_stream_set_user(up->st, NULL);
                        hbone_stream_reset(up->st, HBONE_H2_CANCEL);
                        if (up->conn)
                                hbone_conn_kick(up->conn);
                        up->st = NULL;
                }
                wp_worker_pool_put(up->w, &up->pr);
                up_free(up);
                return;
        }
        up->closing = true;
        wp_timer_disarm(up->loop, &up->connect_timer);
        if (up->fd >= 0) {
                wp_loop_cancel(up->loop, &up->connect_op);
                wp_loop_cancel(up->loop, &up->recv_op);
                wp_loop_cancel(up->loop, &up->send_op);
                shutdown(up->fd, SHUT_RDWR);
        }
        tcp_try_free(up);
}

static void up_idle_fire(struct wp_timer *tm)
{
        up_close(container_of(tm, struct l7up, idle_timer));
}

/* The owner is done with up: keep it for the next request to the same endpoint, or close. */
static void up_release(struct l7up *up, bool reuse)
{
        struct l7_tls *x = tls_get();

        up->owner = NULL;
        if (!reuse || up->dead || up->eof_in || !up->ready || up->rx.len || up->txq.len ||
            up->sbuf.len || x->draining || x->nidle >= L7_MAX_IDLE) {
                up_close(up);
                return;
        }
        up->idle = true;
        wp_list_add_tail(&x->idle, &up->idle_link);
        x->nidle++;
        wp_timer_arm(up->loop, &up->idle_timer, wp_now_ns() + up->idle_ns);
}

/* The owner failed this connection or it failed by itself. */
static void up_fail(struct l7up *up, bool connect_failure, const char *why)
{
        up->dead = true;
        if (up->owner)
                t_upstream_failed(up->owner, connect_failure, why);
        else
                up_close(up);
}

static void tcp_arm_recv(struct l7up *up)
{
        if (up->hbone || up->closing || up->fd < 0 || !up->ready || up->eof_in || up->rx.len ||
            wp_op_inflight(&up->recv_op))
                return;
        wp_loop_recv(up->loop, &up->recv_op, up->fd, up->rbuf, L7_TCP_RBUF);
}

static void tcp_flush(struct l7up *up)
{
        if (up->closing || up->fd < 0 || !up->ready || wp_op_inflight(&up->send_op))
                return;
        if (!up->sbuf.len && up->txq.len) {
                struct dbuf tmp = up->sbuf;

                up->sbuf = up->txq;
                up->txq = tmp;
        }
        if (up->sbuf.len)
                wp_loop_send(up->loop, &up->send_op, up->fd, dbuf_data(&up->sbuf), up->sbuf.len);
}

static void hbone_up_flush(struct l7up *up)
{
        while (up->txq.len && up->st && up->ready) {
                ssize_t w = hbone_stream_write(up->st, dbuf_data(&up->txq), up->txq.len);

                if (w == -EAGAIN || w == 0)
                        break;
                if (w < 0) {
                        dbuf_clear(&up->txq);
                        break;
                }
                dbuf_consume(&up->txq, (size_t)w);
        }
        if (up->conn)
                hbone_conn_kick(up->conn);
}

static int up_send(struct l7up *up, const void *d, size_t n)
{
        if (dbuf_append(&up->txq, d, n) < 0)
                return -ENOMEM;
        if (up->hbone)
                hbone_up_flush(up);
        else
                tcp_flush(up);
        return 0;
}

static bool up_writable(const struct l7up *up)
{
        return up->ready && up->txq.len + up->sbuf.len < L7_UP_TXQ_HIGH;
}

/* n bytes of up->rx were parsed: credit (HBONE) or read more (TCP). */
static void up_rx_consumed(struct l7up *up, size_t n)
{
        dbuf_consume(&up->rx, n);
        if (up->hbone) {
                if (up->st && n) {
                        hbone_stream_consume(up->st, n);
                        hbone_conn_kick(up->conn);
                }
        } else {
                tcp_arm_recv(up);
        }
}

static void up_has_input(struct l7up *up)
{
        if (up->owner)
                t_process_up(up->owner);
        else if (up->rx.len || up->eof_in)
                up_close(up); /* idle: unexpected bytes, or the peer closed */
}

static void t_up_ready(struct l7t *t);

static void up_became_ready(struct l7up *up)
{
        up->ready = true;
        if (up->hbone) {
                hbone_up_flush(up);
        } else {
                tcp_arm_recv(up);
                tcp_flush(up);
        }
        if (up->owner)
                t_up_ready(up->owner);
}

static void on_tcp_connect(struct wp_op *op, int res)
{
        struct l7up *up = container_of(op, struct l7up, connect_op);

        wp_timer_disarm(up->loop, &up->connect_timer);
        if (up->closing) {
                tcp_try_free(up);
                return;
        }
        if (res < 0) {
                up_fail(up, true, strerror(-res));
                return;
        }
        up_became_ready(up);
}

static void on_tcp_connect_timeout(struct wp_timer *tm)
{
        struct l7up *up = container_of(tm, struct l7up, connect_timer);

        up_fail(up, true, "connect timeout");
}

static void on_tcp_recv(struct wp_op *op, int res)
{
        struct l7up *up = container_of(op, struct l7up, recv_op);

        if (up->closing) {
                tcp_try_free(up);
                return;
        }
        if (res > 0) {
                if (dbuf_append(&up->rx, up->rbuf, (size_t)res) < 0) {
                        up_fail(up, false, "out of memory");
                        return;
                }
        } else if (res == 0 || res == -ECONNRESET) {
                up->eof_in = true;
                up->dead = true;
        } else {
                up_fail(up, false, strerror(-res));
                return;
        }
        up_has_input(up);
}

static void on_tcp_send(struct wp_op *op, int res)
{
        struct l7up *up = container_of(op, struct l7up, send_op);

        if (up->closing) {
                tcp_try_free(up);
                return;
        }
        if (res < 0) {
                up_fail(up, false, strerror(-res));
                return;
        }
        dbuf_consume(&up->sbuf, (size_t)res);
        tcp_flush(up);
        if (up->owner && up_writable(up))
                t_process(up->owner);
}

static void up_open_stream(struct l7up *up)
{
        for (int i = 0; i < 4; i++) {
                struct hbone_conn *conn = wp_worker_pool_conn(&up->pr);
                int r = conn && hbone_conn_session(conn) && !hbone_conn_closing(conn)
                            ? hbone_session_open(hbone_conn_session(conn), up->key, NULL, 0,
                                                 TAG(up), &up->st)
                            : -ENOTCONN;

                if (r == 0) {
                        up->conn = conn;
                        hbone_conn_kick(conn);
                        return;
                }
                if (r != -EAGAIN && r != -ENOTCONN)
                        break;
                wp_worker_pool_full(up->w, &up->pr);
                r = wp_worker_pool_get(up->w, &up->pod, up->podlen, up->hbone_port, &up->pr);
                if (r == 0)
                        return; /* up_pool_ready follows */
                if (r < 0)
                        break;
        }
        up->st = NULL;
        up_fail(up, true, "cannot open a tunnel upstream");
}

static void up_pool_ready(struct wp_pool_req *pr, struct hbone_conn *conn, int err)
{
        struct l7up *up = container_of(pr, struct l7up, pr);

        if (!conn) {
                up_fail(up, true,
                        err == -ETIMEDOUT ? "HBONE connect timeout" : "HBONE connection failed");
                return;
        }
        up_open_stream(up);
}

/* A new upstream connection to ep for t (t->up is set before anything can fail). */
static void up_connect(struct l7t *t, const struct wp_endpoint *ep)
{
        struct l7up *up = wp_calloc(1, sizeof(*up));
        int fd, r;

        if (!up || wp_h1_parser_new(WP_H1_RESPONSE, NULL, &up->parser) < 0) {
                wp_free(up);
                t_upstream_failed(t, true, "out of memory");
                return;
        }
        up->obj.kind = OBJ_UP;
        up->w = t->w;
        up->loop = t->loop;
        up->owner = t;
        up->hbone = ep->hbone;
        up->fd = -1;
        snprintf(up->key, sizeof(up->key), "%s", ep->authority);
        wp_list_init(&up->idle_link);
        up->idle_timer.on_fire = up_idle_fire;
        up->idle_ns = (uint64_t)(t->pool_idle_ms ? t->pool_idle_ms : 60000) * WP_NSEC_PER_MSEC;
        t->up = up;
        if (up->hbone) {
                up->pr.on_ready = up_pool_ready;
                memcpy(&up->pod, &ep->addr, ep->addrlen);
                up->podlen = ep->addrlen;
                up->hbone_port = t->snap->hbone_port;
                r = wp_worker_pool_get(t->w, &up->pod, up->podlen, up->hbone_port, &up->pr);
                if (r < 0)
                        up_fail(up, true, "HBONE connection failed");
                else if (r == 1)
                        up_open_stream(up);
                return;
        }
        wp_op_init(&up->connect_op, on_tcp_connect);
        wp_op_init(&up->recv_op, on_tcp_recv);
        wp_op_init(&up->send_op, on_tcp_send);
        up->connect_timer.on_fire = on_tcp_connect_timeout;
        up->rbuf = wp_malloc(L7_TCP_RBUF);
        memcpy(&up->addr, &ep->addr, ep->addrlen);
        up->addrlen = ep->addrlen;
        fd = up->rbuf ? socket(up->addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
                      : -1;
        if (fd < 0) {
                up_fail(up, true, "socket");
                return;
        }
        up->fd = fd;
        wp_loop_connect(up->loop, &up->connect_op, fd, (const struct sockaddr *)&up->addr,
                        up->addrlen);
        wp_timer_arm(up->loop, &up->connect_timer,
                     wp_now_ns() + (uint64_t)(t->connect_timeout_ms
                                                  ? t->connect_timeout_ms
                                                  : (t->cluster && t->cluster->connect_timeout_ms
                                                         ? t->cluster->connect_timeout_ms
                                                         : 10000)) *
                                       WP_NSEC_PER_MSEC);
}

/* HBONE stream callbacks of an upstream connection. */
static int up_on_data(struct l7up *up, const uint8_t *data, size_t len)
{
        if (dbuf_append(&up->rx, data, len) < 0)
                return -ENOMEM;
        up_has_input(up);
        return 0;
}

static void up_on_eof(struct l7up *up)
{
        up->eof_in = true;
        up->dead = true;
        up_has_input(up);
}

static void up_on_response(struct l7up *up, unsigned status)
{
        if (status == 200) {
                up_became_ready(up);
                return;
        }
        wp_debug("l7", "upstream CONNECT to %s answered %u", up->key, status);
        up_fail(up, true, "upstream CONNECT refused");
}

static void up_on_close(struct l7up *up)
{
        up->st = NULL;
        if (!up->ready) {
                up_fail(up, true, "upstream tunnel closed before established");
                return;
        }
        up->eof_in = true;
        up->dead = true;
        up_has_input(up);
}

static void up_on_writable(struct l7up *up)
{
        hbone_up_flush(up);
        if (up->owner && up_writable(up))
                t_process(up->owner);
}

/* ---- the request ---- */

static void t_abort(struct l7t *t, uint32_t code)
{
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        t_record(t, NULL);
        req_cleanup(t);
        t->state = S_CLOSING;
        if (t->down) {
                hbone_stream_reset(t->down, code);
                hbone_conn_kick(t->conn);
        }
}

static bool retry_allowed(const struct l7t *t)
{
        const struct wp_route_retry *rp = t->res.retry;

        return rp && t->copy_ok && !t->resp_started && t->attempts <= rp->num_retries &&
               t->res.action == WP_ROUTE_ACTION_CLUSTER;
}

static bool retry_on_status(const struct l7t *t, unsigned status)
{
        const struct wp_route_retry *rp = t->res.retry;

        if (!retry_allowed(t))
                return false;
        if ((rp->retry_on & WP_RETRY_5XX) && status >= 500)
                return true;
        if ((rp->retry_on & WP_RETRY_GATEWAY_ERROR) && status >= 502 && status <= 504)
                return true;
        if ((rp->retry_on & WP_RETRY_RETRIABLE_4XX) && status == 409)
                return true;
        if (rp->retry_on & WP_RETRY_RETRIABLE_STATUS_CODES)
                for (uint32_t i = 0; i < rp->n_retriable_status_codes; i++)
                        if (rp->retriable_status_codes[i] == status)
                                return true;
        return false;
}

static bool retry_on_failure(const struct l7t *t, bool connect_failure)
{
        uint32_t want = WP_RETRY_5XX | WP_RETRY_GATEWAY_ERROR | WP_RETRY_RESET |
                        (connect_failure ? WP_RETRY_CONNECT_FAILURE : 0);

        return retry_allowed(t) && (t->res.retry->retry_on & want);
}

static void on_backoff(struct wp_timer *tm)
{
        t_start_attempt(container_of(tm, struct l7t, backoff));
}

static void t_schedule_retry(struct l7t *t)
{
        const struct wp_route_retry *rp = t->res.retry;
        uint64_t base =
            rp->backoff_base_ms ? rp->backoff_base_ms : WP_ROUTE_DEFAULT_BACKOFF_BASE_MS;
        uint64_t max = rp->backoff_max_ms ? rp->backoff_max_ms : base * 10;
        uint64_t span = base << (t->attempts > 10 ? 10 : t->attempts - 1);

        if (span > max)
                span = max;
        wp_timer_disarm(t->loop, &t->per_try);
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        if (t->lbst) {
                wp_lb_request_end(t->lbst, t->ep_idx);
                t->lbst = wp_lb_state_unref(t->lbst);
        }
        wp_debug("l7", "[T%lu] retry %u in <= %lu ms", (unsigned long)t->id, t->attempts,
                 (unsigned long)span);
        wp_timer_arm(t->loop, &t->backoff, wp_now_ns() + (rnd64() % (span + 1)) * WP_NSEC_PER_MSEC);
}

static void t_upstream_failed(struct l7t *t, bool connect_failure, const char *why)
{
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        wp_debug("l7", "[T%lu] upstream %s failed: %s", (unsigned long)t->id,
                 t->ep ? t->ep->authority : "?", why);
        if (t->resp_started) {
                t->flag = "UC";
                t_abort(t, HBONE_H2_CONNECT_ERROR);
                return;
        }
        if (retry_on_failure(t, connect_failure)) {
                t_schedule_retry(t);
                return;
        }
        if (t->res.retry && t->res.retry->num_retries && t->attempts > 1)
                t->xflags |= WP_AL_F(URX);
        t_local_reply(t, 503,
                      connect_failure
                          ? "upstream connect error or disconnect/reset before headers. "
                            "reset reason: connection failure"
                          : "upstream connect error or disconnect/reset before headers. "
                            "reset reason: connection termination",
                      NULL, false, connect_failure ? "UF" : "UC");
}

static void on_timeout(struct wp_timer *tm)
{
        struct l7t *t = container_of(tm, struct l7t, timeout);

        if (t->resp_started) {
                t->flag = "UT";
                t_abort(t, HBONE_H2_CANCEL);
                return;
        }
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        t_local_reply(t, 504, "upstream request timeout", NULL, false, "UT");
}

/* RetryPolicy.per_try_timeout: this attempt took too long; retried like a 5xx/reset. */
static void on_per_try(struct wp_timer *tm)
{
        struct l7t *t = container_of(tm, struct l7t, per_try);

        if (t->resp_started)
                return; /* the response is on its way: the route timeout still bounds it */
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        if (retry_on_failure(t, false)) {
                t_schedule_retry(t);
                return;
        }
        if (t->res.retry && t->res.retry->num_retries && t->attempts > 1)
                t->xflags |= WP_AL_F(URX);
        t_local_reply(t, 504, "upstream request timeout", NULL, false, "UT");
}

/* Hash for ring hash / Maglev from the route's hash policies (header, source IP), else random. */
static uint64_t request_hash(const struct l7t *t, const struct wp_http_request *req)
{
        for (uint32_t i = 0; i < t->res.n_hash_policies; i++) {
                const struct wp_route_hash_policy *hp = &t->res.hash_policies[i];
                uint32_t n;
                const char *v;
                char ip[WP_AUTHORITY_MAX];

                if (hp->kind == WP_ROUTE_HASH_HEADER &&
                    (v = wp_headers_get(&req->headers, hp->name, &n)))
                        return wp_lb_hash(v, n, 0);
                if (hp->kind == WP_ROUTE_HASH_SOURCE_IP &&
                    hbone_target_format((const struct sockaddr *)&t->src, ip, sizeof(ip)) > 0) {
                        char *colon = strrchr(ip, ':');

                        if (colon)
                                *colon = 0;
                        return wp_lb_hash(ip, strlen(ip), 0);
                }
        }
        return rnd64();
}

static void t_start_attempt(struct l7t *t)
{
        struct l7_tls *x = tls_get();
        const struct wp_endpoint *prev = t->ep;
        struct wp_http_request *req = wp_h1_parser_request(t->parser);

        t->attempts++;
        if (t->res.retry && t->res.retry->per_try_timeout_ms)
                wp_timer_arm(t->loop, &t->per_try,
                             wp_now_ns() + t->res.retry->per_try_timeout_ms * WP_NSEC_PER_MSEC);
        if (t->cluster->passthrough) {
                t->ep = &t->own_ep;
                t->ep_idx = -1;
        } else {
                struct wp_lb_state *st = lb_state(t->snap, t->cluster);
                const struct wp_route_retry *rp = t->res.retry;
                unsigned tries =
                    rp && rp->previous_hosts && t->attempts > 1
                        ? (rp->host_selection_max_attempts ? rp->host_selection_max_attempts : 1)
                        : 1;
                uint64_t hash = request_hash(t, req);
                int idx = -1;

                for (unsigned k = 0; k < tries; k++) {
                        idx = t->cluster->lb ? wp_lb_pick(t->cluster->lb, st, hash, rnd64()) : -1;
                        if (idx < 0 || &t->cluster->eps[idx] != prev)
                                break;
                        hash = rnd64();
                }
                if (idx < 0) {
                        t_local_reply(t, 503, "no healthy upstream", NULL, false, "UH");
                        return;
                }
                t->ep = &t->cluster->eps[idx];
                t->ep_idx = idx;
                if (st) {
                        t->lbst = wp_lb_state_ref(st);
                        wp_lb_request_start(st, idx);
                }
        }
        /* an idle connection to the same endpoint? */
        for (struct wp_list *it = x->idle.next; it != &x->idle; it = it->next) {
                struct l7up *up = container_of(it, struct l7up, idle_link);

                if (up->hbone == t->ep->hbone && !strcmp(up->key, t->ep->authority) &&
                    up->loop == t->loop) {
                        up_unidle(up);
                        up->owner = t;
                        t->up = up;
                        t_up_ready(t);
                        return;
                }
        }
        up_connect(t, t->ep);
}

/* The upstream connection can take the request: head, what was already sent (retry), then the
 * body as it arrives. */
static void t_up_ready(struct l7t *t)
{
        struct l7up *up = t->up;
        struct wp_http_request *req = wp_h1_parser_request(t->parser);

        wp_h1_parser_set_request_method(up->parser, req->method);
        if (up_send(up, dbuf_data(&t->head), t->head.len) < 0 ||
            (t->attempts > 1 && up_send(up, dbuf_data(&t->copy), t->copy.len) < 0)) {
                t_upstream_failed(t, false, "out of memory");
                return;
        }
        t_process(t);
}

/* Body bytes (or chunk framing) on their way up; kept for retries while they fit. */
static int t_send_up(struct l7t *t, const void *d, size_t n)
{
        if (t->copy_ok) {
                if (t->copy.len + n > L7_RETRY_BUFFER) {
                        t->copy_ok = false;
                        dbuf_clear(&t->copy);
                } else if (dbuf_append(&t->copy, d, n) < 0) {
                        t->copy_ok = false;
                }
        }
        return up_send(t->up, d, n);
}

static int t_body_up(struct l7t *t, const uint8_t *d, size_t n)
{
        int r = 0;

        if (!n)
                return 0;
        if (!t->req_chunked_up)
                return t_send_up(t, d, n);
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_chunk_prefix(&wb, n), r);
        if (r == 0)
                r = dbuf_append(&t->scratch, d, n);
        if (r == 0)
                DBUF_WRITE(&t->scratch, wp_h1_write_chunk_suffix(&wb), r);
        if (r == 0)
                r = t_send_up(t, dbuf_data(&t->scratch), t->scratch.len);
        return r;
}

static int t_body_up_done(struct l7t *t)
{
        int r = 0;

        t->req_done = true;
        if (!t->req_chunked_up)
                return 0;
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_last_chunk(&wb, wp_h1_parser_trailers(t->parser)), r);
        if (r == 0)
                r = t_send_up(t, dbuf_data(&t->scratch), t->scratch.len);
        return r;
}

/* Copies a length-counted route string into dst (NUL-terminated). */
static const char *route_str(char *dst, size_t cap, const char *s, uint32_t len)
{
        if (!s || len >= cap)
                return NULL;
        memcpy(dst, s, len);
        dst[len] = 0;
        return dst;
}

static bool upgrade_allowed(const struct l7t *t, const char *type)
{
        bool ok;

        if (!type)
                return false;
        ok = t->http->websocket && !strcasecmp(type, "websocket");
        for (uint32_t i = 0; i < t->res.n_upgrades; i++)
                if (t->res.upgrades[i].type && !strcasecmp(t->res.upgrades[i].type, type) &&
                    !t->res.upgrades[i].connect_config)
                        ok = t->res.upgrades[i].enabled;
        return ok;
}

static void t_on_request_head(struct l7t *t)
{
        struct wp_http_request *req = wp_h1_parser_request(t->parser);
        const struct wp_h1_info *info = wp_h1_parser_info(t->parser);
        struct flt_request fr = {
            .req = req, .peer_principal = t->peer_principal, .src = &t->src, .dst = &t->dst};
        struct wp_cluster *cl;
        char *sp = t->filter_state;
        int r = 0;

        t->state = S_REQ;
        t->req_done = false;
        t->resp_started = false;
        t->resp_chunked = false;
        t->resp_raw_close = false;
        t->close_after = !info->keep_alive;
        t->attempts = 0;
        t->flag = NULL;
        t->status = 0;
        t_record_begin(t, true);
        t->upgrade_ok = false;
        t->copy_ok = false;
        t->is_head = !strcmp(req->method, "HEAD");
        t->is_upgrade = req->upgrade;
        t->up = NULL;
        t->ep = NULL;
        wp_route_result_init(&t->res, t->route_buf, sizeof(t->route_buf));

        if (info->host_mismatch) {
                t_local_reply(t, 400, "Bad Request", NULL, true, "DPE");
                return;
        }
        /* filters */
        if (t->filter_state_size)
                memset(t->filter_state, 0, t->filter_state_size);
        for (size_t i = 0; i < t->http->nfilters; i++) {
                struct flt_stream *fs = &t->fstreams[i];

                *fs = (struct flt_stream){
                    .ops = t->http->filters[i].ops, .conf = t->http->filters[i].conf, .state = sp};
                sp += (fs->ops->stream_state_size + 15) & ~(size_t)15;
        }
        t->filters_ran = true;
        for (size_t i = 0; i < t->http->nfilters; i++) {
                struct flt_stream *fs = &t->fstreams[i];

                r = fs->ops->on_request_headers
                        ? fs->ops->on_request_headers(fs, &fr, !info->has_body)
                        : FLT_CONTINUE;
                if (r == FLT_REPLY) {
                        t_local_reply(t, fs->reply_status ? fs->reply_status : 403, fs->reply_body,
                                      NULL, false, fs->reply_details);
                        return;
                }
                if (r != FLT_CONTINUE) {
                        t_local_reply(t, 500, "Internal Server Error", NULL, false, "filter");
                        return;
                }
        }
        /* route */
        r = wp_route_match(t->http->routes, req, rnd64(), &t->res);
        if (r < 0) {
                t->res.action = WP_ROUTE_ACTION_NONE;
                t_local_reply(t, 500, "Internal Server Error", NULL, false, "route");
                return;
        }
        switch (t->res.action) {
        case WP_ROUTE_ACTION_CLUSTER:
                break;
        case WP_ROUTE_ACTION_REDIRECT: {
                char loc[L7_ROUTE_BUF];

                t_local_reply(t, t->res.status, NULL,
                              route_str(loc, sizeof(loc), t->res.location, t->res.location_len),
                              false, "redirect");
                return;
        }
        case WP_ROUTE_ACTION_DIRECT: {
                char *body = wp_malloc((size_t)t->res.body_len + 1);
                char loc[L7_ROUTE_BUF];

                if (!body) {
                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                        return;
                }
                route_str(body, (size_t)t->res.body_len + 1, t->res.body, t->res.body_len);
                t_local_reply(t, t->res.status, body,
                              route_str(loc, sizeof(loc), t->res.location, t->res.location_len),
                              false, "direct_response");
                wp_free(body);
                return;
        }
        default:
                t->res.action = WP_ROUTE_ACTION_NONE;
                t_local_reply(t, 404, NULL, NULL, false, "NR");
                return;
        }
        if (req->upgrade) {
                t->upgrade_ok =
                    strcmp(req->method, "CONNECT") != 0 && upgrade_allowed(t, info->upgrade);
                if (!t->upgrade_ok) {
                        t_local_reply(t, 403, NULL, NULL, true, "upgrade_failed");
                        return;
                }
        }
        cl = t->res.cluster ? wp_snapshot_cluster(t->snap, t->res.cluster) : NULL;
        if (!cl) {
                t_local_reply(
                    t, t->res.cluster_not_found_status ? t->res.cluster_not_found_status : 503,
                    NULL, NULL, false, "NC");
                return;
        }
        t->cluster = cl;
        if (cl->passthrough) {
                t->own_ep = (struct wp_endpoint){.hbone = true, .healthy = true, .weight = 1};
                memcpy(&t->own_ep.addr, &t->dst, sizeof(t->dst));
                t->own_ep.addrlen = t->dst.ss_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                                 : sizeof(struct sockaddr_in);
                snprintf(t->own_ep.authority, sizeof(t->own_ep.authority), "%s", t->target);
        }
        /* what goes upstream */
        wp_h1_remove_hop_by_hop(&req->headers, t->upgrade_ok);
        if (t->res.path) {
                const char *p =
                    route_str(t->path_copy, sizeof(t->path_copy), t->res.path, t->res.path_len);

                if (!p) {
                        t_local_reply(t, 500, "Internal Server Error", NULL, false, "rewrite");
                        return;
                }
                req->path = p;
        }
        if (t->res.host) {
                const char *h =
                    route_str(t->host_copy, sizeof(t->host_copy), t->res.host, t->res.host_len);

                if (h)
                        req->authority = h;
        }
        if (!wp_headers_get(&req->headers, "x-forwarded-proto", NULL))
                r |= wp_headers_add(&req->headers, "x-forwarded-proto", 17, "http", 4);
        if (!wp_headers_get(&req->headers, "x-request-id", NULL))
                r |= wp_headers_add(&req->headers, "x-request-id", 12, uuid4(t->request_id), 36);
        if (t->res.n_request_ops)
                r |=
                    wp_route_headers_apply(t->res.request_ops, t->res.n_request_ops, &req->headers);
        dbuf_clear(&t->head);
        if (r == 0)
                DBUF_WRITE(&t->head, wp_h1_write_request_head(&wb, req), r);
        if (r < 0) {
                t_local_reply(t, r == -ENOMEM ? 500 : 400, NULL, NULL, true, "head");
                return;
        }
        t->req_chunked_up = req->chunked;
        t->copy_ok = t->res.retry && t->res.retry->num_retries > 0;
        dbuf_clear(&t->copy);
        wp_debug("l7", "[T%lu] %s %s -> cluster %s", (unsigned long)t->id, req->method, req->path,
                 cl->name);
        if (t->res.timeout_ms)
                wp_timer_arm(t->loop, &t->timeout,
                             wp_now_ns() + t->res.timeout_ms * WP_NSEC_PER_MSEC);
        t_start_attempt(t);
}

static void t_parse_error(struct l7t *t)
{
        enum wp_h1_error e = wp_h1_parser_error(t->parser);
        unsigned status = e ? wp_h1_error_status(e) : 400;

        wp_debug("l7", "[T%lu] bad request: %s", (unsigned long)t->id,
                 e ? wp_h1_error_str(e) : "out of memory");
        if (t->resp_started || t->state == S_DISCARD) {
                t_abort(t, HBONE_H2_PROTOCOL_ERROR);
                return;
        }
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        t->res.action = WP_ROUTE_ACTION_NONE;
        t->is_head = false;
        if (t->state == S_IDLE) {
                /* no head: recorded as a request of its own */
                t->flag = NULL;
                t->status = 0;
                t->attempts = 0;
                t->cluster = NULL;
                t->ep = NULL;
                t_record_begin(t, false);
        }
        t_local_reply(t, status, e ? wp_h1_error_str(e) : "Bad Request", NULL, true, "DPE");
}

static bool h2_preface(const struct dbuf *rx, bool *ret_partial)
{
        static const char pri[] = "PRI * HTTP/2.0\r\n";
        size_t n = rx->len < sizeof(pri) - 1 ? rx->len : sizeof(pri) - 1;

        *ret_partial = n < sizeof(pri) - 1;
        return memcmp(dbuf_data(rx), pri, n) == 0;
}

static void t_process_once(struct l7t *t)
{
        for (;;) {
                struct wp_h1_event ev;
                ssize_t n;

                if (!t->down || !down_flush(t))
                        return;
                switch (t->state) {
                case S_CLOSING:
                        if (t->rx.len)
                                rx_consume(t, t->rx.len);
                        return;
                case S_UPGRADED:
                        if (t->rx.len && t->up && up_writable(t->up)) {
                                size_t len = t->rx.len;

                                if (up_send(t->up, dbuf_data(&t->rx), len) < 0) {
                                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                        return;
                                }
                                rx_consume(t, len);
                                t->req_wire += len;
                                t->req_body += len;
                        }
                        if (t->eof_in && !t->rx.len && t->up && !t->up->txq.len) {
                                if (t->up->hbone && t->up->st) {
                                        hbone_stream_shutdown(t->up->st);
                                        hbone_conn_kick(t->up->conn);
                                } else if (!t->up->hbone && t->up->fd >= 0 && !t->up->sbuf.len) {
                                        shutdown(t->up->fd, SHUT_WR);
                                }
                        }
                        return;
                case S_IDLE:
                        if (!t->rx.len) {
                                if (t->eof_in) {
                                        t->state = S_CLOSING;
                                        down_shutdown(t);
                                }
                                return;
                        }
                        {
                                bool partial;

                                if (h2_preface(&t->rx, &partial)) {
                                        if (!partial) {
                                                wp_debug(
                                                    "l7",
                                                    "[T%lu] h2c prior knowledge: not supported",
                                                    (unsigned long)t->id);
                                                t_abort(t, HBONE_H2_REFUSED_STREAM);
                                                return;
                                        }
                                        if (!t->eof_in)
                                                return; /* wait for the rest of the preface */
                                }
                        }
                        break;
                case S_REQ:
                        if (t->req_done || !t->up || !up_writable(t->up))
                                return;
                        break;
                case S_DISCARD:
                        break;
                }
                n = wp_h1_parser_feed(t->parser, t->rx.len ? dbuf_data(&t->rx) : NULL, t->rx.len,
                                      &ev);
                if (n < 0) {
                        t_parse_error(t);
                        return;
                }
                rx_consume(t, (size_t)n); /* ev.data stays readable: nothing is appended here */
                if (t->state == S_IDLE || t->req_open)
                        t->req_wire += (uint64_t)n;
                switch (ev.type) {
                case WP_H1_EV_NONE:
                        if (t->eof_in) {
                                if (wp_h1_parser_eof(t->parser, &ev) < 0) {
                                        t_parse_error(t);
                                        return;
                                }
                        }
                        if (ev.type != WP_H1_EV_DONE)
                                return;
                        /* fall through: EOF ended the message */
                        /* FALLTHROUGH */
                case WP_H1_EV_DONE:
                        if (t->state == S_DISCARD) {
                                t->req_done = true;
                                t_request_done(t);
                        } else if (t->state == S_REQ) {
                                if (t_body_up_done(t) < 0) {
                                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                        return;
                                }
                        }
                        break;
                case WP_H1_EV_HEAD:
                        if (t->state == S_IDLE)
                                t_on_request_head(t);
                        break;
                case WP_H1_EV_BODY:
                        if (t->req_open)
                                t->req_body += ev.len;
                        if (t->state == S_REQ && t_body_up(t, ev.data, ev.len) < 0) {
                                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                return;
                        }
                        break;
                case WP_H1_EV_TRAILERS:
                        break;
                case WP_H1_EV_UPGRADE:
                        return; /* the response decides */
                }
        }
}

static void t_process(struct l7t *t)
{
        if (t->in_process) {
                t->again = true;
                return;
        }
        t->in_process = true;
        do {
                t->again = false;
                t_process_once(t);
        } while (t->again);
        t->in_process = false;
}

/* ---- the response ---- */

static int t_resp_body(struct l7t *t, const uint8_t *d, size_t n)
{
        int r = 0;

        if (!n || t->is_head)
                return 0;
        t->resp_body += n;
        if (!t->resp_chunked)
                return down_send(t, d, n);
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_chunk_prefix(&wb, n), r);
        if (r == 0)
                r = dbuf_append(&t->scratch, d, n);
        if (r == 0)
                DBUF_WRITE(&t->scratch, wp_h1_write_chunk_suffix(&wb), r);
        if (r == 0)
                r = down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        return r;
}

/* Returns 1 when the head was consumed by a retry (t->up is gone). */
static int t_on_response_head(struct l7t *t)
{
        struct l7up *up = t->up;
        struct wp_http_response *resp = wp_h1_parser_response(up->parser);
        const struct wp_h1_info *info = wp_h1_parser_info(up->parser);
        struct wp_http_request *req = wp_h1_parser_request(t->parser);
        int r = 0;

        if (resp->status < 200 && resp->status != 101) {
                /* interim (100 Continue, 103...): passed on as is */
                dbuf_clear(&t->scratch);
                wp_h1_remove_hop_by_hop(&resp->headers, false);
                DBUF_WRITE(&t->scratch, wp_h1_write_response_head(&wb, resp), r);
                return r < 0 ? r : down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        }
        if (resp->status == 101 && !t->upgrade_ok)
                return -EPROTO;
        t->status = resp->status;
        if (retry_on_status(t, resp->status)) {
                t_schedule_retry(t);
                return 1;
        }
        wp_timer_disarm(t->loop, &t->per_try);
        wp_h1_remove_hop_by_hop(&resp->headers, resp->status == 101);
        if (t->res.n_response_ops)
                r |= wp_route_headers_apply(t->res.response_ops, t->res.n_response_ops,
                                            &resp->headers);
        if (resp->status != 101 && !t->is_head && resp->status != 204 && resp->status != 304) {
                if (resp->chunked) {
                        t->resp_chunked = true;
                } else if (info->body_until_close) {
                        if (req->version == WP_HTTP_10) {
                                t->close_after = true;
                                t->resp_raw_close = true;
                        } else {
                                resp->chunked = true;
                                t->resp_chunked = true;
                        }
                }
        }
        if (t->close_after && resp->status != 101)
                r |= wp_headers_add(&resp->headers, "connection", 10, "close", 5);
        if (r < 0)
                return r;
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_response_head(&wb, resp), r);
        if (r < 0)
                return r;
        t->resp_started = true;
        return down_send(t, dbuf_data(&t->scratch), t->scratch.len);
}

static void t_response_done(struct l7t *t)
{
        struct l7up *up = t->up;
        bool reuse;
        int r = 0;

        if (t->resp_chunked) {
                dbuf_clear(&t->scratch);
                DBUF_WRITE(&t->scratch,
                           wp_h1_write_last_chunk(&wb, wp_h1_parser_trailers(up->parser)), r);
                if (r == 0)
                        r = down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        }
        if (r == 0)
                t_record(t, wp_h1_parser_response(up->parser));
        reuse =
            wp_h1_parser_info(up->parser)->keep_alive && t->req_done && !up->eof_in && !up->rx.len;
        if (!t->req_done)
                t->close_after = true;
        t->up = NULL;
        up_release(up, reuse);
        if (r < 0) {
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        if (t->resp_raw_close)
                t->close_after = true;
        if (t->is_upgrade && wp_h1_parser_resume(t->parser) < 0)
                t->close_after = true; /* upgrade refused upstream: back to HTTP */
        t_request_done(t);
}

static void t_process_up(struct l7t *t)
{
        for (;;) {
                struct l7up *up = t->up;
                struct wp_h1_event ev;
                ssize_t n;
                int r;

                if (!up || !t->down || !down_flush(t))
                        return;
                if (t->state == S_UPGRADED) {
                        if (up->rx.len) {
                                size_t len = up->rx.len;

                                if (down_send(t, dbuf_data(&up->rx), len) < 0) {
                                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                        return;
                                }
                                t->resp_body += len;
                                up_rx_consumed(up, len);
                                continue;
                        }
                        if (up->eof_in)
                                down_shutdown(t);
                        return;
                }
                if (t->state != S_REQ)
                        return;
                n = wp_h1_parser_feed(up->parser, up->rx.len ? dbuf_data(&up->rx) : NULL,
                                      up->rx.len, &ev);
                if (n >= 0 && ev.type == WP_H1_EV_NONE && up->eof_in) {
                        up_rx_consumed(up, (size_t)n);
                        n = wp_h1_parser_eof(up->parser, &ev);
                        if (n == 0 && ev.type == WP_H1_EV_NONE) {
                                /* closed between messages: no response */
                                t_upstream_failed(t, false, "upstream closed");
                                return;
                        }
                }
                if (n < 0) {
                        if (t->resp_started) {
                                t_abort(t, HBONE_H2_CONNECT_ERROR);
                        } else if (!up->rx.len && up->eof_in &&
                                   wp_h1_parser_error(up->parser) == WP_H1_E_TRUNCATED &&
                                   !wp_h1_parser_info(up->parser)->has_body) {
                                t_upstream_failed(t, false, "upstream reset");
                        } else {
                                t->up = NULL;
                                up_release(up, false);
                                t_local_reply(t, 502, "upstream sent an invalid response", NULL,
                                              false, "UPE");
                        }
                        return;
                }
                if (up->rx.len)
                        up_rx_consumed(up, (size_t)n);
                switch (ev.type) {
                case WP_H1_EV_NONE:
                        return;
                case WP_H1_EV_HEAD:
                        r = t_on_response_head(t);
                        if (r == 1)
                                return;
                        if (r < 0) {
                                if (t->resp_started) {
                                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                } else {
                                        t->up = NULL;
                                        up_release(up, false);
                                        t_local_reply(t, 502, "upstream sent an invalid response",
                                                      NULL, false, "UPE");
                                }
                                return;
                        }
                        break;
                case WP_H1_EV_BODY:
                        if (t_resp_body(t, ev.data, ev.len) < 0) {
                                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                return;
                        }
                        break;
                case WP_H1_EV_TRAILERS:
                        break;
                case WP_H1_EV_DONE: {
                        struct wp_http_response *resp = wp_h1_parser_response(up->parser);

                        if (resp->status < 200 && resp->status != 101)
                                break; /* interim */
                        if (resp->status == 101)
                                break; /* UPGRADE follows */
                        t_response_done(t);
                        return;
                }
                case WP_H1_EV_UPGRADE:
                        wp_timer_disarm(t->loop, &t->timeout);
                        t->state = S_UPGRADED;
                        t->req_done = true;
                        t_process(t);
                        break;
                }
        }
}

/* ---- the tunnel ---- */

static void t_free(struct l7t *t)
{
        if (t->req_open && t->state == S_REQ)
                t->xflags |= WP_AL_F(DC); /* the downstream went away mid-request */
        t_record(t, t->up && t->resp_started ? wp_h1_parser_response(t->up->parser) : NULL);
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        req_cleanup(t);
        wp_timer_disarm(t->loop, &t->linger);
        wp_h1_parser_free(t->parser);
        dbuf_free(&t->rx);
        dbuf_free(&t->dq);
        dbuf_free(&t->scratch);
        dbuf_free(&t->head);
        dbuf_free(&t->copy);
        wp_free(t->filter_state);
        wp_free(t->fstreams);
        wp_snapshot_unref(t->snap);
        wp_free(t);
}

static int t_on_data(struct l7t *t, const uint8_t *data, size_t len)
{
        if (t->state == S_CLOSING) {
                hbone_stream_consume(t->down, len);
                hbone_conn_kick(t->conn);
                return 0;
        }
        if (dbuf_append(&t->rx, data, len) < 0)
                return -ENOMEM;
        t_process(t);
        return 0;
}

static void t_on_eof(struct l7t *t)
{
        t->eof_in = true;
        t_process(t);
}

static void t_on_writable(struct l7t *t)
{
        t_process_up(t);
        t_process(t);
}

static void t_on_close(struct l7t *t)
{
        t->down = NULL;
        t_free(t);
}

int wp_l7_tunnel_start(const struct wp_l7_start *s)
{
        const struct wp_http_conf *http = s->chain->http;
        const struct sockaddr_storage *peer = hbone_conn_peer_addr(s->conn);
        struct l7t *t = wp_calloc(1, sizeof(*t));
        size_t fsz = 0;

        if (!t)
                return -ENOMEM;
        for (size_t i = 0; i < http->nfilters; i++)
                fsz += (http->filters[i].ops->stream_state_size + 15) & ~(size_t)15;
        if (wp_h1_parser_new(WP_H1_REQUEST, NULL, &t->parser) < 0 ||
            (fsz && !(t->filter_state = wp_calloc(1, fsz))) ||
            (http->nfilters && !(t->fstreams = wp_calloc(http->nfilters, sizeof(*t->fstreams))))) {
                wp_h1_parser_free(t->parser);
                wp_free(t->filter_state);
                wp_free(t);
                return -ENOMEM;
        }
        t->obj.kind = OBJ_TUNNEL;
        t->w = s->w;
        t->loop = s->loop;
        t->conn = s->conn;
        t->down = s->st;
        t->chain = s->chain;
        t->http = http;
        t->id = s->id;
        t->pool_idle_ms = s->pool_idle_ms;
        t->connect_timeout_ms = s->connect_timeout_ms;
        t->peer_principal = hbone_conn_peer_uri(s->conn);
        if (peer)
                t->src = *peer;
        memcpy(&t->dst, &s->req->target.addr, s->req->target.addrlen);
        snprintf(t->target, sizeof(t->target), "%s", s->req->authority);
        if (s->req->baggage)
                snprintf(t->baggage, sizeof(t->baggage), "%s", s->req->baggage);
        t->filter_state_size = fsz;
        t->timeout.on_fire = on_timeout;
        t->backoff.on_fire = on_backoff;
        t->per_try.on_fire = on_per_try;
        t->linger.on_fire = on_linger;
        t->snap = wp_snapshot_ref(s->snap);
        t->state = S_IDLE;
        hbone_stream_set_user(s->st, TAG(t));
        hbone_stream_respond(s->st, 200, NULL, 0);
        hbone_conn_kick(s->conn);
        wp_debug("l7", "[T%lu] %s -> %s: HTTP chain %s", (unsigned long)t->id,
                 t->peer_principal ? t->peer_principal : "?", t->target, s->chain->name);
        return 0;
}

/* ---- callbacks dispatch ---- */

int wp_l7_cb_on_data(struct hbone_stream *st, const uint8_t *data, size_t len, void *user)
{
        struct l7obj *o;

        if (!user)
                return -EPIPE;
        if (!IS_TAGGED(user))
                return hbone_relay_on_data(st, data, len, user);
        o = UNTAG(user);
        if (o->kind == OBJ_TUNNEL)
                return t_on_data((struct l7t *)o, data, len);
        return up_on_data((struct l7up *)o, data, len);
}

void wp_l7_cb_on_eof(struct hbone_stream *st, void *user)
{
        struct l7obj *o;

        if (!user)
                return;
        if (!IS_TAGGED(user)) {
                hbone_relay_on_eof(st, user);
                return;
        }
        o = UNTAG(user);
        if (o->kind == OBJ_TUNNEL)
                t_on_eof((struct l7t *)o);
        else
                up_on_eof((struct l7up *)o);
}

void wp_l7_cb_on_writable(struct hbone_stream *st, void *user)
{
        struct l7obj *o;

        if (!user)
                return;
        if (!IS_TAGGED(user)) {
                hbone_relay_on_writable(st, user);
                return;
        }
        o = UNTAG(user);
        if (o->kind == OBJ_TUNNEL)
                t_on_writable((struct l7t *)o);
        else
                up_on_writable((struct l7up *)o);
}

void wp_l7_cb_on_close(struct hbone_stream *st, uint32_t h2_error, void *user)
{
        struct l7obj *o;

        if (!user)
                return;
        if (!IS_TAGGED(user)) {
                hbone_relay_on_close(st, h2_error, user);
                return;
        }
        o = UNTAG(user);
        if (o->kind == OBJ_TUNNEL)
                t_on_close((struct l7t *)o);
        else
                up_on_close((struct l7up *)o);
}

void wp_l7_cb_on_response(struct hbone_stream *st, unsigned status, void *user)
{
        struct l7obj *o;

        if (!user)
                return;
        if (!IS_TAGGED(user)) {
                hbone_relay_on_response(st, status, user);
                return;
        }
        o = UNTAG(user);
        if (o->kind == OBJ_UP)
                up_on_response((struct l7up *)o, status);
}

/* ---- per-worker ---- */

void wp_l7_worker_drain(void)
{
        struct l7_tls *x = tls_get();

        x->draining = true;
        while (!wp_list_empty(&x->idle))
                up_close(container_of(x->idle.next, struct l7up, idle_link));
}

void wp_l7_worker_done(void)
{
        struct l7_tls *x = tls_get();

        wp_l7_worker_drain();
        lbst_reset(x);
}
