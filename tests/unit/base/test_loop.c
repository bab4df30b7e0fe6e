/*
 * Loop tests. Every scenario runs on both backends (io_uring, epoll); the io_uring pass is
 * skipped when io_uring_setup() is refused (seccomp: EPERM, old kernel: ENOSYS).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "check.h"
#include "waypoint/base/alloc.h"
#include "waypoint/base/loop.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"

static enum wp_io_backend backend;

struct res_op {
        struct wp_op op;
        int res;
        int calls;
};

static void on_res(struct wp_op *op, int res)
{
        struct res_op *r = container_of(op, struct res_op, op);

        r->res = res;
        r->calls++;
}

static void res_op_init(struct res_op *r)
{
        wp_op_init(&r->op, on_res);
        r->res = 0;
        r->calls = 0;
}

/* Runs the loop until cond holds or 5 s pass. */
#define LOOP_UNTIL(loop, cond)                                                                     \
        do {                                                                                       \
                uint64_t _end = wp_now_ns() + 5 * WP_NSEC_PER_SEC;                                 \
                while (!(cond) && wp_now_ns() < _end)                                              \
                        if (wp_loop_run_once(loop, 100 * WP_NSEC_PER_MSEC) < 0)                    \
                                break;                                                             \
        } while (0)

static struct wp_loop *loop_new(void)
{
        struct wp_loop *loop = NULL;
        const char *desc = NULL;
        int r = wp_loop_new(backend, 64, &loop, &desc);

        if (r < 0) {
                fprintf(stderr, "wp_loop_new(%s): %s (%s)\n", wp_io_backend_name(backend),
                        strerror(-r), desc ? desc : "");
                return NULL;
        }
        if (wp_loop_backend(loop) != backend) {
                fprintf(stderr, "wrong backend\n");
                wp_loop_free(loop);
                return NULL;
        }
        return loop;
}

static int pair(int sv[2])
{
        return socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv);
}

static int tcp_socket(void)
{
        return socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
}

static int tcp_listener(struct sockaddr_in *ret_addr)
{
        socklen_t len = sizeof(*ret_addr);
        int fd = tcp_socket();

        memset(ret_addr, 0, sizeof(*ret_addr));
        ret_addr->sin_family = AF_INET;
        ret_addr->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        if (fd < 0 || bind(fd, (struct sockaddr *)ret_addr, sizeof(*ret_addr)) < 0 ||
            listen(fd, 128) < 0 || getsockname(fd, (struct sockaddr *)ret_addr, &len) < 0)
                exit(99);
        return fd;
}

static void test_recv_send_socketpair(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op rd, wr, rd2;
        char buf[32] = {0}, buf2[32] = {0};
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        res_op_init(&rd);
        res_op_init(&wr);
        res_op_init(&rd2);
        wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
        wp_loop_send(loop, &wr.op, sv[1], "hello", 5);
        CHECK(wp_op_inflight(&rd.op) && wp_op_inflight(&wr.op));
        CHECK_INT_EQ(wp_loop_inflight(loop), 2);
        /* completions run from run_once only */
        CHECK_INT_EQ(rd.calls + wr.calls, 0);
        LOOP_UNTIL(loop, rd.calls && wr.calls);
        CHECK_INT_EQ(wr.calls, 1);
        CHECK_INT_EQ(wr.res, 5);
        CHECK_INT_EQ(rd.calls, 1);
        CHECK_INT_EQ(rd.res, 5);
        CHECK(memcmp(buf, "hello", 5) == 0);
        CHECK(!wp_op_inflight(&rd.op));
        CHECK_INT_EQ(wp_loop_inflight(loop), 0);

        /* data already there: still completes only from run_once */
        REQUIRE(write(sv[1], "again", 5) == 5);
        wp_loop_recv(loop, &rd2.op, sv[0], buf2, sizeof(buf2));
        CHECK_INT_EQ(rd2.calls, 0);
        LOOP_UNTIL(loop, rd2.calls);
        CHECK_INT_EQ(rd2.res, 5);
        CHECK(memcmp(buf2, "again", 5) == 0);

        close(sv[0]);
        close(sv[1]);
        wp_loop_free(loop);
}

static void test_recv_reports_eof_as_zero(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op rd;
        char buf[8];
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        res_op_init(&rd);
        wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(rd.calls, 0);
        close(sv[1]);
        LOOP_UNTIL(loop, rd.calls);
        CHECK_INT_EQ(rd.calls, 1);
        CHECK_INT_EQ(rd.res, 0);
        close(sv[0]);
        wp_loop_free(loop);
}

static void test_send_to_closed_peer_fails_without_sigpipe(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op wr;
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        close(sv[1]);
        res_op_init(&wr);
        wp_loop_send(loop, &wr.op, sv[0], "x", 1);
        LOOP_UNTIL(loop, wr.calls);
        CHECK_INT_EQ(wr.res, -EPIPE);
        close(sv[0]);
        wp_loop_free(loop);
}

static void test_send_waits_for_buffer_space(void)
{
        struct wp_loop *loop = loop_new();
        static char junk[65536];
        struct res_op wr;
        size_t filled = 0;
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        for (;;) {
                ssize_t n = send(sv[0], junk, sizeof(junk), MSG_DONTWAIT);
                if (n <= 0)
                        break;
                filled += (size_t)n;
        }
        CHECK(filled > 0);
        res_op_init(&wr);
        wp_loop_send(loop, &wr.op, sv[0], "tail", 4);
        wp_loop_run_once(loop, 20 * WP_NSEC_PER_MSEC);
        CHECK_INT_EQ(wr.calls, 0);
        while (filled > 0) {
                ssize_t n = recv(sv[1], junk, sizeof(junk), MSG_DONTWAIT);
                if (n <= 0)
                        break;
                filled -= (size_t)n;
        }
        LOOP_UNTIL(loop, wr.calls);
        CHECK_INT_EQ(wr.res, 4);
        close(sv[0]);
        close(sv[1]);
        wp_loop_free(loop);
}

static void test_accept_and_connect_over_loopback(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op acc, con, rd, wr;
        struct sockaddr_in addr;
        char buf[16] = {0};
        int lfd, cfd;

        REQUIRE(loop);
        lfd = tcp_listener(&addr);
        cfd = tcp_socket();
        REQUIRE(cfd >= 0);
        res_op_init(&acc);
        res_op_init(&con);
        wp_loop_accept(loop, &acc.op, lfd);
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(acc.calls, 0);
        wp_loop_connect(loop, &con.op, cfd, (struct sockaddr *)&addr, sizeof(addr));
        LOOP_UNTIL(loop, acc.calls && con.calls);
        CHECK_INT_EQ(con.res, 0);
        REQUIRE(acc.res >= 0);
        CHECK(fcntl(acc.res, F_GETFL) & O_NONBLOCK);
        CHECK(fcntl(acc.res, F_GETFD) & FD_CLOEXEC);

        res_op_init(&rd);
        res_op_init(&wr);
        wp_loop_recv(loop, &rd.op, acc.res, buf, sizeof(buf));
        wp_loop_send(loop, &wr.op, cfd, "over tcp", 8);
        LOOP_UNTIL(loop, rd.calls && wr.calls);
        CHECK_INT_EQ(wr.res, 8);
        CHECK_INT_EQ(rd.res, 8);
        CHECK(memcmp(buf, "over tcp", 8) == 0);
        close(acc.res);
        close(cfd);
        close(lfd);
        wp_loop_free(loop);
}

static void test_connect_to_closed_port_is_refused(void)
{
        struct wp_loop *loop = loop_new();
        struct sockaddr_in addr;
        socklen_t len = sizeof(addr);
        struct res_op con;
        int fd, cfd;

        REQUIRE(loop);
        /* a bound but not listening port refuses connections */
        fd = tcp_socket();
        memset(&addr, 0, sizeof(addr));
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        REQUIRE(bind(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0);
        REQUIRE(getsockname(fd, (struct sockaddr *)&addr, &len) == 0);
        cfd = tcp_socket();
        res_op_init(&con);
        wp_loop_connect(loop, &con.op, cfd, (struct sockaddr *)&addr, sizeof(addr));
        LOOP_UNTIL(loop, con.calls);
        CHECK_INT_EQ(con.calls, 1);
        CHECK_INT_EQ(con.res, -ECONNREFUSED);
        close(cfd);
        close(fd);
        wp_loop_free(loop);
}

static void test_cancel_pending_recv_then_reuse_op(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op rd;
        char buf[8] = {0};
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        res_op_init(&rd);
        wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
        wp_loop_run_once(loop, 0);
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(rd.calls, 0);
        wp_loop_cancel(loop, &rd.op);
        wp_loop_cancel(loop, &rd.op); /* twice is harmless */
        CHECK_INT_EQ(rd.calls, 0);
        LOOP_UNTIL(loop, rd.calls);
        CHECK_INT_EQ(rd.calls, 1);
        CHECK_INT_EQ(rd.res, -ECANCELED);
        CHECK_INT_EQ(wp_loop_inflight(loop), 0);
        wp_loop_cancel(loop, &rd.op); /* not in flight: no-op */

        /* the op is reusable and the fd still works */
        wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
        REQUIRE(write(sv[1], "abc", 3) == 3);
        LOOP_UNTIL(loop, rd.calls == 2);
        CHECK_INT_EQ(rd.calls, 2);
        CHECK_INT_EQ(rd.res, 3);
        CHECK(memcmp(buf, "abc", 3) == 0);

        /* cancel right after submitting, before the loop ran */
        wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
        wp_loop_cancel(loop, &rd.op);
        LOOP_UNTIL(loop, rd.calls == 3);
        CHECK_INT_EQ(rd.res, -ECANCELED);

        /* cancel of a parked accept */
        struct sockaddr_in addr;
        int lfd = tcp_listener(&addr);
        wp_loop_accept(loop, &rd.op, lfd);
        wp_loop_run_once(loop, 0);
        wp_loop_cancel(loop, &rd.op);
        LOOP_UNTIL(loop, rd.calls == 4);
        CHECK_INT_EQ(rd.res, -ECANCELED);
        CHECK_INT_EQ(wp_loop_inflight(loop), 0);
        close(lfd);
        close(sv[0]);
        close(sv[1]);
        wp_loop_free(loop);
}

/* Closing an fd after its ops completed and getting the same number for a new socket must not
 * confuse the loop (stale epoll registration). */
static void test_fd_number_reuse_after_close(void)
{
        struct wp_loop *loop = loop_new();
        struct res_op rd, wr;
        char buf[8];
        int sv[2], sv2[2];

        REQUIRE(loop);
        for (int round = 0; round < 3; round++) {
                REQUIRE(pair(sv) == 0);
                res_op_init(&rd);
                wp_loop_recv(loop, &rd.op, sv[0], buf, sizeof(buf));
                REQUIRE(write(sv[1], "1", 1) == 1);
                LOOP_UNTIL(loop, rd.calls);
                CHECK_INT_EQ(rd.res, 1);
                close(sv[0]);
                close(sv[1]);

                REQUIRE(pair(sv2) == 0);
                CHECK_INT_EQ(sv2[0], sv[0]); /* lowest free numbers come back */
                res_op_init(&rd);
                res_op_init(&wr);
                wp_loop_recv(loop, &rd.op, sv2[0], buf, sizeof(buf));
                wp_loop_run_once(loop, 10 * WP_NSEC_PER_MSEC);
                CHECK_INT_EQ(rd.calls, 0);
                wp_loop_send(loop, &wr.op, sv2[1], "22", 2);
                LOOP_UNTIL(loop, rd.calls && wr.calls);
                CHECK_INT_EQ(rd.res, 2);
                close(sv2[0]);
                close(sv2[1]);
        }
        wp_loop_free(loop);
}

/* --- timers --- */

struct order_timer {
        struct wp_timer t;
        int id;
        int *log, *nlog;
};

static void on_order_fire(struct wp_timer *t)
{
        struct order_timer *o = container_of(t, struct order_timer, t);

        o->log[(*o->nlog)++] = o->id;
}

static void test_timers_fire_in_deadline_order(void)
{
        struct wp_loop *loop = loop_new();
        struct order_timer ts[5] = {0};
        int log[16], nlog = 0;
        uint64_t now = wp_now_ns(), start;

        REQUIRE(loop);
        for (int i = 0; i < 5; i++) {
                ts[i].t.on_fire = on_order_fire;
                ts[i].id = i;
                ts[i].log = log;
                ts[i].nlog = &nlog;
        }
        wp_timer_arm(loop, &ts[0].t, now + 40 * WP_NSEC_PER_MSEC);
        wp_timer_arm(loop, &ts[1].t, now + 10 * WP_NSEC_PER_MSEC);
        wp_timer_arm(loop, &ts[2].t, now + 30 * WP_NSEC_PER_MSEC);
        wp_timer_arm(loop, &ts[3].t, now + 20 * WP_NSEC_PER_MSEC);
        wp_timer_arm(loop, &ts[4].t, now + 25 * WP_NSEC_PER_MSEC);
        CHECK(wp_timer_armed(&ts[0].t));
        /* disarm one, re-arm another earlier, one later */
        wp_timer_disarm(loop, &ts[4].t);
        CHECK(!wp_timer_armed(&ts[4].t));
        wp_timer_disarm(loop, &ts[4].t); /* twice is harmless */
        wp_timer_arm(loop, &ts[0].t, now + 5 * WP_NSEC_PER_MSEC);
        wp_timer_arm(loop, &ts[1].t, now + 50 * WP_NSEC_PER_MSEC);

        start = wp_now_ns();
        /* a long max wait is cut short by the next timer */
        while (nlog < 4 && wp_now_ns() - start < 2 * WP_NSEC_PER_SEC)
                wp_loop_run_once(loop, 10 * WP_NSEC_PER_SEC);
        CHECK(wp_now_ns() - start < WP_NSEC_PER_SEC);
        REQUIRE(nlog == 4);
        CHECK_INT_EQ(log[0], 0);
        CHECK_INT_EQ(log[1], 3);
        CHECK_INT_EQ(log[2], 2);
        CHECK_INT_EQ(log[3], 1);
        CHECK(wp_now_ns() >= now + 50 * WP_NSEC_PER_MSEC);
        for (int i = 0; i < 5; i++)
                CHECK(!wp_timer_armed(&ts[i].t));
        wp_loop_free(loop);
}

struct rearm_timer {
        struct wp_timer t;
        struct wp_loop *loop;
        int fired;
};

static void on_rearm_fire(struct wp_timer *t)
{
        struct rearm_timer *r = container_of(t, struct rearm_timer, t);

        /* re-arming in the past must not trap the loop in this iteration */
        if (++r->fired < 3)
                wp_timer_arm(r->loop, t, 0);
}

static void test_timer_rearmed_from_callback(void)
{
        struct wp_loop *loop = loop_new();
        struct rearm_timer r = {.t.on_fire = on_rearm_fire};

        REQUIRE(loop);
        r.loop = loop;
        wp_timer_arm(loop, &r.t, wp_now_ns());
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(r.fired, 1);
        CHECK(wp_timer_armed(&r.t));
        wp_loop_run_once(loop, 0);
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(r.fired, 3);
        CHECK(!wp_timer_armed(&r.t));
        wp_loop_free(loop);
}

static void test_many_timers_random_order(void)
{
        struct wp_loop *loop = loop_new();
        enum { N = 500 };
        static struct order_timer ts[N];
        static int log[N];
        int nlog = 0;
        uint64_t base = wp_now_ns() - WP_NSEC_PER_SEC; /* all already expired */

        REQUIRE(loop);
        srand(42);
        for (int i = 0; i < N; i++) {
                ts[i] = (struct order_timer){
                    .t.on_fire = on_order_fire, .id = i, .log = log, .nlog = &nlog};
                wp_timer_arm(loop, &ts[i].t, base + (uint64_t)(rand() % 100000));
        }
        for (int i = 0; i < N; i += 3) /* disarm a third */
                wp_timer_disarm(loop, &ts[i].t);
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(nlog, N - (N + 2) / 3);
        for (int i = 1; i < nlog; i++)
                CHECK(ts[log[i - 1]].t.deadline <= ts[log[i]].t.deadline);
        wp_loop_free(loop);
}

/* --- deferred tasks --- */

struct counting_task {
        struct wp_task t;
        struct wp_loop *loop;
        int runs;
        bool requeue;
        int *order;
};

static void on_task(struct wp_task *t)
{
        struct counting_task *c = container_of(t, struct counting_task, t);

        c->runs++;
        if (c->order)
                *c->order = 2;
        if (c->requeue)
                wp_loop_defer(c->loop, t);
}

static void test_deferred_task_runs_once_per_iteration(void)
{
        struct wp_loop *loop = loop_new();
        struct counting_task a = {.t.run = on_task}, b = {.t.run = on_task};
        int n;

        REQUIRE(loop);
        a.loop = b.loop = loop;
        b.requeue = true;
        wp_loop_defer(loop, &a.t);
        wp_loop_defer(loop, &a.t); /* already queued: no-op */
        wp_loop_defer(loop, &b.t);
        CHECK_INT_EQ(a.runs + b.runs, 0);
        /* a pending task means run_once does not block */
        uint64_t start = wp_now_ns();
        n = wp_loop_run_once(loop, 5 * WP_NSEC_PER_SEC);
        CHECK(wp_now_ns() - start < WP_NSEC_PER_SEC);
        CHECK(n >= 2);
        CHECK_INT_EQ(a.runs, 1);
        CHECK_INT_EQ(b.runs, 1); /* re-queued itself: runs in the next iteration only */
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(a.runs, 1);
        CHECK_INT_EQ(b.runs, 2);
        b.requeue = false;
        wp_loop_run_once(loop, 0);
        wp_loop_run_once(loop, 0);
        CHECK_INT_EQ(b.runs, 3);
        wp_loop_free(loop);
}

/* Tasks run after the completions of the same iteration. */
struct ordered {
        struct res_op rd;
        struct wp_task task;
        int seq, rd_seq, task_seq;
};

static void on_ordered_rd(struct wp_op *op, int res)
{
        struct ordered *o = container_of(op, struct ordered, rd.op);

        o->rd_seq = ++o->seq;
        o->rd.calls++;
}

static void on_ordered_task(struct wp_task *t)
{
        struct ordered *o = container_of(t, struct ordered, task);

        o->task_seq = ++o->seq;
}

static void test_deferred_tasks_run_after_completions(void)
{
        struct wp_loop *loop = loop_new();
        struct ordered o = {0};
        char buf[4];
        int sv[2];

        REQUIRE(loop);
        REQUIRE(pair(sv) == 0);
        wp_op_init(&o.rd.op, on_ordered_rd);
        o.task.run = on_ordered_task;
        REQUIRE(write(sv[1], "x", 1) == 1);
        wp_loop_recv(loop, &o.rd.op, sv[0], buf, sizeof(buf));
        /* let the recv reach the kernel first, then queue the task */
        for (int i = 0; i < 50 && !o.rd.calls; i++) {
                wp_loop_defer(loop, &o.task);
                wp_loop_run_once(loop, 10 * WP_NSEC_PER_MSEC);
        }
        CHECK(o.rd.calls == 1);
        CHECK(o.task_seq > o.rd_seq);
        close(sv[0]);
        close(sv[1]);
        wp_loop_free(loop);
}

/* --- cross-thread wake --- */

struct waker {
        struct wp_loop *loop;
        int wakes;
};

static void on_wake(void *arg)
{
        ((struct waker *)arg)->wakes++;
}

static void *wake_thread(void *arg)
{
        struct waker *w = arg;

        usleep(30 * 1000);
        wp_loop_wake(w->loop);
        return NULL;
}

static void test_wake_from_another_thread(void)
{
        struct wp_loop *loop = loop_new();
        struct waker w = {0};
        pthread_t th;
        uint64_t start;

        REQUIRE(loop);
        w.loop = loop;
        wp_loop_set_wake(loop, on_wake, &w);
        CHECK_INT_EQ(wp_loop_inflight(loop), 0); /* the wake op is not counted */
        REQUIRE(pthread_create(&th, NULL, wake_thread, &w) == 0);
        start = wp_now_ns();
        while (!w.wakes && wp_now_ns() - start < 5 * WP_NSEC_PER_SEC)
                wp_loop_run_once(loop, 10 * WP_NSEC_PER_SEC);
        pthread_join(th, NULL);
        CHECK_INT_EQ(w.wakes, 1);
        CHECK(wp_now_ns() - start < 2 * WP_NSEC_PER_SEC);
        /* wakes coalesce and keep working */
        wp_loop_wake(loop);
        wp_loop_wake(loop);
        LOOP_UNTIL(loop, w.wakes >= 2);
        CHECK_INT_EQ(w.wakes, 2);
        wp_loop_free(loop);
}

/* --- many connections --- */

#define PAIRS  1000
#define ROUNDS 10

struct pp_side {
        struct wp_op rd, wr;
        uint32_t in, out;
        struct pp *pp;
        int idx;
};

struct pp {
        int fd[2];
        struct pp_side side[2];
        struct wp_loop *loop;
        int rounds;
        int errors;
        bool done;
};

static int pp_done;

static void pp_on_wr(struct wp_op *op, int res)
{
        struct pp_side *s = container_of(op, struct pp_side, wr);

        if (res != 4)
                s->pp->errors++;
}

static void pp_on_rd(struct wp_op *op, int res)
{
        struct pp_side *s = container_of(op, struct pp_side, rd);
        struct pp *p = s->pp;

        if (res != 4) {
                p->errors++;
                return;
        }
        if (s->idx == 1) { /* echo, then wait for the next one */
                s->out = s->in;
                wp_loop_send(p->loop, &s->wr, p->fd[1], &s->out, 4);
                wp_loop_recv(p->loop, &s->rd, p->fd[1], &s->in, 4);
                return;
        }
        if (s->in != (uint32_t)p->rounds)
                p->errors++;
        if (++p->rounds == ROUNDS) {
                p->done = true;
                pp_done++;
                wp_loop_cancel(p->loop, &p->side[1].rd);
                return;
        }
        s->out = (uint32_t)p->rounds;
        wp_loop_send(p->loop, &s->wr, p->fd[0], &s->out, 4);
        wp_loop_recv(p->loop, &s->rd, p->fd[0], &s->in, 4);
}

static void pp_on_rd_last(struct wp_op *op, int res)
{
        if (res == -ECANCELED || res == 0)
                return;
        pp_on_rd(op, res);
}

static void test_thousand_socketpairs_ping_pong(void)
{
        struct wp_loop *loop = loop_new();
        struct pp *pps;
        struct rlimit rl;
        int npairs = PAIRS, errors = 0;

        REQUIRE(loop);
        if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < 2 * PAIRS + 64) {
                rl.rlim_cur = rl.rlim_max;
                setrlimit(RLIMIT_NOFILE, &rl);
                getrlimit(RLIMIT_NOFILE, &rl);
                if (rl.rlim_cur < 2 * PAIRS + 64)
                        npairs = (int)(rl.rlim_cur - 64) / 2;
        }
        pps = calloc((size_t)npairs, sizeof(*pps));
        REQUIRE(pps);
        pp_done = 0;
        for (int i = 0; i < npairs; i++) {
                struct pp *p = &pps[i];
                REQUIRE(pair(p->fd) == 0);
                p->loop = loop;
                for (int k = 0; k < 2; k++) {
                        p->side[k].pp = p;
                        p->side[k].idx = k;
                        wp_op_init(&p->side[k].rd, k ? pp_on_rd_last : pp_on_rd);
                        wp_op_init(&p->side[k].wr, pp_on_wr);
                }
                wp_loop_recv(loop, &p->side[1].rd, p->fd[1], &p->side[1].in, 4);
                wp_loop_recv(loop, &p->side[0].rd, p->fd[0], &p->side[0].in, 4);
                p->side[0].out = 0;
                wp_loop_send(loop, &p->side[0].wr, p->fd[0], &p->side[0].out, 4);
        }
        LOOP_UNTIL(loop, pp_done == npairs && wp_loop_inflight(loop) == 0);
        CHECK_INT_EQ(pp_done, npairs);
        CHECK_INT_EQ(wp_loop_inflight(loop), 0);
        for (int i = 0; i < npairs; i++) {
                errors += pps[i].errors;
                close(pps[i].fd[0]);
                close(pps[i].fd[1]);
        }
        CHECK_INT_EQ(errors, 0);
        free(pps);
        wp_loop_free(loop);
}

static int loop_new_body(void *arg)
{
        struct wp_loop *loop;
        int r = wp_loop_new(backend, 32, &loop, NULL);

        if (r < 0)
                return r;
        wp_loop_free(loop);
        return 0;
}

static void test_loop_new_failalloc(void)
{
        CHECK(check_failalloc_run(loop_new_body, NULL) >= 2);
}

/* --- backend-independent --- */

static void test_auto_with_uring_disabled_uses_epoll(void)
{
        struct wp_loop *loop = NULL;
        const char *desc = NULL;

        setenv("WP_IO_URING_DISABLE", "1", 1);
        REQUIRE(wp_loop_new(WP_IO_AUTO, 64, &loop, &desc) == 0);
        unsetenv("WP_IO_URING_DISABLE");
        CHECK_INT_EQ(wp_loop_backend(loop), WP_IO_EPOLL);
        CHECK(desc != NULL && strstr(desc, "epoll") != NULL);
        wp_loop_free(loop);
}

static void test_backend_names(void)
{
        CHECK_STR_EQ(wp_io_backend_name(WP_IO_AUTO), "auto");
        CHECK_STR_EQ(wp_io_backend_name(WP_IO_URING), "uring");
        CHECK_STR_EQ(wp_io_backend_name(WP_IO_EPOLL), "epoll");
        CHECK_INT_EQ(wp_io_backend_parse("epoll"), WP_IO_EPOLL);
        CHECK_INT_EQ(wp_io_backend_parse("uring"), WP_IO_URING);
        CHECK_INT_EQ(wp_io_backend_parse("auto"), WP_IO_AUTO);
        CHECK_INT_EQ(wp_io_backend_parse("kqueue"), -EINVAL);
        CHECK_INT_EQ(wp_io_backend_parse(""), -EINVAL);
        CHECK(wp_loop_free(NULL) == NULL);
}

static void run_backend_suite(void)
{
        RUN(test_recv_send_socketpair);
        RUN(test_recv_reports_eof_as_zero);
        RUN(test_send_to_closed_peer_fails_without_sigpipe);
        RUN(test_send_waits_for_buffer_space);
        RUN(test_accept_and_connect_over_loopback);
        RUN(test_connect_to_closed_port_is_refused);
        RUN(test_cancel_pending_recv_then_reuse_op);
        RUN(test_fd_number_reuse_after_close);
        RUN(test_timers_fire_in_deadline_order);
        RUN(test_timer_rearmed_from_callback);
        RUN(test_many_timers_random_order);
        RUN(test_deferred_task_runs_once_per_iteration);
        RUN(test_deferred_tasks_run_after_completions);
        RUN(test_wake_from_another_thread);
        RUN(test_thousand_socketpairs_ping_pong);
        RUN(test_loop_new_failalloc);
}

int main(void)
{
        struct wp_loop *probe = NULL;
        const char *desc = NULL;
        int r;

        RUN(test_backend_names);
        RUN(test_auto_with_uring_disabled_uses_epoll);

        unsetenv("WP_IO_URING_DISABLE");
        r = wp_loop_new(WP_IO_URING, 64, &probe, &desc);
        if (r == -EPERM || r == -ENOSYS) {
                fprintf(stderr, "skip: io_uring unavailable (%s): uring pass skipped\n",
                        strerror(-r));
        } else if (r < 0) {
                fprintf(stderr, "io_uring setup failed: %s\n", strerror(-r));
                check_failures++;
        } else {
                wp_loop_free(probe);
                fprintf(stderr, "--- backend uring\n");
                backend = WP_IO_URING;
                run_backend_suite();
        }
        fprintf(stderr, "--- backend epoll\n");
        backend = WP_IO_EPOLL;
        run_backend_suite();
        return check_exit();
}
