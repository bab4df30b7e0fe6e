/*
 * CONNECT target parsing and formatting: pure functions, no allocation.
 *
 * What hbone_target_parse() accepts (ztunnel's HboneAddress Display, ISTIO-CONTRACT §1.3):
 *   "a.b.c.d:port"      dotted-quad IPv4 as inet_pton(AF_INET) reads it (no leading zeros)
 *   "[v6]:port"         IPv6 literal in brackets, no zone id
 *   "host:port"         DNS name: labels of 1..63 [A-Za-z0-9-], no leading/trailing '-', no empty
 *                       label (so no trailing dot), the last label not all digits (that is a
 *                       broken IPv4 literal, not a name), at most HBONE_HOST_MAX bytes
 * port is 1..5 decimal digits (leading zeros allowed) with a value 1..65535. Anything else
 * (userinfo, path, query, spaces, NUL, bare IPv6, unbalanced brackets) is -EINVAL.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>

#include "hbone/hbone.h"

static int parse_port(const char *p, size_t n, uint16_t *ret)
{
        unsigned v = 0;

        if (n == 0 || n > 5)
                return -EINVAL;
        for (size_t i = 0; i < n; i++) {
                if (p[i] < '0' || p[i] > '9')
                        return -EINVAL;
                v = v * 10 + (unsigned)(p[i] - '0');
        }
        if (v == 0 || v > 65535)
                return -EINVAL;
        *ret = (uint16_t)v;
        return 0;
}

static int is_alnum(char c)
{
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

static int check_hostname(const char *h, size_t n)
{
        size_t label = 0;
        int all_digits = 1;

        if (n == 0 || n > HBONE_HOST_MAX)
                return -EINVAL;
        for (size_t i = 0; i <= n; i++) {
                if (i == n || h[i] == '.') {
                        /* empty label, or label ending in '-' */
                        if (label == 0 || h[i - 1] == '-')
                                return -EINVAL;
                        if (i == n && all_digits)
                                return -EINVAL;
                        label = 0;
                        all_digits = 1;
                        continue;
                }
                if (!is_alnum(h[i]) && h[i] != '-')
                        return -EINVAL;
                if (h[i] == '-' && label == 0)
                        return -EINVAL;
                if (h[i] < '0' || h[i] > '9')
                        all_digits = 0;
                if (++label > 63)
                        return -EINVAL;
        }
        return 0;
}

int hbone_target_parse(const char *authority, size_t len, struct hbone_target *ret)
{
        struct hbone_target t;
        const char *host, *port;
        size_t hostlen, portlen;

        if (!authority || !ret || len == 0 || len > HBONE_HOST_MAX + 8)
                return -EINVAL;
        memset(&t, 0, sizeof(t));

        if (authority[0] == '[') {
                const char *close = memchr(authority, ']', len);

                if (!close)
                        return -EINVAL;
                host = authority + 1;
                hostlen = (size_t)(close - host);
                if ((size_t)(close - authority) + 1 >= len || close[1] != ':')
                        return -EINVAL;
                port = close + 2;
                portlen = len - (size_t)(port - authority);
                if (hostlen == 0 || hostlen >= INET6_ADDRSTRLEN)
                        return -EINVAL;
                memcpy(t.host, host, hostlen);
                t.host[hostlen] = 0;
                /* inet_pton stops at NUL: reject embedded ones first */
                if (memchr(host, 0, hostlen))
                        return -EINVAL;
                struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&t.addr;
                if (inet_pton(AF_INET6, t.host, &sin6->sin6_addr) != 1)
                        return -EINVAL;
                if (parse_port(port, portlen, &t.port) < 0)
                        return -EINVAL;
                sin6->sin6_family = AF_INET6;
                sin6->sin6_port = htons(t.port);
                t.addrlen = sizeof(*sin6);
                t.is_ip = true;
                *ret = t;
                return 0;
        }

        const char *colon = NULL;
        for (size_t i = 0; i < len; i++) {
                if (authority[i] == ':') {
                        if (colon) /* bare IPv6 or junk */
                                return -EINVAL;
                        colon = authority + i;
                }
        }
        if (!colon)
                return -EINVAL;
        host = authority;
        hostlen = (size_t)(colon - authority);
        port = colon + 1;
        portlen = len - hostlen - 1;
        if (hostlen == 0 || hostlen > HBONE_HOST_MAX)
                return -EINVAL;
        if (parse_port(port, portlen, &t.port) < 0)
                return -EINVAL;
        if (memchr(host, 0, hostlen))
                return -EINVAL;
        memcpy(t.host, host, hostlen);
        t.host[hostlen] = 0;

        struct sockaddr_in *sin = (struct sockaddr_in *)&t.addr;
        if (inet_pton(AF_INET, t.host, &sin->sin_addr) == 1) {
                sin->sin_family = AF_INET;
                sin->sin_port = htons(t.port);
                t.addrlen = sizeof(*sin);
                t.is_ip = true;
        } else {
                if (check_hostname(host, hostlen) < 0)
                        return -EINVAL;
                memset(&t.addr, 0, sizeof(t.addr));
        }
        *ret = t;
        return 0;
}

int hbone_target_format(const struct sockaddr *addr, char *out, size_t cap)
{
        char ip[INET6_ADDRSTRLEN];
        int n;

        if (!addr || !out)
                return -EINVAL;
        if (addr->sa_family == AF_INET) {
                const struct sockaddr_in *sin = (const struct sockaddr_in *)addr;

                if (!inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip)))
                        return -EINVAL;
                n = snprintf(out, cap, "%s:%u", ip, (unsigned)ntohs(sin->sin_port));
        } else if (addr->sa_family == AF_INET6) {
                const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)addr;

                if (!inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip)))
                        return -EINVAL;
                n = snprintf(out, cap, "[%s]:%u", ip, (unsigned)ntohs(sin6->sin6_port));
        } else {
                return -EINVAL;
        }
        if (n < 0 || (size_t)n >= cap)
                return -ENOSPC;
        return n;
}
