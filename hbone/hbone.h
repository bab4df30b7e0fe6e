/*
 * HBONE: HTTP/2 CONNECT tunnels (RFC 9113 §8.5) on nghttp2, sans-I/O. A session is fed the
 * plaintext the TLS layer decrypted and drained of the plaintext to encrypt; it never sees a
 * socket. The same session type serves both roles:
 *   server (terminating ztunnel's tunnels): validates classic CONNECT requests (`:method CONNECT`
 *     + `:authority` only; `:protocol`, `:scheme`, `:path` are rejected), reports them through
 *     on_tunnel_request, and answers with hbone_stream_respond();
 *   client (towards a destination's ztunnel): opens tunnels with hbone_session_open().
 *
 * Backpressure: received DATA is handed to on_tunnel_data; flow-control credit goes back to the
 * peer only when the caller calls hbone_stream_consume() after writing those bytes onward, so a
 * slow reader bounds the peer to its windows. Outgoing bytes are copied into a bounded per-stream
 * queue (hbone_stream_write returns -EAGAIN when full; on_tunnel_writable fires when it drains).
 *
 * Half-close: END_STREAM received -> on_tunnel_eof; hbone_stream_shutdown() sends END_STREAM once
 * queued bytes are out. RST_STREAM received -> on_tunnel_close with its error code.
 *
 * Every callback runs from inside hbone_session_feed(), hbone_session_pull() or
 * hbone_session_tick(); callbacks may call the hbone_stream_* functions but must not free the
 * session.
 */
#ifndef HBONE_H
#define HBONE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

struct hbone_session;
struct hbone_stream;

/* HTTP/2 error codes (RFC 9113 §7) used on the API. */
enum {
        HBONE_H2_NO_ERROR = 0x0,
        HBONE_H2_PROTOCOL_ERROR = 0x1,
        HBONE_H2_INTERNAL_ERROR = 0x2,
        HBONE_H2_FLOW_CONTROL_ERROR = 0x3,
        HBONE_H2_REFUSED_STREAM = 0x7,
        HBONE_H2_CANCEL = 0x8,
        HBONE_H2_CONNECT_ERROR = 0xa,
        HBONE_H2_ENHANCE_YOUR_CALM = 0xb,
};

struct hbone_limits {
        uint32_t max_concurrent_streams;  /* advertised by a server (default 100) */
        uint32_t initial_stream_window;   /* SETTINGS_INITIAL_WINDOW_SIZE (default 4 MiB) */
        uint32_t initial_conn_window;     /* connection window (default 16 MiB) */
        uint32_t max_frame_size;          /* SETTINGS_MAX_FRAME_SIZE (default 16384) */
        uint32_t max_header_list_size;    /* SETTINGS_MAX_HEADER_LIST_SIZE (default 16 KiB) */
        size_t stream_send_buffer;        /* bytes queued per stream towards the peer (256 KiB) */
        uint32_t keepalive_interval_ms;   /* PING after this long without a PING ack (10 s) */
        uint32_t keepalive_timeout_ms;    /* no ack within this -> session dead (20 s) */
        uint32_t rst_flood_max;           /* peer resets tolerated per window (default 100) */
        uint32_t rst_flood_window_ms;     /* (default 1000) */
};

/* Fills in the defaults above (what istiod configures Envoy with, and ztunnel's windows). */
void hbone_limits_default(struct hbone_limits *lim);

#define HBONE_HOST_MAX 255

/* A parsed CONNECT target: "ip:port", "[v6]:port" or "host:port" (port 1..65535). */
struct hbone_target {
        char host[HBONE_HOST_MAX + 1]; /* IP literal without brackets, or hostname */
        uint16_t port;
        bool is_ip;
        struct sockaddr_storage addr; /* valid when is_ip: AF_INET or AF_INET6 with port */
        socklen_t addrlen;
};

/* Parses an :authority value. Pure. Returns 0 or -EINVAL (empty, missing port, port 0 or >
 * 65535, junk, unbalanced brackets, userinfo, hostname with invalid characters, oversized). */
int hbone_target_parse(const char *authority, size_t len, struct hbone_target *ret);
/* Formats addr as an authority ("1.2.3.4:80", "[::1]:80") into out. Returns length or -ENOSPC. */
int hbone_target_format(const struct sockaddr *addr, char *out, size_t cap);

struct hbone_header {
        const char *name; /* lower case */
        const char *value;
};

/* What a server learns from a CONNECT request. Strings are borrowed for the callback's duration. */
struct hbone_request {
        const char *authority;
        struct hbone_target target;
        const char *baggage;     /* NULL when absent */
        const char *forwarded;   /* NULL when absent */
        const char *traceparent; /* NULL when absent */
};

struct hbone_callbacks {
        /* server: a valid CONNECT arrived. Return 0 to take it (answer later with
         * hbone_stream_respond()), or a negative value to have the session answer 503. */
        int (*on_tunnel_request)(struct hbone_session *s, struct hbone_stream *st,
                                 const struct hbone_request *req, void *session_user);
        /* client: the response to hbone_session_open() arrived. status 200 = established; any
         * other status ends the stream (on_tunnel_close follows). */
        void (*on_tunnel_response)(struct hbone_stream *st, unsigned status, void *stream_user);
        /* DATA on an established tunnel. The caller owns the credit: hbone_stream_consume() when
         * the bytes have been written onward. Return 0, or negative to reset the stream. */
        int (*on_tunnel_data)(struct hbone_stream *st, const uint8_t *data, size_t len,
                              void *stream_user);
        /* the peer half-closed (END_STREAM). */
        void (*on_tunnel_eof)(struct hbone_stream *st, void *stream_user);
        /* the send queue drained below half after a -EAGAIN from hbone_stream_write(). */
        void (*on_tunnel_writable)(struct hbone_stream *st, void *stream_user);
        /* the stream is gone: both sides closed (h2_error 0) or reset (RST_STREAM code, or ours).
         * The stream pointer is invalid after this returns. */
        void (*on_tunnel_close)(struct hbone_stream *st, uint32_t h2_error, void *stream_user);
        /* the peer sent GOAWAY: no new streams on this session. */
        void (*on_goaway)(struct hbone_session *s, uint32_t h2_error, void *session_user);
};

/* Creates a session. The server queues its SETTINGS (and connection WINDOW_UPDATE); the client
 * its preface. Returns 0 or -ENOMEM. cb and lim are copied. */
int hbone_session_new(const struct hbone_callbacks *cb, const struct hbone_limits *lim,
                      bool server, void *session_user, struct hbone_session **ret);
/* Frees the session and every remaining stream WITHOUT calling on_tunnel_close. NULL-safe. */
struct hbone_session *hbone_session_free(struct hbone_session *s);
/* Calls on_tunnel_close(st, CANCEL) for every open stream, then frees the session. NULL-safe. */
struct hbone_session *hbone_session_abort(struct hbone_session *s);

/* Feeds plaintext. Returns bytes consumed (== len) or -EPROTO when the connection is broken
 * (protocol error, flood): pull once more to flush a GOAWAY, then close. */
ssize_t hbone_session_feed(struct hbone_session *s, const uint8_t *in, size_t len);
/* Next bytes to send; *ret_data valid until the next call on the session. 0 when idle. Returns
 * -EPROTO on internal failure. */
ssize_t hbone_session_pull(struct hbone_session *s, const uint8_t **ret_data);
bool hbone_session_want_write(const struct hbone_session *s);
/* True when nothing more will happen on this session (GOAWAY exchanged and no streams, or a
 * fatal error): the caller flushes output and closes. */
bool hbone_session_finished(const struct hbone_session *s);
/* Keepalive. now_ns monotonic. Returns 0 and *ret_next_ns (when to tick next), or -ETIMEDOUT
 * when a PING went unanswered beyond keepalive_timeout_ms. */
int hbone_session_tick(struct hbone_session *s, uint64_t now_ns, uint64_t *ret_next_ns);
/* Graceful drain: GOAWAY(NO_ERROR) with the last accepted stream id; streams finish. */
void hbone_session_drain(struct hbone_session *s);
bool hbone_session_goaway_received(const struct hbone_session *s);
unsigned hbone_session_open_streams(const struct hbone_session *s);
/* client: streams we may still open (peer's MAX_CONCURRENT_STREAMS minus open), 0 after GOAWAY. */
unsigned hbone_session_streams_available(const struct hbone_session *s);
/* A short description of the last session-level error ("GOAWAY ENHANCE_YOUR_CALM: rst flood"). */
const char *hbone_session_error(const struct hbone_session *s);

/* client: opens a tunnel: HEADERS :method CONNECT, :authority, extra headers. Returns 0,
 * -EAGAIN (peer's stream limit reached), -ENOTCONN (GOAWAY received), -EINVAL, -ENOMEM. */
int hbone_session_open(struct hbone_session *s, const char *authority,
                       const struct hbone_header *extra, size_t nextra, void *stream_user,
                       struct hbone_stream **ret);

/* server: answers a tunnel request. 200 opens the tunnel; any other status ends the stream
 * (headers with END_STREAM). Returns 0, -EINVAL (already answered), -ENOMEM. */
int hbone_stream_respond(struct hbone_stream *st, unsigned status,
                         const struct hbone_header *extra, size_t nextra);
/* Queues tunnel bytes. Returns bytes accepted (may be < len), -EAGAIN when the queue is full
 * (on_tunnel_writable follows), -EPIPE after shutdown/reset. */
ssize_t hbone_stream_write(struct hbone_stream *st, const uint8_t *data, size_t len);
/* Half-close our side: END_STREAM after the queued bytes. */
int hbone_stream_shutdown(struct hbone_stream *st);
/* Resets the stream (RST_STREAM code); on_tunnel_close follows with that code. */
void hbone_stream_reset(struct hbone_stream *st, uint32_t h2_error);
/* Returns n bytes of flow-control credit to the peer (stream and connection windows). */
void hbone_stream_consume(struct hbone_stream *st, size_t n);
size_t hbone_stream_queued(const struct hbone_stream *st);
int32_t hbone_stream_id(const struct hbone_stream *st);
void hbone_stream_set_user(struct hbone_stream *st, void *stream_user);
void *hbone_stream_get_user(const struct hbone_stream *st);
struct hbone_session *hbone_stream_session(const struct hbone_stream *st);

#endif
