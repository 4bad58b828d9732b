/* Per-(sample, channel) shifted sums of a float32 tensor, accumulated in float64, in one pass.
 *
 * Why C: NumPy needs a float64 temporary (a cast pass) and then one reduction pass per sum,
 * ~2-3 ns per element; ResNet-18 BN inputs are ~0.8 M elements per sample, which made the
 * statistics cost ~0.4x of an inference pass. This loop converts, centres and accumulates in
 * registers (float32 -> float64 conversion and squares are exact; sums are float64), so it runs
 * at memory speed. bnfold/engine/moments.py falls back to NumPy when the extension is not built.
 *
 * Why per sample: the pooled per-channel moments (sums over samples) and the between-sample
 * standard errors (engine/uncertainty.py, which needs each sample's sums) come out of the same
 * single read of the tensor.
 *
 * sample_sums_f32(x, shift, s1, s2, n, c, l, b):
 *   x      C-contiguous float32 buffer of shape (n, c/b, l, b): b = 1 for a plain (n, c, l) tensor,
 *          b > 1 for ONNX Runtime's blocked NCHWc layout (channel blk*b + lane at x[i, blk, :, lane])
 *   shift  float64 buffer (c,)        K, subtracted before summing
 *   s1, s2 writable float64 (n, c)    s1[i, ch] = sum_j (x[i, ch, j] - K[ch]),  s2[i, ch] = sum_j (...)^2
 * The GIL is released, so several threads can work on different sample ranges. A blocked tensor is
 * read in memory order (all b lanes of a position together), so the one pass stays sequential; the
 * b accumulators per block are independent, so each sum is still taken in position order.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static void row_sums(const float *row, Py_ssize_t l, double k, double *sum, double *sumsq)
{
    /* Four independent accumulators: instruction-level parallelism without reassociating
     * a single chain (the order is fixed, so results are deterministic). */
    double a0 = 0, a1 = 0, a2 = 0, a3 = 0, q0 = 0, q1 = 0, q2 = 0, q3 = 0;
    Py_ssize_t j = 0;
    for (; j + 4 <= l; j += 4) {
        double d0 = (double)row[j] - k, d1 = (double)row[j + 1] - k;
        double d2 = (double)row[j + 2] - k, d3 = (double)row[j + 3] - k;
        a0 += d0; a1 += d1; a2 += d2; a3 += d3;
        q0 += d0 * d0; q1 += d1 * d1; q2 += d2 * d2; q3 += d3 * d3;
    }
    for (; j < l; j++) {
        double d = (double)row[j] - k;
        a0 += d;
        q0 += d * d;
    }
    *sum += (a0 + a1) + (a2 + a3);
    *sumsq += (q0 + q1) + (q2 + q3);
}

static void plain_sums(const float *x, const double *k, double *s1, double *s2, Py_ssize_t n, Py_ssize_t c,
                       Py_ssize_t l)
{
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t ch = 0; ch < c; ch++) {
            Py_ssize_t r = i * c + ch;
            s1[r] = 0;
            s2[r] = 0;
            row_sums(x + r * l, l, k[ch], &s1[r], &s2[r]);
        }
}

static void block_sums(const float *x, const double *k, double *s1, double *s2, Py_ssize_t n, Py_ssize_t cb,
                       Py_ssize_t l, Py_ssize_t b)
{
    for (Py_ssize_t i = 0; i < n; i++)
        for (Py_ssize_t blk = 0; blk < cb; blk++) {
            double a[64], q[64];
            const double *kk = k + blk * b;
            const float *p = x + (i * cb + blk) * l * b;
            for (Py_ssize_t lane = 0; lane < b; lane++)
                a[lane] = q[lane] = 0;
            for (Py_ssize_t j = 0; j < l; j++, p += b)
                for (Py_ssize_t lane = 0; lane < b; lane++) {
                    double d = (double)p[lane] - kk[lane];
                    a[lane] += d;
                    q[lane] += d * d;
                }
            for (Py_ssize_t lane = 0; lane < b; lane++) {
                s1[(i * cb + blk) * b + lane] = a[lane];
                s2[(i * cb + blk) * b + lane] = q[lane];
            }
        }
}

static PyObject *sample_sums_f32(PyObject *self, PyObject *args)
{
    Py_buffer xb, kb, s1b, s2b;
    Py_ssize_t n, c, l, b;
    if (!PyArg_ParseTuple(args, "y*y*w*w*nnnn", &xb, &kb, &s1b, &s2b, &n, &c, &l, &b))
        return NULL;
    PyObject *result = NULL;
    if (n < 0 || c < 0 || l < 0 || b < 1 || b > 64 || c % b || xb.len != (Py_ssize_t)sizeof(float) * n * c * l ||
        kb.len != (Py_ssize_t)sizeof(double) * c || s1b.len != (Py_ssize_t)sizeof(double) * n * c ||
        s2b.len != s1b.len) {
        PyErr_SetString(PyExc_ValueError, "sample_sums_f32: buffer sizes do not match (n, c, l, b)");
        goto done;
    }
    const float *x = (const float *)xb.buf;
    const double *k = (const double *)kb.buf;
    double *s1 = (double *)s1b.buf, *s2 = (double *)s2b.buf;
    Py_BEGIN_ALLOW_THREADS
    if (b == 1)
        plain_sums(x, k, s1, s2, n, c, l);
    else
        block_sums(x, k, s1, s2, n, c / b, l, b);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&xb);
    PyBuffer_Release(&kb);
    PyBuffer_Release(&s1b);
    PyBuffer_Release(&s2b);
    return result;
}

static PyMethodDef methods[] = {
    {"sample_sums_f32", sample_sums_f32, METH_VARARGS,
     "sample_sums_f32(x, shift, s1, s2, n, c, l, b): s1[i,c] = sum(x[i,c]-K[c]), s2[i,c] = sum((x[i,c]-K[c])^2), "
     "float64; x plain (b = 1) or in blocks of b channels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_moments", NULL, -1, methods};

PyMODINIT_FUNC PyInit__moments(void) { return PyModule_Create(&module); }
