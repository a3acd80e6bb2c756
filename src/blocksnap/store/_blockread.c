/* Reading mapped blocks out of the data store and checking them, without the GIL.
 *
 * The Python read path (engine/blockio.read_stored) does the same work, but holds the
 * interpreter lock while it zeroes holes and hashes every block; on the FUSE read
 * path that time sits between one request and the next. Here the whole request
 * (zero holes, one pread per run of adjacent blocks, xxh3 of every block read) runs
 * with the lock released, so libfuse's other threads keep serving.
 *
 * read_blocks(fd, ptrs, sums, block_size, unit, out, verify, zero_holes[, skip, length]) -> int
 *   ptrs, sums: C-contiguous uint64 buffers of n entries (store position of each
 *   block in units, and its xxh3-64); a ptr below 2 is not in the store: its block
 *   of `out` is zeroed if zero_holes, else left alone.
 *   out: writable buffer of at least n * block_size bytes; or, with skip and
 *   length, of `length` bytes that receive bytes [skip, skip + length) of the n
 *   blocks. A request that does not start or end on a block boundary (a loop
 *   device splits 1 MiB at 128 pages, wherever that falls) then goes straight
 *   into `out` too: only its partial edge blocks pass through a block-sized
 *   buffer, where they are checked whole. Holes always read as zeros then.
 *   Returns -1 when every block read matched its checksum (or verify is false),
 *   else the index of the first block that did not. Raises OSError on I/O errors.
 *   Bytes past the end of the store read as zeros, like FileStore.preadinto.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "fileio.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)   /* the pragma is GCC's */
uint64_t blockread_xxh3_avx2(const void *data, size_t len);   /* _blockread_avx2.c */
#endif

static uint64_t xxh3_default(const void *data, size_t len)
{
    return XXH3_64bits(data, len);
}

/* xxh3-64 with seed 0, as xxhash.xxh3_64_intdigest: the fastest build this CPU runs */
static uint64_t (*xxh3)(const void *, size_t) = xxh3_default;

/* The largest store position (in units) whose blocks' byte offsets fit an off_t. */
#define MAX_PTR(unit) ((uint64_t)(INT64_MAX / 2) / (uint64_t)(unit))

/* The work itself, run without the GIL: 0 and *bad set, or an errno. */
static int fill(int fd, const uint64_t *ptrs, const uint64_t *sums, Py_ssize_t n, size_t bs,
                uint64_t units, size_t unit, char *out, int verify, int zero_holes, Py_ssize_t *bad)
{
    Py_ssize_t i = 0;
    *bad = -1;
    while (i < n) {
        if (ptrs[i] < 2) {
            Py_ssize_t j = i + 1;
            while (j < n && ptrs[j] < 2)
                j++;
            if (zero_holes)
                memset(out + (size_t)i * bs, 0, (size_t)(j - i) * bs);
            i = j;
            continue;
        }
        Py_ssize_t j = i + 1;
        while (j < n && ptrs[j] == ptrs[j - 1] + units)
            j++;
        if (ptrs[i] > MAX_PTR(unit) || ptrs[j - 1] > MAX_PTR(unit))
            return EOVERFLOW;   /* a map entry past any possible store: never wrap it */
        int err = read_full(fd, out + (size_t)i * bs, (size_t)(j - i) * bs, (off_t)(ptrs[i] * unit));
        if (err)
            return err;
        if (verify && *bad < 0) {
            for (Py_ssize_t k = i; k < j; k++) {
                if (xxh3(out + (size_t)k * bs, bs) != sums[k]) {
                    *bad = k;
                    break;
                }
            }
        }
        i = j;
    }
    return 0;
}

/* One block of which only [lo, hi) (bytes within the block) is wanted, at dst:
 * read and checked whole in tmp, then copied. */
static int fill_partial(int fd, uint64_t ptr, uint64_t sum, size_t bs, size_t unit, char *tmp,
                        size_t lo, size_t hi, char *dst, int verify, int *mismatch)
{
    if (ptr < 2) {
        memset(dst, 0, hi - lo);
        return 0;
    }
    if (ptr > MAX_PTR(unit))
        return EOVERFLOW;
    int err = read_full(fd, tmp, bs, (off_t)(ptr * unit));
    if (err)
        return err;
    if (verify && xxh3(tmp, bs) != sum)
        *mismatch = 1;
    memcpy(dst, tmp + lo, hi - lo);
    return 0;
}

/* Bytes [skip, skip + len) of the n blocks into out. The caller made sure that
 * skip < bs and (n - 1) * bs < skip + len <= n * bs: every block is used. */
static int fill_range(int fd, const uint64_t *ptrs, const uint64_t *sums, Py_ssize_t n, size_t bs,
                      uint64_t units, size_t unit, char *out, size_t skip, size_t len, int verify,
                      Py_ssize_t *bad)
{
    size_t end = skip + len;
    Py_ssize_t tail = end % bs ? n - 1 : -1;           /* block holding a partial end */
    Py_ssize_t first = skip ? 1 : 0;                    /* whole blocks: [first, last) */
    Py_ssize_t last = tail >= 0 ? tail : n;
    char *tmp = NULL;
    int err = 0, mismatch = 0;
    *bad = -1;
    if (skip || tail >= 0) {
        tmp = malloc(bs);
        if (tmp == NULL)
            return ENOMEM;
    }
    if (skip) {
        err = fill_partial(fd, ptrs[0], sums[0], bs, unit, tmp, skip, end < bs ? end : bs, out,
                           verify, &mismatch);
        if (err)
            goto done;
        if (mismatch)
            *bad = 0;
    }
    if (last > first) {
        Py_ssize_t b = -1;
        err = fill(fd, ptrs + first, sums + first, last - first, bs, units, unit,
                   out + (size_t)first * bs - skip, verify, 1, &b);
        if (err)
            goto done;
        if (b >= 0 && *bad < 0)
            *bad = first + b;
    }
    if (tail >= 0 && !(tail == 0 && skip)) {   /* (within block 0, the head did it all) */
        mismatch = 0;
        err = fill_partial(fd, ptrs[tail], sums[tail], bs, unit, tmp, 0, end - (size_t)tail * bs,
                           out + (size_t)tail * bs - skip, verify, &mismatch);
        if (err)
            goto done;
        if (mismatch && *bad < 0)
            *bad = tail;
    }
done:
    free(tmp);
    return err;
}

static int u64_view(PyObject *obj, Py_buffer *view, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return -1;
    const char *fmt = view->format;
    size_t flen = fmt ? strlen(fmt) : 0;
    if (view->itemsize != 8 || flen == 0 || strchr("QLqlN", fmt[flen - 1]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous array of 64-bit integers", what);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *read_blocks(PyObject *self, PyObject *args)
{
    int fd, verify, zero_holes;
    Py_ssize_t bs, unit, skip = 0, length = -1;
    PyObject *ptrs_obj, *sums_obj, *out_obj;
    Py_buffer ptrs, sums, out;
    if (!PyArg_ParseTuple(args, "iOOnnOpp|nn", &fd, &ptrs_obj, &sums_obj, &bs, &unit, &out_obj, &verify,
                          &zero_holes, &skip, &length))
        return NULL;
    if (bs <= 0 || unit <= 0 || bs % unit || bs > (1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "block size must be a positive multiple of the unit, at most 1 GiB");
        return NULL;
    }
    if (u64_view(ptrs_obj, &ptrs, "ptrs") < 0)
        return NULL;
    if (u64_view(sums_obj, &sums, "sums") < 0) {
        PyBuffer_Release(&ptrs);
        return NULL;
    }
    if (PyObject_GetBuffer(out_obj, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&ptrs);
        PyBuffer_Release(&sums);
        return NULL;
    }
    Py_ssize_t n = ptrs.len / 8;
    PyObject *result = NULL;
    if (n > PY_SSIZE_T_MAX / bs) {   /* n * bs below must not overflow */
        PyErr_SetString(PyExc_ValueError, "too many blocks for one read");
        PyBuffer_Release(&ptrs);
        PyBuffer_Release(&sums);
        PyBuffer_Release(&out);
        return NULL;
    }
    int ranged = skip != 0 || length >= 0;
    if (length < 0)
        length = n * bs - skip;
    if (sums.len / 8 < n) {
        PyErr_SetString(PyExc_ValueError, "sums shorter than ptrs");
    } else if (skip < 0 || (n && skip >= bs) || length < 0 || (n && length == 0) || skip + length > n * bs
               || (n && skip + length <= (n - 1) * bs)) {
        PyErr_SetString(PyExc_ValueError, "skip and length must fall within the blocks and use every one");
    } else if (out.len < (ranged ? length : n * bs)) {
        PyErr_SetString(PyExc_ValueError, "out is shorter than what is read");
    } else if (ranged && !zero_holes) {
        PyErr_SetString(PyExc_ValueError, "a range read always zeroes holes");
    } else {
        Py_ssize_t bad = -1;
        int err;
        Py_BEGIN_ALLOW_THREADS
        if (ranged)
            err = fill_range(fd, (const uint64_t *)ptrs.buf, (const uint64_t *)sums.buf, n, (size_t)bs,
                             (uint64_t)(bs / unit), (size_t)unit, (char *)out.buf, (size_t)skip,
                             (size_t)length, verify, &bad);
        else
            err = fill(fd, (const uint64_t *)ptrs.buf, (const uint64_t *)sums.buf, n, (size_t)bs,
                       (uint64_t)(bs / unit), (size_t)unit, (char *)out.buf, verify, zero_holes, &bad);
        Py_END_ALLOW_THREADS
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            result = PyLong_FromSsize_t(bad);
        }
    }
    PyBuffer_Release(&ptrs);
    PyBuffer_Release(&sums);
    PyBuffer_Release(&out);
    return result;
}

/* merge_write: see the module docstring of filestore.FileStore.merge_write. */
static PyObject *merge_write(PyObject *self, PyObject *args)
{
    int fd, have;
    long long pos;
    Py_ssize_t lo;
    unsigned long long old_sum;
    PyObject *data_obj, *buf_obj;
    Py_buffer data, buf;
    if (!PyArg_ParseTuple(args, "iLnOOpK", &fd, &pos, &lo, &data_obj, &buf_obj, &have, &old_sum))
        return NULL;
    if (PyObject_GetBuffer(data_obj, &data, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    if (PyObject_GetBuffer(buf_obj, &buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    if (pos < 0 || lo < 0 || data.len <= 0 || lo + data.len > buf.len) {
        PyErr_SetString(PyExc_ValueError, "the write must fall inside the block");
    } else {
        int err = 0, status = 0, werr = 0;
        uint64_t sum = 0;
        char *b = (char *)buf.buf;
        size_t bs = (size_t)buf.len, l = (size_t)lo, h = (size_t)(lo + data.len);
        Py_BEGIN_ALLOW_THREADS
        if (!have && (l || h < bs)) {   /* (a whole block needs nothing of the old one) */
            err = read_full(fd, b, bs, (off_t)pos);
            if (!err && xxh3(b, bs) != old_sum)
                status = 1;
        }
        if (!err && !status && all_zero(data.buf, (size_t)data.len) && all_zero(b, l) && all_zero(b + h, bs - h))
            status = 2;
        if (!err && !status) {
            memcpy(b + l, data.buf, (size_t)data.len);
            werr = write_full(fd, (const char *)data.buf, (size_t)data.len, (off_t)pos + (off_t)l);
            if (werr)
                status = 3;   /* the write failed part way, or not: the caller re-reads */
            sum = werr ? (uint64_t)werr : xxh3(b, bs);
        }
        Py_END_ALLOW_THREADS
        if (err) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
        } else {
            result = Py_BuildValue("iK", status, (unsigned long long)sum);
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"merge_write", merge_write, METH_VARARGS,
     "merge_write(fd, pos, lo, data, block, have, old_sum) -> (status, new_sum):"
     " block (the stored block at byte pos, read and checked against old_sum unless have)"
     " gets data at lo, and only data is written; status 0 done, 1 the block failed its"
     " checksum, 2 the block would be all zeros (nothing written either way), 3 the write"
     " failed (new_sum is then its errno)"},
    {"read_blocks", read_blocks, METH_VARARGS,
     "read_blocks(fd, ptrs, sums, block_size, unit, out, verify, zero_holes[, skip, length])"
     " -> first bad block or -1"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_blockread",
    "Zero, read and checksum mapped blocks with the GIL released.", -1, methods,
};

PyMODINIT_FUNC PyInit__blockread(void)
{
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)   /* the pragma is GCC's */
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        xxh3 = blockread_xxh3_avx2;
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "xxh3_build", xxh3 == xxh3_default ? "default" : "avx2") < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
