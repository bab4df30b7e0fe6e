/*
 * HTTP inside HBONE tunnels (see l7.h).
 *
 * struct l7t is a request exchange, whatever the downstream codec: an HTTP/1.1 tunnel (M_H1:
 * the tunnel and its current request), an inner HTTP/2 connection (M_H2CONN: the tunnel, no
 * request), one stream of it (M_H2STREAM), or a mirrored copy (M_SHADOW). The codec-specific
 * parts are few (t_req(), down_ready(), rx_consume(), t_relay_response_head(), t_resp_body(),
 * the local reply and the end of a response); routing, filters, LB, retries and timeouts are
 * shared. Upstream, struct l7up is an HTTP/1.1 connection (a CONNECT stream on a pooled HBONE
 * connection, or a TCP socket) or the transport of a struct l7mux, an HTTP/2 session whose
 * streams belong to many requests. A request goes through:
 *   head (parsed, or from the codec) -> filters -> route -> endpoint pick -> upstream acquired
 *   (idle HTTP/1.1 connection or new one; live HTTP/2 session with room or new one) -> head +
 *   body streamed up -> response mutated, streamed down -> the upstream connection goes back to
 *   the idle list when both messages ended cleanly / the stream closes.
 *
 * Flow control: bytes received from the downstream stay in t->rx (credit withheld: HBONE for
 * HTTP/1.1, the inner stream for HTTP/2) until their body bytes were accepted upstream;
 * response bytes are only taken while the downstream queue is short (t->dq for HTTP/1.1, the
 * inner stream's queue for HTTP/2; an HTTP/2 upstream's credit is returned only then). Memory
 * per direction is bounded by the HTTP/2 windows or by reading from a TCP upstream only when
 * its buffer is drained.
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
#include "waypoint/h2.h"
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
#define L7_H2_SQ_HIGH   (64 * 1024)  /* stop reading the upstream above this per inner stream */
#define L7_MIRROR_BODY  (64 * 1024)  /* a mirrored request's body; larger ones are not mirrored */
#define L7_MAX_SHADOWS  4

enum { OBJ_TUNNEL = 1, OBJ_UP = 2, OBJ_SNIFF = 3 };

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
struct l7mux;

/* An upstream HTTP/1.1 connection, or the byte transport of an upstream HTTP/2 session. */
struct l7up {
        struct l7obj obj;
        struct wp_worker *w;
        struct wp_loop *loop;
        struct l7t *owner; /* NULL while idle */
        struct l7mux *mux; /* the HTTP/2 session this connection carries (no owner then) */
        bool mux_io;       /* it was created for a session (counted in tls.nmux_io) */
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

/* What a struct l7t is: an HTTP/1.1 tunnel (the tunnel and its current request), an inner
 * HTTP/2 connection on a tunnel (no request of its own), one request on such a connection, or
 * a mirrored (shadow) copy of a request, whose response is dropped. */
enum l7_mode { M_H1, M_H2CONN, M_H2STREAM, M_SHADOW };

/* An upstream HTTP/2 session (h2c inside an HBONE tunnel, or over TCP) to one endpoint, per
 * worker, carrying the streams of many requests at once. */
struct l7mux {
        struct wp_worker *w;
        struct wp_loop *loop;
        char key[WP_AUTHORITY_MAX + 2];
        bool hbone;
        bool ready;   /* the transport is up */
        bool dead;    /* failed or finished: its requests are failed over, then it is freed */
        bool goaway;  /* no new streams */
        bool freeing; /* freed by the queued task */
        bool connect_failure;
        const char *why;
        struct l7up *io;
        struct wp_h2 *h2;
        struct wp_list link;    /* tls.muxes */
        struct wp_list waiting; /* requests waiting for the transport or a stream slot */
        struct wp_list active;  /* requests with a stream */
        unsigned nusers;
        struct wp_task task;
        struct wp_timer idle_timer;
        uint64_t idle_ns;
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
        char baggage[512]; /* the CONNECT's baggage (source labels without WDS) */
        int64_t start_unix_ns;
        uint64_t req_wire, resp_wire; /* downstream wire bytes received / sent */
        uint64_t req_body, resp_body; /* body bytes of both */
        uint64_t xflags;              /* WP_AL_F(URX), WP_AL_F(DC) */
        struct {                      /* access-log timing points (wp_now_ns, 0: not reached) */
                uint64_t req_end;     /* last request byte received */
                uint64_t up_start;    /* upstream attempt started (endpoint picked) */
                uint64_t up_ready;    /* its connection or stream assigned, head sent */
                uint64_t up_tx_end;   /* last request byte sent upstream */
                uint64_t up_first;    /* response head from upstream */
                uint64_t up_body;     /* first response body byte from upstream */
                uint64_t up_last;     /* upstream response complete */
                uint64_t ds_tx;       /* first response byte sent downstream */
                uint64_t up_conn_id;  /* HBONE connection of the upstream (0: TCP or none) */
        } tm;
        bool req_open;        /* a request is being served and was not recorded yet */
        bool have_head;       /* its head was parsed (else a parse error) */
        bool grpc;            /* content-type application/grpc */
        bool down_ended;      /* the response's END_STREAM is queued downstream */
        char attempt_str[12]; /* x-envoy-attempt-count value */
        char set_cookie[512]; /* generated hash cookie (Set-Cookie value) */
        const struct wp_headers *resp_trailers; /* for t_record (grpc-status) */
        /* HTTP/2 */
        enum l7_mode mode;
        struct wp_h2 *h2;           /* M_H2CONN: the inner session */
        struct wp_task h2flush;     /* M_H2CONN: deferred output */
        bool h2dead;                /* M_H2CONN: freed by the flush task */
        struct wp_list h2streams;   /* M_H2CONN: its M_H2STREAM requests */
        struct wp_list h2conn_link; /* M_H2CONN: in tls.h2conns */
        struct l7t *h2c;            /* M_H2STREAM: the connection (NULL once gone) */
        struct wp_list h2link;
        int32_t sid;
        struct wp_http_request *h2req;       /* owned by the codec */
        const struct wp_headers *h2trailers; /* request trailers (codec) */
        /* HTTP/2 upstream */
        bool up_h2; /* the cluster speaks HTTP/2 to this request */
        bool req_no_body;
        bool up_req_ended;                /* END_STREAM sent upstream */
        struct l7mux *mux;                /* the session of the current attempt */
        int32_t usid;                     /* its stream (0: not opened yet) */
        struct wp_list mux_link;          /* mux->waiting or mux->active */
        size_t mux_owed;                  /* response bytes not credited back upstream yet */
        unsigned refused;                 /* attempts the upstream refused unprocessed */
        struct wp_http_response *up_resp; /* the upstream's response head (codec) */
        /* request mirroring */
        struct l7t *shadows[L7_MAX_SHADOWS]; /* shadows still collecting this request's body */
        struct l7t *parent;                  /* M_SHADOW: the request it copies, while collecting */
        struct wp_http_request sreq;         /* M_SHADOW: its own copy of the head */
        char *sbuf;                          /* M_SHADOW: the copy's strings */
};

/* ---- per-worker (thread-local) state ---- */

struct l7_tls {
        bool init;
        bool draining;
        struct wp_list idle;
        unsigned nidle;
        struct wp_list muxes;
        unsigned nmux;            /* sessions not freed yet (some may be off the list) */
        unsigned nmux_io;         /* their transports not freed yet */
        struct wp_list h2conns;   /* inner HTTP/2 connections (GOAWAY on drain) */
        struct wp_loop *mux_loop; /* the worker's loop (sessions are per worker) */
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
                wp_list_init(&tls.muxes);
                wp_list_init(&tls.h2conns);
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
static void t_up_drop(struct l7t *t);
static void mux_attach(struct l7t *t);
static void mux_kick(struct l7mux *m);
static void mux_io_failed(struct l7mux *m, bool connect_failure, const char *why);

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

static void h2c_kick(struct l7t *c);

/* The request head of t. */
static struct wp_http_request *t_req(struct l7t *t)
{
        if (t->mode == M_SHADOW)
                return &t->sreq;
        return t->mode == M_H2STREAM ? t->h2req : wp_h1_parser_request(t->parser);
}

/* The downstream exists and can take more response bytes. */
static bool down_ready(struct l7t *t)
{
        if (t->mode == M_SHADOW)
                return true;
        if (t->mode == M_H2STREAM)
                return t->h2c && wp_h2_queued(t->h2c->h2, t->sid) < L7_H2_SQ_HIGH;
        return t->down && down_flush(t);
}

/* Credit back to the downstream peer for n bytes consumed from t->rx. */
static void rx_consume(struct l7t *t, size_t n)
{
        dbuf_consume(&t->rx, n);
        if (t->mode == M_SHADOW)
                return;
        if (t->mode == M_H2STREAM) {
                if (t->h2c && n) {
                        wp_h2_consume(t->h2c->h2, t->sid, n);
                        h2c_kick(t->h2c);
                }
                return;
        }
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
        /* 8-4-4-4-12 hex digits; by hand: snprintf was 2-3% of a request's CPU */
        static const char hex[] = "0123456789abcdef";
        char *o = out;

        for (int i = 0; i < 16; i++) {
                if (i == 4 || i == 6 || i == 8 || i == 10)
                        *o++ = '-';
                *o++ = hex[u[i] >> 4];
                *o++ = hex[u[i] & 15];
        }
        *o = '\0';
        return out;
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
        t->start_unix_ns = wp_unix_now_ns();
        t->resp_wire = 0;
        t->req_body = 0;
        t->resp_body = 0;
        t->xflags = 0;
        memset(&t->tm, 0, sizeof(t->tm));
}

/* Records an access-log timing point once; only chains with access logs pay for the clock. */
static void tm_mark(const struct l7t *t, uint64_t *at)
{
        if (!*at && t->chain && t->chain->nlogs)
                *at = wp_now_ns();
}

/* The pooled HBONE connection carrying an upstream (for UPSTREAM_CONNECTION_ID). */
static uint64_t up_conn_id(const struct l7up *up)
{
        const struct hbone_conn *c = wp_worker_pool_conn(&up->pr);

        return c ? hbone_conn_id(c) : 0;
}

/*
 * The current request is finished (response sent, local reply, or failure): one observation in
 * the Istio HTTP metrics and one line per matching access log of the chain. Once per request.
 * resp: the response sent downstream, when there is one to show to RESP().
 */
static void t_record(struct l7t *t, const struct wp_http_response *resp)
{
        struct wp_metrics_shard *sh = wp_worker_mshard(t->w);
        const struct wp_http_request *req = t->have_head ? t_req(t) : NULL;
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
                l.v[WP_ML_REQUEST_PROTOCOL] =
                        t->grpc ? (struct wp_mstr){"grpc", 4} : (struct wp_mstr){"http", 4};
                wp_al_flags_format(flags, flagbuf, sizeof(flagbuf));
                l.v[WP_ML_RESPONSE_FLAGS] = (struct wp_mstr){flagbuf, (uint32_t)strlen(flagbuf)};
                if (resp) {
                        uint32_t n = 0;
                        const char *g = t->resp_trailers ? wp_headers_get(t->resp_trailers,
                                                                          "grpc-status", &n)
                                                         : NULL;

                        if (!g)
                                g = wp_headers_get(&resp->headers, "grpc-status", &n);

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
                        .request_end_ns = t->tm.req_end,
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
                        .route_name =
                                t->res.action != WP_ROUTE_ACTION_NONE ? t->res.route_name : NULL,
                        .downstream_peer_uri_san = t->peer_principal,
                        .upstream_host = ep,
                        .downstream_local = (const struct sockaddr *)&t->dst,
                        .downstream_remote = (const struct sockaddr *)&t->src,
                        .filter_state = &fs,
                        .n_filter_state = 1,
                        .upstream_first_byte_ns = t->tm.up_first,
                        .upstream_last_byte_ns = t->tm.up_last,
                        .upstream_request_start_ns = t->tm.up_start,
                        .upstream_pool_ready_ns = t->tm.up_ready,
                        .upstream_tx_begin_ns = t->tm.up_ready,
                        .upstream_tx_end_ns = t->tm.up_tx_end,
                        .upstream_rx_body_begin_ns = t->tm.up_body,
                        .downstream_tx_begin_ns = t->tm.ds_tx,
                        .downstream_wire_bytes_received = t->req_wire,
                        .downstream_wire_bytes_sent = t->resp_wire,
                        .connection_id = hbone_conn_id(t->conn),
                        .upstream_connection_id = t->tm.up_conn_id,
                        .upstream_protocol =
                                t->tm.up_ready ? (uint8_t)(1 + (t->up_h2 ? WP_HTTP_2 : WP_HTTP_11))
                                               : 0,
                };

                if (t->src.ss_family != AF_INET && t->src.ss_family != AF_INET6)
                        c.downstream_remote = NULL;
                wp_worker_access_log(t->w, t->chain, &c);
        }
        t->req_wire = 0;
        t->resp_wire = 0;
        t->resp_trailers = NULL;
}

/* Ends the current request's bookkeeping (LB counts, filters, timers). */
static void shadow_drop(struct l7t *s);

static void req_cleanup(struct l7t *t)
{
        for (int i = 0; i < L7_MAX_SHADOWS; i++)
                if (t->shadows[i]) {
                        shadow_drop(t->shadows[i]); /* its body never completed */
                        t->shadows[i] = NULL;
                }
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
        if (t->mode == M_SHADOW) {
                shadow_drop(t);
                return;
        }
        req_cleanup(t);
        if (t->mode == M_H2STREAM) {
                /* the codec closes the stream (RST_STREAM(NO_ERROR) if the request is open) */
                t->state = S_CLOSING;
                t_process(t);
                return;
        }
        if (t->close_after || (t->eof_in && !t->rx.len)) {
                t->state = S_CLOSING;
                down_shutdown(t);
                return;
        }
        t->state = S_IDLE;
        t_process(t);
}

/* gRPC status for a local reply's HTTP status (as Envoy's Grpc::Utility::httpToGrpcStatus). */
static unsigned grpc_status_of(unsigned http)
{
        switch (http) {
        case 400:
                return 13; /* INTERNAL */
        case 401:
                return 16; /* UNAUTHENTICATED */
        case 403:
                return 7; /* PERMISSION_DENIED */
        case 404:
                return 12; /* UNIMPLEMENTED */
        case 429:
        case 502:
        case 503:
        case 504:
                return 14; /* UNAVAILABLE */
        default:
                return 2; /* UNKNOWN */
        }
}

/* grpc-message: percent-encoded (gRPC over HTTP/2 spec) into out. */
static uint32_t grpc_message(char *out, size_t cap, const char *msg)
{
        size_t n = 0;

        for (; *msg && n + 4 < cap; msg++) {
                unsigned char c = (unsigned char)*msg;

                if (c >= 0x20 && c <= 0x7e && c != '%')
                        out[n++] = (char)c;
                else
                        n += (size_t)snprintf(out + n, cap - n, "%%%02X", c);
        }
        out[n] = 0;
        return (uint32_t)n;
}

/* A local reply to a gRPC request is gRPC-shaped, as Envoy's: 200, no body, grpc-status (from the
 * HTTP status) and grpc-message (the body) as headers (trailers-only in HTTP/2). code and msg
 * hold the values until the reply is written. */
static int grpc_shape(struct l7t *t, struct wp_http_response *resp, const char *body, size_t blen,
                      char code[8], char *msg, size_t cap)
{
        int r = 0;

        snprintf(code, 8, "%u", grpc_status_of(resp->status));
        wp_headers_remove(&resp->headers, "content-type");
        resp->status = 200;
        resp->content_length = t->mode == M_H2STREAM ? -1 : 0;
        t->status = 200;
        r |= wp_headers_add(&resp->headers, "content-type", 12, "application/grpc", 16);
        r |= wp_headers_add(&resp->headers, "grpc-status", 11, code, (uint32_t)strlen(code));
        if (blen)
                r |= wp_headers_add(&resp->headers, "grpc-message", 12, msg,
                                    grpc_message(msg, cap, body));
        return r;
}

/* The local reply of a request on an inner HTTP/2 stream. */
static void t_local_reply_h2(struct l7t *t, struct wp_http_response *resp, const char *body,
                             size_t blen, int r)
{
        struct wp_h2 *h2 = t->h2c ? t->h2c->h2 : NULL;
        bool headers_only = !blen || t->is_head;

        if (r == 0 && h2) {
                r = wp_h2_respond(h2, t->sid, resp, headers_only);
                if (r == 0 && !headers_only) {
                        r = wp_h2_send(h2, t->sid, body, blen);
                        if (r == 0)
                                r = wp_h2_end(h2, t->sid, NULL);
                        t->resp_body += blen;
                        t->resp_wire += blen;
                }
                h2c_kick(t->h2c);
        }
        t_record(t, r == 0 ? resp : NULL);
        wp_headers_done(&resp->headers);
        t->resp_started = true;
        tm_mark(t, &t->tm.ds_tx);
        if (r < 0) {
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        t_request_done(t);
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
        char gcode[8], gmsg[512];
        int r = 0;

        if (t->mode == M_SHADOW) {
                wp_debug("l7", "[T%lu] mirror: %u (%s)", (unsigned long)t->id, status,
                         flag ? flag : "-");
                shadow_drop(t);
                return;
        }
        t->flag = flag;
        t->status = status;
        t_up_drop(t);
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
        if (t->grpc && t->have_head) {
                r |= grpc_shape(t, &resp, body, blen, gcode, gmsg, sizeof(gmsg));
                body = NULL;
                blen = 0;
        }
        if (t->mode == M_H2STREAM) {
                wp_debug("l7", "[T%lu/%d] local reply %u (%s)", (unsigned long)t->id, t->sid,
                         status, flag ? flag : "-");
                t_local_reply_h2(t, &resp, body, blen, r);
                return;
        }
        if (!t->req_done && t->state != S_IDLE && !close) {
                /* the rest of the request body is read and dropped, unless it is an upgrade */
                if (wp_h1_parser_info(t->parser)->conn_upgrade ||
                    (wp_h1_parser_request(t->parser) && wp_h1_parser_request(t->parser)->upgrade))
                        close = true;
        }
        if (close || t->close_after || tls_get()->draining) {
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
        tm_mark(t, &t->tm.ds_tx);
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
        if (up->mux_io)
                tls_get()->nmux_io--;
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
        if (up->mux)
                mux_io_failed(up->mux, connect_failure, why);
        else if (up->owner)
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
        if (up->mux)
                mux_kick(up->mux);
        else if (up->owner)
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
        if (up->mux) {
                up->mux->ready = true;
                mux_kick(up->mux);
        } else if (up->owner) {
                t_up_ready(up->owner);
        }
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
        if (up->mux)
                mux_kick(up->mux);
        else if (up->owner && up_writable(up))
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

/* A new upstream connection to ep for t (t->up is set before anything can fail), or the
 * transport of session mux (mux->io is set before anything can fail). */
static void up_connect(struct l7t *t, const struct wp_endpoint *ep, struct l7mux *mux)
{
        struct l7up *up = wp_calloc(1, sizeof(*up));
        int fd, r;

        if (!up || wp_h1_parser_new(WP_H1_RESPONSE, NULL, &up->parser) < 0) {
                wp_free(up);
                if (mux)
                        mux_io_failed(mux, true, "out of memory");
                else
                        t_upstream_failed(t, true, "out of memory");
                return;
        }
        up->obj.kind = OBJ_UP;
        up->w = t->w;
        up->loop = t->loop;
        up->owner = mux ? NULL : t;
        up->mux = mux;
        up->mux_io = mux != NULL;
        if (mux)
                tls_get()->nmux_io++;
        up->hbone = ep->hbone;
        up->fd = -1;
        snprintf(up->key, sizeof(up->key), "%s", ep->authority);
        wp_list_init(&up->idle_link);
        up->idle_timer.on_fire = up_idle_fire;
        up->idle_ns = (uint64_t)(t->pool_idle_ms ? t->pool_idle_ms : 60000) * WP_NSEC_PER_MSEC;
        if (mux)
                mux->io = up;
        else
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
                     wp_now_ns() +
                             (uint64_t)(t->connect_timeout_ms
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
        if (up->mux)
                mux_kick(up->mux);
        else if (up->owner && up_writable(up))
                t_process(up->owner);
}

/* ---- the request ---- */

static void t_abort(struct l7t *t, uint32_t code)
{
        if (t->mode == M_SHADOW) {
                shadow_drop(t);
                return;
        }
        t_up_drop(t);
        t_record(t, NULL);
        req_cleanup(t);
        t->state = S_CLOSING;
        if (t->mode == M_H2STREAM) {
                if (t->h2c) {
                        wp_h2_reset(t->h2c->h2, t->sid, code);
                        h2c_kick(t->h2c);
                }
                return;
        }
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
        t_up_drop(t);
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
        t_up_drop(t);
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
        t_up_drop(t);
        t_local_reply(t, 504, "upstream request timeout", NULL, false, "UT");
}

/* RetryPolicy.per_try_timeout: this attempt took too long; retried like a 5xx/reset. */
static void on_per_try(struct wp_timer *tm)
{
        struct l7t *t = container_of(tm, struct l7t, per_try);

        if (t->resp_started)
                return; /* the response is on its way: the route timeout still bounds it */
        t_up_drop(t);
        if (retry_on_failure(t, false)) {
                t_schedule_retry(t);
                return;
        }
        if (t->res.retry && t->res.retry->num_retries && t->attempts > 1)
                t->xflags |= WP_AL_F(URX);
        t_local_reply(t, 504, "upstream request timeout", NULL, false, "UT");
}

/* Hash for ring hash / Maglev from the route's hash policies (header, source IP), else random. */
/* The value of cookie name in the request's Cookie fields (surrounding quotes stripped), or
 * NULL. */
static const char *cookie_get(const struct wp_headers *hs, const char *name, uint32_t nlen,
                              uint32_t *ret_len)
{
        for (uint32_t i = 0; i < hs->n; i++) {
                const char *p = hs->v[i].value, *end = p + hs->v[i].value_len;

                if (strcmp(hs->v[i].name, "cookie"))
                        continue;
                while (p < end) {
                        const char *k, *v;
                        size_t kl, vl;

                        while (p < end && (*p == ' ' || *p == ';'))
                                p++;
                        k = p;
                        while (p < end && *p != '=' && *p != ';')
                                p++;
                        kl = (size_t)(p - k);
                        if (p == end || *p != '=')
                                continue;
                        v = ++p;
                        while (p < end && *p != ';')
                                p++;
                        vl = (size_t)(p - v);
                        while (vl && v[vl - 1] == ' ')
                                vl--;
                        if (kl != nlen || memcmp(k, name, nlen))
                                continue;
                        if (vl >= 2 && v[0] == '"' && v[vl - 1] == '"') {
                                v++;
                                vl -= 2;
                        }
                        *ret_len = (uint32_t)vl;
                        return v;
                }
        }
        return NULL;
}

/* Cookie hash policy with a ttl and no cookie: a new value, stable for the downstream
 * connection (as Envoy derives it from the downstream address), set on the response. */
static uint64_t cookie_generate(struct l7t *t, const struct wp_route_hash_policy *hp)
{
        char addr[WP_AUTHORITY_MAX + 1], val[17];
        int n = hbone_target_format((const struct sockaddr *)&t->src, addr, sizeof(addr));
        uint64_t h = wp_lb_hash(t->target, strlen(t->target),
                                n > 0 ? wp_lb_hash(addr, (size_t)n, 0) : 0);

        snprintf(val, sizeof(val), "%016llx", (unsigned long long)h);
        snprintf(t->set_cookie, sizeof(t->set_cookie), "%.*s=\"%s\"; Max-Age=%llu%s%s; HttpOnly",
                 (int)hp->name_len, hp->name, val, (unsigned long long)(hp->cookie_ttl_ms / 1000),
                 hp->cookie_path && hp->cookie_path[0] ? "; Path=" : "",
                 hp->cookie_path ? hp->cookie_path : "");
        return wp_lb_hash(val, 16, 0);
}

static uint64_t request_hash(struct l7t *t, const struct wp_http_request *req)
{
        for (uint32_t i = 0; i < t->res.n_hash_policies; i++) {
                const struct wp_route_hash_policy *hp = &t->res.hash_policies[i];
                uint32_t n;
                const char *v;
                char ip[WP_AUTHORITY_MAX];

                if (hp->kind == WP_ROUTE_HASH_HEADER &&
                    (v = wp_headers_get(&req->headers, hp->name, &n)))
                        return wp_lb_hash(v, n, 0);
                if (hp->kind == WP_ROUTE_HASH_COOKIE) {
                        if ((v = cookie_get(&req->headers, hp->name, hp->name_len, &n)))
                                return wp_lb_hash(v, n, 0);
                        if (hp->cookie_has_ttl)
                                return cookie_generate(t, hp);
                }
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
        struct wp_http_request *req = t_req(t);

        t->attempts++;
        t->tm.up_start = t->tm.up_ready = t->tm.up_tx_end = 0;
        tm_mark(t, &t->tm.up_start);
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
                                ? (rp->host_selection_max_attempts ? rp->host_selection_max_attempts
                                                                   : 1)
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
        if (t->up_h2) {
                mux_attach(t);
                return;
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
        up_connect(t, t->ep, NULL);
}

/* The upstream connection can take the request: head, what was already sent (retry), then the
 * body as it arrives. */
/* x-envoy-attempt-count: this attempt's number (Envoy's include_request_attempt_count and
 * include_attempt_count_in_response). */
static int t_attempt_header(struct l7t *t, struct wp_headers *hs)
{
        int n = snprintf(t->attempt_str, sizeof(t->attempt_str), "%u", t->attempts);

        wp_headers_remove(hs, "x-envoy-attempt-count");
        return wp_headers_add(hs, "x-envoy-attempt-count", 21, t->attempt_str, (uint32_t)n);
}

static void t_up_ready(struct l7t *t)
{
        struct l7up *up = t->up;
        struct wp_http_request *req = t_req(t);
        int r = 0;

        if (t->res.include_attempt_count_in_request) {
                /* the head carries this attempt's number */
                r = t_attempt_header(t, &req->headers);
                dbuf_clear(&t->head);
                if (r == 0)
                        DBUF_WRITE(&t->head, wp_h1_write_request_head(&wb, req), r);
        }
        wp_h1_parser_set_request_method(up->parser, req->method);
        tm_mark(t, &t->tm.up_ready);
        t->tm.up_conn_id = up->hbone ? up_conn_id(up) : 0;
        if (t->req_done && t->attempts > 1)
                t->tm.up_tx_end = t->tm.up_ready; /* the whole request from the retry copy */
        if (r < 0 || up_send(up, dbuf_data(&t->head), t->head.len) < 0 ||
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
        if (t->mux) {
                int r = wp_h2_send(t->mux->h2, t->usid, d, n);

                mux_kick(t->mux);
                return r;
        }
        return up_send(t->up, d, n);
}

/* The upstream side of the attempt can take more request body. */
static bool t_up_can_take(const struct l7t *t)
{
        if (t->mux)
                return t->usid > 0 && wp_h2_queued(t->mux->h2, t->usid) < L7_UP_TXQ_HIGH;
        return t->up && up_writable(t->up);
}

static int t_body_up(struct l7t *t, const uint8_t *d, size_t n)
{
        int r = 0;

        if (!n)
                return 0;
        for (int i = 0; i < L7_MAX_SHADOWS; i++) {
                struct l7t *sh = t->shadows[i];

                if (sh && (sh->rx.len + n > L7_MIRROR_BODY || dbuf_append(&sh->rx, d, n) < 0)) {
                        wp_debug("l7", "[T%lu] mirror: body too large, not mirrored",
                                 (unsigned long)t->id);
                        shadow_drop(sh);
                        t->shadows[i] = NULL;
                }
        }
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

static void shadow_start(struct l7t *s);

static int t_body_up_done(struct l7t *t)
{
        const struct wp_headers *trl = t->mode == M_H2STREAM ? t->h2trailers
                                       : t->mode == M_SHADOW ? NULL
                                                             : wp_h1_parser_trailers(t->parser);
        int r = 0;

        t->req_done = true;
        tm_mark(t, &t->tm.req_end);
        for (int i = 0; i < L7_MAX_SHADOWS; i++)
                if (t->shadows[i]) {
                        struct l7t *sh = t->shadows[i];

                        t->shadows[i] = NULL;
                        shadow_start(sh);
                }
        if (t->mux) {
                if (t->usid > 0 && !t->up_req_ended) {
                        t->up_req_ended = true;
                        tm_mark(t, &t->tm.up_tx_end);
                        r = wp_h2_end(t->mux->h2, t->usid, trl);
                        mux_kick(t->mux);
                }
                return r;
        }
        if (!t->req_chunked_up)
                return 0;
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_last_chunk(&wb, trl), r);
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

/* The timeout of a gRPC request on a route with max_grpc_timeout (or max_stream_duration's
 * grpc_timeout_header_max), as Envoy computes it: the grpc-timeout header ("1*8DIGIT unit",
 * H M S m u n; absent or invalid: none) less the offset, capped by the maximum (0: no cap).
 * 0: no timeout. */
static uint64_t grpc_timeout(const struct l7t *t, const struct wp_headers *hs)
{
        static const struct {
                char unit;
                uint64_t ns;
        } units[] = {{'H', 3600 * WP_NSEC_PER_SEC},
                     {'M', 60 * WP_NSEC_PER_SEC},
                     {'S', WP_NSEC_PER_SEC},
                     {'m', WP_NSEC_PER_MSEC},
                     {'u', 1000},
                     {'n', 1}};
        uint32_t n;
        const char *v = wp_headers_get(hs, "grpc-timeout", &n);
        uint64_t num = 0, ms = 0, max = t->res.max_grpc_timeout_ms;

        if (v && n >= 2 && n <= 9) {
                uint32_t i;

                for (i = 0; i + 1 < n && v[i] >= '0' && v[i] <= '9'; i++)
                        num = num * 10 + (uint64_t)(v[i] - '0');
                for (size_t u = 0; i == n - 1 && u < sizeof(units) / sizeof(units[0]); u++)
                        if (units[u].unit == v[i]) /* sub-millisecond units round up */
                                ms = units[u].ns >= WP_NSEC_PER_MSEC
                                             ? num * (units[u].ns / WP_NSEC_PER_MSEC)
                                             : (num * units[u].ns + WP_NSEC_PER_MSEC - 1) /
                                                       WP_NSEC_PER_MSEC;
        }
        if (t->res.grpc_timeout_offset_ms < ms)
                ms -= t->res.grpc_timeout_offset_ms;
        if (max && (!ms || ms > max))
                ms = max;
        return ms;
}

/* TE lists "trailers" (the only TE an HTTP/2 request may carry). */
static bool te_has_trailers(const struct wp_headers *hs)
{
        for (uint32_t i = 0; i < hs->n; i++) {
                const char *v = hs->v[i].value;

                if (strcmp(hs->v[i].name, "te"))
                        continue;
                for (uint32_t k = 0; k + 8 <= hs->v[i].value_len; k++)
                        if (!strncasecmp(v + k, "trailers", 8))
                                return true;
        }
        return false;
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

/* ---- request mirroring (RouteAction.request_mirror_policies) ---- */

static struct l7t *t_alloc(const struct wp_http_conf *http, bool h1);
static void t_free(struct l7t *t);

static void shadow_task(struct wp_task *tk)
{
        t_free(container_of(tk, struct l7t, h2flush));
}

/* The shadow is over (response dropped, failure, or its body never completed): freed from a
 * deferred task, as it may be deep in a callback of its upstream. */
static void shadow_drop(struct l7t *s)
{
        if (s->state == S_CLOSING)
                return;
        if (s->parent) {
                for (int i = 0; i < L7_MAX_SHADOWS; i++)
                        if (s->parent->shadows[i] == s)
                                s->parent->shadows[i] = NULL;
                s->parent = NULL;
        }
        s->state = S_CLOSING;
        t_up_drop(s);
        req_cleanup(s);
        wp_loop_defer(s->loop, &s->h2flush);
}

/* Sends the shadow once its body is complete: its own head (content-length framing), its own
 * endpoint pick on the mirror cluster; no retries; the response is dropped. */
static void shadow_start(struct l7t *s)
{
        struct wp_http_request *req = &s->sreq;
        int r = 0;

        s->parent = NULL;
        s->state = S_REQ;
        s->eof_in = true;
        s->req_done = false;
        s->req_no_body = !s->rx.len;
        req->content_length = (int64_t)s->rx.len;
        req->chunked = false;
        if (!s->up_h2)
                DBUF_WRITE(&s->head, wp_h1_write_request_head(&wb, req), r);
        if (r < 0) {
                shadow_drop(s);
                return;
        }
        wp_debug("l7", "[T%lu] mirror %s %s (%s, %zu body bytes) -> cluster %s",
                 (unsigned long)s->id, req->method, req->path, req->authority, s->rx.len,
                 s->cluster->name);
        if (s->res.timeout_ms)
                wp_timer_arm(s->loop, &s->timeout,
                             wp_now_ns() + s->res.timeout_ms * WP_NSEC_PER_MSEC);
        t_start_attempt(s);
}

static char *sbuf_put(char **p, const char *a, size_t an, const char *b, size_t bn)
{
        char *out = *p;

        memcpy(out, a, an);
        memcpy(out + an, b, bn);
        out[an + bn] = 0;
        *p += an + bn + 1;
        return out;
}

/* A shadow of t's request (as it goes upstream) for mirror cluster cl; Host/:authority gets
 * "-shadow" after the host part, as Envoy does. */
static struct l7t *shadow_new(struct l7t *t, const struct wp_http_request *req,
                              struct wp_cluster *cl)
{
        const char *auth = req->authority ? req->authority : "";
        const char *colon = strrchr(auth, ':'), *bracket = strrchr(auth, ']');
        size_t hostlen =
                colon && (!bracket || colon > bracket) ? (size_t)(colon - auth) : strlen(auth);
        size_t need = strlen(req->method) + strlen(req->path) + strlen(auth) + 16 +
                      (req->scheme ? strlen(req->scheme) + 1 : 0);
        struct l7t *s = t_alloc(t->http, false);
        char *p;
        int r = 0;

        if (!s)
                return NULL;
        for (uint32_t i = 0; i < req->headers.n; i++)
                need += req->headers.v[i].name_len + req->headers.v[i].value_len + 2;
        s->mode = M_SHADOW;
        s->w = t->w;
        s->loop = t->loop;
        s->chain = t->chain;
        s->id = t->id;
        s->pool_idle_ms = t->pool_idle_ms;
        s->connect_timeout_ms = t->connect_timeout_ms;
        s->peer_principal = t->peer_principal;
        s->src = t->src;
        s->dst = t->dst;
        memcpy(s->target, t->target, sizeof(s->target));
        s->snap = wp_snapshot_ref(t->snap);
        s->h2flush.run = shadow_task;
        s->res = t->res;
        s->res.retry = NULL;
        s->res.mirrors = NULL;
        s->res.n_mirrors = 0;
        s->res.n_response_ops = 0;
        s->res.path = s->res.host = s->res.location = s->res.body = NULL;
        s->res.include_attempt_count_in_request = false;
        s->res.include_attempt_count_in_response = false;
        s->cluster = cl;
        s->up_h2 = cl->http_protocol == WP_UPSTREAM_HTTP2 ||
                   (cl->http_protocol == WP_UPSTREAM_DOWNSTREAM && t->mode == M_H2STREAM);
        s->is_head = t->is_head;
        s->grpc = t->grpc;
        s->state = S_IDLE;
        wp_headers_init(&s->sreq.headers);
        s->sbuf = wp_malloc(need);
        if (!s->sbuf) {
                t_free(s);
                return NULL;
        }
        p = s->sbuf;
        wp_headers_init(&s->sreq.headers);
        s->sreq.version = req->version;
        s->sreq.method = sbuf_put(&p, req->method, strlen(req->method), "", 0);
        s->sreq.path = sbuf_put(&p, req->path, strlen(req->path), "", 0);
        s->sreq.scheme = req->scheme ? sbuf_put(&p, req->scheme, strlen(req->scheme), "", 0) : NULL;
        /* host + "-shadow" + the port part */
        s->sreq.authority = p;
        memcpy(p, auth, hostlen);
        memcpy(p + hostlen, "-shadow", 7);
        p += hostlen + 7;
        sbuf_put(&p, auth + hostlen, strlen(auth + hostlen), "", 0);
        for (uint32_t i = 0; i < req->headers.n && r == 0; i++) {
                const struct wp_header *h = &req->headers.v[i];
                char *n = sbuf_put(&p, h->name, h->name_len, "", 0);
                char *v = sbuf_put(&p, h->value, h->value_len, "", 0);

                r = wp_headers_add(&s->sreq.headers, n, h->name_len, v, h->value_len);
        }
        if (r < 0) {
                t_free(s);
                return NULL;
        }
        return s;
}

/* The route mirrors this request: one shadow per sampled policy, sent once the request's body
 * is complete (bodies over L7_MIRROR_BODY are not mirrored). Never delays or fails t. */
static void t_mirror(struct l7t *t, const struct wp_http_request *req, bool has_body)
{
        int k = 0;

        for (uint32_t i = 0; i < t->res.n_mirrors && k < L7_MAX_SHADOWS; i++) {
                const struct wp_route_mirror *m = &t->res.mirrors[i];
                const char *name = m->cluster;
                char hname[256];
                struct wp_cluster *cl;
                struct l7t *s;

                if (!wp_route_mirror_sampled(m, rnd64()))
                        continue;
                if (!name && m->cluster_header) {
                        uint32_t n;
                        const char *v = wp_headers_get(&req->headers, m->cluster_header, &n);

                        if (!v || n >= sizeof(hname))
                                continue;
                        memcpy(hname, v, n);
                        hname[n] = 0;
                        name = hname;
                }
                cl = name ? wp_snapshot_cluster(t->snap, name) : NULL;
                if (!cl || cl->passthrough)
                        continue;
                s = shadow_new(t, req, cl);
                if (!s)
                        continue;
                if (has_body) {
                        s->parent = t;
                        t->shadows[k++] = s;
                } else {
                        shadow_start(s);
                }
        }
}

static void t_on_request_head(struct l7t *t)
{
        struct wp_http_request *req = t_req(t);
        const struct wp_h1_info *info = t->mode == M_H2STREAM ? NULL : wp_h1_parser_info(t->parser);
        bool has_body = info ? info->has_body : !t->eof_in;
        bool te_trailers;
        uint64_t timeout_ms;
        uint32_t ctlen;
        const char *ct = wp_headers_get(&req->headers, "content-type", &ctlen);
        struct flt_request fr = {
                .req = req, .peer_principal = t->peer_principal, .src = &t->src, .dst = &t->dst};
        struct wp_cluster *cl;
        char *sp = t->filter_state;
        int r = 0;

        t->state = S_REQ;
        t->req_done = false;
        t->resp_started = false;
        t->down_ended = false;
        t->set_cookie[0] = 0;
        t->resp_chunked = false;
        t->resp_raw_close = false;
        t->close_after = info && !info->keep_alive;
        t->grpc = ct && ctlen >= 16 && !strncasecmp(ct, "application/grpc", 16);
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

        if (info && info->host_mismatch) {
                t_local_reply(t, 400, "Bad Request", NULL, true, "DPE");
                return;
        }
        /* filters */
        if (t->filter_state_size)
                memset(t->filter_state, 0, t->filter_state_size);
        for (size_t i = 0; i < t->http->nfilters; i++) {
                struct flt_stream *fs = &t->fstreams[i];

                *fs = (struct flt_stream){.ops = t->http->filters[i].ops,
                                          .conf = t->http->filters[i].conf,
                                          .state = sp};
                sp += (fs->ops->stream_state_size + 15) & ~(size_t)15;
        }
        t->filters_ran = true;
        for (size_t i = 0; i < t->http->nfilters; i++) {
                struct flt_stream *fs = &t->fstreams[i];

                r = fs->ops->on_request_headers ? fs->ops->on_request_headers(fs, &fr, !has_body)
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
                t->upgrade_ok = info && strcmp(req->method, "CONNECT") != 0 &&
                                upgrade_allowed(t, info->upgrade);
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
        /* what goes upstream, and in which protocol */
        t->up_h2 = !req->upgrade && !cl->passthrough &&
                   (cl->http_protocol == WP_UPSTREAM_HTTP2 ||
                    (cl->http_protocol == WP_UPSTREAM_DOWNSTREAM && t->mode == M_H2STREAM));
        t->req_no_body = !has_body;
        t->refused = 0;
        te_trailers = te_has_trailers(&req->headers);
        wp_h1_remove_hop_by_hop(&req->headers, t->upgrade_ok);
        if (t->up_h2 && te_trailers) /* gRPC needs it; HTTP/2 allows exactly this TE */
                r |= wp_headers_add(&req->headers, "te", 2, "trailers", 8);
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
                r |= wp_route_headers_apply(t->res.request_ops, t->res.n_request_ops,
                                            &req->headers);
        if (t->mode == M_H2STREAM && !t->up_h2 && req->content_length < 0 && has_body)
                req->chunked = true; /* HTTP/2 DATA without a length: chunked upstream */
        dbuf_clear(&t->head);
        if (r == 0 && !t->up_h2)
                DBUF_WRITE(&t->head, wp_h1_write_request_head(&wb, req), r);
        if (r < 0) {
                t_local_reply(t, r == -ENOMEM ? 500 : 400, NULL, NULL, true, "head");
                return;
        }
        t->req_chunked_up = !t->up_h2 && req->chunked;
        t->copy_ok = t->res.retry && t->res.retry->num_retries > 0;
        dbuf_clear(&t->copy);
        wp_debug("l7", "[T%lu] %s %s -> cluster %s", (unsigned long)t->id, req->method, req->path,
                 cl->name);
        timeout_ms = t->res.timeout_ms;
        if (t->grpc && t->res.has_max_grpc_timeout)
                timeout_ms = grpc_timeout(t, &req->headers);
        if (timeout_ms)
                wp_timer_arm(t->loop, &t->timeout, wp_now_ns() + timeout_ms * WP_NSEC_PER_MSEC);
        if (t->res.n_mirrors && t->mode != M_SHADOW)
                t_mirror(t, req, has_body);
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
        t_up_drop(t);
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

static int h2c_start(struct l7t *t);

/* A request on an inner HTTP/2 stream: its body (DATA, already de-framed) goes up as the
 * upstream accepts it; credit is returned as it does. */
static void t2_process_once(struct l7t *t)
{
        if (!t->h2c && t->mode != M_SHADOW)
                return;
        if (t->state == S_CLOSING || t->state == S_DISCARD) {
                if (t->rx.len)
                        rx_consume(t, t->rx.len);
                return;
        }
        if (t->state != S_REQ || t->req_done || !t_up_can_take(t))
                return;
        if (t->rx.len) {
                size_t len = t->rx.len;

                t->req_wire += len;
                t->req_body += len;
                if (t_body_up(t, dbuf_data(&t->rx), len) < 0) {
                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                        return;
                }
                rx_consume(t, len);
        }
        if (t->eof_in && !t->rx.len && t_body_up_done(t) < 0)
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
}

static void t_process_once(struct l7t *t)
{
        if (t->mode == M_H2STREAM || t->mode == M_SHADOW) {
                t2_process_once(t);
                return;
        }
        if (t->mode == M_H2CONN)
                return;
        for (;;) {
                struct wp_h1_event ev;
                ssize_t n;

                if (!down_ready(t))
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
                                                if (h2c_start(t) < 0)
                                                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                                                return;
                                        }
                                        if (!t->eof_in)
                                                return; /* wait for the rest of the preface */
                                }
                        }
                        break;
                case S_REQ:
                        if (t->req_done || !t_up_can_take(t))
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
                                tm_mark(t, &t->tm.req_end);
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

        if (!n || t->is_head || t->mode == M_SHADOW)
                return 0;
        t->resp_body += n;
        if (t->mode == M_H2STREAM) {
                t->resp_wire += n;
                r = t->h2c ? wp_h2_send(t->h2c->h2, t->sid, d, n) : -EPIPE;
                if (t->h2c)
                        h2c_kick(t->h2c);
                return r;
        }
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
/* Passes the upstream's response head on (either upstream protocol, either downstream one).
 * body_until_close: the upstream gave no length (HTTP/1.1 body until close, HTTP/2 without
 * content-length). Returns 1 when the head was consumed by a retry (the upstream is gone). */
static int t_relay_response_head(struct l7t *t, struct wp_http_response *resp,
                                 bool body_until_close, bool end_stream)
{
        struct wp_http_request *req = t_req(t);
        int r = 0;

        tm_mark(t, &t->tm.up_first);
        if (end_stream)
                tm_mark(t, &t->tm.up_last);

        if (t->mode == M_SHADOW) {
                /* the mirror's response is dropped */
                if (resp->status >= 200) {
                        t->status = resp->status;
                        t->resp_started = true;
                        tm_mark(t, &t->tm.ds_tx);
                }
                return 0;
        }
        if (resp->status < 200 && resp->status != 101 && t->mode == M_H2STREAM)
                return 0; /* interim: not passed on to an HTTP/2 client */
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
                } else if (body_until_close) {
                        if (req->version == WP_HTTP_10) {
                                t->close_after = true;
                                t->resp_raw_close = true;
                        } else {
                                resp->chunked = true;
                                t->resp_chunked = true;
                        }
                }
        }
        if (t->res.include_attempt_count_in_response)
                r |= t_attempt_header(t, &resp->headers);
        if (t->set_cookie[0])
                r |= wp_headers_add(&resp->headers, "set-cookie", 10, t->set_cookie,
                                    (uint32_t)strlen(t->set_cookie));
        if (tls_get()->draining && t->mode == M_H1)
                t->close_after = true; /* the client reconnects elsewhere */
        if (t->close_after && resp->status != 101 && t->mode != M_H2STREAM)
                r |= wp_headers_add(&resp->headers, "connection", 10, "close", 5);
        if (r < 0)
                return r;
        if (t->mode == M_H2STREAM) {
                if (!t->h2c)
                        return -EPIPE;
                if (body_until_close)
                        resp->content_length = -1;
                resp->chunked = false;
                /* a response that ends at its head (gRPC trailers-only) stays one HEADERS */
                r = wp_h2_respond(t->h2c->h2, t->sid, resp, end_stream);
                t->down_ended = end_stream && r == 0;
                h2c_kick(t->h2c);
                if (r == 0)
                        t->resp_started = true;
                tm_mark(t, &t->tm.ds_tx);
                return r;
        }
        dbuf_clear(&t->scratch);
        DBUF_WRITE(&t->scratch, wp_h1_write_response_head(&wb, resp), r);
        if (r < 0)
                return r;
        t->resp_started = true;
        tm_mark(t, &t->tm.ds_tx);
        return down_send(t, dbuf_data(&t->scratch), t->scratch.len);
}

static int t_on_response_head(struct l7t *t)
{
        struct l7up *up = t->up;

        return t_relay_response_head(t, wp_h1_parser_response(up->parser),
                                     wp_h1_parser_info(up->parser)->body_until_close, false);
}

static void t_response_done(struct l7t *t)
{
        struct l7up *up = t->up;
        bool reuse;
        int r = 0;

        tm_mark(t, &t->tm.up_last);
        if (t->mode == M_H2STREAM) {
                struct wp_headers *trl = wp_h1_parser_trailers(up->parser);

                if (trl) {
                        wp_h1_remove_hop_by_hop(trl, false);
                        t->resp_trailers = trl;
                }
                r = t->h2c ? wp_h2_end(t->h2c->h2, t->sid, trl) : -EPIPE;
                if (t->h2c)
                        h2c_kick(t->h2c);
        } else if (t->resp_chunked) {
                dbuf_clear(&t->scratch);
                DBUF_WRITE(&t->scratch,
                           wp_h1_write_last_chunk(&wb, wp_h1_parser_trailers(up->parser)), r);
                if (r == 0)
                        r = down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        }
        if (r == 0)
                t_record(t, wp_h1_parser_response(up->parser));
        reuse = wp_h1_parser_info(up->parser)->keep_alive && t->req_done && !up->eof_in &&
                !up->rx.len;
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
        if (t->mux) {
                /* HTTP/2 upstream: its credit follows the downstream */
                if (t->mux_owed && t->usid > 0 && down_ready(t)) {
                        wp_h2_consume(t->mux->h2, t->usid, t->mux_owed);
                        t->mux_owed = 0;
                        mux_kick(t->mux);
                }
                return;
        }
        for (;;) {
                struct l7up *up = t->up;
                struct wp_h1_event ev;
                ssize_t n;
                int r;

                if (!up || !down_ready(t))
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
                        if (ev.len)
                                tm_mark(t, &t->tm.up_body);
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
                        tm_mark(t, &t->tm.req_end);
                        t_process(t);
                        break;
                }
        }
}

/* ---- upstream HTTP/2 sessions ---- */

static void mux_free(struct l7mux *m)
{
        wp_list_del(&m->link);
        wp_timer_disarm(m->loop, &m->idle_timer);
        if (m->io) {
                m->io->mux = NULL;
                up_close(m->io);
                m->io = NULL;
        }
        wp_h2_free(m->h2);
        m->h2 = NULL;
        if (m->task.queued) {
                m->freeing = true; /* the queued task frees it */
                return;
        }
        tls_get()->nmux--;
        wp_free(m);
}

static void mux_kick(struct l7mux *m)
{
        if (m && !m->freeing)
                wp_loop_defer(m->loop, &m->task);
}

static void mux_io_failed(struct l7mux *m, bool connect_failure, const char *why)
{
        if (!m->dead) {
                m->dead = true;
                m->connect_failure = connect_failure && !m->ready;
                m->why = why;
        }
        mux_kick(m);
}

/* t no longer uses m (reset: cancel its stream if it is still open). */
static void mux_detach(struct l7t *t, bool reset)
{
        struct l7mux *m = t->mux;

        if (!m)
                return;
        if (t->usid > 0 && m->h2) {
                wp_h2_set_user(m->h2, t->usid, NULL);
                if (reset)
                        wp_h2_reset(m->h2, t->usid, WP_H2_CANCEL);
        }
        wp_list_del(&t->mux_link);
        m->nusers--;
        t->mux = NULL;
        t->usid = 0;
        t->mux_owed = 0;
        t->up_resp = NULL;
        mux_kick(m);
}

/* Drops the upstream side of the current attempt (HTTP/1.1 connection or HTTP/2 stream). */
static void t_up_drop(struct l7t *t)
{
        if (t->up) {
                up_release(t->up, false);
                t->up = NULL;
        }
        mux_detach(t, true);
}

/* The attempt never reached the upstream (GOAWAY, REFUSED_STREAM): start it again elsewhere
 * without counting it, a few times. Returns false when the caller should fail it instead. */
static bool t_restart_unprocessed(struct l7t *t)
{
        if (t->resp_started || t->refused >= 3 || (t->attempts > 1 && !t->copy_ok) ||
            (!t->req_no_body && !t->copy_ok && t->req_body))
                return false;
        t->refused++;
        t->attempts--;
        mux_detach(t, false);
        if (t->lbst) {
                wp_lb_request_end(t->lbst, t->ep_idx);
                t->lbst = wp_lb_state_unref(t->lbst);
        }
        t_start_attempt(t);
        return true;
}

/* Opens t's stream on the ready session m. Returns false when no stream can be opened now. */
static bool t_mux_open(struct l7mux *m, struct l7t *t)
{
        struct wp_http_request *req = t_req(t);
        int r = t->res.include_attempt_count_in_request ? t_attempt_header(t, &req->headers) : 0;
        int32_t id = r < 0 ? -ENOMEM : wp_h2_request(m->h2, req, t->req_no_body, t);

        if (id == -EAGAIN)
                return false;
        wp_list_del(&t->mux_link);
        if (id < 0) {
                wp_list_add_tail(&m->active, &t->mux_link); /* detached by the failure */
                t_upstream_failed(t, false,
                                  id == -EINVAL ? "request not representable in HTTP/2"
                                                : "out of memory");
                return true;
        }
        wp_list_add_tail(&m->active, &t->mux_link);
        t->usid = id;
        tm_mark(t, &t->tm.up_ready);
        t->tm.up_conn_id = m->io && m->io->hbone ? up_conn_id(m->io) : 0;
        t->up_req_ended = t->req_no_body;
        if (t->attempts > 1 && t->copy.len)
                r = wp_h2_send(m->h2, id, dbuf_data(&t->copy), t->copy.len);
        if (r == 0 && t->req_done && !t->up_req_ended) {
                r = wp_h2_end(m->h2, id, NULL);
                t->up_req_ended = true;
                tm_mark(t, &t->tm.up_tx_end);
        }
        if (r < 0)
                t_upstream_failed(t, false, "out of memory");
        else
                t_process(t); /* more of the request body */
        return true;
}

static void mux_fail_all(struct l7mux *m)
{
        const char *why = m->why ? m->why : "upstream HTTP/2 session ended";

        while (!wp_list_empty(&m->waiting) || !wp_list_empty(&m->active)) {
                struct wp_list *l = !wp_list_empty(&m->waiting) ? &m->waiting : &m->active;
                struct l7t *t = container_of(l->next, struct l7t, mux_link);
                bool waiting = l == &m->waiting;

                mux_detach(t, false);
                if (waiting && m->goaway && !m->connect_failure && t_restart_unprocessed(t))
                        continue;
                t_upstream_failed(t, m->connect_failure, why);
        }
}

static void mux_idle_fire(struct wp_timer *tm)
{
        struct l7mux *m = container_of(tm, struct l7mux, idle_timer);

        m->dead = true;
        m->why = "idle";
        mux_kick(m);
}

static void mux_run(struct wp_task *tk)
{
        struct l7mux *m = container_of(tk, struct l7mux, task);
        struct l7up *io = m->io;

        if (m->freeing) {
                tls_get()->nmux--;
                wp_free(m);
                return;
        }
        if (!m->dead && io && io->rx.len) {
                size_t n = io->rx.len;
                int r = wp_h2_feed(m->h2, dbuf_data(&io->rx), n);

                up_rx_consumed(io, n);
                if (r < 0) {
                        wp_debug("l7", "upstream HTTP/2 %s: %s", m->key, wp_h2_error(m->h2));
                        m->dead = true;
                        m->why = "upstream HTTP/2 protocol error";
                }
        }
        if (!m->dead && m->ready) {
                /* waiting requests get streams while the peer allows */
                while (!wp_list_empty(&m->waiting) && !m->goaway && !m->dead) {
                        struct l7t *t = container_of(m->waiting.next, struct l7t, mux_link);

                        if (!t_mux_open(m, t))
                                break;
                }
                if (m->goaway) {
                        while (!wp_list_empty(&m->waiting)) {
                                struct l7t *t = container_of(m->waiting.next, struct l7t, mux_link);

                                mux_detach(t, false);
                                if (!t_restart_unprocessed(t))
                                        t_upstream_failed(t, false, "upstream went away");
                        }
                }
        }
        /* output, while the transport takes it */
        while (!m->dead && m->ready && io && io->txq.len + io->sbuf.len < L7_UP_TXQ_HIGH) {
                const uint8_t *out;
                ssize_t n = wp_h2_pull(m->h2, &out);

                if (n <= 0) {
                        if (n < 0) {
                                m->dead = true;
                                m->why = "upstream HTTP/2 session failed";
                        }
                        break;
                }
                if (up_send(io, out, (size_t)n) < 0) {
                        m->dead = true;
                        m->why = "out of memory";
                }
        }
        if (!m->dead && m->ready && (wp_h2_finished(m->h2) || (io && io->eof_in))) {
                m->dead = true;
                m->why = io && io->eof_in ? "upstream closed the connection"
                                          : "upstream HTTP/2 session finished";
        }
        if (m->dead) {
                mux_fail_all(m);
                if (!m->nusers) {
                        wp_debug("l7", "upstream HTTP/2 session to %s closed (%s)", m->key,
                                 m->why ? m->why : "-");
                        mux_free(m);
                }
                return;
        }
        if (!m->nusers) {
                if (tls_get()->draining) {
                        m->dead = true;
                        m->why = "drain";
                        mux_kick(m);
                } else if (!wp_timer_armed(&m->idle_timer)) {
                        wp_timer_arm(m->loop, &m->idle_timer, wp_now_ns() + m->idle_ns);
                }
        } else {
                wp_timer_disarm(m->loop, &m->idle_timer);
        }
}

/* ---- HTTP/2 upstream stream callbacks (su: the request) ---- */

static void t_mux_response_done(struct l7t *t, struct wp_headers *trailers)
{
        int r = 0;

        tm_mark(t, &t->tm.up_last);
        if (trailers)
                wp_h1_remove_hop_by_hop(trailers, false);
        t->resp_trailers = trailers;
        if (t->mode == M_H2STREAM) {
                if (!t->down_ended)
                        r = t->h2c ? wp_h2_end(t->h2c->h2, t->sid, trailers) : -EPIPE;
                if (t->h2c)
                        h2c_kick(t->h2c);
        } else if (t->resp_chunked) {
                dbuf_clear(&t->scratch);
                DBUF_WRITE(&t->scratch, wp_h1_write_last_chunk(&wb, trailers), r);
                if (r == 0)
                        r = down_send(t, dbuf_data(&t->scratch), t->scratch.len);
        }
        if (r == 0)
                t_record(t, t->up_resp);
        mux_detach(t, !t->up_req_ended);
        if (r < 0) {
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                return;
        }
        if (!t->req_done)
                t->close_after = true;
        if (t->resp_raw_close)
                t->close_after = true;
        t_request_done(t);
}

static void m_on_response(struct wp_h2 *h, void *su, struct wp_http_response *resp, bool end_stream)
{
        struct l7t *t = su;
        int r;

        (void)h;
        if (resp->status < 200)
                return; /* interim */
        t->up_resp = resp;
        r = t_relay_response_head(t, resp, resp->content_length < 0, end_stream);
        if (r == 1)
                return; /* retried */
        if (r < 0) {
                if (t->resp_started) {
                        t_abort(t, HBONE_H2_INTERNAL_ERROR);
                } else {
                        mux_detach(t, true);
                        t_local_reply(t, 502, "upstream sent an invalid response", NULL, false,
                                      "UPE");
                }
                return;
        }
        if (end_stream)
                t_mux_response_done(t, NULL);
}

static int m_on_data(struct wp_h2 *h, void *su, const uint8_t *d, size_t n)
{
        struct l7t *t = su;

        if (n)
                tm_mark(t, &t->tm.up_body);
        if (t_resp_body(t, d, n) < 0) {
                t_abort(t, HBONE_H2_INTERNAL_ERROR);
                return 0;
        }
        if (down_ready(t))
                wp_h2_consume(h, t->usid, n);
        else
                t->mux_owed += n;
        return 0;
}

static void m_on_end(struct wp_h2 *h, void *su, struct wp_headers *trailers)
{
        (void)h;
        t_mux_response_done(su, trailers);
}

static void m_on_close(struct wp_h2 *h, void *su, uint32_t error)
{
        struct l7t *t = su;

        (void)h;
        wp_debug("l7", "[T%lu] upstream stream %d closed (%u)", (unsigned long)t->id, t->usid,
                 error);
        t->usid = 0;
        mux_detach(t, false);
        if (error == WP_H2_REFUSED_STREAM && t_restart_unprocessed(t))
                return;
        t_upstream_failed(t, false, "upstream reset");
}

static void m_on_writable(struct wp_h2 *h, void *su)
{
        (void)h;
        t_process(su);
}

static void m_on_goaway(struct wp_h2 *h, int32_t last_id, uint32_t error, void *user)
{
        struct l7mux *m = user;

        (void)h;
        wp_debug("l7", "upstream %s: GOAWAY (%u, last stream %d)", m->key, error, last_id);
        m->goaway = true;
        mux_kick(m);
}

static const struct wp_h2_callbacks mux_callbacks = {
        .on_response = m_on_response,
        .on_data = m_on_data,
        .on_end = m_on_end,
        .on_close = m_on_close,
        .on_writable = m_on_writable,
        .on_goaway = m_on_goaway,
};

/* The current attempt goes over an HTTP/2 session to t->ep: a live one of this worker with room
 * for another stream, or a new one. */
static void mux_attach(struct l7t *t)
{
        struct l7_tls *x = tls_get();
        const struct wp_endpoint *ep = t->ep;
        struct l7mux *m = NULL;

        for (struct wp_list *it = x->muxes.next; it != &x->muxes; it = it->next) {
                struct l7mux *c = container_of(it, struct l7mux, link);

                if (c->dead || c->goaway || c->hbone != ep->hbone || c->loop != t->loop ||
                    strcmp(c->key, ep->authority))
                        continue;
                /* room for one more: streams open in order as the peer allows */
                if (c->nusers < (c->ready ? wp_h2_stream_limit(c->h2) : 100)) {
                        m = c;
                        break;
                }
        }
        if (!m) {
                struct wp_h2_limits lim;

                m = wp_calloc(1, sizeof(*m));
                wp_h2_limits_default(&lim);
                if (!m || wp_h2_new(&mux_callbacks, &lim, false, m, &m->h2) < 0) {
                        wp_free(m);
                        t_upstream_failed(t, true, "out of memory");
                        return;
                }
                m->w = t->w;
                m->loop = t->loop;
                m->hbone = ep->hbone;
                snprintf(m->key, sizeof(m->key), "%s", ep->authority);
                wp_list_init(&m->waiting);
                wp_list_init(&m->active);
                m->task.run = mux_run;
                m->idle_timer.on_fire = mux_idle_fire;
                m->idle_ns =
                        (uint64_t)(t->pool_idle_ms ? t->pool_idle_ms : 60000) * WP_NSEC_PER_MSEC;
                wp_list_add_tail(&x->muxes, &m->link);
                x->nmux++;
                x->mux_loop = m->loop;
                wp_debug("l7", "[T%lu] new upstream HTTP/2 session to %s", (unsigned long)t->id,
                         m->key);
                up_connect(t, ep, m); /* failures come back through mux_io_failed */
        }
        wp_timer_disarm(m->loop, &m->idle_timer);
        t->mux = m;
        t->usid = 0;
        m->nusers++;
        wp_list_add_tail(&m->waiting, &t->mux_link);
        mux_kick(m);
}

/* ---- the tunnel ---- */

static void t_free(struct l7t *t)
{
        if (t->mode == M_H2CONN) {
                while (!wp_list_empty(&t->h2streams)) {
                        struct l7t *st = container_of(t->h2streams.next, struct l7t, h2link);

                        wp_list_del(&st->h2link);
                        st->h2c = NULL;
                        t_free(st);
                }
                wp_h2_free(t->h2);
                t->h2 = NULL;
                wp_list_del(&t->h2conn_link);
        } else if (t->mode == M_H2STREAM && t->h2c) {
                wp_list_del(&t->h2link);
                t->h2c = NULL;
        }
        if (t->req_open && t->state == S_REQ)
                t->xflags |= WP_AL_F(DC); /* the downstream went away mid-request */
        t_record(t, !t->resp_started ? NULL
                    : t->up          ? wp_h1_parser_response(t->up->parser)
                                     : t->up_resp);
        t_up_drop(t);
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
        if (t->mode == M_SHADOW) {
                wp_headers_done(&t->sreq.headers);
                wp_free(t->sbuf);
        }
        wp_snapshot_unref(t->snap);
        wp_free(t);
}

/* A struct l7t for the chain's HTTP config: filter state, and an HTTP/1.1 parser if h1. */
static struct l7t *t_alloc(const struct wp_http_conf *http, bool h1)
{
        struct l7t *t = wp_calloc(1, sizeof(*t));
        size_t fsz = 0;

        if (!t)
                return NULL;
        for (size_t i = 0; i < http->nfilters; i++)
                fsz += (http->filters[i].ops->stream_state_size + 15) & ~(size_t)15;
        if ((h1 && wp_h1_parser_new(WP_H1_REQUEST, NULL, &t->parser) < 0) ||
            (fsz && !(t->filter_state = wp_calloc(1, fsz))) ||
            (http->nfilters && !(t->fstreams = wp_calloc(http->nfilters, sizeof(*t->fstreams))))) {
                wp_h1_parser_free(t->parser);
                wp_free(t->filter_state);
                wp_free(t);
                return NULL;
        }
        t->obj.kind = OBJ_TUNNEL;
        t->http = http;
        t->filter_state_size = fsz;
        t->timeout.on_fire = on_timeout;
        t->backoff.on_fire = on_backoff;
        t->per_try.on_fire = on_per_try;
        t->linger.on_fire = on_linger;
        t->state = S_IDLE;
        return t;
}

/* ---- inner HTTP/2 connections ---- */

/* Moves the session's output into the tunnel while it takes it; ends the tunnel once the
 * session is over. */
static void h2c_flush(struct l7t *c)
{
        for (;;) {
                const uint8_t *out;
                ssize_t n;

                if (!c->down || !down_flush(c))
                        return;
                n = wp_h2_pull(c->h2, &out);
                if (n == 0)
                        break;
                if (n < 0 || down_send(c, out, (size_t)n) < 0) {
                        wp_debug("l7", "[T%lu] inner HTTP/2: %s", (unsigned long)c->id,
                                 wp_h2_error(c->h2));
                        c->state = S_CLOSING;
                        hbone_stream_reset(c->down, HBONE_H2_INTERNAL_ERROR);
                        hbone_conn_kick(c->conn);
                        return;
                }
        }
        if (c->state != S_CLOSING &&
            (wp_h2_finished(c->h2) || (c->eof_in && wp_list_empty(&c->h2streams)))) {
                wp_debug("l7", "[T%lu] inner HTTP/2 done%s%s", (unsigned long)c->id,
                         wp_h2_error(c->h2)[0] ? ": " : "", wp_h2_error(c->h2));
                c->state = S_CLOSING;
                down_shutdown(c);
        }
}

static void h2c_task(struct wp_task *tk)
{
        struct l7t *c = container_of(tk, struct l7t, h2flush);

        if (c->h2dead)
                t_free(c);
        else
                h2c_flush(c);
}

static void h2c_kick(struct l7t *c)
{
        if (c && !c->h2dead)
                wp_loop_defer(c->loop, &c->h2flush);
}

static void h2c_input(struct l7t *c, const uint8_t *d, size_t n)
{
        int r = wp_h2_feed(c->h2, d, n);

        if (r < 0)
                wp_debug("l7", "[T%lu] inner HTTP/2 connection error: %s", (unsigned long)c->id,
                         wp_h2_error(c->h2));
        h2c_kick(c);
}

static int h2s_on_request(struct wp_h2 *h, int32_t id, struct wp_http_request *req, bool end_stream,
                          void *user)
{
        struct l7t *c = user;
        struct l7t *t = t_alloc(c->http, false);

        if (!t)
                return -ENOMEM;
        t->mode = M_H2STREAM;
        t->w = c->w;
        t->loop = c->loop;
        t->conn = c->conn;
        t->chain = c->chain;
        t->id = c->id;
        t->pool_idle_ms = c->pool_idle_ms;
        t->connect_timeout_ms = c->connect_timeout_ms;
        t->peer_principal = c->peer_principal;
        t->src = c->src;
        t->dst = c->dst;
        memcpy(t->target, c->target, sizeof(t->target));
        memcpy(t->baggage, c->baggage, sizeof(t->baggage));
        t->snap = wp_snapshot_ref(c->snap);
        t->h2c = c;
        t->sid = id;
        t->h2req = req;
        t->eof_in = end_stream;
        wp_list_add_tail(&c->h2streams, &t->h2link);
        wp_h2_set_user(h, id, t);
        t_on_request_head(t);
        for (uint32_t i = 0; i < req->headers.n; i++)
                t->req_wire += req->headers.v[i].name_len + req->headers.v[i].value_len + 4;
        h2c_kick(c);
        return 0;
}

static int h2s_on_data(struct wp_h2 *h, void *su, const uint8_t *d, size_t n)
{
        struct l7t *t = su;

        (void)h;
        if (dbuf_append(&t->rx, d, n) < 0)
                return -ENOMEM;
        t_process(t);
        return 0;
}

static void h2s_on_end(struct wp_h2 *h, void *su, struct wp_headers *trailers)
{
        struct l7t *t = su;

        (void)h;
        t->eof_in = true;
        t->h2trailers = trailers;
        t_process(t);
}

static void h2s_on_close(struct wp_h2 *h, void *su, uint32_t error)
{
        struct l7t *t = su;

        (void)h;
        if (error && t->state == S_REQ)
                wp_debug("l7", "[T%lu/%d] stream reset by the client (%u)", (unsigned long)t->id,
                         t->sid, error);
        t_free(t);
}

static void h2s_on_writable(struct wp_h2 *h, void *su)
{
        struct l7t *t = su;

        (void)h;
        t_process_up(t);
        t_process(t);
}

static const struct wp_h2_callbacks h2c_callbacks = {
        .on_request = h2s_on_request,
        .on_data = h2s_on_data,
        .on_end = h2s_on_end,
        .on_close = h2s_on_close,
        .on_writable = h2s_on_writable,
};

/* The tunnel starts with the HTTP/2 preface: it becomes an inner HTTP/2 connection. */
static int h2c_start(struct l7t *t)
{
        struct wp_h2_limits lim;
        size_t len = t->rx.len;

        wp_h2_limits_default(&lim);
        if (wp_h2_new(&h2c_callbacks, &lim, true, t, &t->h2) < 0)
                return -ENOMEM;
        t->mode = M_H2CONN;
        wp_list_init(&t->h2streams);
        wp_list_add_tail(&tls_get()->h2conns, &t->h2conn_link);
        t->h2flush.run = h2c_task;
        if (tls_get()->draining)
                wp_h2_goaway(t->h2, WP_H2_NO_ERROR);
        wp_h1_parser_free(t->parser);
        t->parser = NULL;
        wp_debug("l7", "[T%lu] h2c prior knowledge", (unsigned long)t->id);
        h2c_input(t, dbuf_data(&t->rx), len);
        rx_consume(t, len);
        return 0;
}

static int t_on_data(struct l7t *t, const uint8_t *data, size_t len)
{
        if (t->state == S_CLOSING) {
                hbone_stream_consume(t->down, len);
                hbone_conn_kick(t->conn);
                return 0;
        }
        if (t->mode == M_H2CONN) {
                /* the inner session's own flow control bounds what it buffers */
                hbone_stream_consume(t->down, len);
                hbone_conn_kick(t->conn);
                h2c_input(t, data, len);
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
        if (t->mode == M_H2CONN) {
                h2c_kick(t);
                return;
        }
        t_process(t);
}

static void t_on_writable(struct l7t *t)
{
        if (t->mode == M_H2CONN) {
                h2c_flush(t);
                return;
        }
        t_process_up(t);
        t_process(t);
}

static void t_on_close(struct l7t *t)
{
        t->down = NULL;
        if (t->mode == M_H2CONN && t->h2flush.queued) {
                t->h2dead = true; /* freed by the queued task */
                return;
        }
        t_free(t);
}

/* Creates the tunnel's L7 state; the CONNECT is answered 200 unless it was already. */
static struct l7t *l7_start(const struct wp_l7_start *s, const struct wp_chain *chain,
                            const struct sockaddr_storage *dst, const char *target,
                            const char *baggage, bool answered)
{
        const struct wp_http_conf *http = chain->http;
        const struct sockaddr_storage *peer = hbone_conn_peer_addr(s->conn);
        struct l7t *t = t_alloc(http, true);

        if (!t)
                return NULL;
        t->w = s->w;
        t->loop = s->loop;
        t->conn = s->conn;
        t->down = s->st;
        t->chain = chain;
        t->id = s->id;
        t->pool_idle_ms = s->pool_idle_ms;
        t->connect_timeout_ms = s->connect_timeout_ms;
        t->peer_principal = hbone_conn_peer_uri(s->conn);
        if (peer)
                t->src = *peer;
        t->dst = *dst;
        snprintf(t->target, sizeof(t->target), "%s", target);
        if (baggage)
                snprintf(t->baggage, sizeof(t->baggage), "%s", baggage);
        t->snap = wp_snapshot_ref(s->snap);
        hbone_stream_set_user(s->st, TAG(t));
        if (!answered) {
                hbone_stream_respond(s->st, 200, NULL, 0);
                hbone_conn_kick(s->conn);
        }
        wp_debug("l7", "[T%lu] %s -> %s: HTTP chain %s", (unsigned long)t->id,
                 t->peer_principal ? t->peer_principal : "?", t->target, chain->name);
        return t;
}

int wp_l7_tunnel_start(const struct wp_l7_start *s)
{
        struct sockaddr_storage dst = {0};

        memcpy(&dst, &s->req->target.addr, s->req->target.addrlen);
        return l7_start(s, s->chain, &dst, s->req->authority, s->req->baggage, false) ? 0 : -ENOMEM;
}

/* ---- protocol sniffing (Envoy's http_inspector) ---- */

#define SNIFF_MAX 8192 /* an HTTP/1.x request line longer than this is not taken as HTTP */

struct l7sniff {
        struct l7obj obj;
        struct wp_l7_start s; /* s.req is not valid after wp_l7_sniff_start */
        struct sockaddr_storage dst;
        char target[WP_AUTHORITY_MAX];
        char baggage[512];
        struct dbuf rx;
        bool eof;
        struct wp_timer timer;
};

static const char h2_preface_bytes[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

static bool sniff_tchar(uint8_t c)
{
        return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
               (c && strchr("!#$%&'*+-.^_`|~", c));
}

/* The ApplicationProtocolInput value for the first n bytes: "'h2c'", "'http/1.1'",
 * "'http/1.0'", "" (not HTTP), or NULL (undecided: more bytes needed; final: decide now). */
const char *wp_l7_sniff_proto(const uint8_t *p, size_t n, bool final)
{
        size_t i = 0, plen = sizeof(h2_preface_bytes) - 1;

        if (n && memcmp(p, h2_preface_bytes, n < plen ? n : plen) == 0)
                return n >= plen ? "'h2c'" : final ? "" : NULL;
        /* request-line = method SP request-target SP HTTP-version CRLF (RFC 9112 §3) */
        while (i < n && i < 32 && sniff_tchar(p[i]))
                i++;
        if (i == n)
                return final || n >= 32 ? "" : NULL;
        if (i == 0 || p[i] != ' ')
                return "";
        i++;
        while (i < n && p[i] > ' ' && p[i] < 0x7f)
                i++;
        if (i == n)
                return final || n >= SNIFF_MAX ? "" : NULL;
        if (p[i] != ' ')
                return "";
        i++;
        for (size_t k = 0; k < 8; k++, i++) {
                if (i == n)
                        return final ? "" : NULL;
                if (p[i] != (uint8_t) "HTTP/1.x"[k] && !(k == 7 && (p[i] == '0' || p[i] == '1')))
                        return "";
        }
        if (i == n)
                return final ? "" : NULL;
        if (p[i] != '\r' && p[i] != '\n')
                return "";
        return p[i - 1] == '0' ? "'http/1.0'" : "'http/1.1'";
}

static void sniff_free(struct l7sniff *sn)
{
        wp_timer_disarm(sn->s.loop, &sn->timer);
        wp_snapshot_unref(sn->s.snap);
        dbuf_free(&sn->rx);
        wp_free(sn);
}

/* Hands the tunnel over once its protocol is known (or given up on), and frees the sniffer. */
static void sniff_decide(struct l7sniff *sn, const char *proto)
{
        struct hbone_stream *st = sn->s.st;
        bool needs = false;
        const struct wp_chain *ch = wp_snapshot_lookup_proto(
                sn->s.snap, (const struct sockaddr *)&sn->dst, proto, &needs);
        int r = -ENOENT;

        wp_debug("l7", "[T%lu] -> %s: protocol %s after %zu bytes: chain %s",
                 (unsigned long)sn->s.id, sn->target, proto[0] ? proto : "(not HTTP)", sn->rx.len,
                 ch ? ch->name : "none");
        hbone_stream_set_user(st, NULL);
        if (ch && ch->kind == WP_CHAIN_HTTP) {
                struct l7t *t = l7_start(&sn->s, ch, &sn->dst, sn->target,
                                         sn->baggage[0] ? sn->baggage : NULL, true);

                r = t ? 0 : -ENOMEM;
                if (t && sn->rx.len)
                        r = t_on_data(t, dbuf_data(&sn->rx), sn->rx.len) < 0 ? -EPIPE : 0;
                if (t && r == 0 && sn->eof)
                        t_on_eof(t);
        } else if (ch) {
                r = wp_worker_tunnel_adopt(sn->s.w, sn->s.conn, st, sn->target, &sn->dst,
                                           sn->baggage, ch, dbuf_data(&sn->rx), sn->rx.len,
                                           sn->eof);
        }
        if (r == -ENOENT || r == -ENOMEM) {
                /* not served after all (or no memory): the 200 went out, so reset */
                hbone_stream_reset(st, HBONE_H2_CONNECT_ERROR);
                hbone_conn_kick(sn->s.conn);
        }
        sniff_free(sn);
}

static void sniff_timeout(struct wp_timer *tm)
{
        struct l7sniff *sn = container_of(tm, struct l7sniff, timer);

        /* a server-first protocol, or a client slow to speak: not HTTP */
        sniff_decide(sn, wp_l7_sniff_proto(dbuf_data(&sn->rx), sn->rx.len, true));
}

static int sniff_on_data(struct l7sniff *sn, const uint8_t *data, size_t len)
{
        const char *proto;

        if (dbuf_append(&sn->rx, data, len) < 0)
                return -ENOMEM;
        proto = wp_l7_sniff_proto(dbuf_data(&sn->rx), sn->rx.len, false);
        if (proto)
                sniff_decide(sn, proto);
        return 0;
}

int wp_l7_sniff_start(const struct wp_l7_start *s)
{
        struct l7sniff *sn = wp_calloc(1, sizeof(*sn));

        if (!sn)
                return -ENOMEM;
        sn->obj.kind = OBJ_SNIFF;
        sn->s = *s;
        sn->s.req = NULL;
        memcpy(&sn->dst, &s->req->target.addr, s->req->target.addrlen);
        snprintf(sn->target, sizeof(sn->target), "%s", s->req->authority);
        if (s->req->baggage)
                snprintf(sn->baggage, sizeof(sn->baggage), "%s", s->req->baggage);
        sn->s.snap = wp_snapshot_ref(s->snap);
        sn->timer.on_fire = sniff_timeout;
        wp_timer_arm(s->loop, &sn->timer,
                     wp_now_ns() + (uint64_t)(s->sniff_ms ? s->sniff_ms : 1000) * WP_NSEC_PER_MSEC);
        hbone_stream_set_user(s->st, TAG(sn));
        /* Envoy answers the CONNECT before its listener filters read anything */
        hbone_stream_respond(s->st, 200, NULL, 0);
        hbone_conn_kick(s->conn);
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
        if (o->kind == OBJ_SNIFF)
                return sniff_on_data((struct l7sniff *)o, data, len);
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
        if (o->kind == OBJ_TUNNEL) {
                t_on_eof((struct l7t *)o);
        } else if (o->kind == OBJ_SNIFF) {
                struct l7sniff *sn = (struct l7sniff *)o;

                sn->eof = true;
                sniff_decide(sn, wp_l7_sniff_proto(dbuf_data(&sn->rx), sn->rx.len, true));
        } else {
                up_on_eof((struct l7up *)o);
        }
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
        else if (o->kind == OBJ_UP)
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
        else if (o->kind == OBJ_SNIFF)
                sniff_free((struct l7sniff *)o); /* the client gave up before it was sniffed */
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
        for (struct wp_list *it = x->muxes.next; it != &x->muxes; it = it->next)
                mux_kick(container_of(it, struct l7mux, link)); /* idle ones close */
        /* inner HTTP/2 clients: GOAWAY(NO_ERROR); streams in flight complete, then the tunnel
         * ends and the client reconnects (inner HTTP/1.1 gets "connection: close") */
        for (struct wp_list *it = x->h2conns.next; it != &x->h2conns; it = it->next) {
                struct l7t *c = container_of(it, struct l7t, h2conn_link);

                wp_h2_goaway(c->h2, WP_H2_NO_ERROR);
                h2c_kick(c);
        }
}

void wp_l7_worker_done(void)
{
        struct l7_tls *x = tls_get();

        wp_l7_worker_drain();
        /* upstream HTTP/2 sessions end through their (deferred) task: run the loop until the
         * last one is freed */
        for (int i = 0; i < 200 && (x->nmux || x->nmux_io); i++) {
                struct wp_loop *loop = x->mux_loop;

                for (struct wp_list *it = x->muxes.next; it != &x->muxes; it = it->next) {
                        struct l7mux *m = container_of(it, struct l7mux, link);

                        if (!m->dead) {
                                m->dead = true;
                                m->why = "exit";
                        }
                        mux_kick(m);
                }
                wp_loop_run_once(loop, WP_NSEC_PER_MSEC);
        }
        lbst_reset(x);
}
