/* The control thread (control.c): Istio CA identity and ADS config. */
#ifndef WP_CONTROL_H
#define WP_CONTROL_H

#include <stdbool.h>
#include <stdint.h>

struct wp_runtime;
struct wp_bootstrap;
struct wp_control;

struct wp_control_stats {
        bool have_cert;
        int64_t cert_not_after;
        uint64_t rotations, updates, rejects, acks, nacks;
        char last_nack[256];
};

/* Starts the thread. static_identity: certificates came from files (no CA calls);
 * static_config: resources came from a file (no ADS). bs must outlive the control. */
int wp_control_start(struct wp_runtime *rt, struct wp_bootstrap *bs, bool static_identity,
                     bool static_config, struct wp_control **ret);
void wp_control_stop(struct wp_control *c); /* NULL-safe */
void wp_control_stats(const struct wp_control *c, struct wp_control_stats *st);

#endif
