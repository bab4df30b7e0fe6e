/*
 * X.509 / SPIFFE helpers. The SPIFFE parser is pure; wp_x509_spiffe_uri() is the one place that
 * reads a certificate's SAN extension, and it leaves nothing on OpenSSL's error queue.
 */
#include "waypoint/base/x509.h"

#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "waypoint/base/alloc.h"

#define SPIFFE_PREFIX     "spiffe://"
#define SPIFFE_PREFIX_LEN (sizeof(SPIFFE_PREFIX) - 1)
/* SPIFFE-ID §2.3: a SPIFFE ID is at most 2048 bytes. Our fields are bounded well below that. */
#define SPIFFE_URI_MAX 2048

/* SPIFFE-ID §2.1: trust domain characters are lower-case letters, digits, '.', '-' and '_'. */
static bool td_char(char c)
{
        return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
}

/* SPIFFE-ID §2.2: path segment characters are letters, digits, '.', '-' and '_'. This excludes
 * '%' (no percent-encoding), '?', '#', '/', NUL and everything non-ASCII. */
static bool seg_char(char c)
{
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '.' || c == '-' || c == '_';
}

/* Consumes one path segment [p, end) up to the next '/' or end; returns its length or -EINVAL
 * (empty, too long, bad character, or the dot segments "." and ".."). */
static int take_segment(const char *p, const char *end, size_t max)
{
        size_t n = 0;

        while (p + n < end && p[n] != '/') {
                if (!seg_char(p[n]))
                        return -EINVAL;
                n++;
        }
        if (n == 0 || n > max)
                return -EINVAL;
        if ((n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.'))
                return -EINVAL;
        return (int)n;
}

/* Matches the literal "/<word>/" at p; returns the position after it or NULL. */
static const char *take_literal(const char *p, const char *end, const char *lit)
{
        size_t n = strlen(lit);

        if ((size_t)(end - p) < n || memcmp(p, lit, n) != 0)
                return NULL;
        return p + n;
}

int wp_spiffe_parse(const char *uri, size_t len, struct wp_spiffe_id *ret)
{
        const char *p, *end, *td, *ns, *sa;
        size_t td_len = 0;
        int ns_len, sa_len;

        if (!uri || len > SPIFFE_URI_MAX || len < SPIFFE_PREFIX_LEN ||
            memcmp(uri, SPIFFE_PREFIX, SPIFFE_PREFIX_LEN) != 0)
                return -EINVAL;
        p = uri + SPIFFE_PREFIX_LEN;
        end = uri + len;

        td = p;
        while (p < end && *p != '/') {
                if (!td_char(*p))
                        return -EINVAL;
                p++;
                td_len++;
        }
        if (td_len == 0 || td_len > WP_SPIFFE_TD_MAX)
                return -EINVAL;

        p = take_literal(p, end, "/ns/");
        if (!p)
                return -EINVAL;
        ns = p;
        ns_len = take_segment(p, end, WP_SPIFFE_SEG_MAX);
        if (ns_len < 0)
                return ns_len;
        p += ns_len;

        p = take_literal(p, end, "/sa/");
        if (!p)
                return -EINVAL;
        sa = p;
        sa_len = take_segment(p, end, WP_SPIFFE_SEG_MAX);
        if (sa_len < 0)
                return sa_len;
        p += sa_len;

        /* Nothing may follow: no extra segments and no trailing '/'. */
        if (p != end)
                return -EINVAL;

        if (ret) {
                memcpy(ret->td, td, td_len);
                ret->td[td_len] = 0;
                memcpy(ret->ns, ns, (size_t)ns_len);
                ret->ns[ns_len] = 0;
                memcpy(ret->sa, sa, (size_t)sa_len);
                ret->sa[sa_len] = 0;
        }
        return 0;
}

int wp_x509_spiffe_uri(const void *x509, char *out, size_t cap)
{
        GENERAL_NAMES *names;
        const ASN1_IA5STRING *uri = NULL;
        int crit = -1, n, i, r;
        size_t len;

        if (!x509 || !out)
                return -EINVAL;
        names = X509_get_ext_d2i((const X509 *)x509, NID_subject_alt_name, &crit, NULL);
        if (!names) {
                ERR_clear_error();
                /* -1: no SAN extension; -2: the extension appears twice; else undecodable. */
                return crit == -1 ? -ENOENT : -EINVAL;
        }
        n = sk_GENERAL_NAME_num(names);
        r = -ENOENT;
        for (i = 0; i < n; i++) {
                const GENERAL_NAME *gn = sk_GENERAL_NAME_value(names, i);

                if (gn->type != GEN_URI)
                        continue;
                if (uri) {
                        r = -EINVAL; /* more than one URI SAN: ambiguous identity */
                        goto out_free;
                }
                uri = gn->d.uniformResourceIdentifier;
        }
        if (!uri)
                goto out_free;
        if (uri->length < 0 ||
            wp_spiffe_parse((const char *)uri->data, (size_t)uri->length, NULL) < 0) {
                r = -EINVAL;
                goto out_free;
        }
        len = (size_t)uri->length;
        if (len + 1 > cap) {
                r = -ENOSPC;
                goto out_free;
        }
        memcpy(out, uri->data, len);
        out[len] = 0;
        r = 0;
out_free:
        GENERAL_NAMES_free(names);
        return r;
}

int wp_read_file(const char *path, size_t max, char **ret, size_t *ret_len)
{
        size_t cap, len = 0;
        struct stat st;
        char *buf, *nbuf;
        int fd, r;

        if (!path || !ret)
                return -EINVAL;
        if (max > SIZE_MAX / 4)
                max = SIZE_MAX / 4; /* keeps the max + 2 arithmetic below from wrapping */
        fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY);
        if (fd < 0)
                return -errno;
        if (fstat(fd, &st) < 0) {
                r = -errno;
                goto err_close;
        }
        if (S_ISDIR(st.st_mode)) {
                r = -EISDIR;
                goto err_close;
        }
        /* Size from fstat is a hint only (procfs, pipes report 0); the read loop is the truth. */
        cap = S_ISREG(st.st_mode) && (size_t)st.st_size <= max ? (size_t)st.st_size + 1 : 4096;
        if (cap > max + 1)
                cap = max + 1;
        buf = wp_malloc(cap);
        if (!buf) {
                r = -ENOMEM;
                goto err_close;
        }
        for (;;) {
                ssize_t n;

                if (len + 1 == cap) {
                        size_t ncap;

                        if (len > max) {
                                r = -EFBIG;
                                goto err_free;
                        }
                        ncap = cap * 2 > max + 2 ? max + 2 : cap * 2;
                        if (ncap <= cap)
                                ncap = cap + 1;
                        nbuf = wp_realloc(buf, ncap);
                        if (!nbuf) {
                                r = -ENOMEM;
                                goto err_free;
                        }
                        buf = nbuf;
                        cap = ncap;
                }
                n = read(fd, buf + len, cap - 1 - len);
                if (n < 0) {
                        if (errno == EINTR)
                                continue;
                        r = -errno;
                        goto err_free;
                }
                if (n == 0)
                        break;
                len += (size_t)n;
        }
        if (len > max) {
                r = -EFBIG;
                goto err_free;
        }
        close(fd);
        buf[len] = 0;
        *ret = buf;
        if (ret_len)
                *ret_len = len;
        return 0;

err_free:
        wp_free(buf);
err_close:
        close(fd);
        return r;
}
