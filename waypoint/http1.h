/*
 * HTTP/1.x codec for the traffic inside HBONE tunnels: a strict, sans-I/O parser (requests
 * from the downstream, responses from the upstream) and serializers for both directions.
 * No sockets, no logging; every byte is hostile (RFC 9112 with the smuggling defences of
 * its sections 6.1 and 6.3, and limits on everything the peer controls).
 *
 * Parser: a pull API. The caller hands the bytes it has to wp_h1_parser_feed(), which
 * consumes some of them and reports at most one event:
 *
 *     for (;;) {
 *             struct wp_h1_event ev;
 *             ssize_t n = wp_h1_parser_feed(p, in, len, &ev);
 *             if (n < 0)
 *                     ... -EBADMSG: wp_h1_parser_error(p) says why (and which status to send),
 *                     ... -ENOMEM. Either way the connection is done: answer and close.
 *             in += n, len -= n;
 *             if (ev.type == WP_H1_EV_NONE)       -> all input consumed, wait for more bytes
 *             if (ev.type == WP_H1_EV_HEAD)       -> wp_h1_parser_request()/_response() is ready
 *             if (ev.type == WP_H1_EV_BODY)       -> ev.data/ev.len: body bytes (inside `in`)
 *             if (ev.type == WP_H1_EV_TRAILERS)   -> wp_h1_parser_trailers()
 *             if (ev.type == WP_H1_EV_DONE)       -> message complete; stop here (see below)
 *             if (ev.type == WP_H1_EV_UPGRADE)    -> the rest of the stream is not HTTP
 *     }
 *
 * An event with no bytes left to consume (DONE after the last body byte, DONE after a head
 * with no body, UPGRADE) comes from the next call, which may pass len == 0. NONE always
 * means every byte passed was consumed (buffered internally when it belongs to a head or
 * trailer section). Any split of the input works, down to one byte per call.
 *
 * Message boundary (keep-alive, pipelining): the parser never reads past the end of the
 * current message. After WP_H1_EV_DONE it has consumed exactly the message's bytes; what
 * follows (a pipelined request) is left to the caller. The next call that passes at least
 * one byte starts the next message and invalidates the previous head and trailers (calls
 * with len == 0 do not). The waypoint handles one request at a time per connection: it stops
 * feeding at DONE, keeps the unconsumed bytes, and feeds them once the response is done.
 *
 * Upgrade / CONNECT (request side): a request with "Connection: upgrade" + "Upgrade" (HTTP/1.1)
 * or a CONNECT request sets req->upgrade. After its DONE the parser reports WP_H1_EV_UPGRADE
 * (consuming nothing) on every call: only the upstream's answer decides whether the stream
 * becomes a tunnel. On 101 (or 2xx to CONNECT) relay the remaining bytes raw; if the upstream
 * refused, call wp_h1_parser_resume() to go on parsing HTTP. Response side: a 101, or a 2xx to
 * a CONNECT request, gives HEAD, DONE, then UPGRADE for good (the rest is the tunnel).
 *
 * Response side: tell the parser the request's method before each response
 * (wp_h1_parser_set_request_method(): HEAD responses and 2xx to CONNECT have no body). Interim
 * responses (1xx other than 101) come as HEAD + DONE and the parser then expects the final
 * response for the same request. 204, 304, 1xx and HEAD responses have no body. Without
 * Content-Length or chunked framing the body runs until the connection closes: call
 * wp_h1_parser_eof() at EOF to get the DONE.
 *
 * Memory: the parser owns one buffer for the head section and one for the trailer section,
 * grown on demand (wp_realloc) up to the limits and kept across messages, so a connection
 * with warmed-up buffers parses without allocating. Header names are lower-cased and every
 * string is NUL-terminated in those buffers. The request/response struct, its header list
 * and the strings stay valid until the next message starts (see above) or the parser is
 * freed. The caller may edit the header list (wp_headers_add/remove) meanwhile; strings it
 * adds are its own.
 *
 * Framing policy (documented choices):
 *  - Content-Length and Transfer-Encoding together: rejected (400), requests and responses.
 *  - Content-Length: 1*DIGIT (no sign, no list, <= INT64_MAX). A second Content-Length line
 *    with the same numeric value is accepted and dropped from the list (one stays); a
 *    different value is rejected (400).
 *  - Transfer-Encoding: only "chunked", once, is accepted (the waypoint decodes no other
 *    transfer coding). Unknown codings: 501 (RFC 9112 6.1); known codings other than chunked
 *    (gzip, deflate, compress, x-gzip, x-compress): 501 as well; chunked not last, chunked twice
 *    or empty list members: 400. In an HTTP/1.0 message: 400 (RFC 9112 6.1 "faulty framing").
 *  - Responses get the same strictness (the caller turns any response error into a 502).
 *  - Trailers are delivered as received (syntax-checked like header fields); a caller that
 *    merges them must apply its own policy (RFC 9110 6.5.1).
 */
#ifndef WP_HTTP1_H
#define WP_HTTP1_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "waypoint/base/buf.h"
#include "waypoint/base/http.h"

/* Why a message was rejected. wp_h1_error_status() gives the status to answer a request with
 * (responses that fail to parse are the upstream's fault: answer 502), wp_h1_error_str() a
 * short reason. */
enum wp_h1_error {
        WP_H1_OK = 0,
        WP_H1_E_BARE_LF,               /* LF not preceded by CR (400) */
        WP_H1_E_BARE_CR,               /* CR not followed by LF (400) */
        WP_H1_E_BAD_START_LINE,        /* request/status line syntax, too many empty lines (400) */
        WP_H1_E_START_LINE_TOO_LONG,   /* request line > max_start_line (414) */
        WP_H1_E_BAD_METHOD,            /* method is not a token (400) */
        WP_H1_E_BAD_TARGET,            /* request-target syntax or characters (400) */
        WP_H1_E_ASTERISK_NOT_OPTIONS,  /* "*" with a method other than OPTIONS (400) */
        WP_H1_E_AUTHORITY_NOT_CONNECT, /* authority-form with a method other than CONNECT */
        WP_H1_E_CONNECT_NOT_AUTHORITY, /* CONNECT with another form of target (400) */
        WP_H1_E_BAD_VERSION,           /* malformed HTTP-version (400) */
        WP_H1_E_VERSION_UNSUPPORTED,   /* major version other than 1 (505) */
        WP_H1_E_BAD_STATUS,            /* status code not 3 digits in 100..599 (response) */
        WP_H1_E_BAD_REASON,            /* CTL in reason phrase (response) */
        WP_H1_E_HEADERS_TOO_LARGE,     /* header section > max_header_bytes (431) */
        WP_H1_E_TOO_MANY_HEADERS,      /* more than max_headers field lines (431) */
        WP_H1_E_OBS_FOLD,              /* field line starting with SP/HTAB (400) */
        WP_H1_E_WS_BEFORE_COLON,       /* whitespace between field name and colon (400) */
        WP_H1_E_BAD_HEADER_NAME,       /* empty name, non-token char, or no colon (400) */
        WP_H1_E_BAD_HEADER_VALUE,      /* CTL, NUL or DEL in a field value (400) */
        WP_H1_E_BAD_UTF8,              /* byte >= 0x80 in a field value, not valid UTF-8 (400) */
        WP_H1_E_MISSING_HOST,          /* HTTP/1.1 request without Host (400) */
        WP_H1_E_MULTIPLE_HOST,         /* more than one Host line (400) */
        WP_H1_E_BAD_HOST,              /* Host / authority syntax (400) */
        WP_H1_E_BAD_CONTENT_LENGTH,    /* non-digit, sign, list, empty or > INT64_MAX (400) */
        WP_H1_E_MULTIPLE_CONTENT_LENGTH, /* differing Content-Length values (400) */
        WP_H1_E_CL_AND_TE,               /* both Content-Length and Transfer-Encoding (400) */
        WP_H1_E_TE_HTTP10,               /* Transfer-Encoding in an HTTP/1.0 message (400) */
        WP_H1_E_TE_CHUNKED_NOT_LAST, /* chunked not the final coding, twice, empty member (400) */
        WP_H1_E_TE_UNSUPPORTED,      /* a transfer coding other than chunked (501) */
        WP_H1_E_CONNECT_BODY,        /* CONNECT request with Content-Length > 0 or TE (400) */
        WP_H1_E_BAD_CHUNK_SIZE,      /* chunk-size not hex, empty, or bad char after it (400) */
        WP_H1_E_CHUNK_SIZE_OVERFLOW, /* chunk-size > 16 hex digits or > INT64_MAX (400) */
        WP_H1_E_BAD_CHUNK_EXT,       /* chunk extension syntax / CTL (400) */
        WP_H1_E_CHUNK_EXT_TOO_LONG,  /* chunk extensions > max_chunk_ext bytes (400) */
        WP_H1_E_MISSING_CHUNK_CRLF,  /* chunk-data not followed by CRLF (400) */
        WP_H1_E_TRAILERS_TOO_LARGE,  /* trailer section > max_header_bytes / max_headers (431) */
        WP_H1_E_BODY_TOO_LARGE,      /* body > max_body (413) */
        WP_H1_E_TRUNCATED,           /* EOF inside a message (400) */
        WP_H1_E_TOO_MANY_INTERIM,    /* more than 8 interim (1xx) responses (response side) */
        _WP_H1_E_MAX
};

/* Limits. Zero fields of a struct passed to wp_h1_parser_new() take the defaults below. */
struct wp_h1_limits {
        uint32_t max_start_line;   /* request/status line bytes, CRLF excluded (8192) */
        uint32_t max_header_bytes; /* field-line bytes including their CRLFs, start line and
                                      final empty line excluded; trailers separately (61440) */
        uint32_t max_headers;      /* field lines (100); trailers separately */
        uint32_t max_chunk_ext;    /* chunk extension bytes per chunk line (1024) */
        uint64_t max_body;         /* body bytes per message; 0 = unlimited (0) */
        bool allow_obs_text;       /* accept any byte >= 0x80 in values, not only UTF-8 */
};

enum wp_h1_mode { WP_H1_REQUEST, WP_H1_RESPONSE };

enum wp_h1_event_type {
        WP_H1_EV_NONE = 0, /* all input consumed, nothing to report: feed more */
        WP_H1_EV_HEAD,     /* request/response head parsed */
        WP_H1_EV_BODY,     /* data/len: body bytes (chunk framing removed), inside the input */
        WP_H1_EV_TRAILERS, /* wp_h1_parser_trailers() is filled (only when non-empty) */
        WP_H1_EV_DONE,     /* message complete */
        WP_H1_EV_UPGRADE,  /* not HTTP anymore (or not yet decided): see the top comment */
};

struct wp_h1_event {
        enum wp_h1_event_type type;
        const uint8_t *data; /* WP_H1_EV_BODY only */
        size_t len;
};

enum wp_h1_target_form {
        WP_H1_TARGET_ORIGIN,    /* "/path?query" */
        WP_H1_TARGET_ABSOLUTE,  /* "http://host/path" */
        WP_H1_TARGET_AUTHORITY, /* "host:port" (CONNECT) */
        WP_H1_TARGET_ASTERISK,  /* "*" (OPTIONS) */
};

/* Facts about the current message that struct wp_http_request/response do not carry. */
struct wp_h1_info {
        bool keep_alive;       /* the connection may carry another message after this one */
        bool conn_close;       /* Connection tokens seen: close */
        bool conn_keep_alive;  /* keep-alive */
        bool conn_upgrade;     /* upgrade */
        bool has_body;         /* a body follows the head (chunked, CL > 0, or until close) */
        bool body_until_close; /* response body delimited by EOF (HTTP/1.0 style) */
        bool host_mismatch;    /* absolute-form authority differs from the Host header */
        enum wp_h1_target_form target_form;
        const char *host;    /* Host header value (NULL when absent) */
        const char *upgrade; /* Upgrade header value (NULL when absent) */
        const char *reason;  /* response reason phrase ("" when absent) */
        uint64_t body_bytes; /* body bytes reported so far */
};

struct wp_h1_parser;

/* Fills lim with the defaults. */
void wp_h1_limits_default(struct wp_h1_limits *lim);

/*
 * Creates a parser for requests (WP_H1_REQUEST, the server side) or responses
 * (WP_H1_RESPONSE, the client side). lim may be NULL (defaults); it is copied. No buffer is
 * allocated until the first head byte arrives.
 * Returns 0 and *ret, -EINVAL (mode, or a limit out of range: max_start_line < 16 or
 * > 1 MiB, max_header_bytes > 16 MiB, max_headers > 65536, max_chunk_ext > 1 MiB), or
 * -ENOMEM. Memory: the head buffer grows up to about max_start_line + max_header_bytes, the
 * trailer buffer up to max_header_bytes.
 */
int wp_h1_parser_new(enum wp_h1_mode mode, const struct wp_h1_limits *lim,
                     struct wp_h1_parser **ret);

/* Frees the parser and its buffers. NULL-safe; returns NULL. */
struct wp_h1_parser *wp_h1_parser_free(struct wp_h1_parser *p);

/*
 * Consumes bytes from in[0..len) and reports at most one event in *ret_ev (see the top
 * comment). in may be NULL when len == 0. Body events point into in.
 * Returns the number of bytes consumed (0..len), -EBADMSG on a protocol error
 * (wp_h1_parser_error() says which; every later call fails the same way), or -ENOMEM (also
 * final: the message cannot be parsed).
 */
ssize_t wp_h1_parser_feed(struct wp_h1_parser *p, const uint8_t *in, size_t len,
                          struct wp_h1_event *ret_ev);

/*
 * The connection reached EOF. *ret_ev gets WP_H1_EV_DONE when that ends a response body
 * delimited by close (or when a DONE was still pending), WP_H1_EV_UPGRADE in a tunnel,
 * WP_H1_EV_NONE between messages. Returns 0, or -EBADMSG (WP_H1_E_TRUNCATED) when EOF cuts a
 * message short (including a response parser that saw only interim responses), or the
 * parser's earlier error.
 */
int wp_h1_parser_eof(struct wp_h1_parser *p, struct wp_h1_event *ret_ev);

/* After WP_H1_EV_UPGRADE on a request parser: the upstream refused the upgrade, go on parsing
 * HTTP requests. Returns 0, or -EINVAL when the parser is not waiting on an upgrade decision
 * (response parsers never come back from a tunnel). */
int wp_h1_parser_resume(struct wp_h1_parser *p);

/* Response parser: the method of the request the next response answers ("HEAD" and "CONNECT"
 * matter). Copied; applies until that request's final response is done, then GET is assumed.
 * Returns 0, or -EINVAL on a request parser or a NULL method. */
int wp_h1_parser_set_request_method(struct wp_h1_parser *p, const char *method);

/* Body limit for the current message, e.g. set by the route after the HEAD event (0 =
 * unlimited). Overrides lim->max_body until the message is done. Checked against the
 * Content-Length or the running chunk total on the next feed: WP_H1_E_BODY_TOO_LARGE. */
void wp_h1_parser_set_max_body(struct wp_h1_parser *p, uint64_t max_body);

/* The parsed head, valid after WP_H1_EV_HEAD until the next message starts. The request
 * accessor returns NULL on a response parser and vice versa. Mutable: filters edit headers.
 * req->path is the origin-form path+query ("*" for asterisk-form, "/..." taken from an
 * absolute-form target, "" for CONNECT); req->authority is the Host value, or the target's
 * authority for absolute-form and authority-form. content_length is -1 when absent. */
struct wp_http_request *wp_h1_parser_request(struct wp_h1_parser *p);
struct wp_http_response *wp_h1_parser_response(struct wp_h1_parser *p);
/* Trailer fields of the current message (empty unless WP_H1_EV_TRAILERS was reported). */
struct wp_headers *wp_h1_parser_trailers(struct wp_h1_parser *p);
const struct wp_h1_info *wp_h1_parser_info(const struct wp_h1_parser *p);

/* WP_H1_OK until the parser fails. */
enum wp_h1_error wp_h1_parser_error(const struct wp_h1_parser *p);
/* Status to answer a request that failed with e (400, 413, 414, 431, 501, 505). */
unsigned wp_h1_error_status(enum wp_h1_error e);
/* Short static description, e.g. "bare LF in header section". */
const char *wp_h1_error_str(enum wp_h1_error e);

/*
 * Removes hop-by-hop fields before forwarding (RFC 9110 7.6.1): connection, keep-alive,
 * proxy-connection, te, transfer-encoding, upgrade (kept when keep_upgrade), and every field
 * named by a Connection token, except host and content-length, which a peer may not strip
 * that way. Returns the number of fields removed.
 */
unsigned wp_h1_remove_hop_by_hop(struct wp_headers *h, bool keep_upgrade);

/*
 * Serializers. Each appends to out ([last, end)) and returns the number of bytes written,
 * -ENOBUFS when it does not fit (nothing is written), or -EINVAL when a field would break
 * the framing (a name that is not a token, CR/LF/NUL in a value or in the start line).
 *
 * Request head: "method SP target SP HTTP/1.1", where target is req->path, or req->authority
 * for CONNECT. The version is always 1.1: an intermediary sends its own version (RFC 9110
 * 2.5), so req->version / resp->version are ignored. Host comes from
 * req->authority (host fields in the list are skipped). Framing comes from the struct, never
 * from the list (content-length / transfer-encoding fields there are skipped): chunked ->
 * "transfer-encoding: chunked", else content_length >= 0 -> "content-length". When
 * req->upgrade is set and the list has no connection field, "connection: upgrade" is added.
 */
ssize_t wp_h1_write_request_head(struct wp_buf *out, const struct wp_http_request *req);

/*
 * Response head: "HTTP/1.1 status reason" (standard reason phrase, or empty). Framing as for
 * requests, except that 1xx and 204 responses never get framing fields. 101 gets "connection:
 * upgrade" unless the list has a connection field. For HEAD and 304 responses the caller passes the
 * framing it wants advertised and sends no body.
 */
ssize_t wp_h1_write_response_head(struct wp_buf *out, const struct wp_http_response *resp);

/* One chunk: "<hex len>\r\n" data "\r\n". len must be > 0 (-EINVAL: a zero chunk ends the
 * body). */
ssize_t wp_h1_write_chunk(struct wp_buf *out, const void *data, size_t len);
/* Chunk framing around data the caller writes itself (zero-copy): the prefix "<hex len>\r\n"
 * (len > 0), then after the data the suffix "\r\n". */
ssize_t wp_h1_write_chunk_prefix(struct wp_buf *out, size_t len);
ssize_t wp_h1_write_chunk_suffix(struct wp_buf *out);
/* The last chunk "0\r\n", the trailer fields (trailers may be NULL), and the final CRLF. */
ssize_t wp_h1_write_last_chunk(struct wp_buf *out, const struct wp_headers *trailers);

#endif
