/*
 * Private to the loop: the part of struct wp_loop shared by loop.c and the two backends
 * (loop_uring.c, loop_epoll.c). Each backend embeds struct wp_loop first in its own struct.
 */
#ifndef WP_LOOP_INTERNAL_H
#define WP_LOOP_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>

#include "waypoint/base/loop.h"

/* op->kind: the low bits say what the op does, the high bits are backend state. */
enum {
        OP_NONE,
        OP_RECV,
        OP_SEND,
        OP_ACCEPT,
        OP_CONNECT,
        OP_READ, /* loop-internal: the wake eventfd */
};
#define OP_KIND_MASK 0x0fu
#define OP_F_COUNTED 0x20u /* epoll: counted in the fd table */
#define OP_F_POLL    0x40u /* uring: waiting for readiness before (re)issuing */
#define OP_F_STARTED 0x80u /* connect() returned EINPROGRESS */

static inline unsigned op_kind(const struct wp_op *op)
{
        return op->kind & OP_KIND_MASK;
}

/* No timeout: wait until an event arrives. */
#define WAIT_FOREVER UINT64_MAX

struct wp_loop_backend_ops {
        void (*free)(struct wp_loop *loop);
        /* Queues op (fields filled, inflight set). Never completes it synchronously. */
        void (*submit)(struct wp_loop *loop, struct wp_op *op);
        /* Requests cancellation of an in-flight op (op->cancelled already set). */
        void (*cancel)(struct wp_loop *loop, struct wp_op *op);
        /* Submits queued work, waits up to timeout_ns (0: poll, WAIT_FOREVER) and runs the
         * completions. Returns completions handled or a fatal -errno. */
        int (*wait)(struct wp_loop *loop, uint64_t timeout_ns);
        /* Whether work is queued that must not wait (the next wait should use timeout 0). */
        bool (*busy)(const struct wp_loop *loop);
        /* Flags for the wake eventfd (EFD_NONBLOCK or 0), OR-ed with EFD_CLOEXEC. */
        int efd_flags;
};

struct wp_loop {
        const struct wp_loop_backend_ops *be;
        enum wp_io_backend backend;
        unsigned inflight; /* ops in flight, including the wake op */

        struct wp_timer **heap; /* 1-based min-heap of armed timers */
        unsigned nheap, heap_cap;

        struct wp_task *tasks_head, *tasks_tail;

        int wake_fd;
        struct wp_op wake_op;
        void (*on_wake)(void *arg);
        void *wake_arg;
};

/* Completes an op: clears inflight first so that the callback may resubmit it. */
static inline void loop_complete(struct wp_loop *loop, struct wp_op *op, int res)
{
        op->inflight = false;
        op->kind &= OP_KIND_MASK;
        loop->inflight--;
        op->on_complete(op, res);
}

/* Backend constructors: return 0 or -errno (for io_uring, the io_uring_setup error). */
int wp_loop_uring_new(unsigned entries, struct wp_loop **ret);
int wp_loop_epoll_new(unsigned entries, struct wp_loop **ret);

#endif
