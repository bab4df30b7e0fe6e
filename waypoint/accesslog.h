/*
 * Access logs as Envoy writes them for an Istio waypoint: the command-operator formatter
 * (text and typed JSON), response flags, access-log filters, and the access_log entries of a
 * tcp_proxy / http_connection_manager config (FileAccessLog, StdoutAccessLog, StderrAccessLog).
 *
 * Config time: a format is compiled once into literal/command pieces (wp_al_format_compile_*),
 * or a whole AccessLog entry (sink + filter + format) into a struct wp_al_logger. Both are
 * immutable afterwards and may be shared by workers.
 *
 * Data path: the stream/tunnel code fills a struct wp_al_ctx (all borrowed pointers, nothing
 * copied) and calls wp_al_format_render() into a caller buffer: no allocation, bounded output.
 * Writing the line to the sink (stdout, a file) is the caller's job.
 *
 * Error descriptions (reterr_desc) point into a thread-local buffer valid until the next
 * compile call on the same thread; they name the offending operator or field.
 */
#ifndef WP_ACCESSLOG_H
#define WP_ACCESSLOG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#include "waypoint/base/http.h"

struct Envoy__Config__Accesslog__V3__AccessLog;
struct Envoy__Config__Core__V3__SubstitutionFormatString;
struct Google__Protobuf__Struct;

/* Envoy's response flags, in Envoy's order (the order RESPONSE_FLAGS prints them in). */
enum wp_al_flag {
        WP_AL_FLAG_LH,    /* failed local health check */
        WP_AL_FLAG_UH,    /* no healthy upstream */
        WP_AL_FLAG_UT,    /* upstream request timeout */
        WP_AL_FLAG_LR,    /* connection local reset */
        WP_AL_FLAG_UR,    /* upstream remote reset */
        WP_AL_FLAG_UF,    /* upstream connection failure */
        WP_AL_FLAG_UC,    /* upstream connection termination */
        WP_AL_FLAG_UO,    /* upstream overflow (circuit breaking) */
        WP_AL_FLAG_NR,    /* no route */
        WP_AL_FLAG_DI,    /* delay injected */
        WP_AL_FLAG_FI,    /* fault injected */
        WP_AL_FLAG_RL,    /* rate limited */
        WP_AL_FLAG_UAEX,  /* unauthorized by external service */
        WP_AL_FLAG_RLSE,  /* rate limit service error */
        WP_AL_FLAG_DC,    /* downstream connection termination */
        WP_AL_FLAG_URX,   /* upstream retry / connect attempt limit exceeded */
        WP_AL_FLAG_SI,    /* stream idle timeout */
        WP_AL_FLAG_IH,    /* invalid x-envoy-* request headers */
        WP_AL_FLAG_DPE,   /* downstream protocol error */
        WP_AL_FLAG_UMSDR, /* upstream max stream duration reached */
        WP_AL_FLAG_RFCF,  /* response from cache filter */
        WP_AL_FLAG_NFCF,  /* no filter config found */
        WP_AL_FLAG_DT,    /* duration timeout */
        WP_AL_FLAG_UPE,   /* upstream protocol error */
        WP_AL_FLAG_NC,    /* no cluster found */
        WP_AL_FLAG_OM,    /* overload manager */
        WP_AL_FLAG_DF,    /* DNS resolution failed */
        WP_AL_FLAG_DO,    /* drop overload */
        WP_AL_FLAG_DR,    /* downstream remote reset */
        WP_AL_FLAG_UDO,   /* unconditional drop overload */
        _WP_AL_FLAG_MAX,
};
#define WP_AL_F(short_name) (UINT64_C(1) << WP_AL_FLAG_##short_name)

/* Short code of one flag ("UH"), or NULL when out of range. */
const char *wp_al_flag_name(enum wp_al_flag f);
/* Flag of a short code (exact, case-sensitive, len bytes), or -EINVAL. */
int wp_al_flag_parse(const char *s, size_t len);
/* Writes the comma-separated short codes of flags ("UF,URX"), or "-" when none, NUL-terminated
 * (truncated to cap - 1). Returns the full length (snprintf-style). */
size_t wp_al_flags_format(uint64_t flags, char *buf, size_t cap);

/* One filter-state entry for FILTER_STATE(key:PLAIN). */
struct wp_al_kv {
        const char *key;
        const char *value;
};

/*
 * What one log line is made from: filled by the data path per TCP tunnel or HTTP request.
 * Every pointer is borrowed for the duration of the render call. NULL (or "") strings and NULL
 * addresses are "missing": "-" in text, null in typed JSON. A zeroed struct is a valid (empty)
 * context.
 */
struct wp_al_ctx {
        int64_t start_unix_ns;           /* CLOCK_REALTIME at the first byte (START_TIME) */
        uint64_t start_ns;               /* monotonic (wp_now_ns) at the first byte */
        uint64_t request_end_ns;         /* last request byte received; 0 = not yet */
        uint64_t upstream_first_byte_ns; /* first response byte from upstream; 0 = none */
        uint64_t upstream_last_byte_ns;  /* last response byte from upstream; 0 = none */
        uint64_t end_ns;                 /* last byte sent downstream / tunnel closed; 0 = open */
        uint64_t bytes_received; /* body bytes (HTTP) or payload bytes (TCP) from downstream */
        uint64_t bytes_sent;     /* same, towards downstream */
        uint64_t response_flags; /* WP_AL_F(...) bit set */
        unsigned response_code;  /* 0 when no response (TCP, reset before response) */
        unsigned upstream_request_attempt_count;
        const struct wp_http_request *req;      /* NULL for TCP: PROTOCOL and REQ() are missing */
        const struct wp_http_response *resp;    /* RESP() source; NULL when none */
        const struct wp_headers *resp_trailers; /* TRAILER() source; NULL when none */
        const char *response_code_details;      /* "via_upstream", "rbac_access_denied..." */
        const char *connection_termination_details;
        const char *upstream_transport_failure_reason;
        const char *upstream_cluster; /* UPSTREAM_CLUSTER(_RAW) */
        const char *route_name;
        const char *requested_server_name;   /* SNI */
        const char *downstream_peer_uri_san; /* peer SPIFFE id */
        const char *downstream_local_uri_san;
        const struct sockaddr *upstream_host; /* AF_INET / AF_INET6, or NULL */
        const struct sockaddr *upstream_local;
        const struct sockaddr *downstream_local;
        const struct sockaddr *downstream_remote;
        const struct wp_al_kv *filter_state;
        unsigned n_filter_state;
        bool health_check; /* for not_health_check_filter */
        bool traceable;    /* for traceable_filter */

        /* Upstream and downstream timing beyond the above (monotonic ns, 0 = did not happen),
         * for REQUEST_TX_DURATION, UPSTREAM_CONNECTION_POOL_READY_DURATION,
         * DOWNSTREAM_HANDSHAKE_DURATION and COMMON_DURATION(START:END:PRECISION). The
         * COMMON_DURATION points: DS_RX_BEG start_ns, DS_RX_END request_end_ns, US_CX_BEG
         * upstream_connect_start_ns, US_CX_END upstream_connect_end_ns, US_HS_END
         * upstream_handshake_end_ns, US_TX_BEG upstream_tx_begin_ns, US_TX_END
         * upstream_tx_end_ns, US_RX_BEG upstream_first_byte_ns, US_RX_BODY_BEG
         * upstream_rx_body_begin_ns, US_RX_END upstream_last_byte_ns, DS_TX_BEG
         * downstream_tx_begin_ns, DS_TX_END end_ns. */
        uint64_t upstream_request_start_ns;   /* upstream request created (pool asked) */
        uint64_t upstream_pool_ready_ns;      /* connection pool ready for it */
        uint64_t upstream_connect_start_ns;   /* TCP connect of its upstream connection */
        uint64_t upstream_connect_end_ns;     /* connected */
        uint64_t upstream_handshake_end_ns;   /* TLS handshake done */
        uint64_t upstream_tx_begin_ns;        /* first request byte sent upstream */
        uint64_t upstream_tx_end_ns;          /* last request byte sent upstream */
        uint64_t upstream_rx_body_begin_ns;   /* first response body byte from upstream */
        uint64_t downstream_tx_begin_ns;      /* first response byte sent downstream */
        uint64_t downstream_conn_start_ns;    /* downstream connection accepted */
        uint64_t downstream_handshake_end_ns; /* its TLS handshake done (TCP logs only) */
        /* Wire accounting (UPSTREAM_/DOWNSTREAM_WIRE_BYTES_*, *_HEADER_BYTES_*); 0 when unset. */
        uint64_t upstream_wire_bytes_sent, upstream_wire_bytes_received;
        uint64_t upstream_header_bytes_sent, upstream_header_bytes_received;
        uint64_t downstream_wire_bytes_sent, downstream_wire_bytes_received;
        uint64_t downstream_header_bytes_sent, downstream_header_bytes_received;
        uint64_t connection_id;          /* CONNECTION_ID; 0 = missing */
        uint64_t upstream_connection_id; /* UPSTREAM_CONNECTION_ID; 0 = missing */
        uint8_t upstream_protocol;       /* UPSTREAM_PROTOCOL: 1 + enum wp_http_version; 0 none */
};

/* Compile flags. */
enum {
        WP_AL_OMIT_EMPTY = 1u << 0,   /* omit_empty_values: "" instead of "-"; JSON drops the key */
        WP_AL_JSON_SORT = 1u << 1,    /* json_format_options.sort_properties */
        WP_AL_JSON_UNTYPED = 1u << 2, /* legacy FileAccessLog.json_format: every value a string */
};

/* Limits (compile errors beyond them). */
#define WP_AL_MAX_FORMAT_LEN   65536 /* bytes of one text format / one JSON value */
#define WP_AL_MAX_COMMANDS     128   /* command operators in one format */
#define WP_AL_MAX_JSON_DEPTH   8     /* nested JSON objects */
#define WP_AL_MAX_FILTER_NODES 64    /* access-log filter tree nodes */

/* Envoy's default format (used when a FileAccessLog has no format). */
extern const char wp_al_envoy_default_format[];
/* Istio's text format (EnvoyTextLogFormat, MeshConfig accessLogEncoding TEXT). */
extern const char wp_al_istio_text_format[];
/* Istio's JSON format (EnvoyJSONLogFormatIstio), as key -> command pairs in a fixed order. */
struct wp_al_json_field {
        const char *key;
        const char *format;
};
extern const struct wp_al_json_field wp_al_istio_json_format[];
extern const size_t wp_al_istio_json_format_len;

struct wp_al_format;

/*
 * Compiles a text format (len bytes, no NUL needed): literals and %OPERATOR(arg):max% commands,
 * "%%" for a literal '%'. flags: WP_AL_OMIT_EMPTY. Returns 0 and *ret (free with
 * wp_al_format_free), -EINVAL with *reterr_desc naming the operator/position (unknown operator,
 * bad argument, unterminated command, too many commands, too long), or -ENOMEM.
 */
int wp_al_format_compile_text(const char *fmt, size_t len, unsigned flags,
                              struct wp_al_format **ret, const char **reterr_desc);
/*
 * Compiles a JSON format from a google.protobuf.Struct: string values are format strings (a
 * value that is one command alone is typed: numbers stay numbers, missing is null); numbers,
 * bools, null and nested structs pass through; lists are rejected (-EINVAL). flags:
 * WP_AL_OMIT_EMPTY, WP_AL_JSON_SORT, WP_AL_JSON_UNTYPED. Lines end with '\n'. Errors as above.
 */
int wp_al_format_compile_json(const struct Google__Protobuf__Struct *s, unsigned flags,
                              struct wp_al_format **ret, const char **reterr_desc);
/* Same from n key/format pairs (a flat object), e.g. wp_al_istio_json_format. */
int wp_al_format_compile_json_fields(const struct wp_al_json_field *f, size_t n, unsigned flags,
                                     struct wp_al_format **ret, const char **reterr_desc);
/*
 * Compiles a SubstitutionFormatString (text_format, text_format_source with inline_string /
 * inline_bytes / environment_variable, json_format; omit_empty_values; json_format_options).
 * formatters: only envoy.formatter.req_without_query is accepted (REQ_WITHOUT_QUERY is built
 * in); others give -EOPNOTSUPP, as does text_format_source.filename. Errors as above.
 */
int wp_al_format_compile_sfs(const struct Envoy__Config__Core__V3__SubstitutionFormatString *sfs,
                             struct wp_al_format **ret, const char **reterr_desc);
/* NULL-safe; returns NULL. */
struct wp_al_format *wp_al_format_free(struct wp_al_format *f);
/* True for JSON formats. */
bool wp_al_format_is_json(const struct wp_al_format *f);

/*
 * Renders one line for c into buf (cap bytes, NUL-terminated when cap > 0). Never allocates.
 * When the line does not fit, command values are shortened evenly (longest first, never inside
 * a UTF-8 sequence or a JSON escape) so literals, quotes and the final newline survive; JSON
 * stays valid. A text line whose literals alone exceed cap is cut at cap (keeping its final
 * '\n'). Returns the line length (excluding the NUL) and sets *ret_truncated (may be NULL), or
 * -ENOBUFS when a JSON line's keys and punctuation alone do not fit (or cap < 2).
 */
ssize_t wp_al_format_render(const struct wp_al_format *f, const struct wp_al_ctx *c, char *buf,
                            size_t cap, bool *ret_truncated);

/* Where a logger writes. */
enum wp_al_sink { WP_AL_SINK_STDOUT, WP_AL_SINK_STDERR, WP_AL_SINK_FILE };

struct wp_al_logger;

/*
 * Compiles one access_log entry: typed_config FileAccessLog (path "/dev/stdout" and
 * "/dev/stderr" map to the stream sinks; log_format / legacy format / json_format /
 * typed_json_format, or Envoy's default format when absent), StdoutAccessLog or StderrAccessLog
 * (default format when log_format is absent); and its filter (status_code, duration,
 * not_health_check, traceable, and, or, response_flag). Returns 0, -EOPNOTSUPP for another
 * logger type or filter (gRPC ALS, OpenTelemetry, header/runtime/CEL filters; the caller may
 * skip the entry), -EINVAL for an invalid config, -ENOMEM; *reterr_desc says which.
 */
int wp_al_logger_new(const struct Envoy__Config__Accesslog__V3__AccessLog *al,
                     struct wp_al_logger **ret, const char **reterr_desc);
/* NULL-safe; returns NULL. */
struct wp_al_logger *wp_al_logger_free(struct wp_al_logger *l);
/* Sink; *ret_path (may be NULL) gets the file path (borrowed from l) for WP_AL_SINK_FILE. */
enum wp_al_sink wp_al_logger_sink(const struct wp_al_logger *l, const char **ret_path);
/* The compiled format (borrowed). */
const struct wp_al_format *wp_al_logger_format(const struct wp_al_logger *l);
/* Whether the entry's filter lets c be logged (true without a filter). No allocation. */
bool wp_al_logger_match(const struct wp_al_logger *l, const struct wp_al_ctx *c);
/* wp_al_logger_match, then wp_al_format_render: 0 when filtered out, else as render. */
ssize_t wp_al_logger_render(const struct wp_al_logger *l, const struct wp_al_ctx *c, char *buf,
                            size_t cap, bool *ret_truncated);

/*
 * Non-blocking output: a writer thread writes the lines that producer threads (workers) queue,
 * so a stalled stdout (a full pipe) never blocks a worker. Each producer thread has its own
 * queue (a bounded ring of WP_AL_QUEUE_BYTES by default); a line that does not fit is dropped
 * and counted. Lines are written whole, never torn or interleaved; the lines of one queue keep
 * their order. The writer does not own the fds: only queue lines for fds that outlive the
 * writer (stdout, stderr).
 */
#define WP_AL_QUEUE_BYTES (256u * 1024u)

struct wp_al_writer;
struct wp_al_queue;

/* Starts a writer (its thread) whose queues hold queue_bytes each (rounded up to a power of
 * two, at least 4 KiB, at most 1 GiB). Returns 0, -EINVAL, -ENOMEM, or a thread error. */
int wp_al_writer_new(size_t queue_bytes, struct wp_al_writer **ret);
/* Stops the thread after writing what is queued, frees the writer and its queues. Producers
 * must have stopped. NULL-safe; returns NULL. */
struct wp_al_writer *wp_al_writer_free(struct wp_al_writer *w);
/* The process-wide writer (started on first call; queued lines are flushed at exit(), for at
 * most a second), or NULL when it could not be started. */
struct wp_al_writer *wp_al_writer_default(void);
/* A queue for the calling producer thread (one thread per queue); lives as long as w. Returns
 * 0, -EINVAL, -ENOMEM, -ENOSPC (1024 queues). */
int wp_al_queue_new(struct wp_al_writer *w, struct wp_al_queue **ret);
/* Queues one whole line (len bytes, usually ending in '\n') for fd. Never blocks, never
 * allocates. Returns 0; -ENOBUFS when the queue is full, -EMSGSIZE when the line is longer
 * than a quarter of the queue: the line is dropped and counted. */
int wp_al_queue_push(struct wp_al_queue *q, int fd, const char *line, size_t len);
/* Writes what is queued now from the calling thread, waiting at most timeout_ms for the writer
 * thread (which may be blocked on a stalled fd). Returns 0, -ETIMEDOUT, -EINVAL. */
int wp_al_writer_flush(struct wp_al_writer *w, int timeout_ms);

struct wp_al_writer_stats {
        uint64_t queued;       /* lines accepted by wp_al_queue_push */
        uint64_t written;      /* lines written */
        uint64_t dropped;      /* lines refused: queue full or line too long */
        uint64_t write_errors; /* lines lost to a failed write (EPIPE, EBADF...) */
};
/* Counters summed over the queues (approximate while producers run). w may be NULL (zeros). */
void wp_al_writer_get_stats(struct wp_al_writer *w, struct wp_al_writer_stats *ret);
/* The same for the process-wide writer, without starting it (zeros when not started). */
void wp_al_default_writer_stats(struct wp_al_writer_stats *ret);

#endif
