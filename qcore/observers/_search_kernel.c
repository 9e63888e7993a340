/*
 * qcore.observers._search_kernel: the estimated range search of histogram_search.py, compiled.
 *
 * search(counts, total, bin_width, dst_nbins, alphas, betas,
 *        bound_margin, sum_tolerance, coarse_tolerance) -> (start_bin, end_bin) | None
 *
 * It walks torch.ao's candidate ranges exactly as histogram_search.candidate_ranges does (the
 * same float32 quantile thresholds, the same binary searches on the cumulative histogram) and
 * decides each step on the float64 estimate of EstimatedErrors (the closed form over the bin
 * edges), one candidate at a time. Where two neighbouring estimates are within
 * coarse_tolerance, it computes both bounds and trusts the estimates only if they differ by
 * more than bound_margin bounds plus sum_tolerance of the errors. It returns None when a step
 * is too close to call or an estimate is not finite: the caller then searches in Python, with
 * torch.ao's exact float32 errors at the near tie.
 *
 * Arguments: counts is the histogram (a float32 buffer, one element per bin), total its
 * torch.sum, alphas and betas float64 buffers of quantile_steps(). The cumulative histogram is
 * torch.cumsum's: a float64 running sum rounded to float32 at every bin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>

static const double FLOAT32_EPS = 5.9604644775390625e-08; /* 2^-24 */

typedef struct {
    double *jump;  /* per edge: density left of it minus density right of it */
    double *touch; /* per edge: density left of it plus density right of it */
    Py_ssize_t edges;
    double bin_width;
    double dst_nbins;
} Edges;

/* Round to the nearest integer, ties to even, for |x| < 2^51: adding and subtracting 1.5 * 2^52
 * leaves the integer part (plain arithmetic: no libm call in the loops below). */
static inline double round_to_integer(double x)
{
    const double shift = 6755399441055744.0;
    return (x + shift) - shift;
}

/* The destination bin k = clamp(rint(t - 1/2)) of an edge and its distance u from the bin's
 * centre, t = (m - start) * scale in destination bins (t - 1/2 = m * scale - offset). */
#define EDGE_TERMS                                 \
    double u = (double)m * scale - offset;         \
    const double r = round_to_integer(u);          \
    const double k = r < 0.0 ? 0.0 : (r > top ? top : r); \
    u -= k;                                        \
    const double u_squared = u * u;

/* The estimated error of the range [start, end] (EstimatedErrors in histogram_search.py):
 * D^3 * (k @ jumps / 12 + u^3 @ jumps / 3). Edges without data on either side add 0. */
static double estimate(const Edges *h, Py_ssize_t start, Py_ssize_t end)
{
    const double n = h->dst_nbins, top = n - 1.0;
    const double length = (double)(end - start + 1);
    const double scale = n / length, offset = (double)start * scale + 0.5;
    /* four partial sums (edges m mod 4): independent additions keep the pipeline busy */
    double k_sums[4] = {0.0, 0.0, 0.0, 0.0}, cube_sums[4] = {0.0, 0.0, 0.0, 0.0};
    for (Py_ssize_t m = 0; m < h->edges; m++) {
        EDGE_TERMS
        k_sums[m & 3] += k * h->jump[m];
        cube_sums[m & 3] += u_squared * u * h->jump[m];
    }
    const double k_sum = (k_sums[0] + k_sums[1]) + (k_sums[2] + k_sums[3]);
    const double cube_sum = (cube_sums[0] + cube_sums[1]) + (cube_sums[2] + cube_sums[3]);
    const double width = h->bin_width * length / n;
    return width * width * width * (k_sum / 12.0 + cube_sum / 3.0);
}

/* The bound of that estimate: D^3 * eps * (|u|^3 + u^2 * |t|) @ touching, t = u + k + 1/2. */
static double bound_of(const Edges *h, Py_ssize_t start, Py_ssize_t end)
{
    const double n = h->dst_nbins, top = n - 1.0;
    const double length = (double)(end - start + 1);
    const double scale = n / length, offset = (double)start * scale + 0.5;
    double bound_sum = 0.0;
    for (Py_ssize_t m = 0; m < h->edges; m++) {
        EDGE_TERMS
        bound_sum += h->touch[m] * (u_squared * fabs(u) + u_squared * fabs(u + k + 0.5));
    }
    const double width = h->bin_width * length / n;
    return width * width * width * FLOAT32_EPS * bound_sum;
}

/* First index i in [lo, hi) with cum[i] >= x (bisect.bisect_left), else hi. */
static Py_ssize_t bisect_left(const float *cum, double x, Py_ssize_t lo, Py_ssize_t hi)
{
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if ((double)cum[mid] < x) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* First index i in [lo, hi) with cum[i] > x (bisect.bisect_right), else hi. */
static Py_ssize_t bisect_right(const float *cum, double x, Py_ssize_t lo, Py_ssize_t hi)
{
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (x < (double)cum[mid]) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo;
}

/* float32(value) as a double: how torch.ao's thresholds are rounded. */
static double to_float32(double value)
{
    return (double)(float)value;
}

/* The smallest k in [first, last] with float32(betas[k] * total) < count, else last + 1 (the
 * thresholds only decrease with k, so the condition holds from some k on). */
static Py_ssize_t first_step_below(const double *betas, Py_ssize_t first, Py_ssize_t last, double total,
                                   double count)
{
    Py_ssize_t lo = first, hi = last + 1;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (to_float32(betas[mid] * total) < count) {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    return lo;
}

static PyObject *search(PyObject *Py_UNUSED(module), PyObject *args)
{
    Py_buffer counts_buffer, alphas_buffer, betas_buffer;
    double total, bin_width, bound_margin, sum_tolerance, coarse_tolerance;
    int dst_nbins;
    if (!PyArg_ParseTuple(args, "y*ddiy*y*ddd", &counts_buffer, &total, &bin_width, &dst_nbins,
                          &alphas_buffer, &betas_buffer, &bound_margin, &sum_tolerance, &coarse_tolerance)) {
        return NULL;
    }
    PyObject *result = NULL;
    Edges h = {NULL, NULL, 0, bin_width, (double)dst_nbins};
    float *cum = NULL;
    const Py_ssize_t bins = counts_buffer.len / (Py_ssize_t)sizeof(float);
    const Py_ssize_t steps = alphas_buffer.len / (Py_ssize_t)sizeof(double);
    if (bins < 1 || betas_buffer.len != alphas_buffer.len || steps < 2 ||
        dst_nbins < 1) {
        PyErr_SetString(PyExc_ValueError,
                        "search: counts needs one float32 per bin (at least one bin), alphas and betas "
                        "the same number of float64 steps (at least two), dst_nbins >= 1");
        goto done;
    }
    const float *counts = (const float *)counts_buffer.buf;
    const double *alphas = (const double *)alphas_buffer.buf;
    const double *betas = (const double *)betas_buffer.buf;

    h.edges = bins + 1;
    h.jump = (double *)malloc(sizeof(double) * (size_t)h.edges);
    h.touch = (double *)malloc(sizeof(double) * (size_t)h.edges);
    cum = (float *)malloc(sizeof(float) * (size_t)bins);
    if (h.jump == NULL || h.touch == NULL || cum == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    double running = 0.0; /* torch.cumsum of float32: a float64 running sum, rounded per bin */
    for (Py_ssize_t i = 0; i < bins; i++) {
        running += (double)counts[i];
        cum[i] = (float)running;
    }
    double density_left = 0.0; /* of edge m: counts / bin_width, as the numpy search computes it */
    for (Py_ssize_t m = 0; m < h.edges; m++) {
        const double density_right = m < bins ? (double)counts[m] / bin_width : 0.0;
        h.jump[m] = density_left - density_right;
        h.touch[m] = density_left + density_right;
        density_left = density_right;
    }

    /* torch.ao's loop: candidate ranges in order, stop at the first error above the previous */
    const Py_ssize_t last = steps - 1;
    Py_ssize_t a = 0, b = 0, start = 0, end = bins - 1;
    Py_ssize_t best_start = 0, best_end = bins - 1;
    double previous = INFINITY;
    int have_previous = 0;
    while (alphas[a] < betas[b] && a < last && b < last) {
        const double alpha_threshold = to_float32(alphas[a + 1] * total);
        const double beta_threshold = to_float32(betas[b + 1] * total);
        const Py_ssize_t left = bisect_left(cum, alpha_threshold, start, end);
        const Py_ssize_t right = bisect_right(cum, beta_threshold, start + 1, end + 1) - 1;
        if (left - start > end - right) {
            start = left;
            a += 1;
        } else if (right < end) {
            end = right;
            b += 1;
        } else {
            /* neither bin moves: jump to the first beta step that moves the end bin */
            if (start == end) {
                break;
            }
            b = first_step_below(betas, b + 1, last, total, (double)cum[end]) - 1;
            continue;
        }
        const double error = estimate(&h, start, end);
        if (!isfinite(error)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        const double difference = fabs(error - previous);
        if (have_previous && difference <= coarse_tolerance * fmax(error, previous)) {
            const double previous_bound = bound_of(&h, best_start, best_end);
            const double bound = bound_of(&h, start, end);
            const double slack = bound_margin * (previous_bound + bound) + sum_tolerance * (fabs(previous) + fabs(error));
            if (!isfinite(slack) || difference <= slack) {
                result = Py_NewRef(Py_None); /* too close to call: torch.ao's own float32 errors decide */
                goto done;
            }
        }
        if (error > previous) {
            break;
        }
        previous = error;
        have_previous = 1;
        best_start = start;
        best_end = end;
    }
    result = Py_BuildValue("(nn)", best_start, best_end);

done:
    free(h.jump);
    free(h.touch);
    free(cum);
    PyBuffer_Release(&counts_buffer);
    PyBuffer_Release(&alphas_buffer);
    PyBuffer_Release(&betas_buffer);
    return result;
}

static PyMethodDef methods[] = {
    {"search", search, METH_VARARGS,
     "search(counts, total, bin_width, dst_nbins, alphas, betas, bound_margin, sum_tolerance, "
     "coarse_tolerance) -> (start_bin, end_bin) or None (a near tie or a non-finite estimate)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_search_kernel",
    "The estimated histogram range search of qcore.observers.histogram_search, compiled.", -1, methods,
};

PyMODINIT_FUNC PyInit__search_kernel(void)
{
    return PyModule_Create(&module);
}
