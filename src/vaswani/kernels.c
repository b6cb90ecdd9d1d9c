/* Native kernels for one step of beam search on the CPU, compiled and loaded by vaswani/kernels.py.

   Speed machinery beside the paper's code: each function computes what a handful of torch operations compute over
   a few rows per sentence, in one pass over its inputs and without an operation's fixed cost per call. Tensors
   arrive as pointers with strides counted in elements; their last dimension is contiguous. Rows are shared among
   OpenMP threads: loaded into a process that runs torch, this library joins torch's own OpenMP runtime, so it
   follows torch.set_num_threads. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t idx;

/* Work (multiply-adds) below which a call runs on one thread: starting the others costs more. */
#define PARALLEL_WORK 32768

static inline float dot(const float *a, const float *b, int n) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* One query's products with four keys: four independent sums keep the vector units busy where one sum would wait
   on its own additions. */
static inline void dot4(const float *q, const float *k0, const float *k1, const float *k2, const float *k3, int n,
                        float *out) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int i = 0; i < n; i++) {
        s0 += q[i] * k0[i];
        s1 += q[i] * k1[i];
        s2 += q[i] * k2[i];
        s3 += q[i] * k3[i];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

/* e^x for x <= 0 (0 below -87, where float's normal range ends): e^x = 2^n e^r with n = round(x / ln 2), |r| <=
   ln 2 / 2, and e^r by its Taylor series to r^6 (relative error about 1e-7). Written without library calls so that
   the compiler can vectorize the loops that use it (given -fno-trapping-math: its comparisons may then run on
   every lane). */

static inline float exp_nonpositive(float x) {
    float clamped = x < -87.0f ? -87.0f : x;
    float n = floorf(clamped * 1.44269504088896341f + 0.5f);
    float r = clamped - n * 0.693145751953125f - n * 1.428606765330187045e-06f; /* ln 2 in two parts */
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_to_n;
    memcpy(&two_to_n, &bits, sizeof two_to_n);
    return x < -87.0f ? 0.0f : p * two_to_n;
}

static inline float row_max(const float *x, int n) {
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (int i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* e^(x_i - m) written over x; returns their sum. */
static inline float exp_in_place(float *x, int n, float m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) {
        x[i] = exp_nonpositive(x[i] - m);
        sum += x[i];
    }
    return sum;
}

static inline float sum_exp(const float *x, int n, float m) {
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int i = 0; i < n; i++) sum += exp_nonpositive(x[i] - m);
    return sum;
}

/* Eq. 1 for one query over n keys and values (rows of k and v at `offsets`): softmax(q K^T * scale) V into out.
   `allowed` (nonzero = attend, stride allowed_stride) or `additive` (added to the scores) may mask keys. */
static void attend_row(const float *q, const float *k, const float *v, const idx *offsets, int n,
                       const uint8_t *allowed, const float *additive, idx mask_stride, int d, float scale,
                       float *scores, float *out) {
    int p = 0;
    for (; p + 4 <= n; p += 4)
        dot4(q, k + offsets[p], k + offsets[p + 1], k + offsets[p + 2], k + offsets[p + 3], d, scores + p);
    for (; p < n; p++) scores[p] = dot(q, k + offsets[p], d);
    for (p = 0; p < n; p++) {
        scores[p] *= scale;
        if (allowed && !allowed[p * mask_stride]) scores[p] = -INFINITY;
        if (additive) scores[p] += additive[p * mask_stride];
    }
    float inverse = 1.0f / exp_in_place(scores, n, row_max(scores, n));
    memset(out, 0, sizeof(float) * d);
    for (p = 0; p + 4 <= n; p += 4) {
        const float *v0 = v + offsets[p], *v1 = v + offsets[p + 1], *v2 = v + offsets[p + 2], *v3 = v + offsets[p + 3];
        float w0 = scores[p] * inverse, w1 = scores[p + 1] * inverse, w2 = scores[p + 2] * inverse,
              w3 = scores[p + 3] * inverse;
#pragma omp simd
        for (int i = 0; i < d; i++) out[i] += w0 * v0[i] + w1 * v1[i] + w2 * v2[i] + w3 * v3[i];
    }
    for (; p < n; p++) {
        float w = scores[p] * inverse;
        const float *row = v + offsets[p];
#pragma omp simd
        for (int i = 0; i < d; i++) out[i] += w * row[i];
    }
}

/* Masked self-attention over beam slots (vaswani.decoding.IncrementalDecoder): the keys and values of every beam
   slot at every position, k[s, h, position, slot, :]; query b of sentence s attends, at each position p <
   positions, to slot ancestry[s, b, p] only, the one its own prefix held. */
void attend_slots(const float *q, idx qs, idx qh, idx qb, const float *k, const float *v, idx ks, idx kh, idx kp,
                  idx kslot, const int64_t *ancestry, idx as, idx ab, idx ap, float *out, idx os, idx oh, idx ob,
                  int sentences, int heads, int queries, int positions, int d, float scale) {
    long work = (long)sentences * heads * queries * positions * d;
#pragma omp parallel if (work > PARALLEL_WORK)
    {
        float *scores = malloc(sizeof(float) * positions);
        idx *offsets = malloc(sizeof(idx) * positions);
#pragma omp for collapse(2) schedule(static)
        for (int s = 0; s < sentences; s++) {
            for (int h = 0; h < heads; h++) {
                for (int b = 0; b < queries; b++) {
                    const int64_t *slots = ancestry + s * as + b * ab;
                    for (int p = 0; p < positions; p++) offsets[p] = s * ks + h * kh + p * kp + slots[p * ap] * kslot;
                    attend_row(q + s * qs + h * qh + b * qb, k, v, offsets, positions, NULL, NULL, 0, d, scale,
                               scores, out + s * os + h * oh + b * ob);
                }
            }
        }
        free(scores);
        free(offsets);
    }
}

/* Each sentence's queries over its own keys and values k[s, h, t, :] (encoder-decoder attention), masked by
   `allowed` or `additive` (strides ms, mh, mb, mt; NULL: no mask). */
void attend_keys(const float *q, idx qs, idx qh, idx qb, const float *k, const float *v, idx ks, idx kh, idx kt,
                 const uint8_t *allowed, const float *additive, idx ms, idx mh, idx mb, idx mt, float *out, idx os,
                 idx oh, idx ob, int sentences, int heads, int queries, int keys, int d, float scale) {
    long work = (long)sentences * heads * queries * keys * d;
#pragma omp parallel if (work > PARALLEL_WORK)
    {
        float *scores = malloc(sizeof(float) * keys);
        idx *offsets = malloc(sizeof(idx) * keys);
#pragma omp for collapse(2) schedule(static)
        for (int s = 0; s < sentences; s++) {
            for (int h = 0; h < heads; h++) {
                for (int t = 0; t < keys; t++) offsets[t] = s * ks + h * kh + t * kt;
                for (int b = 0; b < queries; b++) {
                    idx mask = s * ms + h * mh + b * mb;
                    attend_row(q + s * qs + h * qh + b * qb, k, v, offsets, keys, allowed ? allowed + mask : NULL,
                               additive ? additive + mask : NULL, mt, d, scale, scores,
                               out + s * os + h * oh + b * ob);
                }
            }
        }
        free(scores);
        free(offsets);
    }
}

/* Insert (value, column) into a row's k best so far (best first; an empty place has column -1). Among equal values
   the earlier column stays ahead. */
static inline void insert_best(float value, int64_t column, float *best, int64_t *columns, int k) {
    int place = k - 1;
    while (place > 0 && (columns[place - 1] < 0 || value > best[place - 1])) {
        best[place] = best[place - 1];
        columns[place] = columns[place - 1];
        place--;
    }
    best[place] = value;
    columns[place] = column;
}

/* Columns per block in the scan for each row's k best: a block is looked at one column at a time only where its
   largest value would enter them. */
#define TOP_K_BLOCK 64

/* Each row's log-softmax and its k best columns (§6.1's beam search): values[r, j] = x[r, c] - log sum_i e^x[r, i]
   for the k columns c with the largest x (best first), and normalizers[r] = log sum_i e^x[r, i]. Where skip[r] is
   nonzero, column skip_column is not among the k (it still counts in the sum). One pass finds the maximum, one
   sums the exponentials, and one keeps the k best, none writing a row back. */
void log_softmax_top_k(const float *logits, idx row_stride, int rows, int vocab, int k, const uint8_t *skip,
                       int64_t skip_column, float *values, int64_t *columns, float *normalizers) {
    long work = (long)rows * vocab;
#pragma omp parallel for schedule(static) if (work > PARALLEL_WORK)
    for (int r = 0; r < rows; r++) {
        const float *x = logits + r * row_stride;
        float *best = values + (idx)r * k;
        int64_t *chosen = columns + (idx)r * k;
        int64_t skipped = skip && skip[r] ? skip_column : -1;
        float m = row_max(x, vocab);
        float log_sum = logf(sum_exp(x, vocab, m));
        for (int j = 0; j < k; j++) best[j] = -INFINITY, chosen[j] = -1;
        for (int start = 0; start < vocab; start += TOP_K_BLOCK) {
            int end = start + TOP_K_BLOCK < vocab ? start + TOP_K_BLOCK : vocab;
            if (chosen[k - 1] >= 0 && row_max(x + start, end - start) <= best[k - 1]) continue;
            for (int c = start; c < end; c++)
                if (c != skipped && (chosen[k - 1] < 0 || x[c] > best[k - 1])) insert_best(x[c], c, best, chosen, k);
        }
        for (int j = 0; j < k; j++) {
            if (chosen[j] < 0) /* fewer than k columns to choose from: the skipped one, as -inf */
                chosen[j] = skipped, best[j] = -INFINITY;
            best[j] = (best[j] - m) - log_sum;
        }
        normalizers[r] = m + log_sum;
    }
}
