/*
 * C API over RE2 (see re2_shim.h). Every C++ exception (std::bad_alloc from RE2's internals)
 * is caught here and turned into -ENOMEM or a non-match, so none crosses into C code.
 */
#include "waypoint/base/re2_shim.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

#include <new>
#include <re2/re2.h>

struct wp_re2 {
        re2::RE2 re;
        explicit wp_re2(const re2::StringPiece &p, const re2::RE2::Options &o) : re(p, o)
        {
        }
};

static void set_err(char *errbuf, size_t errlen, const char *msg)
{
        if (errbuf && errlen)
                snprintf(errbuf, errlen, "%s", msg);
}

extern "C" int wp_re2_new(const char *pattern, size_t len, unsigned max_program_size,
                          struct wp_re2 **ret, char *errbuf, size_t errlen)
{
        if (len > WP_RE2_MAX_PATTERN) {
                set_err(errbuf, errlen, "regex too long");
                return -E2BIG;
        }
        try {
                re2::RE2::Options opt;
                opt.set_log_errors(false);
                wp_re2 *r = new (std::nothrow) wp_re2(re2::StringPiece(pattern, len), opt);
                if (!r)
                        return -ENOMEM;
                if (!r->re.ok()) {
                        if (r->re.error_code() == re2::RE2::ErrorPatternTooLarge) {
                                delete r;
                                set_err(errbuf, errlen, "pattern too large");
                                return -EINVAL;
                        }
                        set_err(errbuf, errlen, r->re.error().c_str());
                        delete r;
                        return -EINVAL;
                }
                if (max_program_size > 0 && r->re.ProgramSize() > (int)max_program_size) {
                        if (errbuf && errlen)
                                snprintf(errbuf, errlen,
                                         "regex program size %d exceeds the limit %u",
                                         r->re.ProgramSize(), max_program_size);
                        delete r;
                        return -EINVAL;
                }
                *ret = r;
                return 0;
        } catch (...) {
                set_err(errbuf, errlen, "out of memory");
                return -ENOMEM;
        }
}

extern "C" struct wp_re2 *wp_re2_free(struct wp_re2 *re)
{
        delete re;
        return nullptr;
}

extern "C" bool wp_re2_full_match(const struct wp_re2 *re, const char *s, size_t len)
{
        try {
                return re2::RE2::FullMatch(re2::StringPiece(s, len), re->re);
        } catch (...) {
                return false;
        }
}

extern "C" int wp_re2_groups(const struct wp_re2 *re)
{
        return re->re.NumberOfCapturingGroups();
}

/* Highest \N referenced by rewrite, or -1 when none, or -2 when malformed. */
static int max_ref(const char *rw, size_t n)
{
        int mx = -1;

        for (size_t i = 0; i < n; i++) {
                if (rw[i] != '\\')
                        continue;
                if (i + 1 >= n)
                        return -2;
                char c = rw[++i];
                if (c == '\\')
                        continue;
                if (c < '0' || c > '9')
                        return -2;
                if (c - '0' > mx)
                        mx = c - '0';
        }
        return mx;
}

extern "C" int wp_re2_check_rewrite(const struct wp_re2 *re, const char *rewrite, size_t rlen,
                                    char *errbuf, size_t errlen)
{
        int mx = max_ref(rewrite, rlen);

        if (mx == -2) {
                set_err(errbuf, errlen,
                        "invalid rewrite: a backslash must be followed by a digit or a backslash");
                return -EINVAL;
        }
        if (mx > re->re.NumberOfCapturingGroups()) {
                if (errbuf && errlen)
                        snprintf(errbuf, errlen,
                                 "invalid rewrite: \\%d refers to a group the regex does not "
                                 "have (%d groups)",
                                 mx, re->re.NumberOfCapturingGroups());
                return -EINVAL;
        }
        return 0;
}

/* Length of the UTF-8 sequence at p (1 when invalid), as RE2 steps over an empty match. */
static size_t utf8_step(const unsigned char *p, size_t avail)
{
        size_t n;

        if (p[0] < 0x80)
                return 1;
        if ((p[0] & 0xe0) == 0xc0)
                n = 2;
        else if ((p[0] & 0xf0) == 0xe0)
                n = 3;
        else if ((p[0] & 0xf8) == 0xf0)
                n = 4;
        else
                return 1;
        if (n > avail)
                return 1;
        for (size_t i = 1; i < n; i++)
                if ((p[i] & 0xc0) != 0x80)
                        return 1;
        return n;
}

namespace
{
struct outbuf {
        char *out;
        size_t cap, len;
        bool overflow;
        void put(const char *s, size_t n)
        {
                if (overflow || n > cap - len) {
                        overflow = true;
                        return;
                }
                memcpy(out + len, s, n);
                len += n;
        }
};
} // namespace

extern "C" ssize_t wp_re2_replace_all(const struct wp_re2 *re, const char *s, size_t len,
                                      const char *rewrite, size_t rlen, char *out, size_t cap)
{
        re2::StringPiece vec[10];
        int mx = max_ref(rewrite, rlen);
        int nvec = mx < 0 ? 1 : mx + 1;
        outbuf ob{out, cap ? cap - 1 : 0, 0, cap == 0};
        size_t p = 0;
        const char *lastend = nullptr;
        unsigned count = 0;
        re2::StringPiece text(s, len);

        if (mx == -2 || nvec > 10)
                return -EINVAL;
        try {
                while (p <= len) {
                        if (!re->re.Match(text, p, len, re2::RE2::UNANCHORED, vec, nvec))
                                break;
                        size_t mstart = (size_t)(vec[0].data() - s);
                        if (p < mstart)
                                ob.put(s + p, mstart - p);
                        if (vec[0].data() == lastend && vec[0].empty()) {
                                /* No empty match right where the previous match ended: copy
                                 * one character and move on. */
                                if (p < len) {
                                        size_t n = utf8_step((const unsigned char *)s + p, len - p);
                                        ob.put(s + p, n);
                                        p += n;
                                } else {
                                        p++;
                                }
                                continue;
                        }
                        for (size_t i = 0; i < rlen; i++) {
                                if (rewrite[i] != '\\') {
                                        ob.put(rewrite + i, 1);
                                        continue;
                                }
                                char c = rewrite[++i];
                                if (c == '\\') {
                                        ob.put("\\", 1);
                                        continue;
                                }
                                const re2::StringPiece &g = vec[c - '0'];
                                if (g.data())
                                        ob.put(g.data(), g.size());
                        }
                        p = mstart + vec[0].size();
                        lastend = s + p;
                        count++;
                }
        } catch (...) {
                return -ENOMEM;
        }
        if (count == 0) {
                ob.len = 0;
                ob.overflow = cap == 0;
                ob.put(s, len);
        } else if (p < len) {
                ob.put(s + p, len - p);
        }
        if (ob.overflow)
                return -ENOSPC;
        out[ob.len] = 0;
        return (ssize_t)ob.len;
}
