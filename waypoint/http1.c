/*
 * HTTP/1.x codec: see http1.h for the API and the framing policy.
 *
 * How the parser works: a head (or trailer) section is scanned as it arrives for its line
 * structure only (CRLF discipline, line and section limits) and copied into the section
 * buffer; once the empty line that ends it has arrived, the whole section is parsed in one
 * pass, in place: names are lower-cased, NULs replace the delimiters, and the header list
 * points into the buffer. The buffer may move while it grows, but nothing points into it
 * before the section is complete. Bodies are never copied: BODY events point into the input.
 * The chunked framing is a byte-level state machine.
 */
#include "waypoint/http1.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include "waypoint/base/alloc.h"

#define MAX_LEADING_EMPTY_LINES 4 /* RFC 9112 2.2: ignore at least one CRLF before a request */
#define MAX_INTERIM_RESPONSES   8
#define MAX_CHUNK_SIZE_DIGITS   16
#define SECTION_INITIAL_CAP     1024

enum state {
        ST_IDLE, /* between messages: the next byte starts a new one */
        ST_HEAD,
        ST_BODY_CL,
        ST_BODY_EOF,
        ST_CHUNK_SIZE,
        ST_CHUNK_EXT,
        ST_CHUNK_SIZE_LF,
        ST_CHUNK_DATA,
        ST_CHUNK_DATA_CR,
        ST_CHUNK_DATA_LF,
        ST_TRAILERS,
        ST_DONE_PENDING, /* the message is complete: report DONE */
        ST_UPGRADE,      /* report UPGRADE on every call */
        ST_ERROR,
};

/* A head or trailer section being received: scanned for lines, copied, then parsed. */
struct section {
        uint8_t *buf;
        uint32_t len, cap, max;
        uint32_t start;       /* offset of the first line (leading empty lines skipped) */
        uint32_t line_len;    /* current line so far, CR excluded */
        uint32_t field_bytes; /* completed field lines, CRLF included */
        uint32_t nfields;
        uint32_t start_line_len;
        uint8_t nempty;      /* leading empty lines skipped */
        bool cr;             /* the previous byte was CR */
        bool has_start_line; /* head: the first line is the request/status line */
        bool start_line_done;
};

struct wp_h1_parser {
        enum wp_h1_mode mode;
        enum state state;
        enum wp_h1_error err;
        int fatal; /* what feed returns once in ST_ERROR */
        struct wp_h1_limits lim;

        struct section head, trl;
        struct wp_http_request req;
        struct wp_http_response resp;
        struct wp_headers trailers;
        struct wp_h1_info info;

        /* body */
        uint64_t max_body;
        uint64_t remaining; /* CL bytes or current chunk bytes left */
        uint64_t declared;  /* chunked: sum of chunk sizes so far */
        uint64_t chunk_size;
        uint32_t chunk_ext_len;
        uint8_t chunk_digits;
        bool chunk_ext_semicolon;
        bool upgrade_after_done; /* request: wait for a decision; response: tunnel */

        /* response side */
        bool req_head, req_connect;
        bool interim; /* the current response is 1xx (not 101) */
        uint8_t ninterim;
};

/* ---- character classes ---- */

/* clang-format off */
/* tchar (RFC 9110 5.6.2) */
static const uint8_t tchar[256] = {
        ['!'] = 1, ['#'] = 1, ['$'] = 1, ['%'] = 1, ['&'] = 1, ['\''] = 1, ['*'] = 1,
        ['+'] = 1, ['-'] = 1, ['.'] = 1, ['^'] = 1, ['_'] = 1, ['`'] = 1, ['|'] = 1,
        ['~'] = 1, ['0' ... '9'] = 1, ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1,
};

/* tchar -> lower-case tchar, anything else -> 0 */
static const uint8_t tlower[256] = {
        ['!'] = '!', ['#'] = '#', ['$'] = '$', ['%'] = '%', ['&'] = '&', ['\''] = '\'',
        ['*'] = '*', ['+'] = '+', ['-'] = '-', ['.'] = '.', ['^'] = '^', ['_'] = '_',
        ['`'] = '`', ['|'] = '|', ['~'] = '~',
        ['0'] = '0', ['1'] = '1', ['2'] = '2', ['3'] = '3', ['4'] = '4', ['5'] = '5',
        ['6'] = '6', ['7'] = '7', ['8'] = '8', ['9'] = '9',
#define L(c) [c] = c, [c - 32] = c
        L('a'), L('b'), L('c'), L('d'), L('e'), L('f'), L('g'), L('h'), L('i'), L('j'),
        L('k'), L('l'), L('m'), L('n'), L('o'), L('p'), L('q'), L('r'), L('s'), L('t'),
        L('u'), L('v'), L('w'), L('x'), L('y'), L('z'),
#undef L
};

/* field-value bytes: 1 = VCHAR/SP/HTAB, 2 = obs-text (>= 0x80), 0 = CTL/DEL */
static const uint8_t vchar[256] = {
        ['\t'] = 1, [' ' ... '~'] = 1, [0x80 ... 0xff] = 2,
};

/* reg-name characters in an authority (RFC 3986: unreserved / pct-encoded / sub-delims) */
static const uint8_t regname[256] = {
        ['0' ... '9'] = 1, ['A' ... 'Z'] = 1, ['a' ... 'z'] = 1, ['-'] = 1, ['.'] = 1,
        ['_'] = 1, ['~'] = 1, ['%'] = 1, ['!'] = 1, ['$'] = 1, ['&'] = 1, ['\''] = 1,
        ['('] = 1, [')'] = 1, ['*'] = 1, ['+'] = 1, [','] = 1, [';'] = 1, ['='] = 1,
};

/* clang-format on */

static inline uint8_t lower(uint8_t c)
{
        return (c >= 'A' && c <= 'Z') ? (uint8_t)(c | 0x20) : c;
}

static inline bool is_ows(uint8_t c)
{
        return c == ' ' || c == '\t';
}

static inline bool is_hex(uint8_t c)
{
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

static inline unsigned hexval(uint8_t c)
{
        if (c <= '9')
                return c - '0';
        return (unsigned)(lower(c) - 'a' + 10);
}

static bool eq_nocase(const char *a, size_t an, const char *b)
{
        size_t bn = strlen(b);

        if (an != bn)
                return false;
        for (size_t i = 0; i < an; i++)
                if (lower((uint8_t)a[i]) != lower((uint8_t)b[i]))
                        return false;
        return true;
}

static bool eq_nocase2(const char *a, size_t an, const char *b, size_t bn)
{
        if (an != bn)
                return false;
        for (size_t i = 0; i < an; i++)
                if (lower((uint8_t)a[i]) != lower((uint8_t)b[i]))
                        return false;
        return true;
}

/* Whether the 8 bytes at s are all in 0x20..0x7e (SWAR: no byte < 0x20, >= 0x80 or 0x7f). */
static inline bool plain8(const uint8_t *s)
{
        const uint64_t ones = 0x0101010101010101ull, high = 0x8080808080808080ull;
        uint64_t x, lt20, del;

        memcpy(&x, s, 8);
        lt20 = (x - ones * 0x20) & ~x & high; /* some byte < 0x20 (or >= 0x80 with x) */
        del = ((x ^ (ones * 0x7f)) - ones) & ~(x ^ (ones * 0x7f)) & high; /* some byte 0x7f */
        return ((x & high) | lt20 | del) == 0;
}

/* Length of the valid UTF-8 sequence at s (no overlongs, surrogates or > U+10FFFF), or 0. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
        uint8_t c = s[0], lo = 0x80, hi = 0xbf;
        size_t need;

        if (c < 0xc2 || c > 0xf4)
                return 0;
        if (c < 0xe0)
                need = 1;
        else if (c < 0xf0) {
                need = 2;
                if (c == 0xe0)
                        lo = 0xa0;
                else if (c == 0xed)
                        hi = 0x9f;
        } else {
                need = 3;
                if (c == 0xf0)
                        lo = 0x90;
                else if (c == 0xf4)
                        hi = 0x8f;
        }
        if (n < need + 1)
                return 0;
        if (s[1] < lo || s[1] > hi)
                return 0;
        for (size_t i = 2; i <= need; i++)
                if ((s[i] & 0xc0) != 0x80)
                        return 0;
        return need + 1;
}

/*
 * authority = host [ ":" port ] with host a reg-name (pct-encoding checked), an IPv4 address
 * (a reg-name too) or an IP-literal in brackets. No userinfo. port, when present, is 1-5
 * digits <= 65535; require_port makes it mandatory (CONNECT).
 */
static bool authority_valid(const char *s, size_t n, bool require_port)
{
        size_t i = 0;

        if (n == 0)
                return false;
        if (s[0] == '[') {
                for (i = 1; i < n && s[i] != ']'; i++)
                        if (!is_hex((uint8_t)s[i]) && s[i] != ':' && s[i] != '.')
                                return false;
                if (i == n || i < 3) /* "[]" or "[x]" */
                        return false;
                i++;
        } else {
                for (; i < n && s[i] != ':'; i++) {
                        if (!regname[(uint8_t)s[i]])
                                return false;
                        if (s[i] == '%' && (i + 2 >= n || !is_hex((uint8_t)s[i + 1]) ||
                                            !is_hex((uint8_t)s[i + 2])))
                                return false;
                }
                if (i == 0)
                        return false;
        }
        if (i == n)
                return !require_port;
        if (s[i] != ':')
                return false;
        i++;
        if (i == n || n - i > 5)
                return false;
        unsigned port = 0;
        for (; i < n; i++) {
                if (s[i] < '0' || s[i] > '9')
                        return false;
                port = port * 10 + (unsigned)(s[i] - '0');
        }
        return port <= 65535;
}

/* ---- errors ---- */

static const struct {
        unsigned status;
        const char *str;
} errors[_WP_H1_E_MAX] = {
        [WP_H1_OK] = {200, "ok"},
        [WP_H1_E_BARE_LF] = {400, "bare LF (line not terminated by CRLF)"},
        [WP_H1_E_BARE_CR] = {400, "bare CR (CR not followed by LF)"},
        [WP_H1_E_BAD_START_LINE] = {400, "malformed start line"},
        [WP_H1_E_START_LINE_TOO_LONG] = {414, "request line too long"},
        [WP_H1_E_BAD_METHOD] = {400, "invalid method"},
        [WP_H1_E_BAD_TARGET] = {400, "invalid request-target"},
        [WP_H1_E_ASTERISK_NOT_OPTIONS] = {400, "asterisk-form only allowed with OPTIONS"},
        [WP_H1_E_AUTHORITY_NOT_CONNECT] = {400, "authority-form only allowed with CONNECT"},
        [WP_H1_E_CONNECT_NOT_AUTHORITY] = {400, "CONNECT requires authority-form host:port"},
        [WP_H1_E_BAD_VERSION] = {400, "malformed HTTP version"},
        [WP_H1_E_VERSION_UNSUPPORTED] = {505, "HTTP version not supported"},
        [WP_H1_E_BAD_STATUS] = {400, "invalid status code"},
        [WP_H1_E_BAD_REASON] = {400, "invalid reason phrase"},
        [WP_H1_E_HEADERS_TOO_LARGE] = {431, "header section too large"},
        [WP_H1_E_TOO_MANY_HEADERS] = {431, "too many header fields"},
        [WP_H1_E_OBS_FOLD] = {400, "obsolete line folding"},
        [WP_H1_E_WS_BEFORE_COLON] = {400, "whitespace between field name and colon"},
        [WP_H1_E_BAD_HEADER_NAME] = {400, "invalid header field name"},
        [WP_H1_E_BAD_HEADER_VALUE] = {400, "invalid character in header field value"},
        [WP_H1_E_BAD_UTF8] = {400, "invalid UTF-8 in header field value"},
        [WP_H1_E_MISSING_HOST] = {400, "missing Host header"},
        [WP_H1_E_MULTIPLE_HOST] = {400, "multiple Host headers"},
        [WP_H1_E_BAD_HOST] = {400, "invalid Host header"},
        [WP_H1_E_BAD_CONTENT_LENGTH] = {400, "invalid Content-Length"},
        [WP_H1_E_MULTIPLE_CONTENT_LENGTH] = {400, "conflicting Content-Length headers"},
        [WP_H1_E_CL_AND_TE] = {400, "both Content-Length and Transfer-Encoding"},
        [WP_H1_E_TE_HTTP10] = {400, "Transfer-Encoding in an HTTP/1.0 message"},
        [WP_H1_E_TE_CHUNKED_NOT_LAST] = {400, "chunked is not the final transfer coding"},
        [WP_H1_E_TE_UNSUPPORTED] = {501, "transfer coding not implemented"},
        [WP_H1_E_CONNECT_BODY] = {400, "CONNECT request with a body"},
        [WP_H1_E_BAD_CHUNK_SIZE] = {400, "invalid chunk size"},
        [WP_H1_E_CHUNK_SIZE_OVERFLOW] = {400, "chunk size too large"},
        [WP_H1_E_BAD_CHUNK_EXT] = {400, "invalid chunk extension"},
        [WP_H1_E_CHUNK_EXT_TOO_LONG] = {400, "chunk extension too long"},
        [WP_H1_E_MISSING_CHUNK_CRLF] = {400, "chunk data not followed by CRLF"},
        [WP_H1_E_TRAILERS_TOO_LARGE] = {431, "trailer section too large"},
        [WP_H1_E_BODY_TOO_LARGE] = {413, "body too large"},
        [WP_H1_E_TRUNCATED] = {400, "connection closed inside a message"},
        [WP_H1_E_TOO_MANY_INTERIM] = {400, "too many interim responses"},
};

unsigned wp_h1_error_status(enum wp_h1_error e)
{
        if ((unsigned)e >= _WP_H1_E_MAX)
                return 400;
        return errors[e].status;
}

const char *wp_h1_error_str(enum wp_h1_error e)
{
        if ((unsigned)e >= _WP_H1_E_MAX)
                return "unknown error";
        return errors[e].str;
}

static int fail(struct wp_h1_parser *p, enum wp_h1_error e)
{
        p->err = e;
        p->state = ST_ERROR;
        p->fatal = -EBADMSG;
        return -EBADMSG;
}

static int fail_nomem(struct wp_h1_parser *p)
{
        p->state = ST_ERROR;
        p->fatal = -ENOMEM;
        return -ENOMEM;
}

/* ---- lifecycle ---- */

void wp_h1_limits_default(struct wp_h1_limits *lim)
{
        *lim = (struct wp_h1_limits){
                .max_start_line = 8192,
                .max_header_bytes = 60 * 1024,
                .max_headers = 100,
                .max_chunk_ext = 1024,
                .max_body = 0,
                .allow_obs_text = false,
        };
}

static void section_reset(struct section *s)
{
        s->len = s->start = s->line_len = s->field_bytes = s->nfields = s->start_line_len = 0;
        s->nempty = 0;
        s->cr = s->start_line_done = false;
}

int wp_h1_parser_new(enum wp_h1_mode mode, const struct wp_h1_limits *lim,
                     struct wp_h1_parser **ret)
{
        struct wp_h1_limits l;
        struct wp_h1_parser *p;

        if (mode != WP_H1_REQUEST && mode != WP_H1_RESPONSE)
                return -EINVAL;
        wp_h1_limits_default(&l);
        if (lim) {
                if (lim->max_start_line)
                        l.max_start_line = lim->max_start_line;
                if (lim->max_header_bytes)
                        l.max_header_bytes = lim->max_header_bytes;
                if (lim->max_headers)
                        l.max_headers = lim->max_headers;
                if (lim->max_chunk_ext)
                        l.max_chunk_ext = lim->max_chunk_ext;
                l.max_body = lim->max_body;
                l.allow_obs_text = lim->allow_obs_text;
        }
        if (l.max_start_line < 16 || l.max_start_line > (1u << 20) ||
            l.max_header_bytes > (16u << 20) || l.max_headers > 65536 ||
            l.max_chunk_ext > (1u << 20))
                return -EINVAL;

        p = wp_calloc(1, sizeof(*p));
        if (!p)
                return -ENOMEM;
        p->mode = mode;
        p->lim = l;
        p->state = ST_IDLE;
        p->head.has_start_line = true;
        p->head.max = l.max_start_line + 2 + 2 * MAX_LEADING_EMPTY_LINES + l.max_header_bytes + 2;
        p->trl.max = l.max_header_bytes + 2;
        wp_headers_init(&p->req.headers);
        wp_headers_init(&p->resp.headers);
        wp_headers_init(&p->trailers);
        p->req.content_length = p->resp.content_length = -1;
        p->info.reason = "";
        p->max_body = l.max_body;
        *ret = p;
        return 0;
}

struct wp_h1_parser *wp_h1_parser_free(struct wp_h1_parser *p)
{
        if (!p)
                return NULL;
        wp_free(p->head.buf);
        wp_free(p->trl.buf);
        wp_headers_done(&p->req.headers);
        wp_headers_done(&p->resp.headers);
        wp_headers_done(&p->trailers);
        wp_free(p);
        return NULL;
}

static void message_reset(struct wp_h1_parser *p)
{
        section_reset(&p->head);
        section_reset(&p->trl);
        p->req.headers.n = 0;
        p->req.headers.bytes = 0;
        p->req.method = p->req.scheme = p->req.authority = p->req.path = NULL;
        p->req.version = WP_HTTP_11;
        p->req.content_length = -1;
        p->req.chunked = p->req.upgrade = p->req.expect_continue = false;
        p->resp.headers.n = 0;
        p->resp.headers.bytes = 0;
        p->resp.status = 0;
        p->resp.version = WP_HTTP_11;
        p->resp.content_length = -1;
        p->resp.chunked = false;
        p->trailers.n = 0;
        p->trailers.bytes = 0;
        p->info = (struct wp_h1_info){.reason = ""};
        p->max_body = p->lim.max_body;
        p->remaining = p->declared = p->chunk_size = 0;
        p->chunk_ext_len = 0;
        p->chunk_digits = 0;
        p->chunk_ext_semicolon = false;
        p->upgrade_after_done = false;
        p->interim = false;
}

/* ---- section scanning ---- */

static int section_reserve(struct wp_h1_parser *p, struct section *s, size_t more)
{
        size_t need = (size_t)s->len + more, cap;
        uint8_t *b;

        if (need <= s->cap)
                return 0;
        /* the scanner's limits keep need <= s->max; this only guards the arithmetic */
        if (need > s->max)
                need = s->max;
        cap = s->cap ? s->cap : SECTION_INITIAL_CAP;
        while (cap < need)
                cap *= 2;
        if (cap > s->max)
                cap = s->max;
        if (cap < need)
                return fail(p, WP_H1_E_HEADERS_TOO_LARGE);
        b = wp_realloc(s->buf, cap);
        if (!b)
                return fail_nomem(p);
        s->buf = b;
        s->cap = (uint32_t)cap;
        return 0;
}

/* A line of the section ended (its CRLF consumed); pos is the offset just after the LF. */
static int section_line_end(struct wp_h1_parser *p, struct section *s, uint32_t pos, bool *done)
{
        bool trailer = s == &p->trl;
        uint32_t n = s->line_len;

        s->line_len = 0;
        if (s->has_start_line && !s->start_line_done) {
                if (n == 0) {
                        if (++s->nempty > MAX_LEADING_EMPTY_LINES)
                                return fail(p, WP_H1_E_BAD_START_LINE);
                        s->start = pos;
                        return 0;
                }
                s->start_line_done = true;
                s->start_line_len = n;
                return 0;
        }
        if (n == 0) {
                *done = true;
                return 0;
        }
        s->field_bytes += n + 2;
        if (++s->nfields > p->lim.max_headers)
                return fail(p, trailer ? WP_H1_E_TRAILERS_TOO_LARGE : WP_H1_E_TOO_MANY_HEADERS);
        return 0;
}

/* Checks the current partial line against the limits. */
static int section_line_check(struct wp_h1_parser *p, struct section *s)
{
        if (s->has_start_line && !s->start_line_done) {
                if (s->line_len > p->lim.max_start_line)
                        return fail(p, WP_H1_E_START_LINE_TOO_LONG);
                return 0;
        }
        /* the empty line that ends the section is not counted */
        if (s->line_len > 0 && (uint64_t)s->field_bytes + s->line_len + 2 > p->lim.max_header_bytes)
                return fail(p,
                            s == &p->trl ? WP_H1_E_TRAILERS_TOO_LARGE : WP_H1_E_HEADERS_TOO_LARGE);
        return 0;
}

/*
 * Scans in[0..len) for the section's lines, copying what belongs to the section. Sets *done
 * when the empty line ending it was consumed. Returns the bytes consumed or a negative errno.
 */
static ssize_t section_scan(struct wp_h1_parser *p, struct section *s, const uint8_t *in,
                            size_t len, bool *done)
{
        size_t i = 0;
        int r;

        *done = false;
        while (i < len && !*done) {
                if (s->cr) {
                        if (in[i] != '\n')
                                return fail(p, WP_H1_E_BARE_CR);
                        s->cr = false;
                        i++;
                        r = section_line_end(p, s, (uint32_t)(s->len + i), done);
                        if (r < 0)
                                return r;
                        continue;
                }
                const uint8_t *cr = memchr(in + i, '\r', len - i);
                size_t stop = cr ? (size_t)(cr - in) : len;

                if (memchr(in + i, '\n', stop - i))
                        return fail(p, WP_H1_E_BARE_LF);
                if (stop - i > UINT32_MAX - 2 - (size_t)s->line_len)
                        return fail(p, s->has_start_line && !s->start_line_done
                                               ? WP_H1_E_START_LINE_TOO_LONG
                                               : WP_H1_E_HEADERS_TOO_LARGE);
                s->line_len += (uint32_t)(stop - i);
                r = section_line_check(p, s);
                if (r < 0)
                        return r;
                i = stop;
                if (cr) {
                        s->cr = true;
                        i++;
                }
        }
        if (i == 0)
                return 0;
        r = section_reserve(p, s, i);
        if (r < 0)
                return r;
        memcpy(s->buf + s->len, in, i);
        s->len += (uint32_t)i;
        return (ssize_t)i;
}

/* ---- field lines ---- */

/*
 * Parses one field line in place (line[0..n), CRLF excluded, NUL may be written at line[n]).
 * Lower-cases the name, NUL-terminates name and value, trims OWS around the value.
 */
static int parse_field(struct wp_h1_parser *p, char *line, size_t n, char **ret_name,
                       uint32_t *ret_name_len, char **ret_value, uint32_t *ret_value_len)
{
        size_t i = 0, vs, ve, k;
        uint8_t c;

        /* The loops below run on a sentinel: line[n] is the line's CR, which is neither a
         * tchar nor a value byte. */
        if (is_ows((uint8_t)line[0]))
                return fail(p, WP_H1_E_OBS_FOLD);
        while ((c = tlower[(uint8_t)line[i]]) != 0)
                line[i++] = (char)c;
        if (i == n)
                return fail(p, WP_H1_E_BAD_HEADER_NAME); /* no colon */
        if (line[i] != ':') {
                k = i;
                while (k < n && is_ows((uint8_t)line[k]))
                        k++;
                if (i > 0 && k > i && k < n && line[k] == ':')
                        return fail(p, WP_H1_E_WS_BEFORE_COLON);
                return fail(p, WP_H1_E_BAD_HEADER_NAME);
        }
        if (i == 0)
                return fail(p, WP_H1_E_BAD_HEADER_NAME);
        line[i] = '\0';
        *ret_name = line;
        *ret_name_len = (uint32_t)i;

        vs = i + 1;
        while (vs < n && is_ows((uint8_t)line[vs]))
                vs++;
        ve = n;
        while (ve > vs && is_ows((uint8_t)line[ve - 1]))
                ve--;
        /* [ve, n) is OWS, so validating up to the CR is validating [vs, ve) */
        for (k = vs;;) {
                /* eight plain bytes (0x20..0x7e) at a time, then byte by byte */
                while (k + 8 <= n && plain8((const uint8_t *)line + k))
                        k += 8;
                while (vchar[(uint8_t)line[k]] == 1)
                        k++;
                if (k >= n)
                        break;
                if (vchar[(uint8_t)line[k]] == 0)
                        return fail(p, WP_H1_E_BAD_HEADER_VALUE);
                if (p->lim.allow_obs_text) {
                        k++;
                        continue;
                }
                size_t sl = utf8_seq((const uint8_t *)line + k, ve - k);
                if (!sl)
                        return fail(p, WP_H1_E_BAD_UTF8);
                k += sl;
        }
        line[ve] = '\0';
        *ret_value = line + vs;
        *ret_value_len = (uint32_t)(ve - vs);
        return 0;
}

/* Iterates over the comma-separated members of a list value, OWS trimmed. Returns false at
 * the end. Empty members come out with *ret_n == 0. */
static bool list_next(const char **cur, const char *end, const char **ret_m, size_t *ret_n)
{
        const char *s = *cur, *e;

        if (s > end)
                return false;
        e = memchr(s, ',', (size_t)(end - s));
        if (!e)
                e = end;
        *cur = e + 1;
        while (s < e && is_ows((uint8_t)*s))
                s++;
        while (e > s && is_ows((uint8_t)e[-1]))
                e--;
        *ret_m = s;
        *ret_n = (size_t)(e - s);
        return true;
}

/* What the special header fields said, collected over the head. */
struct head_facts {
        unsigned nhost;
        bool cl_seen;
        uint64_t cl;
        bool te_seen, te_chunked_last, te_bad_order, te_unsupported;
        bool expect_continue;
};

static int parse_content_length(struct wp_h1_parser *p, const char *v, size_t n, uint64_t *ret)
{
        uint64_t x = 0;

        if (n == 0)
                return fail(p, WP_H1_E_BAD_CONTENT_LENGTH);
        for (size_t i = 0; i < n; i++) {
                if (v[i] < '0' || v[i] > '9')
                        return fail(p, WP_H1_E_BAD_CONTENT_LENGTH);
                if (x > ((uint64_t)INT64_MAX - (uint64_t)(v[i] - '0')) / 10)
                        return fail(p, WP_H1_E_BAD_CONTENT_LENGTH);
                x = x * 10 + (uint64_t)(v[i] - '0');
        }
        *ret = x;
        return 0;
}

/*
 * Looks at one field of the head for the fields that frame or route the message. Returns 1
 * when the field must not be added to the list (a duplicate Content-Length), 0, or -errno.
 */
static int head_field(struct wp_h1_parser *p, struct head_facts *f, const char *name, uint32_t nl,
                      const char *v, uint32_t vl)
{
        const char *cur = v, *m, *end = v + vl;
        size_t mn;
        uint64_t cl;
        int r;

        switch (nl) {
        case 4:
                if (memcmp(name, "host", 4) != 0)
                        return 0;
                if (++f->nhost > 1 && p->mode == WP_H1_REQUEST)
                        return fail(p, WP_H1_E_MULTIPLE_HOST);
                if (p->mode == WP_H1_REQUEST && vl > 0 && !authority_valid(v, vl, false))
                        return fail(p, WP_H1_E_BAD_HOST);
                if (!p->info.host)
                        p->info.host = v;
                return 0;
        case 6:
                if (memcmp(name, "expect", 6) == 0 && eq_nocase(v, vl, "100-continue"))
                        f->expect_continue = true;
                return 0;
        case 7:
                if (memcmp(name, "upgrade", 7) == 0 && !p->info.upgrade)
                        p->info.upgrade = v;
                return 0;
        case 10:
                if (memcmp(name, "connection", 10) != 0)
                        return 0;
                while (list_next(&cur, end, &m, &mn)) {
                        if (eq_nocase(m, mn, "close"))
                                p->info.conn_close = true;
                        else if (eq_nocase(m, mn, "keep-alive"))
                                p->info.conn_keep_alive = true;
                        else if (eq_nocase(m, mn, "upgrade"))
                                p->info.conn_upgrade = true;
                }
                return 0;
        case 14:
                if (memcmp(name, "content-length", 14) != 0)
                        return 0;
                r = parse_content_length(p, v, vl, &cl);
                if (r < 0)
                        return r;
                if (f->cl_seen) {
                        if (cl != f->cl)
                                return fail(p, WP_H1_E_MULTIPLE_CONTENT_LENGTH);
                        return 1; /* identical duplicate: keep one */
                }
                f->cl_seen = true;
                f->cl = cl;
                return 0;
        case 17:
                if (memcmp(name, "transfer-encoding", 17) != 0)
                        return 0;
                f->te_seen = true;
                while (list_next(&cur, end, &m, &mn)) {
                        if (mn == 0 || f->te_chunked_last) {
                                /* an empty member, or anything after chunked */
                                f->te_bad_order = true;
                                continue;
                        }
                        if (eq_nocase(m, mn, "chunked"))
                                f->te_chunked_last = true;
                        else
                                f->te_unsupported = true;
                }
                return 0;
        default:
                return 0;
        }
}

/* ---- start lines ---- */

/* "HTTP/" DIGIT "." DIGIT */
static int parse_version(struct wp_h1_parser *p, const char *s, size_t n, enum wp_http_version *ret)
{
        if (n != 8 || memcmp(s, "HTTP/", 5) != 0 || s[5] < '0' || s[5] > '9' || s[6] != '.' ||
            s[7] < '0' || s[7] > '9')
                return fail(p, WP_H1_E_BAD_VERSION);
        if (s[5] != '1')
                return fail(p, WP_H1_E_VERSION_UNSUPPORTED);
        /* RFC 9110 2.5: a higher minor version is processed as the highest we support */
        *ret = s[7] == '0' ? WP_HTTP_10 : WP_HTTP_11;
        return 0;
}

/* Target bytes: visible ASCII, no '#' (no fragment in a request-target). */
static bool target_chars_valid(const char *s, size_t n)
{
        for (size_t i = 0; i < n; i++) {
                uint8_t c = (uint8_t)s[i];
                if (c <= 0x20 || c >= 0x7f || c == '#')
                        return false;
        }
        return true;
}

static int parse_target(struct wp_h1_parser *p, char *t, size_t n)
{
        bool connect = strcmp(p->req.method, "CONNECT") == 0;
        size_t sl;

        if (!target_chars_valid(t, n))
                return fail(p, WP_H1_E_BAD_TARGET);
        if (connect) {
                if (!authority_valid(t, n, true))
                        return fail(p, WP_H1_E_CONNECT_NOT_AUTHORITY);
                p->info.target_form = WP_H1_TARGET_AUTHORITY;
                p->req.authority = t;
                p->req.path = t + n; /* "" */
                return 0;
        }
        if (t[0] == '/') {
                p->info.target_form = WP_H1_TARGET_ORIGIN;
                p->req.path = t;
                return 0;
        }
        if (n == 1 && t[0] == '*') {
                if (strcmp(p->req.method, "OPTIONS") != 0)
                        return fail(p, WP_H1_E_ASTERISK_NOT_OPTIONS);
                p->info.target_form = WP_H1_TARGET_ASTERISK;
                p->req.path = t;
                return 0;
        }
        if (n > 7 && eq_nocase(t, 7, "http://"))
                sl = 4;
        else if (n > 8 && eq_nocase(t, 8, "https://"))
                sl = 5;
        else if (authority_valid(t, n, true))
                return fail(p, WP_H1_E_AUTHORITY_NOT_CONNECT);
        else
                return fail(p, WP_H1_E_BAD_TARGET);

        /* absolute-form: "scheme://authority[/path][?query]" */
        char *a = t + sl + 3, *end = t + n, *r = a;
        while (r < end && *r != '/' && *r != '?')
                r++;
        size_t an = (size_t)(r - a);
        if (!authority_valid(a, an, false))
                return fail(p, WP_H1_E_BAD_TARGET);
        p->info.target_form = WP_H1_TARGET_ABSOLUTE;
        p->req.scheme = sl == 4 ? "http" : "https";
        /* In place: move the authority two bytes left over "//" so that it can be
         * NUL-terminated at r - 2; r - 1 is then free for the '/' of an empty path. */
        memmove(t + sl + 1, a, an);
        t[sl + 1 + an] = '\0';
        p->req.authority = t + sl + 1;
        if (r < end && *r == '/') {
                p->req.path = r;
        } else {
                bool asterisk = r == end && strcmp(p->req.method, "OPTIONS") == 0;
                r[-1] = asterisk ? '*' : '/';
                p->req.path = r - 1;
        }
        return 0;
}

static int parse_request_line(struct wp_h1_parser *p, char *l, size_t n)
{
        char *sp1, *sp2;
        size_t i;
        int r;

        for (i = 0; i < n && tchar[(uint8_t)l[i]]; i++)
                ;
        if (i == 0)
                return fail(p, l[0] == ' ' ? WP_H1_E_BAD_START_LINE : WP_H1_E_BAD_METHOD);
        if (i == n || l[i] == '\t')
                return fail(p, WP_H1_E_BAD_START_LINE); /* exactly one SP separates */
        if (l[i] != ' ')
                return fail(p, WP_H1_E_BAD_METHOD);
        sp1 = l + i;
        sp2 = memchr(sp1 + 1, ' ', (size_t)(l + n - sp1 - 1));
        if (!sp2 || sp2 == sp1 + 1)
                return fail(p, WP_H1_E_BAD_START_LINE);
        r = parse_version(p, sp2 + 1, (size_t)(l + n - sp2 - 1), &p->req.version);
        if (r < 0)
                return r;
        *sp1 = '\0';
        *sp2 = '\0';
        p->req.method = l;
        p->req.scheme = "http";
        return parse_target(p, sp1 + 1, (size_t)(sp2 - sp1 - 1));
}

static int parse_status_line(struct wp_h1_parser *p, char *l, size_t n)
{
        unsigned status = 0;
        int r;

        if (n < 8)
                return fail(p, WP_H1_E_BAD_VERSION);
        r = parse_version(p, l, 8, &p->resp.version);
        if (r < 0)
                return r;
        if (n > 8 && l[8] != ' ')
                return fail(p, WP_H1_E_BAD_VERSION);
        if (n < 12)
                return fail(p, WP_H1_E_BAD_STATUS);
        for (int i = 9; i < 12; i++) {
                if (l[i] < '0' || l[i] > '9')
                        return fail(p, WP_H1_E_BAD_STATUS);
                status = status * 10 + (unsigned)(l[i] - '0');
        }
        if (status < 100 || status > 599)
                return fail(p, WP_H1_E_BAD_STATUS);
        p->resp.status = status;
        if (n == 12) {
                /* no SP before the empty reason: tolerated (RFC 9112 4) */
                p->info.reason = "";
                return 0;
        }
        if (l[12] != ' ')
                return fail(p, WP_H1_E_BAD_STATUS);
        for (size_t i = 13; i < n; i++)
                if (vchar[(uint8_t)l[i]] == 0)
                        return fail(p, WP_H1_E_BAD_REASON);
        l[n] = '\0'; /* the CR */
        p->info.reason = l + 13;
        return 0;
}

/* ---- head completion: framing decisions (RFC 9112 6.3) ---- */

static int request_framing(struct wp_h1_parser *p, const struct head_facts *f)
{
        struct wp_http_request *q = &p->req;
        bool connect = p->info.target_form == WP_H1_TARGET_AUTHORITY;

        if (q->version == WP_HTTP_11 && f->nhost == 0)
                return fail(p, WP_H1_E_MISSING_HOST);
        if (p->info.target_form == WP_H1_TARGET_ABSOLUTE) {
                /* RFC 9112 3.2.2: the target's authority wins over Host; tell the caller when
                 * they differ (requests to a foreign host are its policy) */
                if (!p->info.host || !eq_nocase2(p->info.host, strlen(p->info.host), q->authority,
                                                 strlen(q->authority)))
                        p->info.host_mismatch = true;
        } else if (!connect) {
                q->authority = p->info.host ? p->info.host : "";
        }

        if (f->te_seen) {
                if (q->version == WP_HTTP_10)
                        return fail(p, WP_H1_E_TE_HTTP10);
                if (f->cl_seen)
                        return fail(p, WP_H1_E_CL_AND_TE);
                if (f->te_bad_order || !f->te_chunked_last)
                        return fail(p, f->te_unsupported && !f->te_bad_order
                                               ? WP_H1_E_TE_UNSUPPORTED
                                               : WP_H1_E_TE_CHUNKED_NOT_LAST);
                if (f->te_unsupported)
                        return fail(p, WP_H1_E_TE_UNSUPPORTED);
                if (connect)
                        return fail(p, WP_H1_E_CONNECT_BODY);
                q->chunked = true;
        } else if (f->cl_seen) {
                if (connect && f->cl > 0)
                        return fail(p, WP_H1_E_CONNECT_BODY);
                q->content_length = (int64_t)f->cl;
        }
        /* RFC 9110 10.1.1: ignore 100-continue in an HTTP/1.0 request */
        q->expect_continue = f->expect_continue && q->version == WP_HTTP_11;
        /* RFC 9110 7.8: Upgrade in an HTTP/1.0 request is ignored */
        q->upgrade =
                connect || (q->version == WP_HTTP_11 && p->info.conn_upgrade && p->info.upgrade);
        p->upgrade_after_done = q->upgrade;
        if (q->version == WP_HTTP_11)
                p->info.keep_alive = !p->info.conn_close;
        else
                p->info.keep_alive = p->info.conn_keep_alive && !p->info.conn_close;

        if (q->chunked) {
                p->info.has_body = true;
                p->state = ST_CHUNK_SIZE;
        } else if (q->content_length > 0) {
                if (p->max_body && (uint64_t)q->content_length > p->max_body)
                        return fail(p, WP_H1_E_BODY_TOO_LARGE);
                p->info.has_body = true;
                p->remaining = (uint64_t)q->content_length;
                p->state = ST_BODY_CL;
        } else {
                p->state = ST_DONE_PENDING;
        }
        return 0;
}

static int response_framing(struct wp_h1_parser *p, const struct head_facts *f)
{
        struct wp_http_response *s = &p->resp;
        unsigned st = s->status;

        /* framing fields are checked even where they do not apply: a response that carries
         * contradictory ones is broken (and the caller may forward them) */
        if (f->te_seen) {
                if (s->version == WP_HTTP_10)
                        return fail(p, WP_H1_E_TE_HTTP10);
                if (f->cl_seen)
                        return fail(p, WP_H1_E_CL_AND_TE);
                if (f->te_bad_order || !f->te_chunked_last)
                        return fail(p, f->te_unsupported && !f->te_bad_order
                                               ? WP_H1_E_TE_UNSUPPORTED
                                               : WP_H1_E_TE_CHUNKED_NOT_LAST);
                if (f->te_unsupported)
                        return fail(p, WP_H1_E_TE_UNSUPPORTED);
        }
        if (f->cl_seen)
                s->content_length = (int64_t)f->cl;
        s->chunked = f->te_seen;
        if (s->version == WP_HTTP_11)
                p->info.keep_alive = !p->info.conn_close;
        else
                p->info.keep_alive = p->info.conn_keep_alive && !p->info.conn_close;

        if (st < 200) {
                if (st != 101) {
                        if (++p->ninterim > MAX_INTERIM_RESPONSES)
                                return fail(p, WP_H1_E_TOO_MANY_INTERIM);
                        p->interim = true;
                } else {
                        p->upgrade_after_done = true;
                }
                p->state = ST_DONE_PENDING;
                return 0;
        }
        if (p->req_connect && st < 300) {
                p->upgrade_after_done = true;
                p->state = ST_DONE_PENDING;
                return 0;
        }
        if (p->req_head || st == 204 || st == 304) {
                p->state = ST_DONE_PENDING;
                return 0;
        }
        if (s->chunked) {
                p->info.has_body = true;
                p->state = ST_CHUNK_SIZE;
        } else if (f->cl_seen) {
                if (p->max_body && f->cl > p->max_body)
                        return fail(p, WP_H1_E_BODY_TOO_LARGE);
                p->info.has_body = f->cl > 0;
                p->remaining = f->cl;
                p->state = f->cl > 0 ? ST_BODY_CL : ST_DONE_PENDING;
        } else {
                p->info.has_body = true;
                p->info.body_until_close = true;
                p->info.keep_alive = false;
                p->state = ST_BODY_EOF;
        }
        return 0;
}

/* The head section is complete: parse it in place and decide the framing. */
static int head_complete(struct wp_h1_parser *p)
{
        struct section *s = &p->head;
        char *l = (char *)s->buf + s->start, *end = (char *)s->buf + s->len;
        struct wp_headers *h = p->mode == WP_H1_REQUEST ? &p->req.headers : &p->resp.headers;
        struct head_facts f = {0};
        int r;

        r = p->mode == WP_H1_REQUEST ? parse_request_line(p, l, s->start_line_len)
                                     : parse_status_line(p, l, s->start_line_len);
        if (r < 0)
                return r;
        l += s->start_line_len + 2;
        /* every line ends with CRLF (the scanner checked); the last one is empty */
        while (l + 2 < end) {
                char *cr = memchr(l, '\r', (size_t)(end - l));
                char *name, *value;
                uint32_t nl, vl;

                r = parse_field(p, l, (size_t)(cr - l), &name, &nl, &value, &vl);
                if (r < 0)
                        return r;
                r = head_field(p, &f, name, nl, value, vl);
                if (r < 0)
                        return r;
                if (r == 0 && wp_headers_add(h, name, nl, value, vl) < 0)
                        return fail_nomem(p);
                l = cr + 2;
        }
        return p->mode == WP_H1_REQUEST ? request_framing(p, &f) : response_framing(p, &f);
}

static int trailers_complete(struct wp_h1_parser *p)
{
        struct section *s = &p->trl;
        char *l = (char *)s->buf, *end = (char *)s->buf + s->len;
        int r;

        while (l + 2 < end) {
                char *cr = memchr(l, '\r', (size_t)(end - l));
                char *name, *value;
                uint32_t nl, vl;

                r = parse_field(p, l, (size_t)(cr - l), &name, &nl, &value, &vl);
                if (r < 0)
                        return r;
                if (wp_headers_add(&p->trailers, name, nl, value, vl) < 0)
                        return fail_nomem(p);
                l = cr + 2;
        }
        return 0;
}

/* ---- feeding ---- */

static void after_done(struct wp_h1_parser *p)
{
        if (p->mode == WP_H1_RESPONSE) {
                if (p->interim) {
                        p->state = ST_IDLE; /* the final response follows: same request */
                        return;
                }
                p->req_head = p->req_connect = false;
                p->ninterim = 0;
        }
        p->state = p->upgrade_after_done ? ST_UPGRADE : ST_IDLE;
}

static int body_limit_check(struct wp_h1_parser *p, uint64_t total)
{
        if (p->max_body && total > p->max_body)
                return fail(p, WP_H1_E_BODY_TOO_LARGE);
        return 0;
}

/* One byte of chunk framing (size line, extensions, CRLF after data). */
static int chunk_byte(struct wp_h1_parser *p, uint8_t c)
{
        switch (p->state) {
        case ST_CHUNK_SIZE:
                if (is_hex(c)) {
                        if (p->chunk_digits == MAX_CHUNK_SIZE_DIGITS)
                                return fail(p, WP_H1_E_CHUNK_SIZE_OVERFLOW);
                        p->chunk_digits++;
                        p->chunk_size = (p->chunk_size << 4) | hexval(c);
                        if (p->chunk_size > (uint64_t)INT64_MAX)
                                return fail(p, WP_H1_E_CHUNK_SIZE_OVERFLOW);
                        return 0;
                }
                if (p->chunk_digits == 0)
                        return fail(p, c == '\n' ? WP_H1_E_BARE_LF : WP_H1_E_BAD_CHUNK_SIZE);
                if (c == '\r') {
                        p->state = ST_CHUNK_SIZE_LF;
                        return 0;
                }
                if (c == '\n')
                        return fail(p, WP_H1_E_BARE_LF);
                if (c == ';' || is_ows(c)) {
                        p->chunk_ext_semicolon = c == ';';
                        p->chunk_ext_len = 1;
                        if (p->chunk_ext_len > p->lim.max_chunk_ext)
                                return fail(p, WP_H1_E_CHUNK_EXT_TOO_LONG);
                        p->state = ST_CHUNK_EXT;
                        return 0;
                }
                return fail(p, WP_H1_E_BAD_CHUNK_SIZE);
        case ST_CHUNK_EXT:
                if (c == '\r') {
                        /* BWS is only allowed before a ';' */
                        if (!p->chunk_ext_semicolon)
                                return fail(p, WP_H1_E_BAD_CHUNK_EXT);
                        p->state = ST_CHUNK_SIZE_LF;
                        return 0;
                }
                if (c == '\n')
                        return fail(p, WP_H1_E_BARE_LF);
                if (++p->chunk_ext_len > p->lim.max_chunk_ext)
                        return fail(p, WP_H1_E_CHUNK_EXT_TOO_LONG);
                if (!p->chunk_ext_semicolon) {
                        if (c == ';')
                                p->chunk_ext_semicolon = true;
                        else if (!is_ows(c))
                                return fail(p, WP_H1_E_BAD_CHUNK_EXT);
                        return 0;
                }
                if (vchar[c] == 0)
                        return fail(p, WP_H1_E_BAD_CHUNK_EXT);
                return 0;
        case ST_CHUNK_SIZE_LF:
                if (c != '\n')
                        return fail(p, WP_H1_E_BARE_CR);
                if (p->chunk_size == 0) {
                        p->state = ST_TRAILERS;
                        return 0;
                }
                if (p->chunk_size > (uint64_t)INT64_MAX - p->declared)
                        return fail(p, WP_H1_E_BODY_TOO_LARGE);
                p->declared += p->chunk_size;
                if (body_limit_check(p, p->declared) < 0)
                        return -EBADMSG;
                p->remaining = p->chunk_size;
                p->chunk_size = 0;
                p->chunk_digits = 0;
                p->state = ST_CHUNK_DATA;
                return 0;
        case ST_CHUNK_DATA_CR:
                if (c != '\r')
                        return fail(p, WP_H1_E_MISSING_CHUNK_CRLF);
                p->state = ST_CHUNK_DATA_LF;
                return 0;
        case ST_CHUNK_DATA_LF:
                if (c != '\n')
                        return fail(p, WP_H1_E_MISSING_CHUNK_CRLF);
                p->state = ST_CHUNK_SIZE;
                return 0;
        default:
                return 0;
        }
}

static size_t body_event(struct wp_h1_parser *p, const uint8_t *in, size_t avail,
                         struct wp_h1_event *ev)
{
        size_t n = avail;

        if (p->state != ST_BODY_EOF && n > p->remaining)
                n = (size_t)p->remaining;
        ev->type = WP_H1_EV_BODY;
        ev->data = in;
        ev->len = n;
        p->info.body_bytes += n;
        if (p->state != ST_BODY_EOF) {
                p->remaining -= n;
                if (p->remaining == 0)
                        p->state = p->state == ST_BODY_CL ? ST_DONE_PENDING : ST_CHUNK_DATA_CR;
        }
        return n;
}

ssize_t wp_h1_parser_feed(struct wp_h1_parser *p, const uint8_t *in, size_t len,
                          struct wp_h1_event *ret_ev)
{
        size_t used = 0;
        ssize_t n;
        bool done;
        int r;

        *ret_ev = (struct wp_h1_event){.type = WP_H1_EV_NONE};
        for (;;) {
                switch (p->state) {
                case ST_ERROR:
                        return p->fatal;
                case ST_IDLE:
                        if (used == len)
                                return (ssize_t)used;
                        message_reset(p);
                        p->state = ST_HEAD;
                        break;
                case ST_HEAD:
                        n = section_scan(p, &p->head, in + used, len - used, &done);
                        if (n < 0)
                                return n;
                        used += (size_t)n;
                        if (!done)
                                return (ssize_t)used;
                        r = head_complete(p);
                        if (r < 0)
                                return r;
                        ret_ev->type = WP_H1_EV_HEAD;
                        return (ssize_t)used;
                case ST_BODY_CL:
                        if (body_limit_check(p, p->info.body_bytes + p->remaining) < 0)
                                return -EBADMSG;
                        if (used == len)
                                return (ssize_t)used;
                        used += body_event(p, in + used, len - used, ret_ev);
                        return (ssize_t)used;
                case ST_BODY_EOF:
                        if (used == len)
                                return (ssize_t)used;
                        if (body_limit_check(p, p->info.body_bytes + (len - used)) < 0)
                                return -EBADMSG;
                        used += body_event(p, in + used, len - used, ret_ev);
                        return (ssize_t)used;
                case ST_CHUNK_DATA:
                        if (body_limit_check(p, p->declared) < 0)
                                return -EBADMSG;
                        if (used == len)
                                return (ssize_t)used;
                        used += body_event(p, in + used, len - used, ret_ev);
                        return (ssize_t)used;
                case ST_CHUNK_SIZE:
                case ST_CHUNK_EXT:
                case ST_CHUNK_SIZE_LF:
                case ST_CHUNK_DATA_CR:
                case ST_CHUNK_DATA_LF:
                        if (used == len)
                                return (ssize_t)used;
                        r = chunk_byte(p, in[used]);
                        if (r < 0)
                                return r;
                        used++;
                        break;
                case ST_TRAILERS:
                        n = section_scan(p, &p->trl, in + used, len - used, &done);
                        if (n < 0)
                                return n;
                        used += (size_t)n;
                        if (!done)
                                return (ssize_t)used;
                        r = trailers_complete(p);
                        if (r < 0)
                                return r;
                        if (p->trailers.n > 0) {
                                ret_ev->type = WP_H1_EV_TRAILERS;
                                p->state = ST_DONE_PENDING;
                        } else {
                                ret_ev->type = WP_H1_EV_DONE;
                                after_done(p);
                        }
                        return (ssize_t)used;
                case ST_DONE_PENDING:
                        ret_ev->type = WP_H1_EV_DONE;
                        after_done(p);
                        return (ssize_t)used;
                case ST_UPGRADE:
                        ret_ev->type = WP_H1_EV_UPGRADE;
                        return (ssize_t)used;
                }
        }
}

int wp_h1_parser_eof(struct wp_h1_parser *p, struct wp_h1_event *ret_ev)
{
        *ret_ev = (struct wp_h1_event){.type = WP_H1_EV_NONE};
        switch (p->state) {
        case ST_ERROR:
                return p->fatal;
        case ST_IDLE:
                /* after an interim response the final one is still owed */
                if (p->mode == WP_H1_RESPONSE && p->ninterim > 0)
                        return fail(p, WP_H1_E_TRUNCATED);
                return 0;
        case ST_HEAD:
                /* only empty lines so far: the peer closed between messages */
                if (!p->head.start_line_done && p->head.line_len == 0 && !p->head.cr)
                        return 0;
                return fail(p, WP_H1_E_TRUNCATED);
        case ST_BODY_EOF:
        case ST_DONE_PENDING:
                ret_ev->type = WP_H1_EV_DONE;
                after_done(p);
                return 0;
        case ST_UPGRADE:
                ret_ev->type = WP_H1_EV_UPGRADE;
                return 0;
        default:
                return fail(p, WP_H1_E_TRUNCATED);
        }
}

int wp_h1_parser_resume(struct wp_h1_parser *p)
{
        if (p->mode != WP_H1_REQUEST || p->state != ST_UPGRADE)
                return -EINVAL;
        p->upgrade_after_done = false;
        p->state = ST_IDLE;
        return 0;
}

int wp_h1_parser_set_request_method(struct wp_h1_parser *p, const char *method)
{
        if (p->mode != WP_H1_RESPONSE || !method)
                return -EINVAL;
        p->req_head = strcmp(method, "HEAD") == 0;
        p->req_connect = strcmp(method, "CONNECT") == 0;
        return 0;
}

void wp_h1_parser_set_max_body(struct wp_h1_parser *p, uint64_t max_body)
{
        p->max_body = max_body;
}

struct wp_http_request *wp_h1_parser_request(struct wp_h1_parser *p)
{
        return p->mode == WP_H1_REQUEST ? &p->req : NULL;
}

struct wp_http_response *wp_h1_parser_response(struct wp_h1_parser *p)
{
        return p->mode == WP_H1_RESPONSE ? &p->resp : NULL;
}

struct wp_headers *wp_h1_parser_trailers(struct wp_h1_parser *p)
{
        return &p->trailers;
}

const struct wp_h1_info *wp_h1_parser_info(const struct wp_h1_parser *p)
{
        return &p->info;
}

enum wp_h1_error wp_h1_parser_error(const struct wp_h1_parser *p)
{
        return p->err;
}

/* ---- hop-by-hop ---- */

static bool name_is(const struct wp_header *f, const char *name)
{
        size_t n = strlen(name);
        return f->name_len == n && memcmp(f->name, name, n) == 0;
}

/* Whether a Connection field in v[0..a) or v[b..n) names f. */
static bool named_by_connection(const struct wp_headers *h, uint32_t a, uint32_t b,
                                const struct wp_header *f)
{
        for (uint32_t i = 0; i < h->n; i++) {
                const struct wp_header *c = &h->v[i];
                const char *cur, *end, *m;
                size_t mn;

                if (i == a && a < b) {
                        i = b - 1;
                        continue;
                }
                if (!name_is(c, "connection"))
                        continue;
                cur = c->value;
                end = c->value + c->value_len;
                while (list_next(&cur, end, &m, &mn))
                        if (eq_nocase2(m, mn, f->name, f->name_len))
                                return true;
        }
        return false;
}

unsigned wp_h1_remove_hop_by_hop(struct wp_headers *h, bool keep_upgrade)
{
        static const char *const fixed[] = {"keep-alive", "proxy-connection", "te",
                                            "transfer-encoding"};
        uint32_t k = 0, n = h->n;
        unsigned removed = 0;

        /* Compact in place, keeping every Connection field for now: the ones already seen
         * sit in v[0..k), the ones still to come in v[i..n). They go in a last pass. */
        for (uint32_t i = 0; i < n; i++) {
                const struct wp_header *f = &h->v[i];
                bool d = false;

                if (!name_is(f, "connection")) {
                        for (size_t j = 0; j < sizeof(fixed) / sizeof(fixed[0]) && !d; j++)
                                d = name_is(f, fixed[j]);
                        if (!d && name_is(f, "upgrade"))
                                d = !keep_upgrade;
                        else if (!d && !name_is(f, "host") && !name_is(f, "content-length"))
                                d = named_by_connection(h, k, i, f);
                }
                if (d) {
                        h->bytes -= (size_t)f->name_len + f->value_len;
                        removed++;
                        continue;
                }
                h->v[k++] = *f;
        }
        h->n = k;
        return removed + wp_headers_remove(h, "connection");
}

/* ---- serializers ---- */

struct writer {
        uint8_t *p, *end;
        bool full;
};

static void put(struct writer *w, const void *d, size_t n)
{
        if (w->full || n > (size_t)(w->end - w->p)) {
                w->full = true;
                return;
        }
        memcpy(w->p, d, n);
        w->p += n;
}

static void puts_(struct writer *w, const char *s)
{
        put(w, s, strlen(s));
}

static ssize_t finish(struct wp_buf *out, struct writer *w)
{
        ssize_t n;

        if (w->full)
                return -ENOBUFS;
        n = (ssize_t)(w->p - out->last);
        out->last = w->p;
        return n;
}

static bool token_valid(const char *s, size_t n)
{
        if (n == 0)
                return false;
        for (size_t i = 0; i < n; i++)
                if (!tchar[(uint8_t)s[i]])
                        return false;
        return true;
}

/* A field value we may emit: no CTL but HTAB, no DEL (so no CR, LF or NUL). */
static bool value_valid(const char *s, size_t n)
{
        for (size_t i = 0; i < n; i++)
                if (vchar[(uint8_t)s[i]] == 0)
                        return false;
        return true;
}

static int put_fields(struct writer *w, const struct wp_headers *h, bool skip_framing,
                      bool *ret_has_connection)
{
        for (uint32_t i = 0; h && i < h->n; i++) {
                const struct wp_header *f = &h->v[i];

                if (!token_valid(f->name, f->name_len) || !value_valid(f->value, f->value_len))
                        return -EINVAL;
                if (skip_framing && (name_is(f, "host") || name_is(f, "content-length") ||
                                     name_is(f, "transfer-encoding")))
                        continue;
                if (ret_has_connection && name_is(f, "connection"))
                        *ret_has_connection = true;
                put(w, f->name, f->name_len);
                put(w, ": ", 2);
                put(w, f->value, f->value_len);
                put(w, "\r\n", 2);
        }
        return 0;
}

/* Digits of v in base (10 or 16, lower case) at the end of buf[cap]; returns the first one.
 * The head writers run once per message: snprintf showed up in request profiles. */
static char *fmt_u64(char *buf, size_t cap, uint64_t v, unsigned base)
{
        char *p = buf + cap;

        do {
                *--p = "0123456789abcdef"[v % base];
                v /= base;
        } while (v);
        return p;
}

static void put_u64(struct writer *w, uint64_t v, unsigned base)
{
        char num[24];
        char *p = fmt_u64(num, sizeof(num), v, base);

        put(w, p, (size_t)(num + sizeof(num) - p));
}

static void put_framing(struct writer *w, bool chunked, int64_t content_length)
{
        if (chunked) {
                puts_(w, "transfer-encoding: chunked\r\n");
        } else if (content_length >= 0) {
                puts_(w, "content-length: ");
                put_u64(w, (uint64_t)content_length, 10);
                put(w, "\r\n", 2);
        }
}

ssize_t wp_h1_write_request_head(struct wp_buf *out, const struct wp_http_request *req)
{
        struct writer w = {out->last, out->end, false};
        bool connect = req->method && strcmp(req->method, "CONNECT") == 0;
        const char *target = connect ? req->authority : req->path;
        bool has_connection = false;
        int r;

        if (!req->method || !token_valid(req->method, strlen(req->method)) || !target || !*target ||
            !target_chars_valid(target, strlen(target)))
                return -EINVAL;
        if (req->authority && !value_valid(req->authority, strlen(req->authority)))
                return -EINVAL;
        puts_(&w, req->method);
        put(&w, " ", 1);
        puts_(&w, target);
        puts_(&w, " HTTP/1.1\r\n");
        if (req->authority) {
                puts_(&w, "host: ");
                puts_(&w, req->authority);
                put(&w, "\r\n", 2);
        }
        r = put_fields(&w, &req->headers, true, &has_connection);
        if (r < 0)
                return r;
        if (req->upgrade && !connect && !has_connection)
                puts_(&w, "connection: upgrade\r\n");
        put_framing(&w, req->chunked, req->content_length);
        put(&w, "\r\n", 2);
        return finish(out, &w);
}

/* clang-format off */
static const char *reason_phrase(unsigned status)
{
        switch (status) {
        case 100: return "Continue";
        case 101: return "Switching Protocols";
        case 103: return "Early Hints";
        case 200: return "OK";
        case 201: return "Created";
        case 202: return "Accepted";
        case 203: return "Non-Authoritative Information";
        case 204: return "No Content";
        case 205: return "Reset Content";
        case 206: return "Partial Content";
        case 300: return "Multiple Choices";
        case 301: return "Moved Permanently";
        case 302: return "Found";
        case 303: return "See Other";
        case 304: return "Not Modified";
        case 307: return "Temporary Redirect";
        case 308: return "Permanent Redirect";
        case 400: return "Bad Request";
        case 401: return "Unauthorized";
        case 403: return "Forbidden";
        case 404: return "Not Found";
        case 405: return "Method Not Allowed";
        case 406: return "Not Acceptable";
        case 408: return "Request Timeout";
        case 409: return "Conflict";
        case 410: return "Gone";
        case 411: return "Length Required";
        case 412: return "Precondition Failed";
        case 413: return "Content Too Large";
        case 414: return "URI Too Long";
        case 415: return "Unsupported Media Type";
        case 416: return "Range Not Satisfiable";
        case 417: return "Expectation Failed";
        case 421: return "Misdirected Request";
        case 422: return "Unprocessable Content";
        case 426: return "Upgrade Required";
        case 428: return "Precondition Required";
        case 429: return "Too Many Requests";
        case 431: return "Request Header Fields Too Large";
        case 500: return "Internal Server Error";
        case 501: return "Not Implemented";
        case 502: return "Bad Gateway";
        case 503: return "Service Unavailable";
        case 504: return "Gateway Timeout";
        case 505: return "HTTP Version Not Supported";
        default: return "";
        }
}

/* clang-format on */

ssize_t wp_h1_write_response_head(struct wp_buf *out, const struct wp_http_response *resp)
{
        struct writer w = {out->last, out->end, false};
        bool has_connection = false;
        int r;

        if (resp->status < 100 || resp->status > 999)
                return -EINVAL;
        puts_(&w, "HTTP/1.1 ");
        put_u64(&w, resp->status, 10);
        put(&w, " ", 1);
        puts_(&w, reason_phrase(resp->status));
        put(&w, "\r\n", 2);
        r = put_fields(&w, &resp->headers, true, &has_connection);
        if (r < 0)
                return r;
        if (resp->status == 101 && !has_connection)
                puts_(&w, "connection: upgrade\r\n");
        if (resp->status >= 200 && resp->status != 204)
                put_framing(&w, resp->chunked, resp->content_length);
        put(&w, "\r\n", 2);
        return finish(out, &w);
}

ssize_t wp_h1_write_chunk_prefix(struct wp_buf *out, size_t len)
{
        struct writer w = {out->last, out->end, false};

        if (len == 0)
                return -EINVAL;
        put_u64(&w, len, 16);
        put(&w, "\r\n", 2);
        return finish(out, &w);
}

ssize_t wp_h1_write_chunk_suffix(struct wp_buf *out)
{
        struct writer w = {out->last, out->end, false};

        put(&w, "\r\n", 2);
        return finish(out, &w);
}

ssize_t wp_h1_write_chunk(struct wp_buf *out, const void *data, size_t len)
{
        struct writer w = {out->last, out->end, false};

        if (len == 0)
                return -EINVAL;
        put_u64(&w, len, 16);
        put(&w, "\r\n", 2);
        put(&w, data, len);
        put(&w, "\r\n", 2);
        return finish(out, &w);
}

ssize_t wp_h1_write_last_chunk(struct wp_buf *out, const struct wp_headers *trailers)
{
        struct writer w = {out->last, out->end, false};
        int r;

        put(&w, "0\r\n", 3);
        r = put_fields(&w, trailers, false, NULL);
        if (r < 0)
                return r;
        put(&w, "\r\n", 2);
        return finish(out, &w);
}
