/*
 * gRPC client sessions on nghttp2 (every nghttp2 call of xds-client lives in this file).
 *
 * Decisions a reader needs (each has a test in tests/unit/xds-client/test_grpc.c):
 *   - Receiving: DATA bytes are parsed as they arrive; only the message in progress is held, in a
 *     buffer allocated once its 5-byte prefix has been read and its length checked against
 *     max_message. A larger message cancels the stream (RST_STREAM CANCEL) and ends it with
 *     RESOURCE_EXHAUSTED; a compressed one (flag 1, we never offer grpc-encoding) or a flag other
 *     than 0/1 with INTERNAL. nghttp2's automatic WINDOW_UPDATEs are kept: nothing but the
 *     message in progress is ever buffered, so a peer can make us hold at most max_message plus
 *     one frame per stream.
 *   - Status: a HEADERS frame that ends the stream (trailers, or Trailers-Only) gives
 *     grpc-status / grpc-message (percent-decoded). A :status other than 200 maps per gRPC's
 *     HTTP-to-status table (400 INTERNAL, 401 UNAUTHENTICATED, 403 PERMISSION_DENIED,
 *     404 UNIMPLEMENTED, 429/502/503/504 UNAVAILABLE, else UNKNOWN). A 200 whose content-type is
 *     not application/grpc[+...|;...] is UNKNOWN. END_STREAM without grpc-status, or in the
 *     middle of a message, is INTERNAL. A peer RST_STREAM maps CANCEL to CANCELLED,
 *     REFUSED_STREAM to UNAVAILABLE, ENHANCE_YOUR_CALM to RESOURCE_EXHAUSTED, anything else to
 *     INTERNAL.
 *   - on_close is called once per stream: at once when the status is known from the peer's
 *     END_STREAM (our side is then reset with NO_ERROR if still open, as the call is over), or
 *     when nghttp2 closes the stream (RST_STREAM either way, GOAWAY refusal). The stream is freed
 *     when nghttp2 forgets it, never before on_close returned.
 *   - Connection errors: nghttp2 answers most of them itself with GOAWAY; once that GOAWAY has
 *     been pulled, xds_grpc_session_error() says so and feed returns -EPROTO. Errors nghttp2
 *     returns from mem_recv make feed return -EPROTO at once. Either way the session is dead:
 *     free it (open streams go without on_close) and reconnect.
 *   - Keepalive: one PING in flight at most; the next goes keepalive_interval_ms after the
 *     previous one was acked (as hbone_session_tick).
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <nghttp2/nghttp2.h>

#include "waypoint/base/alloc.h"
#include "xds-client/grpc.h"

#define NSEC_PER_MSEC 1000000ULL
#define GRPC_PREFIX 5
#define MAX_HEADER_BYTES 16384 /* per header block the peer sends us */
#define MAX_GRPC_MESSAGE 1024  /* grpc-message bytes kept */
#define EXTRA_HEADERS_MAX 32

enum {
        ST_OK = 0,
        ST_CANCELLED = 1,
        ST_UNKNOWN = 2,
        ST_RESOURCE_EXHAUSTED = 8,
        ST_UNIMPLEMENTED = 12,
        ST_INTERNAL = 13,
        ST_UNAVAILABLE = 14,
        ST_PERMISSION_DENIED = 7,
        ST_UNAUTHENTICATED = 16,
};

struct xds_grpc_stream {
        struct xds_grpc_session *session;
        struct xds_grpc_stream *prev, *next;
        int32_t id;
        void *user;

        /* sending: framed messages not yet handed to nghttp2 */
        uint8_t *sbuf;
        size_t slen, soff, scap;
        bool finish;   /* half-close once sbuf drained */
        bool deferred; /* the data provider returned DEFERRED */
        bool eof_sent;

        /* receiving */
        uint8_t prefix[GRPC_PREFIX];
        size_t prefix_have;
        uint8_t *msg;
        size_t msg_len, msg_have;
        size_t header_bytes;
        int http_status;
        bool content_type_ok;
        bool headers_done; /* the response HEADERS were processed */
        int grpc_status;   /* -1 until a grpc-status header */
        char *grpc_message;

        /* end */
        bool failed;    /* local status set: ignore further input */
        int status;
        char *status_msg;
        bool reported;  /* on_close called */
};

struct xds_grpc_session {
        nghttp2_session *ng;
        struct xds_grpc_callbacks cb;
        struct xds_grpc_limits lim;
        char *authority;
        void *user;
        struct xds_grpc_stream *streams;
        bool goaway_recv, dead;

        bool ticked, ping_outstanding;
        uint64_t last_ok_ns, ping_sent_ns, ping_counter;
        char err[256];
};

/* ---- memory ---- */

static nghttp2_mem ng_mem = {
        .malloc = wp_mem_malloc,
        .free = wp_mem_free,
        .calloc = wp_mem_calloc,
        .realloc = wp_mem_realloc,
};

/* ---- pure helpers ---- */

void xds_grpc_frame_header(uint8_t out[5], size_t len)
{
        out[0] = 0;
        out[1] = (uint8_t)(len >> 24);
        out[2] = (uint8_t)(len >> 16);
        out[3] = (uint8_t)(len >> 8);
        out[4] = (uint8_t)len;
}

static int hexval(char c)
{
        if (c >= '0' && c <= '9')
                return c - '0';
        if (c >= 'a' && c <= 'f')
                return c - 'a' + 10;
        if (c >= 'A' && c <= 'F')
                return c - 'A' + 10;
        return -1;
}

/* Invalid escapes are kept as they are (gRPC: decode what can be decoded). Output is
 * NUL-terminated; returns its length or -ENOSPC when it does not fit in cap. */
int xds_grpc_percent_decode(const char *in, char *out, size_t cap)
{
        size_t n = 0;

        if (!in || !out || !cap)
                return -EINVAL;
        for (size_t i = 0; in[i]; i++) {
                char c = in[i];

                if (c == '%' && hexval(in[i + 1]) >= 0 && hexval(in[i + 2]) >= 0) {
                        c = (char)(hexval(in[i + 1]) * 16 + hexval(in[i + 2]));
                        i += 2;
                }
                if (n + 1 >= cap)
                        return -ENOSPC;
                out[n++] = c;
        }
        out[n] = 0;
        return (int)n;
}

static int status_from_http(int http)
{
        switch (http) {
        case 400:
                return ST_INTERNAL;
        case 401:
                return ST_UNAUTHENTICATED;
        case 403:
                return ST_PERMISSION_DENIED;
        case 404:
                return ST_UNIMPLEMENTED;
        case 429:
        case 502:
        case 503:
        case 504:
                return ST_UNAVAILABLE;
        default:
                return ST_UNKNOWN;
        }
}

static const char *h2_error_name(uint32_t code)
{
        switch (code) {
        case NGHTTP2_NO_ERROR:
                return "NO_ERROR";
        case NGHTTP2_PROTOCOL_ERROR:
                return "PROTOCOL_ERROR";
        case NGHTTP2_INTERNAL_ERROR:
                return "INTERNAL_ERROR";
        case NGHTTP2_FLOW_CONTROL_ERROR:
                return "FLOW_CONTROL_ERROR";
        case NGHTTP2_STREAM_CLOSED:
                return "STREAM_CLOSED";
        case NGHTTP2_FRAME_SIZE_ERROR:
                return "FRAME_SIZE_ERROR";
        case NGHTTP2_REFUSED_STREAM:
                return "REFUSED_STREAM";
        case NGHTTP2_CANCEL:
                return "CANCEL";
        case NGHTTP2_COMPRESSION_ERROR:
                return "COMPRESSION_ERROR";
        case NGHTTP2_ENHANCE_YOUR_CALM:
                return "ENHANCE_YOUR_CALM";
        default:
                return "error";
        }
}

/* ---- streams ---- */

static struct xds_grpc_stream *stream_get(struct xds_grpc_session *s, int32_t id)
{
        return nghttp2_session_get_stream_user_data(s->ng, id);
}

static void stream_unlink_free(struct xds_grpc_stream *st)
{
        struct xds_grpc_session *s = st->session;

        if (st->prev)
                st->prev->next = st->next;
        else if (s->streams == st)
                s->streams = st->next;
        if (st->next)
                st->next->prev = st->prev;
        wp_free(st->sbuf);
        wp_free(st->msg);
        wp_free(st->grpc_message);
        wp_free(st->status_msg);
        wp_free(st);
}

/* Records the local outcome (first one wins). msg may fail to allocate: a static text is used. */
static void stream_set_status(struct xds_grpc_stream *st, int status, const char *msg)
{
        if (st->failed)
                return;
        st->failed = true;
        st->status = status;
        st->status_msg = wp_strdup(msg);
        wp_free(st->msg);
        st->msg = NULL;
        st->msg_have = st->msg_len = 0;
        st->prefix_have = 0;
}

static void stream_report(struct xds_grpc_stream *st, int status, const char *msg)
{
        struct xds_grpc_session *s = st->session;

        if (st->reported)
                return;
        st->reported = true;
        if (s->cb.on_close)
                s->cb.on_close(st, status, msg ? msg : "", st->user);
}

/* Ends the stream on our side with a local status: RST_STREAM, on_close when nghttp2 closes it. */
static void stream_fail(struct xds_grpc_stream *st, int status, const char *msg, uint32_t h2)
{
        stream_set_status(st, status, msg);
        st->slen = st->soff = 0;
        nghttp2_submit_rst_stream(st->session->ng, NGHTTP2_FLAG_NONE, st->id, h2);
}

/* The peer ended the stream (END_STREAM seen): decide the status and report it now. */
static void stream_finish_remote(struct xds_grpc_stream *st)
{
        char buf[128];
        int status;
        const char *msg;

        if (st->reported)
                return;
        if (st->failed) {
                status = st->status;
                msg = st->status_msg ? st->status_msg : "stream failed";
        } else if (st->http_status != 200) {
                status = status_from_http(st->http_status);
                snprintf(buf, sizeof(buf), "HTTP status %d", st->http_status);
                msg = buf;
        } else if (st->prefix_have || st->msg) {
                status = ST_INTERNAL;
                msg = "stream ended in the middle of a message";
        } else if (st->grpc_status < 0) {
                status = ST_INTERNAL;
                msg = "stream ended without grpc-status";
        } else {
                status = st->grpc_status;
                msg = st->grpc_message ? st->grpc_message : "";
        }
        stream_report(st, status, msg);
        /* the call is over: close our half too (no-op when already closed) */
        if (!st->eof_sent)
                nghttp2_submit_rst_stream(st->session->ng, NGHTTP2_FLAG_NONE, st->id,
                                          NGHTTP2_NO_ERROR);
}

/* ---- data provider ---- */

static ssize_t on_data_read(nghttp2_session *ng, int32_t stream_id, uint8_t *buf, size_t length,
                            uint32_t *data_flags, nghttp2_data_source *source, void *ud)
{
        struct xds_grpc_stream *st = source->ptr;
        size_t n = st->slen - st->soff;

        if (st->failed || st->reported) {
                st->deferred = true;
                return NGHTTP2_ERR_DEFERRED;
        }
        if (n > length)
                n = length;
        if (n)
                memcpy(buf, st->sbuf + st->soff, n);
        st->soff += n;
        if (st->soff == st->slen) {
                st->soff = st->slen = 0;
                if (st->finish) {
                        *data_flags |= NGHTTP2_DATA_FLAG_EOF;
                        st->eof_sent = true;
                        return (ssize_t)n;
                }
                if (n == 0) {
                        st->deferred = true;
                        return NGHTTP2_ERR_DEFERRED;
                }
        }
        return (ssize_t)n;
}

static void stream_kick(struct xds_grpc_stream *st)
{
        if (st->deferred && !st->failed && !st->reported) {
                st->deferred = false;
                nghttp2_session_resume_data(st->session->ng, st->id);
        }
}

/* ---- receiving ---- */

static int on_begin_headers(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct xds_grpc_stream *st = stream_get(ud, frame->hd.stream_id);

        if (st)
                st->header_bytes = 0;
        return 0;
}

static bool content_type_grpc(const uint8_t *v, size_t n)
{
        static const char ct[] = "application/grpc";
        size_t k = sizeof(ct) - 1;

        if (n < k || strncasecmp((const char *)v, ct, k) != 0)
                return false;
        return n == k || v[k] == '+' || v[k] == ';';
}

static int on_header(nghttp2_session *ng, const nghttp2_frame *frame, nghttp2_rcbuf *name,
                     nghttp2_rcbuf *value, uint8_t flags, void *ud)
{
        struct xds_grpc_session *s = ud;
        struct xds_grpc_stream *st = stream_get(s, frame->hd.stream_id);
        nghttp2_vec n = nghttp2_rcbuf_get_buf(name), v = nghttp2_rcbuf_get_buf(value);

        if (!st || st->failed)
                return 0;
        st->header_bytes += n.len + v.len + 32;
        if (st->header_bytes > MAX_HEADER_BYTES) {
                /* nghttp2 resets the stream itself */
                stream_set_status(st, ST_INTERNAL, "response header block too large");
                return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
        }
        if (n.len == 7 && memcmp(n.base, ":status", 7) == 0) {
                int code = 0;

                for (size_t i = 0; i < v.len && i < 3; i++)
                        code = code * 10 + (v.base[i] - '0');
                st->http_status = code;
        } else if (n.len == 12 && memcmp(n.base, "content-type", 12) == 0) {
                st->content_type_ok = content_type_grpc(v.base, v.len);
        } else if (n.len == 11 && memcmp(n.base, "grpc-status", 11) == 0) {
                int code = 0;
                bool ok = v.len > 0 && v.len <= 3;

                for (size_t i = 0; ok && i < v.len; i++) {
                        if (v.base[i] < '0' || v.base[i] > '9')
                                ok = false;
                        else
                                code = code * 10 + (v.base[i] - '0');
                }
                /* an unparsable grpc-status is UNKNOWN (gRPC spec) */
                st->grpc_status = ok ? code : ST_UNKNOWN;
        } else if (n.len == 12 && memcmp(n.base, "grpc-message", 12) == 0) {
                size_t k = v.len < MAX_GRPC_MESSAGE ? v.len : MAX_GRPC_MESSAGE;
                char *raw = wp_strndup((const char *)v.base, k);

                wp_free(st->grpc_message);
                st->grpc_message = NULL;
                if (raw) {
                        /* decoding never grows the text */
                        st->grpc_message = wp_malloc(k + 1);
                        if (st->grpc_message &&
                            xds_grpc_percent_decode(raw, st->grpc_message, k + 1) < 0) {
                                wp_free(st->grpc_message);
                                st->grpc_message = NULL;
                        }
                        wp_free(raw);
                }
        }
        return 0;
}

static void process_response_headers(struct xds_grpc_stream *st, bool end_stream)
{
        char buf[96];

        if (st->http_status >= 100 && st->http_status < 200 && !end_stream)
                return; /* informational: the real response follows */
        st->headers_done = true;
        if (end_stream) /* Trailers-Only, or a non-200 without a body */
                return;
        if (st->http_status != 200) {
                snprintf(buf, sizeof(buf), "HTTP status %d", st->http_status);
                stream_fail(st, status_from_http(st->http_status), buf, NGHTTP2_CANCEL);
        } else if (!st->content_type_ok) {
                stream_fail(st, ST_UNKNOWN, "response content-type is not application/grpc",
                            NGHTTP2_CANCEL);
        }
}

static int on_frame_recv(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct xds_grpc_session *s = ud;
        struct xds_grpc_stream *st = NULL;
        bool end_stream = frame->hd.flags & NGHTTP2_FLAG_END_STREAM;

        if (frame->hd.stream_id)
                st = stream_get(s, frame->hd.stream_id);

        switch (frame->hd.type) {
        case NGHTTP2_HEADERS:
                if (!st)
                        return 0;
                if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE)
                        process_response_headers(st, end_stream);
                else if (frame->headers.cat == NGHTTP2_HCAT_HEADERS && !st->headers_done)
                        process_response_headers(st, end_stream); /* after a 1xx */
                break;
        case NGHTTP2_DATA:
                break;
        case NGHTTP2_GOAWAY:
                s->goaway_recv = true;
                if (frame->goaway.error_code != NGHTTP2_NO_ERROR)
                        snprintf(s->err, sizeof(s->err), "GOAWAY %s received",
                                 h2_error_name(frame->goaway.error_code));
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
        if (end_stream && st)
                stream_finish_remote(st);
        return 0;
}

/* Parses len bytes of the message stream. Returns 0, or -1 when the stream failed. */
static int stream_parse(struct xds_grpc_stream *st, const uint8_t *data, size_t len)
{
        struct xds_grpc_session *s = st->session;
        char buf[160];

        while (len > 0 && !st->failed && !st->reported) {
                if (!st->msg && st->prefix_have < GRPC_PREFIX) {
                        size_t k = GRPC_PREFIX - st->prefix_have;

                        if (k > len)
                                k = len;
                        memcpy(st->prefix + st->prefix_have, data, k);
                        st->prefix_have += k;
                        data += k;
                        len -= k;
                        if (st->prefix_have < GRPC_PREFIX)
                                return 0;
                        st->msg_len = (size_t)st->prefix[1] << 24 | (size_t)st->prefix[2] << 16 |
                                      (size_t)st->prefix[3] << 8 | st->prefix[4];
                        if (st->prefix[0] == 1) {
                                stream_fail(st, ST_INTERNAL,
                                            "compressed message without grpc-encoding",
                                            NGHTTP2_CANCEL);
                                return -1;
                        }
                        if (st->prefix[0] != 0) {
                                snprintf(buf, sizeof(buf), "invalid message flags 0x%02x",
                                         st->prefix[0]);
                                stream_fail(st, ST_INTERNAL, buf, NGHTTP2_CANCEL);
                                return -1;
                        }
                        if (st->msg_len > s->lim.max_message) {
                                snprintf(buf, sizeof(buf),
                                         "received message larger than max (%zu vs. %zu)",
                                         st->msg_len, s->lim.max_message);
                                stream_fail(st, ST_RESOURCE_EXHAUSTED, buf, NGHTTP2_CANCEL);
                                return -1;
                        }
                        st->msg = wp_malloc(st->msg_len ? st->msg_len : 1);
                        if (!st->msg) {
                                stream_fail(st, ST_RESOURCE_EXHAUSTED,
                                            "out of memory for a message", NGHTTP2_CANCEL);
                                return -1;
                        }
                        st->msg_have = 0;
                }
                if (st->msg_have < st->msg_len) {
                        size_t k = st->msg_len - st->msg_have;

                        if (k > len)
                                k = len;
                        memcpy(st->msg + st->msg_have, data, k);
                        st->msg_have += k;
                        data += k;
                        len -= k;
                }
                if (st->msg_have == st->msg_len) {
                        uint8_t *m = st->msg;
                        size_t ml = st->msg_len;
                        int r = 0;

                        st->msg = NULL;
                        st->prefix_have = 0;
                        st->msg_len = st->msg_have = 0;
                        if (s->cb.on_message)
                                r = s->cb.on_message(st, m, ml, st->user);
                        wp_free(m);
                        if (r < 0) {
                                stream_fail(st, ST_CANCELLED, "cancelled by on_message",
                                            NGHTTP2_CANCEL);
                                return -1;
                        }
                }
        }
        return 0;
}

static int on_data_chunk(nghttp2_session *ng, uint8_t flags, int32_t stream_id, const uint8_t *data,
                         size_t len, void *ud)
{
        struct xds_grpc_stream *st = stream_get(ud, stream_id);

        if (!st || st->failed || st->reported)
                return 0;
        stream_parse(st, data, len);
        return 0;
}

static int on_stream_close(nghttp2_session *ng, int32_t stream_id, uint32_t error_code, void *ud)
{
        struct xds_grpc_session *s = ud;
        struct xds_grpc_stream *st = stream_get(s, stream_id);
        char buf[96];

        if (!st)
                return 0;
        if (!st->reported) {
                if (st->failed) {
                        stream_report(st, st->status,
                                      st->status_msg ? st->status_msg : "stream failed");
                } else {
                        int status = ST_INTERNAL;

                        if (error_code == NGHTTP2_CANCEL)
                                status = ST_CANCELLED;
                        else if (error_code == NGHTTP2_REFUSED_STREAM)
                                status = ST_UNAVAILABLE;
                        else if (error_code == NGHTTP2_ENHANCE_YOUR_CALM)
                                status = ST_RESOURCE_EXHAUSTED;
                        snprintf(buf, sizeof(buf), "stream reset: %s", h2_error_name(error_code));
                        stream_report(st, status, buf);
                }
        }
        nghttp2_session_set_stream_user_data(ng, stream_id, NULL);
        stream_unlink_free(st);
        return 0;
}

static int on_frame_send(nghttp2_session *ng, const nghttp2_frame *frame, void *ud)
{
        struct xds_grpc_session *s = ud;

        if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
                s->dead = true;
                if (!s->err[0])
                        snprintf(s->err, sizeof(s->err), "GOAWAY %s sent",
                                 h2_error_name(frame->goaway.error_code));
        }
        return 0;
}

/* ---- session ---- */

static void limits_sanitize(struct xds_grpc_limits *l)
{
        if (!l->max_message)
                l->max_message = 16u << 20;
        if (l->max_message > 0xffffffffu)
                l->max_message = 0xffffffffu;
        if (!l->keepalive_interval_ms)
                l->keepalive_interval_ms = 30000;
        if (!l->keepalive_timeout_ms)
                l->keepalive_timeout_ms = 10000;
        if (!l->initial_window || l->initial_window > NGHTTP2_MAX_WINDOW_SIZE)
                l->initial_window = 4u << 20;
}

int xds_grpc_session_new(const struct xds_grpc_callbacks *cb, const struct xds_grpc_limits *lim,
                         const char *authority, void *session_user,
                         struct xds_grpc_session **ret)
{
        nghttp2_session_callbacks *cbs;
        nghttp2_option *opt;
        struct xds_grpc_session *s;
        nghttp2_settings_entry iv[4];
        uint64_t conn_window;
        int rv;

        if (!cb || !authority || !*authority || !ret)
                return -EINVAL;
        s = wp_calloc(1, sizeof(*s));
        if (!s)
                return -ENOMEM;
        s->cb = *cb;
        if (lim)
                s->lim = *lim;
        limits_sanitize(&s->lim);
        s->user = session_user;
        s->authority = wp_strdup(authority);
        if (!s->authority)
                goto err_free_session;

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
        nghttp2_option_set_no_closed_streams(opt, 1);
        nghttp2_option_set_max_send_header_block_length(opt, 65536);
        nghttp2_option_set_max_outbound_ack(opt, 1000);
        nghttp2_option_set_max_settings(opt, 32);
        nghttp2_option_set_max_reserved_remote_streams(opt, 0);
        rv = nghttp2_session_client_new3(&s->ng, cbs, s, opt, &ng_mem);
        nghttp2_option_del(opt);
        nghttp2_session_callbacks_del(cbs);
        if (rv != 0)
                goto err_free_session;

        iv[0] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_ENABLE_PUSH, 0};
        iv[1] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE,
                                         s->lim.initial_window};
        iv[2] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_BYTES};
        iv[3] = (nghttp2_settings_entry){NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, 0};
        if (nghttp2_submit_settings(s->ng, NGHTTP2_FLAG_NONE, iv, 4) != 0)
                goto err_free_ng;
        conn_window = 4 * (uint64_t)s->lim.initial_window;
        if (conn_window < (16u << 20))
                conn_window = 16u << 20;
        if (conn_window > NGHTTP2_MAX_WINDOW_SIZE)
                conn_window = NGHTTP2_MAX_WINDOW_SIZE;
        if (nghttp2_session_set_local_window_size(s->ng, NGHTTP2_FLAG_NONE, 0,
                                                  (int32_t)conn_window) != 0)
                goto err_free_ng;
        *ret = s;
        return 0;

err_free_ng:
        nghttp2_session_del(s->ng);
        goto err_free_session;
err_free_callbacks:
        nghttp2_session_callbacks_del(cbs);
err_free_session:
        wp_free(s->authority);
        wp_free(s);
        return -ENOMEM;
}

struct xds_grpc_session *xds_grpc_session_free(struct xds_grpc_session *s)
{
        if (!s)
                return NULL;
        /* nghttp2_session_del does not call on_stream_close: streams go without on_close */
        nghttp2_session_del(s->ng);
        while (s->streams)
                stream_unlink_free(s->streams);
        wp_free(s->authority);
        wp_free(s);
        return NULL;
}

int xds_grpc_stream_open(struct xds_grpc_session *s, const char *path,
                         const struct xds_grpc_header *extra, size_t nextra, void *user,
                         struct xds_grpc_stream **ret)
{
        nghttp2_nv nva[8 + EXTRA_HEADERS_MAX];
        nghttp2_data_provider prd;
        struct xds_grpc_stream *st;
        size_t n = 0;
        int32_t id;

#define NV(k, v)                                                                                   \
        (nghttp2_nv)                                                                               \
        {                                                                                          \
                (uint8_t *)(k), (uint8_t *)(v), strlen(k), strlen(v), NGHTTP2_NV_FLAG_NONE         \
        }
        if (!s || !path || !ret || nextra > EXTRA_HEADERS_MAX || (nextra && !extra))
                return -EINVAL;
        if (s->goaway_recv || s->dead)
                return -ENOTCONN;
        for (size_t i = 0; i < nextra; i++)
                if (!extra[i].name || !extra[i].value || !*extra[i].name ||
                    extra[i].name[0] == ':')
                        return -EINVAL;
        st = wp_calloc(1, sizeof(*st));
        if (!st)
                return -ENOMEM;
        st->session = s;
        st->user = user;
        st->grpc_status = -1;

        nva[n++] = NV(":method", "POST");
        nva[n++] = NV(":scheme", "https");
        nva[n++] = NV(":path", path);
        nva[n++] = NV(":authority", s->authority);
        nva[n++] = NV("content-type", "application/grpc");
        nva[n++] = NV("te", "trailers");
        nva[n++] = NV("user-agent", "waypoint/0.1");
        for (size_t i = 0; i < nextra; i++)
                nva[n++] = NV(extra[i].name, extra[i].value);
#undef NV
        prd.source.ptr = st;
        prd.read_callback = on_data_read;
        id = nghttp2_submit_request(s->ng, NULL, nva, n, &prd, st);
        if (id < 0) {
                wp_free(st);
                return id == NGHTTP2_ERR_NOMEM ? -ENOMEM : -ENOTCONN;
        }
        st->id = id;
        st->next = s->streams;
        if (s->streams)
                s->streams->prev = st;
        s->streams = st;
        *ret = st;
        return 0;
}

int xds_grpc_stream_send(struct xds_grpc_stream *st, const uint8_t *msg, size_t len)
{
        size_t need;

        if (!st || (len && !msg))
                return -EINVAL;
        if (st->finish || st->failed || st->reported)
                return -EPIPE;
        if (len > 0xffffffffu)
                return -EMSGSIZE;
        need = st->slen + GRPC_PREFIX + len;
        if (need > st->scap) {
                size_t cap = st->scap ? st->scap : 1024;
                uint8_t *b;

                while (cap < need)
                        cap *= 2;
                b = wp_realloc(st->sbuf, cap);
                if (!b)
                        return -ENOMEM;
                st->sbuf = b;
                st->scap = cap;
        }
        xds_grpc_frame_header(st->sbuf + st->slen, len);
        if (len)
                memcpy(st->sbuf + st->slen + GRPC_PREFIX, msg, len);
        st->slen += GRPC_PREFIX + len;
        stream_kick(st);
        return 0;
}

int xds_grpc_stream_finish(struct xds_grpc_stream *st)
{
        if (!st)
                return -EINVAL;
        if (st->finish || st->failed || st->reported)
                return -EPIPE;
        st->finish = true;
        stream_kick(st);
        return 0;
}

void xds_grpc_stream_cancel(struct xds_grpc_stream *st)
{
        if (!st || st->reported || st->failed)
                return;
        stream_fail(st, ST_CANCELLED, "cancelled", NGHTTP2_CANCEL);
}

ssize_t xds_grpc_session_feed(struct xds_grpc_session *s, const uint8_t *in, size_t len)
{
        ssize_t rv;

        if (s->dead)
                return -EPROTO;
        rv = nghttp2_session_mem_recv(s->ng, in, len);
        if (rv < 0) {
                if (!s->err[0])
                        snprintf(s->err, sizeof(s->err), "receive: %s", nghttp2_strerror((int)rv));
                s->dead = true;
                if (rv == NGHTTP2_ERR_NOMEM)
                        return -ENOMEM;
                nghttp2_session_terminate_session(s->ng, NGHTTP2_PROTOCOL_ERROR);
                return -EPROTO;
        }
        return rv;
}

ssize_t xds_grpc_session_pull(struct xds_grpc_session *s, const uint8_t **ret_data)
{
        const uint8_t *data;
        ssize_t rv = nghttp2_session_mem_send(s->ng, &data);

        if (rv < 0) {
                if (!s->err[0])
                        snprintf(s->err, sizeof(s->err), "send: %s", nghttp2_strerror((int)rv));
                s->dead = true;
                return rv == NGHTTP2_ERR_NOMEM ? -ENOMEM : -EPROTO;
        }
        *ret_data = data;
        return rv;
}

bool xds_grpc_session_want_write(const struct xds_grpc_session *s)
{
        return nghttp2_session_want_write(s->ng) != 0;
}

int xds_grpc_session_tick(struct xds_grpc_session *s, uint64_t now_ns, uint64_t *ret_next_ns)
{
        uint64_t interval = (uint64_t)s->lim.keepalive_interval_ms * NSEC_PER_MSEC;
        uint64_t timeout = (uint64_t)s->lim.keepalive_timeout_ms * NSEC_PER_MSEC;
        uint64_t next;

        if (!s->ticked) {
                s->ticked = true;
                s->last_ok_ns = now_ns;
        }
        if (s->ping_outstanding) {
                if (now_ns - s->ping_sent_ns >= timeout) {
                        snprintf(s->err, sizeof(s->err), "keepalive timeout");
                        s->dead = true;
                        return -ETIMEDOUT;
                }
                next = s->ping_sent_ns + timeout;
        } else {
                if (s->ping_sent_ns > s->last_ok_ns)
                        s->last_ok_ns = s->ping_sent_ns;
                if (s->dead) {
                        next = UINT64_MAX;
                } else if (now_ns - s->last_ok_ns >= interval) {
                        uint8_t opaque[8];

                        s->ping_counter++;
                        memcpy(opaque, &s->ping_counter, sizeof(opaque));
                        if (nghttp2_submit_ping(s->ng, NGHTTP2_FLAG_NONE, opaque) == 0) {
                                s->ping_outstanding = true;
                                s->ping_sent_ns = now_ns;
                        }
                        next = now_ns + timeout;
                } else {
                        next = s->last_ok_ns + interval;
                }
        }
        if (ret_next_ns)
                *ret_next_ns = next;
        return 0;
}

const char *xds_grpc_session_error(const struct xds_grpc_session *s)
{
        return s->err;
}
