/* Direct block access: the engine's compiled read and in-place write of leased blocks.
 *
 * Why: a 4 KiB FUSE request costs the Python engine ~0.15 ms of CPU with the GIL
 * held, so one interpreter tops out near 6,000 requests a second, and even an empty
 * Python FUSE handler tops out near 18,000 (tools/fuse_floor.py). qemu-storage-daemon
 * serves 30,000-45,000 on the same machine. The common request of a VM or a database,
 * a small read or an overwrite inside one block that only the live map reaches, needs
 * none of the engine's Python: find the block, check its checksum, merge, write the
 * new bytes in place, hash. This file does that without the interpreter, for blocks
 * the engine has *leased* (engine/direct.py decides and revokes, under the pool lock).
 *
 * PoolLock: the pool's lock. To Python it is a re-entrant lock (the engine's one
 * lock, as threading.RLock was); underneath it is a read-write lock: Python holds it
 * exclusively, a direct request shares it, so no direct request ever runs while the
 * engine changes anything, and direct requests run side by side.
 *
 * The shared state is memory engine/direct.py allocates (numpy) and describes here by
 * address: a header of uint64 words, then per image (an open volume or snapshot) its
 * words, and per image a lease table of 4-word rows:
 *   [block + 1 (0: empty), page << 16 | index, unit, flags]
 * flags: 1 read, 2 write in place, 256 written since the engine last looked.
 * A live COW image (IM_KIND) keeps its data in the origin file, unchecked, as the
 * engine does: a read is one pread there while IM_COW_OK, a write one pwrite there
 * when every block it covers holds a write lease (no snapshot still needs the old
 * bytes: the engine preserved them, committed).
 * A direct request returns the bytes done, a negative errno, or FALLBACK: the caller
 * then hands the request to the Python path, which does everything the usual way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "../store/fileio.h"

#include "direct_state.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
uint64_t blockread_xxh3_avx2(const void *data, size_t len);   /* store/_blockread_avx2.c */
#endif

static uint64_t xxh3_default(const void *data, size_t len) { return XXH3_64bits(data, len); }
static uint64_t (*xxh3)(const void *, size_t) = xxh3_default;

/* ---- the pool lock --------------------------------------------------------------- */
typedef struct {
    PyObject_HEAD
    pthread_rwlock_t rw;
    unsigned long owner;   /* Python thread holding it exclusively, 0 when none */
    long count;            /* its re-entries */
} PoolLock;

static int lock_init(PoolLock *self, PyObject *args, PyObject *kw)
{
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    /* (the engine waiting behind a stream of direct reads would starve otherwise) */
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&self->rw, &attr);
    pthread_rwlockattr_destroy(&attr);
    self->owner = 0;
    self->count = 0;
    return 0;
}

static void lock_dealloc(PoolLock *self)
{
    pthread_rwlock_destroy(&self->rw);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *lock_acquire(PoolLock *self, PyObject *args, PyObject *kw)
{
    static char *names[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|pd", names, &blocking, &timeout))
        return NULL;
    unsigned long me = PyThread_get_thread_ident();
    if (self->owner == me) {
        self->count++;
        Py_RETURN_TRUE;
    }
    int r = pthread_rwlock_trywrlock(&self->rw);
    if (r == EBUSY && blocking) {
        Py_BEGIN_ALLOW_THREADS
        if (timeout < 0) {
            r = pthread_rwlock_wrlock(&self->rw);
        } else {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            double end = (double)ts.tv_sec + ts.tv_nsec / 1e9 + timeout;
            ts.tv_sec = (time_t)end;
            ts.tv_nsec = (long)((end - (double)ts.tv_sec) * 1e9);
            r = pthread_rwlock_timedwrlock(&self->rw, &ts);
        }
        Py_END_ALLOW_THREADS
    }
    if (r)
        Py_RETURN_FALSE;
    self->owner = me;
    self->count = 1;
    Py_RETURN_TRUE;
}

static PyObject *lock_release(PoolLock *self, PyObject *unused)
{
    if (self->owner != PyThread_get_thread_ident() || self->count <= 0) {
        PyErr_SetString(PyExc_RuntimeError, "cannot release un-acquired lock");
        return NULL;
    }
    if (--self->count == 0) {
        self->owner = 0;
        pthread_rwlock_unlock(&self->rw);
    }
    Py_RETURN_NONE;
}

static PyObject *lock_enter(PoolLock *self, PyObject *unused)
{
    PyObject *none = PyTuple_New(0);
    if (none == NULL)
        return NULL;
    PyObject *r = lock_acquire(self, none, NULL);
    Py_DECREF(none);
    return r;
}

static PyObject *lock_exit(PoolLock *self, PyObject *args)
{
    return lock_release(self, NULL);
}

static PyObject *lock_is_owned(PoolLock *self, PyObject *unused)
{
    return PyBool_FromLong(self->owner == PyThread_get_thread_ident());
}

static PyObject *lock_address(PoolLock *self, PyObject *unused)
{
    return PyLong_FromVoidPtr(&self->rw);
}

static PyMethodDef lock_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))lock_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1) -> bool"},
    {"release", (PyCFunction)lock_release, METH_NOARGS, "release()"},
    {"__enter__", (PyCFunction)lock_enter, METH_NOARGS, NULL},
    {"__exit__", (PyCFunction)lock_exit, METH_VARARGS, NULL},
    {"_is_owned", (PyCFunction)lock_is_owned, METH_NOARGS, "held by this thread?"},
    {"address", (PyCFunction)lock_address, METH_NOARGS, "where the read-write lock is (for the state header)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PoolLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "blocksnap.engine._direct.PoolLock",
    .tp_basicsize = sizeof(PoolLock),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The pool's re-entrant lock, shared with direct requests (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lock_init,
    .tp_dealloc = (destructor)lock_dealloc,
    .tp_methods = lock_methods,
};

/* ---- direct requests --------------------------------------------------------------- */
#define STRIPES 1024
static pthread_mutex_t stripes[STRIPES];   /* one merge and hash at a time per block */

static pthread_mutex_t *stripe(uint64_t unit)
{
    return &stripes[(unit * 0x9E3779B97F4A7C15ull) >> 54];
}

static __thread char *scratch;
static __thread size_t scratch_len;

static char *scratch_for(size_t n)
{
    if (scratch_len < n) {
        free(scratch);
        scratch = NULL;
        scratch_len = 0;
        if (posix_memalign((void **)&scratch, 4096, n))
            return NULL;
        scratch_len = n;
    }
    return scratch;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The lease row of `block` in image `im`, or NULL. */
static uint64_t *lease_of(const uint64_t *im, uint64_t block)
{
    uint64_t *table = (uint64_t *)(uintptr_t)im[IM_TABLE];
    if (!table)
        return NULL;
    uint64_t *row = table + 4 * (block & im[IM_MASK]);
    return row[L_TAG] == block + 1 ? row : NULL;
}

/* Does the write-behind queue hold data the request overlaps (or is it in error)?
 * Ranges are published before the writes in them are acknowledged, and cleared
 * after they reach the engine, so a request sees every acknowledged one. */
static int queued(const uint64_t *im, uint64_t off, uint64_t end)
{
    if (__atomic_load_n(&im[IM_PENDING], __ATOMIC_ACQUIRE))
        return 1;
    for (int i = 0; i < QUEUE_SLOTS; i++) {
        uint64_t hi = __atomic_load_n(&im[IM_QUEUED + 2 * i + 1], __ATOMIC_ACQUIRE);
        if (hi && off < hi && __atomic_load_n(&im[IM_QUEUED + 2 * i], __ATOMIC_ACQUIRE) < end)
            return 1;
    }
    return 0;
}

static uint64_t *image_of(uint64_t *st, uint32_t image)
{
    if (image >= st[H_IMAGES])
        return NULL;
    uint64_t *im = st + H_WORDS + (size_t)image * IM_WORDS;
    return im[IM_ACTIVE] ? im : NULL;
}

/* A live COW image: the origin, under the shared lock. */
static long cow_read(uint64_t *st, uint64_t *im, char *buf, size_t size, int64_t off)
{
    pthread_rwlock_t *rw = (pthread_rwlock_t *)(uintptr_t)st[H_LOCK];
    if (pthread_rwlock_rdlock(rw))
        return FALLBACK;
    long result = FALLBACK;
    if (im[IM_ACTIVE] && im[IM_COW_OK] && !queued(im, (uint64_t)off, (uint64_t)off + size)) {
        int err = read_full((int)im[IM_FD], buf, size, (off_t)off);
        result = err ? FALLBACK : (long)size;
        if (!err)
            __atomic_add_fetch(&im[IM_READS], 1, __ATOMIC_RELAXED);
    }
    pthread_rwlock_unlock(rw);
    return result;
}

static long cow_write(uint64_t *st, uint64_t *im, const char *data, size_t size, int64_t off)
{
    pthread_rwlock_t *rw = (pthread_rwlock_t *)(uintptr_t)st[H_LOCK];
    if (pthread_rwlock_rdlock(rw))
        return FALLBACK;
    long result = FALLBACK;
    uint64_t bs = im[IM_BS], first = (uint64_t)off / bs, last = ((uint64_t)off + size - 1) / bs;
    if (!im[IM_ACTIVE] || !im[IM_COW_OK] || queued(im, (uint64_t)off, (uint64_t)off + size))
        goto out;
    for (uint64_t b = first; b <= last; b++) {
        uint64_t *row = lease_of(im, b);
        if (!row || !(row[L_FLAGS] & LEASE_WRITE))
            goto out;
    }
    int err = write_full((int)im[IM_FD], data, size, (off_t)off);
    result = err ? -err : (long)size;
    __atomic_or_fetch(&lease_of(im, first)[L_FLAGS], LEASE_WRITTEN, __ATOMIC_RELAXED);   /* (origin to sync) */
    __atomic_store_n(&im[IM_LAST_WRITE], now_ns(), __ATOMIC_RELAXED);
    __atomic_add_fetch(&im[IM_WRITES], 1, __ATOMIC_RELAXED);
out:
    pthread_rwlock_unlock(rw);
    return result;
}

/* Bytes [off, off + size) of image `image` into buf: size, or FALLBACK. */
static long direct_read(uint64_t *st, uint32_t image, char *buf, size_t size, int64_t off)
{
    uint64_t *im = image_of(st, image);
    if (!im || !size || off < 0 || (uint64_t)off + size > im[IM_SIZE]
        || queued(im, (uint64_t)off, (uint64_t)off + size))
        return FALLBACK;
    if (im[IM_KIND] == KIND_COW)
        return cow_read(st, im, buf, size, off);
    pthread_rwlock_t *rw = (pthread_rwlock_t *)(uintptr_t)st[H_LOCK];
    if (pthread_rwlock_rdlock(rw))
        return FALLBACK;
    long result = (long)size;
    size_t bs = im[IM_BS], unit = st[H_UNIT], entries = st[H_ENTRIES];
    const uint64_t *ptrs = (const uint64_t *)(uintptr_t)st[H_PTR];
    uint64_t *sums = (uint64_t *)(uintptr_t)st[H_CSUM];
    int fd = (int)st[H_FD];
    char *tmp = scratch_for(bs);
    if (!im[IM_ACTIVE] || !tmp || queued(im, (uint64_t)off, (uint64_t)off + size)) {
        result = FALLBACK;
        goto out;
    }
    uint64_t first = (uint64_t)off / bs, last = ((uint64_t)off + size - 1) / bs;
    for (uint64_t b = first; b <= last; b++) {   /* every block leased, or nothing done */
        if (!lease_of(im, b)) {
            result = FALLBACK;
            goto out;
        }
    }
    char *dst = buf;
    for (uint64_t b = first; b <= last; b++) {
        uint64_t *row = lease_of(im, b);
        size_t at = (size_t)((row[L_PAGE] >> 16) * entries + (row[L_PAGE] & 0xffff));
        uint64_t u = ptrs[at];
        size_t lo = b == first ? (size_t)((uint64_t)off - b * bs) : 0;
        size_t hi = b == last ? (size_t)((uint64_t)off + size - b * bs) : bs;
        if (u < 2) {
            memset(dst, 0, hi - lo);
        } else {
            pthread_mutex_t *m = stripe(u);
            pthread_mutex_lock(m);
            int err = read_full(fd, tmp, bs, (off_t)(u * unit));
            int bad = !err && xxh3(tmp, bs) != sums[at];
            if (!err && !bad)
                memcpy(dst, tmp + lo, hi - lo);
            pthread_mutex_unlock(m);
            if (err || bad) {   /* the Python path reports it, naming the block */
                result = FALLBACK;
                goto out;
            }
        }
        dst += hi - lo;
    }
    __atomic_add_fetch(&im[IM_READS], 1, __ATOMIC_RELAXED);
out:
    pthread_rwlock_unlock(rw);
    return result;
}

/* `size` bytes at `off` into a block leased for writing in place: size, -errno, or FALLBACK. */
static long direct_write(uint64_t *st, uint32_t image, const char *data, size_t size, int64_t off)
{
    uint64_t *im = image_of(st, image);
    if (!im || !size || off < 0 || (uint64_t)off + size > im[IM_SIZE]
        || queued(im, (uint64_t)off, (uint64_t)off + size))
        return FALLBACK;
    if (im[IM_KIND] == KIND_COW)
        return cow_write(st, im, data, size, off);
    size_t bs = im[IM_BS];
    uint64_t b = (uint64_t)off / bs;
    size_t lo = (size_t)((uint64_t)off - b * bs), hi = lo + size;
    if (hi > bs)
        return FALLBACK;   /* (more than one block: the Python path) */
    pthread_rwlock_t *rw = (pthread_rwlock_t *)(uintptr_t)st[H_LOCK];
    if (pthread_rwlock_rdlock(rw))
        return FALLBACK;
    long result = FALLBACK;
    uint64_t *row = lease_of(im, b);
    char *tmp = scratch_for(bs);
    if (!im[IM_ACTIVE] || !row || !(row[L_FLAGS] & LEASE_WRITE) || !tmp
        || queued(im, (uint64_t)off, (uint64_t)off + size))
        goto out;
    size_t unit = st[H_UNIT];
    size_t at = (size_t)((row[L_PAGE] >> 16) * st[H_ENTRIES] + (row[L_PAGE] & 0xffff));
    const uint64_t *ptrs = (const uint64_t *)(uintptr_t)st[H_PTR];
    uint64_t *sums = (uint64_t *)(uintptr_t)st[H_CSUM];
    uint64_t u = ptrs[at];
    if (u != row[L_UNIT] || u < 2)
        goto out;
    int fd = (int)st[H_FD];
    off_t pos = (off_t)(u * unit);
    pthread_mutex_t *m = stripe(u);
    pthread_mutex_lock(m);
    const char *whole;
    if (lo == 0 && hi == bs) {
        whole = data;   /* (a whole block needs nothing of the old one) */
    } else {
        if (read_full(fd, tmp, bs, pos) || xxh3(tmp, bs) != sums[at]) {
            pthread_mutex_unlock(m);
            goto out;   /* unreadable or failing its checksum: the Python path says so */
        }
        memcpy(tmp + lo, data, size);
        whole = tmp;
    }
    if (all_zero(data, size) && all_zero(whole, bs)) {   /* all zeros: a hole, which the Python path makes */
        pthread_mutex_unlock(m);
        goto out;
    }
    int werr = write_full(fd, data, size, pos + (off_t)lo);
    if (werr) {
        /* part of it may be there: the checksum becomes that of what the store holds
           (as a disk leaves a failed write), so the block does not read as corrupt */
        if (!read_full(fd, tmp, bs, pos))
            sums[at] = xxh3(tmp, bs);
        result = -werr;
    } else {
        sums[at] = xxh3(whole, bs);
        result = (long)size;
    }
    __atomic_or_fetch(&row[L_FLAGS], LEASE_WRITTEN, __ATOMIC_RELAXED);
    pthread_mutex_unlock(m);
    __atomic_store_n(&im[IM_LAST_WRITE], now_ns(), __ATOMIC_RELAXED);
    __atomic_add_fetch(&im[IM_WRITES], 1, __ATOMIC_RELAXED);
out:
    pthread_rwlock_unlock(rw);
    return result;
}

/* ---- for Python and for the FUSE entry points ------------------------------------- */
static PyObject *py_read(PyObject *self, PyObject *args)
{
    unsigned long long st;
    unsigned int image;
    long long off;
    Py_buffer out;
    if (!PyArg_ParseTuple(args, "KIw*L", &st, &image, &out, &off))
        return NULL;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = direct_read((uint64_t *)(uintptr_t)st, image, out.buf, (size_t)out.len, off);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    return PyLong_FromLong(r);
}

static PyObject *py_write(PyObject *self, PyObject *args)
{
    unsigned long long st;
    unsigned int image;
    long long off;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "KIy*L", &st, &image, &data, &off))
        return NULL;
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = direct_write((uint64_t *)(uintptr_t)st, image, data.buf, (size_t)data.len, off);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return PyLong_FromLong(r);
}

static PyObject *py_entry_points(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(KK)", (unsigned long long)(uintptr_t)direct_read,
                         (unsigned long long)(uintptr_t)direct_write);
}

static PyMethodDef methods[] = {
    {"read", py_read, METH_VARARGS,
     "read(state, image, out, offset) -> bytes read, or FALLBACK (for tests: FUSE calls the C function)"},
    {"write", py_write, METH_VARARGS, "write(state, image, data, offset) -> bytes written, -errno, or FALLBACK"},
    {"entry_points", py_entry_points, METH_NOARGS, "(read, write): addresses of the C functions"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_direct",
    "The pool lock, and reads and in-place writes of leased blocks without the GIL.", -1, methods,
};

PyMODINIT_FUNC PyInit__direct(void)
{
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2"))
        xxh3 = blockread_xxh3_avx2;
#endif
    for (int i = 0; i < STRIPES; i++)
        pthread_mutex_init(&stripes[i], NULL);
    if (PyType_Ready(&PoolLockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PoolLockType);
    if (PyModule_AddObject(m, "PoolLock", (PyObject *)&PoolLockType) < 0
        || PyModule_AddIntConstant(m, "FALLBACK", FALLBACK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
#define WORD(name) PyModule_AddIntConstant(m, #name, name)
    if (WORD(H_WORDS) || WORD(H_LOCK) || WORD(H_PTR) || WORD(H_CSUM) || WORD(H_ENTRIES) || WORD(H_UNIT)
        || WORD(H_FD) || WORD(H_IMAGES) || WORD(IM_WORDS) || WORD(IM_ACTIVE) || WORD(IM_SIZE) || WORD(IM_BS)
        || WORD(IM_PENDING) || WORD(IM_TABLE) || WORD(IM_MASK) || WORD(IM_LAST_WRITE) || WORD(IM_READS)
        || WORD(IM_WRITES) || WORD(IM_KIND) || WORD(IM_FD) || WORD(IM_COW_OK) || WORD(KIND_COW) || WORD(IM_QUEUED) || WORD(QUEUE_SLOTS) || WORD(L_TAG) || WORD(L_PAGE) || WORD(L_UNIT) || WORD(L_FLAGS)
        || WORD(LEASE_READ) || WORD(LEASE_WRITE) || WORD(LEASE_WRITTEN)) {
        Py_DECREF(m);
        return NULL;
    }
#undef WORD
    return m;
}
