/*
 * Access-log formatting (Envoy command operators, text and typed JSON), response flags,
 * access-log filters and the AccessLog config entries istiod sends. See accesslog.h.
 *
 * A compiled format is a flat array of pieces (a literal, or one command operator with its
 * pre-parsed arguments) whose strings live in one pool (offsets, NUL-terminated). JSON formats
 * add a flat array of nodes (object begin/end, a value made of pieces, a raw JSON literal).
 *
 * Rendering is two passes at most: the first writes as much as fits and measures every
 * command's output; when the line overflows, the second pass caps every command's output at
 * the largest common length that makes the line fit (water filling), so literals, quotes,
 * braces and the final newline always survive and JSON stays valid.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h> /* isfinite */
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "waypoint/accesslog.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/time.h"
#include "xds-client/pbjson.h"
#include "xdsproto.h"

/* ---- errors ---------------------------------------------------------------------------- */

static __thread char errbuf[256];

static int fail(int err, const char **reterr_desc, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
static int fail(int err, const char **reterr_desc, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
        va_end(ap);
        if (reterr_desc)
                *reterr_desc = errbuf;
        return err;
}

/* ---- response flags -------------------------------------------------------------------- */

static const char *const flag_names[_WP_AL_FLAG_MAX] = {
        [WP_AL_FLAG_LH] = "LH",     [WP_AL_FLAG_UH] = "UH",       [WP_AL_FLAG_UT] = "UT",
        [WP_AL_FLAG_LR] = "LR",     [WP_AL_FLAG_UR] = "UR",       [WP_AL_FLAG_UF] = "UF",
        [WP_AL_FLAG_UC] = "UC",     [WP_AL_FLAG_UO] = "UO",       [WP_AL_FLAG_NR] = "NR",
        [WP_AL_FLAG_DI] = "DI",     [WP_AL_FLAG_FI] = "FI",       [WP_AL_FLAG_RL] = "RL",
        [WP_AL_FLAG_UAEX] = "UAEX", [WP_AL_FLAG_RLSE] = "RLSE",   [WP_AL_FLAG_DC] = "DC",
        [WP_AL_FLAG_URX] = "URX",   [WP_AL_FLAG_SI] = "SI",       [WP_AL_FLAG_IH] = "IH",
        [WP_AL_FLAG_DPE] = "DPE",   [WP_AL_FLAG_UMSDR] = "UMSDR", [WP_AL_FLAG_RFCF] = "RFCF",
        [WP_AL_FLAG_NFCF] = "NFCF", [WP_AL_FLAG_DT] = "DT",       [WP_AL_FLAG_UPE] = "UPE",
        [WP_AL_FLAG_NC] = "NC",     [WP_AL_FLAG_OM] = "OM",       [WP_AL_FLAG_DF] = "DF",
        [WP_AL_FLAG_DO] = "DO",     [WP_AL_FLAG_DR] = "DR",       [WP_AL_FLAG_UDO] = "UDO",
};

const char *wp_al_flag_name(enum wp_al_flag f)
{
        if ((unsigned)f >= _WP_AL_FLAG_MAX)
                return NULL;
        return flag_names[f];
}

int wp_al_flag_parse(const char *s, size_t len)
{
        for (unsigned i = 0; i < _WP_AL_FLAG_MAX; i++)
                if (strlen(flag_names[i]) == len && memcmp(flag_names[i], s, len) == 0)
                        return (int)i;
        return -EINVAL;
}

static const char *const flag_long_names[_WP_AL_FLAG_MAX] = {
        [WP_AL_FLAG_LH] = "FailedLocalHealthCheck",
        [WP_AL_FLAG_UH] = "NoHealthyUpstream",
        [WP_AL_FLAG_UT] = "UpstreamRequestTimeout",
        [WP_AL_FLAG_LR] = "LocalReset",
        [WP_AL_FLAG_UR] = "UpstreamRemoteReset",
        [WP_AL_FLAG_UF] = "UpstreamConnectionFailure",
        [WP_AL_FLAG_UC] = "UpstreamConnectionTermination",
        [WP_AL_FLAG_UO] = "UpstreamOverflow",
        [WP_AL_FLAG_NR] = "NoRouteFound",
        [WP_AL_FLAG_DI] = "DelayInjected",
        [WP_AL_FLAG_FI] = "FaultInjected",
        [WP_AL_FLAG_RL] = "RateLimited",
        [WP_AL_FLAG_UAEX] = "UnauthorizedExternalService",
        [WP_AL_FLAG_RLSE] = "RateLimitServiceError",
        [WP_AL_FLAG_DC] = "DownstreamConnectionTermination",
        [WP_AL_FLAG_URX] = "UpstreamRetryLimitExceeded",
        [WP_AL_FLAG_SI] = "StreamIdleTimeout",
        [WP_AL_FLAG_IH] = "InvalidEnvoyRequestHeaders",
        [WP_AL_FLAG_DPE] = "DownstreamProtocolError",
        [WP_AL_FLAG_UMSDR] = "UpstreamMaxStreamDurationReached",
        [WP_AL_FLAG_RFCF] = "ResponseFromCacheFilter",
        [WP_AL_FLAG_NFCF] = "NoFilterConfigFound",
        [WP_AL_FLAG_DT] = "DurationTimeout",
        [WP_AL_FLAG_UPE] = "UpstreamProtocolError",
        [WP_AL_FLAG_NC] = "NoClusterFound",
        [WP_AL_FLAG_OM] = "OverloadManagerTerminated",
        [WP_AL_FLAG_DF] = "DnsResolutionFailed",
        [WP_AL_FLAG_DO] = "DropOverload",
        [WP_AL_FLAG_DR] = "DownstreamRemoteReset",
        [WP_AL_FLAG_UDO] = "UnconditionalDropOverload",
};

/* The names (short or long) of the set flags, comma-separated in Envoy's order, or "-" for none,
 * NUL-terminated (truncated to cap - 1). Returns the full length (snprintf-style). */
static size_t flags_join(uint64_t flags, const char *const *names, char *buf, size_t cap)
{
        size_t n = 0;

#define FLAGS_PUT(str, l)                                                                          \
        do {                                                                                       \
                for (size_t _k = 0; _k < (l); _k++, n++)                                           \
                        if (n + 1 < cap)                                                           \
                                buf[n] = (str)[_k];                                                \
        } while (0)
        for (unsigned i = 0; i < _WP_AL_FLAG_MAX; i++) {
                if (!(flags & (UINT64_C(1) << i)))
                        continue;
                if (n > 0)
                        FLAGS_PUT(",", 1);
                FLAGS_PUT(names[i], strlen(names[i]));
        }
        if (n == 0)
                FLAGS_PUT("-", 1);
#undef FLAGS_PUT
        if (cap > 0)
                buf[n < cap ? n : cap - 1] = '\0';
        return n;
}

size_t wp_al_flags_format(uint64_t flags, char *buf, size_t cap)
{
        return flags_join(flags, flag_names, buf, cap);
}

/* ---- default formats ------------------------------------------------------------------- */

const char wp_al_envoy_default_format[] =
        "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" "
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" "
        "\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

const char wp_al_istio_text_format[] =
        "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" "
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% "
        "\"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" "
        "\"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% "
        "%UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% "
        "%REQUESTED_SERVER_NAME% %ROUTE_NAME%\n";

const struct wp_al_json_field wp_al_istio_json_format[] = {
        {"start_time", "%START_TIME%"},
        {"route_name", "%ROUTE_NAME%"},
        {"method", "%REQ(:METHOD)%"},
        {"path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"},
        {"protocol", "%PROTOCOL%"},
        {"response_code", "%RESPONSE_CODE%"},
        {"response_flags", "%RESPONSE_FLAGS%"},
        {"response_code_details", "%RESPONSE_CODE_DETAILS%"},
        {"connection_termination_details", "%CONNECTION_TERMINATION_DETAILS%"},
        {"bytes_received", "%BYTES_RECEIVED%"},
        {"bytes_sent", "%BYTES_SENT%"},
        {"duration", "%DURATION%"},
        {"upstream_service_time", "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"},
        {"x_forwarded_for", "%REQ(X-FORWARDED-FOR)%"},
        {"user_agent", "%REQ(USER-AGENT)%"},
        {"request_id", "%REQ(X-REQUEST-ID)%"},
        {"authority", "%REQ(:AUTHORITY)%"},
        {"upstream_host", "%UPSTREAM_HOST%"},
        {"upstream_cluster", "%UPSTREAM_CLUSTER_RAW%"},
        {"upstream_local_address", "%UPSTREAM_LOCAL_ADDRESS%"},
        {"downstream_local_address", "%DOWNSTREAM_LOCAL_ADDRESS%"},
        {"downstream_remote_address", "%DOWNSTREAM_REMOTE_ADDRESS%"},
        {"requested_server_name", "%REQUESTED_SERVER_NAME%"},
        {"upstream_transport_failure_reason", "%UPSTREAM_TRANSPORT_FAILURE_REASON%"},
};
const size_t wp_al_istio_json_format_len =
        sizeof(wp_al_istio_json_format) / sizeof(wp_al_istio_json_format[0]);

/* ---- compiled format ------------------------------------------------------------------- */

enum op {
        OP_LITERAL,
        OP_STATIC, /* ENVIRONMENT / HOSTNAME, resolved at compile time; missing when sub = 1 */
        OP_START_TIME,
        OP_DURATION,
        OP_REQUEST_DURATION,
        OP_RESPONSE_DURATION,
        OP_RESPONSE_TX_DURATION,
        OP_RESPONSE_CODE,
        OP_RESPONSE_CODE_DETAILS,
        OP_CONNECTION_TERMINATION_DETAILS,
        OP_UPSTREAM_TRANSPORT_FAILURE_REASON,
        OP_RESPONSE_FLAGS,
        OP_BYTES_RECEIVED,
        OP_BYTES_SENT,
        OP_PROTOCOL,
        OP_REQ,
        OP_REQ_WITHOUT_QUERY,
        OP_RESP,
        OP_TRAILER,
        OP_ADDR, /* sub: which address | ADDR_NO_PORT */
        OP_UPSTREAM_CLUSTER,
        OP_DOWNSTREAM_PEER_URI_SAN,
        OP_DOWNSTREAM_LOCAL_URI_SAN,
        OP_REQUESTED_SERVER_NAME,
        OP_ROUTE_NAME,
        OP_UPSTREAM_REQUEST_ATTEMPT_COUNT,
        OP_FILTER_STATE,
        OP_REQUEST_TX_DURATION,
        OP_DOWNSTREAM_HANDSHAKE_DURATION,
        OP_UPSTREAM_POOL_READY_DURATION,
        OP_MISSING, /* ROUNDTRIP_DURATION (HTTP/3 only): always missing */
        OP_COMMON_DURATION,
        OP_HEADER_BYTES, /* sub: HB_* */
        OP_WIRE_BYTES,   /* sub: WB_* */
        OP_UPSTREAM_PROTOCOL,
        OP_CONNECTION_ID,
        OP_UPSTREAM_CONNECTION_ID,
        OP_PORT, /* sub: which address */
        OP_RESPONSE_FLAGS_LONG,
};

enum { HB_REQUEST, HB_RESPONSE, HB_TRAILERS };
enum {
        WB_UPSTREAM_SENT,
        WB_UPSTREAM_RECEIVED,
        WB_UPSTREAM_HEADER_SENT,
        WB_UPSTREAM_HEADER_RECEIVED,
        WB_DOWNSTREAM_SENT,
        WB_DOWNSTREAM_RECEIVED,
        WB_DOWNSTREAM_HEADER_SENT,
        WB_DOWNSTREAM_HEADER_RECEIVED,
};

/* COMMON_DURATION time points (Envoy's names), and custom names (always missing here). */
enum {
        CP_DS_RX_BEG,
        CP_DS_RX_END,
        CP_US_CX_BEG,
        CP_US_CX_END,
        CP_US_HS_END,
        CP_US_TX_BEG,
        CP_US_TX_END,
        CP_US_RX_BEG,
        CP_US_RX_BODY_BEG,
        CP_US_RX_END,
        CP_DS_TX_BEG,
        CP_DS_TX_END,
        CP_CUSTOM,
};
static const char *const cp_names[CP_CUSTOM] = {
        "DS_RX_BEG", "DS_RX_END", "US_CX_BEG",      "US_CX_END", "US_HS_END", "US_TX_BEG",
        "US_TX_END", "US_RX_BEG", "US_RX_BODY_BEG", "US_RX_END", "DS_TX_BEG", "DS_TX_END",
};
enum { PREC_MS, PREC_US, PREC_NS };

enum { ADDR_UPSTREAM_HOST, ADDR_UPSTREAM_LOCAL, ADDR_DOWNSTREAM_LOCAL, ADDR_DOWNSTREAM_REMOTE };
#define ADDR_NO_PORT 0x10

enum { ARG_NONE, ARG_OPTIONAL, ARG_REQUIRED };

static const struct op_def {
        const char *name;
        uint8_t op, sub, arg;
} op_defs[] = {
        {"START_TIME", OP_START_TIME, 0, ARG_OPTIONAL},
        {"DURATION", OP_DURATION, 0, ARG_NONE},
        {"REQUEST_DURATION", OP_REQUEST_DURATION, 0, ARG_NONE},
        {"RESPONSE_DURATION", OP_RESPONSE_DURATION, 0, ARG_NONE},
        {"RESPONSE_TX_DURATION", OP_RESPONSE_TX_DURATION, 0, ARG_NONE},
        {"RESPONSE_CODE", OP_RESPONSE_CODE, 0, ARG_NONE},
        {"RESPONSE_CODE_DETAILS", OP_RESPONSE_CODE_DETAILS, 0, ARG_NONE},
        {"CONNECTION_TERMINATION_DETAILS", OP_CONNECTION_TERMINATION_DETAILS, 0, ARG_NONE},
        {"UPSTREAM_TRANSPORT_FAILURE_REASON", OP_UPSTREAM_TRANSPORT_FAILURE_REASON, 0, ARG_NONE},
        {"RESPONSE_FLAGS", OP_RESPONSE_FLAGS, 0, ARG_NONE},
        {"BYTES_RECEIVED", OP_BYTES_RECEIVED, 0, ARG_NONE},
        {"BYTES_SENT", OP_BYTES_SENT, 0, ARG_NONE},
        {"PROTOCOL", OP_PROTOCOL, 0, ARG_NONE},
        {"REQ", OP_REQ, 0, ARG_REQUIRED},
        {"REQ_WITHOUT_QUERY", OP_REQ_WITHOUT_QUERY, 0, ARG_REQUIRED},
        {"RESP", OP_RESP, 0, ARG_REQUIRED},
        {"TRAILER", OP_TRAILER, 0, ARG_REQUIRED},
        {"UPSTREAM_HOST", OP_ADDR, ADDR_UPSTREAM_HOST, ARG_NONE},
        {"UPSTREAM_REMOTE_ADDRESS", OP_ADDR, ADDR_UPSTREAM_HOST, ARG_NONE},
        {"UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", OP_ADDR, ADDR_UPSTREAM_HOST | ADDR_NO_PORT,
         ARG_NONE},
        {"UPSTREAM_LOCAL_ADDRESS", OP_ADDR, ADDR_UPSTREAM_LOCAL, ARG_NONE},
        {"UPSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", OP_ADDR, ADDR_UPSTREAM_LOCAL | ADDR_NO_PORT,
         ARG_NONE},
        {"DOWNSTREAM_LOCAL_ADDRESS", OP_ADDR, ADDR_DOWNSTREAM_LOCAL, ARG_NONE},
        {"DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", OP_ADDR, ADDR_DOWNSTREAM_LOCAL | ADDR_NO_PORT,
         ARG_NONE},
        {"DOWNSTREAM_REMOTE_ADDRESS", OP_ADDR, ADDR_DOWNSTREAM_REMOTE, ARG_NONE},
        {"DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", OP_ADDR, ADDR_DOWNSTREAM_REMOTE | ADDR_NO_PORT,
         ARG_NONE},
        {"DOWNSTREAM_DIRECT_REMOTE_ADDRESS", OP_ADDR, ADDR_DOWNSTREAM_REMOTE, ARG_NONE},
        {"DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT", OP_ADDR,
         ADDR_DOWNSTREAM_REMOTE | ADDR_NO_PORT, ARG_NONE},
        {"UPSTREAM_CLUSTER", OP_UPSTREAM_CLUSTER, 0, ARG_NONE},
        {"UPSTREAM_CLUSTER_RAW", OP_UPSTREAM_CLUSTER, 0, ARG_NONE},
        {"DOWNSTREAM_PEER_URI_SAN", OP_DOWNSTREAM_PEER_URI_SAN, 0, ARG_NONE},
        {"DOWNSTREAM_LOCAL_URI_SAN", OP_DOWNSTREAM_LOCAL_URI_SAN, 0, ARG_NONE},
        {"REQUESTED_SERVER_NAME", OP_REQUESTED_SERVER_NAME, 0, ARG_NONE},
        {"ROUTE_NAME", OP_ROUTE_NAME, 0, ARG_NONE},
        {"UPSTREAM_REQUEST_ATTEMPT_COUNT", OP_UPSTREAM_REQUEST_ATTEMPT_COUNT, 0, ARG_NONE},
        {"FILTER_STATE", OP_FILTER_STATE, 0, ARG_REQUIRED},
        {"REQUEST_TX_DURATION", OP_REQUEST_TX_DURATION, 0, ARG_NONE},
        {"DOWNSTREAM_HANDSHAKE_DURATION", OP_DOWNSTREAM_HANDSHAKE_DURATION, 0, ARG_NONE},
        {"UPSTREAM_CONNECTION_POOL_READY_DURATION", OP_UPSTREAM_POOL_READY_DURATION, 0, ARG_NONE},
        {"ROUNDTRIP_DURATION", OP_MISSING, 0, ARG_NONE},
        {"COMMON_DURATION", OP_COMMON_DURATION, 0, ARG_REQUIRED},
        {"REQUEST_HEADERS_BYTES", OP_HEADER_BYTES, HB_REQUEST, ARG_NONE},
        {"RESPONSE_HEADERS_BYTES", OP_HEADER_BYTES, HB_RESPONSE, ARG_NONE},
        {"RESPONSE_TRAILERS_BYTES", OP_HEADER_BYTES, HB_TRAILERS, ARG_NONE},
        {"UPSTREAM_WIRE_BYTES_SENT", OP_WIRE_BYTES, WB_UPSTREAM_SENT, ARG_NONE},
        {"UPSTREAM_WIRE_BYTES_RECEIVED", OP_WIRE_BYTES, WB_UPSTREAM_RECEIVED, ARG_NONE},
        {"UPSTREAM_HEADER_BYTES_SENT", OP_WIRE_BYTES, WB_UPSTREAM_HEADER_SENT, ARG_NONE},
        {"UPSTREAM_HEADER_BYTES_RECEIVED", OP_WIRE_BYTES, WB_UPSTREAM_HEADER_RECEIVED, ARG_NONE},
        {"DOWNSTREAM_WIRE_BYTES_SENT", OP_WIRE_BYTES, WB_DOWNSTREAM_SENT, ARG_NONE},
        {"DOWNSTREAM_WIRE_BYTES_RECEIVED", OP_WIRE_BYTES, WB_DOWNSTREAM_RECEIVED, ARG_NONE},
        {"DOWNSTREAM_HEADER_BYTES_SENT", OP_WIRE_BYTES, WB_DOWNSTREAM_HEADER_SENT, ARG_NONE},
        {"DOWNSTREAM_HEADER_BYTES_RECEIVED", OP_WIRE_BYTES, WB_DOWNSTREAM_HEADER_RECEIVED,
         ARG_NONE},
        {"UPSTREAM_PROTOCOL", OP_UPSTREAM_PROTOCOL, 0, ARG_NONE},
        {"CONNECTION_ID", OP_CONNECTION_ID, 0, ARG_NONE},
        {"UPSTREAM_CONNECTION_ID", OP_UPSTREAM_CONNECTION_ID, 0, ARG_NONE},
        {"UPSTREAM_LOCAL_PORT", OP_PORT, ADDR_UPSTREAM_LOCAL, ARG_NONE},
        {"UPSTREAM_REMOTE_PORT", OP_PORT, ADDR_UPSTREAM_HOST, ARG_NONE},
        {"DOWNSTREAM_LOCAL_PORT", OP_PORT, ADDR_DOWNSTREAM_LOCAL, ARG_NONE},
        {"DOWNSTREAM_REMOTE_PORT", OP_PORT, ADDR_DOWNSTREAM_REMOTE, ARG_NONE},
        {"DOWNSTREAM_DIRECT_REMOTE_PORT", OP_PORT, ADDR_DOWNSTREAM_REMOTE, ARG_NONE},
        {"RESPONSE_FLAGS_LONG", OP_RESPONSE_FLAGS_LONG, 0, ARG_NONE},
        {"ENVIRONMENT", OP_STATIC, 0, ARG_REQUIRED},
        {"HOSTNAME", OP_STATIC, 0, ARG_NONE},
};

#define NO_MAX_LEN      UINT32_MAX
#define MAX_HEADER_NAME 256
#define MAX_TIME_FORMAT 64
#define MAX_MAX_LEN     1000000

struct piece {
        uint8_t op, sub;
        uint8_t cp_start, cp_end; /* COMMON_DURATION points (sub: precision) */
        uint32_t max_len;
        uint32_t a_off, a_len; /* literal / header name / strftime format / static value / key */
        uint32_t b_off, b_len; /* alternative header */
};

enum { J_BEGIN, J_END, J_GROUP, J_RAW };

struct jnode {
        uint8_t kind;
        uint32_t key_off, key_len; /* "\"key\":" pre-escaped; empty for the root */
        uint32_t first, n;         /* J_GROUP: pieces */
        uint32_t raw_off, raw_len; /* J_RAW */
};

struct wp_al_format {
        unsigned flags;
        bool json;
        char *pool;
        size_t pool_len, pool_cap;
        struct piece *pieces;
        unsigned n_pieces, cap_pieces;
        struct jnode *nodes;
        unsigned n_nodes, cap_nodes;
        unsigned n_commands;
        unsigned depth;       /* JSON nesting while compiling */
        unsigned group_first; /* literals merge only within the current value */
};

/* Appends n bytes + NUL to the pool; *ret_off gets the offset. */
static int pool_add(struct wp_al_format *f, const char *s, size_t n, uint32_t *ret_off)
{
        if (n > UINT32_MAX / 4 || f->pool_len + n + 1 > UINT32_MAX)
                return -E2BIG;
        if (f->pool_len + n + 1 > f->pool_cap) {
                size_t cap = f->pool_cap ? f->pool_cap : 256;
                while (cap < f->pool_len + n + 1)
                        cap *= 2;
                char *p = wp_realloc(f->pool, cap);
                if (!p)
                        return -ENOMEM;
                f->pool = p;
                f->pool_cap = cap;
        }
        if (n)
                memcpy(f->pool + f->pool_len, s, n);
        f->pool[f->pool_len + n] = '\0';
        if (ret_off)
                *ret_off = (uint32_t)f->pool_len;
        f->pool_len += n + 1;
        return 0;
}

static struct piece *piece_add(struct wp_al_format *f)
{
        if (f->n_pieces == f->cap_pieces) {
                unsigned cap = f->cap_pieces ? f->cap_pieces * 2 : 16;
                struct piece *p = wp_realloc(f->pieces, cap * sizeof(*p));
                if (!p)
                        return NULL;
                f->pieces = p;
                f->cap_pieces = cap;
        }
        struct piece *p = &f->pieces[f->n_pieces++];
        memset(p, 0, sizeof(*p));
        p->max_len = NO_MAX_LEN;
        return p;
}

static struct jnode *node_add(struct wp_al_format *f, uint8_t kind)
{
        if (f->n_nodes == f->cap_nodes) {
                unsigned cap = f->cap_nodes ? f->cap_nodes * 2 : 16;
                struct jnode *p = wp_realloc(f->nodes, cap * sizeof(*p));
                if (!p)
                        return NULL;
                f->nodes = p;
                f->cap_nodes = cap;
        }
        struct jnode *n = &f->nodes[f->n_nodes++];
        memset(n, 0, sizeof(*n));
        n->kind = kind;
        return n;
}

/* Length of the valid UTF-8 sequence at s (RFC 3629: no overlongs, no surrogates, <=
 * U+10FFFF), or 0 when invalid / truncated. */
static size_t utf8_len(const unsigned char *s, size_t n)
{
        unsigned char c = s[0];
        size_t len;
        unsigned char lo = 0x80, hi = 0xbf;

        if (c < 0x80)
                return 1;
        if (c >= 0xc2 && c <= 0xdf)
                len = 2;
        else if (c >= 0xe0 && c <= 0xef) {
                len = 3;
                if (c == 0xe0)
                        lo = 0xa0;
                else if (c == 0xed)
                        hi = 0x9f;
        } else if (c >= 0xf0 && c <= 0xf4) {
                len = 4;
                if (c == 0xf0)
                        lo = 0x90;
                else if (c == 0xf4)
                        hi = 0x8f;
        } else
                return 0;
        if (n < len)
                return 0;
        if (s[1] < lo || s[1] > hi)
                return 0;
        for (size_t i = 2; i < len; i++)
                if (s[i] < 0x80 || s[i] > 0xbf)
                        return 0;
        return len;
}

/* JSON encoding of one unit at s: sets *enc and *enc_len (pointing into tmp or s) and returns the
 * number of input bytes consumed. */
static size_t json_unit(const unsigned char *s, size_t n, char tmp[8], const char **enc,
                        size_t *enc_len)
{
        static const char hex[] = "0123456789abcdef";
        unsigned char c = s[0];

        if (c >= 0x80) {
                size_t l = utf8_len(s, n);
                if (l) {
                        *enc = (const char *)s;
                        *enc_len = l;
                        return l;
                }
                /* Invalid byte: escaped as the code point of the same value (Latin-1). */
        } else if (c == '"' || c == '\\') {
                tmp[0] = '\\';
                tmp[1] = (char)c;
                *enc = tmp;
                *enc_len = 2;
                return 1;
        } else if (c >= 0x20) {
                *enc = (const char *)s;
                *enc_len = 1;
                return 1;
        } else {
                char e = c == '\n'   ? 'n'
                         : c == '\r' ? 'r'
                         : c == '\t' ? 't'
                         : c == '\b' ? 'b'
                         : c == '\f' ? 'f'
                                     : 0;
                if (e) {
                        tmp[0] = '\\';
                        tmp[1] = e;
                        *enc = tmp;
                        *enc_len = 2;
                        return 1;
                }
        }
        memcpy(tmp, "\\u00", 4);
        tmp[4] = hex[c >> 4];
        tmp[5] = hex[c & 15];
        *enc = tmp;
        *enc_len = 6;
        return 1;
}

static int pool_add_json_escaped(struct wp_al_format *f, const char *s, size_t n, bool quote_key,
                                 uint32_t *ret_off, uint32_t *ret_len)
{
        uint32_t off = 0;
        size_t start = f->pool_len;
        int r;

        /* Built in place: one pool entry, grown unit by unit (config time only). */
        if ((r = pool_add(f, quote_key ? "\"" : "", quote_key ? 1 : 0, &off)) < 0)
                return r;
        f->pool_len--; /* drop the NUL: we keep appending */
        for (size_t i = 0; i < n;) {
                char tmp[8];
                const char *enc;
                size_t el;
                i += json_unit((const unsigned char *)s + i, n - i, tmp, &enc, &el);
                if ((r = pool_add(f, enc, el, NULL)) < 0)
                        return r;
                f->pool_len--;
        }
        if ((r = pool_add(f, quote_key ? "\":" : "", quote_key ? 2 : 0, NULL)) < 0)
                return r;
        *ret_off = off;
        *ret_len = (uint32_t)(f->pool_len - 1 - start);
        return 0;
}

static int add_literal(struct wp_al_format *f, const char *s, size_t n, bool json)
{
        struct piece *last = f->n_pieces ? &f->pieces[f->n_pieces - 1] : NULL;
        uint32_t off, len;
        int r;

        if (n == 0)
                return 0;
        if (json)
                r = pool_add_json_escaped(f, s, n, false, &off, &len);
        else {
                r = pool_add(f, s, n, &off);
                len = (uint32_t)n;
        }
        if (r < 0)
                return r;
        /* Merge with a preceding literal that ends right before this one. */
        if (last && f->n_pieces > f->group_first && last->op == OP_LITERAL &&
            last->a_off + last->a_len + 1 == off) {
                memmove(f->pool + off - 1, f->pool + off, len + 1);
                f->pool_len--;
                last->a_len += len;
                return 0;
        }
        struct piece *p = piece_add(f);
        if (!p)
                return -ENOMEM;
        p->op = OP_LITERAL;
        p->a_off = off;
        p->a_len = len;
        return 0;
}

static int add_lower(struct wp_al_format *f, const char *s, size_t n, uint32_t *ret_off)
{
        int r = pool_add(f, s, n, ret_off);
        if (r < 0)
                return r;
        for (size_t i = 0; i < n; i++) {
                char *c = &f->pool[*ret_off + i];
                if (*c >= 'A' && *c <= 'Z')
                        *c = (char)(*c - 'A' + 'a');
        }
        return 0;
}

static bool valid_time_format(const char *s, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                if (s[i] != '%')
                        continue;
                if (++i >= n)
                        return false;
                if (s[i] == 'E' && i + 2 < n && s[i + 1] >= '1' && s[i + 1] <= '9' &&
                    s[i + 2] == 'S') {
                        i += 2;
                        continue;
                }
                if (s[i] >= '1' && s[i] <= '9' && i + 1 < n && s[i + 1] == 'f') {
                        i++;
                        continue;
                }
        }
        return true;
}

static int compile_command(struct wp_al_format *f, const char *name, size_t name_len,
                           const char *arg, size_t arg_len, bool has_arg, uint32_t max_len,
                           const char **reterr_desc)
{
        const struct op_def *d = NULL;
        int r;

        for (size_t i = 0; i < sizeof(op_defs) / sizeof(op_defs[0]); i++)
                if (strlen(op_defs[i].name) == name_len &&
                    memcmp(op_defs[i].name, name, name_len) == 0) {
                        d = &op_defs[i];
                        break;
                }
        if (!d)
                return fail(-EINVAL, reterr_desc,
                            "unsupported access log command operator %%%.*s%%",
                            (int)(name_len > 64 ? 64 : name_len), name);
        if (d->arg == ARG_NONE && has_arg)
                return fail(-EINVAL, reterr_desc, "command operator %s takes no argument", d->name);
        if (d->arg == ARG_REQUIRED && (!has_arg || arg_len == 0))
                return fail(-EINVAL, reterr_desc, "command operator %s needs an argument", d->name);
        if (++f->n_commands > WP_AL_MAX_COMMANDS)
                return fail(-EINVAL, reterr_desc, "more than %d command operators in one format",
                            WP_AL_MAX_COMMANDS);

        struct piece *p = piece_add(f);
        if (!p)
                return -ENOMEM;
        p->op = d->op;
        p->sub = d->sub;
        p->max_len = max_len;
        unsigned idx = f->n_pieces - 1;

        switch (d->op) {
        case OP_REQ:
        case OP_REQ_WITHOUT_QUERY:
        case OP_RESP:
        case OP_TRAILER: {
                const char *q = memchr(arg, '?', arg_len);
                size_t main_len = q ? (size_t)(q - arg) : arg_len;
                size_t alt_len = q ? arg_len - main_len - 1 : 0;
                if (q && (memchr(q + 1, '?', alt_len) || alt_len == 0))
                        return fail(-EINVAL, reterr_desc,
                                    "%s(%.*s): expected HEADER or HEADER?ALTERNATIVE", d->name,
                                    (int)(arg_len > 64 ? 64 : arg_len), arg);
                if (main_len == 0 || main_len > MAX_HEADER_NAME || alt_len > MAX_HEADER_NAME)
                        return fail(-EINVAL, reterr_desc, "%s: bad header name length", d->name);
                uint32_t off;
                if ((r = add_lower(f, arg, main_len, &off)) < 0)
                        return r;
                f->pieces[idx].a_off = off;
                f->pieces[idx].a_len = (uint32_t)main_len;
                if (q) {
                        if ((r = add_lower(f, q + 1, alt_len, &off)) < 0)
                                return r;
                        f->pieces[idx].b_off = off;
                        f->pieces[idx].b_len = (uint32_t)alt_len;
                }
                break;
        }
        case OP_START_TIME:
                if (has_arg && arg_len > 0) {
                        if (arg_len > MAX_TIME_FORMAT || !valid_time_format(arg, arg_len))
                                return fail(-EINVAL, reterr_desc,
                                            "START_TIME: bad or too long time format");
                        uint32_t off;
                        if ((r = pool_add(f, arg, arg_len, &off)) < 0)
                                return r;
                        f->pieces[idx].a_off = off;
                        f->pieces[idx].a_len = (uint32_t)arg_len;
                }
                break;
        case OP_COMMON_DURATION: {
                /* START:END:PRECISION; a point that is none of Envoy's names is a custom time
                 * point (set by named filters in Envoy: none here, so the value is missing) */
                const char *c1 = memchr(arg, ':', arg_len), *c2;
                size_t pl[3];
                const char *pp[3];

                c2 = c1 ? memchr(c1 + 1, ':', arg_len - (size_t)(c1 + 1 - arg)) : NULL;
                if (!c1 || !c2 || memchr(c2 + 1, ':', arg_len - (size_t)(c2 + 1 - arg)))
                        return fail(-EINVAL, reterr_desc,
                                    "COMMON_DURATION(%.*s): expected START:END:PRECISION",
                                    (int)(arg_len > 64 ? 64 : arg_len), arg);
                pp[0] = arg;
                pl[0] = (size_t)(c1 - arg);
                pp[1] = c1 + 1;
                pl[1] = (size_t)(c2 - c1 - 1);
                pp[2] = c2 + 1;
                pl[2] = arg_len - (size_t)(c2 + 1 - arg);
                if (!pl[0] || !pl[1])
                        return fail(-EINVAL, reterr_desc, "COMMON_DURATION: empty time point");
                for (unsigned k = 0; k < 2; k++) {
                        uint8_t cp = CP_CUSTOM;

                        for (uint8_t j = 0; j < CP_CUSTOM; j++)
                                if (strlen(cp_names[j]) == pl[k] &&
                                    memcmp(cp_names[j], pp[k], pl[k]) == 0)
                                        cp = j;
                        if (k == 0)
                                f->pieces[idx].cp_start = cp;
                        else
                                f->pieces[idx].cp_end = cp;
                }
                if (pl[2] == 2 && memcmp(pp[2], "ms", 2) == 0)
                        f->pieces[idx].sub = PREC_MS;
                else if (pl[2] == 2 && memcmp(pp[2], "us", 2) == 0)
                        f->pieces[idx].sub = PREC_US;
                else if (pl[2] == 2 && memcmp(pp[2], "ns", 2) == 0)
                        f->pieces[idx].sub = PREC_NS;
                else
                        return fail(-EINVAL, reterr_desc,
                                    "COMMON_DURATION: precision must be ms, us or ns");
                break;
        }
        case OP_FILTER_STATE: {
                /* KEY, KEY:PLAIN or KEY:TYPED; the value is rendered as a plain string. */
                const char *colon = memchr(arg, ':', arg_len);
                size_t key_len = colon ? (size_t)(colon - arg) : arg_len;
                if (colon) {
                        size_t sl = arg_len - key_len - 1;
                        if (!((sl == 5 && memcmp(colon + 1, "PLAIN", 5) == 0) ||
                              (sl == 5 && memcmp(colon + 1, "TYPED", 5) == 0)))
                                return fail(-EINVAL, reterr_desc,
                                            "FILTER_STATE: only KEY, KEY:PLAIN and KEY:TYPED");
                }
                if (key_len == 0 || key_len > MAX_HEADER_NAME)
                        return fail(-EINVAL, reterr_desc, "FILTER_STATE: bad key length");
                uint32_t off;
                if ((r = pool_add(f, arg, key_len, &off)) < 0)
                        return r;
                f->pieces[idx].a_off = off;
                f->pieces[idx].a_len = (uint32_t)key_len;
                break;
        }
        case OP_STATIC: {
                char host[256];
                const char *v = NULL;
                if (has_arg) { /* ENVIRONMENT(NAME): resolved once, as Envoy does */
                        char var[MAX_HEADER_NAME + 1];
                        if (arg_len > MAX_HEADER_NAME)
                                return fail(-EINVAL, reterr_desc, "ENVIRONMENT: name too long");
                        memcpy(var, arg, arg_len);
                        var[arg_len] = '\0';
                        v = getenv(var);
                } else if (gethostname(host, sizeof(host)) == 0) {
                        host[sizeof(host) - 1] = '\0';
                        v = host;
                }
                if (!v || !*v) {
                        f->pieces[idx].sub = 1; /* missing */
                        break;
                }
                size_t vl = strlen(v);
                if (vl > WP_AL_MAX_FORMAT_LEN)
                        vl = WP_AL_MAX_FORMAT_LEN;
                uint32_t off;
                if ((r = pool_add(f, v, vl, &off)) < 0)
                        return r;
                f->pieces[idx].a_off = off;
                f->pieces[idx].a_len = (uint32_t)vl;
                break;
        }
        default:
                break;
        }
        return 0;
}

/* Parses a format string into pieces (literals escaped for JSON when json). */
static int compile_pieces(struct wp_al_format *f, const char *s, size_t n, bool json,
                          const char **reterr_desc)
{
        size_t lit = 0, i = 0;
        int r;

        if (n > WP_AL_MAX_FORMAT_LEN)
                return fail(-EINVAL, reterr_desc, "format longer than %d bytes",
                            WP_AL_MAX_FORMAT_LEN);
        while (i < n) {
                if (s[i] != '%') {
                        i++;
                        continue;
                }
                if ((r = add_literal(f, s + lit, i - lit, json)) < 0)
                        return r;
                if (i + 1 < n && s[i + 1] == '%') { /* "%%" is a literal '%' */
                        if ((r = add_literal(f, "%", 1, json)) < 0)
                                return r;
                        i += 2;
                        lit = i;
                        continue;
                }
                size_t start = i, j = i + 1;
                while (j < n && ((s[j] >= 'A' && s[j] <= 'Z') || (s[j] >= '0' && s[j] <= '9') ||
                                 s[j] == '_'))
                        j++;
                size_t name_len = j - start - 1;
                const char *arg = NULL;
                size_t arg_len = 0;
                bool has_arg = false;
                uint32_t max_len = NO_MAX_LEN;
                if (name_len == 0)
                        return fail(-EINVAL, reterr_desc,
                                    "no valid command operator at position %zu", start);
                if (j < n && s[j] == '(') {
                        const char *close = memchr(s + j + 1, ')', n - j - 1);
                        if (!close)
                                return fail(-EINVAL, reterr_desc,
                                            "unterminated argument of %%%.*s at position %zu",
                                            (int)(name_len > 64 ? 64 : name_len), s + start + 1,
                                            start);
                        has_arg = true;
                        arg = s + j + 1;
                        arg_len = (size_t)(close - arg);
                        j = (size_t)(close - s) + 1;
                }
                if (j < n && s[j] == ':') {
                        size_t k = j + 1;
                        uint64_t v = 0;
                        while (k < n && s[k] >= '0' && s[k] <= '9' && v <= MAX_MAX_LEN)
                                v = v * 10 + (uint64_t)(s[k++] - '0');
                        if (k == j + 1 || v > MAX_MAX_LEN)
                                return fail(-EINVAL, reterr_desc,
                                            "bad max length of %%%.*s at position %zu",
                                            (int)(name_len > 64 ? 64 : name_len), s + start + 1,
                                            start);
                        max_len = (uint32_t)v;
                        j = k;
                }
                if (j >= n || s[j] != '%')
                        return fail(-EINVAL, reterr_desc,
                                    "unterminated command operator %%%.*s at position %zu",
                                    (int)(name_len > 64 ? 64 : name_len), s + start + 1, start);
                if ((r = compile_command(f, s + start + 1, name_len, arg, arg_len, has_arg, max_len,
                                         reterr_desc)) < 0)
                        return r;
                i = j + 1;
                lit = i;
        }
        return add_literal(f, s + lit, n - lit, json);
}

static struct wp_al_format *format_alloc(unsigned flags, bool json)
{
        struct wp_al_format *f = wp_calloc(1, sizeof(*f));
        if (f) {
                f->flags = flags;
                f->json = json;
        }
        return f;
}

struct wp_al_format *wp_al_format_free(struct wp_al_format *f)
{
        if (!f)
                return NULL;
        wp_free(f->pool);
        wp_free(f->pieces);
        wp_free(f->nodes);
        wp_free(f);
        return NULL;
}

bool wp_al_format_is_json(const struct wp_al_format *f)
{
        return f->json;
}

int wp_al_format_compile_text(const char *fmt, size_t len, unsigned flags,
                              struct wp_al_format **ret, const char **reterr_desc)
{
        struct wp_al_format *f = format_alloc(flags & WP_AL_OMIT_EMPTY, false);
        int r;

        if (!f)
                return fail(-ENOMEM, reterr_desc, "out of memory");
        if ((r = compile_pieces(f, fmt, len, false, reterr_desc)) < 0) {
                if (r == -ENOMEM || r == -E2BIG)
                        r = fail(-ENOMEM, reterr_desc, "out of memory");
                wp_al_format_free(f);
                return r;
        }
        *ret = f;
        return 0;
}

/* ---- JSON compile ---------------------------------------------------------------------- */

static int key_add(struct wp_al_format *f, struct jnode *tmpl, const char *key)
{
        uint32_t off, len;
        int r = pool_add_json_escaped(f, key, strlen(key), true, &off, &len);
        if (r < 0)
                return r;
        tmpl->key_off = off;
        tmpl->key_len = len;
        return 0;
}

/* One value (key NULL for the root struct handled by the caller). */
static int compile_json_value(struct wp_al_format *f, const char *key,
                              const Google__Protobuf__Value *v, const char **reterr_desc);

static int cmp_entry(const void *a, const void *b)
{
        const Google__Protobuf__Struct__FieldsEntry *const *x = a, *const *y = b;
        return strcmp((*x)->key ? (*x)->key : "", (*y)->key ? (*y)->key : "");
}

static int compile_json_struct(struct wp_al_format *f, const char *key,
                               const Google__Protobuf__Struct *s, const char **reterr_desc)
{
        struct jnode tmpl = {.kind = J_BEGIN};
        const Google__Protobuf__Struct__FieldsEntry **order = NULL;
        size_t n = s ? s->n_fields : 0;
        int r;

        if (f->depth >= WP_AL_MAX_JSON_DEPTH)
                return fail(-EINVAL, reterr_desc, "JSON format nested deeper than %d",
                            WP_AL_MAX_JSON_DEPTH);
        if (key && (r = key_add(f, &tmpl, key)) < 0)
                return r;
        struct jnode *b = node_add(f, J_BEGIN);
        if (!b)
                return -ENOMEM;
        *b = tmpl;
        if (n) {
                order = wp_malloc(n * sizeof(*order));
                if (!order)
                        return -ENOMEM;
                for (size_t i = 0; i < n; i++)
                        order[i] = s->fields[i];
                const Google__Protobuf__Struct__FieldsEntry **sorted = order;
                /* Duplicate keys are rejected (a map entry repeated on the wire). */
                qsort(sorted, n, sizeof(*sorted), cmp_entry);
                for (size_t i = 1; i < n; i++)
                        if (cmp_entry(&sorted[i - 1], &sorted[i]) == 0) {
                                r = fail(-EINVAL, reterr_desc,
                                         "duplicate JSON format key \"%.64s\"",
                                         sorted[i]->key ? sorted[i]->key : "");
                                goto err_free_order;
                        }
                if (!(f->flags & WP_AL_JSON_SORT))
                        for (size_t i = 0; i < n; i++)
                                order[i] = s->fields[i];
        }
        f->depth++;
        for (size_t i = 0; i < n; i++) {
                if ((r = compile_json_value(f, order[i]->key ? order[i]->key : "", order[i]->value,
                                            reterr_desc)) < 0)
                        goto err_free_order;
        }
        f->depth--;
        wp_free(order);
        return node_add(f, J_END) ? 0 : -ENOMEM;

err_free_order:
        wp_free(order);
        return r;
}

static int compile_json_raw(struct wp_al_format *f, const struct jnode *tmpl, const char *raw)
{
        uint32_t off;
        int r = pool_add(f, raw, strlen(raw), &off);
        if (r < 0)
                return r;
        struct jnode *nd = node_add(f, J_RAW);
        if (!nd)
                return -ENOMEM;
        *nd = *tmpl;
        nd->kind = J_RAW;
        nd->raw_off = off;
        nd->raw_len = (uint32_t)strlen(raw);
        return 0;
}

static int compile_json_value(struct wp_al_format *f, const char *key,
                              const Google__Protobuf__Value *v, const char **reterr_desc)
{
        struct jnode tmpl = {.kind = J_GROUP};
        int r;

        if (v && v->kind_case == GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE)
                return compile_json_struct(f, key, v->struct_value, reterr_desc);
        if ((r = key_add(f, &tmpl, key)) < 0)
                return r;
        switch (v ? v->kind_case : GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE) {
        case GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE: {
                tmpl.first = f->n_pieces;
                f->group_first = f->n_pieces;
                const char *s = v->string_value ? v->string_value : "";
                if ((r = compile_pieces(f, s, strlen(s), true, reterr_desc)) < 0)
                        return r;
                tmpl.n = f->n_pieces - tmpl.first;
                struct jnode *nd = node_add(f, J_GROUP);
                if (!nd)
                        return -ENOMEM;
                *nd = tmpl;
                return 0;
        }
        case GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE: {
                char num[40];
                if (!isfinite(v->number_value))
                        return fail(-EINVAL, reterr_desc,
                                    "JSON format key \"%.64s\": not a finite number", key);
                if (v->number_value > -9007199254740992.0 && v->number_value < 9007199254740992.0 &&
                    v->number_value == (double)(int64_t)v->number_value)
                        snprintf(num, sizeof(num), "%" PRId64, (int64_t)v->number_value);
                else
                        snprintf(num, sizeof(num), "%.17g", v->number_value);
                return compile_json_raw(f, &tmpl, num);
        }
        case GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE:
                return compile_json_raw(f, &tmpl, v->bool_value ? "true" : "false");
        case GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE:
                return fail(-EINVAL, reterr_desc,
                            "JSON format key \"%.64s\": lists are not supported", key);
        default:
                return compile_json_raw(f, &tmpl, "null");
        }
}

static int finish_json(struct wp_al_format *f, int r, struct wp_al_format **ret,
                       const char **reterr_desc)
{
        if (r < 0) {
                if (r == -ENOMEM || r == -E2BIG)
                        r = fail(-ENOMEM, reterr_desc, "out of memory");
                wp_al_format_free(f);
                return r;
        }
        *ret = f;
        return 0;
}

int wp_al_format_compile_json(const Google__Protobuf__Struct *s, unsigned flags,
                              struct wp_al_format **ret, const char **reterr_desc)
{
        struct wp_al_format *f = format_alloc(flags, true);

        if (!f)
                return fail(-ENOMEM, reterr_desc, "out of memory");
        return finish_json(f, compile_json_struct(f, NULL, s, reterr_desc), ret, reterr_desc);
}

int wp_al_format_compile_json_fields(const struct wp_al_json_field *fields, size_t n,
                                     unsigned flags, struct wp_al_format **ret,
                                     const char **reterr_desc)
{
        Google__Protobuf__Struct s = GOOGLE__PROTOBUF__STRUCT__INIT;
        Google__Protobuf__Struct__FieldsEntry *e = NULL, **pe = NULL;
        Google__Protobuf__Value *v = NULL;
        int r;

        if (n) {
                e = wp_calloc(n, sizeof(*e));
                pe = wp_calloc(n, sizeof(*pe));
                v = wp_calloc(n, sizeof(*v));
                if (!e || !pe || !v) {
                        r = fail(-ENOMEM, reterr_desc, "out of memory");
                        goto out;
                }
        }
        for (size_t i = 0; i < n; i++) {
                Google__Protobuf__Value vi = GOOGLE__PROTOBUF__VALUE__INIT;
                Google__Protobuf__Struct__FieldsEntry ei =
                        GOOGLE__PROTOBUF__STRUCT__FIELDS_ENTRY__INIT;
                v[i] = vi;
                v[i].kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
                v[i].string_value = (char *)fields[i].format;
                e[i] = ei;
                e[i].key = (char *)fields[i].key;
                e[i].value = &v[i];
                pe[i] = &e[i];
        }
        s.n_fields = n;
        s.fields = pe;
        r = wp_al_format_compile_json(&s, flags, ret, reterr_desc);
out:
        wp_free(e);
        wp_free(pe);
        wp_free(v);
        return r;
}

int wp_al_format_compile_sfs(const Envoy__Config__Core__V3__SubstitutionFormatString *sfs,
                             struct wp_al_format **ret, const char **reterr_desc)
{
        unsigned flags = 0;

        if (sfs->omit_empty_values)
                flags |= WP_AL_OMIT_EMPTY;
        if (sfs->json_format_options && sfs->json_format_options->sort_properties)
                flags |= WP_AL_JSON_SORT;
        for (size_t i = 0; i < sfs->n_formatters; i++) {
                const char *name = sfs->formatters[i] && sfs->formatters[i]->name
                                           ? sfs->formatters[i]->name
                                           : "";
                if (strcmp(name, "envoy.formatter.req_without_query") != 0)
                        return fail(-EOPNOTSUPP, reterr_desc,
                                    "unsupported access log formatter extension \"%.64s\"", name);
        }
        switch (sfs->format_case) {
        case ENVOY__CONFIG__CORE__V3__SUBSTITUTION_FORMAT_STRING__FORMAT_TEXT_FORMAT: {
                const char *t = sfs->text_format ? sfs->text_format : "";
                return wp_al_format_compile_text(t, strlen(t), flags, ret, reterr_desc);
        }
        case ENVOY__CONFIG__CORE__V3__SUBSTITUTION_FORMAT_STRING__FORMAT_JSON_FORMAT:
                if (!sfs->json_format)
                        return fail(-EINVAL, reterr_desc, "json_format is empty");
                return wp_al_format_compile_json(sfs->json_format, flags, ret, reterr_desc);
        case ENVOY__CONFIG__CORE__V3__SUBSTITUTION_FORMAT_STRING__FORMAT_TEXT_FORMAT_SOURCE: {
                const Envoy__Config__Core__V3__DataSource *ds = sfs->text_format_source;
                const char *t = NULL;
                size_t tl = 0;
                switch (ds ? ds->specifier_case : 0) {
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_INLINE_STRING:
                        t = ds->inline_string ? ds->inline_string : "";
                        tl = strlen(t);
                        break;
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_INLINE_BYTES:
                        t = (const char *)ds->inline_bytes.data;
                        tl = ds->inline_bytes.len;
                        if (!t)
                                t = "";
                        break;
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_ENVIRONMENT_VARIABLE:
                        t = ds->environment_variable ? getenv(ds->environment_variable) : NULL;
                        if (!t)
                                return fail(-EINVAL, reterr_desc,
                                            "text_format_source: environment variable %.64s unset",
                                            ds->environment_variable ? ds->environment_variable
                                                                     : "");
                        tl = strlen(t);
                        break;
                case ENVOY__CONFIG__CORE__V3__DATA_SOURCE__SPECIFIER_FILENAME:
                        return fail(-EOPNOTSUPP, reterr_desc,
                                    "text_format_source.filename is not supported");
                default:
                        return fail(-EINVAL, reterr_desc, "text_format_source is empty");
                }
                return wp_al_format_compile_text(t, tl, flags, ret, reterr_desc);
        }
        default:
                return fail(-EINVAL, reterr_desc, "log_format has no format");
        }
}

/* ---- values ---------------------------------------------------------------------------- */

enum { V_MISSING, V_STR, V_NUM };
enum { E_UNDERSCORE = 1 }; /* whitespace -> '_' (Envoy does so for details/reasons) */

struct val {
        int kind;
        unsigned esc; /* E_* */
        const char *s;
        size_t n;
};

#define SCRATCH 1024

static void val_str(struct val *v, const char *s)
{
        if (s && *s) {
                v->kind = V_STR;
                v->s = s;
                v->n = strlen(s);
        }
}

static void val_num(struct val *v, uint64_t x, char *scratch)
{
        int l = snprintf(scratch, SCRATCH, "%" PRIu64, x);
        v->kind = V_NUM;
        v->s = scratch;
        v->n = (size_t)l;
}

static void val_ms(struct val *v, uint64_t from, uint64_t to, char *scratch)
{
        if (!from || !to)
                return;
        val_num(v, to > from ? (to - from) / WP_NSEC_PER_MSEC : 0, scratch);
}

/* A COMMON_DURATION time point of c (monotonic ns), 0 when it did not happen. */
static uint64_t common_point(const struct wp_al_ctx *c, uint8_t cp)
{
        switch (cp) {
        case CP_DS_RX_BEG:
                return c->start_ns;
        case CP_DS_RX_END:
                return c->request_end_ns;
        case CP_US_CX_BEG:
                return c->upstream_connect_start_ns;
        case CP_US_CX_END:
                return c->upstream_connect_end_ns;
        case CP_US_HS_END:
                return c->upstream_handshake_end_ns;
        case CP_US_TX_BEG:
                return c->upstream_tx_begin_ns;
        case CP_US_TX_END:
                return c->upstream_tx_end_ns;
        case CP_US_RX_BEG:
                return c->upstream_first_byte_ns;
        case CP_US_RX_BODY_BEG:
                return c->upstream_rx_body_begin_ns;
        case CP_US_RX_END:
                return c->upstream_last_byte_ns;
        case CP_DS_TX_BEG:
                return c->downstream_tx_begin_ns;
        case CP_DS_TX_END:
                return c->end_ns;
        default:
                return 0;
        }
}

/* END - START in the piece's precision; negative when END is earlier (Envoy: H/2 half-close). */
static void val_common_duration(struct val *v, const struct piece *p, const struct wp_al_ctx *c,
                                char *scratch)
{
        static const uint64_t div[] = {
                [PREC_MS] = WP_NSEC_PER_MSEC, [PREC_US] = 1000, [PREC_NS] = 1};
        uint64_t a = common_point(c, p->cp_start), b = common_point(c, p->cp_end);
        int l;

        if (!c->req || !a || !b)
                return; /* HTTP only */
        l = b >= a ? snprintf(scratch, SCRATCH, "%" PRIu64, (b - a) / div[p->sub])
                   : snprintf(scratch, SCRATCH, "-%" PRIu64, (a - b) / div[p->sub]);
        v->kind = V_NUM;
        v->s = scratch;
        v->n = (size_t)l;
}

/* Uncompressed header bytes as Envoy counts them: every name and value, pseudo-headers
 * included. */
static uint64_t request_header_bytes(const struct wp_http_request *r)
{
        static const char *const pseudo[] = {":method", ":path", ":authority", ":scheme"};
        const char *v[] = {r->method, r->path, r->authority, r->scheme};
        uint64_t n = r->headers.bytes;

        for (unsigned i = 0; i < 4; i++)
                if (v[i] && *v[i])
                        n += strlen(pseudo[i]) + strlen(v[i]);
        return n;
}

static uint64_t response_header_bytes(const struct wp_http_response *r)
{
        return r->headers.bytes + (r->status ? strlen(":status") + 3 : 0);
}

static uint64_t wire_bytes(const struct wp_al_ctx *c, unsigned which)
{
        switch (which) {
        case WB_UPSTREAM_SENT:
                return c->upstream_wire_bytes_sent;
        case WB_UPSTREAM_RECEIVED:
                return c->upstream_wire_bytes_received;
        case WB_UPSTREAM_HEADER_SENT:
                return c->upstream_header_bytes_sent;
        case WB_UPSTREAM_HEADER_RECEIVED:
                return c->upstream_header_bytes_received;
        case WB_DOWNSTREAM_SENT:
                return c->downstream_wire_bytes_sent;
        case WB_DOWNSTREAM_RECEIVED:
                return c->downstream_wire_bytes_received;
        case WB_DOWNSTREAM_HEADER_SENT:
                return c->downstream_header_bytes_sent;
        default:
                return c->downstream_header_bytes_received;
        }
}

static const char *http_version_name(enum wp_http_version v)
{
        return v == WP_HTTP_10 ? "HTTP/1.0" : v == WP_HTTP_11 ? "HTTP/1.1" : "HTTP/2";
}

static const struct sockaddr *addr_of(const struct wp_al_ctx *c, unsigned which)
{
        switch (which) {
        case ADDR_UPSTREAM_HOST:
                return c->upstream_host;
        case ADDR_UPSTREAM_LOCAL:
                return c->upstream_local;
        case ADDR_DOWNSTREAM_LOCAL:
                return c->downstream_local;
        default:
                return c->downstream_remote;
        }
}

static const char *req_lookup(const struct wp_http_request *r, const char *name, uint32_t *ret_len)
{
        const char *v = NULL;

        if (!r)
                return NULL;
        if (name[0] == ':') {
                if (strcmp(name, ":method") == 0)
                        v = r->method;
                else if (strcmp(name, ":path") == 0)
                        v = r->path;
                else if (strcmp(name, ":authority") == 0)
                        v = r->authority;
                else if (strcmp(name, ":scheme") == 0)
                        v = r->scheme;
                if (v)
                        *ret_len = (uint32_t)strlen(v);
                return v;
        }
        return wp_headers_get(&r->headers, name, ret_len);
}

static const char *resp_lookup(const struct wp_http_response *r, const char *name,
                               uint32_t *ret_len, char *scratch)
{
        if (!r)
                return NULL;
        if (name[0] == ':') {
                if (strcmp(name, ":status") == 0 && r->status) {
                        *ret_len = (uint32_t)snprintf(scratch, SCRATCH, "%u", r->status);
                        return scratch;
                }
                return NULL;
        }
        return wp_headers_get(&r->headers, name, ret_len);
}

static void fmt_addr(struct val *v, const struct sockaddr *sa, bool no_port, char *scratch)
{
        char ip[INET6_ADDRSTRLEN];
        int l;

        if (!sa)
                return;
        if (sa->sa_family == AF_INET) {
                const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
                if (!inet_ntop(AF_INET, &in->sin_addr, ip, sizeof(ip)))
                        return;
                l = no_port ? snprintf(scratch, SCRATCH, "%s", ip)
                            : snprintf(scratch, SCRATCH, "%s:%u", ip, ntohs(in->sin_port));
        } else if (sa->sa_family == AF_INET6) {
                const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
                if (!inet_ntop(AF_INET6, &in6->sin6_addr, ip, sizeof(ip)))
                        return;
                l = no_port ? snprintf(scratch, SCRATCH, "%s", ip)
                            : snprintf(scratch, SCRATCH, "[%s]:%u", ip, ntohs(in6->sin6_port));
        } else
                return;
        v->kind = V_STR;
        v->s = scratch;
        v->n = (size_t)l;
}

static size_t put_digits(char *p, uint64_t x, unsigned width)
{
        for (unsigned i = width; i > 0; i--) {
                p[i - 1] = (char)('0' + x % 10);
                x /= 10;
        }
        return width;
}

/* START_TIME: Envoy's default is ISO 8601 UTC with milliseconds; a custom format is strftime
 * plus %E<n>S (seconds with n fractional digits), %<n>f and %f (fractional seconds). */
static void fmt_time(struct val *v, int64_t unix_ns, const char *fmt, uint32_t fmt_len,
                     char *scratch)
{
        time_t secs;
        int64_t frac;
        struct tm tm;
        size_t n = 0;

        if (unix_ns <= 0)
                return;
        secs = (time_t)(unix_ns / 1000000000);
        frac = unix_ns % 1000000000;
        if (!gmtime_r(&secs, &tm))
                return;
        if (!fmt_len) {
                char *p = scratch;
                n += put_digits(p + n, (uint64_t)tm.tm_year + 1900, 4);
                p[n++] = '-';
                n += put_digits(p + n, (uint64_t)tm.tm_mon + 1, 2);
                p[n++] = '-';
                n += put_digits(p + n, (uint64_t)tm.tm_mday, 2);
                p[n++] = 'T';
                n += put_digits(p + n, (uint64_t)tm.tm_hour, 2);
                p[n++] = ':';
                n += put_digits(p + n, (uint64_t)tm.tm_min, 2);
                p[n++] = ':';
                n += put_digits(p + n, (uint64_t)tm.tm_sec, 2);
                p[n++] = '.';
                n += put_digits(p + n, (uint64_t)frac / 1000000, 3);
                p[n++] = 'Z';
        } else {
                /* Chunks between our own specifiers go through strftime (the format is at
                 * most 64 bytes, so a chunk's expansion stays well inside the scratch). */
                char chunk[MAX_TIME_FORMAT + 1];
                size_t cl = 0;
                uint32_t i = 0;
                while (i <= fmt_len && n + 64 < SCRATCH) {
                        unsigned digits = 0;
                        bool with_secs = false;
                        size_t skip = 0;
                        if (i < fmt_len && fmt[i] == '%' && i + 1 < fmt_len) {
                                const char *s = fmt + i + 1;
                                size_t rest = fmt_len - i - 1;
                                if (rest >= 3 && s[0] == 'E' && s[1] >= '1' && s[1] <= '9' &&
                                    s[2] == 'S') {
                                        digits = (unsigned)(s[1] - '0');
                                        with_secs = true;
                                        skip = 4;
                                } else if (rest >= 2 && s[0] >= '1' && s[0] <= '9' && s[1] == 'f') {
                                        digits = (unsigned)(s[0] - '0');
                                        skip = 3;
                                } else if (s[0] == 'f') {
                                        digits = 9;
                                        skip = 2;
                                } else { /* an ordinary specifier stays in the chunk */
                                        chunk[cl++] = fmt[i];
                                        chunk[cl++] = fmt[i + 1];
                                        i += 2;
                                        continue;
                                }
                        } else if (i < fmt_len) {
                                chunk[cl++] = fmt[i++];
                                continue;
                        }
                        if (cl) { /* flush before a special specifier or at the end */
                                chunk[cl] = '\0';
                                n += strftime(scratch + n, SCRATCH - 32 - n, chunk, &tm);
                                cl = 0;
                        }
                        if (!skip)
                                break;
                        if (with_secs) {
                                n += put_digits(scratch + n, (uint64_t)tm.tm_sec, 2);
                                scratch[n++] = '.';
                        }
                        uint64_t fr = (uint64_t)frac;
                        for (unsigned d = digits; d < 9; d++)
                                fr /= 10;
                        n += put_digits(scratch + n, fr, digits);
                        i += (uint32_t)skip;
                }
        }
        v->kind = V_STR;
        v->s = scratch;
        v->n = n;
}

/* typed: the value is rendered as a typed JSON value (numbers are not truncated). */
static void get_value(const struct wp_al_format *f, const struct piece *p,
                      const struct wp_al_ctx *c, bool typed, struct val *v, char *scratch)
{
        const char *pool = f->pool;
        uint32_t l = 0;
        const char *s;

        v->kind = V_MISSING;
        v->esc = 0;
        switch (p->op) {
        case OP_STATIC:
                if (!p->sub) {
                        v->kind = V_STR;
                        v->s = pool + p->a_off;
                        v->n = p->a_len;
                }
                break;
        case OP_START_TIME:
                fmt_time(v, c->start_unix_ns, pool + p->a_off, p->a_len, scratch);
                break;
        case OP_DURATION:
                val_ms(v, c->start_ns, c->end_ns, scratch);
                break;
        case OP_REQUEST_DURATION:
                val_ms(v, c->start_ns, c->request_end_ns, scratch);
                break;
        case OP_RESPONSE_DURATION:
                val_ms(v, c->start_ns, c->upstream_first_byte_ns, scratch);
                break;
        case OP_RESPONSE_TX_DURATION:
                val_ms(v, c->upstream_first_byte_ns, c->end_ns, scratch);
                break;
        case OP_RESPONSE_CODE:
                val_num(v, c->response_code, scratch);
                break;
        case OP_RESPONSE_CODE_DETAILS:
                val_str(v, c->response_code_details);
                v->esc = E_UNDERSCORE;
                break;
        case OP_CONNECTION_TERMINATION_DETAILS:
                val_str(v, c->connection_termination_details);
                v->esc = E_UNDERSCORE;
                break;
        case OP_UPSTREAM_TRANSPORT_FAILURE_REASON:
                val_str(v, c->upstream_transport_failure_reason);
                v->esc = E_UNDERSCORE;
                break;
        case OP_RESPONSE_FLAGS: {
                size_t n = wp_al_flags_format(c->response_flags, scratch, SCRATCH);
                v->kind = V_STR;
                v->s = scratch;
                v->n = n < SCRATCH ? n : SCRATCH - 1;
                break;
        }
        case OP_BYTES_RECEIVED:
                val_num(v, c->bytes_received, scratch);
                break;
        case OP_BYTES_SENT:
                val_num(v, c->bytes_sent, scratch);
                break;
        case OP_UPSTREAM_REQUEST_ATTEMPT_COUNT:
                val_num(v, c->upstream_request_attempt_count, scratch);
                break;
        case OP_PROTOCOL:
                if (c->req)
                        val_str(v, http_version_name(c->req->version));
                break;
        case OP_REQ:
        case OP_REQ_WITHOUT_QUERY:
                s = req_lookup(c->req, pool + p->a_off, &l);
                if (!s && p->b_len)
                        s = req_lookup(c->req, pool + p->b_off, &l);
                if (s) {
                        v->kind = V_STR;
                        v->s = s;
                        v->n = l;
                        if (p->op == OP_REQ_WITHOUT_QUERY) {
                                const char *q = memchr(s, '?', l);
                                if (q)
                                        v->n = (size_t)(q - s);
                        }
                }
                break;
        case OP_RESP:
                s = resp_lookup(c->resp, pool + p->a_off, &l, scratch);
                if (!s && p->b_len)
                        s = resp_lookup(c->resp, pool + p->b_off, &l, scratch);
                if (s) {
                        v->kind = V_STR;
                        v->s = s;
                        v->n = l;
                }
                break;
        case OP_TRAILER:
                s = c->resp_trailers ? wp_headers_get(c->resp_trailers, pool + p->a_off, &l) : NULL;
                if (!s && p->b_len && c->resp_trailers)
                        s = wp_headers_get(c->resp_trailers, pool + p->b_off, &l);
                if (s) {
                        v->kind = V_STR;
                        v->s = s;
                        v->n = l;
                }
                break;
        case OP_ADDR:
                fmt_addr(v, addr_of(c, p->sub & ~ADDR_NO_PORT), p->sub & ADDR_NO_PORT, scratch);
                break;
        case OP_PORT: {
                const struct sockaddr *sa = addr_of(c, p->sub);

                if (sa && sa->sa_family == AF_INET)
                        val_num(v, ntohs(((const struct sockaddr_in *)sa)->sin_port), scratch);
                else if (sa && sa->sa_family == AF_INET6)
                        val_num(v, ntohs(((const struct sockaddr_in6 *)sa)->sin6_port), scratch);
                break;
        }
        case OP_REQUEST_TX_DURATION:
                val_ms(v, c->start_ns, c->upstream_tx_end_ns, scratch);
                break;
        case OP_DOWNSTREAM_HANDSHAKE_DURATION:
                if (!c->req) /* TCP only, as Envoy */
                        val_ms(v, c->downstream_conn_start_ns, c->downstream_handshake_end_ns,
                               scratch);
                break;
        case OP_UPSTREAM_POOL_READY_DURATION:
                val_ms(v, c->upstream_request_start_ns, c->upstream_pool_ready_ns, scratch);
                break;
        case OP_MISSING:
                break;
        case OP_COMMON_DURATION:
                val_common_duration(v, p, c, scratch);
                break;
        case OP_HEADER_BYTES: /* 0 for TCP, as Envoy */
                val_num(v,
                        p->sub == HB_REQUEST    ? (c->req ? request_header_bytes(c->req) : 0)
                        : p->sub == HB_RESPONSE ? (c->resp ? response_header_bytes(c->resp) : 0)
                                                : (c->resp_trailers ? c->resp_trailers->bytes : 0),
                        scratch);
                break;
        case OP_WIRE_BYTES:
                val_num(v, wire_bytes(c, p->sub), scratch);
                break;
        case OP_UPSTREAM_PROTOCOL:
                if (c->upstream_protocol)
                        val_str(v, http_version_name(
                                           (enum wp_http_version)(c->upstream_protocol - 1)));
                break;
        case OP_CONNECTION_ID:
                if (c->connection_id)
                        val_num(v, c->connection_id, scratch);
                break;
        case OP_UPSTREAM_CONNECTION_ID:
                if (c->upstream_connection_id)
                        val_num(v, c->upstream_connection_id, scratch);
                break;
        case OP_RESPONSE_FLAGS_LONG: {
                size_t n = flags_join(c->response_flags, flag_long_names, scratch, SCRATCH);
                v->kind = V_STR;
                v->s = scratch;
                v->n = n < SCRATCH ? n : SCRATCH - 1;
                break;
        }
        case OP_UPSTREAM_CLUSTER:
                val_str(v, c->upstream_cluster);
                break;
        case OP_DOWNSTREAM_PEER_URI_SAN:
                val_str(v, c->downstream_peer_uri_san);
                break;
        case OP_DOWNSTREAM_LOCAL_URI_SAN:
                val_str(v, c->downstream_local_uri_san);
                break;
        case OP_REQUESTED_SERVER_NAME:
                val_str(v, c->requested_server_name);
                break;
        case OP_ROUTE_NAME:
                val_str(v, c->route_name);
                break;
        case OP_FILTER_STATE:
                for (unsigned i = 0; i < c->n_filter_state; i++) {
                        const struct wp_al_kv *kv = &c->filter_state[i];
                        if (kv->key && strlen(kv->key) == p->a_len &&
                            memcmp(kv->key, pool + p->a_off, p->a_len) == 0) {
                                val_str(v, kv->value);
                                break;
                        }
                }
                break;
        default:
                break;
        }
        /* :N truncates the raw value (numbers stay whole in typed JSON, as in Envoy). */
        if (v->kind != V_MISSING && p->max_len != NO_MAX_LEN && v->n > p->max_len &&
            !(v->kind == V_NUM && typed))
                v->n = p->max_len;
}

/* ---- output ---------------------------------------------------------------------------- */

struct out {
        char *buf;
        size_t avail; /* cap - 1 */
        size_t len;   /* as if unbounded */
        size_t limit; /* per command value, in output bytes */
        size_t dyn_total;
        uint32_t *dyn; /* pass 1: output length of every command value */
        unsigned ndyn;
        bool cut; /* pass 2 shortened a value */
};

static void put(struct out *o, const char *s, size_t n)
{
        if (o->len < o->avail) {
                size_t k = o->avail - o->len < n ? o->avail - o->len : n;
                memcpy(o->buf + o->len, s, k);
        }
        o->len += n;
}

/* Writes a command value escaped for the output (JSON string content, or text where control
 * bytes become \xHH so a peer cannot split a log line), at most o->limit bytes, never cutting a
 * UTF-8 sequence or an escape. */
static void put_value(struct out *o, bool json, unsigned esc, const char *s, size_t n)
{
        static const char hex[] = "0123456789abcdef";
        const unsigned char *u = (const unsigned char *)s;
        size_t produced = 0, i = 0;

        while (i < n) {
                /* Fast path: a run of bytes that need no escaping. */
                size_t run = 0;
                while (i + run < n && u[i + run] >= 0x20 && u[i + run] < 0x7f &&
                       (!json || (u[i + run] != '"' && u[i + run] != '\\')) &&
                       (!(esc & E_UNDERSCORE) || u[i + run] != ' '))
                        run++;
                if (run) {
                        if (produced + run > o->limit) {
                                run = o->limit - produced;
                                o->cut = true;
                                put(o, s + i, run);
                                produced += run;
                                break;
                        }
                        put(o, s + i, run);
                        produced += run;
                        i += run;
                        continue;
                }
                char tmp[8];
                const char *enc;
                size_t el, adv;
                if (json) {
                        if ((esc & E_UNDERSCORE) && (u[i] == ' ' || u[i] == '\t')) {
                                tmp[0] = '_';
                                enc = tmp;
                                el = adv = 1;
                        } else
                                adv = json_unit(u + i, n - i, tmp, &enc, &el);
                } else if ((esc & E_UNDERSCORE) && (u[i] == ' ' || u[i] == '\t')) {
                        tmp[0] = '_';
                        enc = tmp;
                        el = adv = 1;
                } else if (u[i] == '\t' || u[i] >= 0x80) {
                        size_t l = u[i] >= 0x80 ? utf8_len(u + i, n - i) : 1;
                        enc = s + i;
                        el = adv = l ? l : 1;
                } else {
                        tmp[0] = '\\';
                        tmp[1] = 'x';
                        tmp[2] = hex[u[i] >> 4];
                        tmp[3] = hex[u[i] & 15];
                        enc = tmp;
                        el = 4;
                        adv = 1;
                }
                if (produced + el > o->limit) {
                        o->cut = true;
                        break;
                }
                put(o, enc, el);
                produced += el;
                i += adv;
        }
        if (o->dyn && o->ndyn < WP_AL_MAX_COMMANDS)
                o->dyn[o->ndyn++] = (uint32_t)(produced > UINT32_MAX ? UINT32_MAX : produced);
        o->dyn_total += produced;
}

static bool group_empty(const struct wp_al_format *f, const struct jnode *nd,
                        const struct wp_al_ctx *c, char *scratch)
{
        for (uint32_t i = 0; i < nd->n; i++) {
                const struct piece *p = &f->pieces[nd->first + i];
                struct val v;
                if (p->op == OP_LITERAL)
                        return false;
                get_value(f, p, c, nd->n == 1 && !(f->flags & WP_AL_JSON_UNTYPED), &v, scratch);
                if (v.kind != V_MISSING && v.n > 0)
                        return false;
        }
        return true;
}

/* Pieces of a text format, or the inside of a JSON string value (json). */
static void render_pieces(const struct wp_al_format *f, const struct piece *p, uint32_t n,
                          const struct wp_al_ctx *c, struct out *o, bool json, char *scratch)
{
        bool omit = f->flags & WP_AL_OMIT_EMPTY;

        for (uint32_t i = 0; i < n; i++, p++) {
                struct val v;
                if (p->op == OP_LITERAL) {
                        put(o, f->pool + p->a_off, p->a_len);
                        continue;
                }
                get_value(f, p, c, false, &v, scratch);
                if (v.kind == V_MISSING) {
                        if (!omit)
                                put(o, "-", 1);
                } else if (v.kind == V_NUM)
                        put(o, v.s, v.n);
                else
                        put_value(o, json, v.esc, v.s, v.n);
        }
}

static void render_group_json(const struct wp_al_format *f, const struct jnode *nd,
                              const struct wp_al_ctx *c, struct out *o, char *scratch)
{
        const struct piece *p = &f->pieces[nd->first];

        if (nd->n == 1 && p->op != OP_LITERAL && !(f->flags & WP_AL_JSON_UNTYPED)) {
                /* One command alone: a typed value. */
                struct val v;
                get_value(f, p, c, true, &v, scratch);
                if (v.kind == V_MISSING)
                        put(o, "null", 4);
                else if (v.kind == V_NUM)
                        put(o, v.s, v.n);
                else {
                        put(o, "\"", 1);
                        put_value(o, true, v.esc, v.s, v.n);
                        put(o, "\"", 1);
                }
                return;
        }
        put(o, "\"", 1);
        render_pieces(f, p, nd->n, c, o, true, scratch);
        put(o, "\"", 1);
}

static void render_pass(const struct wp_al_format *f, const struct wp_al_ctx *c, struct out *o,
                        char *scratch)
{
        if (!f->json) {
                render_pieces(f, f->pieces, f->n_pieces, c, o, false, scratch);
                return;
        }
        bool first[WP_AL_MAX_JSON_DEPTH + 2];
        int depth = -1;
        bool omit = f->flags & WP_AL_OMIT_EMPTY;

        for (unsigned i = 0; i < f->n_nodes; i++) {
                const struct jnode *nd = &f->nodes[i];
                if (nd->kind == J_END) {
                        put(o, "}", 1);
                        depth--;
                        continue;
                }
                if (nd->kind == J_GROUP && omit && group_empty(f, nd, c, scratch))
                        continue;
                if (depth >= 0) {
                        if (!first[depth])
                                put(o, ",", 1);
                        first[depth] = false;
                        put(o, f->pool + nd->key_off, nd->key_len);
                }
                switch (nd->kind) {
                case J_BEGIN:
                        put(o, "{", 1);
                        first[++depth] = true;
                        break;
                case J_RAW:
                        put(o, f->pool + nd->raw_off, nd->raw_len);
                        break;
                default:
                        render_group_json(f, nd, c, o, scratch);
                        break;
                }
        }
        put(o, "\n", 1);
}

ssize_t wp_al_format_render(const struct wp_al_format *f, const struct wp_al_ctx *c, char *buf,
                            size_t cap, bool *ret_truncated)
{
        uint32_t dyn[WP_AL_MAX_COMMANDS];
        char scratch[SCRATCH];
        struct out o = {.buf = buf, .avail = cap ? cap - 1 : 0, .limit = SIZE_MAX, .dyn = dyn};

        if (cap < 2)
                return -ENOBUFS;
        render_pass(f, c, &o, scratch);
        if (o.len <= o.avail) {
                buf[o.len] = '\0';
                if (ret_truncated)
                        *ret_truncated = false;
                return (ssize_t)o.len;
        }

        /* Overflow: find the largest common cap L on command values that fits. */
        size_t fixed = o.len - o.dyn_total, maxd = 0;
        for (unsigned i = 0; i < o.ndyn; i++)
                if (dyn[i] > maxd)
                        maxd = dyn[i];
        size_t lo = 0, hi = maxd;
        while (lo < hi) {
                size_t mid = lo + (hi - lo + 1) / 2, sum = fixed;
                for (unsigned i = 0; i < o.ndyn; i++)
                        sum += dyn[i] < mid ? dyn[i] : mid;
                if (sum <= o.avail)
                        lo = mid;
                else
                        hi = mid - 1;
        }
        if (ret_truncated)
                *ret_truncated = true;
        struct out o2 = {.buf = buf, .avail = o.avail, .limit = lo};
        render_pass(f, c, &o2, scratch);
        if (o2.len <= o2.avail) {
                buf[o2.len] = '\0';
                return (ssize_t)o2.len;
        }
        /* Literals alone do not fit. */
        if (f->json)
                return -ENOBUFS;
        size_t end = o2.avail;
        const struct piece *lp = f->n_pieces ? &f->pieces[f->n_pieces - 1] : NULL;
        bool nl = lp && lp->op == OP_LITERAL && f->pool[lp->a_off + lp->a_len - 1] == '\n';
        if (nl)
                end--;
        /* Do not end inside a UTF-8 sequence: look at the last lead byte before the cut. */
        if (end > 0) {
                size_t p = end - 1;
                while (p > 0 && ((unsigned char)buf[p] & 0xc0) == 0x80)
                        p--;
                unsigned char lead = (unsigned char)buf[p];
                size_t ul = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
                if (p + ul > end)
                        end = p;
        }
        if (nl)
                buf[end++] = '\n';
        buf[end] = '\0';
        return (ssize_t)end;
}

/* ---- filters and loggers --------------------------------------------------------------- */

enum { F_STATUS, F_DURATION, F_NOT_HC, F_TRACEABLE, F_AND, F_OR, F_FLAGS };

struct fnode {
        uint8_t kind, op;
        uint32_t value;
        uint32_t end; /* index after this subtree */
        uint64_t flags;
};

struct wp_al_logger {
        enum wp_al_sink sink;
        char *path;
        struct wp_al_format *fmt;
        struct fnode *filter;
        unsigned n_filter;
};

static int count_filter(const Envoy__Config__Accesslog__V3__AccessLogFilter *fl, unsigned depth,
                        unsigned *n, const char **reterr_desc)
{
        if (!fl)
                return fail(-EINVAL, reterr_desc, "empty access log filter");
        if (depth > 16 || ++*n > WP_AL_MAX_FILTER_NODES)
                return fail(-EINVAL, reterr_desc, "access log filter too large or too deep");
        const Envoy__Config__Accesslog__V3__AccessLogFilter *const *kids = NULL;
        size_t nk = 0;
        switch (fl->filter_specifier_case) {
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_AND_FILTER:
                if (fl->and_filter) {
                        kids = (void *)fl->and_filter->filters;
                        nk = fl->and_filter->n_filters;
                }
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_OR_FILTER:
                if (fl->or_filter) {
                        kids = (void *)fl->or_filter->filters;
                        nk = fl->or_filter->n_filters;
                }
                break;
        default:
                return 0;
        }
        if (nk < 2)
                return fail(-EINVAL, reterr_desc, "and_filter/or_filter needs at least 2 filters");
        for (size_t i = 0; i < nk; i++) {
                int r = count_filter(kids[i], depth + 1, n, reterr_desc);
                if (r < 0)
                        return r;
        }
        return 0;
}

static int build_filter(const Envoy__Config__Accesslog__V3__AccessLogFilter *fl, struct fnode *v,
                        unsigned *i, const char **reterr_desc)
{
        struct fnode *nd = &v[(*i)++];
        const Envoy__Config__Accesslog__V3__ComparisonFilter *cmp = NULL;
        const Envoy__Config__Accesslog__V3__AccessLogFilter *const *kids = NULL;
        size_t nk = 0;
        int r;

        switch (fl->filter_specifier_case) {
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_STATUS_CODE_FILTER:
                nd->kind = F_STATUS;
                cmp = fl->status_code_filter ? fl->status_code_filter->comparison : NULL;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_DURATION_FILTER:
                nd->kind = F_DURATION;
                cmp = fl->duration_filter ? fl->duration_filter->comparison : NULL;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_NOT_HEALTH_CHECK_FILTER:
                nd->kind = F_NOT_HC;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_TRACEABLE_FILTER:
                nd->kind = F_TRACEABLE;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_AND_FILTER:
                nd->kind = F_AND;
                kids = (void *)fl->and_filter->filters; /* non-NULL: count_filter checked */
                nk = fl->and_filter->n_filters;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_OR_FILTER:
                nd->kind = F_OR;
                kids = (void *)fl->or_filter->filters;
                nk = fl->or_filter->n_filters;
                break;
        case ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG_FILTER__FILTER_SPECIFIER_RESPONSE_FLAG_FILTER:
                nd->kind = F_FLAGS;
                for (size_t k = 0;
                     fl->response_flag_filter && k < fl->response_flag_filter->n_flags; k++) {
                        const char *s = fl->response_flag_filter->flags[k]
                                                ? fl->response_flag_filter->flags[k]
                                                : "";
                        int fi = wp_al_flag_parse(s, strlen(s));
                        if (fi < 0)
                                return fail(-EINVAL, reterr_desc,
                                            "response_flag_filter: unknown flag \"%.16s\"", s);
                        nd->flags |= UINT64_C(1) << fi;
                }
                break;
        default:
                return fail(-EOPNOTSUPP, reterr_desc,
                            "unsupported access log filter (oneof case %d)",
                            (int)fl->filter_specifier_case);
        }
        if (nd->kind == F_STATUS || nd->kind == F_DURATION) {
                if (!cmp || !cmp->value)
                        return fail(-EINVAL, reterr_desc, "comparison filter without a value");
                if ((unsigned)cmp->op > ENVOY__CONFIG__ACCESSLOG__V3__COMPARISON_FILTER__OP__LE)
                        return fail(-EINVAL, reterr_desc, "comparison filter: bad op");
                nd->op = (uint8_t)cmp->op;
                nd->value = cmp->value->default_value;
        }
        for (size_t k = 0; k < nk; k++)
                if ((r = build_filter(kids[k], v, i, reterr_desc)) < 0)
                        return r;
        nd->end = *i;
        return 0;
}

static bool cmp_u64(uint8_t op, uint64_t x, uint64_t want)
{
        switch (op) {
        case ENVOY__CONFIG__ACCESSLOG__V3__COMPARISON_FILTER__OP__GE:
                return x >= want;
        case ENVOY__CONFIG__ACCESSLOG__V3__COMPARISON_FILTER__OP__LE:
                return x <= want;
        default:
                return x == want;
        }
}

static bool eval_filter(const struct fnode *v, unsigned i, const struct wp_al_ctx *c)
{
        const struct fnode *nd = &v[i];

        switch (nd->kind) {
        case F_STATUS:
                return cmp_u64(nd->op, c->response_code, nd->value);
        case F_DURATION: {
                uint64_t ms = c->end_ns > c->start_ns && c->start_ns
                                      ? (c->end_ns - c->start_ns) / WP_NSEC_PER_MSEC
                                      : 0;
                return cmp_u64(nd->op, ms, nd->value);
        }
        case F_NOT_HC:
                return !c->health_check;
        case F_TRACEABLE:
                return c->traceable;
        case F_FLAGS:
                return nd->flags ? (c->response_flags & nd->flags) != 0 : c->response_flags != 0;
        case F_AND:
        case F_OR:
                for (unsigned k = i + 1; k < nd->end; k = v[k].end) {
                        bool r = eval_filter(v, k, c);
                        if (nd->kind == F_AND && !r)
                                return false;
                        if (nd->kind == F_OR && r)
                                return true;
                }
                return nd->kind == F_AND;
        default:
                return true;
        }
}

struct wp_al_logger *wp_al_logger_free(struct wp_al_logger *l)
{
        if (!l)
                return NULL;
        wp_free(l->path);
        wp_al_format_free(l->fmt);
        wp_free(l->filter);
        wp_free(l);
        return NULL;
}

static const char *type_name(const char *url)
{
        const char *s = strrchr(url, '/');
        return s ? s + 1 : url;
}

static int default_format(struct wp_al_format **ret, const char **reterr_desc)
{
        return wp_al_format_compile_text(wp_al_envoy_default_format,
                                         strlen(wp_al_envoy_default_format), 0, ret, reterr_desc);
}

static int compile_sink_format(struct wp_al_logger *l, const ProtobufCMessage *m,
                               const char **reterr_desc)
{
        if (m->descriptor ==
            &envoy__extensions__access_loggers__file__v3__file_access_log__descriptor) {
                const Envoy__Extensions__AccessLoggers__File__V3__FileAccessLog *fa = (void *)m;
                if (!fa->path || !*fa->path)
                        return fail(-EINVAL, reterr_desc, "FileAccessLog.path is empty");
                if (strcmp(fa->path, "/dev/stdout") == 0)
                        l->sink = WP_AL_SINK_STDOUT;
                else if (strcmp(fa->path, "/dev/stderr") == 0)
                        l->sink = WP_AL_SINK_STDERR;
                else {
                        l->sink = WP_AL_SINK_FILE;
                        if (!(l->path = wp_strdup(fa->path)))
                                return fail(-ENOMEM, reterr_desc, "out of memory");
                }
                switch (fa->access_log_format_case) {
                case ENVOY__EXTENSIONS__ACCESS_LOGGERS__FILE__V3__FILE_ACCESS_LOG__ACCESS_LOG_FORMAT_FORMAT:
                        if (!fa->format)
                                return default_format(&l->fmt, reterr_desc);
                        return wp_al_format_compile_text(fa->format, strlen(fa->format), 0, &l->fmt,
                                                         reterr_desc);
                case ENVOY__EXTENSIONS__ACCESS_LOGGERS__FILE__V3__FILE_ACCESS_LOG__ACCESS_LOG_FORMAT_JSON_FORMAT:
                        return wp_al_format_compile_json(fa->json_format, WP_AL_JSON_UNTYPED,
                                                         &l->fmt, reterr_desc);
                case ENVOY__EXTENSIONS__ACCESS_LOGGERS__FILE__V3__FILE_ACCESS_LOG__ACCESS_LOG_FORMAT_TYPED_JSON_FORMAT:
                        return wp_al_format_compile_json(fa->typed_json_format, 0, &l->fmt,
                                                         reterr_desc);
                case ENVOY__EXTENSIONS__ACCESS_LOGGERS__FILE__V3__FILE_ACCESS_LOG__ACCESS_LOG_FORMAT_LOG_FORMAT:
                        if (fa->log_format)
                                return wp_al_format_compile_sfs(fa->log_format, &l->fmt,
                                                                reterr_desc);
                        return default_format(&l->fmt, reterr_desc);
                default:
                        return default_format(&l->fmt, reterr_desc);
                }
        }
        /* StdoutAccessLog and StderrAccessLog have the same layout. */
        const Envoy__Extensions__AccessLoggers__Stream__V3__StdoutAccessLog *so = (void *)m;
        l->sink =
                m->descriptor ==
                                &envoy__extensions__access_loggers__stream__v3__stdout_access_log__descriptor
                        ? WP_AL_SINK_STDOUT
                        : WP_AL_SINK_STDERR;
        if (so->access_log_format_case ==
                    ENVOY__EXTENSIONS__ACCESS_LOGGERS__STREAM__V3__STDOUT_ACCESS_LOG__ACCESS_LOG_FORMAT_LOG_FORMAT &&
            so->log_format)
                return wp_al_format_compile_sfs(so->log_format, &l->fmt, reterr_desc);
        return default_format(&l->fmt, reterr_desc);
}

int wp_al_logger_new(const Envoy__Config__Accesslog__V3__AccessLog *al, struct wp_al_logger **ret,
                     const char **reterr_desc)
{
        const ProtobufCMessageDescriptor *desc;
        ProtobufCMessage *m = NULL;
        struct wp_al_logger *l;
        const char *tn, *err = NULL;
        int r;

        if (al->config_type_case !=
                    ENVOY__CONFIG__ACCESSLOG__V3__ACCESS_LOG__CONFIG_TYPE_TYPED_CONFIG ||
            !al->typed_config || !al->typed_config->type_url)
                return fail(-EINVAL, reterr_desc, "access_log \"%.64s\" has no typed_config",
                            al->name ? al->name : "");
        tn = type_name(al->typed_config->type_url);
        if (strcmp(tn, "envoy.extensions.access_loggers.file.v3.FileAccessLog") == 0)
                desc = &envoy__extensions__access_loggers__file__v3__file_access_log__descriptor;
        else if (strcmp(tn, "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog") == 0)
                desc = &envoy__extensions__access_loggers__stream__v3__stdout_access_log__descriptor;
        else if (strcmp(tn, "envoy.extensions.access_loggers.stream.v3.StderrAccessLog") == 0)
                desc = &envoy__extensions__access_loggers__stream__v3__stderr_access_log__descriptor;
        else
                return fail(-EOPNOTSUPP, reterr_desc, "unsupported access logger %.128s", tn);

        l = wp_calloc(1, sizeof(*l));
        if (!l)
                return fail(-ENOMEM, reterr_desc, "out of memory");
        if ((r = xds_any_unpack(al->typed_config, desc, &m, &err)) < 0) {
                r = fail(r, reterr_desc, "access_log %.96s: %.128s", tn, err ? err : "bad config");
                goto err_free_logger;
        }
        if ((r = compile_sink_format(l, m, reterr_desc)) < 0)
                goto err_free_msg;
        if (al->filter) {
                unsigned n = 0, i = 0;
                if ((r = count_filter(al->filter, 0, &n, reterr_desc)) < 0)
                        goto err_free_msg;
                l->filter = wp_calloc(n, sizeof(*l->filter));
                if (!l->filter) {
                        r = fail(-ENOMEM, reterr_desc, "out of memory");
                        goto err_free_msg;
                }
                l->n_filter = n;
                if ((r = build_filter(al->filter, l->filter, &i, reterr_desc)) < 0)
                        goto err_free_msg;
        }
        xds_pbjson_message_free(m);
        *ret = l;
        return 0;

err_free_msg:
        xds_pbjson_message_free(m);
err_free_logger:
        wp_al_logger_free(l);
        return r;
}

enum wp_al_sink wp_al_logger_sink(const struct wp_al_logger *l, const char **ret_path)
{
        if (ret_path)
                *ret_path = l->path;
        return l->sink;
}

const struct wp_al_format *wp_al_logger_format(const struct wp_al_logger *l)
{
        return l->fmt;
}

bool wp_al_logger_match(const struct wp_al_logger *l, const struct wp_al_ctx *c)
{
        return !l->n_filter || eval_filter(l->filter, 0, c);
}

ssize_t wp_al_logger_render(const struct wp_al_logger *l, const struct wp_al_ctx *c, char *buf,
                            size_t cap, bool *ret_truncated)
{
        if (!wp_al_logger_match(l, c)) {
                if (ret_truncated)
                        *ret_truncated = false;
                if (cap)
                        buf[0] = '\0';
                return 0;
        }
        return wp_al_format_render(l->fmt, c, buf, cap, ret_truncated);
}

/* ---- writer: per-thread queues drained by one writer thread ---------------------------- */

/*
 * A queue is a single-producer single-consumer byte ring. Records are [u32 len][i32 fd][line],
 * 8-byte aligned; a record never wraps (a pad record, fd -1, fills the end of the ring when
 * the next one does not fit there). head (producer) and tail (consumer) are free-running byte
 * counts: the producer publishes a record with a release store of head, the consumer frees
 * space with a release store of tail. The producer never waits: when the ring has no room the
 * line is dropped and counted.
 *
 * The writer thread sleeps on an eventfd when every queue is empty. Before sleeping it sets
 * `sleeping` and looks at the queues again; a producer that published a record and then sees
 * `sleeping` set clears it and writes the eventfd (both sides seq_cst: one of them sees the
 * other, so no line waits for the next wake-up).
 *
 * Lines are written with blocking writes of whole lines, at most PIPE_BUF bytes per write
 * unless one line is longer (so a pipe reader never sees a line torn or interleaved with
 * another writer's data); the consumer side (writer thread, flush) runs under `drain_lock`, so
 * the process has one writer of these lines at a time.
 */

#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>

#define REC_HDR       8u
#define AL_QUEUES_MAX 1024

struct wp_al_queue {
        struct wp_al_writer *w;
        char *ring;
        uint64_t size; /* power of two */
        _Alignas(64) uint64_t head;
        uint64_t dropped; /* written by the producer (relaxed), read by stats */
        uint64_t queued;
        _Alignas(64) uint64_t tail;
};

struct wp_al_writer {
        pthread_mutex_t reg_lock; /* queues[] registration */
        pthread_mutex_t drain_lock;
        struct wp_al_queue *queues[AL_QUEUES_MAX];
        unsigned n_queues; /* release store after queues[n] is set */
        uint64_t queue_bytes;
        int efd;
        int sleeping;
        bool stop;
        bool started;
        pthread_t thread;
        uint64_t written, write_errors; /* consumer side, relaxed */
        char batch[PIPE_BUF];
};

#define AL_LOAD(x)     __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define AL_STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)
#define AL_ADD(x, d)                                                                               \
        __atomic_store_n(&(x), __atomic_load_n(&(x), __ATOMIC_RELAXED) + (d), __ATOMIC_RELAXED)

static uint64_t rec_size(size_t len)
{
        return (REC_HDR + len + 7) & ~(uint64_t)7;
}

static void writer_wake(struct wp_al_writer *w)
{
        uint64_t one = 1;

        if (__atomic_load_n(&w->sleeping, __ATOMIC_SEQ_CST) &&
            __atomic_exchange_n(&w->sleeping, 0, __ATOMIC_SEQ_CST))
                (void)!write(w->efd, &one, sizeof(one));
}

int wp_al_queue_push(struct wp_al_queue *q, int fd, const char *line, size_t len)
{
        uint64_t head = q->head, tail = AL_LOAD(q->tail), need = rec_size(len);
        uint64_t off = head & (q->size - 1), to_end = q->size - off;
        uint32_t hdr[2];

        if (len == 0)
                return 0;
        if (need > q->size / 4) {
                AL_ADD(q->dropped, 1);
                return -EMSGSIZE;
        }
        if (to_end < need) { /* pad to the end of the ring, start at 0 */
                if (q->size - (head - tail) < to_end + need) {
                        AL_ADD(q->dropped, 1);
                        return -ENOBUFS;
                }
                hdr[0] = (uint32_t)(to_end - REC_HDR);
                hdr[1] = (uint32_t)-1;
                memcpy(q->ring + off, hdr, REC_HDR);
                head += to_end;
                off = 0;
        } else if (q->size - (head - tail) < need) {
                AL_ADD(q->dropped, 1);
                return -ENOBUFS;
        }
        hdr[0] = (uint32_t)len;
        hdr[1] = (uint32_t)fd;
        memcpy(q->ring + off, hdr, REC_HDR);
        memcpy(q->ring + off + REC_HDR, line, len);
        AL_ADD(q->queued, 1);
        __atomic_store_n(&q->head, head + need, __ATOMIC_SEQ_CST);
        writer_wake(q->w);
        return 0;
}

/* Writes buf[0, len) whole to fd (blocking; waits for POLLOUT on a non-blocking fd). */
static int write_all(int fd, const char *buf, size_t len)
{
        while (len) {
                ssize_t n = write(fd, buf, len);

                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        if (errno == EAGAIN) {
                                struct pollfd p = {.fd = fd, .events = POLLOUT};

                                poll(&p, 1, 1000);
                                continue;
                        }
                        return -errno;
                }
                buf += n;
                len -= (size_t)n;
        }
        return 0;
}

struct batch {
        int fd;
        size_t len, lines;
};

static void batch_flush(struct wp_al_writer *w, struct batch *b)
{
        if (b->len) {
                if (write_all(b->fd, w->batch, b->len) < 0)
                        AL_ADD(w->write_errors, b->lines);
                else
                        AL_ADD(w->written, b->lines);
        }
        b->len = b->lines = 0;
}

/* Writes every record of q published so far. Returns how many. Under drain_lock. */
static size_t drain_queue(struct wp_al_writer *w, struct wp_al_queue *q)
{
        uint64_t tail = q->tail, head = AL_LOAD(q->head);
        struct batch b = {.fd = -1};
        size_t n = 0;

        while (tail != head) {
                const char *rec = q->ring + (tail & (q->size - 1));
                uint32_t hdr[2];

                memcpy(hdr, rec, REC_HDR);
                if ((int32_t)hdr[1] >= 0) {
                        if (b.len && (b.fd != (int)hdr[1] || b.len + hdr[0] > sizeof(w->batch)))
                                batch_flush(w, &b);
                        if (hdr[0] > sizeof(w->batch)) { /* a long line: on its own */
                                if (write_all((int)hdr[1], rec + REC_HDR, hdr[0]) < 0)
                                        AL_ADD(w->write_errors, 1);
                                else
                                        AL_ADD(w->written, 1);
                        } else {
                                memcpy(w->batch + b.len, rec + REC_HDR, hdr[0]);
                                b.fd = (int)hdr[1];
                                b.len += hdr[0];
                                b.lines++;
                        }
                        n++;
                }
                tail += rec_size(hdr[0]);
                /* the line is copied or written: its space is free */
                AL_STORE(q->tail, tail);
        }
        batch_flush(w, &b);
        return n;
}

static size_t drain_all(struct wp_al_writer *w)
{
        unsigned i, nq = AL_LOAD(w->n_queues);
        size_t n = 0;

        for (i = 0; i < nq; i++)
                n += drain_queue(w, w->queues[i]);
        return n;
}

static bool any_queued(struct wp_al_writer *w)
{
        unsigned i, nq = AL_LOAD(w->n_queues);

        for (i = 0; i < nq; i++)
                if (__atomic_load_n(&w->queues[i]->head, __ATOMIC_SEQ_CST) !=
                    AL_LOAD(w->queues[i]->tail))
                        return true;
        return false;
}

static void *writer_main(void *arg)
{
        struct wp_al_writer *w = arg;

        for (;;) {
                struct pollfd p = {.fd = w->efd, .events = POLLIN};
                uint64_t v;
                size_t n;

                pthread_mutex_lock(&w->drain_lock);
                n = drain_all(w);
                pthread_mutex_unlock(&w->drain_lock);
                if (n)
                        continue;
                if (AL_LOAD(w->stop))
                        break;
                __atomic_store_n(&w->sleeping, 1, __ATOMIC_SEQ_CST);
                if (any_queued(w)) {
                        __atomic_store_n(&w->sleeping, 0, __ATOMIC_SEQ_CST);
                        continue;
                }
                poll(&p, 1, 1000);
                (void)!read(w->efd, &v, sizeof(v));
                __atomic_store_n(&w->sleeping, 0, __ATOMIC_SEQ_CST);
        }
        return NULL;
}

int wp_al_writer_new(size_t queue_bytes, struct wp_al_writer **ret)
{
        struct wp_al_writer *w;
        uint64_t size = 4096;
        int r;

        if (!ret || queue_bytes > (1u << 30))
                return -EINVAL;
        while (size < queue_bytes)
                size *= 2;
        w = wp_calloc(1, sizeof(*w));
        if (!w)
                return -ENOMEM;
        w->queue_bytes = size;
        pthread_mutex_init(&w->reg_lock, NULL);
        pthread_mutex_init(&w->drain_lock, NULL);
        w->efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->efd < 0) {
                r = -errno;
                wp_free(w);
                return r;
        }
        r = -pthread_create(&w->thread, NULL, writer_main, w);
        if (r < 0) {
                close(w->efd);
                wp_free(w);
                return r;
        }
        w->started = true;
        *ret = w;
        return 0;
}

int wp_al_queue_new(struct wp_al_writer *w, struct wp_al_queue **ret)
{
        struct wp_al_queue *q;
        int r = 0;

        if (!w || !ret)
                return -EINVAL;
        q = wp_calloc(1, sizeof(*q));
        if (!q)
                return -ENOMEM;
        q->ring = wp_malloc(w->queue_bytes);
        if (!q->ring) {
                wp_free(q);
                return -ENOMEM;
        }
        q->w = w;
        q->size = w->queue_bytes;
        pthread_mutex_lock(&w->reg_lock);
        if (w->n_queues == AL_QUEUES_MAX) {
                r = -ENOSPC;
        } else {
                w->queues[w->n_queues] = q;
                AL_STORE(w->n_queues, w->n_queues + 1);
        }
        pthread_mutex_unlock(&w->reg_lock);
        if (r < 0) {
                wp_free(q->ring);
                wp_free(q);
                return r;
        }
        *ret = q;
        return 0;
}

int wp_al_writer_flush(struct wp_al_writer *w, int timeout_ms)
{
        struct timespec ts;

        if (!w)
                return -EINVAL;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_sec += timeout_ms / 1000;
        ts.tv_nsec += (long)(timeout_ms % 1000) * 1000000;
        if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
        }
        if (pthread_mutex_timedlock(&w->drain_lock, &ts) != 0)
                return -ETIMEDOUT; /* the writer thread is stuck in a write */
        drain_all(w);
        pthread_mutex_unlock(&w->drain_lock);
        return 0;
}

void wp_al_writer_get_stats(struct wp_al_writer *w, struct wp_al_writer_stats *ret)
{
        unsigned i, nq;

        memset(ret, 0, sizeof(*ret));
        if (!w)
                return;
        nq = AL_LOAD(w->n_queues);
        for (i = 0; i < nq; i++) {
                ret->queued += __atomic_load_n(&w->queues[i]->queued, __ATOMIC_RELAXED);
                ret->dropped += __atomic_load_n(&w->queues[i]->dropped, __ATOMIC_RELAXED);
        }
        ret->written = __atomic_load_n(&w->written, __ATOMIC_RELAXED);
        ret->write_errors = __atomic_load_n(&w->write_errors, __ATOMIC_RELAXED);
}

struct wp_al_writer *wp_al_writer_free(struct wp_al_writer *w)
{
        uint64_t one = 1;
        unsigned i;

        if (!w)
                return NULL;
        AL_STORE(w->stop, true);
        (void)!write(w->efd, &one, sizeof(one));
        pthread_join(w->thread, NULL);
        drain_all(w);
        for (i = 0; i < w->n_queues; i++) {
                wp_free(w->queues[i]->ring);
                wp_free(w->queues[i]);
        }
        close(w->efd);
        pthread_mutex_destroy(&w->reg_lock);
        pthread_mutex_destroy(&w->drain_lock);
        wp_free(w);
        return NULL;
}

/* The process-wide writer: started on first use, flushed (bounded) at exit, never freed. */
static struct wp_al_writer *default_writer;
static pthread_once_t default_once = PTHREAD_ONCE_INIT;

static void default_flush_at_exit(void)
{
        wp_al_writer_flush(default_writer, 1000);
}

static void default_init(void)
{
        struct wp_al_writer *w = NULL;

        if (wp_al_writer_new(WP_AL_QUEUE_BYTES, &w) == 0) {
                __atomic_store_n(&default_writer, w, __ATOMIC_RELEASE);
                atexit(default_flush_at_exit);
        }
}

struct wp_al_writer *wp_al_writer_default(void)
{
        pthread_once(&default_once, default_init);
        return __atomic_load_n(&default_writer, __ATOMIC_ACQUIRE);
}

void wp_al_default_writer_stats(struct wp_al_writer_stats *ret)
{
        wp_al_writer_get_stats(__atomic_load_n(&default_writer, __ATOMIC_ACQUIRE), ret);
}
