/* Whole-length pread and pwrite of the data store, and a zero test: shared by the
 * compiled read path (store/_blockread.c) and the direct path (engine/_direct.c). */
#ifndef BLOCKSNAP_FILEIO_H
#define BLOCKSNAP_FILEIO_H

#include <errno.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

/* pread until `len` bytes or end of file (the rest zeroed); 0 or an errno. */
static int read_full(int fd, char *dst, size_t len, off_t pos)
{
    while (len) {
        ssize_t n = pread(fd, dst, len, pos);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        if (n == 0) {
            memset(dst, 0, len);
            return 0;
        }
        dst += n;
        len -= (size_t)n;
        pos += n;
    }
    return 0;
}

/* pwrite all of it; 0 or an errno (part of it may be written then). */
static int write_full(int fd, const char *src, size_t len, off_t pos)
{
    while (len) {
        ssize_t n = pwrite(fd, src, len, pos);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return errno;
        }
        src += n;
        len -= (size_t)n;
        pos += n;
    }
    return 0;
}

static int all_zero(const char *p, size_t n)
{
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

#endif
