/*
 * HBONE sessions on nghttp2 (every nghttp2 call of the module lives in this file).
 *
 * Decisions a reader needs (each has a test in tests/unit/hbone/test_session.c):
 *   - `:protocol` (extended CONNECT, RFC 8441): we never advertise SETTINGS_ENABLE_CONNECT_PROTOCOL,
 *     so nghttp2's HTTP messaging rejects the request with RST_STREAM(PROTOCOL_ERROR). The same
 *     happens to a CONNECT carrying `:scheme` or `:path`, or lacking `:authority`.
 *   - a method other than CONNECT (a well-formed request otherwise) is answered 405 + END_STREAM;
 *     an `:authority` hbone_target_parse() rejects, a duplicated baggage/forwarded/traceparent, or a
 *     CONNECT carrying END_STREAM on its HEADERS is answered 400; a header list larger than
 *     max_header_list_size (counted as RFC 9113 §6.5.2 does) is answered 431. A non-2xx answer is
 *     followed by RST_STREAM(NO_ERROR) when the client has not half-closed (RFC 9113 §8.1).
 *   - DATA before the server answered 200 is a client error here (a CONNECT stream carries data
 *     only once "connected", RFC 9113 §8.5): the stream is reset with PROTOCOL_ERROR, its credit
 *     returned at once, and on_tunnel_close(PROTOCOL_ERROR) reported. Nothing is buffered.
 *   - Rapid reset (CVE-2023-44487): RST_STREAMs the peer sends on streams not yet answered, and
 *     empty DATA frames without END_STREAM, are counted per rst_flood_window_ms; beyond
 *     rst_flood_max resets (or 8x that many empty frames) the session sends GOAWAY
 *     ENHANCE_YOUR_CALM and feed returns -EPROTO. nghttp2's own reset limiter stays on as a backstop.
 *   - Connection errors nghttp2 reports from mem_recv (bad preface, floods it detects, allocation
 *     failure) make feed return -EPROTO and queue a GOAWAY. Connection errors nghttp2 handles by
 *     itself (it queues GOAWAY and ignores the rest of the input) show up when that GOAWAY is pulled:
 *     from then on hbone_session_finished() is true and feed returns -EPROTO.
 *   - Drain is one step: GOAWAY(NO_ERROR, last processed stream id); open streams complete.
 *   - Keepalive: one PING in flight at most; the next goes keepalive_interval_ms after the previous
 *     one was sent (and acked).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "hbone/hbone.h"
#include "hbone/internal.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/time.h"

#define NSEC_PER_MSEC 1000000ULL
#define SPARE_CHUNKS_MAX 32
#define EXTRA_HEADERS_STACK 16

/* ---- memory ---- */

static nghttp2_mem ng_mem = {
        .malloc = wp_mem_malloc,
        .free = wp_mem_free,
        .calloc = wp_mem_calloc,
        .realloc = wp_mem_realloc,
};

static const char *h2_error_name(uint32_t code)
{
        switch (code) {
        case HBONE_H2_NO_ERROR:
                return "NO_ERROR";
        case HBONE_H2_PROTOCOL_ERROR:
                return "PROTOCOL_ERROR";
        case HBONE_H2_INTERNAL_ERROR:
                return "INTERNAL_ERROR";
        case HBONE_H2_FLOW_CONTROL_ERROR:
                return "FLOW_CONTROL_ERROR";
        case HBONE_H2_REFUSED_STREAM:
                return "REFUSED_STREAM";
        case HBONE_H2_CANCEL:
                return "CANCEL";
        case HBONE_H2_CONNECT_ERROR:
                return "CONNECT_ERROR";
        case HBONE_H2_ENHANCE_YOUR_CALM:
                return "ENHANCE_YOUR_CALM";
        default:
                return "error";
        }
}

static void set_error(struct hbone_session *s, const char *fmt, const char *a, const char *b)
{
        snprintf(s->err, sizeof(s->err), fmt, a, b);
}

/* ---- send queue ---- */

static struct hbone_chunk *chunk_get(struct hbone_session *s)
{
        struct hbone_chunk *c = s->spare;

        if (c) {
                s->spare = c->next;
                s->nspare--;
        } else {
                c = wp_malloc(sizeof(*c));
                if (!c)
                        return NULL;
        }
        c->next = NULL;
        c->r = c->w = 0;
        return c;
}

static void chunk_put(struct hbone_session *s, struct hbone_chunk *c)
{
        if (s->nspare < SPARE_CHUNKS_MAX) {
                c->next = s->spare;
                s->spare = c;
                s->nspare++;
        } else {
                wp_free(c);
        }
}

static void queue_clear(struct hbone_stream *st)
{
        struct hbone_chunk *c = st->qhead, *next;

        for (; c; c = next) {
                next = c->next;
                chunk_put(st->session, c);
        }
        st->qhead = st->qtail = NULL;
        st->queued = 0;
}

/* ---- streams ---- */

static void wlist_del(struct hbone_stream *st)
{
        struct hbone_session *s = st->session;

        if (!st->on_wlist)
                return;
        if (st->wprev)
                st->wprev->wnext = st->wnext;
        else
                s->wlist = st->wnext;
        if (st->wnext)
                st->wnext->wprev = st->wprev;
        st->wprev = st->wnext = NULL;
        st->on_wlist = false;
}

static void wlist_add(struct hbone_stream *st)
{
        struct hbone_session *s = st->session;

        if (st->on_wlist)
                return;
        st->wprev = NULL;
        st->wnext = s->wlist;
        if (s->wlist)
                s->wlist->wprev = st;
        s->wlist = st;
        st->on_wlist = true;
}

static void hdr_release(struct hbone_stream *st)
{
        for (size_t i = 0; i < _HBONE_HDR_MAX; i++) {
                if (st->hdr[i]) {
                        nghttp2_rcbuf_decref(st->hdr[i]);
                        st->hdr[i] = NULL;
                }
        }
}

static struct hbone_stream *stream_new(struct hbone_session *s)
{
        struct hbone_stream *st = wp_calloc(1, sizeof(*st));

        if (!st)
                return NULL;
        st->session = s;
        st->next = s->streams;
        if (s->streams)
                s->streams->prev = st;
        s->streams = st;
        s->nstreams++;
        return st;
}

/* Unlinks and frees; does not talk to nghttp2 or the user. */
static void stream_free(struct hbone_stream *st)
{
        struct hbone_session *s = st->session;

        wlist_del(st);
        queue_clear(st);
        hdr_release(st);
        if (st->prev)
                st->prev->next = st->next;
        else
                s->streams = st->next;
        if (st->next)
                st->next->prev = st->prev;
        s->nstreams--;
        wp_free(st);
}

static struct hbone_stream *stream_get(struct hbone_session *s, int32_t id)
{
        return nghttp2_session_get_stream_user_data(s->ng, id);
}

static void stream_rst(struct hbone_stream *st, uint32_t code)
{
        if (st->reset || st->closed)
                return;
        st->reset = true;
        queue_clear(st);
        nghttp2_submit_rst_stream(st->session->ng, NGHTTP2_FLAG_NONE, st->id, code);
}

/* ---- data provider ---- */

static ssize_t on_data_read(nghttp2_session *ng, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *data_flags, nghttp2_data_source *source, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st = source->ptr;
        size_t n = 0;

        if (!st || st->reset) {
                /* our RST_STREAM is queued: nothing more to send */
                if (st)
                        st->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        /* client: nothing goes out before the 200 (RFC 9113 §8.5) */
        if (!s->server && !st->established) {
                st->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        while (n < length && st->qhead) {
                struct hbone_chunk *c = st->qhead;
                size_t k = c->w - c->r;

                if (k > length - n)
                        k = length - n;
                memcpy(buf + n, c->data + c->r, k);
                c->r += k;
                n += k;
                if (c->r == c->w) {
                        st->qhead = c->next;
                        if (!st->qhead)
                                st->qtail = NULL;
                        chunk_put(s, c);
                }
        }
        st->queued -= n;
        if (st->want_writable && st->queued < s->lim.stream_send_buffer / 2)
                wlist_add(st);
        if (st->queued == 0 && st->shutdown) {
                *data_flags |= NGHTTP2_DATA_FLAG_EOF;
                st->provider = false;
                return (ssize_t)n;
        }
        if (n == 0) {
                st->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        return (ssize_t)n;
}

static void stream_kick(struct hbone_stream *st)
{
        if (st->deferred && st->provider && !st->reset && !st->closed &&
            (st->session->server || st->established)) {
                st->deferred = false;
                nghttp2_session_resume_data(st->session->ng, st->id);
        }
}

/* ---- abuse accounting ---- */

static void flood_window(struct hbone_session *s)
{
        uint64_t now = wp_now_ns(); /* feed() has no time argument: read the clock */

        if (now - s->flood_window_start_ns > (uint64_t)s->lim.rst_flood_window_ms * NSEC_PER_MSEC) {
                s->flood_window_start_ns = now;
                s->rst_count = 0;
                s->empty_data_count = 0;
        }
}

/* Returns nonzero when the peer crossed a limit (the caller fails the callback). */
static int count_rst(struct hbone_session *s)
{
        flood_window(s);
        if (++s->rst_count > s->lim.rst_flood_max) {
                s->fatal_code = HBONE_H2_ENHANCE_YOUR_CALM;
                set_error(s, "GOAWAY %s: %s", "ENHANCE_YOUR_CALM", "rst flood");
                return 1;
        }
        return 0;
}

static int count_empty_data(struct hbone_session *s)
{
        flood_window(s);
        if (++s->empty_data_count > 8 * (uint64_t)s->lim.rst_flood_max) {
                s->fatal_code = HBONE_H2_ENHANCE_YOUR_CALM;
                set_error(s, "GOAWAY %s: %s", "ENHANCE_YOUR_CALM", "empty DATA flood");
                return 1;
        }
        return 0;
}

/* ---- responses (server) ---- */

static int submit_response(struct hbone_stream *st, unsigned status, const struct hbone_header *extra,
                           size_t nextra)
{
        struct hbone_session *s = st->session;
        nghttp2_nv stack[EXTRA_HEADERS_STACK + 1], *nva = stack;
        nghttp2_data_provider prd;
        char code[4];
        int rv;

        if (nextra > EXTRA_HEADERS_STACK) {
                nva = wp_malloc((nextra + 1) * sizeof(*nva));
                if (!nva)
                        return -ENOMEM;
        }
        snprintf(code, sizeof(code), "%03u", status);
        nva[0] = (nghttp2_nv){(uint8_t *)":status", (uint8_t *)code, 7, 3, NGHTTP2_NV_FLAG_NONE};
        for (size_t i = 0; i < nextra; i++)
                nva[i + 1] = (nghttp2_nv){(uint8_t *)extra[i].name, (uint8_t *)extra[i].value,
                                          strlen(extra[i].name), strlen(extra[i].value),
                                          NGHTTP2_NV_FLAG_NONE};
        prd.source.ptr = st;
        prd.read_callback = on_data_read;
        rv = nghttp2_submit_response(s->ng, st->id, nva, nextra + 1, status == 200 ? &prd : NULL);
        if (nva != stack)
                wp_free(nva);
        if (rv != 0)
                return rv == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EINVAL;
        st->answered = true;
        if (status == 200) {
                st->established = true;
                st->provider = true;
        } else {
                queue_clear(st);
                /* RFC 9113 §8.1: a server that answers before the request is complete may
                 * RST_STREAM(NO_ERROR) so the client stops sending. Submitted once the HEADERS
                 * went out (on_frame_send): nghttp2 drops HEADERS queued behind a RST_STREAM. */
                st->rst_after_response = !st->eof_seen;
        }
        return 0;
}

static int header_is_extra_ok(const struct hbone_header *h)
{
        if (!h->name || !h->value || !h->name[0] || h->name[0] == ':')
                return 0;
        for (const char *p = h->name; *p; p++)
                if (*p >= 'A' && *p <= 'Z')
                        return 0;
        return 1;
}

static const char *hdr_str(struct hbone_stream *st, int i)
{
        /* nghttp2 NUL-terminates header values it decodes */
        return st->hdr[i] ? (const char *)nghttp2_rcbuf_get_buf(st->hdr[i]).base : NULL;
}

static void process_request(struct hbone_session *s, struct hbone_stream *st, bool end_stream)
{
        struct hbone_request req;
        nghttp2_vec m, a;

        if (end_stream)
                st->eof_seen = true;
        if (st->hdr_too_big) {
                submit_response(st, 431, NULL, 0);
                goto out;
        }
        if (!st->hdr[HBONE_HDR_METHOD] || !st->hdr[HBONE_HDR_AUTHORITY]) {
                /* nghttp2's messaging rules make this unreachable for CONNECT; be safe */
                stream_rst(st, NGHTTP2_PROTOCOL_ERROR);
                goto out;
        }
        m = nghttp2_rcbuf_get_buf(st->hdr[HBONE_HDR_METHOD]);
        if (m.len != 7 || memcmp(m.base, "CONNECT", 7) != 0) {
                submit_response(st, 405, NULL, 0);
                goto out;
        }
        a = nghttp2_rcbuf_get_buf(st->hdr[HBONE_HDR_AUTHORITY]);
        memset(&req, 0, sizeof(req));
        if (st->hdr_bad || end_stream ||
            hbone_target_parse((const char *)a.base, a.len, &req.target) < 0) {
                submit_response(st, 400, NULL, 0);
                goto out;
        }
        req.authority = (const char *)a.base;
        req.baggage = hdr_str(st, HBONE_HDR_BAGGAGE);
        req.forwarded = hdr_str(st, HBONE_HDR_FORWARDED);
        req.traceparent = hdr_str(st, HBONE_HDR_TRACEPARENT);
        if (!s->cb.on_tunnel_request || s->cb.on_tunnel_request(s, st, &req, s->user) < 0) {
                submit_response(st, 503, NULL, 0);
                goto out;
        }
        st->known = true;
out:
        hdr_release(st);
}

/* ---- nghttp2 callbacks ---- */

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st;

        if (!s->server || frame->hd.type != NGHTTP2_HEADERS ||
            frame->headers.cat != NGHTTP2_HCAT_REQUEST)
                return 0;
        st = stream_new(s);
        if (!st)
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* RST_STREAM INTERNAL_ERROR */
        st->id = frame->hd.stream_id;
        if (nghttp2_session_set_stream_user_data(ng, st->id, st) != 0) {
                stream_free(st);
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        return 0;
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *frame, nghttp2_rcbuf *name,
                     nghttp2_rcbuf *value, uint8_t flags, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st;
        nghttp2_vec n = nghttp2_rcbuf_get_buf(name), v = nghttp2_rcbuf_get_buf(value);
        int idx = -1;

        if (frame->hd.type != NGHTTP2_HEADERS)
                return 0;
        st = stream_get(s, frame->hd.stream_id);
        if (!st || st->answered)
                return 0; /* trailers on a tunnel: nghttp2 checks them, we ignore them */
        st->hdr_bytes += n.len + v.len + 32;
        if (st->hdr_bytes > s->lim.max_header_list_size) {
                st->hdr_too_big = true;
                hdr_release(st);
                return 0;
        }
        if (st->hdr_too_big)
                return 0;

        if (!s->server) {
                if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE && n.len == 7 &&
                    memcmp(n.base, ":status", 7) == 0) {
                        /* nghttp2 has checked it is three digits */
                        unsigned code = 0;

                        for (size_t i = 0; i < v.len; i++)
                                code = code * 10 + (unsigned)(v.base[i] - '0');
                        st->status = code;
                }
                return 0;
        }
        if (frame->headers.cat != NGHTTP2_HCAT_REQUEST)
                return 0;
        if (n.len == 7 && memcmp(n.base, ":method", 7) == 0)
                idx = HBONE_HDR_METHOD;
        else if (n.len == 10 && memcmp(n.base, ":authority", 10) == 0)
                idx = HBONE_HDR_AUTHORITY;
        else if (n.len == 7 && memcmp(n.base, "baggage", 7) == 0)
                idx = HBONE_HDR_BAGGAGE;
        else if (n.len == 9 && memcmp(n.base, "forwarded", 9) == 0)
                idx = HBONE_HDR_FORWARDED;
        else if (n.len == 11 && memcmp(n.base, "traceparent", 11) == 0)
                idx = HBONE_HDR_TRACEPARENT;
        if (idx < 0)
                return 0;
        if (st->hdr[idx]) {
                st->hdr_bad = true;
                return 0;
        }
        nghttp2_rcbuf_incref(value);
        st->hdr[idx] = value;
        return 0;
}

static void process_response(struct hbone_session *s, struct hbone_stream *st, bool end_stream)
{
        unsigned status = st->status;

        if (status / 100 == 1)
                return; /* interim; nghttp2 waits for the final one */
        st->answered = true;
        if (st->reset)
                return;
        if (status == 200 && !end_stream) {
                st->established = true;
                if (s->cb.on_tunnel_response)
                        s->cb.on_tunnel_response(st, status, st->user);
                stream_kick(st);
                return;
        }
        if (s->cb.on_tunnel_response)
                s->cb.on_tunnel_response(st, status, st->user);
        /* not a tunnel: finish the stream; on_tunnel_close reports CANCEL (or the peer's RST) */
        stream_rst(st, NGHTTP2_CANCEL);
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st = NULL;
        bool end_stream = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;

        if (frame->hd.stream_id)
                st = stream_get(s, frame->hd.stream_id);

        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
                if (!st)
                        return 0;
                if (s->server && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
                        process_request(s, st, end_stream);
                        return 0;
                }
                if (!s->server && frame->headers.cat == NGHTTP2_HCAT_RESPONSE) {
                        process_response(s, st, end_stream);
                        return 0;
                }
                break;
        case NGHTTP2_DATA:
                if (frame->hd.length == 0 && !end_stream && count_empty_data(s))
                        return NGHTTP2_ERR_CALLBACK_FAILURE;
                break;
        case NGHTTP2_RST_STREAM:
                if ((!st || !st->answered) && count_rst(s))
                        return NGHTTP2_ERR_CALLBACK_FAILURE;
                return 0;
        case NGHTTP2_GOAWAY:
                s->goaway_recv = true;
                if (frame->goaway.error_code != NGHTTP2_NO_ERROR) {
                        char dbg[64];
                        size_t k = frame->goaway.opaque_data_len;

                        if (k >= sizeof(dbg))
                                k = sizeof(dbg) - 1;
                        for (size_t i = 0; i < k; i++) {
                                uint8_t c = frame->goaway.opaque_data[i];
                                dbg[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
                        }
                        dbg[k] = 0;
                        set_error(s, "GOAWAY %s received: %s",
                                  h2_error_name(frame->goaway.error_code), dbg);
                }
                if (s->cb.on_goaway)
                        s->cb.on_goaway(s, frame->goaway.error_code, s->user);
                return 0;
        case NGHTTP2_PING:
                if ((frame->hd.flags & NGHTTP2_FLAG_ACK) && s->ping_outstanding) {
                        uint64_t v;

                        memcpy(&v, frame->ping.opaque_data, sizeof(v));
                        if (v == s->ping_counter)
                                s->ping_outstanding = false;
                }
                return 0;
        default:
                return 0;
        }

        /* END_STREAM on HEADERS (trailers) or DATA of a tunnel */
        if (end_stream && st && st->known && !st->eof_seen && !st->reset) {
                st->eof_seen = true;
                if (s->cb.on_tunnel_eof)
                        s->cb.on_tunnel_eof(st, st->user);
        }
        return 0;
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st = stream_get(s, stream_id);

        if (!st || !st->known || st->reset || st->closed) {
                nghttp2_session_consume(ng, stream_id, len);
                return 0;
        }
        if (!st->established) {
                /* DATA before the 200 (see the top of this file) */
                nghttp2_session_consume(ng, stream_id, len);
                stream_rst(st, NGHTTP2_PROTOCOL_ERROR);
                return 0;
        }
        st->unconsumed += len;
        if (s->cb.on_tunnel_data && s->cb.on_tunnel_data(st, data, len, st->user) < 0) {
                /* the user refused the bytes: their credit comes back now */
                if (st->unconsumed >= len) {
                        st->unconsumed -= len;
                        nghttp2_session_consume(ng, stream_id, len);
                }
                stream_rst(st, NGHTTP2_CONNECT_ERROR);
        }
        return 0;
}

static int on_stream_close(nghttp2_session *ng, int32_t stream_id, uint32_t error_code, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st = stream_get(s, stream_id);

        if (!st)
                return 0;
        st->closed = true;
        if (st->known && s->cb.on_tunnel_close)
                s->cb.on_tunnel_close(st, error_code, st->user);
        /* credit the user never returned must not shrink the connection window forever */
        if (st->unconsumed)
                nghttp2_session_consume_connection(ng, st->unconsumed);
        nghttp2_session_set_stream_user_data(ng, stream_id, NULL);
        stream_free(st);
        return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct hbone_session *s = ud;
        struct hbone_stream *st;

        if (frame->hd.type == NGHTTP2_HEADERS && s->server) {
                st = stream_get(s, frame->hd.stream_id);
                if (st && st->rst_after_response) {
                        st->rst_after_response = false;
                        stream_rst(st, NGHTTP2_NO_ERROR);
                }
                return 0;
        }
        if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
                s->dead = true;
                if (!s->err[0])
                        set_error(s, "GOAWAY %s sent%s", h2_error_name(frame->goaway.error_code),
                                  "");
        }
        return 0;
}

/* ---- session ---- */

void hbone_limits_default(struct hbone_limits *lim)
{
        *lim = (struct hbone_limits){
                .max_concurrent_streams = 100,
                .initial_stream_window = 4u << 20,
                .initial_conn_window = 16u << 20,
                .max_frame_size = 16384,
                .max_header_list_size = 16384,
                .stream_send_buffer = 256u << 10,
                .keepalive_interval_ms = 10000,
                .keepalive_timeout_ms = 20000,
                .rst_flood_max = 100,
                .rst_flood_window_ms = 1000,
        };
}

static void limits_sanitize(struct hbone_limits *l)
{
        struct hbone_limits d;

        hbone_limits_default(&d);
        if (!l->max_concurrent_streams)
                l->max_concurrent_streams = d.max_concurrent_streams;
        if (!l->initial_stream_window || l->initial_stream_window > NGHTTP2_MAX_WINDOW_SIZE)
                l->initial_stream_window = d.initial_stream_window;
        if (l->initial_conn_window < NGHTTP2_INITIAL_CONNECTION_WINDOW_SIZE ||
            l->initial_conn_window > NGHTTP2_MAX_WINDOW_SIZE)
                l->initial_conn_window = d.initial_conn_window;
        if (l->max_frame_size < 16384 || l->max_frame_size > 16777215)
                l->max_frame_size = d.max_frame_size;
        if (!l->max_header_list_size)
                l->max_header_list_size = d.max_header_list_size;
        if (!l->stream_send_buffer)
                l->stream_send_buffer = d.stream_send_buffer;
        if (!l->rst_flood_max)
                l->rst_flood_max = d.rst_flood_max;
        if (!l->rst_flood_window_ms)
                l->rst_flood_window_ms = d.rst_flood_window_ms;
}

int hbone_session_new(const struct hbone_callbacks *cb, const struct hbone_limits *lim,
                      bool server, void *session_user, struct hbone_session **ret)
{
        nghttp2_session_callbacks *cbs;
        nghttp2_option *opt;
        struct hbone_session *s;
        nghttp2_settings_entry iv[6];
        size_t niv = 0;
        int rv;

        if (!cb || !ret)
                return -EINVAL;
        s = wp_calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->cb = *cb;
        if (lim)
                s->lim = *lim;
        limits_sanitize(&s->lim);
        s->server = server;
        s->user = session_user;
        s->flood_window_start_ns = wp_now_ns();

        if (nghttp2_session_callbacks_new(&cbs) != 0)
                goto err_free_session;
        nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, on_begin_headers);
        nghttp2_session_callbacks_set_on_header_callback2(cbs, on_header);
        nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, on_frame_recv);
        nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, on_data_chunk);
        nghttp2_session_callbacks_set_on_stream_close_callback(cbs, on_stream_close);
        nghttp2_session_callbacks_set_on_frame_send_callback(cbs, on_frame_send);

        if (nghttp2_option_new(&opt) != 0)
                goto err_free_callbacks;
        nghttp2_option_set_no_auto_window_update(opt, 1);
        nghttp2_option_set_no_closed_streams(opt, 1);
        nghttp2_option_set_max_send_header_block_length(opt, 65536);
        nghttp2_option_set_max_deflate_dynamic_table_size(opt, 4096);
        nghttp2_option_set_max_outbound_ack(opt, 1000);
        nghttp2_option_set_max_settings(opt, 32);
        nghttp2_option_set_peer_max_concurrent_streams(opt, s->lim.max_concurrent_streams);
        nghttp2_option_set_max_reserved_remote_streams(opt, 0);
        /* backstop only: our own counter (count_rst) is stricter and explains itself */
        nghttp2_option_set_stream_reset_rate_limit(opt, 4 * (uint64_t)s->lim.rst_flood_max,
                                                   s->lim.rst_flood_max);

        if (server)
                rv = nghttp2_session_server_new3(&s->ng, cbs, s, opt, &ng_mem);
        else
                rv = nghttp2_session_client_new3(&s->ng, cbs, s, opt, &ng_mem);
        nghttp2_option_del(opt);
        nghttp2_session_callbacks_del(cbs);
        cbs = NULL;
        if (rv != 0)
                goto err_free_session;

        if (server)
                iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS,
                                                     s->lim.max_concurrent_streams};
        iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                                             s->lim.initial_stream_window};
        iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_FRAME_SIZE, s->lim.max_frame_size};
        iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE,
                                             s->lim.max_header_list_size};
        iv[niv++] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_ENABLE_PUSH, 0};
        if (nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, niv) != 0)
                goto err_free_ng;
        if (nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0,
                                                  (int32_t)s->lim.initial_conn_window) != 0)
                goto err_free_ng;
        *ret = s;
        return 0;

err_free_ng:
        nghttp2_session_del(s->ng);
        goto err_free_session;
err_free_callbacks:
        nghttp2_session_callbacks_del(cbs);
err_free_session:
        wp_free(s);
        return -ENOMEM;
}

static void session_release(struct hbone_session *s)
{
        struct hbone_chunk *c, *next;

        /* header buffers belong to nghttp2's allocator: give them back before it goes */
        for (struct hbone_stream *st = s->streams; st; st = st->next)
                hdr_release(st);
        nghttp2_session_del(s->ng);
        while (s->streams)
                stream_free(s->streams);
        for (c = s->spare; c; c = next) {
                next = c->next;
                wp_free(c);
        }
        wp_free(s);
}

struct hbone_session *hbone_session_free(struct hbone_session *s)
{
        if (s)
                session_release(s);
        return NULL;
}

struct hbone_session *hbone_session_abort(struct hbone_session *s)
{
        struct hbone_stream *st;

        if (!s)
                return NULL;
        for (st = s->streams; st; st = st->next) {
                if (st->known && !st->closed && s->cb.on_tunnel_close) {
                        st->closed = true;
                        s->cb.on_tunnel_close(st, HBONE_H2_CANCEL, st->user);
                }
        }
        session_release(s);
        return NULL;
}

static void fail_session(struct hbone_session *s, int ngerr)
{
        uint32_t code = s->fatal_code;

        if (!code)
                code = ngerr == NGHTTP2_ERR_FLOODED ? NGHTTP2_ENHANCE_YOUR_CALM
                       : ngerr == NGHTTP2_ERR_NOMEM ? NGHTTP2_INTERNAL_ERROR
                                                    : NGHTTP2_PROTOCOL_ERROR;
        if (!s->err[0])
                set_error(s, "GOAWAY %s: %s", h2_error_name(code), nghttp2_strerror(ngerr));
        s->dead = true;
        nghttp2_session_terminate_session(s->ng, code);
}

ssize_t hbone_session_feed(struct hbone_session *s, const uint8_t *in, size_t len)
{
        ssize_t rv;

        if (s->dead)
                return -EPROTO;
        rv = nghttp2_session_mem_recv(s->ng, in, len);
        if (rv < 0) {
                fail_session(s, (int)rv);
                return -EPROTO;
        }
        return rv;
}

static void notify_writable(struct hbone_session *s)
{
        while (s->wlist) {
                struct hbone_stream *st = s->wlist;

                wlist_del(st);
                st->want_writable = false;
                if (st->known && !st->reset && !st->closed && s->cb.on_tunnel_writable)
                        s->cb.on_tunnel_writable(st, st->user);
        }
}

ssize_t hbone_session_pull(struct hbone_session *s, const uint8_t **ret_data)
{
        const uint8_t *data;
        ssize_t rv;

        rv = nghttp2_session_mem_send(s->ng, &data);
        if (rv < 0) {
                s->dead = true;
                if (!s->err[0])
                        set_error(s, "%s%s", "send: ", nghttp2_strerror((int)rv));
                return -EPROTO;
        }
        /* after mem_send: callbacks may queue bytes but cannot invalidate data */
        notify_writable(s);
        *ret_data = data;
        return rv;
}

bool hbone_session_want_write(const struct hbone_session *s)
{
        return nghttp2_session_want_write(s->ng) != 0;
}

bool hbone_session_finished(const struct hbone_session *s)
{
        return s->dead ||
               (!nghttp2_session_want_read(s->ng) && !nghttp2_session_want_write(s->ng));
}

int hbone_session_tick(struct hbone_session *s, uint64_t now_ns, uint64_t *ret_next_ns)
{
        uint64_t interval = (uint64_t)s->lim.keepalive_interval_ms * NSEC_PER_MSEC;
        uint64_t timeout = (uint64_t)s->lim.keepalive_timeout_ms * NSEC_PER_MSEC;
        uint64_t next;

        if (!s->ticked) {
                s->ticked = true;
                s->last_ok_ns = now_ns;
        }
        if (s->ping_outstanding) {
                if (timeout && now_ns - s->ping_sent_ns >= timeout) {
                        set_error(s, "%s%s", "keepalive timeout", "");
                        s->dead = true;
                        return -ETIMEDOUT;
                }
                next = timeout ? s->ping_sent_ns + timeout : UINT64_MAX;
        } else {
                /* acked (or never sent): the interval counts from the last PING sent */
                if (s->ping_sent_ns > s->last_ok_ns)
                        s->last_ok_ns = s->ping_sent_ns;
                if (!interval || s->dead) {
                        next = UINT64_MAX;
                } else if (now_ns - s->last_ok_ns >= interval) {
                        uint8_t opaque[8];

                        s->ping_counter++;
                        memcpy(opaque, &s->ping_counter, sizeof(opaque));
                        if (nghttp2_submit_ping(s->ng, NGHTTP2_FLAG_NONE, opaque) == 0) {
                                s->ping_outstanding = true;
                                s->ping_sent_ns = now_ns;
                        }
                        next = now_ns + (timeout ? timeout : interval);
                } else {
                        next = s->last_ok_ns + interval;
                }
        }
        if (ret_next_ns)
                *ret_next_ns = next;
        return 0;
}

void hbone_session_drain(struct hbone_session *s)
{
        if (s->goaway_sent || s->dead)
                return;
        if (nghttp2_submit_goaway(s->ng, NGHTTP2_FLAG_NONE,
                                  nghttp2_session_get_last_proc_stream_id(s->ng), NGHTTP2_NO_ERROR,
                                  NULL, 0) == 0)
                s->goaway_sent = true;
}

bool hbone_session_goaway_received(const struct hbone_session *s)
{
        return s->goaway_recv;
}

unsigned hbone_session_open_streams(const struct hbone_session *s)
{
        return s->nstreams;
}

unsigned hbone_session_streams_available(const struct hbone_session *s)
{
        uint32_t peer;

        if (s->server || s->goaway_recv || s->goaway_sent || s->dead)
                return 0;
        peer = nghttp2_session_get_remote_settings(s->ng, NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS);
        if (peer > s->lim.max_concurrent_streams)
                peer = s->lim.max_concurrent_streams;
        return peer > s->nstreams ? peer - s->nstreams : 0;
}

const char *hbone_session_error(const struct hbone_session *s)
{
        return s->err;
}

int hbone_session_open(struct hbone_session *s, const char *authority,
                       const struct hbone_header *extra, size_t nextra, void *stream_user,
                       struct hbone_stream **ret)
{
        nghttp2_nv stack[EXTRA_HEADERS_STACK + 2], *nva = stack;
        struct hbone_target t;
        struct hbone_stream *st;
        nghttp2_data_provider prd;
        int32_t id;
        int r;

        if (s->server || !authority || (nextra && !extra) || !ret)
                return -EINVAL;
        if (s->goaway_recv || s->goaway_sent || s->dead)
                return -ENOTCONN;
        if (hbone_target_parse(authority, strlen(authority), &t) < 0)
                return -EINVAL;
        for (size_t i = 0; i < nextra; i++)
                if (!header_is_extra_ok(&extra[i]))
                        return -EINVAL;
        if (hbone_session_streams_available(s) == 0)
                return -EAGAIN;
        if (nextra > EXTRA_HEADERS_STACK) {
                nva = wp_malloc((nextra + 2) * sizeof(*nva));
                if (!nva)
                        return -ENOMEM;
        }
        st = stream_new(s);
        if (!st) {
                r = -ENOMEM;
                goto out;
        }
        st->user = stream_user;
        st->known = true;
        st->provider = true;
        nva[0] = (nghttp2_nv){(uint8_t *)":method", (uint8_t *)"CONNECT", 7, 7,
                              NGHTTP2_NV_FLAG_NONE};
        nva[1] = (nghttp2_nv){(uint8_t *)":authority", (uint8_t *)authority, 10,
                              strlen(authority), NGHTTP2_NV_FLAG_NONE};
        for (size_t i = 0; i < nextra; i++)
                nva[i + 2] = (nghttp2_nv){(uint8_t *)extra[i].name, (uint8_t *)extra[i].value,
                                          strlen(extra[i].name), strlen(extra[i].value),
                                          NGHTTP2_NV_FLAG_NONE};
        prd.source.ptr = st;
        prd.read_callback = on_data_read;
        id = nghttp2_submit_request(s->ng, NULL, nva, nextra + 2, &prd, st);
        if (id < 0) {
                stream_free(st);
                r = id == NGHTTP2_ERR_NOMEM                     ? -ENOMEM
                    : id == NGHTTP2_ERR_STREAM_ID_NOT_AVAILABLE ? -ENOTCONN
                    : id == NGHTTP2_ERR_START_STREAM_NOT_ALLOWED ? -ENOTCONN
                                                                 : -EINVAL;
                goto out;
        }
        st->id = id;
        *ret = st;
        r = 0;
out:
        if (nva != stack)
                wp_free(nva);
        return r;
}

/* ---- streams: public ---- */

int hbone_stream_respond(struct hbone_stream *st, unsigned status, const struct hbone_header *extra,
                         size_t nextra)
{
        if (!st->session->server || st->answered || st->reset || st->closed || status < 200 ||
            status > 999 || (nextra && !extra))
                return -EINVAL;
        for (size_t i = 0; i < nextra; i++)
                if (!header_is_extra_ok(&extra[i]))
                        return -EINVAL;
        return submit_response(st, status, extra, nextra);
}

ssize_t hbone_stream_write(struct hbone_stream *st, const uint8_t *data, size_t len)
{
        struct hbone_session *s = st->session;
        size_t space, n = 0;

        if (st->shutdown || st->reset || st->closed || (st->answered && !st->established))
                return -EPIPE;
        if (len == 0)
                return 0;
        space = s->lim.stream_send_buffer > st->queued ? s->lim.stream_send_buffer - st->queued : 0;
        if (space == 0) {
                st->want_writable = true;
                return -EAGAIN;
        }
        if (len > space)
                len = space;
        while (n < len) {
                struct hbone_chunk *c = st->qtail;
                size_t k;

                if (!c || c->w == HBONE_CHUNK_SIZE) {
                        c = chunk_get(s);
                        if (!c)
                                break;
                        if (st->qtail)
                                st->qtail->next = c;
                        else
                                st->qhead = c;
                        st->qtail = c;
                }
                k = HBONE_CHUNK_SIZE - c->w;
                if (k > len - n)
                        k = len - n;
                memcpy(c->data + c->w, data + n, k);
                c->w += k;
                n += k;
        }
        if (n == 0)
                return -ENOMEM;
        st->queued += n;
        if (st->queued >= s->lim.stream_send_buffer)
                st->want_writable = true;
        stream_kick(st);
        return (ssize_t)n;
}

int hbone_stream_shutdown(struct hbone_stream *st)
{
        if (st->reset || st->closed)
                return -EPIPE;
        if (st->shutdown)
                return 0;
        st->shutdown = true;
        stream_kick(st);
        return 0;
}

void hbone_stream_reset(struct hbone_stream *st, uint32_t h2_error)
{
        stream_rst(st, h2_error);
}

void hbone_stream_consume(struct hbone_stream *st, size_t n)
{
        struct hbone_session *s = st->session;

        if (n > st->unconsumed)
                n = st->unconsumed;
        if (n == 0)
                return;
        st->unconsumed -= n;
        if (st->closed)
                nghttp2_session_consume_connection(s->ng, n);
        else
                nghttp2_session_consume(s->ng, st->id, n);
}

size_t hbone_stream_queued(const struct hbone_stream *st)
{
        return st->queued;
}

int32_t hbone_stream_id(const struct hbone_stream *st)
{
        return st->id;
}

void hbone_stream_set_user(struct hbone_stream *st, void *stream_user)
{
        st->user = stream_user;
}

void *hbone_stream_get_user(const struct hbone_stream *st)
{
        return st->user;
}

struct hbone_session *hbone_stream_session(const struct hbone_stream *st)
{
        return st->session;
}
