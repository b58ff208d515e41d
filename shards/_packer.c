/* The converter's per-sample loop in C, for the common case: an input that is a plain JPEG file kept
 * byte for byte. For each input it opens and reads the file, checks the JPEG the way
 * shards.images.prepare_jpeg does on its fast path, and lays out the sample's five tar members
 * (image, class text, label, index, source) exactly as shards.tario.ShardTarWriter.add_sample would,
 * together with the sample's DALI index line. The file is read straight into its place in the caller's
 * buffer (the direct sink's staging memory), so its bytes are copied once, by the kernel.
 *
 * It never decides anything the Python path would decide differently: an input it cannot take as it
 * is (unreadable, empty, not a JPEG kept as is, a file that changed size while read, a source name over
 * one tar block...) stops the call there and is "refused", and the caller runs that input through the
 * Python path, which skips it with its reason or re-encodes it. What it packs is tested to be byte for
 * byte what the Python path writes (tests/test_shards_native.py).
 *
 * Why C: one worker writing 1,000 ~49 KB JPEGs took 82 us of CPU per image in the Python loop and 61 with
 * this one (the rest is the sha256 the manifest records and the kernel's reads and writes); the Python
 * loop kept the conversion under 70% of plain tar's rate. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define BLOCK 512
#define COMPONENTS 5 /* image, class text, label int64, index int64, source */
#define SMALL_BYTES ((COMPONENTS - 1) * 2 * BLOCK) /* header + one data block per small member */
#define MAX_BATCH 4096
#define MAX_EXT 16
#define MAX_MEMBER_SIZE 077777777777LL /* what an 11-digit ustar size field holds */
#define LINE_ROOM 640 /* a sample's index line: 5 × (ext, two 20-digit numbers, name) < 640 */

typedef struct {
    PyObject *source;    /* the reference, UTF-8 with surrogateescape (new reference) */
    long long label;
    long long index;
    int fd;
    Py_ssize_t size;     /* image bytes, from fstat */
    int in_blob;         /* laid out in the call's own blob, not in the caller's target buffer */
    Py_ssize_t start;    /* where the sample starts in its buffer */
} Sample;

typedef struct {
    const char *root;
    Py_ssize_t root_length;
    const unsigned char *blank_header;
    const char *exts[COMPONENTS];
    size_t ext_lengths[COMPONENTS];
    long long shard;
    long long first_position;
    long long first_offset;
    long max_side;
} Layout;

/* ---- The JPEG check: the exact decision of shards.images.jpeg_frame + jpeg_ends_properly ---- */

static int is_standalone_marker(unsigned marker) {
    return marker == 0x01 || (marker >= 0xD0 && marker <= 0xD7);
}

static int is_frame_marker(unsigned marker) {
    return marker >= 0xC0 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC;
}

/* Walk the segments from SOI to the start of scan; 1 with the frame's size when the frame is 8-bit,
 * baseline/extended/progressive Huffman (C0–C2), with 1 or 3 components, and the segments are intact. */
static int jpeg_frame(const unsigned char *data, Py_ssize_t end, unsigned *width, unsigned *height) {
    if (end < 2 || data[0] != 0xFF || data[1] != 0xD8)
        return 0;
    int have_frame = 0;
    Py_ssize_t position = 2;
    while (position + 4 <= end) {
        unsigned fill = data[position], marker = data[position + 1];
        Py_ssize_t length = (data[position + 2] << 8) | data[position + 3];
        if (fill != 0xFF)
            return 0;
        if (marker == 0xFF) { /* a fill byte before a marker */
            position += 1;
            continue;
        }
        if (is_standalone_marker(marker)) {
            position += 2;
            continue;
        }
        if (marker == 0xD8 || marker == 0xD9)
            return 0;
        if (length < 2 || position + 2 + length > end)
            return 0;
        if (is_frame_marker(marker)) {
            if (have_frame || marker > 0xC2 || length < 8)
                return 0;
            const unsigned char *frame = data + position + 4;
            unsigned precision = frame[0], components = frame[5];
            *height = (frame[1] << 8) | frame[2];
            *width = (frame[3] << 8) | frame[4];
            if (precision != 8 || *width == 0 || *height == 0 || (components != 1 && components != 3))
                return 0;
            have_frame = 1;
        } else if (marker == 0xDA) {
            return have_frame;
        }
        position += 2 + length;
    }
    return 0;
}

static int ends_with_eoi(const unsigned char *data, Py_ssize_t end) {
    while (end > 0 && memchr("\0\r\n\t ", data[end - 1], 5) != NULL)
        end--;
    return end >= 2 && data[end - 2] == 0xFF && data[end - 1] == 0xD9;
}

/* 1 when prepare_jpeg (check "cheap") would return these bytes unchanged. */
static int jpeg_kept_as_is(const unsigned char *data, Py_ssize_t size, long max_side) {
    unsigned width = 0, height = 0;
    if (!jpeg_frame(data, size, &width, &height) || !ends_with_eoi(data, size))
        return 0;
    return max_side <= 0 || (width <= (unsigned long)max_side && height <= (unsigned long)max_side);
}

/* ---- Text (snprintf's format parsing cost ~3% of the loop) ---- */

/* `value` in decimal, zero-padded to at least `min_digits` digits; returns the end. */
static char *put_decimal(char *out, long long value, int min_digits) {
    char digits[24];
    int count = 0;
    unsigned long long magnitude = value < 0 ? 0ULL - (unsigned long long)value : (unsigned long long)value;
    do {
        digits[count++] = (char)('0' + magnitude % 10);
        magnitude /= 10;
    } while (magnitude != 0);
    while (count < min_digits)
        digits[count++] = '0';
    if (value < 0)
        *out++ = '-';
    while (count > 0)
        *out++ = digits[--count];
    return out;
}

/* `value` as exactly `width` octal digits (the caller checked that it fits). */
static void put_octal(unsigned char *out, unsigned long long value, int width) {
    for (int i = width - 1; i >= 0; i--) {
        out[i] = (unsigned char)('0' + (value & 7));
        value >>= 3;
    }
}

static char *put_text(char *out, const char *text, size_t length) {
    memcpy(out, text, length);
    return out + length;
}

/* ---- Tar members ---- */

/* One ustar header for `name` holding `size` bytes: the blank header's constant fields, the name, the
 * size as 11 octal digits, and the checksum over the header with its own field as spaces (the blank
 * header carries the spaces) as 6 octal digits, NUL, space. */
static void write_header(unsigned char *header, const Layout *layout, const char *name, size_t name_length,
                         long long size) {
    memcpy(header, layout->blank_header, BLOCK);
    memcpy(header, name, name_length);
    put_octal(header + 124, (unsigned long long)size, 11);
    unsigned long checksum = 0;
    for (int i = 0; i < BLOCK; i++)
        checksum += header[i];
    put_octal(header + 148, checksum, 6);
    header[154] = 0;
    header[155] = ' ';
}

static void put_int64_le(unsigned char *out, long long value) {
    unsigned long long bits = (unsigned long long)value;
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(bits >> (8 * i));
}

/* Lay out one sample whose image already sits right after its header's place at `out`; `offset` is
 * where `out` lies in the tar. Writes the sample's index line and returns its length. */
static int lay_out_sample(unsigned char *out, long long offset, const Sample *sample, const Layout *layout,
                          long long position, char *line) {
    char key[64], name[96], class_text[24];
    char *key_end = put_decimal(put_text(key, "s", 1), layout->shard, 6);
    *key_end++ = '_';
    key_end = put_decimal(key_end, position, 6);
    size_t key_length = (size_t)(key_end - key);

    unsigned char label[8], index[8];
    size_t class_length = (size_t)(put_decimal(class_text, sample->label, 1) - class_text);
    put_int64_le(label, sample->label);
    put_int64_le(index, sample->index);
    const unsigned char *payloads[COMPONENTS] = {
        out + BLOCK, (const unsigned char *)class_text, label, index,
        (const unsigned char *)PyBytes_AS_STRING(sample->source)};
    Py_ssize_t sizes[COMPONENTS] = {sample->size, (Py_ssize_t)class_length, 8, 8,
                                    PyBytes_GET_SIZE(sample->source)};

    char *line_end = line;
    memcpy(name, key, key_length);
    name[key_length] = '.';
    for (int j = 0; j < COMPONENTS; j++) {
        size_t name_length = key_length + 1 + layout->ext_lengths[j];
        memcpy(name + key_length + 1, layout->exts[j], layout->ext_lengths[j]);
        write_header(out, layout, name, name_length, sizes[j]);
        if (j > 0) { /* a small member: its data and padding fill one block */
            memcpy(out + BLOCK, payloads[j], (size_t)sizes[j]);
            memset(out + BLOCK + sizes[j], 0, (size_t)(BLOCK - sizes[j]));
        } else { /* the image is in place: zero its padding */
            memset(out + BLOCK + sizes[0], 0, (size_t)((BLOCK - sizes[0] % BLOCK) % BLOCK));
        }
        /* "ext offset size name", space-separated (DALI's v1.2 index line) */
        if (j > 0)
            *line_end++ = ' ';
        line_end = put_text(line_end, layout->exts[j], layout->ext_lengths[j]);
        *line_end++ = ' ';
        line_end = put_decimal(line_end, offset + BLOCK, 1);
        *line_end++ = ' ';
        line_end = put_decimal(line_end, sizes[j], 1);
        *line_end++ = ' ';
        line_end = put_text(line_end, name, name_length);
        Py_ssize_t member = BLOCK + (sizes[j] + BLOCK - 1) / BLOCK * BLOCK;
        out += member;
        offset += member;
    }
    return (int)(line_end - line);
}

static Py_ssize_t sample_bytes(Py_ssize_t image_size) {
    return BLOCK + (image_size + BLOCK - 1) / BLOCK * BLOCK + SMALL_BYTES;
}

/* ---- Phases of one call ---- */

/* With the GIL: the reference, label and index of each input; stops at the first one the Python path
 * must handle. Returns how many are usable, or -1 with an exception for a malformed input list. */
static Py_ssize_t read_inputs(PyObject *inputs, Py_ssize_t start, Py_ssize_t count, Sample *samples,
                              int *refused) {
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *item = PyList_GET_ITEM(inputs, start + k);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyUnicode_Check(PyTuple_GET_ITEM(item, 0))) {
            PyErr_SetString(PyExc_TypeError, "inputs must be (ref: str, label: int, index: int) tuples");
            return -1;
        }
        Sample *sample = &samples[k];
        sample->source = PyUnicode_AsEncodedString(PyTuple_GET_ITEM(item, 0), "utf-8", "surrogateescape");
        if (sample->source == NULL) {
            PyErr_Clear();
            *refused = 1;
            return k;
        }
        /* exact ints only: converting anything else could run Python code (__index__) that changes
         * the list under this loop; such inputs are left to the Python path */
        PyObject *label = PyTuple_GET_ITEM(item, 1), *index = PyTuple_GET_ITEM(item, 2);
        int exact = PyLong_CheckExact(label) && PyLong_CheckExact(index);
        sample->label = exact ? PyLong_AsLongLong(label) : 0;
        int overflow = exact && sample->label == -1 && PyErr_Occurred() != NULL;
        sample->index = exact && !overflow ? PyLong_AsLongLong(index) : 0;
        overflow = overflow || (exact && sample->index == -1 && PyErr_Occurred() != NULL);
        Py_ssize_t length = PyBytes_GET_SIZE(sample->source);
        int unusable = !exact || overflow || length == 0 || length > BLOCK ||
                       memchr(PyBytes_AS_STRING(sample->source), 0, (size_t)length) != NULL;
        if (unusable) {
            PyErr_Clear();
            Py_CLEAR(sample->source);
            *refused = 1;
            return k;
        }
    }
    return count;
}

typedef struct {
    Py_ssize_t target_capacity; /* bytes free in the caller's buffer; -1: none given */
    Py_ssize_t budget;          /* most bytes of the call's own blob without a target */
    Py_ssize_t in_target;       /* bytes placed in the target */
    Py_ssize_t in_blob;         /* bytes placed in the blob */
} Placement;

/* Without the GIL: open each file, fstat it and place it: in the target while samples fit, then in the
 * call's own blob. With a target, the call ends after the first sample that did not fit (the caller
 * continues in a fresh buffer); without one, when the blob reaches the budget. Returns how many files
 * are open. */
static Py_ssize_t open_files(const Layout *layout, Sample *samples, Py_ssize_t count, Placement *place,
                             int *refused) {
    char path[PATH_MAX];
    for (Py_ssize_t k = 0; k < count; k++) {
        Sample *sample = &samples[k];
        const char *ref = PyBytes_AS_STRING(sample->source);
        size_t ref_length = (size_t)PyBytes_GET_SIZE(sample->source);
        char *end = path;
        if (ref[0] != '/') {
            if ((size_t)layout->root_length + 1 + ref_length >= sizeof path) {
                *refused = 1;
                return k;
            }
            end = put_text(end, layout->root, (size_t)layout->root_length);
            *end++ = '/';
        } else if (ref_length >= sizeof path) {
            *refused = 1;
            return k;
        }
        end = put_text(end, ref, ref_length);
        *end = 0;
        struct stat status;
        sample->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (sample->fd < 0 || fstat(sample->fd, &status) != 0 || !S_ISREG(status.st_mode) ||
            status.st_size <= 0 || status.st_size > MAX_MEMBER_SIZE ||
            status.st_size > PY_SSIZE_T_MAX / 4 - place->in_blob) {
            if (sample->fd >= 0)
                close(sample->fd);
            sample->fd = -1;
            *refused = 1;
            return k;
        }
        sample->size = (Py_ssize_t)status.st_size;
        Py_ssize_t bytes = sample_bytes(sample->size);
        if (place->in_blob == 0 && place->in_target + bytes <= place->target_capacity) {
            sample->in_blob = 0;
            sample->start = place->in_target;
            place->in_target += bytes;
            continue;
        }
        sample->in_blob = 1;
        sample->start = place->in_blob;
        place->in_blob += bytes;
        if ((place->target_capacity >= 0 || place->in_blob >= place->budget) && k + 1 < count) {
            *refused = 0; /* the call ends here, before inputs not yet looked at */
            return k + 1;
        }
    }
    return count;
}

/* Without the GIL: read, check and lay out each open file (closing it). Returns how many samples are
 * complete. */
static Py_ssize_t fill(const Layout *layout, Sample *samples, Py_ssize_t count, const Placement *place,
                       unsigned char *target, unsigned char *blob, char *lines, int *line_lengths, int *refused) {
    for (Py_ssize_t k = 0; k < count; k++) {
        Sample *sample = &samples[k];
        unsigned char *out = (sample->in_blob ? blob : target) + sample->start;
        /* size + 1: a file that grew since fstat shows it here (there is always room: the small
         * members follow the image) */
        ssize_t got = read(sample->fd, out + BLOCK, (size_t)sample->size + 1);
        close(sample->fd);
        sample->fd = -1;
        if (got != sample->size || !jpeg_kept_as_is(out + BLOCK, sample->size, layout->max_side)) {
            *refused = 1;
            return k;
        }
        long long offset = layout->first_offset + sample->start + (sample->in_blob ? place->in_target : 0);
        line_lengths[k] = lay_out_sample(out, offset, sample, layout, layout->first_position + k,
                                         lines + k * LINE_ROOM);
    }
    return count;
}

static void release_samples(Sample *samples, Py_ssize_t count) {
    for (Py_ssize_t k = 0; k < count; k++) {
        if (samples[k].fd >= 0)
            close(samples[k].fd);
        Py_XDECREF(samples[k].source);
    }
}

static int parse_exts(PyObject *exts, Layout *layout) {
    if (!PyTuple_Check(exts) || PyTuple_GET_SIZE(exts) != COMPONENTS) {
        PyErr_SetString(PyExc_ValueError, "exts must be a tuple of the 5 component extensions");
        return -1;
    }
    for (int j = 0; j < COMPONENTS; j++) {
        Py_ssize_t length;
        const char *ext = PyUnicode_Check(PyTuple_GET_ITEM(exts, j))
                              ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(exts, j), &length)
                              : NULL;
        if (ext == NULL || length == 0 || length > MAX_EXT || strlen(ext) != (size_t)length ||
            !PyUnicode_IS_ASCII(PyTuple_GET_ITEM(exts, j))) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "component extensions must be short ASCII strings");
            return -1;
        }
        layout->exts[j] = ext;
        layout->ext_lengths[j] = (size_t)length;
    }
    return 0;
}

static PyObject *build_lines(const char *lines, const int *line_lengths, Py_ssize_t count) {
    PyObject *list = PyList_New(count);
    if (list == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *line = PyUnicode_DecodeASCII(lines + k * LINE_ROOM, line_lengths[k], NULL);
        if (line == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, line);
    }
    return list;
}

PyDoc_STRVAR(pack_doc,
"pack(root, inputs, start, stop, shard, first_position, first_offset, max_side, budget, target, exts,\n"
"     blank_header)\n"
"--\n\n"
"Pack inputs[start:stop] ((ref, label, index) tuples; files at root/ref, or ref when absolute) as tar\n"
"bytes, from the first one on, until one that the Python path must handle. Keys are\n"
"s{shard:06d}_{position:06d} from first_position; first_offset is where the bytes will start in the\n"
"tar; max_side <= 0 means no limit.\n\n"
"target (a writable buffer, or None) takes samples while they fit; the first that does not goes into a\n"
"bytes object of its own and ends the call. Without a target, samples go into that bytes object until\n"
"it holds `budget` bytes.\n\n"
"Returns (used, blob, lines, refused): bytes used at the start of target, the bytes that follow them,\n"
"the DALI index lines of the len(lines) samples packed, and whether inputs[start + len(lines)] was\n"
"refused (run it through the Python path).");

static PyObject *pack(PyObject *module, PyObject *args) {
    (void)module;
    Layout layout;
    PyObject *inputs, *exts, *target_object, *blob = NULL, *line_list = NULL, *result = NULL;
    Py_buffer root, blank, target = {0};
    Py_ssize_t start, stop, budget, count = 0, usable, opened = 0, packed = 0;
    Sample *samples = NULL;
    char *lines = NULL;
    int *line_lengths = NULL;
    int refused = 0;
    if (!PyArg_ParseTuple(args, "y*O!nnLLLlnOOy*", &root, &PyList_Type, &inputs, &start, &stop, &layout.shard,
                          &layout.first_position, &layout.first_offset, &layout.max_side, &budget,
                          &target_object, &exts, &blank))
        return NULL;
    if (target_object != Py_None && PyObject_GetBuffer(target_object, &target, PyBUF_WRITABLE) < 0)
        goto done;
    if (blank.len != BLOCK || start < 0 || stop > PyList_GET_SIZE(inputs) || start > stop ||
        stop - start > MAX_BATCH || layout.shard < 0 || layout.first_position < 0 || layout.first_offset < 0) {
        PyErr_SetString(PyExc_ValueError, "bad range, numbering or blank header");
        goto done;
    }
    if (parse_exts(exts, &layout) < 0)
        goto done;
    layout.root = root.buf;
    layout.root_length = root.len;
    layout.blank_header = blank.buf;
    count = stop - start;
    samples = PyMem_Calloc((size_t)count + 1, sizeof(Sample));
    if (samples != NULL)
        for (Py_ssize_t k = 0; k < count; k++)
            samples[k].fd = -1;
    lines = PyMem_Malloc(((size_t)count + 1) * LINE_ROOM);
    line_lengths = PyMem_Malloc(((size_t)count + 1) * sizeof(int));
    if (samples == NULL || lines == NULL || line_lengths == NULL) {
        PyErr_NoMemory();
        goto done;
    }

    usable = read_inputs(inputs, start, count, samples, &refused);
    if (usable < 0)
        goto done;
    Placement place = {target_object == Py_None ? -1 : target.len, budget, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    opened = open_files(&layout, samples, usable, &place, &refused);
    Py_END_ALLOW_THREADS
    blob = PyBytes_FromStringAndSize(NULL, place.in_blob);
    if (blob == NULL)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    packed = fill(&layout, samples, opened, &place, target.buf, (unsigned char *)PyBytes_AS_STRING(blob),
                  lines, line_lengths, &refused);
    Py_END_ALLOW_THREADS
    Py_ssize_t used = place.in_target, blob_used = place.in_blob;
    if (packed < opened) { /* refused at samples[packed]: keep only what precedes it */
        const Sample *first_refused = &samples[packed];
        used = first_refused->in_blob ? place.in_target : first_refused->start;
        blob_used = first_refused->in_blob ? first_refused->start : 0;
    }
    if (blob_used != place.in_blob && _PyBytes_Resize(&blob, blob_used) < 0)
        goto done; /* _PyBytes_Resize released the blob */
    line_list = build_lines(lines, line_lengths, packed);
    if (line_list == NULL)
        goto done;
    result = Py_BuildValue("(nOOO)", used, blob, line_list, refused ? Py_True : Py_False);
done:
    Py_XDECREF(blob);
    Py_XDECREF(line_list);
    if (samples != NULL)
        release_samples(samples, count);
    PyMem_Free(samples);
    PyMem_Free(lines);
    PyMem_Free(line_lengths);
    if (target.obj != NULL)
        PyBuffer_Release(&target);
    PyBuffer_Release(&root);
    PyBuffer_Release(&blank);
    return result;
}

PyDoc_STRVAR(kept_doc,
"jpeg_kept_as_is(data, max_side)\n--\n\n"
"Whether prepare_jpeg (check 'cheap') keeps these bytes unchanged: the C packer's own check, exposed so\n"
"tests can hold it against the Python one.");

static PyObject *kept(PyObject *module, PyObject *args) {
    (void)module;
    Py_buffer data;
    long max_side;
    if (!PyArg_ParseTuple(args, "y*l", &data, &max_side))
        return NULL;
    int result = data.len > 0 && jpeg_kept_as_is(data.buf, data.len, max_side);
    PyBuffer_Release(&data);
    return PyBool_FromLong(result);
}

static PyMethodDef methods[] = {
    {"pack", pack, METH_VARARGS, pack_doc},
    {"jpeg_kept_as_is", kept, METH_VARARGS, kept_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shards._packer",
    "The converter's per-sample loop for plain JPEG files, in C (see shards.native).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__packer(void) {
    return PyModule_Create(&module);
}
