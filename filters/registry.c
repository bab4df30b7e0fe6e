/* The static table of HTTP filters we implement (nginx's ngx_modules[] idea): xDS name -> ops. */
#include <string.h>

#include "filters/filter.h"
#include "filters/rbac.h"

static const struct flt_ops *const registry[] = {
        &flt_rbac_http_ops,
        NULL,
};

const struct flt_ops *flt_registry_lookup(const char *name)
{
        for (size_t i = 0; registry[i]; i++)
                if (!strcmp(registry[i]->name, name))
                        return registry[i];
        return NULL;
}
