/* collector.stages.idwindow: the dedup window's remembered ids, outside Python objects.
 *
 * A worker of the generic pack remembers up to a million event ids. In a dict of str,
 * every id is an 85-byte object besides its entry, and each chunk at the cap pays a
 * lookup, an insert, and a forget (a dict deletion and a str freed) per id, each a cache
 * miss or more: at the cap the window was a quarter of a worker's time under HTTP load.
 * Here an id is a 128-bit fingerprint and an expiry in an open-addressed table (linear
 * probing, backward-shift deletion: no tombstones), and the ids are forgotten in the
 * order they were remembered from a ring of the same records.
 *
 * Fingerprints: a str is its SipHash (Python's own hash, keyed per process) and a second,
 * unkeyed 64-bit hash of its UTF-8 bytes; an int that fits 64 bits is itself (exact); any
 * other id is its type's name and repr, hashed as a str (bools, ints and integral floats
 * are ints first, and str subclasses str, so that equal ids are one id, as in a dict).
 * Two different ids share a fingerprint with a probability of about 2**-128 per pair.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t a, b; /* a == 0: an empty slot (a is never 0 for an id) */
    double exp;
} Rec;

typedef struct {
    PyObject_HEAD
    Rec *slots;
    size_t mask, used;
    Rec *ring; /* remembered ids, oldest first, at ring[(head + i) & rmask] */
    size_t rmask, head, rlen;
} IdWindow;

static inline uint64_t mix64(uint64_t x) { /* splitmix64's finalizer */
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

static uint64_t bytes_hash(const unsigned char *p, Py_ssize_t n, uint64_t seed) {
    uint64_t h = seed ^ ((uint64_t)n * 0x9e3779b97f4a7c15ULL);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = mix64(h ^ w) + 0x9e3779b97f4a7c15ULL;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, (size_t)n);
    return mix64(h ^ w ^ ((uint64_t)n << 56));
}

/* 0: *a, *b set; -1: an error is set */
static int fingerprint(PyObject *k, uint64_t *a, uint64_t *b) {
    if (PyUnicode_Check(k)) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(k, &n);
        if (s == NULL) return -1;
        Py_hash_t h = PyUnicode_Type.tp_hash(k); /* str's own: a subclass equal to its text is that id */
        if (h == -1 && PyErr_Occurred()) return -1;
        *a = (uint64_t)h | 1;
        *b = bytes_hash((const unsigned char *)s, n, 0x5354524eULL); /* "STRN" */
        return 0;
    }
    if (PyFloat_CheckExact(k)) { /* 3.0 is the id 3, as in a dict; 3.5 is its repr */
        double d = PyFloat_AS_DOUBLE(k);
        if (isfinite(d) && d == floor(d)) {
            PyObject *i = PyLong_FromDouble(d);
            if (i == NULL) return -1;
            int rc = fingerprint(i, a, b);
            Py_DECREF(i);
            return rc;
        }
    }
    if (PyLong_Check(k)) { /* bool and IntEnum too: True is the id 1, as in a dict */
        int overflow = 0;
        long long v = PyLong_AsLongLongAndOverflow(k, &overflow);
        if (v == -1 && PyErr_Occurred()) return -1;
        if (!overflow) {
            *b = (uint64_t)v;
            *a = mix64((uint64_t)v ^ 0x494e5447ULL) | 1; /* "INTG": a function of b */
            return 0;
        }
    }
    /* any other id: "<type name>:<repr>" as a str (a larger int as "int:<digits>") */
    PyObject *r = PyLong_Check(k) ? PyUnicode_FromFormat("int:%S", k) : PyUnicode_FromFormat("%s:%R", Py_TYPE(k)->tp_name, k);
    if (r == NULL) return -1;
    int rc = fingerprint(r, a, b);
    Py_DECREF(r);
    return rc;
}

/* the slot holding (a, b), or the empty slot where it would go */
static inline size_t probe(const IdWindow *w, uint64_t a, uint64_t b) {
    size_t i = (size_t)a & w->mask;
    while (w->slots[i].a != 0 && (w->slots[i].a != a || w->slots[i].b != b)) i = (i + 1) & w->mask;
    return i;
}

static int grow_table(IdWindow *w) {
    size_t n = (w->mask + 1) * 2;
    Rec *old = w->slots, *s = PyMem_Calloc(n, sizeof(Rec));
    if (s == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    size_t oldn = w->mask + 1;
    w->slots = s;
    w->mask = n - 1;
    for (size_t i = 0; i < oldn; i++)
        if (old[i].a != 0) w->slots[probe(w, old[i].a, old[i].b)] = old[i];
    PyMem_Free(old);
    return 0;
}

static int ring_push(IdWindow *w, uint64_t a, uint64_t b, double exp) {
    if (w->rlen == w->rmask + 1) {
        size_t n = (w->rmask + 1) * 2;
        Rec *r = PyMem_Malloc(n * sizeof(Rec));
        if (r == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t i = 0; i < w->rlen; i++) r[i] = w->ring[(w->head + i) & w->rmask];
        PyMem_Free(w->ring);
        w->ring = r;
        w->rmask = n - 1;
        w->head = 0;
    }
    Rec *e = &w->ring[(w->head + w->rlen++) & w->rmask];
    e->a = a;
    e->b = b;
    e->exp = exp;
    return 0;
}

static void delete_at(IdWindow *w, size_t i) {
    size_t j = i, mask = w->mask;
    for (;;) {
        j = (j + 1) & mask;
        if (w->slots[j].a == 0) break;
        size_t k = (size_t)w->slots[j].a & mask; /* slot j's home */
        /* slot j stays when its home lies cyclically in (i, j] */
        if (i <= j ? (i < k && k <= j) : (i < k || k <= j)) continue;
        w->slots[i] = w->slots[j];
        i = j;
    }
    w->slots[i].a = w->slots[i].b = 0;
    w->used--;
}

/* forget the ring's oldest record: its id goes unless it was remembered again since */
static void pop_oldest(IdWindow *w) {
    Rec e = w->ring[w->head];
    w->head = (w->head + 1) & w->rmask;
    w->rlen--;
    size_t i = probe(w, e.a, e.b);
    if (w->slots[i].a != 0 && w->slots[i].exp == e.exp) delete_at(w, i);
}

static size_t pow2_at_least(size_t n) {
    size_t p = 1024;
    while (p < n) p <<= 1;
    return p;
}

static PyObject *IdWindow_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"expected", NULL};
    Py_ssize_t expected = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|n:IdWindow", names, &expected)) return NULL;
    /* sized for the ids expected (the cap) from the start: growing a table of a million
       rehashes 48 MB at once (a 80 ms pause in a chunk). calloc'd pages cost nothing
       until an id lands in them. */
    if (expected < 0 || expected > ((Py_ssize_t)1 << 26)) expected = expected < 0 ? 0 : (Py_ssize_t)1 << 26;
    size_t n = pow2_at_least((size_t)expected * 2), rn = pow2_at_least((size_t)expected + 1);
    IdWindow *w = (IdWindow *)type->tp_alloc(type, 0);
    if (w == NULL) return NULL;
    w->slots = PyMem_Calloc(n, sizeof(Rec));
    w->ring = PyMem_Malloc(rn * sizeof(Rec));
    if (w->slots == NULL || w->ring == NULL) {
        Py_DECREF(w);
        return PyErr_NoMemory();
    }
    w->mask = n - 1;
    w->rmask = rn - 1;
    return (PyObject *)w;
}

static void IdWindow_dealloc(IdWindow *w) {
    PyMem_Free(w->slots);
    PyMem_Free(w->ring);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static Py_ssize_t IdWindow_len(IdWindow *w) { return (Py_ssize_t)w->used; }

static PyObject *IdWindow_get(IdWindow *w, PyObject *k) {
    uint64_t a, b;
    if (fingerprint(k, &a, &b) < 0) return NULL;
    size_t i = probe(w, a, b);
    if (w->slots[i].a == 0) Py_RETURN_NONE;
    return PyFloat_FromDouble(w->slots[i].exp);
}

static PyObject *IdWindow_isdisjoint(IdWindow *w, PyObject *keys) {
    PyObject *seq = PySequence_Fast(keys, "isdisjoint: a sequence of ids");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = Py_True;
    for (Py_ssize_t x = 0; x < n; x++) {
        uint64_t a, b;
        if (fingerprint(items[x], &a, &b) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        if (w->slots[probe(w, a, b)].a != 0) {
            out = Py_False;
            break;
        }
    }
    Py_DECREF(seq);
    return Py_NewRef(out);
}

static PyObject *IdWindow_remember(IdWindow *w, PyObject *args) {
    PyObject *keys;
    double exp;
    if (!PyArg_ParseTuple(args, "Od:remember", &keys, &exp)) return NULL;
    PyObject *seq = PySequence_Fast(keys, "remember: a sequence of ids");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t x = 0; x < n; x++) {
        uint64_t a, b;
        if (fingerprint(items[x], &a, &b) < 0 || ((w->used + 1) * 2 > w->mask + 1 && grow_table(w) < 0) ||
            ring_push(w, a, b, exp) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        size_t i = probe(w, a, b);
        if (w->slots[i].a == 0) { /* new; an id remembered already only takes the new expiry */
            w->slots[i].a = a;
            w->slots[i].b = b;
            w->used++;
        }
        w->slots[i].exp = exp;
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *IdWindow_expire(IdWindow *w, PyObject *arg) {
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) return NULL;
    while (w->rlen && w->ring[w->head].exp <= now) pop_oldest(w);
    Py_RETURN_NONE;
}

static PyObject *IdWindow_trim(IdWindow *w, PyObject *arg) {
    Py_ssize_t cap = PyLong_AsSsize_t(arg);
    if (cap == -1 && PyErr_Occurred()) return NULL;
    if (cap < 0) cap = 0;
    while (w->used > (size_t)cap && w->rlen) pop_oldest(w);
    Py_RETURN_NONE;
}

static PyMethodDef IdWindow_methods[] = {
    {"get", (PyCFunction)IdWindow_get, METH_O, "get(id) -> float | None: the id's expiry, None when not remembered."},
    {"isdisjoint", (PyCFunction)IdWindow_isdisjoint, METH_O,
     "isdisjoint(ids) -> bool: True when no id of the sequence is remembered."},
    {"remember", (PyCFunction)IdWindow_remember, METH_VARARGS,
     "remember(ids, expiry): remember each id until ``expiry`` (an id remembered already takes the new "
     "expiry)."},
    {"expire", (PyCFunction)IdWindow_expire, METH_O,
     "expire(now): forget, oldest first, the ids whose expiry is not after ``now`` (expiries must be remembered "
     "in non-decreasing order)."},
    {"trim", (PyCFunction)IdWindow_trim, METH_O, "trim(cap): forget the oldest ids until at most ``cap`` remain."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods IdWindow_as_sequence = {.sq_length = (lenfunc)IdWindow_len};

static PyTypeObject IdWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "collector.stages.idwindow.IdWindow",
    .tp_basicsize = sizeof(IdWindow),
    .tp_dealloc = (destructor)IdWindow_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "IdWindow(expected=0): remembered ids (128-bit fingerprints) with expiries, forgotten oldest first; "
              "``expected``: the most ids it will hold (the table is sized for them from the start).",
    .tp_methods = IdWindow_methods,
    .tp_as_sequence = &IdWindow_as_sequence,
    .tp_new = IdWindow_new,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector.stages.idwindow",
    "The dedup window's remembered ids as fingerprints in a C table.", -1, NULL,
};

PyMODINIT_FUNC PyInit_idwindow(void) {
    if (PyType_Ready(&IdWindowType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "IdWindow", (PyObject *)&IdWindowType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
