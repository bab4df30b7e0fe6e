/*
 * io_uring backend. Each submission prepares one SQE whose user_data is the op; SQEs go to the
 * kernel in one batch per wp_loop_run_once() (or earlier when the SQ fills up). Completions are
 * reaped with io_uring_for_each_cqe and one io_uring_cq_advance.
 *
 * Older kernels hand some results back instead of waiting (-EAGAIN for a read on an O_NONBLOCK
 * file, -EINPROGRESS for connect on an O_NONBLOCK socket). Those ops wait on a one-shot
 * POLL_ADD under the same user_data and are then issued again (connect: SO_ERROR is read).
 */
#include <errno.h>
#include <liburing.h>
#include <poll.h>
#include <sys/socket.h>

#include "waypoint/base/alloc.h"
#include "waypoint/base/loop_internal.h"
#include "waypoint/base/util.h"

struct uring_loop {
        struct wp_loop base;
        struct io_uring ring;
        bool enabled; /* IORING_SETUP_R_DISABLED rings are enabled by the first submitter */
        /* Ops that found no free SQE even after a submit: issued (or their cancellation
         * requested) from the next run_once. Linked through op->next. */
        struct wp_op *sub_head, *sub_tail;
        struct wp_op *cancel_head, *cancel_tail;
};

static const struct wp_loop_backend_ops uring_ops;

static inline struct uring_loop *to_ul(struct wp_loop *loop)
{
        return container_of(loop, struct uring_loop, base);
}

static void list_push(struct wp_op **head, struct wp_op **tail, struct wp_op *op)
{
        op->next = NULL;
        if (*tail)
                (*tail)->next = op;
        else
                *head = op;
        *tail = op;
}

/* Enters the kernel to submit the SQ. The single-issuer ring is bound to the thread that runs
 * the loop, which need not be the one that created it. */
static int ring_submit(struct uring_loop *ul)
{
        if (!ul->enabled) {
                if (ul->ring.flags & IORING_SETUP_R_DISABLED) {
                        /* io_uring_enable_rings() is declared but not exported by liburing 2.3 */
                        int r = io_uring_register((unsigned)ul->ring.ring_fd,
                                                  IORING_REGISTER_ENABLE_RINGS, NULL, 0);
                        if (r < 0)
                                return r;
                }
                ul->enabled = true;
        }
        return io_uring_submit(&ul->ring);
}

static struct io_uring_sqe *get_sqe(struct uring_loop *ul)
{
        struct io_uring_sqe *sqe = io_uring_get_sqe(&ul->ring);

        if (sqe)
                return sqe;
        ring_submit(ul);
        return io_uring_get_sqe(&ul->ring);
}

/* Fills an SQE for op in its current state: a readiness poll or the operation itself. */
static void prep_op(struct io_uring_sqe *sqe, struct wp_op *op)
{
        if (op->kind & OP_F_POLL) {
                unsigned k = op_kind(op);
                unsigned mask = (k == OP_SEND || k == OP_CONNECT) ? POLLOUT : POLLIN;
                io_uring_prep_poll_add(sqe, op->fd, mask);
        } else {
                switch (op_kind(op)) {
                case OP_RECV:
                        io_uring_prep_recv(sqe, op->fd, op->buf, op->len, 0);
                        break;
                case OP_SEND:
                        io_uring_prep_send(sqe, op->fd, op->buf, op->len, MSG_NOSIGNAL);
                        break;
                case OP_ACCEPT:
                        io_uring_prep_accept(sqe, op->fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                        break;
                case OP_CONNECT:
                        io_uring_prep_connect(sqe, op->fd, op->addr, op->addrlen);
                        break;
                case OP_READ:
                        io_uring_prep_read(sqe, op->fd, op->buf, (unsigned)op->len, 0);
                        break;
                default:
                        io_uring_prep_nop(sqe);
                        break;
                }
        }
        io_uring_sqe_set_data(sqe, op);
}

static void issue(struct uring_loop *ul, struct wp_op *op)
{
        struct io_uring_sqe *sqe = get_sqe(ul);

        if (!sqe) {
                list_push(&ul->sub_head, &ul->sub_tail, op);
                return;
        }
        prep_op(sqe, op);
}

static void uring_submit(struct wp_loop *loop, struct wp_op *op)
{
        issue(to_ul(loop), op);
}

static void issue_cancel(struct uring_loop *ul, struct wp_op *op)
{
        struct io_uring_sqe *sqe = get_sqe(ul);

        if (!sqe) {
                list_push(&ul->cancel_head, &ul->cancel_tail, op);
                return;
        }
        io_uring_prep_cancel(sqe, op, 0);
        /* user_data 0 marks the cancel request itself; its completion is ignored. */
        io_uring_sqe_set_data(sqe, NULL);
}

static void uring_cancel(struct wp_loop *loop, struct wp_op *op)
{
        struct uring_loop *ul = to_ul(loop);

        /* An op still waiting for an SQE is completed with -ECANCELED from run_once. */
        for (struct wp_op *o = ul->sub_head; o; o = o->next)
                if (o == op)
                        return;
        issue_cancel(ul, op);
}

static bool uring_busy(const struct wp_loop *loop)
{
        const struct uring_loop *ul = container_of(loop, struct uring_loop, base);

        return ul->sub_head || ul->cancel_head;
}

/* Moves ops that waited for SQEs into the SQ; stops at the first that still finds none. */
static int drain_backlog(struct uring_loop *ul)
{
        int n = 0;

        while (ul->cancel_head) {
                struct wp_op *op = ul->cancel_head;
                struct io_uring_sqe *sqe = get_sqe(ul);
                if (!sqe)
                        return n;
                ul->cancel_head = op->next;
                if (!ul->cancel_head)
                        ul->cancel_tail = NULL;
                op->next = NULL;
                io_uring_prep_cancel(sqe, op, 0);
                io_uring_sqe_set_data(sqe, NULL);
        }
        while (ul->sub_head) {
                struct wp_op *op = ul->sub_head;
                if (op->cancelled) {
                        ul->sub_head = op->next;
                        if (!ul->sub_head)
                                ul->sub_tail = NULL;
                        op->next = NULL;
                        loop_complete(&ul->base, op, -ECANCELED);
                        n++;
                        continue;
                }
                struct io_uring_sqe *sqe = get_sqe(ul);
                if (!sqe)
                        return n;
                ul->sub_head = op->next;
                if (!ul->sub_head)
                        ul->sub_tail = NULL;
                op->next = NULL;
                prep_op(sqe, op);
        }
        return n;
}

/* Handles one CQE for op. Returns 1 when the op completed, 0 when it was issued again. */
static int handle_cqe(struct uring_loop *ul, struct wp_op *op, int res)
{
        unsigned k = op_kind(op);

        if (op->kind & OP_F_POLL) {
                op->kind &= (uint8_t)~OP_F_POLL;
                if (res < 0) /* -ECANCELED, or the fd is unusable */
                        goto complete;
                if (k == OP_CONNECT) {
                        int err = 0;
                        socklen_t len = sizeof(err);
                        if (getsockopt(op->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0)
                                err = errno;
                        res = -err;
                        goto complete;
                }
                if (op->cancelled) {
                        res = -ECANCELED;
                        goto complete;
                }
                issue(ul, op);
                return 0;
        }
        if ((res == -EAGAIN && k != OP_CONNECT) || (res == -EINPROGRESS && k == OP_CONNECT)) {
                /* A cancel may already have missed this op: do not wait any more. */
                if (op->cancelled) {
                        res = -ECANCELED;
                        goto complete;
                }
                op->kind |= OP_F_POLL;
                issue(ul, op);
                return 0;
        }
complete:
        loop_complete(&ul->base, op, res);
        return 1;
}

static int reap(struct uring_loop *ul)
{
        struct io_uring_cqe *cqe;
        unsigned head, seen = 0;
        int n = 0;

        io_uring_for_each_cqe(&ul->ring, head, cqe)
        {
                struct wp_op *op = io_uring_cqe_get_data(cqe);
                int res = cqe->res;
                seen++;
                /* NULL: a cancel request; LIBURING_UDATA_TIMEOUT: liburing's own timeout. */
                if (!op || cqe->user_data == LIBURING_UDATA_TIMEOUT)
                        continue;
                n += handle_cqe(ul, op, res);
        }
        if (seen)
                io_uring_cq_advance(&ul->ring, seen);
        return n;
}

static int uring_wait(struct wp_loop *loop, uint64_t timeout_ns)
{
        struct uring_loop *ul = to_ul(loop);
        struct io_uring_cqe *cqe;
        int n, r;

        n = drain_backlog(ul);
        if (n > 0 || ul->sub_head || ul->cancel_head)
                timeout_ns = 0;
        if (!ul->enabled) {
                r = ring_submit(ul);
                if (r < 0 && r != -EBUSY && r != -EAGAIN && r != -EINTR)
                        return r;
        }
        if (timeout_ns == 0) {
                /* Enters even with nothing to submit, so that task work runs. */
                r = io_uring_submit_and_get_events(&ul->ring);
        } else if (timeout_ns == WAIT_FOREVER) {
                r = io_uring_submit_and_wait(&ul->ring, 1);
        } else {
                struct __kernel_timespec ts = {
                    .tv_sec = (long long)(timeout_ns / 1000000000ULL),
                    .tv_nsec = (long long)(timeout_ns % 1000000000ULL),
                };
                r = io_uring_submit_and_wait_timeout(&ul->ring, &cqe, 1, &ts, NULL);
        }
        /* -ETIME: timed out; -EINTR: signal; -EBUSY/-EAGAIN: CQ backlog, reaping fixes it. */
        if (r < 0 && r != -ETIME && r != -EINTR && r != -EBUSY && r != -EAGAIN)
                return r;
        n += reap(ul);
        n += drain_backlog(ul);
        return n;
}

static void uring_free(struct wp_loop *loop)
{
        struct uring_loop *ul = to_ul(loop);

        if (ul->ring.ring_fd >= 0)
                io_uring_queue_exit(&ul->ring);
        wp_free(ul);
}

static const struct wp_loop_backend_ops uring_ops = {
    .free = uring_free,
    .submit = uring_submit,
    .cancel = uring_cancel,
    .wait = uring_wait,
    .busy = uring_busy,
    .efd_flags = 0, /* blocking: io_uring would hand back -EAGAIN for O_NONBLOCK reads */
};

int wp_loop_uring_new(unsigned entries, struct wp_loop **ret)
{
        static const unsigned flag_sets[] = {
            IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG |
                IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_R_DISABLED,
            IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
            0,
        };
        struct uring_loop *ul;
        int r = -EINVAL;

        ul = wp_calloc(1, sizeof(*ul));
        if (!ul)
                return -ENOMEM;
        ul->ring.ring_fd = -1;
        /* Older kernels reject flags they do not know with -EINVAL: retry with fewer. */
        for (size_t i = 0; i < WP_ARRAY_SIZE(flag_sets); i++) {
                r = io_uring_queue_init(entries, &ul->ring, flag_sets[i]);
                if (r != -EINVAL)
                        break;
        }
        if (r < 0) {
                wp_free(ul);
                return r;
        }
        ul->base.be = &uring_ops;
        ul->base.backend = WP_IO_URING;
        *ret = &ul->base;
        return 0;
}
