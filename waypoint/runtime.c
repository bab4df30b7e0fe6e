/* The runtime shared by the control thread, the admin thread and the workers. */
#include <stdatomic.h>
#include <time.h>

#include "waypoint/base/tls.h"
#include "waypoint/daemon.h"
#include "waypoint/snapshot.h"

void wp_runtime_publish(struct wp_runtime *rt, struct wp_snapshot *s)
{
        struct wp_snapshot *old;
        struct timespec ts;

        clock_gettime(CLOCK_REALTIME, &ts);
        atomic_store(&rt->snap_published_ms, (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
        pthread_mutex_lock(&rt->snap_lock);
        old = rt->current;
        rt->current = s;
        atomic_fetch_add_explicit(&rt->snap_version, 1, memory_order_release);
        pthread_mutex_unlock(&rt->snap_lock);
        wp_snapshot_unref(old);
        for (unsigned i = 0; i < rt->nworkers; i++)
                if (rt->workers[i])
                        wp_worker_wake(rt->workers[i]);
}

struct wp_snapshot *wp_runtime_snapshot(struct wp_runtime *rt)
{
        struct wp_snapshot *s;

        pthread_mutex_lock(&rt->snap_lock);
        s = wp_snapshot_ref(rt->current);
        pthread_mutex_unlock(&rt->snap_lock);
        return s;
}

void wp_runtime_set_tls(struct wp_runtime *rt, struct wp_tls_ctx *server, struct wp_tls_ctx *client)
{
        struct wp_tls_ctx *old_server, *old_client;

        pthread_mutex_lock(&rt->snap_lock);
        old_server = rt->server_tls;
        old_client = rt->client_tls;
        rt->server_tls = server;
        rt->client_tls = client;
        /* workers compare versions to pick up the new contexts with the snapshot */
        atomic_fetch_add_explicit(&rt->snap_version, 1, memory_order_release);
        pthread_mutex_unlock(&rt->snap_lock);
        wp_tls_ctx_unref(old_server);
        wp_tls_ctx_unref(old_client);
        for (unsigned i = 0; i < rt->nworkers; i++)
                if (rt->workers[i])
                        wp_worker_wake(rt->workers[i]);
}
