/*
 * Load balancing (see lb.h). Layout: the immutable struct wp_lb holds one `level` per priority
 * that carries traffic; each level lists its healthy hosts (endpoint index + weight) and, by
 * policy, weight prefix sums (random), a sorted hash ring or a Maglev table. The per-worker
 * struct wp_lb_state holds what changes per pick: cursors, EDF heaps, active request counts.
 */
#include "waypoint/lb.h"

#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "waypoint/base/alloc.h"

struct ring_ent {
        uint64_t hash;
        uint32_t ep; /* endpoint index */
};

struct level {
        uint32_t priority;
        uint32_t n;    /* healthy hosts */
        uint32_t *ep;  /* [n] endpoint indices, ascending */
        uint32_t *w;   /* [n] weights (>= 1) */
        uint64_t *cum; /* [n] prefix sums of w (weighted random); NULL when uniform */
        uint64_t total_w;
        bool uniform;      /* all weights equal */
        uint32_t total;    /* hosts of this priority, healthy or not */
        uint32_t load_end; /* cumulative priority load (percent): x % 100 < load_end lands here */
        size_t heap_off;   /* this level's EDF heap inside a state's heap area */
        struct ring_ent *ring;
        size_t nring;
        uint16_t *table16; /* Maglev slot -> level-local host (n < 65535) */
        uint32_t *table32; /* ... otherwise */
};

struct wp_lb {
        enum wp_lb_policy policy;
        uint32_t choice_count;
        double bias;
        uint64_t table_size;
        size_t neps;
        size_t nhealthy;
        struct level *lv;
        size_t nlv;
        size_t heap_total; /* EDF entries a state needs (RR / LR levels with unequal weights) */
};

/* One EDF schedule entry. Round robin compares k/w exactly (k = picks so far + 1, cross
 * multiplied in 128 bits); least request uses a floating deadline since its weights change with
 * the active count. */
struct edf {
        uint64_t k;
        double deadline;
        uint32_t host; /* level-local */
};

struct lv_state {
        uint64_t cursor; /* unweighted round robin */
        double now;      /* least request EDF virtual time */
        struct edf *heap;
        uint32_t n;
};

struct wp_lb_state {
        unsigned refs;
        const struct wp_lb *lb; /* identity only: pick checks it belongs to the lb it is given */
        size_t neps;
        size_t nlv;
        uint32_t *active; /* [neps] */
        struct lv_state lv[];
};

/* ---- hashing ---- */

#define XXP1 0x9E3779B185EBCA87ULL
#define XXP2 0xC2B2AE3D27D4EB4FULL
#define XXP3 0x165667B19E3779F9ULL
#define XXP4 0x85EBCA77C2B2AE63ULL
#define XXP5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, unsigned r)
{
        return (x << r) | (x >> (64 - r));
}

static inline uint64_t rd64(const uint8_t *p)
{
        uint64_t v;

        memcpy(&v, p, 8);
        return le64toh(v);
}

static inline uint32_t rd32(const uint8_t *p)
{
        uint32_t v;

        memcpy(&v, p, 4);
        return le32toh(v);
}

static inline uint64_t xx_round(uint64_t acc, uint64_t in)
{
        acc += in * XXP2;
        acc = rotl64(acc, 31);
        return acc * XXP1;
}

static inline uint64_t xx_merge(uint64_t acc, uint64_t v)
{
        acc ^= xx_round(0, v);
        return acc * XXP1 + XXP4;
}

uint64_t wp_lb_hash(const void *data, size_t len, uint64_t seed)
{
        const uint8_t *p = data, *end = p + len;
        uint64_t h;

        if (len >= 32) {
                uint64_t v1 = seed + XXP1 + XXP2, v2 = seed + XXP2, v3 = seed, v4 = seed - XXP1;

                do {
                        v1 = xx_round(v1, rd64(p));
                        v2 = xx_round(v2, rd64(p + 8));
                        v3 = xx_round(v3, rd64(p + 16));
                        v4 = xx_round(v4, rd64(p + 24));
                        p += 32;
                } while (end - p >= 32);
                h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
                h = xx_merge(h, v1);
                h = xx_merge(h, v2);
                h = xx_merge(h, v3);
                h = xx_merge(h, v4);
        } else {
                h = seed + XXP5;
        }
        h += (uint64_t)len;
        for (; end - p >= 8; p += 8) {
                h ^= xx_round(0, rd64(p));
                h = rotl64(h, 27) * XXP1 + XXP4;
        }
        if (end - p >= 4) {
                h ^= (uint64_t)rd32(p) * XXP1;
                h = rotl64(h, 23) * XXP2 + XXP3;
                p += 4;
        }
        for (; p < end; p++) {
                h ^= (uint64_t)*p * XXP5;
                h = rotl64(h, 11) * XXP1;
        }
        h ^= h >> 33;
        h *= XXP2;
        h ^= h >> 29;
        h *= XXP3;
        h ^= h >> 32;
        return h;
}

static inline uint64_t mix64(uint64_t z)
{
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
}

uint64_t wp_lb_rand(uint64_t *state)
{
        *state += 0x9E3779B97F4A7C15ULL;
        return mix64(*state);
}

/* ---- config ---- */

void wp_lb_config_init(struct wp_lb_config *cfg)
{
        memset(cfg, 0, sizeof(*cfg));
        cfg->policy = WP_LB_ROUND_ROBIN;
        cfg->choice_count = 2;
        cfg->active_request_bias = 1.0;
        cfg->min_ring_size = WP_LB_MIN_RING_SIZE_DEFAULT;
        cfg->max_ring_size = WP_LB_MAX_RING_SIZE_DEFAULT;
        cfg->table_size = WP_LB_MAGLEV_TABLE_DEFAULT;
        cfg->overprovisioning_factor = WP_LB_OVERPROVISIONING_DEFAULT;
}

static bool is_prime(uint64_t n)
{
        if (n < 2)
                return false;
        for (uint64_t d = 2; d * d <= n; d++)
                if (n % d == 0)
                        return false;
        return true;
}

static int check_config(const struct wp_lb_config *cfg, const struct wp_lb_endpoint *eps,
                        size_t neps, const char **reterr_desc)
{
        if ((unsigned)cfg->policy >= _WP_LB_POLICY_MAX) {
                *reterr_desc = "unknown load balancing policy";
                return -EINVAL;
        }
        if (neps > WP_LB_MAX_ENDPOINTS) {
                *reterr_desc = "too many endpoints in cluster";
                return -EINVAL;
        }
        if (cfg->overprovisioning_factor == 0) {
                *reterr_desc = "overprovisioning_factor must be > 0";
                return -EINVAL;
        }
        switch (cfg->policy) {
        case WP_LB_LEAST_REQUEST:
                if (cfg->choice_count < 2 || cfg->choice_count > WP_LB_CHOICE_COUNT_MAX) {
                        *reterr_desc = "least_request choice_count out of range";
                        return -EINVAL;
                }
                if (!(cfg->active_request_bias >= 0.0) ||
                    !__builtin_isfinite(cfg->active_request_bias)) {
                        *reterr_desc = "least_request active_request_bias must be >= 0";
                        return -EINVAL;
                }
                break;
        case WP_LB_RING_HASH:
                if (cfg->min_ring_size < 1 || cfg->min_ring_size > WP_LB_RING_SIZE_LIMIT ||
                    cfg->max_ring_size > WP_LB_RING_SIZE_LIMIT) {
                        *reterr_desc = "ring_hash ring size out of range";
                        return -EINVAL;
                }
                if (cfg->min_ring_size > cfg->max_ring_size) {
                        *reterr_desc = "ring_hash minimum_ring_size > maximum_ring_size";
                        return -EINVAL;
                }
                break;
        case WP_LB_MAGLEV:
                if (cfg->table_size > WP_LB_MAGLEV_TABLE_LIMIT || !is_prime(cfg->table_size)) {
                        *reterr_desc = "maglev table_size must be a prime <= 5000011";
                        return -EINVAL;
                }
                break;
        default:
                break;
        }
        if (cfg->policy == WP_LB_RING_HASH || cfg->policy == WP_LB_MAGLEV) {
                for (size_t i = 0; i < neps; i++) {
                        if (!eps[i].healthy)
                                continue;
                        if (!eps[i].key || strnlen(eps[i].key, WP_LB_KEY_MAX + 1) > WP_LB_KEY_MAX) {
                                *reterr_desc = "endpoint hash key missing or too long";
                                return -EINVAL;
                        }
                }
        }
        return 0;
}

/* ---- build ---- */

struct sort_ent {
        uint32_t priority;
        uint32_t idx;
};

static int cmp_sort_ent(const void *a, const void *b)
{
        const struct sort_ent *x = a, *y = b;

        if (x->priority != y->priority)
                return x->priority < y->priority ? -1 : 1;
        return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static int cmp_ring_ent(const void *a, const void *b)
{
        const struct ring_ent *x = a, *y = b;

        if (x->hash != y->hash)
                return x->hash < y->hash ? -1 : 1;
        return x->ep < y->ep ? -1 : x->ep > y->ep;
}

static uint32_t ep_weight(const struct wp_lb_endpoint *e)
{
        return e->weight ? e->weight : 1;
}

/* Ketama-style ring as Envoy's ring hash: the scale gives the lightest host at least
 * min_ring_size * its share entries, capped at max_ring_size; hosts get scale * share entries
 * (accumulated, so rounding does not drift), each at xxh64("<key>_<i>"). */
static int build_ring(struct level *lv, const struct wp_lb_config *cfg,
                      const struct wp_lb_endpoint *eps)
{
        double total = (double)lv->total_w, min_w = (double)UINT32_MAX;
        uint64_t *counts;
        size_t nring = 0;
        char buf[WP_LB_KEY_MAX + 32];

        for (uint32_t i = 0; i < lv->n; i++)
                if (lv->w[i] < min_w)
                        min_w = lv->w[i];
        double min_norm = min_w / total;
        double want = min_norm * (double)cfg->min_ring_size, up = (double)(uint64_t)want;
        double scale;

        if (up < want)
                up += 1.0; /* ceil: want <= 8M */
        scale = up / min_norm;

        if (scale > (double)cfg->max_ring_size)
                scale = (double)cfg->max_ring_size;

        counts = wp_malloc(lv->n * sizeof(*counts));
        if (!counts)
                return -ENOMEM;
        double current = 0.0, target = 0.0;

        for (uint32_t i = 0; i < lv->n; i++) {
                uint64_t c = 0;

                target += scale * ((double)lv->w[i] / total);
                while (current < target) {
                        current += 1.0;
                        c++;
                }
                counts[i] = c;
                nring += c;
        }
        lv->ring = wp_malloc((nring ? nring : 1) * sizeof(*lv->ring));
        if (!lv->ring) {
                wp_free(counts);
                return -ENOMEM;
        }
        size_t pos = 0;

        for (uint32_t i = 0; i < lv->n; i++) {
                const char *key = eps[lv->ep[i]].key;
                size_t klen = strlen(key);

                memcpy(buf, key, klen);
                buf[klen] = '_';
                for (uint64_t j = 0; j < counts[i]; j++) {
                        char digits[24];
                        size_t nd = 0;
                        uint64_t v = j;

                        do {
                                digits[nd++] = (char)('0' + v % 10);
                                v /= 10;
                        } while (v);
                        for (size_t d = 0; d < nd; d++)
                                buf[klen + 1 + d] = digits[nd - 1 - d];
                        lv->ring[pos].hash = wp_lb_hash(buf, klen + 1 + nd, 0);
                        lv->ring[pos].ep = lv->ep[i];
                        pos++;
                }
        }
        wp_free(counts);
        qsort(lv->ring, nring, sizeof(*lv->ring), cmp_ring_ent);
        lv->nring = nring;
        return 0;
}

struct mg_host {
        const char *key;
        uint64_t offset, skip, next, target;
        uint32_t host; /* level-local */
};

static int cmp_mg_host(const void *a, const void *b)
{
        return strcmp(((const struct mg_host *)a)->key, ((const struct mg_host *)b)->key);
}

/* Maglev lookup table (Eisenbud et al., NSDI 2016) with Envoy's weighting: hosts take turns
 * claiming their next preferred empty slot; a host of weight w takes a turn in iteration `it`
 * only while it * w >= its accumulated target, which grows by the largest weight per turn taken,
 * so turns are proportional to weights. Hosts take turns in key order, not array order, so the
 * table depends only on the set of (key, weight). */
static int build_maglev(struct level *lv, uint64_t M, const struct wp_lb_endpoint *eps)
{
        struct mg_host *h;
        uint32_t max_w = 0;
        bool narrow = lv->n < UINT16_MAX;

        h = wp_malloc(lv->n * sizeof(*h));
        if (!h)
                return -ENOMEM;
        if (narrow)
                lv->table16 = wp_malloc(M * sizeof(*lv->table16));
        else
                lv->table32 = wp_malloc(M * sizeof(*lv->table32));
        if (!lv->table16 && !lv->table32) {
                wp_free(h);
                return -ENOMEM;
        }
        if (narrow)
                memset(lv->table16, 0xff, M * sizeof(*lv->table16));
        else
                memset(lv->table32, 0xff, M * sizeof(*lv->table32));
        for (uint32_t i = 0; i < lv->n; i++) {
                const char *key = eps[lv->ep[i]].key;
                size_t klen = strlen(key);

                h[i].key = key;
                h[i].host = i;
                h[i].offset = wp_lb_hash(key, klen, 0) % M;
                h[i].skip = wp_lb_hash(key, klen, 1) % (M - 1) + 1;
                h[i].next = 0;
                h[i].target = 0;
                if (lv->w[i] > max_w)
                        max_w = lv->w[i];
        }
        qsort(h, lv->n, sizeof(*h), cmp_mg_host);
        uint64_t filled = 0;

        for (uint64_t it = 0; filled < M; it++) {
                for (uint32_t i = 0; i < lv->n && filled < M; i++) {
                        if (it * lv->w[h[i].host] < h[i].target)
                                continue;
                        h[i].target += max_w;
                        for (;;) {
                                uint64_t c = (h[i].offset + h[i].skip * h[i].next) % M;

                                h[i].next++;
                                if (narrow && lv->table16[c] == UINT16_MAX) {
                                        lv->table16[c] = (uint16_t)h[i].host;
                                        break;
                                }
                                if (!narrow && lv->table32[c] == UINT32_MAX) {
                                        lv->table32[c] = h[i].host;
                                        break;
                                }
                        }
                        filled++;
                }
        }
        wp_free(h);
        return 0;
}

/* Envoy's priority load: health = min(100, factor * healthy / total) per priority, handed out
 * from priority 0 until 100% (normalised when the healths sum below 100). On return each level's
 * load_end is its cumulative upper bound, or 0 when it carries no traffic. */
static void assign_loads(struct level *lv, size_t nlv, uint32_t factor)
{
        uint64_t sum = 0;
        uint32_t remaining = 100, acc = 0;
        size_t first = nlv;

        if (!nlv)
                return;
        for (size_t l = 0; l < nlv; l++) {
                uint64_t hl = (uint64_t)factor * lv[l].n / lv[l].total;

                lv[l].load_end = hl > 100 ? 100 : (uint32_t)hl; /* health, for now */
                sum += lv[l].load_end;
        }
        if (sum > 100)
                sum = 100;
        if (sum == 0) {
                /* every level rounds to 0%: the lowest priority takes everything (Envoy would
                 * enter panic mode here) */
                lv[0].load_end = 1;
                sum = 1;
        }
        for (size_t l = 0; l < nlv; l++) {
                uint64_t x = (uint64_t)lv[l].load_end * 100 / sum;

                lv[l].load_end = x < remaining ? (uint32_t)x : remaining; /* load */
                remaining -= lv[l].load_end;
                if (lv[l].load_end && first == nlv)
                        first = l;
        }
        /* rounding leftovers go to the first level carrying traffic */
        if (first < nlv)
                lv[first].load_end += remaining;
        for (size_t l = 0; l < nlv; l++) {
                if (!lv[l].load_end)
                        continue;
                acc += lv[l].load_end;
                lv[l].load_end = acc;
        }
}

static void level_done(struct level *lv)
{
        wp_free(lv->ep);
        wp_free(lv->w);
        wp_free(lv->cum);
        wp_free(lv->ring);
        wp_free(lv->table16);
        wp_free(lv->table32);
}

struct wp_lb *wp_lb_free(struct wp_lb *lb)
{
        if (!lb)
                return NULL;
        for (size_t l = 0; l < lb->nlv; l++)
                level_done(&lb->lv[l]);
        wp_free(lb->lv);
        wp_free(lb);
        return NULL;
}

int wp_lb_new(const struct wp_lb_config *cfg, const struct wp_lb_endpoint *eps, size_t neps,
              struct wp_lb **ret, const char **reterr_desc)
{
        struct wp_lb *lb;
        struct sort_ent *s = NULL;
        size_t ngroups = 0, nlv = 0;
        int r;

        r = check_config(cfg, eps, neps, reterr_desc);
        if (r < 0)
                return r;
        lb = wp_calloc(1, sizeof(*lb));
        if (!lb)
                goto err_nomem;
        lb->policy = cfg->policy;
        lb->choice_count = cfg->choice_count;
        lb->bias = cfg->active_request_bias;
        lb->table_size = cfg->table_size;
        lb->neps = neps;
        if (!neps)
                goto done;

        /* group endpoints by priority (stable: ascending index within a priority) */
        s = wp_malloc(neps * sizeof(*s));
        if (!s)
                goto err_free_lb;
        for (size_t i = 0; i < neps; i++) {
                s[i].priority = eps[i].priority;
                s[i].idx = (uint32_t)i;
        }
        qsort(s, neps, sizeof(*s), cmp_sort_ent);
        for (size_t i = 0; i < neps; i++)
                if (i == 0 || s[i].priority != s[i - 1].priority)
                        ngroups++;
        lb->lv = wp_calloc(ngroups, sizeof(*lb->lv));
        if (!lb->lv)
                goto err_free_tmp;

        /* one level per priority with at least one healthy host */
        for (size_t i = 0, g; i < neps; i = g) {
                uint32_t healthy = 0;
                struct level *lv = &lb->lv[nlv];

                for (g = i; g < neps && s[g].priority == s[i].priority; g++)
                        healthy += eps[s[g].idx].healthy;
                if (!healthy)
                        continue;
                lv->priority = s[i].priority;
                lv->ep = wp_malloc(healthy * sizeof(*lv->ep));
                lv->w = wp_malloc(healthy * sizeof(*lv->w));
                lb->nlv = ++nlv; /* from here wp_lb_free() releases this level */
                if (!lv->ep || !lv->w)
                        goto err_free_tmp;
                lv->uniform = true;
                for (size_t j = i; j < g; j++) {
                        const struct wp_lb_endpoint *e = &eps[s[j].idx];

                        if (!e->healthy)
                                continue;
                        lv->ep[lv->n] = s[j].idx;
                        lv->w[lv->n] = ep_weight(e);
                        lv->total_w += lv->w[lv->n];
                        if (lv->w[lv->n] != lv->w[0])
                                lv->uniform = false;
                        lv->n++;
                }
                lv->total = (uint32_t)(g - i);
                lb->nhealthy += lv->n;
        }
        assign_loads(lb->lv, nlv, cfg->overprovisioning_factor);

        /* drop levels that carry no traffic, then build each level's structure */
        size_t kept = 0;

        for (size_t l = 0; l < nlv; l++) {
                if (lb->lv[l].load_end)
                        lb->lv[kept++] = lb->lv[l];
                else
                        level_done(&lb->lv[l]);
        }
        lb->nlv = kept;
        for (size_t l = 0; l < lb->nlv; l++) {
                struct level *lv = &lb->lv[l];

                switch (cfg->policy) {
                case WP_LB_RANDOM:
                case WP_LB_ROUND_ROBIN:
                case WP_LB_LEAST_REQUEST:
                        /* random picks (and RR/LR without a worker state) need prefix sums */
                        if (!lv->uniform) {
                                lv->cum = wp_malloc(lv->n * sizeof(*lv->cum));
                                if (!lv->cum)
                                        goto err_free_tmp;
                                for (uint32_t i = 0; i < lv->n; i++)
                                        lv->cum[i] = (i ? lv->cum[i - 1] : 0) + lv->w[i];
                                if (cfg->policy != WP_LB_RANDOM) {
                                        lv->heap_off = lb->heap_total;
                                        lb->heap_total += lv->n;
                                }
                        }
                        break;
                case WP_LB_RING_HASH:
                        if (build_ring(lv, cfg, eps) < 0)
                                goto err_free_tmp;
                        break;
                case WP_LB_MAGLEV:
                        if (build_maglev(lv, cfg->table_size, eps) < 0)
                                goto err_free_tmp;
                        break;
                default:
                        break;
                }
        }
        wp_free(s);
done:
        *ret = lb;
        return 0;

err_free_tmp:
        wp_free(s);
err_free_lb:
        wp_lb_free(lb);
err_nomem:
        *reterr_desc = "out of memory building load balancer";
        return -ENOMEM;
}

enum wp_lb_policy wp_lb_policy(const struct wp_lb *lb)
{
        return lb->policy;
}

size_t wp_lb_healthy(const struct wp_lb *lb)
{
        return lb->nhealthy;
}

/* ---- per-worker state ---- */

/* EDF order: round robin compares k_a / w_a < k_b / w_b exactly; least request compares the
 * floating deadlines; ties go to the lower host so schedules are deterministic. */
static inline bool edf_before(const struct wp_lb *lb, const struct level *lv, const struct edf *a,
                              const struct edf *b)
{
        if (lb->policy == WP_LB_ROUND_ROBIN) {
                unsigned __int128 x = (unsigned __int128)a->k * lv->w[b->host];
                unsigned __int128 y = (unsigned __int128)b->k * lv->w[a->host];

                if (x != y)
                        return x < y;
        } else if (a->deadline != b->deadline) {
                return a->deadline < b->deadline;
        }
        return a->host < b->host;
}

static void edf_sift_down(const struct wp_lb *lb, const struct level *lv, struct edf *heap,
                          uint32_t n, uint32_t i)
{
        for (;;) {
                uint32_t l = 2 * i + 1, r = l + 1, m = i;

                if (l < n && edf_before(lb, lv, &heap[l], &heap[m]))
                        m = l;
                if (r < n && edf_before(lb, lv, &heap[r], &heap[m]))
                        m = r;
                if (m == i)
                        return;
                struct edf t = heap[i];

                heap[i] = heap[m];
                heap[m] = t;
                i = m;
        }
}

/* a^b for a >= 1, b >= 0, without libm (the daemon does not link it): exact by squaring for
 * small integer b, else exp(b ln a) from series (relative error ~1e-15; only weights use it). */
static double pow_pos(double a, double b)
{
        if (b <= 64.0 && b == (double)(uint32_t)b) {
                double r = 1.0, x = a;

                for (uint32_t e = (uint32_t)b; e; e >>= 1, x *= x)
                        if (e & 1)
                                r *= x;
                return r;
        }
        /* ln a = k ln2 + ln m, m in [1, 2): ln m = 2 atanh((m - 1) / (m + 1)) */
        static const double ln2 = 0.69314718055994530942;
        uint64_t bits;
        double m;

        memcpy(&bits, &a, 8);
        int k = (int)((bits >> 52) & 0x7ff) - 1023;

        bits = (bits & 0xfffffffffffffULL) | (1023ULL << 52);
        memcpy(&m, &bits, 8);
        double t = (m - 1.0) / (m + 1.0), t2 = t * t, term = t, ln = 0.0;

        for (int i = 1; i < 60; i += 2, term *= t2)
                ln += term / i;
        double x = b * (k * ln2 + 2.0 * ln);

        /* exp x = 2^j e^r, r in [0, ln2) */
        if (x > 1000.0)
                return 1e300;
        int j = (int)(x / ln2);
        double r = x - j * ln2, e = 1.0, f = 1.0;

        for (int i = 1; i < 30; i++) {
                f *= r / i;
                e += f;
        }
        bits = (uint64_t)(j + 1023) << 52;
        memcpy(&m, &bits, 8);
        return e * m;
}

static double lr_weight(const struct wp_lb *lb, uint32_t w, uint32_t active)
{
        double a = (double)active + 1.0, ew;

        if (lb->bias == 0.0)
                return w;
        if (lb->bias == 1.0)
                ew = w / a;
        else
                ew = w / pow_pos(a, lb->bias);
        /* a floor keeps deadlines finite however many requests are active */
        return ew > 1e-12 ? ew : 1e-12;
}

/* Pops the earliest deadline, re-inserts it one period later; returns the level-local host. */
static uint32_t edf_pick(const struct wp_lb *lb, const struct level *lv, struct lv_state *ls,
                         const uint32_t *active)
{
        struct edf *top = &ls->heap[0];
        uint32_t host = top->host;

        if (lb->policy == WP_LB_ROUND_ROBIN) {
                top->k++;
        } else {
                /* Envoy: the host's weight is rescaled by its active requests when re-added */
                ls->now = top->deadline;
                top->deadline = ls->now + 1.0 / lr_weight(lb, lv->w[host], active[lv->ep[host]]);
        }
        edf_sift_down(lb, lv, ls->heap, ls->n, 0);
        return host;
}

int wp_lb_state_new(const struct wp_lb *lb, uint64_t seed, struct wp_lb_state **ret)
{
        struct wp_lb_state *st;
        size_t sz = sizeof(*st) + lb->nlv * sizeof(st->lv[0]);
        size_t heap_at = (sz + _Alignof(struct edf) - 1) & ~(_Alignof(struct edf) - 1);
        size_t active_at = heap_at + lb->heap_total * sizeof(struct edf);

        st = wp_calloc(1, active_at + (lb->neps ? lb->neps : 1) * sizeof(uint32_t));
        if (!st)
                return -ENOMEM;
        st->refs = 1;
        st->lb = lb;
        st->neps = lb->neps;
        st->nlv = lb->nlv;
        st->active = (uint32_t *)((char *)st + active_at);
        for (size_t l = 0; l < lb->nlv; l++) {
                const struct level *lv = &lb->lv[l];
                struct lv_state *ls = &st->lv[l];
                uint64_t r = seed + l;

                ls->cursor = wp_lb_rand(&r);
                if (lv->uniform ||
                    (lb->policy != WP_LB_ROUND_ROBIN && lb->policy != WP_LB_LEAST_REQUEST))
                        continue;
                ls->heap = (struct edf *)((char *)st + heap_at) + lv->heap_off;
                ls->n = lv->n;
                for (uint32_t i = 0; i < lv->n; i++) {
                        ls->heap[i].k = 1;
                        ls->heap[i].deadline = 1.0 / lv->w[i];
                        ls->heap[i].host = i;
                }
                for (uint32_t i = lv->n / 2; i-- > 0;)
                        edf_sift_down(lb, lv, ls->heap, ls->n, i);
                /* start each worker at a different point of the schedule */
                for (uint64_t skip = ls->cursor % lv->n; skip; skip--)
                        edf_pick(lb, lv, ls, st->active);
        }
        *ret = st;
        return 0;
}

struct wp_lb_state *wp_lb_state_ref(struct wp_lb_state *st)
{
        if (st)
                st->refs++;
        return st;
}

struct wp_lb_state *wp_lb_state_unref(struct wp_lb_state *st)
{
        if (st && --st->refs == 0)
                wp_free(st);
        return NULL;
}

void wp_lb_request_start(struct wp_lb_state *st, int idx)
{
        if (st && idx >= 0 && (size_t)idx < st->neps && st->active[idx] < UINT32_MAX)
                st->active[idx]++;
}

void wp_lb_request_end(struct wp_lb_state *st, int idx)
{
        if (st && idx >= 0 && (size_t)idx < st->neps && st->active[idx] > 0)
                st->active[idx]--;
}

uint32_t wp_lb_active(const struct wp_lb_state *st, int idx)
{
        if (st && idx >= 0 && (size_t)idx < st->neps)
                return st->active[idx];
        return 0;
}

/* ---- pick ---- */

static uint32_t pick_random(const struct level *lv, uint64_t rnd)
{
        if (lv->uniform)
                return lv->ep[rnd % lv->n];
        uint64_t x = rnd % lv->total_w;
        uint32_t lo = 0, hi = lv->n - 1;

        /* first host whose prefix sum exceeds x */
        while (lo < hi) {
                uint32_t mid = lo + (hi - lo) / 2;

                if (lv->cum[mid] > x)
                        hi = mid;
                else
                        lo = mid + 1;
        }
        return lv->ep[lo];
}

static uint32_t pick_p2c(const struct wp_lb *lb, const struct level *lv, const uint32_t *active,
                         uint64_t rnd)
{
        uint32_t best = lv->ep[rnd % lv->n];

        for (uint32_t i = 1; i < lb->choice_count; i++) {
                uint32_t c = lv->ep[wp_lb_rand(&rnd) % lv->n];

                if (active[c] < active[best])
                        best = c;
        }
        return best;
}

static uint32_t pick_ring(const struct level *lv, uint64_t hash)
{
        size_t lo = 0, hi = lv->nring;

        /* first entry with hash >= the request's, wrapping to the start of the ring */
        while (lo < hi) {
                size_t mid = lo + (hi - lo) / 2;

                if (lv->ring[mid].hash < hash)
                        lo = mid + 1;
                else
                        hi = mid;
        }
        return lv->ring[lo == lv->nring ? 0 : lo].ep;
}

int wp_lb_pick(const struct wp_lb *lb, struct wp_lb_state *st, uint64_t hash, uint64_t rnd)
{
        const struct level *lv;
        size_t l = 0;

        if (!lb || !lb->nlv)
                return -1;
        if (st && (st->lb != lb || st->neps != lb->neps || st->nlv != lb->nlv))
                st = NULL; /* a state of another balancer: never index it */
        if (lb->nlv > 1) {
                bool hashed = lb->policy == WP_LB_RING_HASH || lb->policy == WP_LB_MAGLEV;
                uint32_t x = (uint32_t)(mix64(hashed ? hash : rnd) % 100);

                while (l + 1 < lb->nlv && x >= lb->lv[l].load_end)
                        l++;
        }
        lv = &lb->lv[l];
        switch (lb->policy) {
        case WP_LB_ROUND_ROBIN:
                if (!st)
                        return (int)pick_random(lv, rnd);
                if (lv->uniform)
                        return (int)lv->ep[st->lv[l].cursor++ % lv->n];
                return (int)lv->ep[edf_pick(lb, lv, &st->lv[l], st->active)];
        case WP_LB_LEAST_REQUEST:
                if (!st)
                        return (int)pick_random(lv, rnd);
                if (lv->uniform)
                        return (int)pick_p2c(lb, lv, st->active, rnd);
                return (int)lv->ep[edf_pick(lb, lv, &st->lv[l], st->active)];
        case WP_LB_RANDOM:
                return (int)pick_random(lv, rnd);
        case WP_LB_RING_HASH:
                return (int)pick_ring(lv, hash);
        case WP_LB_MAGLEV: {
                uint64_t slot = hash % lb->table_size;

                return (int)lv->ep[lv->table16 ? lv->table16[slot] : lv->table32[slot]];
        }
        default:
                return -1;
        }
}
