/* collector.http.batchread: the events of a POST /events/batch body, ids put in, keys read.
 *
 * The supervisor is the daemon's serial stage, and per event it read each item's head
 * with a second msgspec parse of the body, checked the nesting depth with a third pass,
 * checked every item starts `{"` and spliced a generated id into each one in Python
 * (about a third of its time under batched load). This does those in one C pass over
 * the items msgspec already split out of the (validated) envelope: for each it walks the
 * top-level members, skipping values, and builds `{"<id>":"<generated>",` + the rest.
 *
 * It answers None, and the caller takes the Python path, for every case but the common
 * one: an item that is not an object starting `{"`, a member name holding an escape, an
 * item that sent its own id, or (when the key is not the id) a key whose value is not a
 * string without escapes, a canonical integer or null.
 *
 * `sent_ids` reads the other common batch, where every event sent its own id (a client
 * that retries with the same ids): the same walk reads each id (a string without
 * escapes, an integer or null) and key, and the items stay as they are.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>

#include "crc32.h"
#include "jsonscan.h"

/* The key member's value at p as the decoder gives it (a str, an int, None), NULL and no
   error set when it is of another kind, NULL with an error set on failure. *after: the
   byte after it. */
static PyObject *key_value(const unsigned char *p, const unsigned char *end, const unsigned char **after) {
    if (*p == '"') {
        int esc = 0;
        const unsigned char *q = skip_string(p, end, &esc);
        if (q == NULL || esc) return NULL;
        *after = q;
        return PyUnicode_DecodeUTF8((const char *)p + 1, q - 1 - (p + 1), "strict");
    }
    if (*p == '-' || (*p >= '0' && *p <= '9')) {
        const unsigned char *ds = *p == '-' ? p + 1 : p, *d = ds;
        while (d < end && *d >= '0' && *d <= '9') d++;
        if (d == ds) return NULL; /* a lone '-': not JSON (msgspec let nothing such through) */
        if (d < end && (*d == '.' || *d == 'e' || *d == 'E')) return NULL; /* a float */
        char digits[24];
        size_t n = (size_t)(d - p);
        if (n == 0 || n >= sizeof digits) return NULL; /* beyond 64 bits: Python's path */
        memcpy(digits, p, n);
        digits[n] = '\0';
        *after = d;
        return PyLong_FromString(digits, NULL, 10);
    }
    if (end - p >= 4 && memcmp(p, "null", 4) == 0) {
        *after = p + 4;
        return Py_NewRef(Py_None);
    }
    return NULL;
}

/* The member names the readers look for: the id's, and the shard key's (NULL when the
   key is the id), from their quoted JSON text. */
typedef struct {
    const unsigned char *id, *key;
    size_t idlen, keylen;
    Py_buffer *qid; /* the caller's quoted_id buffer, released with the names */
    Py_buffer qk;   /* quoted_key's buffer, held while the names are in use */
} Names;

static void names_release(Names *nm) {
    if (nm->key != NULL) PyBuffer_Release(&nm->qk);
    PyBuffer_Release(nm->qid);
}

/* Takes over qid (the caller's "y*" argument): 0, names set (release with
   names_release); -1, an error is set and qid released. */
static int names_open(Names *nm, const char *fn, Py_buffer *qid, PyObject *qkey) {
    memset(nm, 0, sizeof *nm);
    nm->qid = qid;
    if (qid->len < 3) {
        PyErr_Format(PyExc_ValueError, "%s: quoted_id is a quoted name", fn);
        goto fail;
    }
    nm->id = (const unsigned char *)qid->buf + 1;
    nm->idlen = (size_t)qid->len - 2;
    if (qkey == Py_None) return 0;
    if (PyObject_GetBuffer(qkey, &nm->qk, PyBUF_SIMPLE) < 0) goto fail;
    if (nm->qk.len < 3) {
        PyBuffer_Release(&nm->qk);
        PyErr_Format(PyExc_ValueError, "%s: quoted_key is a quoted name or None", fn);
        goto fail;
    }
    nm->key = (const unsigned char *)nm->qk.buf + 1;
    nm->keylen = (size_t)nm->qk.len - 2;
    return 0;
fail:
    names_release(nm);
    return -1;
}

/* Reads one item [p, end) for the names nm. 0: read (*keyval set when nm has a key: the key's
   value, None when absent; *idval, when idval is not NULL: the id's value, which must be
   present); 1: not the common case (with idval NULL, an item that sent its id is not);
   -1: an error is set. */
static int read_item(const unsigned char *p, const unsigned char *end, const Names *nm, PyObject **keyval,
                     PyObject **idval, size_t *deepest) {
    const unsigned char *id = nm->id, *key = nm->key;
    size_t idlen = nm->idlen, keylen = nm->keylen;
    if (end - p < 2 || p[0] != '{' || p[1] != '"') return 1;
    if (*deepest < 1) *deepest = 1;
    p++;
    for (;;) {
        p = skip_ws(p, end);
        if (p >= end || *p != '"') return 1;
        int esc = 0;
        const unsigned char *q = skip_string(p, end, &esc);
        if (q == NULL || esc) return 1;
        const unsigned char *ns = p + 1;
        size_t len = (size_t)(q - 1 - ns);
        p = skip_ws(q, end);
        if (p >= end || *p != ':') return 1;
        p = skip_ws(p + 1, end);
        if (p >= end) return 1;
        if (len == idlen && memcmp(ns, id, idlen) == 0) {
            if (idval == NULL) return 1; /* the event sent its id: with_ids makes them */
            const unsigned char *after = NULL;
            PyObject *v = key_value(p, end, &after);
            if (v == NULL) return PyErr_Occurred() ? -1 : 1;
            Py_XSETREF(*idval, v); /* a later member of the same name wins, as in the decoder */
            p = after;
        } else if (key != NULL && len == keylen && memcmp(ns, key, keylen) == 0) {
            const unsigned char *after = NULL;
            PyObject *v = key_value(p, end, &after);
            if (v == NULL) return PyErr_Occurred() ? -1 : 1;
            Py_XSETREF(*keyval, v); /* a later member of the same name wins, as in the decoder */
            p = after;
        } else {
            size_t d = 0;
            p = skip_value(p, end, &d);
            if (p == NULL) return 1;
            if (d + 1 > *deepest) *deepest = d + 1;
        }
        p = skip_ws(p, end);
        if (p >= end) return 1;
        if (*p == ',') {
            p++;
            continue;
        }
        if (*p != '}' || skip_ws(p + 1, end) != end) return 1;
        if (idval != NULL && *idval == NULL) return 1; /* no id: the caller makes one */
        if (key != NULL && *keyval == NULL) *keyval = Py_NewRef(Py_None); /* absent: None */
        return 0;
    }
}

PyDoc_STRVAR(with_ids_doc,
"with_ids(raws, quoted_id, prefix, first, quoted_key, owner=0, workers=1, span=len(raws))\n"
"    -> (items, ids, keys, depth) | None\n\n"
"``raws``: a batch's events as msgspec decoded them (``msgspec.Raw`` or bytes);\n"
"``quoted_id``: the id member's JSON name in quotes (b'\"id\"'); ``prefix`` and ``first``:\n"
"a block of ``span`` ids from ``collector.ids.id_block`` (id j of the block is ``prefix`` +\n"
"the 12 hex digits of ``(first + j) & 0xFFFFFFFFFFFF``); ``quoted_key``: the shard key's\n"
"quoted name, or None when the key is the id. ``workers`` > 1: only the block's ids whose\n"
"``zlib.crc32(id) % workers == owner`` are used (the id is the shard key, so the events go\n"
"to worker ``owner``), else ids are used in order. ``items``: each event as bytes with its\n"
"id as first member; ``ids``: the ids (str); ``keys``: each event's key value (str, int or\n"
"None; the list ``ids`` itself when ``quoted_key`` is None); ``depth``: the deepest\n"
"item's nesting (an object is 1). None when some event is not the common case (see the module's header) or the\n"
"block ran out, and the caller reads the batch the Python way.");

#define ID_MASK 0xFFFFFFFFFFFFULL

static PyObject *with_ids(PyObject *self, PyObject *args) {
    PyObject *raws, *qkey;
    Py_buffer qid;
    const char *prefix;
    Py_ssize_t plen;
    unsigned long long first, span = 0;
    Py_ssize_t owner = 0, workers = 1;
    if (!PyArg_ParseTuple(args, "O!y*s#KO|nnK", &PyList_Type, &raws, &qid, &prefix, &plen, &first, &qkey, &owner,
                          &workers, &span))
        return NULL;
    PyObject *result = NULL, *items = NULL, *ids = NULL, *keys = NULL;
    Names nm;
    if (names_open(&nm, "with_ids", &qid, qkey) < 0) return NULL;
    int have_key = nm.key != NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws);
    Py_ssize_t elen = plen + 12;
    if (plen > 64) {
        PyErr_SetString(PyExc_ValueError, "with_ids: an id prefix of at most 64 bytes is needed");
        goto done;
    }
    if (workers < 1 || owner < 0 || owner >= workers) {
        PyErr_SetString(PyExc_ValueError, "with_ids: owner must be in range(workers)");
        goto done;
    }
    if (span == 0) span = (unsigned long long)n;
    /* the prefix is common to every id: hashed once, each id's 12 digits continue from it */
    uint32_t crc_prefix = crc_update(CRC_START, (const unsigned char *)prefix, (size_t)plen);
    unsigned long long used = 0; /* counter values of the block taken or skipped */
    if ((items = PyList_New(n)) == NULL || (ids = PyList_New(n)) == NULL) goto done;
    if (have_key && (keys = PyList_New(n)) == NULL) goto done;
    size_t deepest = 0;
    static const char hex[] = "0123456789abcdef";
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PyList_GET_ITEM(raws, i), &b, PyBUF_SIMPLE) < 0) goto done;
        const unsigned char *p = b.buf;
        PyObject *kv = NULL;
        int r = read_item(p, p + b.len, &nm, &kv, NULL, &deepest);
        if (r != 0) {
            Py_XDECREF(kv); /* a key read before the member that made it decline */
            PyBuffer_Release(&b);
            if (r > 0) result = Py_NewRef(Py_None);
            goto done;
        }
        /* the id: prefix + 12 hex digits of the counter, as collector.ids.new_ids; with
           workers > 1, the block's next value whose id hashes to owner */
        char e[64 + 12];
        memcpy(e, prefix, (size_t)plen);
        for (;;) {
            if (used == span) { /* the block ran out: the Python path makes the ids */
                Py_XDECREF(kv);
                PyBuffer_Release(&b);
                result = Py_NewRef(Py_None);
                goto done;
            }
            unsigned long long c = (first + used++) & ID_MASK;
            for (int d = 11; d >= 0; d--, c >>= 4) e[plen + d] = hex[c & 15];
            if (workers == 1 ||
                (Py_ssize_t)(crc_end(crc_update(crc_prefix, (const unsigned char *)e + plen, 12)) % (uint32_t)workers) ==
                    owner)
                break;
        }
        PyObject *eid = PyUnicode_FromStringAndSize(e, elen);
        /* {"<id>":"<eid>",  then the item after its `{` */
        PyObject *out = eid == NULL ? NULL : PyBytes_FromStringAndSize(NULL, 1 + qid.len + 2 + elen + 2 + (b.len - 1));
        if (out == NULL) {
            Py_XDECREF(eid);
            Py_XDECREF(kv);
            PyBuffer_Release(&b);
            goto done;
        }
        char *o = PyBytes_AS_STRING(out);
        *o++ = '{';
        memcpy(o, qid.buf, (size_t)qid.len);
        o += qid.len;
        *o++ = ':';
        *o++ = '"';
        memcpy(o, e, (size_t)elen);
        o += elen;
        *o++ = '"';
        *o++ = ',';
        memcpy(o, p + 1, (size_t)(b.len - 1));
        PyBuffer_Release(&b);
        PyList_SET_ITEM(items, i, out);
        PyList_SET_ITEM(ids, i, eid);
        if (have_key) PyList_SET_ITEM(keys, i, kv);
    }
    result = Py_BuildValue("(NNNn)", items, ids, have_key ? keys : Py_NewRef(ids), (Py_ssize_t)deepest);
    items = ids = keys = NULL; /* Py_BuildValue's N took them */
done:
    Py_XDECREF(items);
    Py_XDECREF(ids);
    Py_XDECREF(keys);
    names_release(&nm);
    return result;
}

PyDoc_STRVAR(sent_ids_doc,
"sent_ids(raws, quoted_id, quoted_key, workers=1) -> (ids, keys, depth, owners) | None\n\n"
"The other common batch: every event sent its own id (a client that retries with the\n"
"same ids). ``raws``, ``quoted_id``, ``quoted_key``: as for ``with_ids``. ``ids``: each\n"
"event's id as the decoder gives it (a str without escapes, an int of 64 bits, None for\n"
"null); ``keys``: each event's key value (the list ``ids`` itself when ``quoted_key``\n"
"is None: the key is the id); ``depth``: the deepest item's nesting; ``owners``: with ``workers`` > 1 and\n"
"every key a str, each key's worker by the pipeline's shard function\n"
"(``zlib.crc32(key.encode()) % workers``, as ``ShardMap``), else None. The items are left\n"
"as they are. None when some event is not that case (no id, an id of another kind, see\n"
"``with_ids``), and the caller reads the batch the Python way.");

static PyObject *sent_ids(PyObject *self, PyObject *args) {
    PyObject *raws, *qkey;
    Py_buffer qid;
    Py_ssize_t workers = 1;
    if (!PyArg_ParseTuple(args, "O!y*O|n", &PyList_Type, &raws, &qid, &qkey, &workers)) return NULL;
    PyObject *result = NULL, *ids = NULL, *keys = NULL, *owners = NULL;
    Names nm;
    if (names_open(&nm, "sent_ids", &qid, qkey) < 0) return NULL;
    int have_key = nm.key != NULL;
    Py_ssize_t n = PyList_GET_SIZE(raws);
    if (workers < 1) {
        PyErr_SetString(PyExc_ValueError, "sent_ids: workers must be at least 1");
        goto done;
    }
    if ((ids = PyList_New(n)) == NULL) goto done;
    if (have_key && (keys = PyList_New(n)) == NULL) goto done;
    /* each key's worker, as ShardMap hashes a str: the crc32 of its UTF-8 (dropped at the
       first key of another kind, whose hash goes through its repr) */
    if (workers > 1 && (owners = PyList_New(n)) == NULL) goto done;
    size_t deepest = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_buffer b;
        if (PyObject_GetBuffer(PyList_GET_ITEM(raws, i), &b, PyBUF_SIMPLE) < 0) goto done;
        PyObject *kv = NULL, *iv = NULL;
        int r = read_item(b.buf, (const unsigned char *)b.buf + b.len, &nm, &kv, &iv, &deepest);
        PyBuffer_Release(&b);
        if (r != 0) {
            Py_XDECREF(kv);
            Py_XDECREF(iv);
            if (r > 0) result = Py_NewRef(Py_None);
            goto done;
        }
        PyList_SET_ITEM(ids, i, iv);
        if (have_key) PyList_SET_ITEM(keys, i, kv);
        if (owners != NULL) {
            PyObject *k = have_key ? kv : iv;
            if (!PyUnicode_CheckExact(k)) {
                Py_CLEAR(owners);
                continue;
            }
            Py_ssize_t len;
            const char *u = PyUnicode_AsUTF8AndSize(k, &len);
            if (u == NULL) goto done;
            PyObject *w = PyLong_FromUnsignedLong(crc32_of((const unsigned char *)u, (size_t)len) % (uint32_t)workers);
            if (w == NULL) goto done;
            PyList_SET_ITEM(owners, i, w);
        }
    }
    result = Py_BuildValue("(NNnN)", ids, have_key ? keys : Py_NewRef(ids), (Py_ssize_t)deepest,
                           owners != NULL ? owners : Py_NewRef(Py_None));
    ids = keys = owners = NULL; /* Py_BuildValue's N took them */
done:
    Py_XDECREF(ids);
    Py_XDECREF(keys);
    Py_XDECREF(owners);
    names_release(&nm);
    return result;
}

PyDoc_STRVAR(accepted_doc,
"accepted(ids, layout) -> bytes | None\n\n"
"The body of a POST /events/batch answer whose every item was accepted: the supervisor\n"
"built and encoded 100 result Structs per request (~16 us) to write it. ``layout``: six\n"
"bytes cut from what msgspec encodes for those Structs (see collector.http.routes.ingest:\n"
"the envelope before the count, between it and the results, after them; an item before\n"
"its index, between it and its id, after the id), so the format has one home. ``ids``:\n"
"str each, printable ASCII without a quote or backslash (the ids the server makes); None\n"
"for any other, and the caller encodes the Structs.");

/* the decimal digits of n >= 0 */
static size_t digits(Py_ssize_t n) {
    size_t k = 1;
    while (n >= 10) n /= 10, k++;
    return k;
}

/* n in decimal at o; the end */
static char *put_int(char *o, Py_ssize_t n) {
    char d[24];
    int k = 0;
    do d[k++] = (char)('0' + n % 10); while ((n /= 10) > 0);
    while (k) *o++ = d[--k];
    return o;
}

static char *put(char *o, PyObject *b) {
    memcpy(o, PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b));
    return o + PyBytes_GET_SIZE(b);
}

static PyObject *accepted(PyObject *self, PyObject *args) {
    PyObject *ids, *layout;
    if (!PyArg_ParseTuple(args, "O!O!:accepted", &PyList_Type, &ids, &PyTuple_Type, &layout)) return NULL;
    PyObject *p[6];
    if (PyTuple_GET_SIZE(layout) != 6) goto bad_layout;
    for (int k = 0; k < 6; k++)
        if (!PyBytes_Check(p[k] = PyTuple_GET_ITEM(layout, k))) goto bad_layout;
    Py_ssize_t n = PyList_GET_SIZE(ids);
    size_t per_item = (size_t)(PyBytes_GET_SIZE(p[3]) + PyBytes_GET_SIZE(p[4]) + PyBytes_GET_SIZE(p[5]));
    /* the exact size: no resize (a realloc of ~8 KB) at the end */
    size_t size = (size_t)(PyBytes_GET_SIZE(p[0]) + PyBytes_GET_SIZE(p[1]) + PyBytes_GET_SIZE(p[2])) + digits(n) +
                  (n > 0 ? (size_t)n - 1 : 0);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyList_GET_ITEM(ids, i);
        if (!PyUnicode_Check(s) || !PyUnicode_IS_ASCII(s)) Py_RETURN_NONE;
        const unsigned char *c = PyUnicode_1BYTE_DATA(s);
        Py_ssize_t len = PyUnicode_GET_LENGTH(s);
        for (Py_ssize_t k = 0; k < len; k++)
            if (c[k] < 0x20 || c[k] == '"' || c[k] == '\\' || c[k] == 0x7f) Py_RETURN_NONE;
        size += per_item + digits(i) + (size_t)len;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL) return NULL;
    char *o = put(PyBytes_AS_STRING(out), p[0]);
    o = put(put_int(o, n), p[1]);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyList_GET_ITEM(ids, i);
        if (i) *o++ = ',';
        o = put(put_int(put(o, p[3]), i), p[4]);
        Py_ssize_t len = PyUnicode_GET_LENGTH(s);
        memcpy(o, PyUnicode_1BYTE_DATA(s), (size_t)len);
        o = put(o + len, p[5]);
    }
    o = put(o, p[2]);
    assert(o == PyBytes_AS_STRING(out) + size);
    return out;
bad_layout:
    PyErr_SetString(PyExc_TypeError, "accepted: layout must be a tuple of 6 bytes");
    return NULL;
}

static PyMethodDef methods[] = {
    {"with_ids", with_ids, METH_VARARGS, with_ids_doc},
    {"sent_ids", sent_ids, METH_VARARGS, sent_ids_doc},
    {"accepted", accepted, METH_VARARGS, accepted_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "collector.http.batchread",
    "The events of a POST /events/batch body with generated ids put in, in one C pass.",
    -1, methods,
};

PyMODINIT_FUNC PyInit_batchread(void) {
    crc_init();
    return PyModule_Create(&module);
}
