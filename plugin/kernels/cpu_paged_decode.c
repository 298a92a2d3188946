/* One layer's decode step over the head-paged pool, on the CPU, in one call (plugin/kernels/cpu_decode.py).
 * Two entry points: `sparsemm_paged_decode_f32` (the transformers path: the new token goes into the pool) and
 * `sparsemm_pool_tail_decode_f32` (an engine's: the pool ⊕ a tail of tokens held in the engine's own buffer).
 *
 * For each sequence s (one (request, KV head)): write its new K/V token into its slot, then attend its `group`
 * query heads over exactly its own `lens[s]` tokens, page by page through its page table (the new token
 * included). Nothing is gathered into a workspace, no sequence is padded to the layer's longest, and no mask
 * is built: a sequence reads only the tokens it holds. Scores and softmax in fp32 (the pool is fp32).
 *
 * Layout (all contiguous, row-major):
 *   kv       [2][plane_tokens][dim]  the pool's K plane, then its V plane (token t of page p: p * page + t)
 *   table    [seqs][width]           page ids of each sequence's columns (only the first ceil(lens/page) read)
 *   q, out   [seqs][group][dim]      query heads s * group + g, as grouped-query attention orders them
 *   scratch  >= group * max(lens)    floats: one row of scores per query head
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

int64_t sparsemm_cpu_decode_abi(void) { return 3; }

/* A decode step's host bookkeeping: one more token everywhere in two length tables (a numpy in-place add costs
 * more than this whole call once a model's output layer has evicted numpy's code from the caches). */
void sparsemm_advance(int64_t *restrict a, int64_t n, int64_t *restrict b, int64_t m)
{
    for (int64_t i = 0; i < n; i++)
        a[i] += 1;
    for (int64_t i = 0; i < m; i++)
        b[i] += 1;
}

/* Pages are scattered, so the hardware prefetcher stops at every page end: software prefetches keep up to AHEAD
 * pages in flight (measured here with the caches cold, as after a model's output layer: 86 µs without, 56 with). */
#define AHEAD 32

static inline void prefetch_page(const float *page_start, int64_t floats)
{
    for (int64_t i = 0; i < floats; i += 16)
        __builtin_prefetch(page_start + i, 0, 3);
}

/* exp(x) for x <= 0, vectorisable (libm's expf is a scalar call, ~5 ns here, and the softmax takes one per score):
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n put into the exponent bits.
 * Relative error below 2e-6; inputs under -87 give exp(-87) ~ 1.6e-38 instead of a smaller number (a weight that
 * small next to the row's maximum, which is 1, vanishes in the sum either way). */
static inline float exp_nonpositive(float x)
{
    x = x < -87.0f ? -87.0f : x;
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The group's scaled scores of one key: scores[g * stride] = (q_g · key) · scale for each query g of the group. */
static inline void score_key(const float *restrict q, const float *restrict key, int64_t group, int64_t D,
                             float scale, float *restrict scores, int64_t stride)
{
    for (int64_t g = 0; g < group; g++) {
        const float *qg = q + g * D;
        float acc = 0.f;
        for (int64_t d = 0; d < D; d++)
            acc += qg[d] * key[d];
        scores[g * stride] = acc * scale;
    }
}

/* Each of the group's score rows (n scores) becomes its softmax in place; the group's outputs start at zero. */
static inline void softmax_rows(float *scores, int64_t group, int64_t n, float *out, int64_t D)
{
    for (int64_t g = 0; g < group; g++) {
        float *row = scores + g * n, top = -INFINITY, sum = 0.f;
        for (int64_t i = 0; i < n; i++)
            top = fmaxf(top, row[i]);
        for (int64_t i = 0; i < n; i++) {
            row[i] = exp_nonpositive(row[i] - top);
            sum += row[i];
        }
        float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int64_t i = 0; i < n; i++)
            row[i] *= inv;
        memset(out + g * D, 0, D * sizeof(float));
    }
}

/* One sequence: scores = scale * q @ K^T over its tokens, softmax per query head, out = p @ V. `D` is a
 * compile-time constant at the call sites that matter (so the dot products vectorize) or the run-time dim. */
static inline void attend_one(const float *restrict kp, const float *restrict vp, const float *restrict q,
                              const int64_t *restrict pages, int64_t n, int64_t group, const int64_t D,
                              int64_t page, float scale, float *restrict out, float *restrict scores)
{
    int64_t npages = (n + page - 1) / page;
    for (int64_t c = 0; c < npages && c < AHEAD; c++)
        prefetch_page(kp + pages[c] * page * D, page * D);
    for (int64_t c = 0, t = 0; c < npages; c++) {
        const float *base = kp + pages[c] * page * D;
        if (c + AHEAD < npages)
            prefetch_page(kp + pages[c + AHEAD] * page * D, page * D);
        prefetch_page(vp + pages[c] * page * D, page * D); /* V streams in while K is scored */
        int64_t m = n - t < page ? n - t : page;
        for (int64_t j = 0; j < m; j++, t++) {
            score_key(q, base + j * D, group, D, scale, scores + t, n);
        }
    }
    softmax_rows(scores, group, n, out, D);
    for (int64_t c = 0, t = 0; c < npages; c++) {
        const float *base = vp + pages[c] * page * D;
        if (c + AHEAD < npages) /* long sequences: the first V pages may have left the cache since */
            prefetch_page(vp + pages[c + AHEAD] * page * D, page * D);
        int64_t m = n - t < page ? n - t : page;
        for (int64_t j = 0; j < m; j++, t++) {
            const float *val = base + j * D;
            for (int64_t g = 0; g < group; g++) {
                float p = scores[g * n + t];
                float *o = out + g * D;
                for (int64_t d = 0; d < D; d++)
                    o[d] += p * val[d];
            }
        }
    }
}

void sparsemm_paged_decode_f32(float *restrict kv, int64_t plane_tokens, const int64_t *restrict write_slot,
                               const float *restrict k_new, const float *restrict v_new, const float *restrict q,
                               const int64_t *restrict table, int64_t width, const int64_t *restrict lens,
                               int64_t seqs, int64_t group, int64_t dim, int64_t page, float scale,
                               float *restrict out, float *restrict scratch)
{
    float *kp = kv, *vp = kv + plane_tokens * dim;
    for (int64_t s = 0; s < seqs; s++) {
        memcpy(kp + write_slot[s] * dim, k_new + s * dim, dim * sizeof(float));
        memcpy(vp + write_slot[s] * dim, v_new + s * dim, dim * sizeof(float));
    }
    for (int64_t s = 0; s < seqs; s++) {
        const float *qs = q + s * group * dim;
        float *os = out + s * group * dim;
        const int64_t *pages = table + s * width;
        if (dim == 32)
            attend_one(kp, vp, qs, pages, lens[s], group, 32, page, scale, os, scratch);
        else if (dim == 64)
            attend_one(kp, vp, qs, pages, lens[s], group, 64, page, scale, os, scratch);
        else if (dim == 128)
            attend_one(kp, vp, qs, pages, lens[s], group, 128, page, scale, os, scratch);
        else
            attend_one(kp, vp, qs, pages, lens[s], group, dim, page, scale, os, scratch);
    }
}

/* The pool ⊕ tail form (the attention contract's decode call): sequence s = (entry b, KV head h) attends its
 * `group` query heads over its pool tokens [skip[s], lens[s]) (`skip` NULL: from 0; a sliding-window head's ring
 * hides its oldest tokens this way), then the `tail_lens[b]` tokens of its entry's tail, read in place from the
 * engine's buffers `k_buf, v_buf [slots][hkv][dim]` at slots `tail_loc[b * tail_stride + t]`. Nothing before a
 * skip or past a length is read (an engine pads tails with freed slots). `scratch` >= group * max(lens + tail). */
static inline void attend_pool_tail(const float *restrict kp, const float *restrict vp, const float *restrict kb,
                                    const float *restrict vb, const float *restrict q, const int64_t *restrict pages,
                                    int64_t first, int64_t n, const int32_t *restrict loc, int64_t m, int64_t hkv, int64_t h,
                                    int64_t group, const int64_t D, int64_t page, float scale,
                                    float *restrict out, float *restrict scores)
{
    int64_t npages = (n + page - 1) / page, total = n + m, count = total - first;
    for (int64_t c = first / page; c < npages && c < first / page + AHEAD; c++)
        prefetch_page(kp + pages[c] * page * D, page * D);
    for (int64_t t = first; t < total; t++) {
        const float *key;
        if (t < n) {
            int64_t c = t / page;
            if (t % page == 0 && c + AHEAD < npages)
                prefetch_page(kp + pages[c + AHEAD] * page * D, page * D);
            key = kp + (pages[c] * page + t % page) * D;
        } else {
            key = kb + ((int64_t)loc[t - n] * hkv + h) * D;
        }
        score_key(q, key, group, D, scale, scores + (t - first), count);
    }
    softmax_rows(scores, group, count, out, D);
    for (int64_t t = first; t < total; t++) {
        const float *val = t < n ? vp + (pages[t / page] * page + t % page) * D
                                 : vb + ((int64_t)loc[t - n] * hkv + h) * D;
        for (int64_t g = 0; g < group; g++) {
            float p = scores[g * count + (t - first)];
            float *o = out + g * D;
            for (int64_t d = 0; d < D; d++)
                o[d] += p * val[d];
        }
    }
}

/* One sequence of the pool ⊕ tail form, its head dim a compile-time constant where it matters. Called with a literal
 * `first` of 0 when no sequence skips (the common case), so the compiler builds the loop without the skip's offsets. */
static inline void attend_pool_tail_dim(const float *restrict kp, const float *restrict vp, const float *restrict kb,
                                        const float *restrict vb, const float *restrict q,
                                        const int64_t *restrict pages, int64_t first, int64_t n,
                                        const int32_t *restrict loc, int64_t m, int64_t hkv, int64_t h, int64_t group,
                                        int64_t dim, int64_t page, float scale, float *restrict out,
                                        float *restrict scratch)
{
    if (dim == 64)
        attend_pool_tail(kp, vp, kb, vb, q, pages, first, n, loc, m, hkv, h, group, 64, page, scale, out, scratch);
    else if (dim == 128)
        attend_pool_tail(kp, vp, kb, vb, q, pages, first, n, loc, m, hkv, h, group, 128, page, scale, out, scratch);
    else
        attend_pool_tail(kp, vp, kb, vb, q, pages, first, n, loc, m, hkv, h, group, dim, page, scale, out, scratch);
}

void sparsemm_pool_tail_decode_f32(const float *restrict k_pages, const float *restrict v_pages,
                                   const int64_t *restrict table, int64_t width, const int64_t *restrict skip,
                                   const int64_t *restrict lens, const float *restrict k_buf, const float *restrict v_buf,
                                   const int32_t *restrict tail_loc, int64_t tail_stride,
                                   const int64_t *restrict tail_lens, const float *restrict q, int64_t seqs,
                                   int64_t hkv, int64_t group, int64_t dim, int64_t page, float scale,
                                   float *restrict out, float *restrict scratch)
{
    for (int64_t s = 0; s < seqs; s++) {
        int64_t b = s / hkv, h = s % hkv;
        const float *qs = q + s * group * dim;
        float *os = out + s * group * dim;
        const int64_t *pages = table + s * width;
        const int32_t *loc = tail_loc + b * tail_stride;
        int64_t m = tail_lens[b];
        if (skip == NULL) {
            attend_pool_tail_dim(k_pages, v_pages, k_buf, v_buf, qs, pages, 0, lens[s], loc, m, hkv, h, group, dim,
                                 page, scale, os, scratch);
        } else {
            int64_t first = skip[s] < lens[s] ? skip[s] : lens[s];
            attend_pool_tail_dim(k_pages, v_pages, k_buf, v_buf, qs, pages, first, lens[s], loc, m, hkv, h, group,
                                 dim, page, scale, os, scratch);
        }
    }
}
