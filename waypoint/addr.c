#include <arpa/inet.h>
#include <errno.h>
#include <string.h>

#include "hbone/hbone.h"
#include "waypoint/daemon.h"

int wp_addr_parse(const char *s, struct wp_addr *a)
{
        struct hbone_target t;

        if (hbone_target_parse(s, strlen(s), &t) < 0 || !t.is_ip)
                return -EINVAL;
        memset(a, 0, sizeof(*a));
        memcpy(&a->ss, &t.addr, t.addrlen);
        a->len = t.addrlen;
        a->set = true;
        return 0;
}
