/*
 * Per-request load balancing over one cluster's endpoints, with Envoy's semantics
 * (intro/arch_overview/upstream/load_balancing): round robin, least request, random, ring hash
 * and Maglev, over healthy endpoints, honouring load_balancing_weight and priorities.
 *
 * Two objects:
 *   - struct wp_lb: built once per cluster (at snapshot build time) from the endpoint array and
 *     the cluster's policy; immutable afterwards, so every worker thread reads it without locks.
 *     It holds the per-priority host lists, weight prefix sums, the hash ring or Maglev table.
 *   - struct wp_lb_state: the small mutable part one worker owns (round-robin cursor, EDF
 *     schedule, least-request active counts). Never shared between threads: no atomics on the
 *     hot path. Single-threaded reference count so a stream that started a request can end it on
 *     the same state after the worker has moved to a newer snapshot.
 *
 * Priorities (Envoy's priority levels, istio's locality failover): each priority's health is
 * min(100, overprovisioning_factor * healthy / total) percent (host counts, as Envoy), and traffic
 * is spread over priorities from 0 upwards until 100% is reached (normalised when the sum is
 * below 100). With the default factor 140, priority 0 keeps all traffic while >= 72% of its hosts
 * are healthy. WP_LB_OVERPROVISIONING_STRICT gives the simple rule: the lowest priority with any
 * healthy host takes everything. Unhealthy hosts are never picked (no panic mode: Envoy's
 * healthy_panic_threshold, which spreads over all hosts when health < 50%, is not implemented).
 * When the integer health of every priority rounds to 0 while some host is healthy, the lowest
 * priority with a healthy host takes everything (where Envoy would panic).
 *
 * Hashing (ring hash, Maglev): wp_lb_hash() is xxHash64 (the algorithm Envoy uses for hash
 * policies and for placing hosts). The ring places host key "<key>_<i>" (i = 0, 1, ...) hashed
 * with seed 0, as Envoy hashes "<address>_<i>"; Maglev takes offset = xxh64(key, 0) % M and
 * skip = xxh64(key, 1) % (M - 1) + 1. The key is the endpoint's address string ("ip:port"), so
 * an endpoint keeps its place when others come and go.
 */
#ifndef WP_LB_H
#define WP_LB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum wp_lb_policy {
        WP_LB_ROUND_ROBIN, /* Cluster.lb_policy ROUND_ROBIN (default) */
        WP_LB_LEAST_REQUEST,
        WP_LB_RANDOM,
        WP_LB_RING_HASH,
        WP_LB_MAGLEV,
        _WP_LB_POLICY_MAX,
};

#define WP_LB_MAX_ENDPOINTS            (1u << 20) /* per cluster */
#define WP_LB_KEY_MAX                  255        /* bytes of an endpoint key */
#define WP_LB_MIN_RING_SIZE_DEFAULT    1024
#define WP_LB_MAX_RING_SIZE_DEFAULT    (8u << 20)
#define WP_LB_RING_SIZE_LIMIT          (8u << 20) /* Envoy caps both ring sizes at 8M */
#define WP_LB_MAGLEV_TABLE_DEFAULT     65537
#define WP_LB_MAGLEV_TABLE_LIMIT       5000011 /* Envoy: table_size must be a prime <= this */
#define WP_LB_CHOICE_COUNT_MAX         64
#define WP_LB_OVERPROVISIONING_DEFAULT 140 /* percent, Envoy's default 1.4 */
#define WP_LB_OVERPROVISIONING_STRICT  UINT32_MAX

/* One endpoint as the builder sees it; its position in the array is the index wp_lb_pick()
 * returns (so pass wp_cluster.eps in order). */
struct wp_lb_endpoint {
        const char *key; /* hash identity, NUL-terminated, borrowed during wp_lb_new() only:
                          * the endpoint's "ip:port" (wp_endpoint.authority). Required by
                          * RING_HASH and MAGLEV; may be NULL otherwise. */
        uint32_t weight; /* load_balancing_weight; 0 is taken as 1 (Envoy's default) */
        uint32_t priority;
        bool healthy;
};

struct wp_lb_config {
        enum wp_lb_policy policy;
        uint32_t choice_count;      /* LEAST_REQUEST: 2..WP_LB_CHOICE_COUNT_MAX (default 2) */
        double active_request_bias; /* LEAST_REQUEST with unequal weights: >= 0 (default 1.0) */
        uint64_t min_ring_size;     /* RING_HASH: 1..8M (default 1024) */
        uint64_t max_ring_size;     /* RING_HASH: min..8M (default 8M) */
        uint64_t table_size;        /* MAGLEV: prime, <= 5000011 (default 65537) */
        uint32_t overprovisioning_factor; /* percent (default 140); _STRICT: no spill-over */
};

/* Fills cfg with Envoy's defaults and policy ROUND_ROBIN. */
void wp_lb_config_init(struct wp_lb_config *cfg);

/*
 * Builds the balancer for neps endpoints (neps may be 0: every pick returns -1). Only healthy
 * endpoints are placed. cfg and eps are borrowed. Returns 0 and *ret, or -EINVAL (bad config:
 * unknown policy, sizes out of range, table size not prime, choice_count or bias out of range,
 * too many endpoints, missing or oversized key for a hash policy; *reterr_desc is a static
 * string) or -ENOMEM. Cost: O(n log n), plus the ring (O(ring log ring)) or the Maglev table
 * (O(M) fill, 2 or 4 bytes per slot and per priority level with healthy hosts).
 */
struct wp_lb;
int wp_lb_new(const struct wp_lb_config *cfg, const struct wp_lb_endpoint *eps, size_t neps,
              struct wp_lb **ret, const char **reterr_desc);
struct wp_lb *wp_lb_free(struct wp_lb *lb); /* NULL-safe, returns NULL */

/* The policy lb was built with; the number of healthy endpoints given to wp_lb_new(). */
enum wp_lb_policy wp_lb_policy(const struct wp_lb *lb);
size_t wp_lb_healthy(const struct wp_lb *lb);

/*
 * Per-worker mutable state for lb: allocate lazily on the first pick of a cluster by a worker
 * (one allocation, O(healthy endpoints)). seed spreads workers apart (round robin starts at a
 * seed-dependent place, as Envoy's per-worker random start). The state is only valid with the lb
 * it was made for (it does not keep lb alive: it never reads it after creation).
 * Returns 0 and *ret (reference count 1) or -ENOMEM.
 */
struct wp_lb_state;
int wp_lb_state_new(const struct wp_lb *lb, uint64_t seed, struct wp_lb_state **ret);
struct wp_lb_state *wp_lb_state_ref(struct wp_lb_state *st);   /* same thread only */
struct wp_lb_state *wp_lb_state_unref(struct wp_lb_state *st); /* NULL-safe, returns NULL */

/*
 * Picks an endpoint: returns its index in the array given to wp_lb_new(), or -1 when no healthy
 * endpoint exists. No allocation; O(1) (RR unweighted, random unweighted, Maglev, P2C) or
 * O(log n) (EDF schedules, weighted random, ring search).
 *   st:   this worker's state for lb (wp_lb_state_new(lb)). May be NULL: round robin and least
 *         request then pick (weighted) at random; the hash policies never need it.
 *   hash: RING_HASH / MAGLEV request hash (wp_lb_hash() of the hash_policy input). When the
 *         route has no hash policy or its input is absent, pass a random number (Envoy picks at
 *         random then). Ignored by the other policies.
 *   rnd:  a fresh uniformly random 64-bit number per call (e.g. wp_lb_rand() on a per-worker
 *         seed); used for random picks, P2C candidates and spilling between priorities.
 */
int wp_lb_pick(const struct wp_lb *lb, struct wp_lb_state *st, uint64_t hash, uint64_t rnd);

/* Least request bookkeeping, on the worker's state: call start when the request is sent to
 * endpoint idx (the value wp_lb_pick() returned on st) and end when it completes. Counts are
 * per worker (Envoy's are per host across workers). Out-of-range idx or NULL st: no-op; end
 * never takes a count below zero. A stream that outlives the worker's current state keeps a
 * wp_lb_state_ref() and ends on it. */
void wp_lb_request_start(struct wp_lb_state *st, int idx);
void wp_lb_request_end(struct wp_lb_state *st, int idx);
/* Active requests of endpoint idx on st (0 when out of range). */
uint32_t wp_lb_active(const struct wp_lb_state *st, int idx);

/* xxHash64 of data with seed (XXH64, as Envoy's HashUtil::xxHash64): hash header values, cookie
 * values or the source IP string for hash_policy. */
uint64_t wp_lb_hash(const void *data, size_t len, uint64_t seed);

/* splitmix64: advances *state and returns the next pseudo-random number (not cryptographic). */
uint64_t wp_lb_rand(uint64_t *state);

#endif
