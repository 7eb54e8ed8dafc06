/*
 * meta169.http._wire: serve's compiled fast path (see wire.py for the contract).
 *
 * One call turns a complete, simple GET or HEAD for a document already answered
 * once into the bytes of its reply: it recognises the request, finds the caller's
 * table and the path in it, takes a token from the instance's rate-limit bucket and
 * assembles status line, headers, Date and body. Whatever it does not recognise it
 * declines (returns None), and the Python path answers as before; it never answers
 * differently from that path, only faster. It knows HTTP/1.1 framing and serve's
 * limits; which headers are the Python path's to judge is passed in from Python
 * when a FastPath or Stamper is made (wire.py says where those lists live).
 *
 * Everything here runs with the GIL held, so the static Date and seed state needs
 * no lock; the seed pool is emptied in a forked child so workers never share seeds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

/* Nova's random_seed: 512 bytes, base64 [openstack/nova api/metadata/base.py]. */
#define SEED_BYTES 512
#define SEED_TEXT (((SEED_BYTES + 2) / 3) * 4)
#define SEED_POOL 64

/* ------------------------------------------------------------------ Bucket */

typedef struct {
    PyObject_HEAD
    double rate;
    double burst;
    double tokens;
    double last;
} BucketObject;

static PyTypeObject BucketType;

/* The same arithmetic as the pure-Python Bucket in wire.py, step for step. */
static double
bucket_take(BucketObject *b, double now)
{
    double tokens = b->tokens + (now - b->last) * b->rate;
    if (tokens > b->burst) {
        tokens = b->burst;
    }
    b->last = now;
    /* A float refill must not lose a token to rounding. */
    if (tokens >= 1.0 - 1e-9) {
        b->tokens = tokens - 1.0;
        return 0.0;
    }
    b->tokens = tokens;
    return (1.0 - tokens) / b->rate;
}

static PyObject *
Bucket_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"rate", "burst", "now", NULL};
    double rate, burst, now;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "ddd", kwlist, &rate, &burst, &now)) {
        return NULL;
    }
    if (!(rate > 0.0) || !(burst >= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "a bucket needs rate > 0 and burst >= 1");
        return NULL;
    }
    BucketObject *self = (BucketObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->rate = rate;
    self->burst = burst;
    self->tokens = burst;
    self->last = now;
    return (PyObject *)self;
}

static PyObject *
Bucket_take(BucketObject *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return PyFloat_FromDouble(bucket_take(self, now));
}

static PyObject *
Bucket_full(BucketObject *self, PyObject *arg)
{
    double now = PyFloat_AsDouble(arg);
    if (now == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    return PyBool_FromLong(self->tokens + (now - self->last) * self->rate >= self->burst);
}

static PyMethodDef Bucket_methods[] = {
    {"take", (PyCFunction)Bucket_take, METH_O,
     "take(now) -> 0.0 when allowed, else the seconds until a token is back."},
    {"full", (PyCFunction)Bucket_full, METH_O, "full(now) -> whether the bucket has refilled."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Bucket_members[] = {
    {"rate", T_DOUBLE, offsetof(BucketObject, rate), READONLY, NULL},
    {"burst", T_DOUBLE, offsetof(BucketObject, burst), READONLY, NULL},
    {"tokens", T_DOUBLE, offsetof(BucketObject, tokens), READONLY, NULL},
    {"last", T_DOUBLE, offsetof(BucketObject, last), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject BucketType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meta169.http._wire.Bucket",
    .tp_basicsize = sizeof(BucketObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Bucket(rate, burst, now): one instance's token bucket.",
    .tp_new = Bucket_new,
    .tp_methods = Bucket_methods,
    .tp_members = Bucket_members,
};

/* -------------------------------------------------------------- Date line */

static time_t date_second = (time_t)-1;
static char date_line[64];
static Py_ssize_t date_len;

/* RFC 9110 5.6.7 IMF-fixdate, as email.utils.formatdate(usegmt=True) writes it;
 * names are spelled out because strftime's follow the locale. */
static void
date_refresh(void)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    time_t now = time(NULL);
    if (now == date_second) {
        return;
    }
    struct tm tm;
    if (gmtime_r(&now, &tm) == NULL) {
        return; /* keep the previous line; time() beyond gmtime's range is not real */
    }
    int n = snprintf(date_line, sizeof date_line, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                     days[tm.tm_wday], tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour,
                     tm.tm_min, tm.tm_sec);
    if (n > 0 && (size_t)n < sizeof date_line) {
        date_len = n;
        date_second = now;
    }
}

/* -------------------------------------------------------------- Seed pool */

static unsigned char seed_pool[SEED_BYTES * SEED_POOL];
static size_t seed_offset = sizeof seed_pool; /* empty */
/* Python callable giving a whole pool of CSPRNG bytes (see set_seed_source), or NULL. */
static PyObject *seed_source = NULL;

static int
seed_refill(void)
{
    if (seed_source != NULL) {
        PyObject *fresh = PyObject_CallNoArgs(seed_source);
        if (fresh == NULL) {
            return -1;
        }
        if (!PyBytes_CheckExact(fresh) || (size_t)PyBytes_GET_SIZE(fresh) != sizeof seed_pool) {
            Py_DECREF(fresh);
            PyErr_SetString(PyExc_ValueError, "the seed source must return SEED_BYTES * SEED_POOL bytes");
            return -1;
        }
        memcpy(seed_pool, PyBytes_AS_STRING(fresh), sizeof seed_pool);
        Py_DECREF(fresh);
        return 0;
    }
    size_t got = 0;
    while (got < sizeof seed_pool) {
        ssize_t n = getrandom(seed_pool + got, sizeof seed_pool - got, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

static void
seed_forget(void)
{
    seed_offset = sizeof seed_pool;
}

/* One refill per SEED_POOL seeds; every seed is used once. */
static const unsigned char *
seed_take(void)
{
    if (seed_offset + SEED_BYTES > sizeof seed_pool) {
        if (seed_refill() < 0) {
            return NULL;
        }
        seed_offset = 0;
    }
    const unsigned char *seed = seed_pool + seed_offset;
    seed_offset += SEED_BYTES;
    return seed;
}

static void
base64_encode(const unsigned char *in, size_t n, char *out)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = alphabet[v >> 6 & 63];
        *out++ = alphabet[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = '=';
        *out++ = '=';
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        *out++ = alphabet[v >> 18 & 63];
        *out++ = alphabet[v >> 12 & 63];
        *out++ = alphabet[v >> 6 & 63];
        *out++ = '=';
    }
}

/* ----------------------------------------------------------- Recogniser */

typedef struct {
    int head;           /* HEAD rather than GET */
    const char *target; /* the whole request target */
    Py_ssize_t target_len;
    const char *path;   /* the request target up to '?' */
    Py_ssize_t path_len;
    int keep_alive;
    /* With a stamp to read (a trusted proxy's Unix socket): its values, trimmed. */
    const char *caller;
    Py_ssize_t caller_len;
    const char *scope;
    Py_ssize_t scope_len;
    int scope_is_router;
    /* With a token name to read: the IMDSv2 token's value, trimmed (NULL when not sent). */
    const char *token;
    Py_ssize_t token_len;
} Simple;

/* RFC 9110 5.6.2 tchar. */
static unsigned char tchar[256];

static void
tchar_init(void)
{
    const char *extra = "!#$%&'*+-.^_`|~";
    for (int c = '0'; c <= '9'; c++) tchar[c] = 1;
    for (int c = 'a'; c <= 'z'; c++) tchar[c] = 1;
    for (int c = 'A'; c <= 'Z'; c++) tchar[c] = 1;
    for (const char *p = extra; *p; p++) tchar[(unsigned char)*p] = 1;
}

static int
name_is(const char *name, Py_ssize_t len, const char *lower, Py_ssize_t want)
{
    if (len != want) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < len; i++) {
        char c = name[i];
        if (c >= 'A' && c <= 'Z') {
            c = (char)(c + 32);
        }
        if (c != lower[i]) {
            return 0;
        }
    }
    return 1;
}

#define NAME_IS(name, len, lit) name_is((name), (len), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* Bounds on the lists Python passes in; a metadata service reads a handful of headers. */
#define MAX_OWNED 32
#define STAMP_NAMES 3 /* caller IP, network id, router id */
enum { STAMP_CALLER = 0, STAMP_NETWORK = 1, STAMP_ROUTER = 2 };

/*
 * Which request headers send a request to the Python path, as Python defines them
 * (api.metadata.PYTHON_OWNED_HEADERS / PYTHON_OWNED_PREFIXES): exact lower-case
 * names and name prefixes, matched case-insensitively on the wire. With ``stamped``
 * the trusted proxy's stamp (caller IP, network id, router id; also given by
 * Python, from http.stamp) is read instead of declined; with ``token`` (the IMDSv2
 * token header's name, given with the table of tokens Python has validated) that
 * header is read too, once. The pointers are into bytes objects their owner keeps
 * alive (the FastPath's tuples, or a call's arguments).
 */
typedef struct {
    Py_ssize_t n_names;
    Py_ssize_t n_prefixes;
    const char *names[MAX_OWNED];
    Py_ssize_t name_lens[MAX_OWNED];
    const char *prefixes[MAX_OWNED];
    Py_ssize_t prefix_lens[MAX_OWNED];
    int stamped;
    const char *stamp[STAMP_NAMES];
    Py_ssize_t stamp_lens[STAMP_NAMES];
    const char *token; /* NULL: the token header is declined like any owned one */
    Py_ssize_t token_len;
    /* The first bytes, in either case, of every name above: most headers a guest
     * sends (Host, Accept, User-Agent) start with none of them and skip the lists. */
    unsigned char first[256];
} Rules;

/* Check that the bytes ``item`` is a non-empty lower-case token (``what`` names its list). */
static int
check_name(PyObject *item, const char *what)
{
    const char *s = PyBytes_AS_STRING(item);
    Py_ssize_t len = PyBytes_GET_SIZE(item);
    if (len == 0) {
        PyErr_Format(PyExc_ValueError, "%s holds an empty name", what);
        return -1;
    }
    for (Py_ssize_t j = 0; j < len; j++) {
        unsigned char c = (unsigned char)s[j];
        if (!tchar[c] || (c >= 'A' && c <= 'Z')) {
            PyErr_Format(PyExc_ValueError, "%s must hold lower-case header names (RFC 9110 tokens), not %R", what,
                         item);
            return -1;
        }
    }
    return 0;
}

/*
 * Check that ``tuple`` is a tuple of at most ``max`` non-empty lower-case tokens
 * (bytes), with ``what`` naming it in the error. A name with an upper-case letter
 * would never match the lower-cased wire name, silently letting its header through.
 */
static int
check_names(PyObject *tuple, Py_ssize_t max, const char *what)
{
    if (!PyTuple_CheckExact(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
        return -1;
    }
    if (PyTuple_GET_SIZE(tuple) > max) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd names, more than %zd", what, PyTuple_GET_SIZE(tuple), max);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(tuple); i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (!PyBytes_CheckExact(item)) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
            return -1;
        }
        if (check_name(item, what) < 0) {
            return -1;
        }
    }
    return 0;
}

/* Fill ``r`` from the tuples (``stamp`` and ``token`` may be Py_None); -1 with an exception set. */
static int
rules_init(Rules *r, PyObject *owned, PyObject *prefixes, PyObject *stamp, PyObject *token)
{
    if (check_names(owned, MAX_OWNED, "owned") < 0 || check_names(prefixes, MAX_OWNED, "owned_prefixes") < 0) {
        return -1;
    }
    if (token != Py_None) {
        if (!PyBytes_CheckExact(token)) {
            PyErr_SetString(PyExc_TypeError, "token must be bytes (the token header's name) or None");
            return -1;
        }
        if (check_name(token, "token") < 0) {
            return -1;
        }
    }
    if (stamp != Py_None) {
        if (check_names(stamp, STAMP_NAMES, "stamp") < 0) {
            return -1;
        }
        if (PyTuple_GET_SIZE(stamp) != STAMP_NAMES) {
            PyErr_SetString(PyExc_ValueError, "stamp names the caller IP, network id and router id headers");
            return -1;
        }
    }
    r->n_names = PyTuple_GET_SIZE(owned);
    for (Py_ssize_t i = 0; i < r->n_names; i++) {
        r->names[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(owned, i));
        r->name_lens[i] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(owned, i));
    }
    r->n_prefixes = PyTuple_GET_SIZE(prefixes);
    for (Py_ssize_t i = 0; i < r->n_prefixes; i++) {
        r->prefixes[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(prefixes, i));
        r->prefix_lens[i] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(prefixes, i));
    }
    r->stamped = stamp != Py_None;
    for (int i = 0; r->stamped && i < STAMP_NAMES; i++) {
        r->stamp[i] = PyBytes_AS_STRING(PyTuple_GET_ITEM(stamp, i));
        r->stamp_lens[i] = PyBytes_GET_SIZE(PyTuple_GET_ITEM(stamp, i));
    }
    r->token = token != Py_None ? PyBytes_AS_STRING(token) : NULL;
    r->token_len = token != Py_None ? PyBytes_GET_SIZE(token) : 0;
    memset(r->first, 0, sizeof r->first);
    if (r->token != NULL) {
        unsigned char c = (unsigned char)r->token[0];
        r->first[c] = 1;
        if (c >= 'a' && c <= 'z') {
            r->first[c - 32] = 1;
        }
    }
    PyObject *lists[] = {owned, prefixes, stamp};
    for (size_t l = 0; l < sizeof lists / sizeof lists[0]; l++) {
        for (Py_ssize_t i = 0; lists[l] != Py_None && i < PyTuple_GET_SIZE(lists[l]); i++) {
            unsigned char c = (unsigned char)PyBytes_AS_STRING(PyTuple_GET_ITEM(lists[l], i))[0];
            r->first[c] = 1;
            if (c >= 'a' && c <= 'z') {
                r->first[c - 32] = 1;
            }
        }
    }
    return 0;
}

/* Whether Python owns the header ``name``: length first, then a case-insensitive compare. */
static int
owned_by_python(const Rules *r, const char *name, Py_ssize_t len)
{
    for (Py_ssize_t i = 0; i < r->n_names; i++) {
        if (r->name_lens[i] == len && name_is(name, len, r->names[i], len)) {
            return 1;
        }
    }
    for (Py_ssize_t i = 0; i < r->n_prefixes; i++) {
        Py_ssize_t plen = r->prefix_lens[i];
        if (len >= plen && name_is(name, plen, r->prefixes[i], plen)) {
            return 1;
        }
    }
    return 0;
}

/* Which stamp header ``name`` is (STAMP_*), or -1. */
static int
stamp_index(const Rules *r, const char *name, Py_ssize_t len)
{
    for (int i = 0; i < STAMP_NAMES; i++) {
        if (r->stamp_lens[i] == len && name_is(name, len, r->stamp[i], len)) {
            return i;
        }
    }
    return -1;
}

/*
 * Accept exactly one complete "GET|HEAD <target> HTTP/1.1" request with no body,
 * or decline. Declined, among others: pipelined or partial data, bytes outside
 * the grammar (controls, lone CR or LF, obs-fold), a target that is not origin-form
 * visible ASCII or holds '%', headers that frame a body or change the protocol
 * (Content-Length other than 0, Transfer-Encoding, Upgrade, Expect), a Connection
 * header other than one "close" or "keep-alive", anything over serve's limits as
 * HTTPProtocol counts them, and (with ``rules``) every header Python owns. With
 * ``rules->stamped`` (a trusted proxy's Unix socket) the proxy's stamp is read
 * instead: one caller IP and one network or router id. With ``rules->token`` one
 * IMDSv2 token header is read instead (answer_one checks it). Without ``rules`` (a
 * guest at the proxy) any header passes: the Stamper's own lists filter them.
 */
static int
recognise(const char *d, Py_ssize_t n, Py_ssize_t max_header_bytes, Py_ssize_t max_headers, Py_ssize_t max_url,
          const Rules *rules, Simple *r)
{
    const char *end = d + n;
    if (n < 18 || n > max_header_bytes || memcmp(end - 4, "\r\n\r\n", 4) != 0) {
        return 0;
    }
    const char *p;
    if (memcmp(d, "GET ", 4) == 0) {
        r->head = 0;
        p = d + 4;
    } else if (memcmp(d, "HEAD ", 5) == 0) {
        r->head = 1;
        p = d + 5;
    } else {
        return 0;
    }
    if (*p != '/') {
        return 0;
    }
    const char *target = p;
    const char *query = NULL;
    for (; p < end && *p != ' '; p++) {
        unsigned char c = (unsigned char)*p;
        if (c < 0x21 || c > 0x7e || c == '%') {
            return 0;
        }
        if (c == '?' && query == NULL) {
            query = p;
        }
    }
    if (p - target > max_url) {
        return 0;
    }
    r->target = target;
    r->target_len = p - target;
    r->path = target;
    r->path_len = (query != NULL ? query : p) - target;
    if (end - p < 11 || memcmp(p, " HTTP/1.1\r\n", 11) != 0) {
        return 0;
    }
    p += 11;
    Py_ssize_t count = 0;
    /* HTTPProtocol.on_header's count: name + value as httptools gives it (leading
     * whitespace dropped, trailing kept) + 4, per header line. */
    Py_ssize_t header_bytes = 0;
    int connection = 0, length = 0;
    r->keep_alive = 1;
    r->caller = NULL;
    r->scope = NULL;
    r->caller_len = r->scope_len = 0;
    r->scope_is_router = 0;
    r->token = NULL;
    r->token_len = 0;
    while (p < end - 2) {
        if (++count > max_headers) {
            return 0;
        }
        const char *name = p;
        while (p < end && tchar[(unsigned char)*p]) {
            p++;
        }
        if (p == name || p >= end || *p != ':') {
            return 0;
        }
        Py_ssize_t name_len = p - name;
        p++;
        const char *value = p;
        for (; p < end; p++) {
            unsigned char c = (unsigned char)*p;
            if (c == '\r') {
                break;
            }
            if ((c < 0x20 && c != '\t') || c == 0x7f) {
                return 0;
            }
        }
        if (end - p < 2 || p[1] != '\n') {
            return 0;
        }
        const char *value_end = p;
        p += 2;
        while (value < value_end && (*value == ' ' || *value == '\t')) value++;
        header_bytes += name_len + (value_end - value) + 4;
        if (header_bytes > max_header_bytes) {
            return 0;
        }
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) value_end--;
        Py_ssize_t value_len = value_end - value;
        switch (name_len) {
        case 6:
            if (NAME_IS(name, name_len, "expect")) return 0;
            break;
        case 7:
            if (NAME_IS(name, name_len, "upgrade")) return 0;
            break;
        case 10:
            if (NAME_IS(name, name_len, "connection")) {
                if (connection++) {
                    return 0;
                }
                if (NAME_IS(value, value_len, "close")) {
                    r->keep_alive = 0;
                } else if (!NAME_IS(value, value_len, "keep-alive")) {
                    return 0;
                }
            }
            break;
        case 14:
            /* A bodiless request may still say so, once (a repeated one is a smuggling tell). */
            if (NAME_IS(name, name_len, "content-length") && (length++ || !(value_len == 1 && value[0] == '0'))) {
                return 0;
            }
            break;
        case 17:
            if (NAME_IS(name, name_len, "transfer-encoding")) return 0;
            break;
        default:
            break;
        }
        if (rules == NULL || !rules->first[(unsigned char)name[0]]) {
            continue;
        }
        int stamp = rules->stamped ? stamp_index(rules, name, name_len) : -1;
        if (stamp == STAMP_CALLER) {
            if (r->caller != NULL || value_len == 0) return 0;
            r->caller = value;
            r->caller_len = value_len;
        } else if (stamp >= 0) {
            if (r->scope != NULL || value_len == 0) return 0;
            r->scope = value;
            r->scope_len = value_len;
            r->scope_is_router = stamp == STAMP_ROUTER;
        } else if (rules->token != NULL && name_is(name, name_len, rules->token, rules->token_len)) {
            /* Python joins a repeated header into one value, which is then no token: 401. */
            if (r->token != NULL) return 0;
            r->token = value;
            r->token_len = value_len;
        } else if (owned_by_python(rules, name, name_len)) {
            return 0;
        }
    }
    if (rules != NULL && rules->stamped && (r->caller == NULL || r->scope == NULL)) {
        return 0;
    }
    return p == end - 2;
}

/* ---------------------------------------------------------------- Output */

/*
 * A reply or request assembled into a buffer allocated for it: every write is
 * checked against the end of that buffer first, so a size computed wrong declines
 * the request (the Python path answers it) instead of writing past the allocation.
 */
typedef struct {
    char *w;
    char *end;
    int overflow;
} Out;

static void
out_put(Out *o, const char *s, Py_ssize_t n)
{
    if (o->overflow || n > o->end - o->w) {
        o->overflow = 1;
        return;
    }
    memcpy(o->w, s, (size_t)n);
    o->w += n;
}

/* Room for ``n`` bytes written in place, or NULL (and the overflow noted). */
static char *
out_reserve(Out *o, Py_ssize_t n)
{
    if (o->overflow || n > o->end - o->w) {
        o->overflow = 1;
        return NULL;
    }
    char *at = o->w;
    o->w += n;
    return at;
}

static void
out_bytes(Out *o, PyObject *b)
{
    out_put(o, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b));
}

/* -------------------------------------------------------------- FastPath */

#define FAST_CLASSES 16
#define MAX_BOUNDS 32

typedef struct {
    PyObject_HEAD
    /* Direct listener: dict peer text -> (wire dict, instance uuid).
     * Proxy listener: dict network id -> that dict; ``routers`` the same by router id. */
    PyObject *sites;
    PyObject *routers; /* NULL on a direct listener */
    PyObject *buckets; /* dict: instance uuid -> Bucket, or NULL without rate limit */
    /* dict: IMDSv2 token bytes -> (instance uuid, expiry in Unix seconds), the tokens
     * the Python path found valid (api.tokens.Validated); NULL: tokens are declined. */
    PyObject *tokens;
    /* The tuples of bytes ``rules`` points into, kept alive with it (and the token name). */
    PyObject *owned;
    PyObject *owned_prefixes;
    PyObject *stamp;
    PyObject *token_name;
    Rules rules;
    Py_ssize_t max_header_bytes;
    Py_ssize_t max_headers;
    Py_ssize_t max_url_bytes;
    /* Metrics, read by stats() at scrape time: answers per class (the int a wire
     * entry may end with; FAST_CLASSES - 1 for one without) and, when latency
     * bounds were given, the time inside answer() per request in buckets. Plain
     * integers under the GIL: counting costs no Python call. */
    unsigned long long counts[FAST_CLASSES];
    Py_ssize_t nbounds;
    double bounds[MAX_BOUNDS];
    unsigned long long latency[MAX_BOUNDS + 1];
    double latency_sum;
} FastPathObject;

static int
check_limits(Py_ssize_t max_header_bytes, Py_ssize_t max_headers, Py_ssize_t max_url_bytes)
{
    if (max_header_bytes < 0 || max_headers < 0 || max_url_bytes < 0) {
        PyErr_SetString(PyExc_ValueError, "max_header_bytes, max_headers and max_url_bytes must be >= 0");
        return -1;
    }
    return 0;
}

static PyObject *
FastPath_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"sites",  "buckets",        "max_header_bytes", "max_headers", "max_url_bytes",
                             "owned",  "owned_prefixes", "routers",          "stamp",       "latency_bounds",
                             "tokens", "token",          NULL};
    PyObject *sites, *buckets, *owned, *owned_prefixes, *routers = Py_None, *stamp = Py_None;
    PyObject *latency_bounds = Py_None, *tokens = Py_None, *token = Py_None;
    Py_ssize_t max_header_bytes, max_headers, max_url_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!OnnnOO|OOOOO", kwlist, &PyDict_Type, &sites, &buckets,
                                     &max_header_bytes, &max_headers, &max_url_bytes, &owned, &owned_prefixes,
                                     &routers, &stamp, &latency_bounds, &tokens, &token)) {
        return NULL;
    }
    /* The token header is read only where there is a table to check it against. */
    if ((tokens == Py_None) != (token == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "tokens and token are given together or not at all");
        return NULL;
    }
    if (tokens != Py_None && !PyDict_CheckExact(tokens)) {
        PyErr_SetString(PyExc_TypeError, "tokens must be a dict or None");
        return NULL;
    }
    double bounds[MAX_BOUNDS];
    Py_ssize_t nbounds = 0;
    if (latency_bounds != Py_None) {
        if (!PyTuple_Check(latency_bounds) || PyTuple_GET_SIZE(latency_bounds) > MAX_BOUNDS) {
            PyErr_SetString(PyExc_TypeError, "latency_bounds must be a tuple of at most 32 floats or None");
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(latency_bounds); i++) {
            double b = PyFloat_AsDouble(PyTuple_GET_ITEM(latency_bounds, i));
            if (b == -1.0 && PyErr_Occurred()) {
                return NULL;
            }
            if (!(b > 0.0) || (i > 0 && !(b > bounds[i - 1]))) {
                PyErr_SetString(PyExc_ValueError, "latency_bounds must be positive and increasing");
                return NULL;
            }
            bounds[nbounds++] = b;
        }
    }
    if (check_limits(max_header_bytes, max_headers, max_url_bytes) < 0) {
        return NULL;
    }
    if (buckets != Py_None && !PyDict_Check(buckets)) {
        PyErr_SetString(PyExc_TypeError, "buckets must be a dict or None");
        return NULL;
    }
    if (routers != Py_None && !PyDict_Check(routers)) {
        PyErr_SetString(PyExc_TypeError, "routers must be a dict or None");
        return NULL;
    }
    /* A proxy listener is keyed by the stamp, so it needs the stamp's names, and only it reads them. */
    if ((routers == Py_None) != (stamp == Py_None)) {
        PyErr_SetString(PyExc_TypeError, "routers and stamp are given together (a proxy listener) or not at all");
        return NULL;
    }
    Rules rules;
    if (rules_init(&rules, owned, owned_prefixes, stamp, token) < 0) {
        return NULL;
    }
    FastPathObject *self = (FastPathObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->owned = Py_NewRef(owned);
    self->owned_prefixes = Py_NewRef(owned_prefixes);
    self->stamp = Py_NewRef(stamp);
    self->token_name = Py_NewRef(token);
    if (tokens != Py_None) {
        self->tokens = Py_NewRef(tokens);
    }
    self->rules = rules;
    Py_INCREF(sites);
    self->sites = sites;
    if (buckets != Py_None) {
        Py_INCREF(buckets);
        self->buckets = buckets;
    }
    if (routers != Py_None) {
        Py_INCREF(routers);
        self->routers = routers;
    }
    self->max_header_bytes = max_header_bytes;
    self->max_headers = max_headers;
    self->max_url_bytes = max_url_bytes;
    self->nbounds = nbounds;
    memcpy(self->bounds, bounds, sizeof(double) * (size_t)nbounds);
    return (PyObject *)self;
}

static void
FastPath_dealloc(FastPathObject *self)
{
    Py_XDECREF(self->sites);
    Py_XDECREF(self->routers);
    Py_XDECREF(self->buckets);
    Py_XDECREF(self->tokens);
    Py_XDECREF(self->owned);
    Py_XDECREF(self->owned_prefixes);
    Py_XDECREF(self->stamp);
    Py_XDECREF(self->token_name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* time.time()'s clock: token expiries are Unix seconds. */
static double
wall_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/*
 * Whether the IMDSv2 token the request carried may be accepted for the instance
 * ``uuid`` (the caller's, from its slot): 1 when the table of tokens the Python path
 * validated holds it, for that very instance, and it has not expired by the clock
 * now (api.tokens: valid while expiry > time.time()); 0 otherwise (the Python path
 * then judges it, 401 for a forged, expired or other instance's token); -1 with an
 * exception set.
 */
static int
token_accepted(FastPathObject *self, const Simple *req, PyObject *uuid)
{
    if (self->tokens == NULL || !PyUnicode_CheckExact(uuid)) {
        return 0;
    }
    PyObject *key = PyBytes_FromStringAndSize(req->token, req->token_len);
    if (key == NULL) {
        return -1;
    }
    PyObject *known = PyDict_GetItemWithError(self->tokens, key); /* borrowed */
    Py_DECREF(key);
    if (known == NULL) {
        return PyErr_Occurred() ? -1 : 0;
    }
    if (!PyTuple_CheckExact(known) || PyTuple_GET_SIZE(known) != 2 ||
        !PyUnicode_CheckExact(PyTuple_GET_ITEM(known, 0)) || !PyLong_CheckExact(PyTuple_GET_ITEM(known, 1))) {
        PyErr_SetString(PyExc_TypeError, "tokens must map token bytes to (instance uuid, expiry)");
        return -1;
    }
    long long expiry = PyLong_AsLongLong(PyTuple_GET_ITEM(known, 1));
    if (expiry == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (!((double)expiry > wall_now())) {
        return 0;
    }
    /* Both exact str: the comparison runs no Python code that could change the table. */
    return PyUnicode_Compare(PyTuple_GET_ITEM(known, 0), uuid) == 0;
}

/* The slot of the caller a proxy stamped, borrowed; NULL (maybe with an error set) if none. */
static PyObject *
lookup_stamped(FastPathObject *self, const Simple *req)
{
    PyObject *scope = PyUnicode_DecodeLatin1(req->scope, req->scope_len, NULL);
    if (scope == NULL) {
        return NULL;
    }
    PyObject *by_peer = PyDict_GetItemWithError(req->scope_is_router ? self->routers : self->sites, scope);
    Py_DECREF(scope);
    if (by_peer == NULL) {
        return NULL;
    }
    if (!PyDict_CheckExact(by_peer)) {
        PyErr_SetString(PyExc_TypeError, "a scope maps to a dict of site slots");
        return NULL;
    }
    PyObject *caller = PyUnicode_DecodeLatin1(req->caller, req->caller_len, NULL);
    if (caller == NULL) {
        return NULL;
    }
    PyObject *slot = PyDict_GetItemWithError(by_peer, caller);
    Py_DECREF(caller);
    return slot;
}

/*
 * The reply to the one request ``d[0:n]`` (a complete head), or Py_None (a new
 * reference) when it is the Python path's to answer. ``*keep`` says whether the
 * connection stays open after it.
 */
static PyObject *
answer_one(FastPathObject *self, const char *d, Py_ssize_t n, PyObject *peer, int *keep)
{
    Simple req;
    int proxy = self->routers != NULL;
    if (!recognise(d, n, self->max_header_bytes, self->max_headers, self->max_url_bytes, &self->rules, &req)) {
        Py_RETURN_NONE;
    }
    PyObject *slot;
    if (!proxy) {
        slot = PyDict_GetItemWithError(self->sites, peer);
    } else {
        slot = lookup_stamped(self, &req);
    }
    if (slot == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    /* (wire, uuid), or (wire, uuid, tokens required) for an instance with http_tokens "required". */
    Py_ssize_t slot_len = PyTuple_CheckExact(slot) ? PyTuple_GET_SIZE(slot) : 0;
    if ((slot_len != 2 && slot_len != 3) || !PyDict_CheckExact(PyTuple_GET_ITEM(slot, 0)) ||
        (slot_len == 3 && !PyBool_Check(PyTuple_GET_ITEM(slot, 2)))) {
        PyErr_SetString(PyExc_TypeError, "a site slot must be (dict, uuid) or (dict, uuid, bool)");
        return NULL;
    }
    int required = slot_len == 3 && PyTuple_GET_ITEM(slot, 2) == Py_True;
    PyObject *key = PyBytes_FromStringAndSize(req.path, req.path_len);
    if (key == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(PyTuple_GET_ITEM(slot, 0), key);
    Py_DECREF(key);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_ssize_t parts = PyTuple_CheckExact(entry) ? PyTuple_GET_SIZE(entry) : 0;
    /* An entry may end with its metrics class (an int), counted when it is answered. */
    Py_ssize_t cls = FAST_CLASSES - 1;
    if (parts >= 3 && PyLong_CheckExact(PyTuple_GET_ITEM(entry, parts - 1))) {
        cls = PyLong_AsSsize_t(PyTuple_GET_ITEM(entry, parts - 1));
        if (cls == -1 && PyErr_Occurred()) {
            return NULL;
        }
        if (cls < 0 || cls >= FAST_CLASSES) {
            PyErr_SetString(PyExc_ValueError, "a wire entry's class is 0..15");
            return NULL;
        }
        parts--;
    }
    if (parts != 2 && parts != 3) {
        PyErr_SetString(PyExc_TypeError,
                        "a wire entry must be (head, body) or (head, prefix, suffix), optionally with a class");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < parts; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(entry, i))) {
            PyErr_SetString(PyExc_TypeError, "wire entries hold bytes");
            return NULL;
        }
    }
    /* IMDSv2 (EC2 user guide): a token that is sent must be valid, and with tokens
     * required one must be sent. Checked before the bucket, so a request declined
     * here takes no token from it (the Python path takes one when it answers). */
    if (req.token != NULL) {
        int accepted = token_accepted(self, &req, PyTuple_GET_ITEM(slot, 1));
        if (accepted < 0) {
            return NULL;
        }
        if (!accepted) {
            Py_RETURN_NONE;
        }
    } else if (required) {
        Py_RETURN_NONE; /* the Python path answers 401 */
    }
    if (self->buckets != NULL) {
        /* A uuid without a bucket yet is the Python path's to create. */
        PyObject *bucket = PyDict_GetItemWithError(self->buckets, PyTuple_GET_ITEM(slot, 1));
        if (bucket == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (Py_TYPE(bucket) != &BucketType) {
            PyErr_SetString(PyExc_TypeError, "buckets must hold Bucket objects");
            return NULL;
        }
        if (bucket_take((BucketObject *)bucket, monotonic_now()) > 0.0) {
            Py_RETURN_NONE; /* the Python path answers 429 with Retry-After */
        }
    }
    PyObject *head = PyTuple_GET_ITEM(entry, 0);
    Py_ssize_t head_len = PyBytes_GET_SIZE(head);
    Py_ssize_t body_len = 0;
    if (!req.head) {
        body_len = parts == 2 ? PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1))
                              : PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 1)) + SEED_TEXT +
                                    PyBytes_GET_SIZE(PyTuple_GET_ITEM(entry, 2));
    }
    static const char open_tail[] = "\r\n";
    static const char close_tail[] = "Connection: close\r\n\r\n";
    const char *tail = req.keep_alive ? open_tail : close_tail;
    Py_ssize_t tail_len = req.keep_alive ? (Py_ssize_t)sizeof open_tail - 1 : (Py_ssize_t)sizeof close_tail - 1;
    const unsigned char *seed = NULL;
    if (!req.head && parts == 3) {
        seed = seed_take();
        if (seed == NULL) {
            return NULL;
        }
    }
    date_refresh();
    Py_ssize_t size = head_len + date_len + tail_len + body_len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) {
        return NULL;
    }
    Out o = {PyBytes_AS_STRING(out), PyBytes_AS_STRING(out) + size, 0};
    out_bytes(&o, head);
    out_put(&o, date_line, date_len);
    out_put(&o, tail, tail_len);
    if (!req.head) {
        for (Py_ssize_t i = 1; i < parts; i++) {
            out_bytes(&o, PyTuple_GET_ITEM(entry, i));
            char *text = seed != NULL && i == 1 ? out_reserve(&o, SEED_TEXT) : NULL;
            if (text != NULL) {
                base64_encode(seed, SEED_BYTES, text);
            }
        }
    }
    if (o.overflow || o.w != o.end) {
        /* Sized from the very parts written: never, short of a bug. The Python path answers. */
        Py_DECREF(out);
        Py_RETURN_NONE;
    }
    *keep = req.keep_alive;
    self->counts[cls]++;
    return out;
}


/* End of the head that starts at ``d`` (just past its blank line), or 0. */
static Py_ssize_t
head_end(const char *d, Py_ssize_t n)
{
    for (Py_ssize_t i = 3; i < n; i++) {
        if (d[i] == '\n' && d[i - 1] == '\r' && d[i - 2] == '\n' && d[i - 3] == '\r') {
            return i + 1;
        }
    }
    return 0;
}

/*
 * answer(data, peer): the replies to the requests at the start of ``data``, as
 * long as each is one this path answers. A trusted proxy pipelines the requests
 * that reached it together, so ``data`` may hold several. Returns None when the
 * first is the Python path's; (replies, keep_alive) when every request in ``data``
 * was answered (or one asked to close, and what follows it is ignored, as the
 * Python path ignores it); (replies, True, consumed) when the Python path must go
 * on with ``data[consumed:]``.
 */
static PyObject *
FastPath_answer(FastPathObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "answer(data, peer) takes two arguments");
        return NULL;
    }
    PyObject *data = args[0], *peer = args[1];
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Py_ssize_t off = 0;
    int keep = 1;
    Py_ssize_t answered = 0;
    double started = self->nbounds ? monotonic_now() : 0.0;
    PyObject *first = NULL, *more = NULL; /* more: a list, made for a second reply */
    while (off < n) {
        Py_ssize_t limit = n - off < self->max_header_bytes + 1 ? n - off : self->max_header_bytes + 1;
        Py_ssize_t len = head_end(d + off, limit);
        if (len == 0) {
            break;
        }
        PyObject *reply = answer_one(self, d + off, len, peer, &keep);
        if (reply == NULL) {
            Py_XDECREF(first);
            Py_XDECREF(more);
            return NULL;
        }
        if (reply == Py_None) {
            Py_DECREF(reply);
            keep = 1;
            break;
        }
        off += len;
        answered++;
        if (first == NULL) {
            first = reply;
        } else {
            if (more == NULL && (more = PyList_New(0)) == NULL) {
                Py_DECREF(reply);
                Py_DECREF(first);
                return NULL;
            }
            int failed = PyList_Append(more, reply);
            Py_DECREF(reply);
            if (failed) {
                Py_DECREF(first);
                Py_DECREF(more);
                return NULL;
            }
        }
        if (!keep) {
            off = n;
        }
    }
    if (first == NULL) {
        Py_RETURN_NONE;
    }
    if (self->nbounds) {
        /* Each request answered in this call waited for the whole call. */
        double took = monotonic_now() - started;
        Py_ssize_t b = 0;
        while (b < self->nbounds && took > self->bounds[b]) {
            b++;
        }
        self->latency[b] += (unsigned long long)answered;
        self->latency_sum += took * (double)answered;
    }
    PyObject *out = first;
    if (more != NULL) {
        Py_ssize_t total = PyBytes_GET_SIZE(first);
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(more); i++) {
            total += PyBytes_GET_SIZE(PyList_GET_ITEM(more, i));
        }
        out = PyBytes_FromStringAndSize(NULL, total);
        if (out != NULL) {
            Out o = {PyBytes_AS_STRING(out), PyBytes_AS_STRING(out) + total, 0};
            out_bytes(&o, first);
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(more); i++) {
                out_bytes(&o, PyList_GET_ITEM(more, i));
            }
            if (o.overflow || o.w != o.end) {
                /* Summed from the very replies joined: never, short of a bug. */
                Py_CLEAR(out);
                PyErr_SetString(PyExc_SystemError, "FastPath.answer: pipelined replies changed size");
            }
        }
        Py_DECREF(first);
        Py_DECREF(more);
        if (out == NULL) {
            return NULL;
        }
    }
    return off == n ? Py_BuildValue("(NO)", out, keep ? Py_True : Py_False)
                    : Py_BuildValue("(NOn)", out, Py_True, off);
}

/* stats(): (answers per class, latency bucket counts with +Inf last, latency sum in seconds). */
static PyObject *
FastPath_stats(FastPathObject *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *counts = PyTuple_New(FAST_CLASSES);
    PyObject *latency = PyTuple_New(self->nbounds ? self->nbounds + 1 : 0);
    if (counts == NULL || latency == NULL) {
        Py_XDECREF(counts);
        Py_XDECREF(latency);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < FAST_CLASSES; i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(self->counts[i]);
        if (n == NULL) {
            Py_DECREF(counts);
            Py_DECREF(latency);
            return NULL;
        }
        PyTuple_SET_ITEM(counts, i, n);
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(latency); i++) {
        PyObject *n = PyLong_FromUnsignedLongLong(self->latency[i]);
        if (n == NULL) {
            Py_DECREF(counts);
            Py_DECREF(latency);
            return NULL;
        }
        PyTuple_SET_ITEM(latency, i, n);
    }
    return Py_BuildValue("(NNd)", counts, latency, self->latency_sum);
}

static PyMethodDef FastPath_methods[] = {
    {"answer", (PyCFunction)(void (*)(void))FastPath_answer, METH_FASTCALL,
     "answer(data, peer) -> (replies, keep_alive), (replies, True, consumed) when the Python path goes on "
     "with data[consumed:], or None to let it answer all."},
    {"stats", (PyCFunction)FastPath_stats, METH_NOARGS,
     "stats() -> (answers per class, latency bucket counts (+Inf last), latency sum in seconds)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef FastPath_members[] = {
    {"sites", T_OBJECT, offsetof(FastPathObject, sites), READONLY, NULL},
    {"routers", T_OBJECT, offsetof(FastPathObject, routers), READONLY, NULL},
    {"buckets", T_OBJECT, offsetof(FastPathObject, buckets), READONLY, NULL},
    {"owned", T_OBJECT, offsetof(FastPathObject, owned), READONLY, NULL},
    {"owned_prefixes", T_OBJECT, offsetof(FastPathObject, owned_prefixes), READONLY, NULL},
    {"stamp", T_OBJECT, offsetof(FastPathObject, stamp), READONLY, NULL},
    {"tokens", T_OBJECT, offsetof(FastPathObject, tokens), READONLY, NULL},
    {"token", T_OBJECT, offsetof(FastPathObject, token_name), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meta169.http._wire.FastPath",
    .tp_basicsize = sizeof(FastPathObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "FastPath(sites, buckets, max_header_bytes, max_headers, max_url_bytes, owned, owned_prefixes, "
              "routers=None, stamp=None, latency_bounds=None, tokens=None, token=None)",
    .tp_new = FastPath_new,
    .tp_dealloc = (destructor)FastPath_dealloc,
    .tp_methods = FastPath_methods,
    .tp_members = FastPath_members,
};

/* --------------------------------------------------------------- Stamper */

/*
 * The proxy's compiled path: a simple GET or HEAD from a guest becomes the request
 * the Python ProxyApp would send upstream, byte for byte: request line (HEAD asked
 * as GET), the guest's headers in order with names lower-cased and values trimmed,
 * less the ones the proxy never forwards (given by Python, which owns the lists),
 * one marker line where the dropped X-Forwarded-For stood, then Host and the stamp.
 * Repeated header names are declined: Python joins them, which this does not do.
 */
typedef struct {
    PyObject_HEAD
    PyObject *drop;       /* tuple of lower-case names never forwarded */
    PyObject *prefixes;   /* tuple of lower-case name prefixes never forwarded */
    PyObject *marker_for; /* the dropped name that leaves a marker line */
    PyObject *marker;     /* that line, without CRLF */
    PyObject *before;     /* lines after the guest's headers, up to the caller IP value */
    PyObject *after;      /* from after the caller IP value to the end of the head */
    Py_ssize_t max_header_bytes;
    Py_ssize_t max_headers;
    Py_ssize_t max_url_bytes;
    unsigned long long forwarded; /* requests stamped, read at scrape time */
} StamperObject;

/* The proxy drops some dozens of names (hop-by-hop, identity, IMDS); far more is a mistake. */
#define MAX_DROP 256

static PyObject *
Stamper_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"drop", "prefixes", "marker_for", "marker", "before", "after",
                             "max_header_bytes", "max_headers", "max_url_bytes", NULL};
    PyObject *drop, *prefixes, *marker_for, *marker, *before, *after;
    Py_ssize_t max_header_bytes, max_headers, max_url_bytes;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOSSSSnnn", kwlist, &drop, &prefixes, &marker_for, &marker,
                                     &before, &after, &max_header_bytes, &max_headers, &max_url_bytes)) {
        return NULL;
    }
    if (check_names(drop, MAX_DROP, "drop") < 0 || check_names(prefixes, MAX_DROP, "prefixes") < 0 ||
        check_limits(max_header_bytes, max_headers, max_url_bytes) < 0) {
        return NULL;
    }
    PyObject *marker_names = PyTuple_Pack(1, marker_for);
    if (marker_names == NULL) {
        return NULL;
    }
    int bad_marker = check_names(marker_names, 1, "marker_for");
    Py_DECREF(marker_names);
    if (bad_marker < 0) {
        return NULL;
    }
    StamperObject *self = (StamperObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    PyObject **slots[] = {&self->drop, &self->prefixes, &self->marker_for, &self->marker, &self->before, &self->after};
    PyObject *values[] = {drop, prefixes, marker_for, marker, before, after};
    for (size_t i = 0; i < sizeof values / sizeof values[0]; i++) {
        Py_INCREF(values[i]);
        *slots[i] = values[i];
    }
    self->max_header_bytes = max_header_bytes;
    self->max_headers = max_headers;
    self->max_url_bytes = max_url_bytes;
    return (PyObject *)self;
}

static void
Stamper_dealloc(StamperObject *self)
{
    Py_XDECREF(self->drop);
    Py_XDECREF(self->prefixes);
    Py_XDECREF(self->marker_for);
    Py_XDECREF(self->marker);
    Py_XDECREF(self->before);
    Py_XDECREF(self->after);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
bytes_equal(PyObject *b, const char *s, Py_ssize_t n)
{
    return PyBytes_GET_SIZE(b) == n && memcmp(PyBytes_AS_STRING(b), s, (size_t)n) == 0;
}

static int
dropped(StamperObject *self, const char *lname, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->drop); i++) {
        if (bytes_equal(PyTuple_GET_ITEM(self->drop, i), lname, n)) {
            return 1;
        }
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(self->prefixes); i++) {
        PyObject *prefix = PyTuple_GET_ITEM(self->prefixes, i);
        Py_ssize_t len = PyBytes_GET_SIZE(prefix);
        if (n >= len && memcmp(PyBytes_AS_STRING(prefix), lname, (size_t)len) == 0) {
            return 1;
        }
    }
    return 0;
}

#define MAX_NAMES 64

static PyObject *
Stamper_forward(StamperObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_CheckExact(args[0]) || !PyUnicode_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "forward(data: bytes, peer: str)");
        return NULL;
    }
    PyObject *data = args[0];
    Py_ssize_t peer_len;
    const char *peer = PyUnicode_AsUTF8AndSize(args[1], &peer_len);
    if (peer == NULL) {
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Simple req;
    if (peer_len == 0 || !recognise(d, n, self->max_header_bytes,
                                    self->max_headers < MAX_NAMES ? self->max_headers : MAX_NAMES,
                                    self->max_url_bytes, NULL, &req)) {
        Py_RETURN_NONE;
    }
    /* Output head <= input head + ' ' per header (name:value -> name: value) + the
     * marker + what follows the guest's headers; every write below is checked
     * against it all the same (an estimate too small declines, never overflows). */
    Py_ssize_t cap = n + MAX_NAMES + PyBytes_GET_SIZE(self->marker) + PyBytes_GET_SIZE(self->before) + peer_len +
                     PyBytes_GET_SIZE(self->after) + 16;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    char *scratch = PyMem_Malloc((size_t)n); /* lower-cased names, to refuse repeats */
    if (out == NULL || scratch == NULL) {
        Py_XDECREF(out);
        PyMem_Free(scratch);
        return PyErr_NoMemory();
    }
    Out o = {PyBytes_AS_STRING(out), PyBytes_AS_STRING(out) + cap, 0};
    out_put(&o, "GET ", 4);
    out_put(&o, req.target, req.target_len);
    out_put(&o, " HTTP/1.1\r\n", 11);
    const char *names[MAX_NAMES];
    Py_ssize_t name_lens[MAX_NAMES];
    int seen = 0;
    char *sp = scratch;
    /* recognise() checked the grammar: every line below is "name:value\r\n". */
    const char *p = (const char *)memchr(d, '\n', (size_t)n) + 1;
    const char *end = d + n - 2;
    while (p < end) {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        const char *eol = memchr(colon, '\r', (size_t)(end + 2 - colon));
        Py_ssize_t name_len = colon - p;
        if (name_len > scratch + n - sp) {
            goto decline; /* names are disjoint parts of the input: never */
        }
        char *lname = sp;
        for (Py_ssize_t i = 0; i < name_len; i++) {
            char c = p[i];
            lname[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        sp += name_len;
        for (int i = 0; i < seen; i++) {
            if (name_lens[i] == name_len && memcmp(names[i], lname, (size_t)name_len) == 0) {
                goto decline;
            }
        }
        if (seen == MAX_NAMES) {
            goto decline;
        }
        names[seen] = lname;
        name_lens[seen++] = name_len;
        const char *value = colon + 1;
        const char *value_end = eol;
        p = eol + 2;
        while (value < value_end && (*value == ' ' || *value == '\t')) value++;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) value_end--;
        if (dropped(self, lname, name_len)) {
            if (bytes_equal(self->marker_for, lname, name_len)) {
                out_bytes(&o, self->marker);
                out_put(&o, "\r\n", 2);
            }
            continue;
        }
        out_put(&o, lname, name_len);
        out_put(&o, ": ", 2);
        out_put(&o, value, value_end - value);
        out_put(&o, "\r\n", 2);
    }
    out_bytes(&o, self->before);
    out_put(&o, peer, peer_len);
    out_bytes(&o, self->after);
    if (o.overflow) {
        goto decline;
    }
    PyMem_Free(scratch);
    if (_PyBytes_Resize(&out, o.w - PyBytes_AS_STRING(out)) < 0) {
        return NULL;
    }
    PyObject *target = PyBytes_FromStringAndSize(req.target, req.target_len);
    if (target == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    self->forwarded++;
    return Py_BuildValue("(NOON)", out, req.head ? Py_True : Py_False, req.keep_alive ? Py_True : Py_False, target);

decline:
    PyMem_Free(scratch);
    Py_DECREF(out);
    Py_RETURN_NONE;
}

static PyMethodDef Stamper_methods[] = {
    {"forward", (PyCFunction)(void (*)(void))Stamper_forward, METH_FASTCALL,
     "forward(data, peer) -> (upstream request, head, keep_alive, target), or None for the Python path."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Stamper_members[] = {
    {"forwarded", T_ULONGLONG, offsetof(StamperObject, forwarded), READONLY, "requests stamped so far"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject StamperType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "meta169.http._wire.Stamper",
    .tp_basicsize = sizeof(StamperObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Stamper(drop, prefixes, marker_for, marker, before, after, max_header_bytes, max_headers, "
              "max_url_bytes)",
    .tp_new = Stamper_new,
    .tp_dealloc = (destructor)Stamper_dealloc,
    .tp_methods = Stamper_methods,
    .tp_members = Stamper_members,
};

/* ---------------------------------------------------------------- module */

/* The header lines of a request recognise() accepted: ((lower-case name, trimmed value), ...). */
static PyObject *
header_pairs(const char *d, Py_ssize_t n)
{
    PyObject *pairs = PyList_New(0);
    if (pairs == NULL) {
        return NULL;
    }
    const char *p = (const char *)memchr(d, '\n', (size_t)n) + 1;
    const char *end = d + n - 2;
    while (p < end) {
        const char *colon = memchr(p, ':', (size_t)(end - p));
        const char *eol = memchr(colon, '\r', (size_t)(end + 2 - colon));
        const char *value = colon + 1, *value_end = eol;
        while (value < value_end && (*value == ' ' || *value == '\t')) value++;
        while (value_end > value && (value_end[-1] == ' ' || value_end[-1] == '\t')) value_end--;
        /* Made empty, then filled: CPython shares its one-byte bytes objects, so
         * lower-casing a copy of the input in place would change b"A" everywhere. */
        PyObject *name = PyBytes_FromStringAndSize(NULL, colon - p);
        if (name == NULL) {
            Py_DECREF(pairs);
            return NULL;
        }
        char *lower = PyBytes_AS_STRING(name);
        for (Py_ssize_t i = 0; i < colon - p; i++) {
            char c = p[i];
            lower[i] = (c >= 'A' && c <= 'Z') ? (char)(c + 32) : c;
        }
        PyObject *pair = Py_BuildValue("(Ny#)", name, value, (Py_ssize_t)(value_end - value));
        if (pair == NULL || PyList_Append(pairs, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(pairs);
            return NULL;
        }
        Py_DECREF(pair);
        p = eol + 2;
    }
    PyObject *tuple = PyList_AsTuple(pairs);
    Py_DECREF(pairs);
    return tuple;
}

/*
 * recognise(data, max_header_bytes, max_headers, max_url_bytes, owned=None, owned_prefixes=(), stamp=None,
 * token=None): what the recogniser makes of ``data``, for tests and diagnosis. With
 * ``owned`` None no rules apply (the Stamper's view); else the FastPath's (``stamp``
 * and ``token`` as there).
 */
static PyObject *
wire_recognise(PyObject *module, PyObject *args, PyObject *kwds)
{
    (void)module;
    static char *kwlist[] = {"data", "max_header_bytes", "max_headers", "max_url_bytes", "owned", "owned_prefixes",
                             "stamp", "token", NULL};
    PyObject *data, *owned = Py_None, *owned_prefixes = NULL, *stamp = Py_None, *token = Py_None;
    Py_ssize_t max_header_bytes, max_headers, max_url;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!nnn|OOOO", kwlist, &PyBytes_Type, &data, &max_header_bytes,
                                     &max_headers, &max_url, &owned, &owned_prefixes, &stamp, &token)) {
        return NULL;
    }
    if (check_limits(max_header_bytes, max_headers, max_url) < 0) {
        return NULL;
    }
    Rules rules;
    const Rules *use = NULL;
    if (owned != Py_None) {
        PyObject *empty = PyTuple_New(0);
        if (empty == NULL) {
            return NULL;
        }
        int failed = rules_init(&rules, owned, owned_prefixes != NULL ? owned_prefixes : empty, stamp, token);
        Py_DECREF(empty); /* ``rules`` keeps no pointer into an empty tuple */
        if (failed < 0) {
            return NULL;
        }
        use = &rules;
    } else if (owned_prefixes != NULL || stamp != Py_None || token != Py_None) {
        PyErr_SetString(PyExc_TypeError, "owned_prefixes, stamp and token go with owned");
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    Simple req;
    if (!recognise(d, n, max_header_bytes, max_headers, max_url, use, &req)) {
        Py_RETURN_NONE;
    }
    PyObject *headers = header_pairs(d, n);
    if (headers == NULL) {
        return NULL;
    }
    PyObject *out = Py_BuildValue("{s:s,s:y#,s:y#,s:O,s:N}", "method", req.head ? "HEAD" : "GET", "target", req.target,
                                  req.target_len, "path", req.path, req.path_len, "keep_alive",
                                  req.keep_alive ? Py_True : Py_False, "headers", headers);
    if (out != NULL && use != NULL && use->token != NULL) {
        PyObject *sent = req.token != NULL ? PyBytes_FromStringAndSize(req.token, req.token_len) : Py_NewRef(Py_None);
        if (sent == NULL || PyDict_SetItemString(out, "token", sent) < 0) {
            Py_XDECREF(sent);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(sent);
    }
    if (out == NULL || use == NULL || !use->stamped) {
        return out;
    }
    PyObject *stamp_fields = Py_BuildValue("{s:y#,s:s,s:y#}", "caller", req.caller, req.caller_len, "scope_kind",
                                           req.scope_is_router ? "router" : "network", "scope", req.scope,
                                           req.scope_len);
    if (stamp_fields == NULL || PyDict_Update(out, stamp_fields) < 0) {
        Py_XDECREF(stamp_fields);
        Py_DECREF(out);
        return NULL;
    }
    Py_DECREF(stamp_fields);
    return out;
}

static PyObject *
wire_date_line(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    date_refresh();
    return PyBytes_FromStringAndSize(date_line, date_len);
}

/*
 * Where the reply at ``d`` ends, if it is a complete plain reply as serve writes
 * them (HTTP/1.1, header lines "token: value", one Content-Length of at most 9
 * digits, no header whose name starts with Connection, Transfer-Encoding or
 * X-Meta169-); 0 while more bytes are
 * needed to tell; -1 for anything else (the proxy's upstream then frames it in
 * Python). ``*status`` gets the status code. Mirrors proxy.upstream._py_reply_frame.
 */
static Py_ssize_t
frame_reply(const char *d, Py_ssize_t n, int *status)
{
    if (n < 13) {
        return 0;
    }
    if (memcmp(d, "HTTP/1.1 ", 9) != 0) {
        return -1;
    }
    for (int i = 9; i < 12; i++) {
        if (d[i] < '0' || d[i] > '9') {
            return -1;
        }
    }
    if (d[12] != ' ' && d[12] != '\r') {
        return -1;
    }
    Py_ssize_t head_len = head_end(d, n);
    if (head_len == 0) {
        return 0;
    }
    const char *blank = d + head_len - 4; /* the CRLF CRLF that ends the head */
    long length = -1;
    const char *p = memchr(d, '\n', (size_t)(blank - d + 2));
    p = p == NULL ? blank : p + 1;
    while (p < blank) {
        const char *eol = p;
        while (eol < blank && !(eol[0] == '\r' && eol[1] == '\n')) eol++;
        const char *colon = memchr(p, ':', (size_t)(eol - p));
        if (colon == NULL || colon == p) {
            return -1;
        }
        Py_ssize_t name_len = colon - p;
        for (Py_ssize_t i = 0; i < name_len; i++) {
            if (!tchar[(unsigned char)p[i]]) {
                return -1;
            }
        }
        if ((name_len >= 10 && NAME_IS(p, 10, "connection")) ||
            (name_len >= 17 && NAME_IS(p, 17, "transfer-encoding")) ||
            (name_len >= 10 && NAME_IS(p, 10, "x-meta169-"))) {
            return -1;
        }
        if (NAME_IS(p, name_len, "content-length")) {
            if (length >= 0) {
                return -1;
            }
            const char *v = colon + 1, *v_end = eol;
            while (v < v_end && (*v == ' ' || *v == '\t')) v++;
            while (v_end > v && (v_end[-1] == ' ' || v_end[-1] == '\t')) v_end--;
            if (v_end == v || v_end - v > 9) {
                return -1;
            }
            length = 0;
            for (const char *c = v; c < v_end; c++) {
                if (*c < '0' || *c > '9') {
                    return -1;
                }
                length = length * 10 + (*c - '0');
            }
        }
        if (eol >= blank) {
            break;
        }
        p = eol + 2;
    }
    if (length < 0) {
        return -1;
    }
    Py_ssize_t end = head_len + length;
    if (end > n) {
        return 0;
    }
    *status = (d[9] - '0') * 100 + (d[10] - '0') * 10 + (d[11] - '0');
    return end;
}

/* reply_frame(data, offset) -> (status, end) | 0 | -1, for the reply at data[offset:]. */
static PyObject *
wire_reply_frame(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyBytes_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "reply_frame(data: bytes, offset: int)");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t off = PyLong_AsSsize_t(args[1]);
    if (off == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (off < 0 || off > n) {
        PyErr_SetString(PyExc_ValueError, "offset outside the data");
        return NULL;
    }
    int status = 0;
    Py_ssize_t len = frame_reply(PyBytes_AS_STRING(args[0]) + off, n - off, &status);
    if (len <= 0) {
        return PyLong_FromSsize_t(len);
    }
    return Py_BuildValue("(in)", status, off + len);
}

static PyObject *
wire_set_seed_source(PyObject *module, PyObject *source)
{
    (void)module;
    if (source != Py_None && !PyCallable_Check(source)) {
        PyErr_SetString(PyExc_TypeError, "the seed source must be callable or None");
        return NULL;
    }
    Py_XSETREF(seed_source, source == Py_None ? NULL : Py_NewRef(source));
    seed_forget();
    Py_RETURN_NONE;
}

static PyMethodDef wire_methods[] = {
    {"reply_frame", (PyCFunction)(void (*)(void))wire_reply_frame, METH_FASTCALL,
     "reply_frame(data, offset) -> (status, end) of a complete plain reply at offset, 0 (more bytes needed) "
     "or -1 (not plain)."},
    {"set_seed_source", wire_set_seed_source, METH_O,
     "set_seed_source(callable | None): where pools of random seed bytes come from (None: getrandom)."},
    {"recognise", (PyCFunction)(void (*)(void))wire_recognise, METH_VARARGS | METH_KEYWORDS,
     "recognise(data, max_header_bytes, max_headers, max_url_bytes, owned=None, owned_prefixes=(), stamp=None, "
     "token=None) -> dict of method, target, path, keep_alive, headers (and caller, scope_kind, scope with a "
     "stamp; token with a token name), or None."},
    {"date_line", wire_date_line, METH_NOARGS, "The current Date header line, as the fast path writes it."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef wire_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meta169.http._wire",
    .m_doc = "serve's compiled fast path for cached documents",
    .m_size = -1,
    .m_methods = wire_methods,
};

PyMODINIT_FUNC
PyInit__wire(void)
{
    tchar_init();
    if (PyType_Ready(&BucketType) < 0 || PyType_Ready(&FastPathType) < 0 || PyType_Ready(&StamperType) < 0) {
        return NULL;
    }
    if (pthread_atfork(NULL, NULL, seed_forget) != 0) {
        PyErr_SetString(PyExc_ImportError, "pthread_atfork failed");
        return NULL;
    }
    PyObject *m = PyModule_Create(&wire_module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "SEED_BYTES", SEED_BYTES) < 0 ||
        PyModule_AddIntConstant(m, "SEED_POOL", SEED_POOL) < 0 ||
        PyModule_AddObjectRef(m, "Bucket", (PyObject *)&BucketType) < 0 ||
        PyModule_AddObjectRef(m, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(m, "Stamper", (PyObject *)&StamperType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
