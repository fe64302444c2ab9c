/*
 * processors._formscan: the processor's field extraction in C.
 *
 * extract(body, layouts, miss) does what processors.routing._extract_python does, in one
 * pass over the body instead of a regex substitution, a split and a loop in Python; the
 * tests check that both give the same result on every sample and on generated bodies.
 *
 *   body     bytes: a raw webhook body, untrusted;
 *   layouts  dict: key sequence (str) -> layout, the cache shared with the Python path;
 *   miss     callable(key sequence) -> layout, for a key sequence not in ``layouts``.
 *
 * A layout is a tuple of (path, index) pairs, or None. The key sequence is the body with
 * "+" read as a space and each value (from a pair's first "=" to the next "&") removed.
 *
 * Returns the fields (dict: path -> str), or None when the body needs the full decoder
 * (an escape that is broken or not ASCII, a pair with an empty key and a value, or a
 * layout of None), or NotImplemented when
 * the body holds a byte above 0x7F (the Python path handles those: they need UTF-8
 * checks). Nothing here reads outside the body; the only allocations are Python objects
 * and one array of value offsets.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static inline int
hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    return -1;
}

/* The value s[start:end], percent-decoded with "+" as a space. Its escapes were checked:
 * each is "%" followed by [0-7] and a hex digit, so every decoded character is ASCII. */
static PyObject *
decode_value(const unsigned char *s, Py_ssize_t start, Py_ssize_t end)
{
    Py_ssize_t escapes = 0;
    int plus = 0;
    for (Py_ssize_t i = start; i < end; i++) {
        if (s[i] == '%') {
            escapes++;
        }
        else if (s[i] == '+') {
            plus = 1;
        }
    }
    PyObject *value = PyUnicode_New(end - start - 2 * escapes, 127);
    if (value == NULL) {
        return NULL;
    }
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(value);
    if (escapes == 0 && !plus) {
        memcpy(out, s + start, (size_t)(end - start));
        return value;
    }
    for (Py_ssize_t i = start; i < end; i++) {
        unsigned char c = s[i];
        if (c == '%') {
            *out++ = (Py_UCS1)(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
            i += 2;
        }
        else {
            *out++ = c == '+' ? ' ' : c;
        }
    }
    return value;
}

static PyObject *
fields_from_layout(PyObject *layout, const unsigned char *s, const Py_ssize_t *values,
                   Py_ssize_t pairs)
{
    if (!PyTuple_Check(layout)) {
        PyErr_SetString(PyExc_TypeError, "a layout must be a tuple or None");
        return NULL;
    }
    PyObject *fields = PyDict_New();
    if (fields == NULL) {
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(layout);
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *entry = PyTuple_GET_ITEM(layout, k);
        if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2) {
            PyErr_SetString(PyExc_TypeError, "a layout entry must be a (path, index) pair");
            goto error;
        }
        Py_ssize_t index = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, 1));
        if (index == -1 && PyErr_Occurred()) {
            goto error;
        }
        if (index < 0 || index >= pairs) {
            PyErr_Format(PyExc_IndexError, "layout index %zd outside the body's %zd pairs",
                         index, pairs);
            goto error;
        }
        PyObject *value = decode_value(s, values[2 * index], values[2 * index + 1]);
        if (value == NULL) {
            goto error;
        }
        int failed = PyDict_SetItem(fields, PyTuple_GET_ITEM(entry, 0), value);
        Py_DECREF(value);
        if (failed) {
            goto error;
        }
    }
    return fields;
error:
    Py_DECREF(fields);
    return NULL;
}

/* What each byte means to the scan; 0 for the bytes it copies or skips in bulk. */
enum { PLAIN = 0, AMPERSAND, EQUALS, PERCENT, PLUS, HIGH };
static unsigned char byte_class[256];

static void
init_byte_class(void)
{
    for (int c = 0x80; c < 256; c++) {
        byte_class[c] = HIGH;
    }
    byte_class['&'] = AMPERSAND;
    byte_class['='] = EQUALS;
    byte_class['%'] = PERCENT;
    byte_class['+'] = PLUS;
}

static PyObject *
extract(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "extract(body, layouts, miss) takes 3 arguments");
        return NULL;
    }
    PyObject *body = args[0], *layouts = args[1], *miss = args[2];
    if (!PyBytes_CheckExact(body)) {
        Py_RETURN_NOTIMPLEMENTED;
    }
    if (!PyDict_Check(layouts)) {
        PyErr_SetString(PyExc_TypeError, "layouts must be a dict");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(body);
    const Py_ssize_t n = PyBytes_GET_SIZE(body);

    /* One pass: check every byte and escape, copy the keys out, and note where each
     * pair's value starts and ends (values[2 * pair], values[2 * pair + 1]). */
    PyObject *result = NULL, *key_sequence = NULL;
    Py_ssize_t capacity = 128, pair = 0;
    Py_ssize_t *values = PyMem_New(Py_ssize_t, 2 * capacity);
    Py_UCS1 *keys = PyMem_Malloc((size_t)n + 1);
    if (values == NULL || keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_UCS1 *k = keys;
    int in_value = 0;
    Py_ssize_t i = 0;
    values[0] = values[1] = 0;
    while (i < n) {
        Py_ssize_t run = i;
        while (i < n && byte_class[s[i]] == PLAIN) {
            i++;
        }
        if (!in_value) {
            memcpy(k, s + run, (size_t)(i - run));
            k += i - run;
        }
        if (i == n) {
            break;
        }
        switch (byte_class[s[i]]) {
        case HIGH:
            result = Py_NewRef(Py_NotImplemented);
            goto done;
        case PERCENT:
            if (i + 2 >= n || s[i + 1] < '0' || s[i + 1] > '7' || hex_value(s[i + 2]) < 0) {
                result = Py_NewRef(Py_None);
                goto done;
            }
            if (!in_value) {
                memcpy(k, s + i, 3);
                k += 3;
            }
            i += 3;
            break;
        case PLUS:
            if (!in_value) {
                *k++ = ' ';
            }
            i++;
            break;
        case EQUALS:
            if (!in_value) {
                if (k == keys || k[-1] == '&') {
                    /* An empty key with a value ("=x"): the full decoder treats it as a
                     * pair that breaks up repeated groups, and the key sequence cannot
                     * tell it from an empty piece ("&&"), which it skips. */
                    result = Py_NewRef(Py_None);
                    goto done;
                }
                in_value = 1;
                values[2 * pair] = i + 1;
            }
            i++;
            break;
        case AMPERSAND:
            values[2 * pair + 1] = i;
            if (!in_value) {
                values[2 * pair] = i;
            }
            if (++pair == capacity) {
                Py_ssize_t *grown = PyMem_Realloc(values, 4 * (size_t)capacity * sizeof(Py_ssize_t));
                if (grown == NULL) {
                    PyErr_NoMemory();
                    goto done;
                }
                values = grown;
                capacity *= 2;
            }
            values[2 * pair] = values[2 * pair + 1] = i + 1;
            *k++ = '&';
            in_value = 0;
            i++;
            break;
        }
    }
    values[2 * pair + 1] = n;
    if (!in_value) {
        values[2 * pair] = n;
    }

    key_sequence = PyUnicode_New(k - keys, 127);
    if (key_sequence == NULL) {
        goto done;
    }
    memcpy(PyUnicode_1BYTE_DATA(key_sequence), keys, (size_t)(k - keys));
    PyObject *layout = PyDict_GetItemWithError(layouts, key_sequence); /* borrowed */
    if (layout != NULL) {
        Py_INCREF(layout);
    }
    else if (!PyErr_Occurred()) {
        layout = PyObject_CallOneArg(miss, key_sequence);
    }
    if (layout != NULL) {
        if (layout == Py_None) {
            result = Py_NewRef(Py_None);
        }
        else {
            result = fields_from_layout(layout, s, values, pair + 1);
        }
        Py_DECREF(layout);
    }
done:
    PyMem_Free(values);
    PyMem_Free(keys);
    Py_XDECREF(key_sequence);
    return result;
}

static PyMethodDef formscan_methods[] = {
    {"extract", (PyCFunction)(void (*)(void))extract, METH_FASTCALL,
     "extract(body, layouts, miss) -> dict | None | NotImplemented\n\n"
     "The fields of a webhook body by its key sequence's layout; see the module source."},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot formscan_slots[] = {
    {0, NULL},
};

static struct PyModuleDef formscan_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "chargify_stream.processors._formscan",
    .m_doc = "The processor's field extraction in C (see processors/routing.py).",
    .m_size = 0,
    .m_methods = formscan_methods,
    .m_slots = formscan_slots,
};

PyMODINIT_FUNC
PyInit__formscan(void)
{
    init_byte_class();
    return PyModuleDef_Init(&formscan_module);
}
