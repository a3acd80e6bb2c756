/* libfuse's read and write callbacks in C, in front of mfusepy's Python ones.
 *
 * mfusepy fills libfuse's operations table with ctypes callbacks; every request then
 * takes the GIL and runs Python before the engine sees it (an empty handler serves
 * ~18,000 4 KiB requests a second on two cores, tools/fuse_floor.py). fuse/fast.py
 * puts these functions in the table's read and write fields instead: a request for an
 * open file the engine serves directly (engine/_direct.c: a leased block) is done
 * here without the interpreter; anything else goes on to the ctypes callback that
 * was there, as before. One set of functions per mount slot (SLOTS), since libfuse
 * gives a callback no context of its own.
 *
 * Per slot: the ctypes callbacks, where `fh` sits in struct fuse_file_info, the
 * engine's direct functions and state, and a table of open files: FH_ROWS rows of
 * [fh, image | writable << 32], filled by fuse/fast.py (tag written last, read first).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <sys/types.h>

#include "../engine/direct_state.h"

#define SLOTS 8
#define FH_ROWS 4096

typedef int (*read_cb)(const char *, char *, size_t, off_t, void *);
typedef int (*write_cb)(const char *, const char *, size_t, off_t, void *);
typedef long (*dread_fn)(uint64_t *, uint32_t, char *, size_t, int64_t);
typedef long (*dwrite_fn)(uint64_t *, uint32_t, const char *, size_t, int64_t);

struct slot {
    read_cb read;
    write_cb write;
    size_t fh_offset;
    dread_fn dread;
    dwrite_fn dwrite;
    uint64_t *state;
    uint64_t *fht;
};

static struct slot slots[SLOTS];

/* The image of this open file (and whether it was opened to write), or -1. */
static int64_t image_of(struct slot *s, void *fi, int *writable)
{
    if (!fi || !s->fht)
        return -1;
    uint64_t fh = *(uint64_t *)((char *)fi + s->fh_offset);
    uint64_t *row = s->fht + 2 * (fh % FH_ROWS);
    if (__atomic_load_n(&row[0], __ATOMIC_ACQUIRE) != fh || !fh)
        return -1;
    uint64_t v = row[1];
    if (__atomic_load_n(&row[0], __ATOMIC_ACQUIRE) != fh)
        return -1;
    *writable = (int)(v >> 32);
    return (int64_t)(v & 0xffffffffu);
}

static int do_read(struct slot *s, const char *path, char *buf, size_t size, off_t off, void *fi)
{
    int w;
    int64_t image = image_of(s, fi, &w);
    if (image >= 0 && size <= INT32_MAX) {
        long r = s->dread(s->state, (uint32_t)image, buf, size, (int64_t)off);
        if (r != FALLBACK)
            return (int)r;
    }
    return s->read(path, buf, size, off, fi);
}

static int do_write(struct slot *s, const char *path, const char *buf, size_t size, off_t off, void *fi)
{
    int w = 0;
    int64_t image = image_of(s, fi, &w);
    if (image >= 0 && w && size <= INT32_MAX) {
        long r = s->dwrite(s->state, (uint32_t)image, buf, size, (int64_t)off);
        if (r != FALLBACK)
            return (int)r;
    }
    return s->write(path, buf, size, off, fi);
}

#define ENTRY(n) \
    static int read_##n(const char *p, char *b, size_t z, off_t o, void *f) { return do_read(&slots[n], p, b, z, o, f); } \
    static int write_##n(const char *p, const char *b, size_t z, off_t o, void *f) { return do_write(&slots[n], p, b, z, o, f); }
ENTRY(0) ENTRY(1) ENTRY(2) ENTRY(3) ENTRY(4) ENTRY(5) ENTRY(6) ENTRY(7)

static read_cb reads[SLOTS] = {read_0, read_1, read_2, read_3, read_4, read_5, read_6, read_7};
static write_cb writes[SLOTS] = {write_0, write_1, write_2, write_3, write_4, write_5, write_6, write_7};

static PyObject *install(PyObject *self, PyObject *args)
{
    int n;
    unsigned long long rd, wr, fh_offset, dr, dw, state, fht;
    if (!PyArg_ParseTuple(args, "iKKKKKKK", &n, &rd, &wr, &fh_offset, &dr, &dw, &state, &fht))
        return NULL;
    if (n < 0 || n >= SLOTS) {
        PyErr_SetString(PyExc_ValueError, "no such slot");
        return NULL;
    }
    struct slot *s = &slots[n];
    s->read = (read_cb)(uintptr_t)rd;
    s->write = (write_cb)(uintptr_t)wr;
    s->fh_offset = (size_t)fh_offset;
    s->dread = (dread_fn)(uintptr_t)dr;
    s->dwrite = (dwrite_fn)(uintptr_t)dw;
    s->state = (uint64_t *)(uintptr_t)state;
    s->fht = (uint64_t *)(uintptr_t)fht;
    return Py_BuildValue("(KK)", (unsigned long long)(uintptr_t)reads[n], (unsigned long long)(uintptr_t)writes[n]);
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(slot, read_cb, write_cb, fh_offset, direct_read, direct_write, state, fh_table)"
     " -> (read, write): the slot's entry points, to put in libfuse's operations table"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastfuse", "libfuse read/write callbacks that serve leased blocks without the GIL.",
    -1, methods,
};

PyMODINIT_FUNC PyInit__fastfuse(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m && (PyModule_AddIntConstant(m, "SLOTS", SLOTS) || PyModule_AddIntConstant(m, "FH_ROWS", FH_ROWS))) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
