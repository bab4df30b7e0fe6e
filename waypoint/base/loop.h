/*
 * The event loop: one per worker thread. It only routes completions. Objects embed struct wp_op
 * for each I/O they may have in flight (one submission per op at a time); the completion callback
 * finds the object with container_of(). Nothing is allocated per submission.
 *
 * Two backends share this interface:
 *  - io_uring (liburing): each wp_loop_* call prepares one SQE whose user_data is the op; SQEs
 *    are submitted in one batch by wp_loop_run_once().
 *  - epoll: readiness-based emulation used when io_uring_setup() fails (EPERM under seccomp,
 *    ENOSYS on old kernels) or when asked for. Ops wait for readiness and then perform the
 *    syscall; results have the same meaning as under io_uring.
 *
 * Completion results (res): recv: bytes (> 0), 0 on EOF, -errno. send: bytes written (may be
 * short; resubmit the rest), -errno. accept: new fd (O_NONBLOCK|O_CLOEXEC), -errno. connect: 0,
 * -errno. Cancelled ops complete with -ECANCELED (or their real result if it raced). Completion
 * callbacks always run from wp_loop_run_once(), never from inside a wp_loop_* submit call.
 *
 * Memory named in a submitted op (buf, addr) belongs to the kernel until the completion runs: an
 * object with ops in flight must not be freed. Close by cancelling, then free from the last
 * completion (wp_op_inflight() tells).
 *
 * Sockets given to the loop must be non-blocking (both backends rely on it).
 */
#ifndef WP_LOOP_H
#define WP_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct wp_loop;
struct wp_op;

typedef void (*wp_op_cb)(struct wp_op *op, int res);

enum wp_io_backend {
        WP_IO_AUTO,  /* io_uring, falling back to epoll if io_uring_setup fails */
        WP_IO_URING, /* io_uring only: wp_loop_new fails if unavailable */
        WP_IO_EPOLL,
        _WP_IO_BACKEND_MAX
};

struct wp_op {
        wp_op_cb on_complete;
        /* private to the loop */
        uint8_t kind;
        bool inflight;
        bool cancelled;
        int fd;
        void *buf;
        size_t len;
        const struct sockaddr *addr;
        socklen_t addrlen;
        struct wp_op *next;
};

struct wp_timer {
        void (*on_fire)(struct wp_timer *t);
        /* private */
        uint64_t deadline;
        unsigned heap_idx; /* 0 = not armed */
};

/* A deferred call, run once at the end of the current (or next) loop iteration. */
struct wp_task {
        void (*run)(struct wp_task *t);
        struct wp_task *next;
        bool queued;
};

/* Creates a loop. entries: io_uring queue depth (e.g. 4096). On success *ret is set and the
 * chosen backend is readable with wp_loop_backend(). Returns 0, -ENOMEM, or for WP_IO_URING the
 * io_uring_setup error (-EPERM, -ENOSYS, ...). *reterr_desc (may be NULL) explains a fallback or
 * failure; it is a static string. */
int wp_loop_new(enum wp_io_backend want, unsigned entries, struct wp_loop **ret,
                const char **reterr_desc);
/* Frees the loop. Ops must not be in flight. NULL-safe, returns NULL. */
struct wp_loop *wp_loop_free(struct wp_loop *loop);
enum wp_io_backend wp_loop_backend(const struct wp_loop *loop);
const char *wp_io_backend_name(enum wp_io_backend b); /* "auto", "uring", "epoll" */
int wp_io_backend_parse(const char *s);              /* enum value or -EINVAL */

static inline void wp_op_init(struct wp_op *op, wp_op_cb cb)
{
        *op = (struct wp_op){.on_complete = cb, .fd = -1};
}
static inline bool wp_op_inflight(const struct wp_op *op)
{
        return op->inflight;
}

/* Submit calls. The op must not be in flight. They do not fail: if the ring is full the loop
 * submits what it has and retries; errors come back as completions. */
void wp_loop_recv(struct wp_loop *loop, struct wp_op *op, int fd, void *buf, size_t len);
void wp_loop_send(struct wp_loop *loop, struct wp_op *op, int fd, const void *buf, size_t len);
void wp_loop_accept(struct wp_loop *loop, struct wp_op *op, int fd);
void wp_loop_connect(struct wp_loop *loop, struct wp_op *op, int fd, const struct sockaddr *sa,
                     socklen_t salen);
/* Requests cancellation of an in-flight op; its completion still runs (usually -ECANCELED).
 * No-op when the op is not in flight. */
void wp_loop_cancel(struct wp_loop *loop, struct wp_op *op);

/* Timers: a min-heap per loop. deadline is absolute wp_now_ns(). Re-arming moves the timer. */
void wp_timer_arm(struct wp_loop *loop, struct wp_timer *t, uint64_t deadline_ns);
void wp_timer_disarm(struct wp_loop *loop, struct wp_timer *t);
static inline bool wp_timer_armed(const struct wp_timer *t)
{
        return t->heap_idx != 0;
}

/* Queues a task to run after the current batch of completions (no-op if already queued). */
void wp_loop_defer(struct wp_loop *loop, struct wp_task *t);

/* Wakes the loop from another thread (eventfd). The loop then calls on_wake (set once, before
 * running) from its own thread. Async-signal-safe. */
void wp_loop_set_wake(struct wp_loop *loop, void (*on_wake)(void *arg), void *arg);
void wp_loop_wake(struct wp_loop *loop);

/* Submits pending work, waits for at least one event or until max_wait_ns (relative; also
 * bounded by the next timer), then runs completions, expired timers and deferred tasks.
 * Returns the number of events handled or -errno on a fatal loop error. */
int wp_loop_run_once(struct wp_loop *loop, uint64_t max_wait_ns);

/* Operations currently in flight (for leak checks and admin output). */
unsigned wp_loop_inflight(const struct wp_loop *loop);

#endif
