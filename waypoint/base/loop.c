/*
 * The parts of the loop shared by both backends: construction and backend choice, op
 * bookkeeping, the timer min-heap, deferred tasks and the wake eventfd. The backends
 * (loop_uring.c, loop_epoll.c) only move ops to the kernel and completions back.
 */
#include "waypoint/base/loop.h"

#include <assert.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/loop_internal.h"
#include "waypoint/base/time.h"
#include "waypoint/base/util.h"

#define HEAP_INITIAL_CAP 64
#define ENTRIES_DEFAULT  256
#define ENTRIES_MAX      32768

/* The kernel writes the eventfd counter here. Loop-independent on purpose: with io_uring the
 * read may still be in the kernel's hands while the ring is torn down. */
static uint64_t wake_sink;

static const char *const backend_names[_WP_IO_BACKEND_MAX] = {
    [WP_IO_AUTO] = "auto",
    [WP_IO_URING] = "uring",
    [WP_IO_EPOLL] = "epoll",
};

const char *wp_io_backend_name(enum wp_io_backend b)
{
        if ((unsigned)b >= _WP_IO_BACKEND_MAX)
                return "?";
        return backend_names[b];
}

int wp_io_backend_parse(const char *s)
{
        if (!s)
                return -EINVAL;
        for (unsigned i = 0; i < _WP_IO_BACKEND_MAX; i++)
                if (strcasecmp(s, backend_names[i]) == 0)
                        return (int)i;
        if (strcasecmp(s, "io_uring") == 0)
                return WP_IO_URING;
        return -EINVAL;
}

enum wp_io_backend wp_loop_backend(const struct wp_loop *loop)
{
        return loop->backend;
}

unsigned wp_loop_inflight(const struct wp_loop *loop)
{
        return loop->inflight - (loop->wake_op.inflight ? 1 : 0);
}

static void op_start(struct wp_loop *loop, struct wp_op *op, unsigned kind, int fd, void *buf,
                     size_t len)
{
        assert(!op->inflight);
        op->kind = (uint8_t)kind;
        op->fd = fd;
        op->buf = buf;
        op->len = len;
        op->inflight = true;
        op->cancelled = false;
        op->next = NULL;
        loop->inflight++;
        loop->be->submit(loop, op);
}

void wp_loop_recv(struct wp_loop *loop, struct wp_op *op, int fd, void *buf, size_t len)
{
        op_start(loop, op, OP_RECV, fd, buf, len);
}

void wp_loop_send(struct wp_loop *loop, struct wp_op *op, int fd, const void *buf, size_t len)
{
        op_start(loop, op, OP_SEND, fd, (void *)buf, len);
}

void wp_loop_accept(struct wp_loop *loop, struct wp_op *op, int fd)
{
        op_start(loop, op, OP_ACCEPT, fd, NULL, 0);
}

void wp_loop_connect(struct wp_loop *loop, struct wp_op *op, int fd, const struct sockaddr *sa,
                     socklen_t salen)
{
        op->addr = sa;
        op->addrlen = salen;
        op_start(loop, op, OP_CONNECT, fd, NULL, 0);
}

void wp_loop_cancel(struct wp_loop *loop, struct wp_op *op)
{
        if (!op->inflight || op->cancelled)
                return;
        op->cancelled = true;
        loop->be->cancel(loop, op);
}

/* --- wake --- */

static void on_wake_read(struct wp_op *op, int res)
{
        struct wp_loop *loop = container_of(op, struct wp_loop, wake_op);

        if (res > 0 && loop->on_wake)
                loop->on_wake(loop->wake_arg);
        /* Anything but a successful read or a transient error means the eventfd is gone:
         * stop rather than spin. */
        if (res > 0 || res == -EINTR || res == -EAGAIN)
                op_start(loop, op, OP_READ, loop->wake_fd, &wake_sink, sizeof(wake_sink));
}

void wp_loop_set_wake(struct wp_loop *loop, void (*on_wake)(void *arg), void *arg)
{
        loop->on_wake = on_wake;
        loop->wake_arg = arg;
}

void wp_loop_wake(struct wp_loop *loop)
{
        uint64_t one = 1;
        ssize_t r WP_UNUSED;

        /* Fails only when the counter would overflow, and then a wake is pending anyway. */
        r = write(loop->wake_fd, &one, sizeof(one));
}

/* --- construction --- */

static const char *fallback_desc(int err)
{
        switch (err) {
        case -EPERM:
                return "io_uring unavailable (Operation not permitted): using epoll";
        case -ENOSYS:
                return "io_uring unavailable (Function not implemented): using epoll";
        case -ENOMEM:
                return "io_uring unavailable (Cannot allocate memory): using epoll";
        case -EINVAL:
                return "io_uring unavailable (Invalid argument): using epoll";
        default:
                return "io_uring unavailable: using epoll";
        }
}

static int loop_common_init(struct wp_loop *loop)
{
        loop->heap = wp_malloc(sizeof(*loop->heap) * (HEAP_INITIAL_CAP + 1));
        if (!loop->heap)
                return -ENOMEM;
        loop->heap_cap = HEAP_INITIAL_CAP;
        loop->wake_fd = eventfd(0, EFD_CLOEXEC | loop->be->efd_flags);
        if (loop->wake_fd < 0)
                return -errno;
        wp_op_init(&loop->wake_op, on_wake_read);
        op_start(loop, &loop->wake_op, OP_READ, loop->wake_fd, &wake_sink, sizeof(wake_sink));
        return 0;
}

int wp_loop_new(enum wp_io_backend want, unsigned entries, struct wp_loop **ret,
                const char **reterr_desc)
{
        struct wp_loop *loop = NULL;
        const char *desc = NULL;
        int r;

        if (entries == 0)
                entries = ENTRIES_DEFAULT;
        if (entries > ENTRIES_MAX)
                entries = ENTRIES_MAX;

        switch (want) {
        case WP_IO_AUTO: {
                const char *env = getenv("WP_IO_URING_DISABLE");
                if (env && strcmp(env, "1") == 0) {
                        desc = "io_uring disabled by WP_IO_URING_DISABLE=1: using epoll";
                        r = wp_loop_epoll_new(entries, &loop);
                        break;
                }
                r = wp_loop_uring_new(entries, &loop);
                if (r == -EPERM || r == -ENOSYS || r == -ENOMEM || r == -EINVAL) {
                        desc = fallback_desc(r);
                        r = wp_loop_epoll_new(entries, &loop);
                }
                break;
        }
        case WP_IO_URING:
                r = wp_loop_uring_new(entries, &loop);
                if (r < 0)
                        desc = "io_uring_setup failed";
                break;
        case WP_IO_EPOLL:
                r = wp_loop_epoll_new(entries, &loop);
                break;
        default:
                r = -EINVAL;
                desc = "unknown I/O backend";
                break;
        }
        if (r < 0) {
                if (reterr_desc)
                        *reterr_desc = desc ? desc : "cannot create event loop";
                return r;
        }

        loop->wake_fd = -1;
        r = loop_common_init(loop);
        if (r < 0) {
                wp_loop_free(loop);
                if (reterr_desc)
                        *reterr_desc = "cannot set up event loop wake-up";
                return r;
        }
        if (reterr_desc)
                *reterr_desc = desc;
        *ret = loop;
        return 0;
}

struct wp_loop *wp_loop_free(struct wp_loop *loop)
{
        struct wp_timer **heap;
        int fd;

        if (!loop)
                return NULL;
        heap = loop->heap;
        fd = loop->wake_fd;
        /* Timers still armed must not keep a dangling heap index. */
        for (unsigned i = 1; i <= loop->nheap; i++)
                heap[i]->heap_idx = 0;
        loop->be->free(loop);
        wp_free(heap);
        if (fd >= 0)
                close(fd);
        return NULL;
}

/* --- timers: 1-based binary min-heap on deadline; t->heap_idx is the slot (0: unarmed) --- */

static void heap_set(struct wp_loop *loop, unsigned i, struct wp_timer *t)
{
        loop->heap[i] = t;
        t->heap_idx = i;
}

static void heap_up(struct wp_loop *loop, unsigned i)
{
        struct wp_timer *t = loop->heap[i];

        while (i > 1 && loop->heap[i / 2]->deadline > t->deadline) {
                heap_set(loop, i, loop->heap[i / 2]);
                i /= 2;
        }
        heap_set(loop, i, t);
}

static void heap_down(struct wp_loop *loop, unsigned i)
{
        struct wp_timer *t = loop->heap[i];
        unsigned n = loop->nheap;

        for (;;) {
                unsigned c = 2 * i;
                if (c > n)
                        break;
                if (c + 1 <= n && loop->heap[c + 1]->deadline < loop->heap[c]->deadline)
                        c++;
                if (loop->heap[c]->deadline >= t->deadline)
                        break;
                heap_set(loop, i, loop->heap[c]);
                i = c;
        }
        heap_set(loop, i, t);
}

static void heap_remove(struct wp_loop *loop, unsigned i)
{
        struct wp_timer *t = loop->heap[i];
        struct wp_timer *last = loop->heap[loop->nheap--];

        t->heap_idx = 0;
        if (last == t)
                return;
        heap_set(loop, i, last);
        if (i > 1 && loop->heap[i / 2]->deadline > last->deadline)
                heap_up(loop, i);
        else
                heap_down(loop, i);
}

void wp_timer_arm(struct wp_loop *loop, struct wp_timer *t, uint64_t deadline_ns)
{
        if (t->heap_idx) {
                uint64_t old = t->deadline;
                t->deadline = deadline_ns;
                if (deadline_ns < old)
                        heap_up(loop, t->heap_idx);
                else
                        heap_down(loop, t->heap_idx);
                return;
        }
        if (loop->nheap == loop->heap_cap) {
                /* Timers are embedded in long-lived objects; growth is rare and the void API
                 * leaves no way to report failure, so this aborts on OOM like wp_xmalloc. */
                unsigned cap = loop->heap_cap * 2;
                struct wp_timer **h = realloc(loop->heap, sizeof(*h) * (cap + 1));
                if (!h) {
                        fputs("out of memory (timer heap)\n", stderr);
                        abort();
                }
                loop->heap = h;
                loop->heap_cap = cap;
        }
        t->deadline = deadline_ns;
        loop->heap[++loop->nheap] = t;
        heap_up(loop, loop->nheap);
}

void wp_timer_disarm(struct wp_loop *loop, struct wp_timer *t)
{
        if (t->heap_idx)
                heap_remove(loop, t->heap_idx);
}

/* Fires expired timers, at most as many as were armed on entry so that a timer re-arming itself
 * in the past cannot keep the loop here. */
static int run_timers(struct wp_loop *loop)
{
        unsigned budget = loop->nheap;
        uint64_t now;
        int n = 0;

        if (!budget)
                return 0;
        now = wp_now_ns();
        while (budget-- && loop->nheap && loop->heap[1]->deadline <= now) {
                struct wp_timer *t = loop->heap[1];
                heap_remove(loop, 1);
                t->on_fire(t);
                n++;
        }
        return n;
}

/* --- deferred tasks --- */

void wp_loop_defer(struct wp_loop *loop, struct wp_task *t)
{
        if (t->queued)
                return;
        t->queued = true;
        t->next = NULL;
        if (loop->tasks_tail)
                loop->tasks_tail->next = t;
        else
                loop->tasks_head = t;
        loop->tasks_tail = t;
}

/* Runs the tasks queued so far; tasks they queue wait for the next iteration. */
static int run_tasks(struct wp_loop *loop)
{
        struct wp_task *t = loop->tasks_head;
        int n = 0;

        loop->tasks_head = loop->tasks_tail = NULL;
        while (t) {
                struct wp_task *next = t->next;
                t->next = NULL;
                t->queued = false;
                t->run(t);
                n++;
                t = next;
        }
        return n;
}

/* --- the iteration --- */

int wp_loop_run_once(struct wp_loop *loop, uint64_t max_wait_ns)
{
        uint64_t timeout = max_wait_ns;
        int n, r;

        if (loop->tasks_head || loop->be->busy(loop)) {
                timeout = 0;
        } else if (loop->nheap) {
                uint64_t now = wp_now_ns(), d = loop->heap[1]->deadline;
                timeout = WP_MIN(timeout, d > now ? d - now : 0);
        }
        n = loop->be->wait(loop, timeout);
        if (n < 0)
                return n;
        r = run_timers(loop);
        n += r;
        n += run_tasks(loop);
        return n;
}
