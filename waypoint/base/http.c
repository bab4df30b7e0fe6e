#include "waypoint/base/http.h"

#include <errno.h>
#include <string.h>

#include "waypoint/base/alloc.h"

int wp_headers_add(struct wp_headers *h, const char *name, uint32_t name_len, const char *value,
                   uint32_t value_len)
{
        if (h->n == h->cap) {
                uint32_t cap = h->cap ? h->cap * 2 : 16;
                struct wp_header *v = wp_realloc(h->v, cap * sizeof(*v));

                if (!v)
                        return -ENOMEM;
                h->v = v;
                h->cap = cap;
        }
        h->v[h->n++] = (struct wp_header){name, value, name_len, value_len};
        h->bytes += (size_t)name_len + value_len;
        return 0;
}

const char *wp_headers_get(const struct wp_headers *h, const char *name, uint32_t *ret_len)
{
        size_t len = strlen(name);

        for (uint32_t i = 0; i < h->n; i++)
                if (h->v[i].name_len == len && memcmp(h->v[i].name, name, len) == 0) {
                        if (ret_len)
                                *ret_len = h->v[i].value_len;
                        return h->v[i].value;
                }
        return NULL;
}

unsigned wp_headers_remove(struct wp_headers *h, const char *name)
{
        size_t len = strlen(name);
        uint32_t k = 0;
        unsigned removed = 0;

        for (uint32_t i = 0; i < h->n; i++) {
                if (h->v[i].name_len == len && memcmp(h->v[i].name, name, len) == 0) {
                        h->bytes -= (size_t)h->v[i].name_len + h->v[i].value_len;
                        removed++;
                        continue;
                }
                h->v[k++] = h->v[i];
        }
        h->n = k;
        return removed;
}

void wp_headers_done(struct wp_headers *h)
{
        wp_free(h->v);
        wp_headers_init(h);
}
