/*
 * epoll backend: emulates completions with readiness, for hosts where io_uring is blocked
 * (seccomp: EPERM) or missing (ENOSYS).
 *
 * Submissions go to a run queue; wp_loop_run_once() attempts them (never the submit call, so
 * callbacks never run from inside a submit). An op whose syscall would block is parked in the
 * per-fd table, which holds at most one read-direction op (recv, accept, read) and one
 * write-direction op (send, connect) per fd, and waits for level-triggered readiness.
 *
 * Interest is added on demand and dropped lazily, when a readiness event finds no op waiting,
 * so the usual recv-complete-resubmit cycle does not churn epoll_ctl. Because the user may close
 * an fd (and get the same number back for a new socket) once no op is in flight on it, an entry
 * whose op count dropped to zero is "unverified": the next op parked on it re-registers with
 * EPOLL_CTL_MOD, falling back to EPOLL_CTL_ADD on ENOENT.
 */
#include <errno.h>
#include <limits.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/loop_internal.h"
#include "waypoint/base/util.h"

#define MAX_EVENTS   256
#define FD_TABLE_MIN 64
/* Result of try_io() meaning "would block: wait for readiness". */
#define IO_WAIT INT_MIN

struct fdent {
        struct wp_op *rd, *wr; /* parked ops */
        uint32_t mask;         /* interest registered with epoll; 0: not registered */
        uint32_t nops;         /* ops in flight on this fd (queued or parked) */
        bool verified;         /* registration known to belong to the fd's current file */
};

struct epoll_loop {
        struct wp_loop base;
        int epfd;
        struct fdent *fds;
        unsigned nfds;
        struct wp_op *runq_head, *runq_tail;
        struct epoll_event events[MAX_EVENTS];
};

static inline struct epoll_loop *to_el(struct wp_loop *loop)
{
        return container_of(loop, struct epoll_loop, base);
}

static bool is_read_dir(const struct wp_op *op)
{
        unsigned k = op_kind(op);
        return k == OP_RECV || k == OP_ACCEPT || k == OP_READ;
}

static void runq_push(struct epoll_loop *el, struct wp_op *op)
{
        op->next = NULL;
        if (el->runq_tail)
                el->runq_tail->next = op;
        else
                el->runq_head = op;
        el->runq_tail = op;
}

static int fd_table_grow(struct epoll_loop *el, int fd)
{
        unsigned n = el->nfds ? el->nfds : FD_TABLE_MIN;
        struct fdent *t;

        while (n <= (unsigned)fd)
                n *= 2;
        t = wp_realloc(el->fds, sizeof(*t) * n);
        if (!t)
                return -ENOMEM;
        for (unsigned i = el->nfds; i < n; i++)
                t[i] = (struct fdent){0};
        el->fds = t;
        el->nfds = n;
        return 0;
}

static void epoll_submit(struct wp_loop *loop, struct wp_op *op)
{
        struct epoll_loop *el = to_el(loop);

        /* If the table cannot grow, the op is not counted and completes with -ENOMEM. */
        if (op->fd >= 0 && ((unsigned)op->fd < el->nfds || fd_table_grow(el, op->fd) == 0)) {
                el->fds[op->fd].nops++;
                op->kind |= OP_F_COUNTED;
        }
        runq_push(el, op);
}

static void epoll_cancel(struct wp_loop *loop, struct wp_op *op)
{
        struct epoll_loop *el = to_el(loop);
        struct fdent *e;

        if (!(op->kind & OP_F_COUNTED))
                return; /* queued: completes with -ECANCELED when its turn comes */
        e = &el->fds[op->fd];
        if (e->rd == op)
                e->rd = NULL;
        else if (e->wr == op)
                e->wr = NULL;
        else
                return; /* still on the run queue */
        runq_push(el, op);
}

static bool epoll_busy(const struct wp_loop *loop)
{
        return container_of(loop, struct epoll_loop, base)->runq_head != NULL;
}

static void complete(struct epoll_loop *el, struct wp_op *op, int res)
{
        if (op->kind & OP_F_COUNTED) {
                struct fdent *e = &el->fds[op->fd];
                /* With no op left the user may close the fd: the registration cannot be
                 * trusted any more. */
                if (--e->nops == 0)
                        e->verified = false;
        }
        loop_complete(&el->base, op, res);
}

/* Performs op's syscall. Returns its result, or IO_WAIT if it would block. */
static int try_io(struct wp_op *op)
{
        ssize_t r;

        for (;;) {
                switch (op_kind(op)) {
                case OP_RECV:
                        r = recv(op->fd, op->buf, op->len, MSG_DONTWAIT);
                        break;
                case OP_SEND:
                        r = send(op->fd, op->buf, op->len, MSG_DONTWAIT | MSG_NOSIGNAL);
                        break;
                case OP_ACCEPT:
                        r = accept4(op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                        break;
                case OP_READ:
                        r = read(op->fd, op->buf, op->len);
                        break;
                case OP_CONNECT:
                        if (op->kind & OP_F_STARTED) {
                                int err = 0;
                                socklen_t len = sizeof(err);
                                if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                                        return -errno;
                                return -err;
                        }
                        if (connect(op->fd, op->addr, op->addrlen) == 0)
                                return 0;
                        if (errno == EINPROGRESS) {
                                op->kind |= OP_F_STARTED;
                                return IO_WAIT;
                        }
                        if (errno == EINTR) {
                                /* The connection attempt goes on asynchronously. */
                                op->kind |= OP_F_STARTED;
                                return IO_WAIT;
                        }
                        return -errno;
                default:
                        return -EINVAL;
                }
                if (r >= 0)
                        return r > INT_MAX ? INT_MAX : (int)r;
                if (errno == EINTR)
                        continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                        return IO_WAIT;
                return -errno;
        }
}

/* Registers interest for the parked ops of fd (keeping bits that are already there). */
static int update_interest(struct epoll_loop *el, int fd)
{
        struct fdent *e = &el->fds[fd];
        uint32_t want = (e->rd ? EPOLLIN | EPOLLRDHUP : 0) | (e->wr ? EPOLLOUT : 0);
        uint32_t mask = e->mask | want;
        struct epoll_event ev = {.events = mask, .data.fd = fd};
        int r;

        if (mask == e->mask && e->verified)
                return 0;
        if (e->mask) {
                r = epoll_ctl(el->epfd, EPOLL_CTL_MOD, fd, &ev);
                if (r < 0 && errno == ENOENT)
                        r = epoll_ctl(el->epfd, EPOLL_CTL_ADD, fd, &ev);
        } else {
                r = epoll_ctl(el->epfd, EPOLL_CTL_ADD, fd, &ev);
                if (r < 0 && errno == EEXIST)
                        r = epoll_ctl(el->epfd, EPOLL_CTL_MOD, fd, &ev);
        }
        if (r < 0) {
                e->mask = 0;
                e->verified = false;
                return -errno;
        }
        e->mask = mask;
        e->verified = true;
        return 0;
}

/* Parks op on its fd; completes it with the error if epoll refuses the fd. */
static void park(struct epoll_loop *el, struct wp_op *op)
{
        struct fdent *e = &el->fds[op->fd];
        int r;

        if (is_read_dir(op))
                e->rd = op;
        else
                e->wr = op;
        r = update_interest(el, op->fd);
        if (r < 0) {
                e = &el->fds[op->fd];
                if (e->rd == op)
                        e->rd = NULL;
                else
                        e->wr = NULL;
                complete(el, op, r);
        }
}

/* Takes one op off the run queue: cancellation, immediate attempt, or parking. */
static int start_op(struct epoll_loop *el, struct wp_op *op)
{
        struct fdent *e;
        int r;

        if (op->cancelled) {
                complete(el, op, -ECANCELED);
                return 1;
        }
        if (!(op->kind & OP_F_COUNTED)) {
                complete(el, op, op->fd < 0 ? -EBADF : -ENOMEM);
                return 1;
        }
        e = &el->fds[op->fd];
        if (is_read_dir(op) ? e->rd != NULL : e->wr != NULL) {
                /* One op per direction per fd: a second one is a caller bug. */
                complete(el, op, -EBUSY);
                return 1;
        }
        /* A read-direction op on a registered fd waits for readiness (level-triggered epoll
         * reports data already there); other ops try their syscall first. */
        if (!(is_read_dir(op) && e->mask)) {
                r = try_io(op);
                if (r != IO_WAIT) {
                        complete(el, op, r);
                        return 1;
                }
        }
        park(el, op);
        return 0;
}

static int run_queue(struct epoll_loop *el)
{
        struct wp_op *op = el->runq_head;
        int n = 0;

        /* Ops queued by the callbacks below wait for the next pass. */
        el->runq_head = el->runq_tail = NULL;
        while (op) {
                struct wp_op *next = op->next;
                op->next = NULL;
                n += start_op(el, op);
                op = next;
        }
        return n;
}

/* Drops the stale interest bits (an event found no op waiting for them), keeping those of ops
 * parked now. */
static void drop_interest(struct epoll_loop *el, int fd, uint32_t stale)
{
        struct fdent *e = &el->fds[fd];
        uint32_t want = (e->rd ? EPOLLIN | EPOLLRDHUP : 0) | (e->wr ? EPOLLOUT : 0);
        uint32_t mask = (stale & EPOLLHUP) ? want : (e->mask & ~stale) | want;
        struct epoll_event ev = {.events = mask, .data.fd = fd};

        if (mask == e->mask && mask != 0)
                return;
        if (mask == 0 || epoll_ctl(el->epfd, EPOLL_CTL_MOD, fd, &ev) < 0) {
                /* Errors ignored: the fd may be closed already, and then nothing is left. */
                epoll_ctl(el->epfd, EPOLL_CTL_DEL, fd, NULL);
                e->mask = 0;
                e->verified = false;
                return;
        }
        e->mask = mask;
}

/* Runs the parked op in *slot after readiness. Returns 1 if it completed. */
static int run_parked(struct epoll_loop *el, int fd, bool read_dir)
{
        struct fdent *e = &el->fds[fd];
        struct wp_op *op = read_dir ? e->rd : e->wr;
        int r;

        if (!op)
                return 0;
        r = try_io(op);
        if (r == IO_WAIT)
                return 0;
        if (read_dir)
                e->rd = NULL;
        else
                e->wr = NULL;
        complete(el, op, r);
        return 1;
}

static int handle_event(struct epoll_loop *el, const struct epoll_event *ev)
{
        int fd = ev->data.fd;
        uint32_t bits = ev->events, stale = 0;
        int n = 0;

        if (fd < 0 || (unsigned)fd >= el->nfds)
                return 0;
        if (bits & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
                if (el->fds[fd].rd)
                        n += run_parked(el, fd, true);
                else
                        stale |= bits & (EPOLLIN | EPOLLRDHUP);
        }
        /* The callback above may have grown the table: run_parked indexes it again. */
        if (bits & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
                if (el->fds[fd].wr)
                        n += run_parked(el, fd, false);
                else
                        stale |= bits & EPOLLOUT;
        }
        /* Hang-up or error with nobody waiting at all: stop watching the fd. */
        if ((bits & (EPOLLHUP | EPOLLERR)) && n == 0 && !el->fds[fd].rd && !el->fds[fd].wr)
                stale |= EPOLLHUP;
        if (stale)
                drop_interest(el, fd, stale);
        return n;
}

static int epoll_wait_once(struct wp_loop *loop, uint64_t timeout_ns)
{
        struct epoll_loop *el = to_el(loop);
        int n, nev, ms;

        n = run_queue(el);
        if (n > 0 || el->runq_head)
                timeout_ns = 0;
        if (timeout_ns == WAIT_FOREVER)
                ms = -1;
        else if (timeout_ns >= (uint64_t)INT_MAX * 1000000ULL)
                ms = INT_MAX;
        else /* round up: waking before a timer is due would only spin */
                ms = (int)((timeout_ns + 999999ULL) / 1000000ULL);

        nev = epoll_wait(el->epfd, el->events, MAX_EVENTS, ms);
        if (nev < 0) {
                if (errno != EINTR)
                        return -errno;
                nev = 0;
        }
        for (int i = 0; i < nev; i++)
                n += handle_event(el, &el->events[i]);
        /* Ops queued by these callbacks (typically a send answering a recv) go out now. */
        if (nev > 0)
                n += run_queue(el);
        return n;
}

static void epoll_free(struct wp_loop *loop)
{
        struct epoll_loop *el = to_el(loop);

        if (el->epfd >= 0)
                close(el->epfd);
        wp_free(el->fds);
        wp_free(el);
}

static const struct wp_loop_backend_ops epoll_ops = {
    .free = epoll_free,
    .submit = epoll_submit,
    .cancel = epoll_cancel,
    .wait = epoll_wait_once,
    .busy = epoll_busy,
    .efd_flags = EFD_NONBLOCK,
};

int wp_loop_epoll_new(unsigned entries, struct wp_loop **ret)
{
        struct epoll_loop *el;
        int r;

        el = wp_calloc(1, sizeof(*el));
        if (!el)
                return -ENOMEM;
        el->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (el->epfd < 0) {
                r = -errno;
                wp_free(el);
                return r;
        }
        r = fd_table_grow(el, FD_TABLE_MIN - 1);
        if (r < 0) {
                close(el->epfd);
                wp_free(el);
                return r;
        }
        el->base.be = &epoll_ops;
        el->base.backend = WP_IO_EPOLL;
        *ret = &el->base;
        return 0;
}
