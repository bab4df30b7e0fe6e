/* Tests for waypoint/lb.c: distributions of each policy, health and priorities, consistency of
 * the hash policies, config validation, allocation failures. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/lb.h"

#define PICKS 100000

static const enum wp_lb_policy all_policies[] = {
    WP_LB_ROUND_ROBIN, WP_LB_LEAST_REQUEST, WP_LB_RANDOM, WP_LB_RING_HASH, WP_LB_MAGLEV,
};
#define NPOLICIES (sizeof(all_policies) / sizeof(all_policies[0]))

static char keys[64][32];

static void init_keys(void)
{
        for (int i = 0; i < 64; i++)
                snprintf(keys[i], sizeof(keys[i]), "10.0.%d.%d:8080", i / 8, i % 8 + 10);
}

/* n endpoints with the given weights (NULL: 1), all healthy, priority 0, key keys[i] */
static void make_eps(struct wp_lb_endpoint *eps, size_t n, const uint32_t *w)
{
        for (size_t i = 0; i < n; i++) {
                eps[i] = (struct wp_lb_endpoint){
                    .key = keys[i], .weight = w ? w[i] : 1, .healthy = true};
        }
}

static struct wp_lb *build(enum wp_lb_policy p, const struct wp_lb_endpoint *eps, size_t n)
{
        struct wp_lb_config cfg;
        struct wp_lb *lb = NULL;
        const char *err = NULL;

        wp_lb_config_init(&cfg);
        cfg.policy = p;
        if (wp_lb_new(&cfg, eps, n, &lb, &err) < 0) {
                fprintf(stderr, "wp_lb_new: %s\n", err);
                return NULL;
        }
        return lb;
}

/* PICKS picks into counts[]; hash and rnd random. Returns picks that failed (-1). */
static unsigned run_picks(const struct wp_lb *lb, struct wp_lb_state *st, unsigned *counts,
                          size_t n, uint64_t seed, unsigned picks)
{
        unsigned fails = 0;

        memset(counts, 0, n * sizeof(*counts));
        for (unsigned i = 0; i < picks; i++) {
                uint64_t h = wp_lb_rand(&seed), r = wp_lb_rand(&seed);
                int idx = wp_lb_pick(lb, st, h, r);

                if (idx < 0 || (size_t)idx >= n)
                        fails++;
                else
                        counts[idx]++;
        }
        return fails;
}

static bool near(double got, double want, double tol)
{
        if (fabs(got - want) <= tol)
                return true;
        fprintf(stderr, "  share %.4f, want %.4f +- %.4f\n", got, want, tol);
        return false;
}

/* ---- hash ---- */

static void test_hash_matches_xxh64_vectors(void)
{
        static const struct {
                const char *s;
                uint64_t seed, want;
        } v[] = {
            {"", 0, 0xef46db3751d8e999ULL},
            {"a", 0, 0xd24ec4f1a98c6e5bULL},
            {"abc", 0, 0x44bc2cf5ad770999ULL},
            {"1234", 0, 0xd8316e61d84f6ba4ULL},
            {"12345678", 0, 0xd2d02f08cf7cfd4aULL},
            {"123456789012345", 0, 0xc377d78ade001a3cULL},
            {"1234567890123456", 0, 0xb61c33dc6c59f270ULL},
            {"1234567890123456789012345678901", 0, 0x8f367cb873a5376eULL},
            {"12345678901234567890123456789012", 0, 0x40fd1aa52d98274cULL},
            {"this is a test", 0xcafe, 0x4228c3215949e862ULL},
        };

        for (size_t i = 0; i < sizeof(v) / sizeof(v[0]); i++) {
                uint64_t h = wp_lb_hash(v[i].s, strlen(v[i].s), v[i].seed);

                if (h != v[i].want)
                        fprintf(stderr, "  xxh64(\"%s\") = %016llx\n", v[i].s,
                                (unsigned long long)h);
                CHECK(h == v[i].want);
        }
        /* unaligned input gives the same hash */
        char buf[80];

        memcpy(buf + 3, "12345678901234567890123456789012", 32);
        CHECK(wp_lb_hash(buf + 3, 32, 0) == 0x40fd1aa52d98274cULL);
}

/* ---- round robin ---- */

static void test_round_robin_weights_1_2_3_exact(void)
{
        static const uint32_t w[] = {1, 2, 3};
        struct wp_lb_endpoint eps[3];
        struct wp_lb_state *st = NULL;
        unsigned c[3];
        struct wp_lb *lb;

        make_eps(eps, 3, w);
        lb = build(WP_LB_ROUND_ROBIN, eps, 3);
        REQUIRE(lb);
        for (uint64_t seed = 0; seed < 4; seed++) {
                REQUIRE(wp_lb_state_new(lb, seed, &st) == 0);
                /* 99996 = 6 * 16666: exact; in any window of 6 picks each host w times */
                CHECK(run_picks(lb, st, c, 3, seed, 99996) == 0);
                CHECK_INT_EQ(c[0], 16666);
                CHECK_INT_EQ(c[1], 33332);
                CHECK_INT_EQ(c[2], 49998);
                unsigned win[3] = {0};
                int seq[6];

                for (int i = 0; i < 6; i++) {
                        seq[i] = wp_lb_pick(lb, st, 0, 0);
                        REQUIRE(seq[i] >= 0 && seq[i] < 3);
                        win[seq[i]]++;
                }
                CHECK(win[0] == 1 && win[1] == 2 && win[2] == 3);
                /* smooth: the heaviest host never runs three times in a row */
                for (int i = 0; i + 2 < 6; i++)
                        CHECK(!(seq[i] == 2 && seq[i + 1] == 2 && seq[i + 2] == 2));
                st = wp_lb_state_unref(st);
        }
        wp_lb_free(lb);
}

static void test_round_robin_unweighted_cycles(void)
{
        struct wp_lb_endpoint eps[4];
        struct wp_lb_state *st = NULL;
        unsigned c[4];
        struct wp_lb *lb;

        make_eps(eps, 4, NULL);
        lb = build(WP_LB_ROUND_ROBIN, eps, 4);
        REQUIRE(lb);
        REQUIRE(wp_lb_state_new(lb, 7, &st) == 0);
        CHECK(run_picks(lb, st, c, 4, 1, PICKS) == 0);
        for (int i = 0; i < 4; i++)
                CHECK_INT_EQ(c[i], PICKS / 4);
        /* consecutive picks never repeat */
        int prev = wp_lb_pick(lb, st, 0, 0);

        for (int i = 0; i < 100; i++) {
                int cur = wp_lb_pick(lb, st, 0, 0);

                CHECK(cur != prev);
                prev = cur;
        }
        wp_lb_state_unref(st);
        wp_lb_free(lb);
}

static void test_round_robin_workers_start_apart(void)
{
        static const uint32_t w[] = {1, 2, 3, 4};
        struct wp_lb_endpoint eps[4];
        struct wp_lb *lb;
        bool differs = false;

        make_eps(eps, 4, w);
        lb = build(WP_LB_ROUND_ROBIN, eps, 4);
        REQUIRE(lb);
        int first = -1;

        for (uint64_t seed = 0; seed < 16; seed++) {
                struct wp_lb_state *st = NULL;

                REQUIRE(wp_lb_state_new(lb, seed, &st) == 0);
                int p = wp_lb_pick(lb, st, 0, 0);

                if (first < 0)
                        first = p;
                else if (p != first)
                        differs = true;
                wp_lb_state_unref(st);
        }
        CHECK(differs);
        wp_lb_free(lb);
}

static void test_round_robin_without_state_picks_weighted_random(void)
{
        static const uint32_t w[] = {1, 3};
        struct wp_lb_endpoint eps[2];
        unsigned c[2];
        struct wp_lb *lb;

        make_eps(eps, 2, w);
        lb = build(WP_LB_ROUND_ROBIN, eps, 2);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 2, 3, PICKS) == 0);
        CHECK(near((double)c[1] / PICKS, 0.75, 0.02));
        wp_lb_free(lb);
}

/* ---- random ---- */

static void test_random_weighted_within_2pct(void)
{
        static const uint32_t w[] = {1, 2, 3, 4};
        struct wp_lb_endpoint eps[4];
        unsigned c[4];
        struct wp_lb *lb;

        make_eps(eps, 4, w);
        lb = build(WP_LB_RANDOM, eps, 4);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 4, 11, PICKS) == 0);
        for (int i = 0; i < 4; i++)
                CHECK(near((double)c[i] / PICKS, w[i] / 10.0, 0.02));
        wp_lb_free(lb);

        make_eps(eps, 4, NULL);
        lb = build(WP_LB_RANDOM, eps, 4);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 4, 12, PICKS) == 0);
        for (int i = 0; i < 4; i++)
                CHECK(near((double)c[i] / PICKS, 0.25, 0.02));
        wp_lb_free(lb);
}

/* ---- least request ---- */

static void test_least_request_favours_idle_endpoints(void)
{
        struct wp_lb_endpoint eps[4];
        struct wp_lb_state *st = NULL;
        unsigned c[4];
        struct wp_lb *lb;

        make_eps(eps, 4, NULL);
        lb = build(WP_LB_LEAST_REQUEST, eps, 4);
        REQUIRE(lb);
        REQUIRE(wp_lb_state_new(lb, 1, &st) == 0);
        for (int i = 0; i < 5; i++)
                wp_lb_request_start(st, 0);
        CHECK_INT_EQ(wp_lb_active(st, 0), 5);
        /* P2C: the busy host wins only when both candidates are it: 1/16 */
        CHECK(run_picks(lb, st, c, 4, 5, PICKS) == 0);
        CHECK(near((double)c[0] / PICKS, 1.0 / 16, 0.02));
        for (int i = 1; i < 4; i++)
                CHECK(near((double)c[i] / PICKS, 5.0 / 16, 0.02));
        for (int i = 0; i < 5; i++)
                wp_lb_request_end(st, 0);
        CHECK_INT_EQ(wp_lb_active(st, 0), 0);

        /* live load: requests start on pick and end in FIFO order after 8 are in flight;
         * P2C keeps the hosts level */
        int inflight[8];
        uint64_t seed = 9;

        memset(c, 0, sizeof(c));
        for (int i = 0; i < PICKS; i++) {
                int idx = wp_lb_pick(lb, st, 0, wp_lb_rand(&seed));

                REQUIRE(idx >= 0 && idx < 4);
                c[idx]++;
                if (i >= 8)
                        wp_lb_request_end(st, inflight[i % 8]);
                wp_lb_request_start(st, idx);
                inflight[i % 8] = idx;
                for (int k = 0; k < 4; k++)
                        REQUIRE(wp_lb_active(st, k) <= 8);
        }
        for (int i = 0; i < 4; i++)
                CHECK(near((double)c[i] / PICKS, 0.25, 0.02));
        wp_lb_state_unref(st);
        wp_lb_free(lb);
}

static void test_least_request_weighted_uses_active_request_bias(void)
{
        static const uint32_t w[] = {1, 1, 2};
        struct wp_lb_endpoint eps[3];
        struct wp_lb_config cfg;
        struct wp_lb_state *st = NULL;
        const char *err;
        unsigned c[3];
        struct wp_lb *lb = NULL;

        make_eps(eps, 3, w);
        lb = build(WP_LB_LEAST_REQUEST, eps, 3);
        REQUIRE(lb);
        REQUIRE(wp_lb_state_new(lb, 2, &st) == 0);
        CHECK(run_picks(lb, st, c, 3, 2, PICKS) == 0);
        CHECK(near((double)c[2] / PICKS, 0.5, 0.02));
        /* 3 active on the weight-2 host: 2 / (3 + 1)^1 = 0.5 against 1 and 1 -> 20% */
        for (int i = 0; i < 3; i++)
                wp_lb_request_start(st, 2);
        CHECK(run_picks(lb, st, c, 3, 3, PICKS) == 0);
        CHECK(near((double)c[2] / PICKS, 0.2, 0.02));
        CHECK(near((double)c[0] / PICKS, 0.4, 0.02));
        st = wp_lb_state_unref(st);
        lb = wp_lb_free(lb);

        /* bias 0: weights only, active requests ignored */
        wp_lb_config_init(&cfg);
        cfg.policy = WP_LB_LEAST_REQUEST;
        cfg.active_request_bias = 0.0;
        REQUIRE(wp_lb_new(&cfg, eps, 3, &lb, &err) == 0);
        REQUIRE(wp_lb_state_new(lb, 2, &st) == 0);
        for (int i = 0; i < 3; i++)
                wp_lb_request_start(st, 2);
        CHECK(run_picks(lb, st, c, 3, 4, PICKS) == 0);
        CHECK(near((double)c[2] / PICKS, 0.5, 0.02));
        st = wp_lb_state_unref(st);
        lb = wp_lb_free(lb);

        /* bias 2: 2 / (1 + 1)^2 = 0.5 with one active -> 20% */
        cfg.active_request_bias = 2.0;
        REQUIRE(wp_lb_new(&cfg, eps, 3, &lb, &err) == 0);
        REQUIRE(wp_lb_state_new(lb, 2, &st) == 0);
        wp_lb_request_start(st, 2);
        CHECK(run_picks(lb, st, c, 3, 4, PICKS) == 0);
        CHECK(near((double)c[2] / PICKS, 0.2, 0.02));
        st = wp_lb_state_unref(st);
        lb = wp_lb_free(lb);

        /* fractional biases: 2 / (3 + 1)^0.5 = 1 -> thirds; 2 / (1 + 1)^1.5 = 0.7071 -> 26.1%;
         * 2 / 256^0.25 = 0.5 -> 20% */
        static const struct {
                double bias;
                int active;
                double share;
        } fr[] = {{0.5, 3, 1.0 / 3}, {1.5, 1, 0.70710678 / 2.70710678}, {0.25, 255, 0.5 / 2.5}};

        for (size_t i = 0; i < sizeof(fr) / sizeof(fr[0]); i++) {
                cfg.active_request_bias = fr[i].bias;
                REQUIRE(wp_lb_new(&cfg, eps, 3, &lb, &err) == 0);
                REQUIRE(wp_lb_state_new(lb, 2, &st) == 0);
                for (int k = 0; k < fr[i].active; k++)
                        wp_lb_request_start(st, 2);
                CHECK(run_picks(lb, st, c, 3, 4, PICKS) == 0);
                CHECK(near((double)c[2] / PICKS, fr[i].share, 0.01));
                st = wp_lb_state_unref(st);
                lb = wp_lb_free(lb);
        }
}

static void test_request_counts_are_bounded(void)
{
        struct wp_lb_endpoint eps[2];
        struct wp_lb_state *st = NULL;
        struct wp_lb *lb;

        make_eps(eps, 2, NULL);
        lb = build(WP_LB_LEAST_REQUEST, eps, 2);
        REQUIRE(lb);
        REQUIRE(wp_lb_state_new(lb, 0, &st) == 0);
        wp_lb_request_end(st, 0); /* end without start: stays 0 */
        CHECK_INT_EQ(wp_lb_active(st, 0), 0);
        wp_lb_request_start(st, -1);
        wp_lb_request_start(st, 2);
        wp_lb_request_end(st, 99);
        wp_lb_request_start(NULL, 0);
        wp_lb_request_end(NULL, 0);
        CHECK_INT_EQ(wp_lb_active(st, 2), 0);
        CHECK_INT_EQ(wp_lb_active(NULL, 0), 0);
        /* a stream keeps its own reference and ends on the state it started on */
        struct wp_lb_state *held = wp_lb_state_ref(st);

        wp_lb_request_start(held, 1);
        st = wp_lb_state_unref(st);
        CHECK(st == NULL);
        CHECK_INT_EQ(wp_lb_active(held, 1), 1);
        wp_lb_request_end(held, 1);
        CHECK_INT_EQ(wp_lb_active(held, 1), 0);
        CHECK(wp_lb_state_unref(held) == NULL);
        CHECK(wp_lb_state_unref(NULL) == NULL);
        wp_lb_free(lb);
}

static void test_state_of_another_lb_is_not_indexed(void)
{
        struct wp_lb_endpoint eps[8];
        struct wp_lb_state *st = NULL;
        struct wp_lb *small, *big;

        make_eps(eps, 8, NULL);
        small = build(WP_LB_ROUND_ROBIN, eps, 1);
        big = build(WP_LB_ROUND_ROBIN, eps, 8);
        REQUIRE(small && big);
        REQUIRE(wp_lb_state_new(small, 0, &st) == 0);
        for (int i = 0; i < 100; i++) {
                int idx = wp_lb_pick(big, st, 0, (uint64_t)i * 7919);

                CHECK(idx >= 0 && idx < 8);
        }
        wp_lb_state_unref(st);
        wp_lb_free(small);
        wp_lb_free(big);
}

/* ---- hash policies ---- */

static void check_same_key_same_endpoint(enum wp_lb_policy p)
{
        struct wp_lb_endpoint eps[6], rev[6];
        struct wp_lb *a, *b;

        make_eps(eps, 6, NULL);
        for (int i = 0; i < 6; i++)
                rev[i] = eps[5 - i];
        a = build(p, eps, 6);
        b = build(p, rev, 6); /* same endpoints, other order: same key -> same address */
        REQUIRE(a && b);
        uint64_t seed = 77;

        for (int i = 0; i < 10000; i++) {
                uint64_t h = wp_lb_rand(&seed);
                int x = wp_lb_pick(a, NULL, h, wp_lb_rand(&seed));
                int y = wp_lb_pick(a, NULL, h, wp_lb_rand(&seed));
                int z = wp_lb_pick(b, NULL, h, wp_lb_rand(&seed));

                REQUIRE(x >= 0 && y >= 0 && z >= 0);
                CHECK(x == y);
                CHECK(eps[x].key == rev[z].key);
        }
        /* the hash of a header value is stable */
        uint64_t h = wp_lb_hash("user-42", 7, 0);

        CHECK(wp_lb_pick(a, NULL, h, 1) == wp_lb_pick(a, NULL, h, 2));
        wp_lb_free(a);
        wp_lb_free(b);
}

static void check_spread(enum wp_lb_policy p, double tol)
{
        static const uint32_t w[] = {1, 3};
        struct wp_lb_endpoint eps[5];
        unsigned c[5];
        struct wp_lb *lb;

        make_eps(eps, 5, NULL);
        lb = build(p, eps, 5);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 5, 21, PICKS) == 0);
        for (int i = 0; i < 5; i++)
                CHECK(near((double)c[i] / PICKS, 0.2, tol));
        wp_lb_free(lb);

        make_eps(eps, 2, w);
        lb = build(p, eps, 2);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 2, 22, PICKS) == 0);
        CHECK(near((double)c[1] / PICKS, 0.75, tol));
        wp_lb_free(lb);
}

/* Fraction of PICKS keys that change endpoint when endpoint `gone` of n is removed (by
 * marking it unhealthy, and by dropping it from the array). */
static void check_removal_remaps_few(enum wp_lb_policy p, size_t n, double max_moved)
{
        struct wp_lb_endpoint eps[16], fewer[16];
        struct wp_lb *all, *sick, *dropped;
        const size_t gone = 2;
        unsigned moved = 0, moved_drop = 0, on_gone = 0;
        uint64_t seed = 5;

        make_eps(eps, n, NULL);
        all = build(p, eps, n);
        eps[gone].healthy = false;
        sick = build(p, eps, n);
        eps[gone].healthy = true;
        for (size_t i = 0, j = 0; i < n; i++)
                if (i != gone)
                        fewer[j++] = eps[i];
        dropped = build(p, fewer, n - 1);
        REQUIRE(all && sick && dropped);
        for (int i = 0; i < PICKS; i++) {
                uint64_t h = wp_lb_rand(&seed);
                int x = wp_lb_pick(all, NULL, h, 0);
                int y = wp_lb_pick(sick, NULL, h, 0);
                int z = wp_lb_pick(dropped, NULL, h, 0);

                REQUIRE(x >= 0 && y >= 0 && z >= 0);
                CHECK(y != (int)gone);
                if ((size_t)x == gone)
                        on_gone++;
                if (x != y)
                        moved++;
                if (eps[x].key != fewer[z].key)
                        moved_drop++;
                CHECK(eps[y].key == fewer[z].key); /* unhealthy == absent */
        }
        fprintf(stderr, "  %zu -> %zu endpoints: %.3f of keys moved (%.3f were on the removed)\n",
                n, n - 1, (double)moved / PICKS, (double)on_gone / PICKS);
        CHECK((double)moved / PICKS <= max_moved);
        CHECK(moved == moved_drop);
        CHECK(moved >= on_gone);
        wp_lb_free(all);
        wp_lb_free(sick);
        wp_lb_free(dropped);
}

static void test_ring_hash_same_key_same_endpoint(void)
{
        check_same_key_same_endpoint(WP_LB_RING_HASH);
}

static void test_ring_hash_spreads_keys(void)
{
        /* 1024 ring entries over 5 hosts: shares within 4 points of 20% */
        check_spread(WP_LB_RING_HASH, 0.04);
}

static void test_ring_hash_removal_remaps_few_keys(void)
{
        /* the removed host's 1/n, plus what the others' added vnodes take (the ring keeps
         * ~min_ring_size entries, so each survivor gets more) */
        check_removal_remaps_few(WP_LB_RING_HASH, 5, 0.40);
        check_removal_remaps_few(WP_LB_RING_HASH, 10, 0.25);
}

static void test_ring_hash_wraps_past_last_entry(void)
{
        struct wp_lb_endpoint eps[3];
        struct wp_lb *lb;

        make_eps(eps, 3, NULL);
        lb = build(WP_LB_RING_HASH, eps, 3);
        REQUIRE(lb);
        CHECK(wp_lb_pick(lb, NULL, UINT64_MAX, 0) == wp_lb_pick(lb, NULL, 0, 0));
        wp_lb_free(lb);
}

static void test_ring_hash_honours_ring_sizes(void)
{
        static const uint32_t w[] = {1, 1000};
        struct wp_lb_endpoint eps[2];
        struct wp_lb_config cfg;
        struct wp_lb *lb = NULL;
        const char *err;
        unsigned c[2];

        /* max_ring_size caps the ring: the light host may get no entry at all but the ring
         * still answers */
        make_eps(eps, 2, w);
        wp_lb_config_init(&cfg);
        cfg.policy = WP_LB_RING_HASH;
        cfg.min_ring_size = 1;
        cfg.max_ring_size = 4;
        REQUIRE(wp_lb_new(&cfg, eps, 2, &lb, &err) == 0);
        CHECK(run_picks(lb, NULL, c, 2, 1, 1000) == 0);
        CHECK(c[1] >= c[0]);
        wp_lb_free(lb);
}

static void test_maglev_same_key_same_endpoint(void)
{
        check_same_key_same_endpoint(WP_LB_MAGLEV);
}

static void test_maglev_spreads_keys(void)
{
        /* Maglev balances to within one slot per host: random keys give ~binomial noise */
        check_spread(WP_LB_MAGLEV, 0.02);
}

static void test_maglev_removal_remaps_few_keys(void)
{
        check_removal_remaps_few(WP_LB_MAGLEV, 5, 0.25);
        check_removal_remaps_few(WP_LB_MAGLEV, 10, 0.13);
}

static void test_maglev_many_endpoints_use_wide_table(void)
{
        enum { N = 70000 };
        static struct wp_lb_endpoint eps[N];
        static char kb[N][24];
        static unsigned c[N];
        struct wp_lb_config cfg;
        struct wp_lb *lb = NULL;
        const char *err;
        size_t hit = 0;

        for (int i = 0; i < N; i++) {
                snprintf(kb[i], sizeof(kb[i]), "10.%d.%d.%d:80", i >> 16, (i >> 8) & 255, i & 255);
                eps[i] = (struct wp_lb_endpoint){.key = kb[i], .weight = 1, .healthy = true};
        }
        wp_lb_config_init(&cfg);
        cfg.policy = WP_LB_MAGLEV;
        cfg.table_size = 131071;
        REQUIRE(wp_lb_new(&cfg, eps, N, &lb, &err) == 0);
        CHECK(run_picks(lb, NULL, c, N, 3, 400000) == 0);
        for (int i = 0; i < N; i++)
                hit += c[i] > 0;
        CHECK(hit > N * 9 / 10);
        wp_lb_free(lb);
}

/* ---- health and priorities ---- */

static void test_unhealthy_endpoints_are_never_picked(void)
{
        struct wp_lb_endpoint eps[6];
        unsigned c[6];

        make_eps(eps, 6, NULL);
        eps[1].healthy = false;
        eps[4].healthy = false;
        eps[5].weight = 3;
        for (size_t p = 0; p < NPOLICIES; p++) {
                struct wp_lb *lb = build(all_policies[p], eps, 6);
                struct wp_lb_state *st = NULL;

                REQUIRE(lb);
                CHECK_INT_EQ(wp_lb_healthy(lb), 4);
                REQUIRE(wp_lb_state_new(lb, p, &st) == 0);
                CHECK(run_picks(lb, st, c, 6, p, 20000) == 0);
                CHECK_INT_EQ(c[1], 0);
                CHECK_INT_EQ(c[4], 0);
                CHECK(c[0] > 0 && c[2] > 0 && c[3] > 0 && c[5] > 0);
                wp_lb_state_unref(st);
                wp_lb_free(lb);
        }
}

static void test_no_healthy_endpoint_picks_nothing(void)
{
        struct wp_lb_endpoint eps[3];

        make_eps(eps, 3, NULL);
        for (int i = 0; i < 3; i++)
                eps[i].healthy = false;
        for (size_t p = 0; p < NPOLICIES; p++) {
                struct wp_lb *empty = build(all_policies[p], eps, 0);
                struct wp_lb *sick = build(all_policies[p], eps, 3);
                struct wp_lb_state *st = NULL;

                REQUIRE(empty && sick);
                CHECK_INT_EQ(wp_lb_healthy(sick), 0);
                CHECK(wp_lb_pick(empty, NULL, 1, 2) == -1);
                CHECK(wp_lb_pick(sick, NULL, 1, 2) == -1);
                REQUIRE(wp_lb_state_new(sick, 0, &st) == 0);
                CHECK(wp_lb_pick(sick, st, 1, 2) == -1);
                wp_lb_state_unref(st);
                REQUIRE(wp_lb_state_new(empty, 0, &st) == 0);
                CHECK(wp_lb_pick(empty, st, 1, 2) == -1);
                wp_lb_state_unref(st);
                wp_lb_free(empty);
                wp_lb_free(sick);
        }
        CHECK(wp_lb_pick(NULL, NULL, 0, 0) == -1);
        CHECK(wp_lb_free(NULL) == NULL);
}

/* P0 = {0, 1}, P1 = {2, 3}; strict rule: P1 only when P0 has no healthy host */
static void test_priority_fallback_strict(void)
{
        struct wp_lb_endpoint eps[4];
        struct wp_lb_config cfg;
        unsigned c[4];
        const char *err;

        make_eps(eps, 4, NULL);
        eps[2].priority = eps[3].priority = 1;
        wp_lb_config_init(&cfg);
        cfg.overprovisioning_factor = WP_LB_OVERPROVISIONING_STRICT;
        for (size_t p = 0; p < NPOLICIES; p++) {
                struct wp_lb *lb = NULL;
                struct wp_lb_state *st = NULL;

                cfg.policy = all_policies[p];
                eps[0].healthy = true;
                eps[1].healthy = false; /* half of P0 down: still all on P0 */
                REQUIRE(wp_lb_new(&cfg, eps, 4, &lb, &err) == 0);
                REQUIRE(wp_lb_state_new(lb, 0, &st) == 0);
                CHECK(run_picks(lb, st, c, 4, p, 10000) == 0);
                CHECK_INT_EQ(c[0], 10000);
                st = wp_lb_state_unref(st);
                lb = wp_lb_free(lb);

                eps[0].healthy = false; /* P0 all down: P1 takes over */
                REQUIRE(wp_lb_new(&cfg, eps, 4, &lb, &err) == 0);
                REQUIRE(wp_lb_state_new(lb, 0, &st) == 0);
                CHECK(run_picks(lb, st, c, 4, p, 10000) == 0);
                CHECK(c[0] == 0 && c[1] == 0 && c[2] > 0 && c[3] > 0);
                wp_lb_state_unref(st);
                wp_lb_free(lb);
        }
}

/* Envoy's overprovisioning (1.4): P0 with 1 of 2 healthy has health 70% -> 70/30 split; with 3
 * of 4 healthy 105% -> everything stays on P0. */
static void test_priority_overprovisioning_spills(void)
{
        struct wp_lb_endpoint eps[6];
        unsigned c[6];

        make_eps(eps, 6, NULL);
        eps[2].priority = eps[3].priority = 1;
        eps[4].priority = eps[5].priority = 2;
        eps[1].healthy = false;
        for (size_t p = 0; p < NPOLICIES; p++) {
                struct wp_lb *lb = build(all_policies[p], eps, 6);
                struct wp_lb_state *st = NULL;

                REQUIRE(lb);
                REQUIRE(wp_lb_state_new(lb, 0, &st) == 0);
                CHECK(run_picks(lb, st, c, 6, p + 40, PICKS) == 0);
                CHECK(near((double)c[0] / PICKS, 0.70, 0.02));
                CHECK(near((double)(c[2] + c[3]) / PICKS, 0.30, 0.02));
                CHECK_INT_EQ(c[4] + c[5], 0);
                wp_lb_state_unref(st);
                wp_lb_free(lb);
        }

        /* P0 3 of 4 healthy: 140 * 3 / 4 = 105 -> 100% */
        struct wp_lb_endpoint e2[5];

        make_eps(e2, 5, NULL);
        e2[3].healthy = false;
        e2[4].priority = 1;
        struct wp_lb *lb = build(WP_LB_RANDOM, e2, 5);

        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c, 5, 1, 10000) == 0);
        CHECK_INT_EQ(c[4], 0);
        wp_lb_free(lb);

        /* all priorities degraded: 1 of 4 (35%) and 1 of 4 (35%) -> normalised 50/50 */
        struct wp_lb_endpoint e3[8];

        make_eps(e3, 8, NULL);
        for (int i = 0; i < 8; i++) {
                e3[i].priority = i / 4;
                e3[i].healthy = i % 4 == 0;
        }
        unsigned c8[8];

        lb = build(WP_LB_RANDOM, e3, 8);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, c8, 8, 2, PICKS) == 0);
        CHECK(near((double)c8[0] / PICKS, 0.5, 0.02));
        CHECK(near((double)c8[4] / PICKS, 0.5, 0.02));
        wp_lb_free(lb);

        /* health rounds to 0% (1 healthy of 200): still served, by the lowest priority */
        static struct wp_lb_endpoint big[201];
        static unsigned cb[201];

        for (int i = 0; i < 201; i++)
                big[i] = (struct wp_lb_endpoint){
                    .weight = 1, .healthy = i == 7, .priority = i == 200 ? 3 : 1};
        big[200].healthy = false;
        lb = build(WP_LB_ROUND_ROBIN, big, 201);
        REQUIRE(lb);
        CHECK(run_picks(lb, NULL, cb, 201, 2, 1000) == 0);
        CHECK_INT_EQ(cb[7], 1000);
        wp_lb_free(lb);
}

static void test_priority_spill_is_per_key_for_hash_policies(void)
{
        struct wp_lb_endpoint eps[4];

        make_eps(eps, 4, NULL);
        eps[2].priority = eps[3].priority = 1;
        eps[1].healthy = false;
        for (int p = WP_LB_RING_HASH; p <= WP_LB_MAGLEV; p++) {
                struct wp_lb *lb = build((enum wp_lb_policy)p, eps, 4);
                uint64_t seed = 3;

                REQUIRE(lb);
                for (int i = 0; i < 1000; i++) {
                        uint64_t h = wp_lb_rand(&seed);

                        CHECK(wp_lb_pick(lb, NULL, h, 1) == wp_lb_pick(lb, NULL, h, 99));
                }
                wp_lb_free(lb);
        }
}

/* ---- config validation ---- */

static void test_new_rejects_bad_config(void)
{
        struct wp_lb_endpoint eps[2];
        struct wp_lb_config cfg;
        struct wp_lb *lb = NULL;
        const char *err;
        char longkey[WP_LB_KEY_MAX + 2];

        make_eps(eps, 2, NULL);
#define BAD(field, value, pol)                                                                     \
        do {                                                                                       \
                wp_lb_config_init(&cfg);                                                           \
                cfg.policy = pol;                                                                  \
                cfg.field = value;                                                                 \
                err = NULL;                                                                        \
                CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), -EINVAL);                         \
                CHECK(err != NULL);                                                                \
                CHECK(lb == NULL);                                                                 \
        } while (0)
        BAD(policy, (enum wp_lb_policy)99, WP_LB_RANDOM);
        BAD(choice_count, 1, WP_LB_LEAST_REQUEST);
        BAD(choice_count, WP_LB_CHOICE_COUNT_MAX + 1, WP_LB_LEAST_REQUEST);
        BAD(active_request_bias, -0.5, WP_LB_LEAST_REQUEST);
        BAD(active_request_bias, NAN, WP_LB_LEAST_REQUEST);
        BAD(active_request_bias, INFINITY, WP_LB_LEAST_REQUEST);
        BAD(min_ring_size, 0, WP_LB_RING_HASH);
        BAD(min_ring_size, WP_LB_RING_SIZE_LIMIT + 1ULL, WP_LB_RING_HASH);
        BAD(max_ring_size, WP_LB_RING_SIZE_LIMIT + 1ULL, WP_LB_RING_HASH);
        BAD(max_ring_size, 512, WP_LB_RING_HASH); /* < min 1024 */
        BAD(table_size, 65536, WP_LB_MAGLEV);     /* not prime */
        BAD(table_size, 1, WP_LB_MAGLEV);
        BAD(table_size, 5000017, WP_LB_MAGLEV); /* prime but above the limit */
        BAD(overprovisioning_factor, 0, WP_LB_RANDOM);
#undef BAD
        /* hash policies need a key per healthy endpoint, of bounded length */
        wp_lb_config_init(&cfg);
        for (int p = WP_LB_RING_HASH; p <= WP_LB_MAGLEV; p++) {
                cfg.policy = (enum wp_lb_policy)p;
                eps[1].key = NULL;
                CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), -EINVAL);
                eps[1].healthy = false; /* not placed: no key needed */
                CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), 0);
                lb = wp_lb_free(lb);
                eps[1].healthy = true;
                memset(longkey, 'k', sizeof(longkey) - 1);
                longkey[sizeof(longkey) - 1] = 0;
                eps[1].key = longkey;
                CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), -EINVAL);
                longkey[WP_LB_KEY_MAX] = 0; /* exactly the limit is fine */
                CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), 0);
                lb = wp_lb_free(lb);
                eps[1].key = keys[1];
        }
        /* key not needed for the others */
        eps[0].key = eps[1].key = NULL;
        cfg.policy = WP_LB_ROUND_ROBIN;
        CHECK_INT_EQ(wp_lb_new(&cfg, eps, 2, &lb, &err), 0);
        wp_lb_free(lb);
        /* 0 weight counts as 1 */
        make_eps(eps, 2, NULL);
        eps[0].weight = 0;
        cfg.policy = WP_LB_RANDOM;
        REQUIRE(wp_lb_new(&cfg, eps, 2, &lb, &err) == 0);
        unsigned c[2];

        CHECK(run_picks(lb, NULL, c, 2, 1, PICKS) == 0);
        CHECK(near((double)c[0] / PICKS, 0.5, 0.02));
        CHECK(wp_lb_policy(lb) == WP_LB_RANDOM);
        wp_lb_free(lb);
        /* too many endpoints is refused before reading them */
        CHECK_INT_EQ(wp_lb_new(&cfg, eps, WP_LB_MAX_ENDPOINTS + 1, &lb, &err), -EINVAL);
}

/* ---- allocation failures ---- */

static int build_and_pick(void *arg)
{
        enum wp_lb_policy p = *(enum wp_lb_policy *)arg;
        struct wp_lb_endpoint eps[7];
        static const uint32_t w[] = {1, 2, 3, 1, 1, 5, 1};
        struct wp_lb_config cfg;
        struct wp_lb *lb = NULL;
        struct wp_lb_state *st = NULL;
        const char *err = NULL;
        int r;

        make_eps(eps, 7, w);
        eps[2].healthy = false;
        eps[3].priority = eps[4].priority = 1;
        eps[5].priority = eps[6].priority = 2;
        eps[0].healthy = false; /* P0 at 50% health: P0 and P1 both carry traffic */
        wp_lb_config_init(&cfg);
        cfg.policy = p;
        cfg.table_size = 251;
        r = wp_lb_new(&cfg, eps, 7, &lb, &err);
        if (r < 0) {
                if (r != -ENOMEM || !err)
                        return -EPROTO;
                return r;
        }
        r = wp_lb_state_new(lb, 1, &st);
        if (r < 0) {
                wp_lb_free(lb);
                return r;
        }
        for (uint64_t i = 0; i < 64; i++) {
                int idx = wp_lb_pick(lb, st, i * 0x9E3779B97F4A7C15ULL, i * 31);

                if (idx < 0 || idx == 0 || idx == 2) {
                        r = -EPROTO;
                        break;
                }
                wp_lb_request_start(st, idx);
        }
        wp_lb_state_unref(st);
        wp_lb_free(lb);
        return r < 0 ? -EPROTO : 0;
}

static void test_failalloc_build_and_state(void)
{
        for (size_t p = 0; p < NPOLICIES; p++) {
                enum wp_lb_policy pol = all_policies[p];
                unsigned n = check_failalloc_run(build_and_pick, &pol);

                CHECK(n >= 3);
        }
}

int main(void)
{
        init_keys();
        RUN(test_hash_matches_xxh64_vectors);
        RUN(test_round_robin_weights_1_2_3_exact);
        RUN(test_round_robin_unweighted_cycles);
        RUN(test_round_robin_workers_start_apart);
        RUN(test_round_robin_without_state_picks_weighted_random);
        RUN(test_random_weighted_within_2pct);
        RUN(test_least_request_favours_idle_endpoints);
        RUN(test_least_request_weighted_uses_active_request_bias);
        RUN(test_request_counts_are_bounded);
        RUN(test_state_of_another_lb_is_not_indexed);
        RUN(test_ring_hash_same_key_same_endpoint);
        RUN(test_ring_hash_spreads_keys);
        RUN(test_ring_hash_removal_remaps_few_keys);
        RUN(test_ring_hash_wraps_past_last_entry);
        RUN(test_ring_hash_honours_ring_sizes);
        RUN(test_maglev_same_key_same_endpoint);
        RUN(test_maglev_spreads_keys);
        RUN(test_maglev_removal_remaps_few_keys);
        RUN(test_maglev_many_endpoints_use_wide_table);
        RUN(test_unhealthy_endpoints_are_never_picked);
        RUN(test_no_healthy_endpoint_picks_nothing);
        RUN(test_priority_fallback_strict);
        RUN(test_priority_overprovisioning_spills);
        RUN(test_priority_spill_is_per_key_for_hash_policies);
        RUN(test_new_rejects_bad_config);
        RUN(test_failalloc_build_and_state);
        return check_exit();
}
