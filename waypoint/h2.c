/*
 * HTTP/2 inside tunnels on nghttp2 (see h2.h for the decisions).
 *
 * A stream collects its header fields (names and values copied into a per-section buffer)
 * while nghttp2 reports them, and builds the wp_http_request / wp_http_response once the
 * HEADERS frame is complete, so the strings handed to the user never move. The send side
 * is a byte queue per stream drained by an nghttp2 data provider; trailers are submitted from
 * the provider when the queue is empty and the user ended the stream.
 */
#include "waypoint/h2.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/list.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"

static nghttp2_mem ng_mem = {
        .malloc = wp_mem_malloc,
        .free = wp_mem_free,
        .calloc = wp_mem_calloc,
        .realloc = wp_mem_realloc,
};

struct fld {
        uint32_t no, nl, vo, vl;
};

/* The fields of one header section, as received. */
struct coll {
        char *b;
        size_t len, cap;
        struct fld *f;
        uint32_t n, fcap;
};

struct h2s {
        struct wp_h2 *h;
        int32_t id;
        void *user;
        struct wp_list link; /* wp_h2.streams */
        /* receive */
        struct coll head, trl, *cur;
        size_t hdr_bytes;
        bool too_big;
        bool final_seen; /* client: the final response head arrived */
        bool notified;   /* the user knows the stream (callbacks go to it) */
        bool remote_end; /* END_STREAM received */
        size_t unconsumed;
        struct wp_http_request req;
        struct wp_http_response resp;
        struct wp_headers trailers;
        /* send */
        uint8_t *q;
        size_t qoff, qlen, qcap;
        bool provider; /* a data provider is attached */
        bool deferred;
        bool end_queued;
        bool local_end; /* our END_STREAM is framed (or the provider returned EOF) */
        bool reset;
        bool rst_after; /* RST_STREAM(NO_ERROR) once our END_STREAM is sent */
        bool writable_pending;
        bool want_writable;
        nghttp2_nv *tnv; /* trailers to send */
        size_t ntnv;
};

struct wp_h2 {
        nghttp2_session *ng;
        struct wp_h2_callbacks cb;
        struct wp_h2_limits lim;
        void *user;
        bool server;
        bool fatal;
        bool goaway_recv;
        bool flood;
        uint32_t fatal_code;
        char err[128];
        uint64_t flood_start_ns;
        uint32_t rst_count;
        struct wp_list streams;
        unsigned nstreams;
};

void wp_h2_limits_default(struct wp_h2_limits *lim)
{
        *lim = (struct wp_h2_limits){
                .max_concurrent_streams = 100,
                .initial_stream_window = 1u << 20,
                .initial_conn_window = 8u << 20,
                .max_header_list_size = 60u << 10,
                .stream_send_buffer = 64u << 10,
                .rst_flood_max = 100,
                .rst_flood_window_ms = 1000,
        };
}

/* ---- streams ---- */

static void coll_free(struct coll *c)
{
        wp_free(c->b);
        wp_free(c->f);
        *c = (struct coll){0};
}

static struct h2s *stream_new(struct wp_h2 *h, int32_t id)
{
        struct h2s *s = wp_calloc(1, sizeof(*s));

        if (!s)
                return NULL;
        s->h = h;
        s->id = id;
        s->cur = &s->head;
        wp_headers_init(&s->req.headers);
        wp_headers_init(&s->resp.headers);
        wp_headers_init(&s->trailers);
        wp_list_add_tail(&h->streams, &s->link);
        h->nstreams++;
        return s;
}

static void stream_free(struct h2s *s)
{
        wp_list_del(&s->link);
        s->h->nstreams--;
        coll_free(&s->head);
        coll_free(&s->trl);
        wp_headers_done(&s->req.headers);
        wp_headers_done(&s->resp.headers);
        wp_headers_done(&s->trailers);
        wp_free(s->q);
        wp_free(s->tnv);
        wp_free(s);
}

static struct h2s *stream_get(const struct wp_h2 *h, int32_t id)
{
        struct h2s *s;

        if (id <= 0)
                return NULL;
        s = nghttp2_session_get_stream_user_data(h->ng, id);
        if (s || h->server)
                return s;
        /* client: nghttp2 creates the stream when its HEADERS go out */
        for (const struct wp_list *it = h->streams.next; it != &h->streams; it = it->next)
                if (container_of(it, struct h2s, link)->id == id)
                        return container_of(it, struct h2s, link);
        return NULL;
}

static void set_error(struct wp_h2 *h, const char *what)
{
        if (!h->err[0])
                snprintf(h->err, sizeof(h->err), "%s", what);
}

/* Makes room for need more bytes after used ones in *buf (capacity *cap, doubling from first). */
static int grow(void **buf, size_t *cap, size_t used, size_t need, size_t first)
{
        size_t nc = *cap ? *cap : first;
        void *p;

        if (*cap - used >= need)
                return 0;
        while (nc - used < need)
                nc *= 2;
        p = wp_realloc(*buf, nc);
        if (!p)
                return -ENOMEM;
        *buf = p;
        *cap = nc;
        return 0;
}

static int coll_add(struct coll *c, const uint8_t *n, size_t nl, const uint8_t *v, size_t vl)
{
        size_t need = nl + vl + 2;

        if (grow((void **)&c->b, &c->cap, c->len, need, 512) < 0)
                return -ENOMEM;
        if (c->n == c->fcap) {
                uint32_t nf = c->fcap ? c->fcap * 2 : 16;
                struct fld *f = wp_realloc(c->f, nf * sizeof(*f));

                if (!f)
                        return -ENOMEM;
                c->f = f;
                c->fcap = nf;
        }
        c->f[c->n] = (struct fld){(uint32_t)c->len, (uint32_t)nl, (uint32_t)(c->len + nl + 1),
                                  (uint32_t)vl};
        memcpy(c->b + c->len, n, nl);
        c->b[c->len + nl] = 0;
        memcpy(c->b + c->len + nl + 1, v, vl);
        c->b[c->len + nl + 1 + vl] = 0;
        c->len += need;
        c->n++;
        return 0;
}

static void coll_reset(struct coll *c)
{
        c->len = 0;
        c->n = 0;
}

/* Regular fields of c into list; pseudo-headers are passed to pseudo(). */
static int coll_build(const struct coll *c, struct wp_headers *list)
{
        for (uint32_t i = 0; i < c->n; i++) {
                const struct fld *f = &c->f[i];

                if (c->b[f->no] == ':')
                        continue;
                if (wp_headers_add(list, c->b + f->no, f->nl, c->b + f->vo, f->vl) < 0)
                        return -ENOMEM;
        }
        return 0;
}

static const char *coll_pseudo(const struct coll *c, const char *name)
{
        for (uint32_t i = 0; i < c->n; i++)
                if (!strcmp(c->b + c->f[i].no, name))
                        return c->b + c->f[i].vo;
        return NULL;
}

static int64_t parse_content_length(const struct wp_headers *hs)
{
        uint32_t n;
        const char *v = wp_headers_get(hs, "content-length", &n);
        int64_t r = 0;

        if (!v || !n)
                return -1;
        for (uint32_t i = 0; i < n; i++) {
                if (v[i] < '0' || v[i] > '9' || r > (INT64_MAX - 9) / 10)
                        return -1;
                r = r * 10 + (v[i] - '0');
        }
        return r;
}

/* ---- sending ---- */

/* Fields that never go out in HTTP/2 (connection-specific ones, RFC 9113 §8.2.2; upper-case
 * names), and the ones the codec writes itself (host becomes :authority, content-length comes
 * from the message struct). */
static bool skip_out(const char *name, uint32_t nl, const char *value)
{
        static const char *const drop[] = {"connection",        "keep-alive", "proxy-connection",
                                           "transfer-encoding", "upgrade",    "host",
                                           "content-length"};

        if (!nl || name[0] == ':')
                return true;
        for (uint32_t i = 0; i < nl; i++)
                if (name[i] >= 'A' && name[i] <= 'Z')
                        return true;
        for (size_t i = 0; i < sizeof(drop) / sizeof(drop[0]); i++)
                if (strlen(drop[i]) == nl && !memcmp(drop[i], name, nl))
                        return true;
        if (nl == 2 && !memcmp(name, "te", 2))
                return strcmp(value, "trailers") != 0;
        return false;
}

#define NV(n, v, nl, vl)                                                                           \
        ((nghttp2_nv){(uint8_t *)(n), (uint8_t *)(v), (nl), (vl), NGHTTP2_NV_FLAG_NONE})

/* nva for a header list plus up to nextra leading pseudo fields (filled by the caller). */
static nghttp2_nv *nva_new(const struct wp_headers *hs, size_t nextra, size_t *ret_n)
{
        nghttp2_nv *nva = wp_calloc((hs ? hs->n : 0) + nextra + 1, sizeof(*nva));
        size_t n = nextra;

        if (!nva)
                return NULL;
        for (uint32_t i = 0; hs && i < hs->n; i++) {
                const struct wp_header *x = &hs->v[i];

                if (skip_out(x->name, x->name_len, x->value))
                        continue;
                nva[n++] = NV(x->name, x->value, x->name_len, x->value_len);
        }
        *ret_n = n;
        return nva;
}

static void stream_wake(struct h2s *s)
{
        if (s->deferred && s->provider && !s->reset) {
                s->deferred = false;
                nghttp2_session_resume_data(s->h->ng, s->id);
        }
}

static ssize_t on_data_read(nghttp2_session *ng, int32_t id, uint8_t *buf, size_t length,
                            uint32_t *flags, nghttp2_data_source *src, void *ud)
{
        struct h2s *s = src->ptr;
        struct wp_h2 *h = ud;
        size_t n = s->qlen < length ? s->qlen : length;

        (void)ng;
        (void)id;
        if (s->reset) {
                s->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        if (n)
                memcpy(buf, s->q + s->qoff, n);
        s->qoff += n;
        s->qlen -= n;
        if (!s->qlen)
                s->qoff = 0;
        if (s->want_writable && s->qlen < h->lim.stream_send_buffer / 2)
                s->writable_pending = true;
        if (!s->qlen && s->end_queued) {
                *flags |= NGHTTP2_DATA_FLAG_EOF;
                s->provider = false;
                s->local_end = true;
                if (s->ntnv) {
                        if (nghttp2_submit_trailer(ng, s->id, s->tnv, s->ntnv) == 0)
                                *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
                        wp_free(s->tnv);
                        s->tnv = NULL;
                        s->ntnv = 0;
                }
                return (ssize_t)n;
        }
        if (!n) {
                s->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        return (ssize_t)n;
}

int wp_h2_respond(struct wp_h2 *h, int32_t id, const struct wp_http_response *resp, bool end_stream)
{
        struct h2s *s = stream_get(h, id);
        char code[4], cl[24];
        size_t n;
        nghttp2_nv *nva;
        nghttp2_data_provider prd = {.source.ptr = s, .read_callback = on_data_read};
        int rv;

        if (!s || s->reset)
                return -ENOENT;
        if (resp->status < 100 || resp->status > 999)
                return -EINVAL;
        nva = nva_new(&resp->headers, 1, &n);
        if (!nva)
                return -ENOMEM;
        snprintf(code, sizeof(code), "%u", resp->status);
        nva[0] = NV(":status", code, 7, 3);
        if (resp->content_length >= 0 && !resp->chunked && resp->status != 204 &&
            resp->status / 100 != 1) {
                int k = snprintf(cl, sizeof(cl), "%lld", (long long)resp->content_length);

                nva[n++] = NV("content-length", cl, 14, (size_t)k);
        }
        if (resp->status / 100 == 1) {
                rv = nghttp2_submit_headers(h->ng, NGHTTP2_FLAG_NONE, id, NULL, nva, n, NULL);
                wp_free(nva);
                return rv < 0 ? (rv == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EINVAL) : 0;
        }
        rv = nghttp2_submit_response(h->ng, id, nva, n, end_stream ? NULL : &prd);
        wp_free(nva);
        if (rv != 0)
                return rv == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EINVAL;
        if (end_stream) {
                s->local_end = true;
                s->end_queued = true;
        } else {
                s->provider = true;
        }
        if (!s->remote_end)
                s->rst_after = true;
        return 0;
}

int32_t wp_h2_request(struct wp_h2 *h, const struct wp_http_request *req, bool end_stream, void *su)
{
        struct h2s *s;
        size_t n;
        char cl[24];
        nghttp2_nv *nva;
        nghttp2_data_provider prd = {.read_callback = on_data_read};
        int32_t id;

        if (h->server || !req->method || !req->path || !req->authority ||
            !strcmp(req->method, "CONNECT"))
                return -EINVAL;
        if (!wp_h2_can_open(h))
                return -EAGAIN;
        s = stream_new(h, 0);
        if (!s)
                return -ENOMEM;
        nva = nva_new(&req->headers, 4, &n);
        if (!nva) {
                stream_free(s);
                return -ENOMEM;
        }
        nva[0] = NV(":method", req->method, 7, strlen(req->method));
        nva[1] = NV(":scheme", req->scheme ? req->scheme : "http", 7,
                    strlen(req->scheme ? req->scheme : "http"));
        nva[2] = NV(":authority", req->authority, 10, strlen(req->authority));
        nva[3] = NV(":path", req->path, 5, strlen(req->path));
        if (req->content_length >= 0 && !req->chunked) {
                int k = snprintf(cl, sizeof(cl), "%lld", (long long)req->content_length);

                nva[n++] = NV("content-length", cl, 14, (size_t)k);
        }
        prd.source.ptr = s;
        id = nghttp2_submit_request(h->ng, NULL, nva, n, end_stream ? NULL : &prd, s);
        wp_free(nva);
        if (id < 0) {
                stream_free(s);
                return id == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EINVAL;
        }
        s->id = id;
        s->user = su;
        s->notified = true;
        if (end_stream) {
                s->local_end = true;
                s->end_queued = true;
        } else {
                s->provider = true;
        }
        return id;
}

int wp_h2_send(struct wp_h2 *h, int32_t id, const void *d, size_t n)
{
        struct h2s *s = stream_get(h, id);

        if (!s || s->reset || s->end_queued)
                return -EPIPE;
        if (!n)
                return 0;
        if (s->qcap - s->qoff - s->qlen < n && s->qoff) {
                memmove(s->q, s->q + s->qoff, s->qlen);
                s->qoff = 0;
        }
        if (grow((void **)&s->q, &s->qcap, s->qoff + s->qlen, n, 4096) < 0)
                return -ENOMEM;
        memcpy(s->q + s->qoff + s->qlen, d, n);
        s->qlen += n;
        if (s->qlen >= h->lim.stream_send_buffer / 2)
                s->want_writable = true;
        stream_wake(s);
        return 0;
}

int wp_h2_end(struct wp_h2 *h, int32_t id, const struct wp_headers *trailers)
{
        struct h2s *s = stream_get(h, id);

        if (!s || s->reset || s->end_queued)
                return -EPIPE;
        if (trailers && trailers->n) {
                size_t n, total = 0;
                nghttp2_nv *nva = nva_new(trailers, 0, &n);
                char *p;

                if (!nva)
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++)
                        total += nva[i].namelen + nva[i].valuelen + 2;
                /* one block: the array, then the strings */
                p = wp_malloc(n * sizeof(*nva) + total + 1);
                if (!p) {
                        wp_free(nva);
                        return -ENOMEM;
                }
                s->tnv = (nghttp2_nv *)(void *)p;
                p += n * sizeof(*nva);
                for (size_t i = 0; i < n; i++) {
                        s->tnv[i] = nva[i];
                        memcpy(p, nva[i].name, nva[i].namelen);
                        p[nva[i].namelen] = 0;
                        s->tnv[i].name = (uint8_t *)p;
                        p += nva[i].namelen + 1;
                        memcpy(p, nva[i].value, nva[i].valuelen);
                        p[nva[i].valuelen] = 0;
                        s->tnv[i].value = (uint8_t *)p;
                        p += nva[i].valuelen + 1;
                }
                s->ntnv = n;
                wp_free(nva);
        }
        s->end_queued = true;
        stream_wake(s);
        return 0;
}

size_t wp_h2_queued(const struct wp_h2 *h, int32_t id)
{
        const struct h2s *s = stream_get(h, id);

        return s ? s->qlen : 0;
}

void wp_h2_reset(struct wp_h2 *h, int32_t id, uint32_t code)
{
        struct h2s *s = stream_get(h, id);

        if (!s || s->reset)
                return;
        s->reset = true;
        s->qlen = 0;
        nghttp2_submit_rst_stream(h->ng, NGHTTP2_FLAG_NONE, id, code);
}

void wp_h2_consume(struct wp_h2 *h, int32_t id, size_t n)
{
        struct h2s *s = stream_get(h, id);

        if (!s || !n)
                return;
        if (n > s->unconsumed)
                n = s->unconsumed;
        s->unconsumed -= n;
        nghttp2_session_consume(h->ng, id, n);
}

void wp_h2_goaway(struct wp_h2 *h, uint32_t code)
{
        if (code == WP_H2_NO_ERROR)
                nghttp2_submit_goaway(h->ng, NGHTTP2_FLAG_NONE,
                                      nghttp2_session_get_last_proc_stream_id(h->ng),
                                      NGHTTP2_NO_ERROR, NULL, 0);
        else
                nghttp2_session_terminate_session(h->ng, code);
}

unsigned wp_h2_stream_limit(const struct wp_h2 *h)
{
        uint32_t peer_max;

        if (h->server || h->fatal || h->goaway_recv ||
            !nghttp2_session_check_request_allowed(h->ng))
                return 0;
        peer_max =
                nghttp2_session_get_remote_settings(h->ng, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
        return peer_max < h->lim.max_concurrent_streams ? peer_max : h->lim.max_concurrent_streams;
}

bool wp_h2_can_open(const struct wp_h2 *h)
{
        return h->nstreams < wp_h2_stream_limit(h);
}

unsigned wp_h2_nstreams(const struct wp_h2 *h)
{
        return h->nstreams;
}

void wp_h2_set_user(struct wp_h2 *h, int32_t id, void *su)
{
        struct h2s *s = stream_get(h, id);

        if (s) {
                s->user = su;
                s->notified = su != NULL;
        }
}

/* ---- receiving ---- */

/* Answers a request the codec refuses by itself (431, 400): no body. */
static void local_answer(struct wp_h2 *h, struct h2s *s, unsigned status)
{
        struct wp_http_response resp = {.status = status, .content_length = 0};

        wp_headers_init(&resp.headers);
        if (wp_h2_respond(h, s->id, &resp, true) < 0)
                wp_h2_reset(h, s->id, WP_H2_INTERNAL_ERROR);
}

static bool path_ok(const char *method, const char *path)
{
        if (!path || !path[0])
                return false;
        if (path[0] == '/')
                return true;
        return !strcmp(path, "*") && !strcmp(method, "OPTIONS");
}

static void process_request(struct wp_h2 *h, struct h2s *s, bool end_stream)
{
        struct coll *c = &s->head;
        struct wp_http_request *req = &s->req;
        uint32_t hl;
        int rv;

        s->remote_end = end_stream;
        if (s->too_big) {
                local_answer(h, s, 431);
                return;
        }
        req->method = coll_pseudo(c, ":method");
        req->scheme = coll_pseudo(c, ":scheme");
        req->authority = coll_pseudo(c, ":authority");
        req->path = coll_pseudo(c, ":path");
        req->version = WP_HTTP_2;
        if (coll_build(c, &req->headers) < 0) {
                wp_h2_reset(h, s->id, WP_H2_INTERNAL_ERROR);
                return;
        }
        if (!req->authority || !req->authority[0]) {
                req->authority = wp_headers_get(&req->headers, "host", &hl);
                if (req->authority && !hl)
                        req->authority = NULL;
        }
        if (!req->method) {
                wp_h2_reset(h, s->id, WP_H2_PROTOCOL_ERROR);
                return;
        }
        req->upgrade = !strcmp(req->method, "CONNECT");
        if (!req->authority || (!req->upgrade && !path_ok(req->method, req->path))) {
                local_answer(h, s, 400);
                return;
        }
        wp_headers_remove(&req->headers, "host");
        req->content_length = parse_content_length(&req->headers);
        wp_headers_remove(&req->headers, "content-length");
        req->chunked = false;
        if (!h->cb.on_request) {
                wp_h2_reset(h, s->id, WP_H2_REFUSED_STREAM);
                return;
        }
        rv = h->cb.on_request(h, s->id, req, end_stream, h->user);
        if (rv < 0)
                wp_h2_reset(h, s->id, WP_H2_REFUSED_STREAM);
}

static void process_response(struct wp_h2 *h, struct h2s *s, bool end_stream)
{
        struct coll *c = &s->head;
        struct wp_http_response *resp = &s->resp;
        const char *st = coll_pseudo(c, ":status");
        unsigned code = 0;

        if (s->too_big || !st) {
                wp_h2_reset(h, s->id, WP_H2_PROTOCOL_ERROR); /* on_close reports it */
                return;
        }
        for (const char *p = st; *p; p++)
                code = code * 10 + (unsigned)(*p - '0'); /* nghttp2 checked: three digits */
        wp_headers_done(&resp->headers);
        wp_headers_init(&resp->headers);
        resp->status = code;
        resp->version = WP_HTTP_2;
        if (coll_build(c, &resp->headers) < 0) {
                wp_h2_reset(h, s->id, WP_H2_INTERNAL_ERROR);
                return;
        }
        resp->content_length = parse_content_length(&resp->headers);
        wp_headers_remove(&resp->headers, "content-length");
        resp->chunked = false;
        if (code >= 200)
                s->final_seen = true;
        s->remote_end = end_stream;
        if (s->notified && h->cb.on_response)
                h->cb.on_response(h, s->user, resp, end_stream);
}

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s;

        if (frame->hd.type != NGHTTP2_HEADERS)
                return 0;
        if (h->server && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
                s = stream_new(h, frame->hd.stream_id);
                if (!s)
                        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
                if (nghttp2_session_set_stream_user_data(ng, s->id, s) != 0) {
                        stream_free(s);
                        return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
                }
                return 0;
        }
        s = stream_get(h, frame->hd.stream_id);
        if (!s)
                return 0;
        s->hdr_bytes = 0;
        s->too_big = false;
        if (!h->server && !s->final_seen) {
                s->cur = &s->head;
                coll_reset(&s->head);
        } else {
                s->cur = &s->trl;
                coll_reset(&s->trl);
        }
        return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *frame, nghttp2_rcbuf *name,
                     nghttp2_rcbuf *value, uint8_t flags, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s;
        nghttp2_vec n = nghttp2_rcbuf_get_buf(name), v = nghttp2_rcbuf_get_buf(value);

        (void)ng;
        (void)flags;
        if (frame->hd.type != NGHTTP2_HEADERS)
                return 0;
        s = stream_get(h, frame->hd.stream_id);
        if (!s || s->too_big)
                return 0;
        s->hdr_bytes += n.len + v.len + 32;
        if (s->hdr_bytes > h->lim.max_header_list_size) {
                s->too_big = true;
                return 0;
        }
        if (coll_add(s->cur, n.base, n.len, v.base, v.len) < 0)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        return 0;
}

static int count_rst(struct wp_h2 *h)
{
        uint64_t now = wp_now_ns();

        if (now - h->flood_start_ns > (uint64_t)h->lim.rst_flood_window_ms * WP_NSEC_PER_MSEC) {
                h->flood_start_ns = now;
                h->rst_count = 0;
        }
        if (++h->rst_count > h->lim.rst_flood_max) {
                h->flood = true;
                set_error(h, "GOAWAY ENHANCE_YOUR_CALM: rst flood");
                return 1;
        }
        return 0;
}

static void deliver_end(struct wp_h2 *h, struct h2s *s, struct wp_headers *trailers)
{
        if (s->remote_end)
                return;
        s->remote_end = true;
        if (s->notified && !s->reset && h->cb.on_end)
                h->cb.on_end(h, s->user, trailers);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s = stream_get(h, frame->hd.stream_id);
        bool end_stream = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;

        (void)ng;
        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
                if (!s || s->reset)
                        return 0;
                if (s->cur == &s->head) {
                        if (h->server)
                                process_request(h, s, end_stream);
                        else
                                process_response(h, s, end_stream);
                        return 0;
                }
                /* trailers (nghttp2 checked they carry END_STREAM and no pseudo-header) */
                if (s->too_big) {
                        wp_h2_reset(h, s->id, WP_H2_PROTOCOL_ERROR);
                        return 0;
                }
                wp_headers_done(&s->trailers);
                wp_headers_init(&s->trailers);
                if (coll_build(&s->trl, &s->trailers) < 0) {
                        wp_h2_reset(h, s->id, WP_H2_INTERNAL_ERROR);
                        return 0;
                }
                deliver_end(h, s, &s->trailers);
                return 0;
        case NGHTTP2_DATA:
                if (s && end_stream)
                        deliver_end(h, s, NULL);
                return 0;
        case NGHTTP2_RST_STREAM:
                if (h->server && (!s || !s->local_end) && count_rst(h))
                        return NGHTTP2_ERR_CALLBACK_FAILURE;
                return 0;
        case NGHTTP2_GOAWAY:
                h->goaway_recv = true;
                if (h->cb.on_goaway)
                        h->cb.on_goaway(h, frame->goaway.last_stream_id, frame->goaway.error_code,
                                        h->user);
                return 0;
        default:
                return 0;
        }
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t id, const uint8_t *data,
                         size_t len, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s = stream_get(h, id);

        (void)flags;
        if (!s || !s->notified || s->reset) {
                nghttp2_session_consume(ng, id, len);
                return 0;
        }
        s->unconsumed += len;
        if (h->cb.on_data && h->cb.on_data(h, s->user, data, len) < 0) {
                s->unconsumed -= len;
                nghttp2_session_consume(ng, id, len);
                wp_h2_reset(h, id, WP_H2_INTERNAL_ERROR);
        }
        return 0;
}

static int on_stream_close(nghttp2_session *ng, int32_t id, uint32_t error, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s = stream_get(h, id);

        if (!s)
                return 0;
        if (s->notified && h->cb.on_close)
                h->cb.on_close(h, s->user, error);
        if (s->unconsumed)
                nghttp2_session_consume_connection(ng, s->unconsumed);
        nghttp2_session_set_stream_user_data(ng, id, NULL);
        stream_free(s);
        return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct wp_h2 *h = ud;
        struct h2s *s;

        if ((frame->hd.type == NGHTTP2_HEADERS || frame->hd.type == NGHTTP2_DATA) &&
            (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
                s = stream_get(h, frame->hd.stream_id);
                if (s && s->rst_after && !s->remote_end && !s->reset) {
                        s->rst_after = false;
                        s->reset = true;
                        nghttp2_submit_rst_stream(ng, NGHTTP2_FLAG_NONE, s->id, NGHTTP2_NO_ERROR);
                }
        }
        if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
                h->fatal = true;
                set_error(h, "GOAWAY sent");
        }
        return 0;
}

/* ---- session ---- */

int wp_h2_new(const struct wp_h2_callbacks *cb, const struct wp_h2_limits *lim, bool server,
              void *conn_user, struct wp_h2 **ret)
{
        struct wp_h2 *h = wp_calloc(1, sizeof(*h));
        nghttp2_session_callbacks *cbs = NULL;
        nghttp2_option *opt = NULL;
        nghttp2_settings_entry iv[5];
        int rv = -1;

        if (!h)
                return -ENOMEM;
        h->cb = *cb;
        h->user = conn_user;
        wp_list_init(&h->streams);
        h->server = server;
        wp_h2_limits_default(&h->lim);
        if (lim) {
                if (lim->max_concurrent_streams)
                        h->lim.max_concurrent_streams = lim->max_concurrent_streams;
                if (lim->initial_stream_window &&
                    lim->initial_stream_window <= NGHTTP2_MAX_WINDOW_SIZE)
                        h->lim.initial_stream_window = lim->initial_stream_window;
                if (lim->initial_conn_window >= NGHTTP2_INITIAL_CONNECTION_WINDOW_SIZE &&
                    lim->initial_conn_window <= NGHTTP2_MAX_WINDOW_SIZE)
                        h->lim.initial_conn_window = lim->initial_conn_window;
                if (lim->max_header_list_size)
                        h->lim.max_header_list_size = lim->max_header_list_size;
                if (lim->stream_send_buffer)
                        h->lim.stream_send_buffer = lim->stream_send_buffer;
                if (lim->rst_flood_max)
                        h->lim.rst_flood_max = lim->rst_flood_max;
                if (lim->rst_flood_window_ms)
                        h->lim.rst_flood_window_ms = lim->rst_flood_window_ms;
        }
        h->flood_start_ns = wp_now_ns();
        if (nghttp2_session_callbacks_new(&cbs) != 0 || nghttp2_option_new(&opt) != 0)
                goto out;
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
        nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
        nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);
        nghttp2_option_set_no_auto_window_update(opt, 1);
        nghttp2_option_set_no_closed_streams(opt, 1);
        nghttp2_option_set_max_send_header_block_length(opt, 65536);
        nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
        nghttp2_option_set_max_outbound_ack(opt, 1000);
        nghttp2_option_set_max_settings(opt, 32);
        nghttp2_option_set_max_reserved_remote_streams(opt, 0);
        nghttp2_option_set_stream_reset_rate_limit(opt, 4 * (uint64_t)h->lim.rst_flood_max,
                                                   4 * (uint64_t)h->lim.rst_flood_max);
        if (!server)
                nghttp2_option_set_peer_max_concurrent_streams(opt, h->lim.max_concurrent_streams);
        rv = server ? nghttp2_session_server_new3(&h->ng, cbs, h, opt, &ng_mem)
                    : nghttp2_session_client_new3(&h->ng, cbs, h, opt, &ng_mem);
        if (rv != 0) {
                h->ng = NULL;
                goto out;
        }
        iv[0] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
                                         h->lim.max_concurrent_streams};
        iv[1] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                                         h->lim.initial_stream_window};
        iv[2] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
                                         h->lim.max_header_list_size};
        iv[3] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_ENABLE_PUSH, 0};
        rv = nghttp2_submit_settings(h->ng, NGHTTP2_FLAG_NONE, iv, 4);
        if (rv == 0)
                rv = nghttp2_session_set_local_window_size(h->ng, NGHTTP2_FLAG_NONE, 0,
                                                           (int32_t)h->lim.initial_conn_window);
out:
        if (cbs)
                nghttp2_session_callbacks_del(cbs);
        if (opt)
                nghttp2_option_del(opt);
        if (rv != 0) {
                wp_h2_free(h);
                return -ENOMEM;
        }
        *ret = h;
        return 0;
}

void wp_h2_free(struct wp_h2 *h)
{
        if (!h)
                return;
        if (h->ng)
                nghttp2_session_del(h->ng);
        while (!wp_list_empty(&h->streams))
                stream_free(container_of(h->streams.next, struct h2s, link));
        wp_free(h);
}

int wp_h2_feed(struct wp_h2 *h, const uint8_t *in, size_t len)
{
        ssize_t rv;

        if (h->fatal)
                return -EPROTO;
        rv = nghttp2_session_mem_recv(h->ng, in, len);
        if (rv >= 0 && !h->flood)
                return 0;
        h->fatal = true;
        if (h->flood) {
                nghttp2_session_terminate_session(h->ng, NGHTTP2_ENHANCE_YOUR_CALM);
                return -EPROTO;
        }
        set_error(h, nghttp2_strerror((int)rv));
        if (rv == NGHTTP2_ERR_NOMEM) {
                nghttp2_session_terminate_session(h->ng, NGHTTP2_INTERNAL_ERROR);
                return -ENOMEM;
        }
        nghttp2_session_terminate_session(h->ng, NGHTTP2_PROTOCOL_ERROR);
        return -EPROTO;
}

ssize_t wp_h2_pull(struct wp_h2 *h, const uint8_t **out)
{
        ssize_t n = nghttp2_session_mem_send(h->ng, out);

        if (n < 0) {
                h->fatal = true;
                set_error(h, nghttp2_strerror((int)n));
                return n == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EPROTO;
        }
        if (n == 0) {
                /* the frames went out: tell the streams that drained */
                for (struct wp_list *it = h->streams.next, *next; it != &h->streams; it = next) {
                        struct h2s *s = container_of(it, struct h2s, link);

                        next = it->next;
                        if (s->writable_pending) {
                                s->writable_pending = false;
                                s->want_writable = false;
                                if (s->notified && !s->reset && h->cb.on_writable)
                                        h->cb.on_writable(h, s->user);
                        }
                }
                if (nghttp2_session_want_write(h->ng))
                        n = nghttp2_session_mem_send(h->ng, out);
                if (n < 0) {
                        h->fatal = true;
                        return -EPROTO;
                }
        }
        return n;
}

bool wp_h2_finished(const struct wp_h2 *h)
{
        if (h->fatal)
                return !nghttp2_session_want_write(h->ng);
        return !nghttp2_session_want_read(h->ng) && !nghttp2_session_want_write(h->ng);
}

const char *wp_h2_error(const struct wp_h2 *h)
{
        return h->err;
}
