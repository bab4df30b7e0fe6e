/*
 * Descriptor-driven JSON <-> protobuf-c codec. See pbjson.h for the mapping. Nothing in here
 * knows about particular xDS messages: only protobuf-c descriptors and the well-known types.
 */
#include "xds-client/pbjson.h"

#include <ctype.h>
#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "waypoint/base/alloc.h"

/* ---- allocator, error buffer ---------------------------------------------------------------- */

static void *pb_alloc(void *data, size_t size)
{
        return wp_malloc(size ? size : 1);
}

static void pb_free(void *data, void *p)
{
        wp_free(p);
}

ProtobufCAllocator xds_pb_allocator = {.alloc = pb_alloc, .free = pb_free};

static __thread char errbuf[1024];

ProtobufCMessage *xds_pbjson_message_free(ProtobufCMessage *msg)
{
        if (msg)
                protobuf_c_message_free_unpacked(msg, &xds_pb_allocator);
        return NULL;
}

/* ---- decode/encode context and JSON path ---------------------------------------------------- */

struct ctx {
        unsigned flags;
        unsigned depth;
        size_t plen;
        char path[512];
};

static void ctx_init(struct ctx *c, unsigned flags, const char *prefix)
{
        c->flags = flags;
        c->depth = 0;
        c->plen = 0;
        c->path[0] = 0;
        if (prefix) {
                size_t n = strlen(prefix);
                if (n >= sizeof(c->path))
                        n = sizeof(c->path) - 1;
                memcpy(c->path, prefix, n);
                c->path[n] = 0;
                c->plen = n;
        }
}

static size_t path_appendf(struct ctx *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static size_t path_appendf(struct ctx *c, const char *fmt, ...)
{
        size_t old = c->plen;
        size_t cap = sizeof(c->path) - old;
        va_list ap;
        int n;

        va_start(ap, fmt);
        n = vsnprintf(c->path + old, cap, fmt, ap);
        va_end(ap);
        if (n < 0)
                n = 0;
        c->plen = (size_t)n < cap ? old + (size_t)n : sizeof(c->path) - 1;
        return old;
}

static size_t path_push_field(struct ctx *c, const char *name)
{
        return path_appendf(c, "%s%s", c->plen ? "." : "", name);
}

static size_t path_push_index(struct ctx *c, size_t i)
{
        return path_appendf(c, "[%zu]", i);
}

static size_t path_push_key(struct ctx *c, const char *key)
{
        return path_appendf(c, "[\"%s\"]", key);
}

static void path_pop(struct ctx *c, size_t old)
{
        c->plen = old;
        c->path[old] = 0;
}

static int fail(struct ctx *c, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(struct ctx *c, int err, const char *fmt, ...)
{
        size_t off = 0;
        va_list ap;

        if (c->plen) {
                int n = snprintf(errbuf, sizeof(errbuf), "%s%s: ", c->path,
                                 c->plen == sizeof(c->path) - 1 ? "..." : "");
                off = n > 0 && (size_t)n < sizeof(errbuf) ? (size_t)n : 0;
        }
        va_start(ap, fmt);
        vsnprintf(errbuf + off, sizeof(errbuf) - off, fmt, ap);
        va_end(ap);
        return err;
}

static int fail_plain(int err, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int fail_plain(int err, const char *fmt, ...)
{
        va_list ap;

        va_start(ap, fmt);
        vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
        va_end(ap);
        return err;
}

static const char *json_type_str(struct json_object *v)
{
        return json_type_to_name(json_object_get_type(v));
}

/* ---- registry ------------------------------------------------------------------------------- */

static int cmp_desc_name(const void *key, const void *elem)
{
        const ProtobufCMessageDescriptor *const *d = elem;
        return strcmp(key, (*d)->name);
}

const ProtobufCMessageDescriptor *xds_registry_lookup_name(const char *full_name)
{
        const ProtobufCMessageDescriptor *const *d;

        if (!full_name)
                return NULL;
        d = bsearch(full_name, xdsproto_descriptors, xdsproto_n_descriptors,
                    sizeof(xdsproto_descriptors[0]), cmp_desc_name);
        return d ? *d : NULL;
}

const ProtobufCMessageDescriptor *xds_registry_lookup(const char *type_url)
{
        const char *slash;

        if (!type_url)
                return NULL;
        slash = strrchr(type_url, '/');
        if (!slash || slash == type_url)
                return NULL;
        return xds_registry_lookup_name(slash + 1);
}

int xds_type_url(const ProtobufCMessageDescriptor *desc, char *buf, size_t cap)
{
        int n = snprintf(buf, cap, "type.googleapis.com/%s", desc->name);
        if (n < 0 || (size_t)n >= cap)
                return -ENOSPC;
        return n;
}

/* ---- well-known types ----------------------------------------------------------------------- */

enum wkt {
        WKT_NONE,
        WKT_ANY,
        WKT_DURATION,
        WKT_STRUCT,
        WKT_VALUE,
        WKT_LIST,
        WKT_WRAPPER,
        WKT_EMPTY,
};

static enum wkt wkt_of(const ProtobufCMessageDescriptor *d)
{
        if (d == &google__protobuf__any__descriptor)
                return WKT_ANY;
        if (d == &google__protobuf__duration__descriptor)
                return WKT_DURATION;
        if (d == &google__protobuf__struct__descriptor)
                return WKT_STRUCT;
        if (d == &google__protobuf__value__descriptor)
                return WKT_VALUE;
        if (d == &google__protobuf__list_value__descriptor)
                return WKT_LIST;
        if (d == &google__protobuf__empty__descriptor)
                return WKT_EMPTY;
        if (d == &google__protobuf__double_value__descriptor ||
            d == &google__protobuf__float_value__descriptor ||
            d == &google__protobuf__int64_value__descriptor ||
            d == &google__protobuf__uint64_value__descriptor ||
            d == &google__protobuf__int32_value__descriptor ||
            d == &google__protobuf__uint32_value__descriptor ||
            d == &google__protobuf__bool_value__descriptor ||
            d == &google__protobuf__string_value__descriptor ||
            d == &google__protobuf__bytes_value__descriptor)
                return WKT_WRAPPER;
        return WKT_NONE;
}

/* A type whose JSON form is not an object with its fields: inside Any it goes under "value". */
static bool wkt_special(const ProtobufCMessageDescriptor *d)
{
        return wkt_of(d) != WKT_NONE;
}

#define MEMBER(type, msg, off) (*(type *)(void *)((uint8_t *)(msg) + (off)))
#define MEMBER_PTR(msg, off)   ((void *)((uint8_t *)(msg) + (off)))

/* protobuf-c represents map<K, V> as a repeated nested "<Name>Entry" message {key = 1; value = 2}.
 */
static bool is_map_field(const ProtobufCFieldDescriptor *f)
{
        const ProtobufCMessageDescriptor *d;
        size_t n;

        if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
                return false;
        d = f->descriptor;
        n = strlen(d->short_name);
        return d->n_fields == 2 && n > 5 && strcmp(d->short_name + n - 5, "Entry") == 0 &&
               d->fields[0].id == 1 && strcmp(d->fields[0].name, "key") == 0 &&
               d->fields[1].id == 2 && strcmp(d->fields[1].name, "value") == 0;
}

static size_t elem_size(ProtobufCType t)
{
        switch (t) {
        case PROTOBUF_C_TYPE_INT32:
        case PROTOBUF_C_TYPE_SINT32:
        case PROTOBUF_C_TYPE_SFIXED32:
        case PROTOBUF_C_TYPE_UINT32:
        case PROTOBUF_C_TYPE_FIXED32:
        case PROTOBUF_C_TYPE_FLOAT:
        case PROTOBUF_C_TYPE_ENUM:
                return 4;
        case PROTOBUF_C_TYPE_INT64:
        case PROTOBUF_C_TYPE_SINT64:
        case PROTOBUF_C_TYPE_SFIXED64:
        case PROTOBUF_C_TYPE_UINT64:
        case PROTOBUF_C_TYPE_FIXED64:
        case PROTOBUF_C_TYPE_DOUBLE:
                return 8;
        case PROTOBUF_C_TYPE_BOOL:
                return sizeof(protobuf_c_boolean);
        case PROTOBUF_C_TYPE_STRING:
                return sizeof(char *);
        case PROTOBUF_C_TYPE_BYTES:
                return sizeof(ProtobufCBinaryData);
        case PROTOBUF_C_TYPE_MESSAGE:
                return sizeof(void *);
        }
        return 0;
}

/* ---- base64 --------------------------------------------------------------------------------- */

static int b64_val(unsigned char ch)
{
        if (ch >= 'A' && ch <= 'Z')
                return ch - 'A';
        if (ch >= 'a' && ch <= 'z')
                return ch - 'a' + 26;
        if (ch >= '0' && ch <= '9')
                return ch - '0' + 52;
        if (ch == '+' || ch == '-')
                return 62;
        if (ch == '/' || ch == '_')
                return 63;
        return -1;
}

/* Decodes standard or URL-safe base64, padding optional. Returns decoded length or -EINVAL. */
static ssize_t b64_decode(const char *in, size_t len, uint8_t *out)
{
        uint32_t acc = 0;
        size_t i, o = 0, pad = 0;
        unsigned bits = 0;

        while (len > 0 && in[len - 1] == '=' && pad < 2) {
                len--;
                pad++;
        }
        if (pad && (len + pad) % 4 != 0)
                return -EINVAL;
        if (len % 4 == 1)
                return -EINVAL;
        for (i = 0; i < len; i++) {
                int v = b64_val((unsigned char)in[i]);
                if (v < 0)
                        return -EINVAL;
                acc = (acc << 6) | (uint32_t)v;
                bits += 6;
                if (bits >= 8) {
                        bits -= 8;
                        out[o++] = (uint8_t)(acc >> bits);
                }
        }
        /* Leftover bits must be zero (canonical encoding). */
        if (bits && (acc & ((1u << bits) - 1)))
                return -EINVAL;
        return (ssize_t)o;
}

static char *b64_encode(const uint8_t *in, size_t len)
{
        static const char tbl[] =
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        size_t i, o = 0;
        char *out = wp_malloc((len + 2) / 3 * 4 + 1);

        if (!out)
                return NULL;
        for (i = 0; i + 2 < len; i += 3) {
                uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
                out[o++] = tbl[v >> 18];
                out[o++] = tbl[(v >> 12) & 63];
                out[o++] = tbl[(v >> 6) & 63];
                out[o++] = tbl[v & 63];
        }
        if (i < len) {
                uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < len ? (uint32_t)in[i + 1] << 8 : 0);
                out[o++] = tbl[v >> 18];
                out[o++] = tbl[(v >> 12) & 63];
                out[o++] = i + 1 < len ? tbl[(v >> 6) & 63] : '=';
                out[o++] = '=';
        }
        out[o] = 0;
        return out;
}

/* ---- UTF-8 ---------------------------------------------------------------------------------- */

static bool utf8_valid(const unsigned char *s, size_t n)
{
        size_t i = 0;

        while (i < n) {
                unsigned char ch = s[i];
                size_t k;
                uint32_t cp;

                if (ch < 0x80) {
                        i++;
                        continue;
                }
                if (ch >= 0xc2 && ch <= 0xdf) {
                        k = 1;
                        cp = ch & 0x1f;
                } else if (ch >= 0xe0 && ch <= 0xef) {
                        k = 2;
                        cp = ch & 0x0f;
                } else if (ch >= 0xf0 && ch <= 0xf4) {
                        k = 3;
                        cp = ch & 0x07;
                } else {
                        return false;
                }
                for (size_t j = 1; j <= k; j++) {
                        if (i + j >= n || (s[i + j] & 0xc0) != 0x80)
                                return false;
                        cp = cp << 6 | (s[i + j] & 0x3f);
                }
                if ((k == 2 && cp < 0x800) || (k == 3 && (cp < 0x10000 || cp > 0x10ffff)) ||
                    (cp >= 0xd800 && cp <= 0xdfff))
                        return false;
                i += k + 1;
        }
        return true;
}

/* ---- scalar decoding ------------------------------------------------------------------------ */

static int get_string(struct ctx *c, struct json_object *v, const char **ret, size_t *ret_len)
{
        int n;

        if (!json_object_is_type(v, json_type_string))
                return fail(c, -EINVAL, "expected a string, got %s", json_type_str(v));
        n = json_object_get_string_len(v);
        if (n < 0 || (size_t)n > XDS_PBJSON_MAX_STRING)
                return fail(c, -E2BIG, "string longer than %u bytes", XDS_PBJSON_MAX_STRING);
        *ret = json_object_get_string(v);
        *ret_len = (size_t)n;
        return 0;
}

static bool is_integral_double(double d)
{
        return isfinite(d) && d == floor(d);
}

static int get_signed(struct ctx *c, struct json_object *v, int64_t min, int64_t max, int64_t *ret)
{
        int64_t x;

        switch (json_object_get_type(v)) {
        case json_type_int:
                x = json_object_get_int64(v);
                if (x == INT64_MAX && json_object_get_uint64(v) > (uint64_t)INT64_MAX)
                        return fail(c, -EINVAL, "integer out of range");
                break;
        case json_type_double: {
                double d = json_object_get_double(v);
                if (!is_integral_double(d))
                        return fail(c, -EINVAL, "expected an integer, got %g", d);
                if (d < -9223372036854775808.0 || d >= 9223372036854775808.0)
                        return fail(c, -EINVAL, "integer out of range");
                x = (int64_t)d;
                break;
        }
        case json_type_string: {
                const char *s = json_object_get_string(v);
                char *end;
                if (!*s || isspace((unsigned char)*s))
                        return fail(c, -EINVAL, "expected an integer, got \"%s\"", s);
                errno = 0;
                long long ll = strtoll(s, &end, 10);
                if (*end == 0 && errno == 0) {
                        x = ll;
                        break;
                }
                if (*end == 0 && errno == ERANGE)
                        return fail(c, -EINVAL, "integer out of range: \"%s\"", s);
                /* Exponent or fraction form ("1e3"): allowed when the value is integral. */
                errno = 0;
                double d = strtod(s, &end);
                if (*end || errno || !is_integral_double(d))
                        return fail(c, -EINVAL, "expected an integer, got \"%s\"", s);
                if (d < -9223372036854775808.0 || d >= 9223372036854775808.0)
                        return fail(c, -EINVAL, "integer out of range: \"%s\"", s);
                x = (int64_t)d;
                break;
        }
        default:
                return fail(c, -EINVAL, "expected an integer, got %s", json_type_str(v));
        }
        if (x < min || x > max)
                return fail(c, -EINVAL, "integer %" PRId64 " out of range", x);
        *ret = x;
        return 0;
}

static int get_unsigned(struct ctx *c, struct json_object *v, uint64_t max, uint64_t *ret)
{
        uint64_t x;

        switch (json_object_get_type(v)) {
        case json_type_int:
                if (json_object_get_int64(v) < 0)
                        return fail(c, -EINVAL, "negative value %" PRId64 " for an unsigned field",
                                    json_object_get_int64(v));
                x = json_object_get_uint64(v);
                break;
        case json_type_double: {
                double d = json_object_get_double(v);
                if (!is_integral_double(d))
                        return fail(c, -EINVAL, "expected an integer, got %g", d);
                if (d < 0)
                        return fail(c, -EINVAL, "negative value for an unsigned field");
                if (d >= 18446744073709551616.0)
                        return fail(c, -EINVAL, "integer out of range");
                x = (uint64_t)d;
                break;
        }
        case json_type_string: {
                const char *s = json_object_get_string(v);
                char *end;
                if (!*s || isspace((unsigned char)*s) || *s == '+')
                        return fail(c, -EINVAL, "expected an integer, got \"%s\"", s);
                if (*s == '-')
                        return fail(c, -EINVAL, "negative value \"%s\" for an unsigned field", s);
                errno = 0;
                unsigned long long ull = strtoull(s, &end, 10);
                if (*end == 0 && errno == 0) {
                        x = ull;
                        break;
                }
                if (*end == 0 && errno == ERANGE)
                        return fail(c, -EINVAL, "integer out of range: \"%s\"", s);
                errno = 0;
                double d = strtod(s, &end);
                if (*end || errno || !is_integral_double(d) || d < 0 || d >= 18446744073709551616.0)
                        return fail(c, -EINVAL, "expected an unsigned integer, got \"%s\"", s);
                x = (uint64_t)d;
                break;
        }
        default:
                return fail(c, -EINVAL, "expected an integer, got %s", json_type_str(v));
        }
        if (x > max)
                return fail(c, -EINVAL, "integer %" PRIu64 " out of range", x);
        *ret = x;
        return 0;
}

static int get_double(struct ctx *c, struct json_object *v, double *ret)
{
        switch (json_object_get_type(v)) {
        case json_type_int:
                if (json_object_get_int64(v) == INT64_MAX)
                        *ret = (double)json_object_get_uint64(v);
                else
                        *ret = (double)json_object_get_int64(v);
                return 0;
        case json_type_double:
                *ret = json_object_get_double(v);
                return 0;
        case json_type_string: {
                const char *s = json_object_get_string(v);
                char *end;
                if (strcmp(s, "NaN") == 0) {
                        *ret = NAN;
                        return 0;
                }
                if (strcmp(s, "Infinity") == 0) {
                        *ret = INFINITY;
                        return 0;
                }
                if (strcmp(s, "-Infinity") == 0) {
                        *ret = -INFINITY;
                        return 0;
                }
                if (!*s || isspace((unsigned char)*s))
                        return fail(c, -EINVAL, "expected a number, got \"%s\"", s);
                errno = 0;
                *ret = strtod(s, &end);
                if (*end || errno || !isfinite(*ret))
                        return fail(c, -EINVAL, "expected a number, got \"%s\"", s);
                return 0;
        }
        default:
                return fail(c, -EINVAL, "expected a number, got %s", json_type_str(v));
        }
}

/* Copies a JSON string into a new NUL-terminated string, rejecting NUL and bad UTF-8. */
static int dup_string(struct ctx *c, struct json_object *v, char **ret)
{
        const char *s;
        size_t n;
        char *d;
        int r;

        r = get_string(c, v, &s, &n);
        if (r < 0)
                return r;
        if (memchr(s, 0, n))
                return fail(c, -EINVAL, "string contains a NUL character");
        if (!utf8_valid((const unsigned char *)s, n))
                return fail(c, -EINVAL, "string is not valid UTF-8");
        d = wp_malloc(n + 1);
        if (!d)
                return fail(c, -ENOMEM, "out of memory");
        memcpy(d, s, n);
        d[n] = 0;
        *ret = d;
        return 0;
}

static int decode_bytes(struct ctx *c, struct json_object *v, ProtobufCBinaryData *ret)
{
        const char *s;
        size_t n;
        ssize_t o;
        uint8_t *d;
        int r;

        r = get_string(c, v, &s, &n);
        if (r < 0)
                return r;
        d = wp_malloc(n / 4 * 3 + 3);
        if (!d)
                return fail(c, -ENOMEM, "out of memory");
        o = b64_decode(s, n, d);
        if (o < 0) {
                wp_free(d);
                return fail(c, -EINVAL, "invalid base64");
        }
        ret->data = d;
        ret->len = (size_t)o;
        return 0;
}

static int decode_enum(struct ctx *c, const ProtobufCEnumDescriptor *ed, struct json_object *v,
                       int32_t *ret)
{
        if (json_object_is_type(v, json_type_string)) {
                const char *s = json_object_get_string(v);
                const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value_by_name(ed, s);
                if (!ev)
                        return fail(c, -EINVAL, "unknown value \"%s\" for enum %s", s, ed->name);
                *ret = ev->value;
                return 0;
        }
        if (json_object_is_type(v, json_type_int) || json_object_is_type(v, json_type_double)) {
                int64_t x;
                int r = get_signed(c, v, INT32_MIN, INT32_MAX, &x);
                if (r < 0)
                        return r;
                *ret = (int32_t)x;
                return 0;
        }
        return fail(c, -EINVAL, "expected an enum name or number for %s, got %s", ed->name,
                    json_type_str(v));
}

/* Decodes a non-message value of field f's type into dst (element storage). */
static int decode_scalar(struct ctx *c, const ProtobufCFieldDescriptor *f, void *dst,
                         struct json_object *v)
{
        int64_t i;
        uint64_t u;
        double d;
        int r;

        switch (f->type) {
        case PROTOBUF_C_TYPE_INT32:
        case PROTOBUF_C_TYPE_SINT32:
        case PROTOBUF_C_TYPE_SFIXED32:
                r = get_signed(c, v, INT32_MIN, INT32_MAX, &i);
                if (r >= 0)
                        *(int32_t *)dst = (int32_t)i;
                return r;
        case PROTOBUF_C_TYPE_INT64:
        case PROTOBUF_C_TYPE_SINT64:
        case PROTOBUF_C_TYPE_SFIXED64:
                r = get_signed(c, v, INT64_MIN, INT64_MAX, &i);
                if (r >= 0)
                        *(int64_t *)dst = i;
                return r;
        case PROTOBUF_C_TYPE_UINT32:
        case PROTOBUF_C_TYPE_FIXED32:
                r = get_unsigned(c, v, UINT32_MAX, &u);
                if (r >= 0)
                        *(uint32_t *)dst = (uint32_t)u;
                return r;
        case PROTOBUF_C_TYPE_UINT64:
        case PROTOBUF_C_TYPE_FIXED64:
                r = get_unsigned(c, v, UINT64_MAX, &u);
                if (r >= 0)
                        *(uint64_t *)dst = u;
                return r;
        case PROTOBUF_C_TYPE_FLOAT:
                r = get_double(c, v, &d);
                if (r < 0)
                        return r;
                if (isfinite(d) && (d > FLT_MAX || d < -FLT_MAX))
                        return fail(c, -EINVAL, "float out of range");
                *(float *)dst = (float)d;
                return 0;
        case PROTOBUF_C_TYPE_DOUBLE:
                r = get_double(c, v, &d);
                if (r >= 0)
                        *(double *)dst = d;
                return r;
        case PROTOBUF_C_TYPE_BOOL:
                if (!json_object_is_type(v, json_type_boolean))
                        return fail(c, -EINVAL, "expected true or false, got %s", json_type_str(v));
                *(protobuf_c_boolean *)dst = json_object_get_boolean(v) ? 1 : 0;
                return 0;
        case PROTOBUF_C_TYPE_ENUM: {
                int32_t e;
                r = decode_enum(c, f->descriptor, v, &e);
                if (r >= 0)
                        *(int32_t *)dst = e;
                return r;
        }
        case PROTOBUF_C_TYPE_STRING:
                return dup_string(c, v, (char **)dst);
        case PROTOBUF_C_TYPE_BYTES:
                return decode_bytes(c, v, dst);
        case PROTOBUF_C_TYPE_MESSAGE:
                break;
        }
        return fail(c, -EINVAL, "internal: unexpected field type");
}

/* ---- message decoding ----------------------------------------------------------------------- */

static int decode_into(struct ctx *c, const ProtobufCMessageDescriptor *d, ProtobufCMessage *m,
                       struct json_object *v, bool skip_at_type);

static ProtobufCMessage *msg_new(const ProtobufCMessageDescriptor *d)
{
        ProtobufCMessage *m = wp_calloc(1, d->sizeof_message);
        if (m)
                d->message_init(m);
        return m;
}

/* Allocates a message of type d, stores it in *slot (so the parent owns it from now on, even if
 * decoding fails half-way) and decodes v into it. */
static int decode_child(struct ctx *c, const ProtobufCMessageDescriptor *d, ProtobufCMessage **slot,
                        struct json_object *v)
{
        ProtobufCMessage *m = msg_new(d);

        if (!m)
                return fail(c, -ENOMEM, "out of memory");
        *slot = m;
        return decode_into(c, d, m, v, false);
}

static bool is_value_msg(const ProtobufCFieldDescriptor *f)
{
        return f->type == PROTOBUF_C_TYPE_MESSAGE &&
               f->descriptor == &google__protobuf__value__descriptor;
}

/* Decodes one element (not a list) of field f into dst, where dst is the storage of one value
 * of f's type (for messages: a ProtobufCMessage * slot). */
static int decode_one(struct ctx *c, const ProtobufCFieldDescriptor *f, void *dst,
                      struct json_object *v)
{
        if (f->type == PROTOBUF_C_TYPE_MESSAGE)
                return decode_child(c, f->descriptor, dst, v);
        return decode_scalar(c, f, dst, v);
}

static int decode_map(struct ctx *c, const ProtobufCFieldDescriptor *f, ProtobufCMessage *m,
                      struct json_object *v)
{
        const ProtobufCMessageDescriptor *ed = f->descriptor;
        const ProtobufCFieldDescriptor *kf = &ed->fields[0], *vf = &ed->fields[1];
        size_t *n = MEMBER_PTR(m, f->quantifier_offset);
        ProtobufCMessage ***arr = MEMBER_PTR(m, f->offset);
        size_t cnt;

        if (!json_object_is_type(v, json_type_object))
                return fail(c, -EINVAL, "expected an object (map), got %s", json_type_str(v));
        cnt = (size_t)json_object_object_length(v);
        if (*arr)
                return fail(c, -EINVAL, "duplicate field");
        if (cnt == 0)
                return 0;
        *arr = wp_calloc(cnt, sizeof(**arr));
        if (!*arr)
                return fail(c, -ENOMEM, "out of memory");

        json_object_object_foreach(v, key, val)
        {
                size_t old = path_push_key(c, key);
                ProtobufCMessage *e = msg_new(ed);
                int r;

                if (!e)
                        return fail(c, -ENOMEM, "out of memory");
                (*arr)[(*n)++] = e;
                if (kf->type == PROTOBUF_C_TYPE_BOOL) {
                        if (strcmp(key, "true") && strcmp(key, "false"))
                                return fail(c, -EINVAL, "map key must be true or false");
                        MEMBER(protobuf_c_boolean, e, kf->offset) = strcmp(key, "true") == 0;
                } else {
                        struct json_object *k = json_object_new_string(key);
                        if (!k)
                                return fail(c, -ENOMEM, "out of memory");
                        r = decode_scalar(c, kf, MEMBER_PTR(e, kf->offset), k);
                        json_object_put(k);
                        if (r < 0)
                                return r;
                }
                if (json_object_get_type(val) == json_type_null && !is_value_msg(vf)) {
                        if (vf->type != PROTOBUF_C_TYPE_MESSAGE)
                                return fail(c, -EINVAL, "null map value");
                        r = decode_child(c, vf->descriptor, MEMBER_PTR(e, vf->offset), NULL);
                } else {
                        r = decode_one(c, vf, MEMBER_PTR(e, vf->offset), val);
                }
                if (r < 0)
                        return r;
                path_pop(c, old);
        }
        return 0;
}

static int decode_repeated(struct ctx *c, const ProtobufCFieldDescriptor *f, ProtobufCMessage *m,
                           struct json_object *v)
{
        size_t *n = MEMBER_PTR(m, f->quantifier_offset);
        void **arr = MEMBER_PTR(m, f->offset);
        size_t cnt, i, sz = elem_size(f->type);

        if (!json_object_is_type(v, json_type_array))
                return fail(c, -EINVAL, "expected an array, got %s", json_type_str(v));
        if (*arr)
                return fail(c, -EINVAL, "duplicate field");
        cnt = json_object_array_length(v);
        if (cnt == 0)
                return 0;
        *arr = wp_calloc(cnt, sz);
        if (!*arr)
                return fail(c, -ENOMEM, "out of memory");
        for (i = 0; i < cnt; i++) {
                struct json_object *e = json_object_array_get_idx(v, i);
                size_t old = path_push_index(c, i);
                int r;

                if (json_object_get_type(e) == json_type_null && !is_value_msg(f))
                        return fail(c, -EINVAL, "null array element");
                /* Count the element first: a half-decoded message must still be freed. */
                (*n)++;
                r = decode_one(c, f, (uint8_t *)*arr + i * sz, e);
                if (r < 0) {
                        if (f->type != PROTOBUF_C_TYPE_MESSAGE)
                                (*n)--; /* scalar slot was not filled */
                        return r;
                }
                path_pop(c, old);
        }
        return 0;
}

/* Decodes the JSON value v of field f into message m (v is not null). */
static int decode_field(struct ctx *c, const ProtobufCMessageDescriptor *d,
                        const ProtobufCFieldDescriptor *f, ProtobufCMessage *m,
                        struct json_object *v)
{
        void *dst = MEMBER_PTR(m, f->offset);
        int r;

        if (f->label == PROTOBUF_C_LABEL_REPEATED)
                return is_map_field(f) ? decode_map(c, f, m, v) : decode_repeated(c, f, m, v);

        if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                uint32_t *cs = MEMBER_PTR(m, f->quantifier_offset);
                if (*cs != 0) {
                        const ProtobufCFieldDescriptor *o =
                            protobuf_c_message_descriptor_get_field(d, *cs);
                        return fail(c, -EINVAL, "oneof conflict: \"%s\" and \"%s\" both set",
                                    o ? o->name : "?", f->name);
                }
                if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                        *cs = f->id;
                        *(ProtobufCMessage **)dst = NULL;
                        return decode_child(c, f->descriptor, dst, v);
                }
                if (f->type == PROTOBUF_C_TYPE_STRING || f->type == PROTOBUF_C_TYPE_BYTES) {
                        /* Decode into a temporary so the union never holds a half value. */
                        union {
                                char *s;
                                ProtobufCBinaryData b;
                        } tmp;
                        memset(&tmp, 0, sizeof(tmp));
                        r = decode_scalar(c, f, &tmp, v);
                        if (r < 0)
                                return r;
                        memcpy(dst, &tmp, elem_size(f->type));
                        *cs = f->id;
                        return 0;
                }
                r = decode_scalar(c, f, dst, v);
                if (r >= 0)
                        *cs = f->id;
                return r;
        }

        if (f->type == PROTOBUF_C_TYPE_MESSAGE)
                return decode_child(c, f->descriptor, dst, v);

        if (f->type == PROTOBUF_C_TYPE_STRING) {
                char *s;
                r = decode_scalar(c, f, &s, v);
                if (r < 0)
                        return r;
                *(char **)dst = s; /* previous value is the shared default "" */
        } else {
                r = decode_scalar(c, f, dst, v);
                if (r < 0)
                        return r;
        }
        if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset)
                MEMBER(protobuf_c_boolean, m, f->quantifier_offset) = 1;
        return 0;
}

/* Compares a proto field name with a JSON key in lowerCamel form (protoc's ToJsonName). */
static bool json_name_eq(const char *proto_name, const char *key)
{
        bool up = false;

        for (; *proto_name; proto_name++) {
                char ch = *proto_name;
                if (ch == '_') {
                        up = true;
                        continue;
                }
                if (up)
                        ch = (char)toupper((unsigned char)ch);
                up = false;
                if (*key++ != ch)
                        return false;
        }
        return *key == 0;
}

static const ProtobufCFieldDescriptor *find_field(const ProtobufCMessageDescriptor *d,
                                                  const char *key)
{
        const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, key);
        unsigned i;

        if (f)
                return f;
        for (i = 0; i < d->n_fields; i++)
                if (json_name_eq(d->fields[i].name, key))
                        return &d->fields[i];
        return NULL;
}

static int decode_any(struct ctx *c, Google__Protobuf__Any *any, struct json_object *v)
{
        const ProtobufCMessageDescriptor *inner_d;
        struct json_object *t, *inner_v = v;
        ProtobufCMessage *inner = NULL;
        const char *url;
        size_t len;
        uint8_t *buf;
        int r;

        if (!json_object_is_type(v, json_type_object))
                return fail(c, -EINVAL, "expected an object (Any), got %s", json_type_str(v));
        if (!json_object_object_get_ex(v, "@type", &t))
                return fail(c, -EINVAL, "Any without \"@type\"");
        if (!json_object_is_type(t, json_type_string))
                return fail(c, -EINVAL, "\"@type\" must be a string");
        url = json_object_get_string(t);
        inner_d = xds_registry_lookup(url);
        if (!inner_d)
                return fail(c, -EINVAL, "unknown type URL %s", url);

        if (wkt_special(inner_d)) {
                json_object_object_foreach(v, key, val)
                {
                        if (strcmp(key, "@type") && strcmp(key, "value")) {
                                size_t old = path_push_field(c, key);
                                if (!(c->flags & XDS_PBJSON_IGNORE_UNKNOWN))
                                        return fail(c, -EINVAL, "unknown field");
                                path_pop(c, old);
                        }
                        (void)val;
                }
                if (!json_object_object_get_ex(v, "value", &inner_v) &&
                    inner_d != &google__protobuf__empty__descriptor)
                        return fail(c, -EINVAL, "Any of type %s without \"value\"", url);
        }

        inner = msg_new(inner_d);
        if (!inner)
                return fail(c, -ENOMEM, "out of memory");
        if (wkt_special(inner_d)) {
                size_t old = path_push_field(c, "value");
                if (inner_v)
                        r = decode_into(c, inner_d, inner, inner_v, false);
                else
                        r = 0; /* Empty without "value" */
                if (r >= 0)
                        path_pop(c, old);
        } else {
                r = decode_into(c, inner_d, inner, v, true);
        }
        if (r < 0)
                goto err_free_inner;

        len = protobuf_c_message_get_packed_size(inner);
        buf = wp_malloc(len ? len : 1);
        if (!buf) {
                r = fail(c, -ENOMEM, "out of memory");
                goto err_free_inner;
        }
        protobuf_c_message_pack(inner, buf);
        xds_pbjson_message_free(inner);

        any->value.data = buf;
        any->value.len = len;
        {
                char *u = wp_strdup(url);
                if (!u)
                        return fail(c, -ENOMEM, "out of memory"); /* buf is owned by any now */
                any->type_url = u;
        }
        return 0;

err_free_inner:
        xds_pbjson_message_free(inner);
        return r;
}

static int decode_duration(struct ctx *c, Google__Protobuf__Duration *du, struct json_object *v)
{
        const char *s, *p;
        bool neg = false;
        int64_t sec = 0;
        int32_t nanos = 0;
        int digits = 0;

        if (!json_object_is_type(v, json_type_string))
                return fail(c, -EINVAL, "expected a duration string like \"1.5s\", got %s",
                            json_type_str(v));
        s = p = json_object_get_string(v);
        if (*p == '-') {
                neg = true;
                p++;
        }
        if (!isdigit((unsigned char)*p))
                goto bad;
        while (isdigit((unsigned char)*p)) {
                sec = sec * 10 + (*p++ - '0');
                if (sec > 315576000000LL)
                        return fail(c, -EINVAL, "duration out of range: \"%s\"", s);
        }
        if (*p == '.') {
                p++;
                while (isdigit((unsigned char)*p)) {
                        if (++digits > 9)
                                goto bad;
                        nanos = nanos * 10 + (*p++ - '0');
                }
                if (digits == 0)
                        goto bad;
                for (int i = digits; i < 9; i++)
                        nanos *= 10;
        }
        if (p[0] != 's' || p[1] != 0)
                goto bad;
        du->seconds = neg ? -sec : sec;
        du->nanos = neg ? -nanos : nanos;
        return 0;
bad:
        return fail(c, -EINVAL, "invalid duration \"%s\" (expected e.g. \"1.5s\")", s);
}

static int decode_value(struct ctx *c, Google__Protobuf__Value *val, struct json_object *v)
{
        const ProtobufCMessageDescriptor *d = &google__protobuf__value__descriptor;
        int r;

        switch (json_object_get_type(v)) {
        case json_type_null:
                val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE;
                val->null_value = GOOGLE__PROTOBUF__NULL_VALUE__NULL_VALUE;
                return 0;
        case json_type_boolean:
                val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE;
                val->bool_value = json_object_get_boolean(v) ? 1 : 0;
                return 0;
        case json_type_int:
        case json_type_double:
                r = get_double(c, v, &val->number_value);
                if (r >= 0)
                        val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE;
                return r;
        case json_type_string: {
                char *s;
                r = dup_string(c, v, &s);
                if (r < 0)
                        return r;
                val->string_value = s;
                val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE;
                return 0;
        }
        case json_type_object:
                val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE;
                val->struct_value = NULL;
                return decode_child(c, &google__protobuf__struct__descriptor,
                                    (ProtobufCMessage **)&val->struct_value, v);
        case json_type_array:
                val->kind_case = GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE;
                val->list_value = NULL;
                return decode_child(c, &google__protobuf__list_value__descriptor,
                                    (ProtobufCMessage **)&val->list_value, v);
        }
        (void)d;
        return fail(c, -EINVAL, "unexpected JSON type");
}

static int decode_into(struct ctx *c, const ProtobufCMessageDescriptor *d, ProtobufCMessage *m,
                       struct json_object *v, bool skip_at_type)
{
        uint64_t seen[8] = {0};
        int r = 0;

        if (c->depth >= XDS_PBJSON_MAX_DEPTH)
                return fail(c, -E2BIG, "nesting deeper than %d messages", XDS_PBJSON_MAX_DEPTH);
        c->depth++;

        switch (wkt_of(d)) {
        case WKT_ANY:
                r = decode_any(c, (Google__Protobuf__Any *)m, v);
                goto out;
        case WKT_DURATION:
                r = decode_duration(c, (Google__Protobuf__Duration *)m, v);
                goto out;
        case WKT_VALUE:
                r = decode_value(c, (Google__Protobuf__Value *)m, v);
                goto out;
        case WKT_STRUCT:
                if (!json_object_is_type(v, json_type_object)) {
                        r = fail(c, -EINVAL, "expected an object (Struct), got %s",
                                 json_type_str(v));
                        goto out;
                }
                r = decode_map(c, &d->fields[0], m, v);
                goto out;
        case WKT_LIST:
                r = decode_repeated(c, &d->fields[0], m, v);
                goto out;
        case WKT_WRAPPER:
                if (json_object_get_type(v) == json_type_object ||
                    json_object_get_type(v) == json_type_array) {
                        r = fail(c, -EINVAL, "expected a bare %s value, got %s", d->short_name,
                                 json_type_str(v));
                        goto out;
                }
                r = decode_field(c, d, &d->fields[0], m, v);
                goto out;
        case WKT_EMPTY:
        case WKT_NONE:
                break;
        }

        if (v == NULL) /* empty message (e.g. a null map value) */
                goto out;
        if (!json_object_is_type(v, json_type_object)) {
                r = fail(c, -EINVAL, "expected an object (%s), got %s", d->name, json_type_str(v));
                goto out;
        }
        if (d->n_fields > sizeof(seen) * 8) {
                r = fail(c, -EINVAL, "internal: message %s has too many fields", d->name);
                goto out;
        }

        json_object_object_foreach(v, key, val)
        {
                const ProtobufCFieldDescriptor *f;
                size_t old, idx;

                if (skip_at_type && strcmp(key, "@type") == 0)
                        continue;
                old = path_push_field(c, key);
                f = find_field(d, key);
                if (!f) {
                        if (!(c->flags & XDS_PBJSON_IGNORE_UNKNOWN)) {
                                r = fail(c, -EINVAL, "unknown field (in %s)", d->name);
                                goto out;
                        }
                        path_pop(c, old);
                        continue;
                }
                idx = (size_t)(f - d->fields);
                if (seen[idx / 64] & (1ull << (idx % 64))) {
                        r = fail(c, -EINVAL, "field given twice (as \"%s\" and its JSON name)",
                                 f->name);
                        goto out;
                }
                seen[idx / 64] |= 1ull << (idx % 64);
                if (json_object_get_type(val) == json_type_null && !is_value_msg(f)) {
                        path_pop(c, old); /* null: field not set */
                        continue;
                }
                /* (a google.protobuf.Value field set to JSON null becomes NULL_VALUE) */
                r = decode_field(c, d, f, m, val);
                if (r < 0)
                        goto out;
                path_pop(c, old);
        }
out:
        c->depth--;
        return r;
}

int xds_pbjson_decode(const ProtobufCMessageDescriptor *desc, struct json_object *obj,
                      unsigned flags, const char *path_prefix, ProtobufCMessage **ret,
                      const char **reterr_desc)
{
        struct ctx c;
        ProtobufCMessage *m;
        int r;

        ctx_init(&c, flags, path_prefix);
        m = msg_new(desc);
        if (!m) {
                r = fail(&c, -ENOMEM, "out of memory");
                goto err;
        }
        r = decode_into(&c, desc, m, obj, false);
        if (r < 0) {
                xds_pbjson_message_free(m);
                goto err;
        }
        *ret = m;
        return 0;
err:
        if (reterr_desc)
                *reterr_desc = errbuf;
        return r;
}

/* ---- encoding ------------------------------------------------------------------------------- */

static int encode_msg(struct ctx *c, const ProtobufCMessage *m, struct json_object **ret);

static int add(struct ctx *c, struct json_object *obj, const char *key, struct json_object *v)
{
        if (json_object_object_add(obj, key, v) < 0) {
                json_object_put(v);
                return fail(c, -ENOMEM, "out of memory");
        }
        return 0;
}

static struct json_object *new_double(double d)
{
        if (isnan(d))
                return json_object_new_string("NaN");
        if (isinf(d))
                return json_object_new_string(d > 0 ? "Infinity" : "-Infinity");
        return json_object_new_double(d);
}

/* Encodes one value of field f's type stored at src. */
static int encode_one(struct ctx *c, const ProtobufCFieldDescriptor *f, const void *src,
                      struct json_object **ret)
{
        char tmp[32];
        struct json_object *v = NULL;

        switch (f->type) {
        case PROTOBUF_C_TYPE_INT32:
        case PROTOBUF_C_TYPE_SINT32:
        case PROTOBUF_C_TYPE_SFIXED32:
                v = json_object_new_int(*(const int32_t *)src);
                break;
        case PROTOBUF_C_TYPE_UINT32:
        case PROTOBUF_C_TYPE_FIXED32:
                v = json_object_new_int64(*(const uint32_t *)src);
                break;
        case PROTOBUF_C_TYPE_INT64:
        case PROTOBUF_C_TYPE_SINT64:
        case PROTOBUF_C_TYPE_SFIXED64:
                snprintf(tmp, sizeof(tmp), "%" PRId64, *(const int64_t *)src);
                v = json_object_new_string(tmp);
                break;
        case PROTOBUF_C_TYPE_UINT64:
        case PROTOBUF_C_TYPE_FIXED64:
                snprintf(tmp, sizeof(tmp), "%" PRIu64, *(const uint64_t *)src);
                v = json_object_new_string(tmp);
                break;
        case PROTOBUF_C_TYPE_FLOAT:
                v = new_double(*(const float *)src);
                break;
        case PROTOBUF_C_TYPE_DOUBLE:
                v = new_double(*(const double *)src);
                break;
        case PROTOBUF_C_TYPE_BOOL:
                v = json_object_new_boolean(*(const protobuf_c_boolean *)src);
                break;
        case PROTOBUF_C_TYPE_ENUM: {
                int32_t e = *(const int32_t *)src;
                const ProtobufCEnumValue *ev =
                    protobuf_c_enum_descriptor_get_value(f->descriptor, e);
                v = ev ? json_object_new_string(ev->name) : json_object_new_int(e);
                break;
        }
        case PROTOBUF_C_TYPE_STRING: {
                const char *s = *(char *const *)src;
                v = json_object_new_string(s ? s : "");
                break;
        }
        case PROTOBUF_C_TYPE_BYTES: {
                const ProtobufCBinaryData *b = src;
                char *s = b64_encode(b->data, b->len);
                if (!s)
                        return fail(c, -ENOMEM, "out of memory");
                v = json_object_new_string(s);
                wp_free(s);
                break;
        }
        case PROTOBUF_C_TYPE_MESSAGE: {
                const ProtobufCMessage *sub = *(ProtobufCMessage *const *)src;
                if (!sub)
                        return fail(c, -EINVAL, "internal: NULL message");
                return encode_msg(c, sub, ret);
        }
        }
        if (!v)
                return fail(c, -ENOMEM, "out of memory");
        *ret = v;
        return 0;
}

static bool is_default(const ProtobufCFieldDescriptor *f, const void *src)
{
        switch (f->type) {
        case PROTOBUF_C_TYPE_INT32:
        case PROTOBUF_C_TYPE_SINT32:
        case PROTOBUF_C_TYPE_SFIXED32:
        case PROTOBUF_C_TYPE_UINT32:
        case PROTOBUF_C_TYPE_FIXED32:
        case PROTOBUF_C_TYPE_ENUM:
                return *(const uint32_t *)src == 0;
        case PROTOBUF_C_TYPE_INT64:
        case PROTOBUF_C_TYPE_SINT64:
        case PROTOBUF_C_TYPE_SFIXED64:
        case PROTOBUF_C_TYPE_UINT64:
        case PROTOBUF_C_TYPE_FIXED64:
                return *(const uint64_t *)src == 0;
        case PROTOBUF_C_TYPE_FLOAT: {
                float x = *(const float *)src;
                return x == 0 && !signbit(x);
        }
        case PROTOBUF_C_TYPE_DOUBLE: {
                double x = *(const double *)src;
                return x == 0 && !signbit(x);
        }
        case PROTOBUF_C_TYPE_BOOL:
                return *(const protobuf_c_boolean *)src == 0;
        case PROTOBUF_C_TYPE_STRING: {
                const char *s = *(char *const *)src;
                return !s || !*s;
        }
        case PROTOBUF_C_TYPE_BYTES:
                return ((const ProtobufCBinaryData *)src)->len == 0;
        case PROTOBUF_C_TYPE_MESSAGE:
                return *(ProtobufCMessage *const *)src == NULL;
        }
        return true;
}

static int encode_map(struct ctx *c, const ProtobufCFieldDescriptor *f, const ProtobufCMessage *m,
                      struct json_object **ret)
{
        const ProtobufCMessageDescriptor *ed = f->descriptor;
        const ProtobufCFieldDescriptor *kf = &ed->fields[0], *vf = &ed->fields[1];
        size_t n = MEMBER(size_t, m, f->quantifier_offset), i;
        ProtobufCMessage *const *arr = MEMBER(ProtobufCMessage *const *, m, f->offset);
        struct json_object *obj = json_object_new_object();
        int r;

        if (!obj)
                return fail(c, -ENOMEM, "out of memory");
        for (i = 0; i < n; i++) {
                const ProtobufCMessage *e = arr[i];
                const void *kp = MEMBER_PTR(e, kf->offset);
                struct json_object *k = NULL, *v = NULL;
                char keybuf[32];
                const char *key;
                size_t old;

                if (kf->type == PROTOBUF_C_TYPE_STRING) {
                        key = *(char *const *)kp;
                } else if (kf->type == PROTOBUF_C_TYPE_BOOL) {
                        key = *(const protobuf_c_boolean *)kp ? "true" : "false";
                } else {
                        r = encode_one(c, kf, kp, &k);
                        if (r < 0)
                                goto err;
                        snprintf(keybuf, sizeof(keybuf), "%s", json_object_get_string(k));
                        json_object_put(k);
                        key = keybuf;
                }
                old = path_push_key(c, key);
                if (vf->type == PROTOBUF_C_TYPE_MESSAGE &&
                    *(ProtobufCMessage *const *)MEMBER_PTR(e, vf->offset) == NULL)
                        v = json_object_new_object();
                else if ((r = encode_one(c, vf, MEMBER_PTR(e, vf->offset), &v)) < 0)
                        goto err;
                if (!v && !is_value_msg(vf)) {
                        r = fail(c, -ENOMEM, "out of memory");
                        goto err;
                }
                r = add(c, obj, key, v);
                if (r < 0)
                        goto err;
                path_pop(c, old);
        }
        *ret = obj;
        return 0;
err:
        json_object_put(obj);
        return r;
}

static int encode_field(struct ctx *c, const ProtobufCFieldDescriptor *f, const ProtobufCMessage *m,
                        struct json_object **ret)
{
        size_t n, i, sz;
        const uint8_t *arr;
        struct json_object *a;
        int r;

        if (f->label != PROTOBUF_C_LABEL_REPEATED)
                return encode_one(c, f, MEMBER_PTR(m, f->offset), ret);
        if (is_map_field(f))
                return encode_map(c, f, m, ret);
        n = MEMBER(size_t, m, f->quantifier_offset);
        arr = MEMBER(const uint8_t *, m, f->offset);
        sz = elem_size(f->type);
        a = json_object_new_array_ext((int)n);
        if (!a)
                return fail(c, -ENOMEM, "out of memory");
        for (i = 0; i < n; i++) {
                struct json_object *v = NULL;
                size_t old = path_push_index(c, i);
                r = encode_one(c, f, arr + i * sz, &v);
                if (r < 0)
                        goto err;
                if (json_object_array_add(a, v) < 0) {
                        json_object_put(v);
                        r = fail(c, -ENOMEM, "out of memory");
                        goto err;
                }
                path_pop(c, old);
        }
        *ret = a;
        return 0;
err:
        json_object_put(a);
        return r;
}

static int encode_any(struct ctx *c, const Google__Protobuf__Any *any, struct json_object **ret)
{
        const ProtobufCMessageDescriptor *d;
        ProtobufCMessage *inner;
        struct json_object *iv = NULL, *obj = NULL, *t;
        int r;

        if ((!any->type_url || !*any->type_url) && any->value.len == 0) {
                obj = json_object_new_object();
                if (!obj)
                        return fail(c, -ENOMEM, "out of memory");
                *ret = obj;
                return 0;
        }
        d = xds_registry_lookup(any->type_url);
        if (!d)
                return fail(c, -EINVAL, "unknown type URL %s", any->type_url ? any->type_url : "");
        inner = protobuf_c_message_unpack(d, &xds_pb_allocator, any->value.len, any->value.data);
        if (!inner)
                return fail(c, -EINVAL, "Any of type %s does not unpack", any->type_url);
        r = encode_msg(c, inner, &iv);
        xds_pbjson_message_free(inner);
        if (r < 0)
                return r;

        obj = json_object_new_object();
        t = json_object_new_string(any->type_url);
        if (!obj || !t) {
                json_object_put(t);
                r = fail(c, -ENOMEM, "out of memory");
                goto err;
        }
        r = add(c, obj, "@type", t);
        if (r < 0)
                goto err;
        if (wkt_special(d)) {
                r = add(c, obj, "value", iv);
                iv = NULL;
                if (r < 0)
                        goto err;
        } else {
                json_object_object_foreach(iv, key, val)
                {
                        r = add(c, obj, key, json_object_get(val));
                        if (r < 0)
                                goto err;
                }
                json_object_put(iv);
                iv = NULL;
        }
        *ret = obj;
        return 0;
err:
        json_object_put(iv);
        json_object_put(obj);
        return r;
}

static int encode_duration(struct ctx *c, const Google__Protobuf__Duration *du,
                           struct json_object **ret)
{
        char buf[48];
        int64_t s = du->seconds;
        int32_t ns = du->nanos;
        bool neg = s < 0 || ns < 0;
        uint64_t as = s < 0 ? (uint64_t)0 - (uint64_t)s : (uint64_t)s;
        uint32_t ans = ns < 0 ? (uint32_t)(-(int64_t)ns) : (uint32_t)ns;
        struct json_object *v;

        if (ans == 0)
                snprintf(buf, sizeof(buf), "%s%" PRIu64 "s", neg ? "-" : "", as);
        else if (ans % 1000000 == 0)
                snprintf(buf, sizeof(buf), "%s%" PRIu64 ".%03us", neg ? "-" : "", as,
                         ans / 1000000);
        else if (ans % 1000 == 0)
                snprintf(buf, sizeof(buf), "%s%" PRIu64 ".%06us", neg ? "-" : "", as, ans / 1000);
        else
                snprintf(buf, sizeof(buf), "%s%" PRIu64 ".%09us", neg ? "-" : "", as, ans);
        v = json_object_new_string(buf);
        if (!v)
                return fail(c, -ENOMEM, "out of memory");
        *ret = v;
        return 0;
}

static int encode_value(struct ctx *c, const Google__Protobuf__Value *val, struct json_object **ret)
{
        struct json_object *v = NULL;

        switch (val->kind_case) {
        case GOOGLE__PROTOBUF__VALUE__KIND_NULL_VALUE:
        case GOOGLE__PROTOBUF__VALUE__KIND__NOT_SET:
                *ret = NULL; /* JSON null */
                return 0;
        case GOOGLE__PROTOBUF__VALUE__KIND_NUMBER_VALUE:
                v = new_double(val->number_value);
                break;
        case GOOGLE__PROTOBUF__VALUE__KIND_STRING_VALUE:
                v = json_object_new_string(val->string_value ? val->string_value : "");
                break;
        case GOOGLE__PROTOBUF__VALUE__KIND_BOOL_VALUE:
                v = json_object_new_boolean(val->bool_value);
                break;
        case GOOGLE__PROTOBUF__VALUE__KIND_STRUCT_VALUE:
                if (!val->struct_value)
                        v = json_object_new_object();
                else
                        return encode_msg(c, &val->struct_value->base, ret);
                break;
        case GOOGLE__PROTOBUF__VALUE__KIND_LIST_VALUE:
                if (!val->list_value)
                        v = json_object_new_array();
                else
                        return encode_msg(c, &val->list_value->base, ret);
                break;
        default:
                return fail(c, -EINVAL, "Value with unknown kind %d", (int)val->kind_case);
        }
        if (!v)
                return fail(c, -ENOMEM, "out of memory");
        *ret = v;
        return 0;
}

static int encode_generic(struct ctx *c, const ProtobufCMessage *m, struct json_object **ret)
{
        const ProtobufCMessageDescriptor *d = m->descriptor;
        struct json_object *obj = json_object_new_object();
        unsigned i;
        int r;

        if (!obj)
                return fail(c, -ENOMEM, "out of memory");
        for (i = 0; i < d->n_fields; i++) {
                const ProtobufCFieldDescriptor *f = &d->fields[i];
                const void *src = MEMBER_PTR(m, f->offset);
                struct json_object *v = NULL;
                size_t old;

                if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
                        if (MEMBER(uint32_t, m, f->quantifier_offset) != f->id)
                                continue;
                } else if (f->label == PROTOBUF_C_LABEL_REPEATED) {
                        if (MEMBER(size_t, m, f->quantifier_offset) == 0)
                                continue;
                } else if (f->type == PROTOBUF_C_TYPE_MESSAGE) {
                        if (*(ProtobufCMessage *const *)src == NULL)
                                continue;
                } else if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
                           f->type != PROTOBUF_C_TYPE_STRING) {
                        if (!MEMBER(protobuf_c_boolean, m, f->quantifier_offset))
                                continue;
                } else if (!(c->flags & XDS_PBJSON_ENCODE_DEFAULTS) && is_default(f, src)) {
                        continue;
                }
                old = path_push_field(c, f->name);
                r = encode_field(c, f, m, &v);
                if (r < 0)
                        goto err;
                r = add(c, obj, f->name, v);
                if (r < 0)
                        goto err;
                path_pop(c, old);
        }
        *ret = obj;
        return 0;
err:
        json_object_put(obj);
        return r;
}

static int encode_msg(struct ctx *c, const ProtobufCMessage *m, struct json_object **ret)
{
        const ProtobufCMessageDescriptor *d = m->descriptor;
        int r;

        if (c->depth >= XDS_PBJSON_MAX_DEPTH)
                return fail(c, -E2BIG, "nesting deeper than %d messages", XDS_PBJSON_MAX_DEPTH);
        c->depth++;
        switch (wkt_of(d)) {
        case WKT_ANY:
                r = encode_any(c, (const Google__Protobuf__Any *)m, ret);
                break;
        case WKT_DURATION:
                r = encode_duration(c, (const Google__Protobuf__Duration *)m, ret);
                break;
        case WKT_VALUE:
                r = encode_value(c, (const Google__Protobuf__Value *)m, ret);
                break;
        case WKT_STRUCT:
                r = encode_map(c, &d->fields[0], m, ret);
                break;
        case WKT_LIST:
                r = encode_field(c, &d->fields[0], m, ret);
                break;
        case WKT_WRAPPER:
                r = encode_one(c, &d->fields[0], MEMBER_PTR(m, d->fields[0].offset), ret);
                break;
        default:
                r = encode_generic(c, m, ret);
                break;
        }
        c->depth--;
        return r;
}

int xds_pbjson_encode(const ProtobufCMessage *msg, unsigned flags, struct json_object **ret,
                      const char **reterr_desc)
{
        struct ctx c;
        struct json_object *v = NULL;
        int r;

        ctx_init(&c, flags, NULL);
        r = encode_msg(&c, msg, &v);
        if (r < 0) {
                if (reterr_desc)
                        *reterr_desc = errbuf;
                return r;
        }
        *ret = v;
        return 0;
}

/* ---- Any helpers ---------------------------------------------------------------------------- */

int xds_pb_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                  ProtobufCMessage **ret, const char **reterr_desc)
{
        ProtobufCMessage *m;

        m = protobuf_c_message_unpack(desc, &xds_pb_allocator, len, data);
        if (!m) {
                /* protobuf-c does not say why; an allocation failure looks the same. */
                if (reterr_desc)
                        *reterr_desc =
                            (fail_plain(-EINVAL, "cannot parse %s (%zu bytes)", desc->name, len),
                             errbuf);
                return -EINVAL;
        }
        *ret = m;
        return 0;
}

int xds_any_unpack(const Google__Protobuf__Any *any, const ProtobufCMessageDescriptor *expect,
                   ProtobufCMessage **ret, const char **reterr_desc)
{
        const ProtobufCMessageDescriptor *d;
        const char *url = any && any->type_url ? any->type_url : "";

        if (!any) {
                if (reterr_desc)
                        *reterr_desc = "missing Any";
                return -EINVAL;
        }
        d = xds_registry_lookup(url);
        if (!d) {
                fail_plain(-EINVAL, "unknown type URL %s", url);
                if (reterr_desc)
                        *reterr_desc = errbuf;
                return -EINVAL;
        }
        if (expect && d != expect) {
                fail_plain(-EINVAL, "expected type %s, got %s", expect->name, url);
                if (reterr_desc)
                        *reterr_desc = errbuf;
                return -EINVAL;
        }
        return xds_pb_unpack(d, any->value.data, any->value.len, ret, reterr_desc);
}

/* ---- JSON text ------------------------------------------------------------------------------ */

int xds_json_parse(const char *text, size_t len, struct json_object **ret, const char **reterr_desc)
{
        struct json_tokener *tok;
        struct json_object *v;
        enum json_tokener_error jerr;
        size_t end;
        int r;

        if (len > XDS_PBJSON_MAX_TEXT) {
                r = fail_plain(-E2BIG, "JSON text larger than %u bytes", XDS_PBJSON_MAX_TEXT);
                goto err;
        }
        if (memchr(text, 0, len)) {
                r = fail_plain(-EINVAL, "JSON text contains a NUL byte");
                goto err;
        }
        tok = json_tokener_new_ex(XDS_PBJSON_MAX_TEXT_DEPTH);
        if (!tok) {
                r = fail_plain(-ENOMEM, "out of memory");
                goto err;
        }
        v = json_tokener_parse_ex(tok, text, (int)len);
        jerr = json_tokener_get_error(tok);
        end = json_tokener_get_parse_end(tok);
        if (jerr == json_tokener_continue) {
                /* A complete top-level number may still be waiting for a delimiter. */
                v = json_tokener_parse_ex(tok, "", 1);
                jerr = json_tokener_get_error(tok);
                if (jerr != json_tokener_success || !v) {
                        json_object_put(v);
                        json_tokener_free(tok);
                        r = fail_plain(-EINVAL, "JSON: unexpected end of input (truncated?)");
                        goto err;
                }
                end = len;
        }
        if (jerr != json_tokener_success) {
                r = fail_plain(jerr == json_tokener_error_depth ? -E2BIG : -EINVAL,
                               "JSON: %s at offset %zu", json_tokener_error_desc(jerr), end);
                json_tokener_free(tok);
                goto err;
        }
        json_tokener_free(tok);
        for (; end < len; end++) {
                if (!isspace((unsigned char)text[end])) {
                        json_object_put(v);
                        r = fail_plain(-EINVAL, "JSON: trailing data at offset %zu", end);
                        goto err;
                }
        }
        *ret = v;
        return 0;
err:
        if (reterr_desc)
                *reterr_desc = errbuf;
        return r;
}

/* ---- YAML text ------------------------------------------------------------------------------ */

struct yframe {
        struct json_object *node; /* object or array (borrowed: owned by parent or root) */
        char *key;                /* pending mapping key, or NULL */
};

static bool match_int(const char *s, int base)
{
        const char *p = s;

        if (base == 10 && (*p == '-' || *p == '+'))
                p++;
        if (!*p)
                return false;
        for (; *p; p++) {
                if (base == 10 && !isdigit((unsigned char)*p))
                        return false;
                if (base == 8 && (*p < '0' || *p > '7'))
                        return false;
                if (base == 16 && !isxdigit((unsigned char)*p))
                        return false;
        }
        return true;
}

/* YAML 1.2 core schema float: [-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)? */
static bool match_float(const char *s)
{
        const char *p = s;
        bool digits = false;

        if (*p == '-' || *p == '+')
                p++;
        while (isdigit((unsigned char)*p)) {
                p++;
                digits = true;
        }
        if (*p == '.') {
                p++;
                while (isdigit((unsigned char)*p)) {
                        p++;
                        digits = true;
                }
        }
        if (!digits)
                return false;
        if (*p == 'e' || *p == 'E') {
                p++;
                if (*p == '-' || *p == '+')
                        p++;
                if (!isdigit((unsigned char)*p))
                        return false;
                while (isdigit((unsigned char)*p))
                        p++;
        }
        return *p == 0;
}

static int yaml_scalar(const yaml_event_t *ev, struct json_object **ret)
{
        const char *s = (const char *)ev->data.scalar.value;
        size_t n = ev->data.scalar.length;
        const char *tag = (const char *)ev->data.scalar.tag;
        struct json_object *v;

        if (memchr(s, 0, n))
                return fail_plain(-EINVAL, "YAML: NUL character in scalar at line %zu",
                                  ev->start_mark.line + 1);
        if ((tag && strcmp(tag, YAML_STR_TAG) == 0) ||
            ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE) {
                v = json_object_new_string_len(s, (int)n);
                goto out;
        }
        if (tag && strcmp(tag, "!") != 0)
                return fail_plain(-EINVAL, "YAML: unsupported tag %s at line %zu", tag,
                                  ev->start_mark.line + 1);
        if (n == 0 || !strcmp(s, "~") || !strcmp(s, "null") || !strcmp(s, "Null") ||
            !strcmp(s, "NULL")) {
                *ret = NULL;
                return 0;
        }
        if (!strcmp(s, "true") || !strcmp(s, "True") || !strcmp(s, "TRUE")) {
                v = json_object_new_boolean(1);
                goto out;
        }
        if (!strcmp(s, "false") || !strcmp(s, "False") || !strcmp(s, "FALSE")) {
                v = json_object_new_boolean(0);
                goto out;
        }
        if (match_int(s, 10) || (s[0] == '0' && s[1] == 'o' && match_int(s + 2, 8)) ||
            (s[0] == '0' && s[1] == 'x' && match_int(s + 2, 16))) {
                int base = s[1] == 'o' ? 8 : s[1] == 'x' ? 16 : 10;
                const char *digits = base == 10 ? s : s + 2;
                char *end;
                errno = 0;
                if (base == 10 && *digits == '-') {
                        long long ll = strtoll(digits, &end, 10);
                        v = errno ? json_object_new_string(s) : json_object_new_int64(ll);
                } else {
                        unsigned long long ull = strtoull(digits, &end, base);
                        if (errno)
                                v = json_object_new_string(s); /* too big: let the codec say so */
                        else if (ull <= (unsigned long long)INT64_MAX)
                                v = json_object_new_int64((int64_t)ull);
                        else
                                v = json_object_new_uint64(ull);
                }
                goto out;
        }
        if (match_float(s)) {
                v = json_object_new_double(strtod(s, NULL));
                goto out;
        }
        if (!strcmp(s, ".inf") || !strcmp(s, ".Inf") || !strcmp(s, ".INF") || !strcmp(s, "+.inf") ||
            !strcmp(s, "+.Inf") || !strcmp(s, "+.INF")) {
                v = json_object_new_double(INFINITY);
                goto out;
        }
        if (!strcmp(s, "-.inf") || !strcmp(s, "-.Inf") || !strcmp(s, "-.INF")) {
                v = json_object_new_double(-INFINITY);
                goto out;
        }
        if (!strcmp(s, ".nan") || !strcmp(s, ".NaN") || !strcmp(s, ".NAN")) {
                v = json_object_new_double(NAN);
                goto out;
        }
        v = json_object_new_string_len(s, (int)n);
out:
        if (!v)
                return fail_plain(-ENOMEM, "out of memory");
        *ret = v;
        return 0;
}

/* Attaches v (ownership passes, even on failure) to the innermost open container. */
static int yaml_attach(struct yframe *top, struct json_object *v, size_t line)
{
        if (json_object_is_type(top->node, json_type_array)) {
                if (json_object_array_add(top->node, v) < 0) {
                        json_object_put(v);
                        return fail_plain(-ENOMEM, "out of memory");
                }
                return 0;
        }
        if (json_object_object_add(top->node, top->key, v) < 0) {
                json_object_put(v);
                return fail_plain(-ENOMEM, "out of memory");
        }
        wp_free(top->key);
        top->key = NULL;
        (void)line;
        return 0;
}

int xds_yaml_parse(const char *text, size_t len, struct json_object **ret, const char **reterr_desc)
{
        struct yframe stack[XDS_PBJSON_MAX_TEXT_DEPTH];
        struct json_object *root = NULL;
        yaml_parser_t parser;
        yaml_event_t ev;
        size_t depth = 0, docs = 0;
        bool done = false, have_root = false;
        int r = 0;

        if (len > XDS_PBJSON_MAX_TEXT) {
                r = fail_plain(-E2BIG, "YAML text larger than %u bytes", XDS_PBJSON_MAX_TEXT);
                goto err;
        }
        if (!yaml_parser_initialize(&parser)) {
                r = fail_plain(-ENOMEM, "out of memory");
                goto err;
        }
        yaml_parser_set_input_string(&parser, (const unsigned char *)text, len);

        while (!done) {
                struct json_object *v = NULL;
                size_t line;

                if (!yaml_parser_parse(&parser, &ev)) {
                        r = fail_plain(parser.error == YAML_MEMORY_ERROR ? -ENOMEM : -EINVAL,
                                       "YAML: %s at line %zu column %zu",
                                       parser.problem ? parser.problem : "syntax error",
                                       parser.problem_mark.line + 1,
                                       parser.problem_mark.column + 1);
                        goto err_parser;
                }
                line = ev.start_mark.line + 1;
                switch (ev.type) {
                case YAML_STREAM_END_EVENT:
                        done = true;
                        break;
                case YAML_DOCUMENT_START_EVENT:
                        if (++docs > 1) {
                                r = fail_plain(-EINVAL, "YAML: more than one document (line %zu)",
                                               line);
                                goto err_event;
                        }
                        break;
                case YAML_ALIAS_EVENT:
                        r = fail_plain(-EINVAL, "YAML: aliases are not supported (line %zu)", line);
                        goto err_event;
                case YAML_SCALAR_EVENT:
                        if (depth > 0 &&
                            json_object_is_type(stack[depth - 1].node, json_type_object) &&
                            !stack[depth - 1].key) {
                                struct json_object *dummy;
                                const char *k = (const char *)ev.data.scalar.value;
                                if (strlen(k) != ev.data.scalar.length) {
                                        r = fail_plain(-EINVAL, "YAML: NUL in key at line %zu",
                                                       line);
                                        goto err_event;
                                }
                                if (json_object_object_get_ex(stack[depth - 1].node, k, &dummy)) {
                                        r = fail_plain(-EINVAL,
                                                       "YAML: duplicate key \"%s\" at line %zu", k,
                                                       line);
                                        goto err_event;
                                }
                                stack[depth - 1].key = wp_strdup(k);
                                if (!stack[depth - 1].key) {
                                        r = fail_plain(-ENOMEM, "out of memory");
                                        goto err_event;
                                }
                                break;
                        }
                        r = yaml_scalar(&ev, &v);
                        if (r < 0)
                                goto err_event;
                        goto attach;
                case YAML_MAPPING_START_EVENT:
                case YAML_SEQUENCE_START_EVENT:
                        if (depth > 0 &&
                            json_object_is_type(stack[depth - 1].node, json_type_object) &&
                            !stack[depth - 1].key) {
                                r = fail_plain(-EINVAL, "YAML: non-scalar mapping key at line %zu",
                                               line);
                                goto err_event;
                        }
                        if (depth >= XDS_PBJSON_MAX_TEXT_DEPTH) {
                                r = fail_plain(-E2BIG, "YAML: nesting deeper than %d at line %zu",
                                               XDS_PBJSON_MAX_TEXT_DEPTH, line);
                                goto err_event;
                        }
                        v = ev.type == YAML_MAPPING_START_EVENT ? json_object_new_object()
                                                                : json_object_new_array();
                        if (!v) {
                                r = fail_plain(-ENOMEM, "out of memory");
                                goto err_event;
                        }
                        stack[depth].node = v;
                        stack[depth].key = NULL;
                        depth++;
                        if (depth == 1) {
                                root = v;
                                have_root = true;
                                break;
                        }
                        r = yaml_attach(&stack[depth - 2], v, line);
                        if (r < 0) {
                                depth--;
                                goto err_event;
                        }
                        break;
                case YAML_MAPPING_END_EVENT:
                case YAML_SEQUENCE_END_EVENT:
                        depth--;
                        wp_free(stack[depth].key);
                        stack[depth].key = NULL;
                        break;
                default:
                        break;
                }
                yaml_event_delete(&ev);
                continue;
        attach:
                if (depth == 0) {
                        if (have_root) {
                                json_object_put(v);
                                r = fail_plain(-EINVAL, "YAML: unexpected scalar at line %zu",
                                               line);
                                goto err_event;
                        }
                        root = v;
                        have_root = true;
                } else {
                        r = yaml_attach(&stack[depth - 1], v, line);
                        if (r < 0)
                                goto err_event;
                }
                yaml_event_delete(&ev);
        }
        yaml_parser_delete(&parser);
        if (!have_root) {
                r = fail_plain(-EINVAL, "YAML: empty document");
                goto err;
        }
        *ret = root;
        return 0;

err_event:
        yaml_event_delete(&ev);
err_parser:
        while (depth > 0) {
                depth--;
                wp_free(stack[depth].key);
        }
        yaml_parser_delete(&parser);
err:
        json_object_put(root);
        if (reterr_desc)
                *reterr_desc = errbuf;
        return r;
}
