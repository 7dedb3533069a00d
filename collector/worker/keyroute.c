/* collector.worker.keyroute: split an NDJSON range by the owner of each line's key.
 *
 * A worker dealt a byte range in shard="key" mode keeps the events whose key it owns and
 * sends the others to their owners. Learning a key from Python costs about a decode per
 * event (a key-only msgspec Struct still scans what it skips), so that router decoded
 * every event and JSON-encoded the foreign half again. This reads only the bytes up to
 * each line's key member, hashes the key as collector.pipeline.ShardMap does
 * (crc32 of the text of a str, of the repr of an int or None, modulo the worker count),
 * and copies each line, untouched, into its owner's buffer: each event is then decoded
 * once, by its owner.
 *
 * It answers None instead of guessing whenever a line's owner could differ from the one
 * ShardMap gives the decoded event: a line that is not an object, a key member whose name
 * or value holds an escape, a value of a kind the field's type does not take (a float, a
 * bool, an object), a missing key, or the key's quoted name appearing again later in the
 * line (a duplicate member: the decoder keeps the last). The caller then routes that
 * range the Python way. Lines are not validated here: the owner's decode reports them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#include "crc32.h"
#include "jsonscan.h"

#define KIND_STR 1     /* the key field takes a str */
#define KIND_INT 2     /* ... an int */
#define KIND_NONE 4    /* ... None (JSON null hashes as repr(None)) */
#define KIND_MISSING 8 /* a missing key decodes to None (the field's default) */

/* bytes.strip()'s whitespace: a line of only these is blank (protocol.ndjson_lines) */
static inline int py_ws(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

/* The first occurrence of needle (m >= 3 bytes) in [s, s + n), or NULL. With SSE2, 16
   candidate positions at a time are tested on needle's second and last bytes, and only
   those matching both are compared whole (glibc's memmem took ~50 ns per line here). */
static const unsigned char *find(const unsigned char *s, size_t n, const unsigned char *needle, size_t m) {
    if (n < m) return NULL;
#ifdef __SSE2__
    if (n >= m + 15) {
        const __m128i second = _mm_set1_epi8((char)needle[1]);
        const __m128i last = _mm_set1_epi8((char)needle[m - 1]);
        size_t stop = n - m - 15; /* the last block starts here (it may overlap the one before) */
        for (size_t i = 0;; i += 16) {
            if (i > stop) i = stop;
            __m128i a = _mm_loadu_si128((const __m128i *)(s + i + 1));
            __m128i b = _mm_loadu_si128((const __m128i *)(s + i + m - 1));
            unsigned mask = (unsigned)_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(a, second), _mm_cmpeq_epi8(b, last)));
            while (mask) {
                unsigned k = (unsigned)__builtin_ctz(mask);
                if (memcmp(s + i + k, needle, m) == 0) return s + i + k;
                mask &= mask - 1;
            }
            if (i == stop) return NULL;
        }
    }
#endif
    for (size_t i = 0; i + m <= n; i++)
        if (s[i] == needle[0] && memcmp(s + i, needle, m) == 0) return s + i;
    return NULL;
}

/* The owner of a line without the key member: repr(None)'s, when None is the field's
   default; else -1 (only a decode says what the line is) */
static int missing(int kinds, uint32_t n) {
    return (kinds & KIND_MISSING) ? (int)(crc32_of((const unsigned char *)"None", 4) % n) : -1;
}

/* The owner of the line [p, end) (not blank), or -1 when it cannot be told here. */
static int line_owner(const unsigned char *p, const unsigned char *end, const unsigned char *name,
                      size_t nlen, int kinds, uint32_t n) {
    p = skip_ws(p, end);
    if (p >= end || *p != '{') return -1;
    p++;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end) return -1;
        if (*p == '}') return missing(kinds, n); /* no key member */
        if (*p != '"') return -1;
        int esc = 0;
        const unsigned char *q = skip_string(p, end, &esc);
        if (q == NULL || esc) return -1; /* an escaped name may spell the key once decoded */
        const unsigned char *ns = p + 1;
        size_t len = (size_t)(q - 1 - ns);
        p = skip_ws(q, end);
        if (p >= end || *p != ':') return -1;
        p = skip_ws(p + 1, end);
        if (p >= end) return -1;
        if (len == nlen && memcmp(ns, name, nlen) == 0) {
            const unsigned char *ks, *after;
            size_t klen;
            if (*p == '"') {
                if (!(kinds & KIND_STR)) return -1;
                after = skip_string(p, end, &esc);
                if (after == NULL || esc) return -1; /* escaped: the decoded text differs */
                ks = p + 1;
                klen = (size_t)(after - 1 - ks);
            } else if (*p == '-' || (*p >= '0' && *p <= '9')) {
                if (!(kinds & KIND_INT)) return -1;
                ks = p;
                const unsigned char *d = *p == '-' ? p + 1 : p;
                const unsigned char *ds = d;
                while (d < end && *d >= '0' && *d <= '9') d++;
                size_t nd = (size_t)(d - ds);
                /* repr(int) is the literal only for canonical integers: no "-0", "01", "1.0", "1e3" */
                if (nd == 0 || (nd > 1 && *ds == '0') || (nd == 1 && *ds == '0' && ds != p)) return -1;
                if (d < end && (*d == '.' || *d == 'e' || *d == 'E')) return -1;
                after = d;
                klen = (size_t)(d - ks);
            } else if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
                if (!(kinds & KIND_NONE)) return -1;
                ks = (const unsigned char *)"None";
                klen = 4;
                after = p + 4;
            } else {
                return -1;
            }
            /* a second member of that name would win in the decoder: leave it to Python */
            if (find(after, (size_t)(end - after), name - 1, nlen + 2) != NULL) return -1;
            return (int)(crc32_of(ks, klen) % n);
        }
        size_t deepest = 0;
        p = skip_value(p, end, &deepest);
        if (p == NULL) return -1;
        p = skip_ws(p, end);
        if (p >= end) return -1;
        if (*p == ',') {
            p++;
            continue;
        }
        return *p == '}' ? missing(kinds, n) : -1;
    }
}

typedef struct {
    uint32_t start, len;
    int32_t owner;
} Line;

PyDoc_STRVAR(split_doc,
"split(payload, quoted_name, workers, me, kinds) -> (lines, own, own_positions, parts) | None\n\n"
"Route the NDJSON ``payload`` (bytes-like) by each line's key member. ``quoted_name`` is\n"
"the member's JSON name in quotes (b'\"user_id\"'), ``kinds`` the KIND_* bits of the\n"
"field's type. ``lines``: the non-blank line count; ``own``: worker ``me``'s lines as a\n"
"JSON array; ``own_positions``: their line indices (array('I') bytes); ``parts``: for\n"
"each other worker with lines, (worker, NDJSON of its lines, their positions). None when\n"
"some line's owner cannot be told without decoding it.");

static PyObject *split(PyObject *self, PyObject *args) {
    Py_buffer buf, qname;
    unsigned int n, me;
    int kinds;
    if (!PyArg_ParseTuple(args, "y*y*IIi", &buf, &qname, &n, &me, &kinds)) return NULL;
    PyObject *result = NULL;
    Line *lines = NULL;
    size_t *count = NULL, *bytes = NULL;
    PyObject *out_payload = NULL, *out_pos = NULL, *parts = NULL, *own = NULL, *own_pos = NULL;
    if (n == 0 || me >= n || qname.len < 3 || (size_t)buf.len > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "split: bad worker count, worker, name or payload size");
        goto done;
    }
    const unsigned char *base = buf.buf, *end = base + buf.len;
    const unsigned char *name = (const unsigned char *)qname.buf + 1;
    size_t nlen = (size_t)qname.len - 2;
    size_t cap = 1024, nl = 0;
    lines = PyMem_Malloc(cap * sizeof(Line));
    count = PyMem_Calloc(n, sizeof(size_t));
    bytes = PyMem_Calloc(n, sizeof(size_t));
    if (lines == NULL || count == NULL || bytes == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (const unsigned char *p = base; p < end;) {
        const unsigned char *e = memchr(p, '\n', (size_t)(end - p));
        if (e == NULL) e = end;
        const unsigned char *t = p;
        while (t < e && py_ws(*t)) t++;
        if (t < e) {
            int w = line_owner(p, e, name, nlen, kinds, n);
            if (w < 0) { /* the caller routes this range the Python way */
                result = Py_NewRef(Py_None);
                goto done;
            }
            if (nl == cap) {
                Line *more = PyMem_Realloc(lines, 2 * cap * sizeof(Line));
                if (more == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                lines = more;
                cap *= 2;
            }
            lines[nl].start = (uint32_t)(p - base);
            lines[nl].len = (uint32_t)(e - p);
            lines[nl].owner = w;
            nl++;
            count[w]++;
            bytes[w] += (size_t)(e - p);
        }
        p = e + 1;
    }
    parts = PyList_New(0);
    if (parts == NULL) goto done;
    for (unsigned int w = 0; w < n; w++) {
        if (w != me && count[w] == 0) continue;
        /* mine: a JSON array, parsed at once; theirs: NDJSON, which the owner can parse
           line by line if a line is invalid */
        size_t size = w == me ? bytes[w] + (count[w] ? count[w] - 1 : 0) + 2 : bytes[w] + count[w] - 1;
        out_payload = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
        out_pos = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(count[w] * sizeof(uint32_t)));
        if (out_payload == NULL || out_pos == NULL) goto done;
        char *o = PyBytes_AS_STRING(out_payload);
        uint32_t *pos = (uint32_t *)PyBytes_AS_STRING(out_pos);
        char sep = w == me ? ',' : '\n';
        if (w == me) *o++ = '[';
        size_t k = 0;
        for (size_t i = 0; i < nl; i++) {
            if (lines[i].owner != (int32_t)w) continue;
            if (k) *o++ = sep;
            memcpy(o, base + lines[i].start, lines[i].len);
            o += lines[i].len;
            pos[k++] = (uint32_t)i;
        }
        if (w == me) {
            *o++ = ']';
            own = out_payload;
            own_pos = out_pos;
        } else {
            PyObject *part = Py_BuildValue("(INN)", w, out_payload, out_pos);
            if (part == NULL) {
                out_payload = out_pos = NULL; /* Py_BuildValue's N took them, even on failure */
                goto done;
            }
            if (PyList_Append(parts, part) < 0) {
                Py_DECREF(part);
                out_payload = out_pos = NULL;
                goto done;
            }
            Py_DECREF(part);
        }
        out_payload = out_pos = NULL;
    }
    result = Py_BuildValue("(nNNN)", (Py_ssize_t)nl, own, own_pos, parts);
    parts = own = own_pos = NULL; /* Py_BuildValue's N took them */
done:
    Py_XDECREF(own);
    Py_XDECREF(own_pos);
    Py_XDECREF(out_payload);
    Py_XDECREF(out_pos);
    Py_XDECREF(parts);
    PyMem_Free(lines);
    PyMem_Free(count);
    PyMem_Free(bytes);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&qname);
    return result;
}

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS, split_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector.worker.keyroute",
    "Split NDJSON ranges by the owner of each line's key (shard=\"key\"), without decoding.",
    -1, methods,
};

PyMODINIT_FUNC PyInit_keyroute(void) {
    crc_init();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "KIND_STR", KIND_STR) < 0 || PyModule_AddIntConstant(m, "KIND_INT", KIND_INT) < 0 ||
        PyModule_AddIntConstant(m, "KIND_NONE", KIND_NONE) < 0 ||
        PyModule_AddIntConstant(m, "KIND_MISSING", KIND_MISSING) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
