/*
 * Istio standard metrics for the waypoint: per-worker shards, bounded label sets, Prometheus
 * text rendering. See metrics.h for the model (threading, cardinality, label order).
 *
 * Layout of one shard (written by its worker thread only):
 *   - an arena of 64 KiB chunks holding series and interned strings (never moves, freed with
 *     the registry);
 *   - per family (HTTP, TCP): an open-addressing index (worker-private) from label-tuple hash
 *     to series number, and a chunked directory of series pointers whose filled prefix is
 *     published to the scraper with a release store of n_pub;
 *   - a string-intern table (worker-private) so the label strings of many series are stored
 *     once.
 * The scraper reads only published series: their label pointers (immutable after
 * publication) and their counter words (relaxed atomic loads; the worker writes them with
 * relaxed load + store, which is a plain 64-bit store on x86_64/aarch64, never torn).
 */
#include "waypoint/metrics.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

#include "waypoint/base/alloc.h"

enum { FAM_HTTP, FAM_TCP, NFAM };

/* Envoy's default histogram buckets (Stats::HistogramSettingsImpl::defaultBuckets), used by
 * istio_stats for the duration (ms) and size (bytes) histograms. Observations are whole
 * numbers, so "v <= 0.5" is "v == 0" and the rest compare as integers. */
#define NBOUNDS 19
#define NSLOTS  (NBOUNDS + 1) /* + Inf */
static const uint64_t int_bounds[NBOUNDS - 1] = {1,     5,     10,     25,     50,      100,
                                                 250,   500,   1000,   2500,   5000,    10000,
                                                 30000, 60000, 300000, 600000, 1800000, 3600000};
/* A string literal with its length, for the renderer's fixed pieces (no strlen per line),
 * padded so that it is copied with one fixed-size (inlined) move. LIT() fails to compile (a
 * negative array size) when x does not fit. */
#define LIT_MAX 48
struct lit {
        char s[LIT_MAX];
        size_t n;
};
#define LIT(x)                                                                                     \
        {                                                                                          \
                x, sizeof(x) - 1 + 0 * sizeof(char[LIT_MAX + 1 - sizeof(x)])                       \
        }

/* What follows the labels on a bucket line: the bound, as Envoy prints it, and the brace. */
static const struct lit le_text[NSLOTS] = {
        LIT(",le=\"0.5\"} "),     LIT(",le=\"1\"} "),      LIT(",le=\"5\"} "),
        LIT(",le=\"10\"} "),      LIT(",le=\"25\"} "),     LIT(",le=\"50\"} "),
        LIT(",le=\"100\"} "),     LIT(",le=\"250\"} "),    LIT(",le=\"500\"} "),
        LIT(",le=\"1000\"} "),    LIT(",le=\"2500\"} "),   LIT(",le=\"5000\"} "),
        LIT(",le=\"10000\"} "),   LIT(",le=\"30000\"} "),  LIT(",le=\"60000\"} "),
        LIT(",le=\"300000\"} "),  LIT(",le=\"600000\"} "), LIT(",le=\"1800000\"} "),
        LIT(",le=\"3600000\"} "), LIT(",le=\"+Inf\"} "),
};

/* Value words of a series. HTTP: requests, then 3 histograms of NSLOTS buckets + sum. */
enum { HIST_DURATION, HIST_REQ_BYTES, HIST_RESP_BYTES, NHIST };
#define HV_REQUESTS   0
#define HV_HIST(h)    (1 + (h) * (NSLOTS + 1))
#define N_HTTP_VALUES (1 + NHIST * (NSLOTS + 1))
enum { TV_OPENED, TV_CLOSED, TV_SENT, TV_RECEIVED, N_TCP_VALUES };

static const unsigned n_values[NFAM] = {N_HTTP_VALUES, N_TCP_VALUES};

/* The text before each label value: separator, name, opening quote. */
static const struct lit label_open[_WP_ML_MAX] = {
        LIT(",source_workload=\""),
        LIT(",source_canonical_service=\""),
        LIT(",source_canonical_revision=\""),
        LIT(",source_workload_namespace=\""),
        LIT(",source_principal=\""),
        LIT(",source_app=\""),
        LIT(",source_version=\""),
        LIT(",source_cluster=\""),
        LIT(",destination_workload=\""),
        LIT(",destination_workload_namespace=\""),
        LIT(",destination_principal=\""),
        LIT(",destination_app=\""),
        LIT(",destination_version=\""),
        LIT(",destination_service=\""),
        LIT(",destination_canonical_service=\""),
        LIT(",destination_canonical_revision=\""),
        LIT(",destination_service_name=\""),
        LIT(",destination_service_namespace=\""),
        LIT(",destination_cluster=\""),
        LIT(",request_protocol=\""),
        LIT(",response_flags=\""),
        LIT(",connection_security_policy=\""),
};

#define ARENA_CHUNK (64u * 1024u)
#define DIR_CHUNK   256u

/* An interned string: immutable once created. */
struct istr {
        uint64_t hash;
        uint32_t len;
        bool plain; /* no byte the text format escapes: backslash, quote, newline */
        char s[];
};

struct series {
        uint64_t hash;
        const struct istr *lv[_WP_ML_MAX];
        uint32_t code; /* HTTP only */
        int32_t grpc;  /* HTTP only; -1 = none */
        uint8_t fam;
        uint8_t discard;
        uint64_t v[]; /* n_values[fam] words */
};

struct achunk {
        struct achunk *next;
        size_t used, cap;
        _Alignas(16) char mem[];
};

struct fam_table {
        uint32_t *slots;      /* series number + 1; 0 = empty */
        uint32_t mask;        /* slot count - 1, or 0 when slots == NULL */
        uint32_t n;           /* series stored in this shard */
        uint32_t n_pub;       /* published prefix of dir (release store / acquire load) */
        struct series ***dir; /* n_dir chunk pointers of DIR_CHUNK series each */
        uint32_t n_dir;
};

struct intern {
        struct istr **slots;
        uint32_t mask, n;
};

struct wp_metrics_shard {
        struct wp_metrics *m;
        struct fam_table fam[NFAM];
        struct intern in;
        struct achunk *arena;
        uint64_t overflow[NFAM]; /* relaxed atomics: written here, read by the scraper */
        uint64_t bytes;          /* idem: heap bytes held by this shard */
        uint64_t intern_bytes;   /* idem */
        char *scratch;           /* _WP_ML_MAX * max_value_len: sanitised label values */
        struct series *discard;  /* TCP sink for dropped opens */
};

struct wp_metrics {
        unsigned n_shards;
        uint32_t max_series, max_value_len;
        uint64_t seed;
        struct wp_mstr def[NFAM][_WP_ML_MAX];
        char *istio_version, *local_namespace, *local_cluster;
        uint32_t n_series[NFAM]; /* global cap accounting (atomic, slow path only) */
        struct wp_metrics_shard **shards;
};

/* Relaxed single-writer counter update: load + add + store, no read-modify-write atomic. */
#define CTR_ADD(w, d)                                                                              \
        __atomic_store_n(&(w), __atomic_load_n(&(w), __ATOMIC_RELAXED) + (d), __ATOMIC_RELAXED)
#define CTR_GET(w) __atomic_load_n(&(w), __ATOMIC_RELAXED)

static struct wp_mstr mstr(const char *s)
{
        struct wp_mstr v = {s, (uint32_t)strlen(s)};
        return v;
}

/* ---- hashing ---- */

static inline uint64_t mum(uint64_t a, uint64_t b)
{
        __uint128_t r = (__uint128_t)a * b;
        return (uint64_t)r ^ (uint64_t)(r >> 64);
}

/* Hashes n bytes; *ret_high gets the OR of every byte (so the caller learns, for free,
 * whether the value is plain ASCII). */
static uint64_t hash_bytes_hi(uint64_t seed, const char *p, size_t n, uint64_t *ret_high)
{
        uint64_t h = seed ^ mum(n + 0x9e3779b97f4a7c15ull, 0xa0761d6478bd642full);
        uint64_t w, hi = 0;

        while (n >= 8) {
                memcpy(&w, p, 8);
                hi |= w;
                h = mum(h ^ w, 0xe7037ed1a0b428dbull);
                p += 8;
                n -= 8;
        }
        if (n >= 4) { /* two overlapping 4-byte loads cover the 4..7 tail bytes */
                uint32_t a, b;

                memcpy(&a, p, 4);
                memcpy(&b, p + n - 4, 4);
                w = ((uint64_t)a << 32) | b;
        } else if (n) {
                w = ((uint64_t)(unsigned char)p[0] << 16) |
                    ((uint64_t)(unsigned char)p[n / 2] << 8) | (unsigned char)p[n - 1];
        } else {
                w = 0;
        }
        hi |= w;
        *ret_high = hi;
        return mum(h ^ w, 0x8ebc6af09c88c6e3ull);
}

static uint64_t hash_bytes(uint64_t seed, const char *p, size_t n)
{
        uint64_t hi;

        return hash_bytes_hi(seed, p, n, &hi);
}

static inline uint64_t hash_combine(uint64_t h, uint64_t x)
{
        return mum(h ^ x, 0x589965cc75374cc3ull);
}

/* ---- UTF-8 ---- */

/* Length of the valid UTF-8 sequence at p[0..n), or 0 when invalid (RFC 3629: no overlongs,
 * no surrogates, nothing above U+10FFFF). */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
        unsigned c = p[0];

        if (c < 0x80)
                return 1;
        if (c >= 0xc2 && c <= 0xdf)
                return n >= 2 && (p[1] & 0xc0) == 0x80 ? 2 : 0;
        if (c >= 0xe0 && c <= 0xef) {
                if (n < 3 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80)
                        return 0;
                if (c == 0xe0 && p[1] < 0xa0)
                        return 0;
                if (c == 0xed && p[1] > 0x9f)
                        return 0;
                return 3;
        }
        if (c >= 0xf0 && c <= 0xf4) {
                if (n < 4 || (p[1] & 0xc0) != 0x80 || (p[2] & 0xc0) != 0x80 ||
                    (p[3] & 0xc0) != 0x80)
                        return 0;
                if (c == 0xf0 && p[1] < 0x90)
                        return 0;
                if (c == 0xf4 && p[1] > 0x8f)
                        return 0;
                return 4;
        }
        return 0;
}

static bool utf8_valid(const char *s, size_t n)
{
        const unsigned char *p = (const unsigned char *)s;
        size_t i = 0, k;

        while (i < n) {
                k = utf8_seq(p + i, n - i);
                if (!k)
                        return false;
                i += k;
        }
        return true;
}

/* Copies s into out (capacity cap), replacing each invalid byte with U+FFFD and stopping
 * before a character that would not fit. Returns the output length. */
static uint32_t utf8_sanitise(const char *s, size_t n, char *out, uint32_t cap)
{
        const unsigned char *p = (const unsigned char *)s;
        size_t i = 0, k;
        uint32_t o = 0;

        while (i < n) {
                k = utf8_seq(p + i, n - i);
                if (k) {
                        if (o + k > cap)
                                break;
                        memcpy(out + o, p + i, k);
                        o += (uint32_t)k;
                        i += k;
                } else {
                        if (o + 3 > cap)
                                break;
                        memcpy(out + o, "\xef\xbf\xbd", 3);
                        o += 3;
                        i++;
                }
        }
        return o;
}

/* ---- arena ---- */

static void shard_account(struct wp_metrics_shard *sh, int64_t d)
{
        CTR_ADD(sh->bytes, (uint64_t)d);
}

static void *arena_alloc(struct wp_metrics_shard *sh, size_t n)
{
        struct achunk *c = sh->arena;
        void *p;

        n = (n + 15) & ~(size_t)15;
        if (!c || c->cap - c->used < n) {
                size_t cap = n > ARENA_CHUNK ? n : ARENA_CHUNK;

                c = wp_malloc(sizeof(*c) + cap);
                if (!c)
                        return NULL;
                c->next = sh->arena;
                c->used = 0;
                c->cap = cap;
                sh->arena = c;
                shard_account(sh, (int64_t)(sizeof(*c) + cap));
        }
        p = c->mem + c->used;
        c->used += n;
        return p;
}

/* ---- interning (worker-private table; strings immutable) ---- */

static int intern_grow(struct wp_metrics_shard *sh)
{
        struct intern *in = &sh->in;
        uint32_t size = in->slots ? (in->mask + 1) * 2 : 256, i, j;
        struct istr **slots = wp_calloc(size, sizeof(*slots));

        if (!slots)
                return -ENOMEM;
        if (in->slots) {
                for (i = 0; i <= in->mask; i++) {
                        struct istr *s = in->slots[i];

                        if (!s)
                                continue;
                        for (j = (uint32_t)s->hash & (size - 1); slots[j]; j = (j + 1) & (size - 1))
                                ;
                        slots[j] = s;
                }
                shard_account(sh, -(int64_t)((in->mask + 1) * sizeof(*slots)));
                wp_free(in->slots);
        }
        shard_account(sh, (int64_t)(size * sizeof(*slots)));
        in->slots = slots;
        in->mask = size - 1;
        return 0;
}

/* True when s holds a byte the text format escapes in a label value. */
static bool needs_escape(const char *s, size_t n)
{
        size_t i;

        for (i = 0; i < n; i++) {
                if (s[i] == '\\' || s[i] == '"' || s[i] == '\n')
                        return true;
        }
        return false;
}

static const struct istr *intern(struct wp_metrics_shard *sh, const struct wp_mstr *v, uint64_t h)
{
        struct intern *in = &sh->in;
        struct istr *s;
        uint32_t i;

        if (in->slots) {
                for (i = (uint32_t)h & in->mask; (s = in->slots[i]); i = (i + 1) & in->mask) {
                        if (s->hash == h && s->len == v->n && memcmp(s->s, v->p, v->n) == 0)
                                return s;
                }
        }
        if ((!in->slots || (in->n + 1) * 2 > in->mask + 1) && intern_grow(sh) < 0)
                return NULL;
        s = arena_alloc(sh, sizeof(*s) + v->n + 1);
        if (!s)
                return NULL;
        s->hash = h;
        s->len = v->n;
        s->plain = !needs_escape(v->p, v->n);
        if (v->n)
                memcpy(s->s, v->p, v->n);
        s->s[v->n] = 0;
        for (i = (uint32_t)h & in->mask; in->slots[i]; i = (i + 1) & in->mask)
                ;
        in->slots[i] = s;
        in->n++;
        CTR_ADD(sh->intern_bytes, sizeof(*s) + v->n + 1);
        return s;
}

/* ---- label resolution ---- */

struct key {
        struct wp_mstr v[_WP_ML_MAX];
        uint64_t lh[_WP_ML_MAX];
        uint64_t hash;
        uint32_t code;
        int32_t grpc;
};

/* Applies defaults, truncation and UTF-8 repair, and hashes the tuple. */
static void resolve(struct wp_metrics_shard *sh, const struct wp_metrics_labels *l, int fam,
                    uint32_t code, int32_t grpc, struct key *k)
{
        const struct wp_metrics *m = sh->m;
        uint64_t h = m->seed ^ (uint64_t)fam, high;
        unsigned i;

        for (i = 0; i < _WP_ML_MAX; i++) {
                struct wp_mstr v = l && l->v[i].p ? l->v[i] : m->def[fam][i];

                if (v.n > m->max_value_len) {
                        uint32_t n = m->max_value_len;

                        /* cut at a character boundary when the value is UTF-8 */
                        while (n > 0 && ((unsigned char)v.p[n] & 0xc0) == 0x80 &&
                               m->max_value_len - n < 3)
                                n--;
                        v.n = n;
                }
                k->lh[i] = hash_bytes_hi(m->seed, v.p, v.n, &high);
                if ((high & 0x8080808080808080ull) && !utf8_valid(v.p, v.n)) {
                        char *out = sh->scratch + (size_t)i * m->max_value_len;

                        v.n = utf8_sanitise(v.p, v.n, out, m->max_value_len);
                        v.p = out;
                        k->lh[i] = hash_bytes(m->seed, v.p, v.n);
                }
                k->v[i] = v;
                h = hash_combine(h, k->lh[i]);
        }
        k->code = code;
        k->grpc = grpc;
        if (fam == FAM_HTTP)
                h = hash_combine(h, ((uint64_t)code << 32) | (uint32_t)grpc);
        k->hash = h;
}

static inline struct series *dir_get(const struct fam_table *t, uint32_t idx)
{
        return t->dir[idx / DIR_CHUNK][idx % DIR_CHUNK];
}

static bool series_eq(const struct series *s, const struct key *k)
{
        unsigned i;

        if (s->hash != k->hash || s->code != k->code || s->grpc != k->grpc)
                return false;
        for (i = 0; i < _WP_ML_MAX; i++) {
                const struct istr *a = s->lv[i];

                if (a->len != k->v[i].n || memcmp(a->s, k->v[i].p, a->len) != 0)
                        return false;
        }
        return true;
}

static struct series *lookup(const struct fam_table *t, const struct key *k)
{
        uint32_t i, e;

        if (!t->slots)
                return NULL;
        for (i = (uint32_t)k->hash & t->mask; (e = t->slots[i]); i = (i + 1) & t->mask) {
                struct series *s = dir_get(t, e - 1);

                if (series_eq(s, k))
                        return s;
        }
        return NULL;
}

static int table_grow(struct wp_metrics_shard *sh, struct fam_table *t)
{
        uint32_t size = t->slots ? (t->mask + 1) * 2 : 64, i, j;
        uint32_t *slots = wp_calloc(size, sizeof(*slots));

        if (!slots)
                return -ENOMEM;
        if (t->slots) {
                for (i = 0; i <= t->mask; i++) {
                        uint32_t e = t->slots[i];

                        if (!e)
                                continue;
                        for (j = (uint32_t)dir_get(t, e - 1)->hash & (size - 1); slots[j];
                             j = (j + 1) & (size - 1))
                                ;
                        slots[j] = e;
                }
                shard_account(sh, -(int64_t)((t->mask + 1) * sizeof(*slots)));
                wp_free(t->slots);
        }
        shard_account(sh, (int64_t)(size * sizeof(*slots)));
        t->slots = slots;
        t->mask = size - 1;
        return 0;
}

/* Slow path: a label set this shard has not seen. */
static int create(struct wp_metrics_shard *sh, int fam, const struct key *k, struct series **ret)
{
        struct wp_metrics *m = sh->m;
        struct fam_table *t = &sh->fam[fam];
        struct series *s;
        uint32_t idx = t->n, c, i;
        int r = -ENOMEM;

        if (__atomic_fetch_add(&m->n_series[fam], 1, __ATOMIC_RELAXED) >= m->max_series) {
                r = -ENOSPC;
                goto err_uncount;
        }
        if ((!t->slots || (t->n + 1) * 2 > t->mask + 1) && table_grow(sh, t) < 0)
                goto err_uncount;
        c = idx / DIR_CHUNK;
        if (c >= t->n_dir) { /* cannot happen: the global cap bounds every shard */
                r = -ENOSPC;
                goto err_uncount;
        }
        if (!t->dir[c]) {
                t->dir[c] = wp_calloc(DIR_CHUNK, sizeof(struct series *));
                if (!t->dir[c])
                        goto err_uncount;
                shard_account(sh, DIR_CHUNK * sizeof(struct series *));
        }
        s = arena_alloc(sh, sizeof(*s) + n_values[fam] * sizeof(uint64_t));
        if (!s)
                goto err_uncount;
        memset(s, 0, sizeof(*s) + n_values[fam] * sizeof(uint64_t));
        for (i = 0; i < _WP_ML_MAX; i++) {
                s->lv[i] = intern(sh, &k->v[i], k->lh[i]);
                if (!s->lv[i])
                        goto err_uncount; /* s stays in the arena, unreachable until free */
        }
        s->hash = k->hash;
        s->code = k->code;
        s->grpc = k->grpc;
        s->fam = (uint8_t)fam;
        t->dir[c][idx % DIR_CHUNK] = s;
        for (i = (uint32_t)k->hash & t->mask; t->slots[i]; i = (i + 1) & t->mask)
                ;
        t->slots[i] = idx + 1;
        t->n = idx + 1;
        /* publish: everything written above happens-before the scraper's acquire load */
        __atomic_store_n(&t->n_pub, t->n, __ATOMIC_RELEASE);
        *ret = s;
        return 0;

err_uncount:
        __atomic_fetch_sub(&m->n_series[fam], 1, __ATOMIC_RELAXED);
        return r;
}

static int find_or_create(struct wp_metrics_shard *sh, int fam, const struct key *k,
                          struct series **ret)
{
        struct series *s = lookup(&sh->fam[fam], k);

        if (s) {
                *ret = s;
                return 0;
        }
        return create(sh, fam, k, ret);
}

static inline unsigned bucket_of(uint64_t v)
{
        unsigned lo = 0, hi = NBOUNDS - 1;

        if (v == 0)
                return 0;
        /* first int_bounds[i] >= v -> slot i + 1; none -> +Inf slot */
        while (lo < hi) {
                unsigned mid = (lo + hi) / 2;

                if (int_bounds[mid] >= v)
                        hi = mid;
                else
                        lo = mid + 1;
        }
        return lo + 1;
}

static inline void hist_observe(struct series *s, int h, uint64_t v)
{
        uint64_t *base = &s->v[HV_HIST(h)];

        CTR_ADD(base[bucket_of(v)], 1);
        CTR_ADD(base[NSLOTS], v);
}

int wp_metrics_record_http(struct wp_metrics_shard *sh, const struct wp_metrics_labels *l,
                           const struct wp_metrics_http *obs)
{
        struct series *s;
        struct key k;
        int32_t grpc = obs->grpc_status < 0 ? -1 : obs->grpc_status;
        int r;

        resolve(sh, l, FAM_HTTP, obs->response_code, grpc, &k);
        r = find_or_create(sh, FAM_HTTP, &k, &s);
        if (r < 0) {
                CTR_ADD(sh->overflow[FAM_HTTP], 1);
                return r;
        }
        CTR_ADD(s->v[HV_REQUESTS], 1);
        hist_observe(s, HIST_DURATION, obs->duration_ms);
        hist_observe(s, HIST_REQ_BYTES, obs->request_bytes);
        hist_observe(s, HIST_RESP_BYTES, obs->response_bytes);
        return 0;
}

struct wp_metrics_tcp *wp_metrics_tcp_open(struct wp_metrics_shard *sh,
                                           const struct wp_metrics_labels *l)
{
        struct series *s;
        struct key k;

        resolve(sh, l, FAM_TCP, 0, -1, &k);
        if (find_or_create(sh, FAM_TCP, &k, &s) < 0) {
                CTR_ADD(sh->overflow[FAM_TCP], 1);
                return (struct wp_metrics_tcp *)sh->discard;
        }
        CTR_ADD(s->v[TV_OPENED], 1);
        return (struct wp_metrics_tcp *)s;
}

void wp_metrics_tcp_bytes(struct wp_metrics_tcp *t, uint64_t sent, uint64_t received)
{
        struct series *s = (struct series *)t;

        CTR_ADD(s->v[TV_SENT], sent);
        CTR_ADD(s->v[TV_RECEIVED], received);
}

void wp_metrics_tcp_close(struct wp_metrics_tcp *t)
{
        struct series *s = (struct series *)t;

        CTR_ADD(s->v[TV_CLOSED], 1);
}

bool wp_metrics_tcp_dropped(const struct wp_metrics_tcp *t)
{
        return ((const struct series *)t)->discard;
}

/* ---- lifecycle ---- */

static struct wp_metrics_shard *shard_free(struct wp_metrics_shard *sh)
{
        unsigned f, c;

        if (!sh)
                return NULL;
        for (f = 0; f < NFAM; f++) {
                if (sh->fam[f].dir) {
                        for (c = 0; c < sh->fam[f].n_dir; c++)
                                wp_free(sh->fam[f].dir[c]);
                }
                wp_free(sh->fam[f].dir);
                wp_free(sh->fam[f].slots);
        }
        wp_free(sh->in.slots);
        while (sh->arena) {
                struct achunk *next = sh->arena->next;

                wp_free(sh->arena);
                sh->arena = next;
        }
        wp_free(sh->scratch);
        wp_free(sh->discard);
        wp_free(sh);
        return NULL;
}

static int shard_new(struct wp_metrics *m, struct wp_metrics_shard **ret)
{
        struct wp_metrics_shard *sh = wp_calloc(1, sizeof(*sh));
        uint32_t n_dir = (m->max_series + DIR_CHUNK - 1) / DIR_CHUNK;
        unsigned f;

        if (!sh)
                return -ENOMEM;
        sh->m = m;
        for (f = 0; f < NFAM; f++) {
                sh->fam[f].dir = wp_calloc(n_dir, sizeof(*sh->fam[f].dir));
                if (!sh->fam[f].dir)
                        goto err_free;
                sh->fam[f].n_dir = n_dir;
        }
        sh->scratch = wp_malloc((size_t)_WP_ML_MAX * m->max_value_len);
        if (!sh->scratch)
                goto err_free;
        sh->discard = wp_calloc(1, sizeof(struct series) + N_TCP_VALUES * sizeof(uint64_t));
        if (!sh->discard)
                goto err_free;
        sh->discard->discard = 1;
        sh->discard->fam = FAM_TCP;
        sh->bytes = sizeof(*sh) + NFAM * n_dir * sizeof(void *) +
                    (size_t)_WP_ML_MAX * m->max_value_len + sizeof(struct series) +
                    N_TCP_VALUES * sizeof(uint64_t);
        *ret = sh;
        return 0;

err_free:
        shard_free(sh);
        return -ENOMEM;
}

struct wp_metrics *wp_metrics_free(struct wp_metrics *m)
{
        unsigned i;

        if (!m)
                return NULL;
        if (m->shards) {
                for (i = 0; i < m->n_shards; i++)
                        shard_free(m->shards[i]);
        }
        wp_free(m->shards);
        wp_free(m->istio_version);
        wp_free(m->local_namespace);
        wp_free(m->local_cluster);
        wp_free(m);
        return NULL;
}

static int dup_or_default(const char *s, const char *def, char **ret)
{
        *ret = wp_strdup(s && *s ? s : def);
        return *ret ? 0 : -ENOMEM;
}

int wp_metrics_new(const struct wp_metrics_config *cfg, struct wp_metrics **ret)
{
        struct wp_metrics *m;
        unsigned i, f;
        int r;

        if (!cfg || !ret || cfg->n_shards == 0 || cfg->n_shards > WP_METRICS_MAX_SHARDS ||
            cfg->max_series > (1u << 24) ||
            (cfg->max_value_len && (cfg->max_value_len < 16 || cfg->max_value_len > 4096)))
                return -EINVAL;
        m = wp_calloc(1, sizeof(*m));
        if (!m)
                return -ENOMEM;
        m->n_shards = cfg->n_shards;
        m->max_series = cfg->max_series ? cfg->max_series : WP_METRICS_DEFAULT_MAX_SERIES;
        m->max_value_len =
                cfg->max_value_len ? cfg->max_value_len : WP_METRICS_DEFAULT_MAX_VALUE_LEN;
        if (getrandom(&m->seed, sizeof(m->seed), GRND_NONBLOCK) != sizeof(m->seed))
                m->seed = (uint64_t)(uintptr_t)m ^ 0x243f6a8885a308d3ull;
        r = dup_or_default(cfg->istio_version, "unknown", &m->istio_version);
        if (r < 0)
                goto err_free;
        r = dup_or_default(cfg->local_namespace, "unknown", &m->local_namespace);
        if (r < 0)
                goto err_free;
        r = dup_or_default(cfg->local_cluster, "unknown", &m->local_cluster);
        if (r < 0)
                goto err_free;
        for (f = 0; f < NFAM; f++) {
                for (i = 0; i < _WP_ML_MAX; i++)
                        m->def[f][i] = mstr("unknown");
                m->def[f][WP_ML_SOURCE_CANONICAL_REVISION] = mstr("latest");
                m->def[f][WP_ML_RESPONSE_FLAGS] = mstr("-");
                m->def[f][WP_ML_DESTINATION_SERVICE_NAMESPACE] = mstr(m->local_namespace);
                m->def[f][WP_ML_DESTINATION_CLUSTER] = mstr(m->local_cluster);
                /* a configured value longer than the cap is cut like any other value */
        }
        m->def[FAM_HTTP][WP_ML_REQUEST_PROTOCOL] = mstr("http");
        m->def[FAM_TCP][WP_ML_REQUEST_PROTOCOL] = mstr("tcp");
        m->shards = wp_calloc(m->n_shards, sizeof(*m->shards));
        if (!m->shards) {
                r = -ENOMEM;
                goto err_free;
        }
        for (i = 0; i < m->n_shards; i++) {
                r = shard_new(m, &m->shards[i]);
                if (r < 0)
                        goto err_free;
        }
        *ret = m;
        return 0;

err_free:
        wp_metrics_free(m);
        return r;
}

struct wp_metrics_shard *wp_metrics_shard(struct wp_metrics *m, unsigned i)
{
        return m && i < m->n_shards ? m->shards[i] : NULL;
}

void wp_metrics_get_stats(struct wp_metrics *m, struct wp_metrics_stats *ret)
{
        unsigned i, f;

        memset(ret, 0, sizeof(*ret));
        ret->bytes = sizeof(*m) + m->n_shards * sizeof(*m->shards);
        for (i = 0; i < m->n_shards; i++) {
                struct wp_metrics_shard *sh = m->shards[i];

                for (f = 0; f < NFAM; f++) {
                        ret->series[f] += __atomic_load_n(&sh->fam[f].n_pub, __ATOMIC_ACQUIRE);
                        ret->overflow[f] += CTR_GET(sh->overflow[f]);
                }
                ret->intern_bytes += CTR_GET(sh->intern_bytes);
                ret->bytes += CTR_GET(sh->bytes);
        }
}

/* ---- rendering: a pull cursor over a merged, sorted view of the shards ---- */

/* Bounded byte buffer. cap is computed from the worst case when the page starts, so a put that
 * does not fit cannot happen; it is refused rather than trusted (the line comes out short). */
struct bbuf {
        char *p;
        size_t len, cap;
};

static inline void bb_put(struct bbuf *b, const char *s, size_t n)
{
        if (n > b->cap - b->len)
                return;
        memcpy(b->p + b->len, s, n);
        b->len += n;
}

static inline void bb_lit(struct bbuf *b, const struct lit *l)
{
        if (b->cap - b->len >= LIT_MAX) { /* the padding lands in room not yet used */
                memcpy(b->p + b->len, l->s, LIT_MAX);
                b->len += l->n;
        } else {
                bb_put(b, l->s, l->n);
        }
}

static void bb_str(struct bbuf *b, const char *s)
{
        bb_put(b, s, strlen(s));
}

static size_t fmt_u64(char *b, uint64_t v)
{
        char tmp[24];
        size_t n = 0, i;

        do {
                tmp[n++] = (char)('0' + v % 10);
                v /= 10;
        } while (v);
        for (i = 0; i < n; i++)
                b[i] = tmp[n - 1 - i];
        return n;
}

static inline void bb_u64(struct bbuf *b, uint64_t v)
{
        char num[24];

        if (b->cap - b->len >= 20) /* the longest 64-bit number */
                b->len += fmt_u64(b->p + b->len, v);
        else
                bb_put(b, num, fmt_u64(num, v));
}

/* Label value escaping of the text format: \ " and newline. Runs of plain bytes are copied
 * whole. */
static void bb_escaped(struct bbuf *b, const char *s, size_t n)
{
        size_t i, from = 0;

        for (i = 0; i < n; i++) {
                const char *rep;

                if (s[i] == '\\')
                        rep = "\\\\";
                else if (s[i] == '"')
                        rep = "\\\"";
                else if (s[i] == '\n')
                        rep = "\\n";
                else
                        continue;
                bb_put(b, s + from, i - from);
                bb_put(b, rep, 2);
                from = i + 1;
        }
        bb_put(b, s + from, n - from);
}

/* Label text of one series, without braces: reporter="waypoint",source_workload="...",...
 * Formatted once per series and section, then copied into each of its sample lines. */
static void format_labels(struct bbuf *b, const struct series *s)
{
        static const struct lit reporter = LIT("reporter=\"waypoint\""),
                                code = LIT(",response_code=\""),
                                grpc = LIT("\",grpc_response_status=\"");
        char num[24];
        unsigned i;

        b->len = 0;
        bb_lit(b, &reporter);
        for (i = 0; i < _WP_ML_MAX; i++) {
                const struct istr *v = s->lv[i];

                if (i == WP_ML_RESPONSE_FLAGS && s->fam == FAM_HTTP) {
                        bb_lit(b, &code);
                        bb_put(b, num, fmt_u64(num, s->code));
                        bb_lit(b, &grpc);
                        if (s->grpc >= 0)
                                bb_put(b, num, fmt_u64(num, (uint64_t)s->grpc));
                        bb_put(b, "\"", 1);
                }
                bb_lit(b, &label_open[i]);
                if (v->plain)
                        bb_put(b, v->s, v->len);
                else
                        bb_escaped(b, v->s, v->len);
                bb_put(b, "\"", 1);
        }
}

static int cmp_series(const void *pa, const void *pb)
{
        const struct series *a = *(const struct series *const *)pa;
        const struct series *b = *(const struct series *const *)pb;
        unsigned i;

        for (i = 0; i < _WP_ML_MAX; i++) {
                const struct istr *x = a->lv[i], *y = b->lv[i];
                size_t n = x->len < y->len ? x->len : y->len;
                int c;

                if (i == WP_ML_RESPONSE_FLAGS && a->code != b->code)
                        return a->code < b->code ? -1 : 1;
                if (i == WP_ML_RESPONSE_FLAGS && a->grpc != b->grpc)
                        return a->grpc < b->grpc ? -1 : 1;
                if (x == y)
                        continue;
                c = n ? memcmp(x->s, y->s, n) : 0;
                if (c)
                        return c;
                if (x->len != y->len)
                        return x->len < y->len ? -1 : 1;
        }
        return 0;
}

/* Published series of one family over all shards, sorted by label tuple: equal tuples from
 * different shards are adjacent (a run) and are summed. 8 bytes per series. A run is marked
 * once, when the view is built: the entry of a series whose tuple equals its predecessor's
 * has its low bit set (series are 16-byte aligned arena objects), so the sections, which walk
 * the view one after another, need not compare tuples again. */
struct famview {
        struct series **v;
        uint32_t n;
};

#define RUN_NEXT ((uintptr_t)1)
_Static_assert(_Alignof(struct series) > 1, "the low bit of a series pointer is free");

static inline const struct series *fv_at(const struct famview *fv, uint32_t i)
{
        return (const struct series *)((uintptr_t)fv->v[i] & ~RUN_NEXT);
}

static inline bool fv_same_as_previous(const struct famview *fv, uint32_t i)
{
        return ((uintptr_t)fv->v[i] & RUN_NEXT) != 0;
}

static int famview_build(struct wp_metrics *m, int fam, struct famview *fv)
{
        uint32_t total = 0, pub[WP_METRICS_MAX_SHARDS], i, j;
        struct series *prev, *cur;

        memset(fv, 0, sizeof(*fv));
        for (i = 0; i < m->n_shards; i++) {
                pub[i] = __atomic_load_n(&m->shards[i]->fam[fam].n_pub, __ATOMIC_ACQUIRE);
                total += pub[i];
        }
        if (!total)
                return 0;
        fv->v = wp_malloc(total * sizeof(*fv->v));
        if (!fv->v)
                return -ENOMEM;
        for (i = 0; i < m->n_shards; i++) {
                const struct fam_table *t = &m->shards[i]->fam[fam];

                for (j = 0; j < pub[i]; j++)
                        fv->v[fv->n++] = dir_get(t, j);
        }
        qsort(fv->v, fv->n, sizeof(*fv->v), cmp_series);
        prev = fv->v[0];
        for (i = 1; i < fv->n; i++) {
                cur = fv->v[i];
                if (cmp_series(&prev, &cur) == 0)
                        fv->v[i] = (struct series *)((uintptr_t)cur | RUN_NEXT);
                prev = cur;
        }
        return 0;
}

/* The page's sections, in Envoy's order: counters by name, the gauge, histograms by name. */
enum sec_kind { SEC_COUNTER, SEC_OVERFLOW, SEC_BUILD, SEC_HIST };

static const struct section {
        enum sec_kind kind;
        int fam;
        unsigned what; /* counter: value word; histogram: HIST_* */
        const char *name, *type, *help;
        struct lit open[3]; /* counter: "name{"; histogram: "name_bucket{", "_sum{", "_count{" */
} sections[] = {
#define COUNTER(fam, word, name, help)                                                             \
        {                                                                                          \
                SEC_COUNTER, (fam), (word), name, "counter", help,                                 \
                {                                                                                  \
                        LIT(name "{")                                                              \
                }                                                                                  \
        }
#define HISTOGRAM(what, name, help)                                                                \
        {                                                                                          \
                SEC_HIST, FAM_HTTP, (what), name, "histogram", help,                               \
                {                                                                                  \
                        LIT(name "_bucket{"), LIT(name "_sum{"), LIT(name "_count{")               \
                }                                                                                  \
        }
        COUNTER(FAM_HTTP, HV_REQUESTS, "istio_requests_total", "Requests handled by the waypoint."),
        COUNTER(FAM_TCP, TV_CLOSED, "istio_tcp_connections_closed_total",
                "TCP connections closed."),
        COUNTER(FAM_TCP, TV_OPENED, "istio_tcp_connections_opened_total",
                "TCP connections opened."),
        COUNTER(FAM_TCP, TV_RECEIVED, "istio_tcp_received_bytes_total",
                "Bytes received from the downstream peer on TCP connections."),
        COUNTER(FAM_TCP, TV_SENT, "istio_tcp_sent_bytes_total",
                "Bytes sent to the downstream peer on TCP connections."),
        {SEC_OVERFLOW, 0, 0, "istio_waypoint_metrics_overflow_total", "counter",
         "Observations dropped because the metric label-set cap was reached."},
        {SEC_BUILD, 0, 0, "istio_build", "gauge", "Istio component build information."},
        HISTOGRAM(HIST_REQ_BYTES, "istio_request_bytes", "Request sizes in bytes."),
        HISTOGRAM(HIST_DURATION, "istio_request_duration_milliseconds",
                  "Request durations in milliseconds."),
        HISTOGRAM(HIST_RESP_BYTES, "istio_response_bytes", "Response sizes in bytes."),
#undef COUNTER
#undef HISTOGRAM
};

#define NSECTIONS (sizeof(sections) / sizeof(sections[0]))

/* Lines of one series in a section: a counter has 1; a histogram NSLOTS buckets, _sum and
 * _count. */
#define HIST_LINES (NSLOTS + 2)

/* A unit of the page: a section's header, a whole small section (overflow, build), or one
 * sample line of the current run. */
enum unit_kind { UNIT_HEADER, UNIT_SECTION, UNIT_SAMPLE };

struct wp_metrics_page {
        struct wp_metrics *m;
        struct famview fv[NFAM];
        struct bbuf lb;                 /* label text of the current run */
        struct bbuf line;               /* a unit that did not fit the reader's buffer */
        size_t line_off;                /* bytes of line already copied out */
        size_t fixed;                   /* bound of a unit's bytes besides lb's */
        size_t bytes;                   /* heap held by the page */
        unsigned sec;                   /* current section; NSECTIONS: end of page */
        bool in_body;                   /* false: the section's header comes next */
        uint32_t run, run_end;          /* current run [run, run_end) of the section's famview */
        unsigned step;                  /* next line of the current run; 0: run not started */
        uint64_t slot[NSLOTS + 1], cum; /* histogram of the current run, read once */
        /* the unit next_unit produced: */
        enum unit_kind unit;
        unsigned usec;  /* its section */
        unsigned ustep; /* histogram line 1..HIST_LINES */
        uint64_t uval;  /* sample value */
};

static uint64_t run_sum(const struct wp_metrics_page *pg, int fam, unsigned word)
{
        const struct famview *fv = &pg->fv[fam];
        uint64_t sum = 0;
        uint32_t i;

        for (i = pg->run; i < pg->run_end; i++)
                sum += CTR_GET(fv_at(fv, i)->v[word]);
        return sum;
}

/* Asks the CPU for the memory the next runs will read: the series (and their label strings)
 * are spread over the shards' arenas, far bigger than the caches at high cardinality, and
 * each miss would otherwise stall the formatting of a run. */
#define PREFETCH_SERIES  8 /* distances, in series, ahead of the run being started */
#define PREFETCH_STRINGS 4
static void prefetch_runs(const struct famview *fv, uint32_t e, unsigned word, unsigned n_words)
{
        const struct series *s;
        unsigned i;

        if (e + PREFETCH_SERIES < fv->n) {
                s = fv_at(fv, e + PREFETCH_SERIES);
                for (i = 0; i < sizeof(s->lv); i += 64)
                        __builtin_prefetch((const char *)s->lv + i);
                for (i = 0; i < n_words * sizeof(uint64_t); i += 64)
                        __builtin_prefetch((const char *)&s->v[word] + i);
                __builtin_prefetch(&s->v[word + n_words - 1]);
        }
        if (e + PREFETCH_STRINGS < fv->n) {
                s = fv_at(fv, e + PREFETCH_STRINGS);
                for (i = 0; i < _WP_ML_MAX; i++)
                        __builtin_prefetch(s->lv[i]);
        }
}

/* Starts the run at index i of fam's view: finds its end, formats its labels. The section
 * reads value words [word, word + n_words) of each series. */
static void run_start(struct wp_metrics_page *pg, int fam, uint32_t i, unsigned word,
                      unsigned n_words)
{
        const struct famview *fv = &pg->fv[fam];
        uint32_t e = i + 1;

        while (e < fv->n && fv_same_as_previous(fv, e))
                e++;
        pg->run = i;
        pg->run_end = e;
        prefetch_runs(fv, e, word, n_words);
        format_labels(&pg->lb, fv_at(fv, i));
}

static void next_section(struct wp_metrics_page *pg)
{
        pg->sec++;
        pg->in_body = false;
        pg->run = pg->run_end = 0;
        pg->step = 0;
}

/* Moves the cursor to the next unit of the page and reads the values it shows (pg->unit,
 * usec, ustep, uval); emit() writes its text. Returns false at the end of the page. */
static bool next_unit(struct wp_metrics_page *pg)
{
        while (pg->sec < NSECTIONS) {
                const struct section *s = &sections[pg->sec];
                const struct famview *fv = &pg->fv[s->fam];

                pg->usec = pg->sec;
                if ((s->kind == SEC_COUNTER || s->kind == SEC_HIST) && !fv->n) {
                        next_section(pg); /* a family without series has no header */
                        continue;
                }
                if (!pg->in_body) {
                        pg->in_body = true;
                        pg->unit = UNIT_HEADER;
                        return true;
                }
                switch (s->kind) {
                case SEC_OVERFLOW:
                case SEC_BUILD:
                        pg->unit = UNIT_SECTION;
                        next_section(pg);
                        return true;
                case SEC_COUNTER:
                        if (pg->run_end >= fv->n) {
                                next_section(pg);
                                continue;
                        }
                        run_start(pg, s->fam, pg->run_end, s->what, 1);
                        pg->unit = UNIT_SAMPLE;
                        pg->uval = run_sum(pg, s->fam, s->what);
                        return true;
                case SEC_HIST:
                        if (pg->step == 0 || pg->step > HIST_LINES) {
                                unsigned i;

                                if (pg->run_end >= fv->n) {
                                        next_section(pg);
                                        continue;
                                }
                                run_start(pg, s->fam, pg->run_end, HV_HIST(s->what), NSLOTS + 1);
                                /* one read of every word: the histogram is self-consistent */
                                for (i = 0; i <= NSLOTS; i++)
                                        pg->slot[i] = run_sum(pg, s->fam, HV_HIST(s->what) + i);
                                pg->cum = 0;
                                pg->step = 1;
                        }
                        pg->unit = UNIT_SAMPLE;
                        pg->ustep = pg->step++;
                        if (pg->ustep <= NSLOTS) {
                                pg->cum += pg->slot[pg->ustep - 1];
                                pg->uval = pg->cum;
                        } else {
                                pg->uval = pg->ustep == NSLOTS + 1 ? pg->slot[NSLOTS] : pg->cum;
                        }
                        return true;
                }
        }
        return false;
}

/* Writes the text of the current unit into b (at most pg->lb.len + pg->fixed bytes). */
static void emit(const struct wp_metrics_page *pg, struct bbuf *b)
{
        const struct section *s = &sections[pg->usec];

        if (pg->unit == UNIT_HEADER) {
                bb_str(b, "# HELP ");
                bb_str(b, s->name);
                bb_str(b, " ");
                bb_str(b, s->help);
                bb_str(b, "\n# TYPE ");
                bb_str(b, s->name);
                bb_str(b, " ");
                bb_str(b, s->type);
                bb_str(b, "\n");
                return;
        }
        if (pg->unit == UNIT_SECTION && s->kind == SEC_OVERFLOW) {
                static const char *const fam_name[NFAM] = {"http", "tcp"};
                struct wp_metrics_stats st;
                unsigned f;

                wp_metrics_get_stats(pg->m, &st);
                for (f = 0; f < NFAM; f++) {
                        bb_str(b, "istio_waypoint_metrics_overflow_total{family=\"");
                        bb_str(b, fam_name[f]);
                        bb_str(b, "\"} ");
                        bb_u64(b, st.overflow[f]);
                        bb_put(b, "\n", 1);
                }
                return;
        }
        if (pg->unit == UNIT_SECTION) {
                bb_str(b, "istio_build{component=\"proxy\",tag=\"");
                bb_escaped(b, pg->m->istio_version, strlen(pg->m->istio_version));
                bb_str(b, "\"} 1\n");
                return;
        }
        /* a sample line: name{labels[,le="..."]} value */
        if (s->kind == SEC_COUNTER || pg->ustep <= NSLOTS)
                bb_lit(b, &s->open[0]);
        else
                bb_lit(b, &s->open[pg->ustep == NSLOTS + 1 ? 1 : 2]);
        bb_put(b, pg->lb.p, pg->lb.len);
        if (s->kind == SEC_HIST && pg->ustep <= NSLOTS)
                bb_lit(b, &le_text[pg->ustep - 1]);
        else
                bb_put(b, "} ", 2);
        bb_u64(b, pg->uval);
        bb_put(b, "\n", 1);
}

static void page_account(struct wp_metrics_page *pg)
{
        pg->bytes = sizeof(*pg) + pg->lb.cap + pg->line.cap +
                    ((size_t)pg->fv[FAM_HTTP].n + pg->fv[FAM_TCP].n) * sizeof(struct series *);
}

int wp_metrics_page_new(struct wp_metrics *m, struct wp_metrics_page **ret)
{
        struct wp_metrics_page *pg;
        size_t names = 0, name_max = 0;
        unsigned i;
        int r = -ENOMEM;

        if (!m || !ret)
                return -EINVAL;
        pg = wp_calloc(1, sizeof(*pg));
        if (!pg)
                return -ENOMEM;
        pg->m = m;
        for (i = 0; i < _WP_ML_MAX; i++)
                names += label_open[i].n - 3; /* the name without ,=" */
        for (i = 0; i < NSECTIONS; i++) {
                size_t n = strlen(sections[i].name) + strlen(sections[i].help);

                name_max = n > name_max ? n : name_max;
        }
        /* worst case of the label text: every value byte escaped, plus names, quotes,
         * separators, reporter, response_code and grpc_response_status */
        pg->lb.cap = (size_t)_WP_ML_MAX * (2 * m->max_value_len + 4) + names + 256;
        /* a sample line: name, suffix, labels, le, value; a header; the istio_build line */
        pg->fixed = name_max + 2 * strlen(m->istio_version) + 256;
        pg->line.cap = pg->lb.cap + pg->fixed;
        pg->lb.p = wp_malloc(pg->lb.cap);
        pg->line.p = wp_malloc(pg->line.cap);
        if (!pg->lb.p || !pg->line.p)
                goto err_free;
        for (i = 0; i < NFAM; i++) {
                r = famview_build(m, (int)i, &pg->fv[i]);
                if (r < 0)
                        goto err_free;
        }
        page_account(pg);
        *ret = pg;
        return 0;

err_free:
        wp_metrics_page_free(pg);
        return r;
}

size_t wp_metrics_page_read(struct wp_metrics_page *pg, char *buf, size_t cap)
{
        size_t n = 0, k;

        while (n < cap) {
                if (pg->line_off < pg->line.len) { /* the rest of a unit that did not fit */
                        k = pg->line.len - pg->line_off;
                        if (k > cap - n)
                                k = cap - n;
                        memcpy(buf + n, pg->line.p + pg->line_off, k);
                        pg->line_off += k;
                        n += k;
                        continue;
                }
                if (!next_unit(pg))
                        break;
                if (cap - n >= pg->lb.len + pg->fixed) {
                        /* room for the unit's worst case: written in place, copied once */
                        struct bbuf d = {buf + n, 0, cap - n};

                        emit(pg, &d);
                        n += d.len;
                } else {
                        pg->line.len = 0;
                        pg->line_off = 0;
                        emit(pg, &pg->line);
                }
        }
        return n;
}

size_t wp_metrics_page_bytes(const struct wp_metrics_page *pg)
{
        return pg ? pg->bytes : 0;
}

struct wp_metrics_page *wp_metrics_page_free(struct wp_metrics_page *pg)
{
        unsigned i;

        if (!pg)
                return NULL;
        for (i = 0; i < NFAM; i++)
                wp_free(pg->fv[i].v);
        wp_free(pg->lb.p);
        wp_free(pg->line.p);
        wp_free(pg);
        return NULL;
}

int wp_metrics_render(struct wp_metrics *m, int (*sink)(void *user, const char *data, size_t len),
                      void *user)
{
        const size_t cap = 64 * 1024;
        struct wp_metrics_page *pg = NULL;
        char *buf = wp_malloc(cap);
        size_t n;
        int r;

        if (!buf)
                return -ENOMEM;
        r = wp_metrics_page_new(m, &pg);
        while (r == 0 && (n = wp_metrics_page_read(pg, buf, cap)) > 0)
                r = sink(user, buf, n);
        wp_metrics_page_free(pg);
        wp_free(buf);
        return r;
}

static int text_sink(void *user, const char *data, size_t len)
{
        struct wp_metrics_text *t = user;

        if (len + 1 > t->cap - t->len || !t->data) {
                size_t cap = t->cap ? t->cap : 4096;
                char *p;

                while (cap - t->len < len + 1) {
                        if (cap > SIZE_MAX / 2)
                                return -ENOMEM;
                        cap *= 2;
                }
                p = wp_realloc(t->data, cap);
                if (!p)
                        return -ENOMEM;
                t->data = p;
                t->cap = cap;
        }
        memcpy(t->data + t->len, data, len);
        t->len += len;
        t->data[t->len] = 0;
        return 0;
}

int wp_metrics_render_text(struct wp_metrics *m, struct wp_metrics_text *out)
{
        return wp_metrics_render(m, text_sink, out);
}

void wp_metrics_text_done(struct wp_metrics_text *t)
{
        wp_free(t->data);
        t->data = NULL;
        t->len = t->cap = 0;
}

static int file_sink(void *user, const char *data, size_t len)
{
        return fwrite(data, 1, len, user) == len ? 0 : -EIO;
}

int wp_metrics_render_file(struct wp_metrics *m, FILE *f)
{
        return wp_metrics_render(m, file_sink, f);
}

/* ---- peer labels ---- */

static void set_nonempty(struct wp_metrics_labels *l, enum wp_metrics_label i, const char *s)
{
        if (s && *s)
                l->v[i] = mstr(s);
}

void wp_metrics_labels_source_from_workload(struct wp_metrics_labels *l,
                                            const Istio__Workload__Workload *w)
{
        if (!w)
                return;
        set_nonempty(l, WP_ML_SOURCE_WORKLOAD, w->workload_name);
        set_nonempty(l, WP_ML_SOURCE_WORKLOAD_NAMESPACE, w->namespace_);
        set_nonempty(l, WP_ML_SOURCE_CANONICAL_SERVICE, w->canonical_name);
        set_nonempty(l, WP_ML_SOURCE_CANONICAL_REVISION, w->canonical_revision);
        set_nonempty(l, WP_ML_SOURCE_CLUSTER, w->cluster_id);
}

void wp_metrics_labels_destination_from_workload(struct wp_metrics_labels *l,
                                                 const Istio__Workload__Workload *w)
{
        if (!w)
                return;
        set_nonempty(l, WP_ML_DESTINATION_WORKLOAD, w->workload_name);
        set_nonempty(l, WP_ML_DESTINATION_WORKLOAD_NAMESPACE, w->namespace_);
        set_nonempty(l, WP_ML_DESTINATION_CANONICAL_SERVICE, w->canonical_name);
        set_nonempty(l, WP_ML_DESTINATION_CANONICAL_REVISION, w->canonical_revision);
}

int wp_metrics_workload_principal(const Istio__Workload__Workload *w, char *buf, size_t cap)
{
        int n;

        if (!w || !buf || !w->trust_domain || !*w->trust_domain || !w->namespace_ ||
            !*w->namespace_ || !w->service_account || !*w->service_account)
                return -EINVAL;
        n = snprintf(buf, cap, "spiffe://%s/ns/%s/sa/%s", w->trust_domain, w->namespace_,
                     w->service_account);
        if (n < 0)
                return -EINVAL;
        if ((size_t)n >= cap)
                return -ENOSPC;
        return n;
}

void wp_metrics_labels_set_source_principal(struct wp_metrics_labels *l, const char *principal,
                                            size_t len)
{
        const char *p, *end, *ns;

        if (!principal || !len || len > UINT32_MAX)
                return;
        l->v[WP_ML_SOURCE_PRINCIPAL].p = principal;
        l->v[WP_ML_SOURCE_PRINCIPAL].n = (uint32_t)len;
        end = principal + len;
        p = memmem(principal, len, "/ns/", 4);
        if (!p)
                return;
        ns = p + 4;
        p = memchr(ns, '/', (size_t)(end - ns));
        if (!p)
                p = end;
        if (p > ns) {
                l->v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].p = ns;
                l->v[WP_ML_SOURCE_WORKLOAD_NAMESPACE].n = (uint32_t)(p - ns);
        }
}

static bool is_ows(char c)
{
        return c == ' ' || c == '\t';
}

static void trim(const char **b, const char **e)
{
        while (*b < *e && is_ows(**b))
                (*b)++;
        while (*e > *b && is_ows((*e)[-1]))
                (*e)--;
}

static bool key_is(const char *k, size_t n, const char *lit)
{
        return n == strlen(lit) && memcmp(k, lit, n) == 0;
}

int wp_metrics_labels_source_from_baggage(struct wp_metrics_labels *l, const char *value,
                                          size_t len)
{
        static const struct {
                const char *key;
                enum wp_metrics_label label;
        } map[] = {
                {"k8s.namespace.name", WP_ML_SOURCE_WORKLOAD_NAMESPACE},
                {"k8s.cluster.name", WP_ML_SOURCE_CLUSTER},
                {"service.name", WP_ML_SOURCE_CANONICAL_SERVICE},
                {"service.version", WP_ML_SOURCE_CANONICAL_REVISION},
                {"app.name", WP_ML_SOURCE_APP},
                {"app.version", WP_ML_SOURCE_VERSION},
                {"k8s.deployment.name", WP_ML_SOURCE_WORKLOAD},
                {"k8s.pod.name", WP_ML_SOURCE_WORKLOAD},
                {"k8s.job.name", WP_ML_SOURCE_WORKLOAD},
                {"k8s.cronjob.name", WP_ML_SOURCE_WORKLOAD},
        };
        bool set[_WP_ML_MAX] = {false};
        const char *p, *end;
        unsigned members = 0, i;
        int n = 0;

        if (!value)
                return -EINVAL;
        if (len > 8192)
                len = 8192;
        p = value;
        end = value + len;
        while (p < end && members < 64) {
                const char *m_end = memchr(p, ',', (size_t)(end - p));
                const char *kb, *ke, *vb, *ve, *eq, *semi;

                if (!m_end)
                        m_end = end;
                members++;
                kb = p;
                p = m_end + 1;
                semi = memchr(kb, ';', (size_t)(m_end - kb));
                ve = semi ? semi : m_end;
                eq = memchr(kb, '=', (size_t)(ve - kb));
                if (!eq)
                        continue;
                ke = eq;
                vb = eq + 1;
                trim(&kb, &ke);
                trim(&vb, &ve);
                if (vb == ve)
                        continue;
                for (i = 0; i < sizeof(map) / sizeof(map[0]); i++) {
                        if (key_is(kb, (size_t)(ke - kb), map[i].key)) {
                                l->v[map[i].label].p = vb;
                                l->v[map[i].label].n = (uint32_t)(ve - vb);
                                if (!set[map[i].label]) {
                                        set[map[i].label] = true;
                                        n++;
                                }
                                break;
                        }
                }
        }
        return n;
}
