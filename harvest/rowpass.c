/* The harvest-time statistics' one pass over a hook's rows, on a CPU (loaded by harvest/rowpass.py).
 *
 * Why C: torch.compile's loop for the same reductions walks each group of rows column block by column
 * block, GROUP rows at a time; on rows that are not in the cache it ran ~2.7x slower than this loop,
 * which reads them row after row, once, as they lie in memory (bench/statistics_overhead.py). It also
 * finds the top-k's candidates while each group is still in the L1 cache, where torch took some twenty
 * small ops per hook.
 *
 * Per column, over the rows in order: the float64 sum and sum of squares (a float32 value squared is
 * exact in float64, so each term carries no rounding; the sums are sequential, row by row, whatever the
 * vector width), the max |x| of each group of `group` rows and of the whole batch, the count of
 * |x| >= threshold, and, where `floor` is given, every entry with |x| strictly above its column's floor.
 * No -ffast-math: the compiler may not reorder a sum.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Returns the number of entries above the floor (those past `capacity` are counted, not written: call
 * again with room for them), or -1 when a sum is not finite (a NaN or an inf in the rows: the caller
 * counts them apart; every other output is then undefined). */
int64_t harvest_row_pass(const float *x, int64_t n, int64_t d, int64_t group, float threshold,
                         const float *floor, double *sum, double *sumsq, float *gmax, float *colmax,
                         int32_t *count_ge, int64_t *rows, int64_t *cols, float *values, int64_t capacity)
{
    int64_t found = 0;
    memset(sum, 0, (size_t)d * sizeof(double));
    memset(sumsq, 0, (size_t)d * sizeof(double));
    memset(colmax, 0, (size_t)d * sizeof(float));
    memset(count_ge, 0, (size_t)d * sizeof(int32_t));
    for (int64_t start = 0, g = 0; start < n; start += group, g++) {
        const int64_t end = start + group < n ? start + group : n;
        float *m = gmax + g * d;
        memset(m, 0, (size_t)d * sizeof(float));
        for (int64_t r = start; r < end; r++) {
            const float *row = x + r * d;
            for (int64_t c = 0; c < d; c++) {
                const float v = row[c];
                const double w = (double)v;
                const float a = fabsf(v);
                sum[c] += w;
                sumsq[c] += w * w;
                m[c] = a > m[c] ? a : m[c];
                count_ge[c] += a >= threshold;
            }
        }
        int any = 0;
        for (int64_t c = 0; c < d; c++) {
            colmax[c] = m[c] > colmax[c] ? m[c] : colmax[c];
            if (floor != NULL)
                any |= m[c] > floor[c];
        }
        if (!any)
            continue;
        for (int64_t c = 0; c < d; c++) {  /* the group's rows are still in the cache */
            if (!(m[c] > floor[c]))
                continue;
            for (int64_t r = start; r < end; r++) {
                const float v = x[r * d + c];
                if (fabsf(v) > floor[c]) {
                    if (found < capacity) {
                        rows[found] = r;
                        cols[found] = c;
                        values[found] = v;
                    }
                    found++;
                }
            }
        }
    }
    for (int64_t c = 0; c < d; c++)
        if (!isfinite(sum[c]))
            return -1;
    return found;
}
