/* OpenCV's Canny of a 3-channel image (L1 gradient, 3x3 Sobel), fused into one compiled pass, bit for bit.
 *
 * cv2.Canny on a colour image takes, per pixel, the 3x3 Sobel dx, dy of each channel (border replicated), the L1
 * magnitude |dx| + |dy|, and the dx, dy, magnitude of the channel with the largest magnitude (the first on ties);
 * then non-maximum suppression (NMS) and hysteresis. canny_edges does all of it row by row: the gradients of row
 * y+1 go into a ring of three rows, so NMS of row y runs while its neighbours are in cache, with no full-size
 * gradient or magnitude image. NMS writes OpenCV's map (0 = weak candidate, 1 = not an edge, 2 = edge) and stacks
 * the strong pixels; hysteresis grows edges from them through 8-connected candidates (its result does not depend
 * on the order, so it equals OpenCV's striped parallel version); the map becomes the H x W x channels output.
 *
 * The row steps have an AVX2 version (16 pixels per instruction, chosen at run time) and a scalar one, with the
 * same results. conditions/canny.py calls canny_edges through ctypes and tests/conditions/test_conditions.py compares it with
 * cv2.Canny; without a compiler, canny.py falls back to OpenCV/numpy calls. Built by setup.py as the extension
 * module conditions._canny_kernel; the module itself is empty.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
#endif

typedef int16_t s16;
#define CANNY_SHIFT 15
#define TG22 13573 /* (int)(tan(22.5 deg) * 2^15 + 0.5), as OpenCV */
#define PAD 16     /* elements of padding on both sides of each ring row, so vector loads at x-1 .. x+16 stay inside */

/* Scalar steps: the image borders, and everything where AVX2 is missing. */

/* rows[c][k]: channel c, rows y-1, y, y+1 (replicated at the image edges); left/right: x-1 and x+1, clamped. */
static inline void gradient_at(const uint8_t *const rows[3][3], int left, int x, int right, s16 *dx, s16 *dy,
                               s16 *magnitude) {
    int best = -1;
    for (int c = 0; c < 3; c++) {
        const uint8_t *up = rows[c][0], *mid = rows[c][1], *down = rows[c][2];
        int gx = (up[right] - up[left]) + 2 * (mid[right] - mid[left]) + (down[right] - down[left]);
        int gy = (down[left] - up[left]) + 2 * (down[x] - up[x]) + (down[right] - up[right]);
        int m = abs(gx) + abs(gy);
        if (m > best) { /* strictly larger: the first channel wins ties */
            best = m;
            dx[x] = (s16)gx;
            dy[x] = (s16)gy;
            magnitude[x] = (s16)m;
        }
    }
}

static void gradient_row_scalar(const uint8_t *const rows[3][3], s16 *dx, s16 *dy, s16 *magnitude, int x0, int x1) {
    for (int x = x0; x < x1; x++) gradient_at(rows, x - 1, x, x + 1, dx, dy, magnitude);
}

/* OpenCV's NMS at x: a local maximum along the gradient direction (quantised to 0, 45, 90, 135 degrees). */
static inline uint8_t nms_at(const s16 *up, const s16 *mid, const s16 *down, const s16 *dx, const s16 *dy, int x,
                             int low, int high) {
    int m = mid[x];
    if (m <= low) return 1;
    int gx = dx[x], gy = dy[x], ax = abs(gx), ay = abs(gy) << CANNY_SHIFT, tg22x = ax * TG22, peak;
    if (ay < tg22x) {
        peak = m > mid[x - 1] && m >= mid[x + 1];
    } else if (ay > tg22x + (ax << (CANNY_SHIFT + 1))) {
        peak = m > up[x] && m >= down[x];
    } else {
        int s = (gx ^ gy) < 0 ? -1 : 1;
        peak = m > up[x - s] && m > down[x + s];
    }
    return !peak ? 1 : m > high ? 2 : 0;
}

static uint8_t **nms_row_scalar(const s16 *up, const s16 *mid, const s16 *down, const s16 *dx, const s16 *dy,
                                uint8_t *map, int width, int low, int high, uint8_t **top) {
    for (int x = 0; x < width; x++) {
        map[x] = nms_at(up, mid, down, dx, dy, x, low, high);
        if (map[x] == 2) *top++ = map + x;
    }
    return top;
}

static void split_row_scalar(const uint8_t *rgb, uint8_t *r, uint8_t *g, uint8_t *b, int width) {
    for (int x = 0; x < width; x++) r[x] = rgb[3 * x], g[x] = rgb[3 * x + 1], b[x] = rgb[3 * x + 2];
}

static void output_row_scalar(const uint8_t *map, uint8_t *out, int channels, int x0, int x1) {
    for (int x = x0; x < x1; x++)
        for (int c = 0; c < channels; c++) out[x * channels + c] = (uint8_t)-(map[x] == 2);
}

#ifdef HAVE_AVX2_PATH
#define AVX2 __attribute__((target("avx2")))

AVX2 static inline __m256i widen(const uint8_t *p) { return _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p)); }

/* Sobel dx, dy and L1 magnitude of one channel at 16 pixels from x (up, mid, down already point at x). */
AVX2 static inline void sobel16(const uint8_t *up, const uint8_t *mid, const uint8_t *down, __m256i *dx, __m256i *dy,
                                __m256i *magnitude) {
    __m256i ul = widen(up - 1), ur = widen(up + 1), dl = widen(down - 1), dr = widen(down + 1);
    __m256i side = _mm256_sub_epi16(widen(mid + 1), widen(mid - 1));
    __m256i centre = _mm256_sub_epi16(widen(down), widen(up));
    *dx = _mm256_add_epi16(_mm256_sub_epi16(_mm256_add_epi16(ur, dr), _mm256_add_epi16(ul, dl)),
                           _mm256_add_epi16(side, side));
    *dy = _mm256_add_epi16(_mm256_sub_epi16(_mm256_add_epi16(dl, dr), _mm256_add_epi16(ul, ur)),
                           _mm256_add_epi16(centre, centre));
    *magnitude = _mm256_add_epi16(_mm256_abs_epi16(*dx), _mm256_abs_epi16(*dy));
}

AVX2 static inline void gradient16(const uint8_t *const rows[3][3], s16 *dx, s16 *dy, s16 *magnitude, int x) {
    __m256i best_dx, best_dy, best, cdx, cdy, cm;
    sobel16(rows[0][0] + x, rows[0][1] + x, rows[0][2] + x, &best_dx, &best_dy, &best);
    for (int c = 1; c < 3; c++) {
        sobel16(rows[c][0] + x, rows[c][1] + x, rows[c][2] + x, &cdx, &cdy, &cm);
        __m256i wins = _mm256_cmpgt_epi16(cm, best); /* strictly: the first channel keeps ties */
        best_dx = _mm256_blendv_epi8(best_dx, cdx, wins);
        best_dy = _mm256_blendv_epi8(best_dy, cdy, wins);
        best = _mm256_max_epi16(best, cm);
    }
    _mm256_storeu_si256((__m256i *)(dx + x), best_dx);
    _mm256_storeu_si256((__m256i *)(dy + x), best_dy);
    _mm256_storeu_si256((__m256i *)(magnitude + x), best);
}

/* x in [1, width-1): 16 at a time, the last block shifted left to end at width-1 (recomputing a few pixels). */
AVX2 static void gradient_row_avx2(const uint8_t *const rows[3][3], s16 *dx, s16 *dy, s16 *magnitude, int width) {
    int last = width - 1 - 16;
    if (last < 1) {
        gradient_row_scalar(rows, dx, dy, magnitude, 1, width - 1);
        return;
    }
    for (int x = 1; x < last; x += 16) gradient16(rows, dx, dy, magnitude, x);
    gradient16(rows, dx, dy, magnitude, last);
}

/* NMS of 16 pixels at a time over [0, padded width), branch-free apart from skipping blocks with no magnitude above
 * low (most of a photo). Beyond the image the magnitude rows are 0, so those pixels come out 1 and are not stacked.
 * The angle tests need 32 bits: D = ax*TG22 - ay*2^15 from one madd of (ax, ay) pairs; horizontal where D > 0
 * (ay*2^15 < ax*TG22), vertical where D + ax*2^16 < 0 (ay*2^15 > ax*(TG22 + 2^16)), diagonal otherwise. */
AVX2 static uint8_t **nms_row_avx2(const s16 *up, const s16 *mid, const s16 *down, const s16 *dx, const s16 *dy,
                                   uint8_t *map, int padded_width, int low, int high, uint8_t **top) {
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi16(1);
    const __m256i vlow = _mm256_set1_epi16((s16)(low < 32767 ? low : 32767));
    const __m256i vhigh = _mm256_set1_epi16((s16)(high < 32767 ? high : 32767));
    const __m256i tangents = _mm256_set1_epi32((int32_t)(TG22 | (0x8000u << 16))); /* (TG22, -2^15) */
    const __m128i not_edge = _mm_set1_epi8(1), edge = _mm_set1_epi8(2);
#define LOAD(p) _mm256_loadu_si256((const __m256i *)(p))
    for (int x = 0; x < padded_width; x += 16) {
        __m256i m = LOAD(mid + x), candidate = _mm256_cmpgt_epi16(m, vlow);
        if (_mm256_testz_si256(candidate, candidate)) {
            _mm_storeu_si128((__m128i *)(map + x), not_edge);
            continue;
        }
        __m256i gx = LOAD(dx + x), gy = LOAD(dy + x), ax = _mm256_abs_epi16(gx), ay = _mm256_abs_epi16(gy);
        __m256i d_lo = _mm256_madd_epi16(_mm256_unpacklo_epi16(ax, ay), tangents);
        __m256i d_hi = _mm256_madd_epi16(_mm256_unpackhi_epi16(ax, ay), tangents);
        __m256i horizontal = _mm256_packs_epi32(_mm256_cmpgt_epi32(d_lo, zero), _mm256_cmpgt_epi32(d_hi, zero));
        __m256i v_lo = _mm256_add_epi32(d_lo, _mm256_unpacklo_epi16(zero, ax)); /* + ax << 16 */
        __m256i v_hi = _mm256_add_epi32(d_hi, _mm256_unpackhi_epi16(zero, ax));
        __m256i vertical = _mm256_packs_epi32(_mm256_cmpgt_epi32(zero, v_lo), _mm256_cmpgt_epi32(zero, v_hi));
        __m256i anti = _mm256_cmpgt_epi16(zero, _mm256_xor_si256(gx, gy)); /* signs differ: s = -1 */
        /* The two neighbours to beat: diagonal (up x-s, down x+s), replaced by vertical, then by horizontal. */
        __m256i first = _mm256_blendv_epi8(LOAD(up + x - 1), LOAD(up + x + 1), anti);
        __m256i second = _mm256_blendv_epi8(LOAD(down + x + 1), LOAD(down + x - 1), anti);
        first = _mm256_blendv_epi8(_mm256_blendv_epi8(first, LOAD(up + x), vertical), LOAD(mid + x - 1), horizontal);
        second = _mm256_blendv_epi8(_mm256_blendv_epi8(second, LOAD(down + x), vertical), LOAD(mid + x + 1), horizontal);
        /* horizontal and vertical compare >= with the second neighbour: m >= s is m > s - 1 */
        second = _mm256_add_epi16(second, _mm256_or_si256(horizontal, vertical));
        __m256i peak = _mm256_and_si256(candidate, _mm256_and_si256(_mm256_cmpgt_epi16(m, first),
                                                                      _mm256_cmpgt_epi16(m, second)));
        __m256i strong = _mm256_and_si256(peak, _mm256_cmpgt_epi16(m, vhigh));
        /* 1 + peak - 2 * strong with masks of -1: 1 not an edge, 0 candidate, 2 edge */
        __m256i value = _mm256_sub_epi16(_mm256_add_epi16(one, peak), _mm256_add_epi16(strong, strong));
        __m128i packed = _mm_packs_epi16(_mm256_castsi256_si128(value), _mm256_extracti128_si256(value, 1));
        _mm_storeu_si128((__m128i *)(map + x), packed);
        if (!_mm256_testz_si256(strong, strong)) {
            unsigned bits = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(packed, edge));
            for (; bits; bits &= bits - 1) *top++ = map + x + __builtin_ctz(bits);
        }
    }
#undef LOAD
    return top;
}

/* 255 where the map is 2, else 0, repeated to `channels` bytes per pixel; the last block shifted to end at width. */
AVX2 static void output_row_avx2(const uint8_t *map, uint8_t *out, int channels, int width) {
    if (width < 16) {
        output_row_scalar(map, out, channels, 0, width);
        return;
    }
    const __m128i edge = _mm_set1_epi8(2);
    const __m128i spread0 = _mm_setr_epi8(0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5);
    const __m128i spread1 = _mm_setr_epi8(5, 5, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10);
    const __m128i spread2 = _mm_setr_epi8(10, 11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15, 15, 15);
    for (int x = 0;; x += 16) {
        if (x > width - 16) x = width - 16;
        __m128i e = _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(map + x)), edge);
        if (channels == 1) {
            _mm_storeu_si128((__m128i *)(out + x), e);
        } else {
            __m128i *o = (__m128i *)(out + 3 * x);
            _mm_storeu_si128(o, _mm_shuffle_epi8(e, spread0));
            _mm_storeu_si128(o + 1, _mm_shuffle_epi8(e, spread1));
            _mm_storeu_si128(o + 2, _mm_shuffle_epi8(e, spread2));
        }
        if (x == width - 16) break;
    }
}

/* One row of the interleaved RGB image into three planes, 16 pixels (48 bytes) at a time: each plane's bytes
 * gathered from the three 16-byte blocks by byte shuffles (-1 gives 0) and or-ed; the last block shifted left. */
AVX2 static void split_row_avx2(const uint8_t *rgb, uint8_t *r, uint8_t *g, uint8_t *b, int width) {
    static const int8_t masks[3][3][16] = {
        /* red: bytes 0, 3, .. 45 */
        {{0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 1, 4, 7, 10, 13}},
        /* green: bytes 1, 4, .. 46 */
        {{1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 2, 5, 8, 11, 14}},
        /* blue: bytes 2, 5, .. 47 */
        {{2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, 1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1},
         {-1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 3, 6, 9, 12, 15}}};
    if (width < 16) {
        split_row_scalar(rgb, r, g, b, width);
        return;
    }
    __m128i m[3][3];
    for (int c = 0; c < 3; c++)
        for (int k = 0; k < 3; k++) m[c][k] = _mm_loadu_si128((const __m128i *)masks[c][k]);
    uint8_t *planes[3] = {r, g, b};
    for (int x = 0;; x += 16) {
        if (x > width - 16) x = width - 16;
        const __m128i *p = (const __m128i *)(rgb + 3 * x);
        __m128i block0 = _mm_loadu_si128(p), block1 = _mm_loadu_si128(p + 1), block2 = _mm_loadu_si128(p + 2);
        for (int c = 0; c < 3; c++)
            _mm_storeu_si128((__m128i *)(planes[c] + x),
                             _mm_or_si128(_mm_or_si128(_mm_shuffle_epi8(block0, m[c][0]), _mm_shuffle_epi8(block1, m[c][1])),
                                          _mm_shuffle_epi8(block2, m[c][2])));
        if (x == width - 16) break;
    }
}
#endif

/* Scratch layout, all from one buffer the caller allocates (canny_scratch_bytes) and reuses per thread. */
typedef struct {
    size_t padded, row, map, magnitude, gradient, planes, stack, total;
} Layout;

static Layout layout(int height, int width) {
    Layout l;
    l.padded = ((size_t)width + 15) & ~(size_t)15; /* NMS runs over whole blocks of 16 */
    l.row = l.padded + 2 * PAD;                     /* elements of one padded row */
    size_t offset = 0;
#define TAKE(field, bytes) (l.field = offset, offset += ((bytes) + 63) & ~(size_t)63)
    TAKE(map, (size_t)(height + 2) * l.row);     /* uint8 map with a border row above and below */
    TAKE(magnitude, 4 * l.row * sizeof(s16));    /* ring of 3 rows + a row of zeros (outside the image) */
    TAKE(gradient, 6 * l.row * sizeof(s16));     /* rings of 3 dx rows and 3 dy rows */
    TAKE(planes, 9 * l.row);                     /* ring of 3 rows of each of the 3 planes */
    TAKE(stack, (size_t)height * width * sizeof(uint8_t *)); /* each pixel becomes an edge at most once */
#undef TAKE
    l.total = offset + 64; /* room to align the start */
    return l;
}

size_t canny_scratch_bytes(int height, int width) { return layout(height, width).total; }

int canny_scalar_only = 0; /* tests set it through ctypes to check the scalar steps on an AVX2 machine */

/* image: H x W x 3 uint8, contiguous; out: H x W x channels uint8, contiguous (channels 1 or 3), 255 on edges and
 * 0 elsewhere; low <= high: OpenCV's integer thresholds; scratch: canny_scratch_bytes(height, width) bytes. */
void canny_edges(const uint8_t *image, int height, int width, int low, int high, uint8_t *out, int channels,
                 uint8_t *scratch) {
    if (height <= 0 || width <= 0) return;
    Layout l = layout(height, width);
    uint8_t *base = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
#ifdef HAVE_AVX2_PATH
    const int avx2 = !canny_scalar_only && __builtin_cpu_supports("avx2");
#endif
    const ptrdiff_t row = (ptrdiff_t)l.row;
    uint8_t *map = base + l.map + PAD; /* map row y (-1 .. height) starts at map + (y + 1) * row */
    s16 *magnitude = (s16 *)(base + l.magnitude) + PAD, *zeros = magnitude + 3 * row;
    s16 *dx = (s16 *)(base + l.gradient) + PAD, *dy = dx + 3 * row;
    uint8_t *planes = base + l.planes + PAD, **stack = (uint8_t **)(base + l.stack), **top = stack;
    memset(base + l.magnitude, 0, 4 * l.row * sizeof(s16)); /* the padding must read as magnitude 0 */
    memset(map - PAD, 1, row);
    memset(map - PAD + (ptrdiff_t)(height + 1) * row, 1, row);
#define PLANE(y, c) (planes + ((y) % 3 * 3 + (c)) * row)
#define RING(a, y) ((a) + (y) % 3 * row)
    void (*split_row)(const uint8_t *, uint8_t *, uint8_t *, uint8_t *, int) = split_row_scalar;
#ifdef HAVE_AVX2_PATH
    if (avx2) split_row = split_row_avx2;
#endif
    split_row(image, PLANE(0, 0), PLANE(0, 1), PLANE(0, 2), width);
    for (int y = -1; y < height; y++) {
        /* gradients of row y+1 (its planes y, y+1, y+2), then NMS of row y */
        int next = y + 1;
        if (next < height) {
            if (next + 1 < height)
                split_row(image + (size_t)(next + 1) * width * 3, PLANE(next + 1, 0), PLANE(next + 1, 1),
                          PLANE(next + 1, 2), width);
            int above = next > 0 ? next - 1 : 0, below = next + 1 < height ? next + 1 : height - 1;
            const uint8_t *rows[3][3];
            for (int c = 0; c < 3; c++) {
                rows[c][0] = PLANE(above, c);
                rows[c][1] = PLANE(next, c);
                rows[c][2] = PLANE(below, c);
            }
            s16 *gx = RING(dx, next), *gy = RING(dy, next), *m = RING(magnitude, next);
            gradient_at(rows, 0, 0, width > 1, gx, gy, m);
            if (width > 1) {
#ifdef HAVE_AVX2_PATH
                if (avx2)
                    gradient_row_avx2(rows, gx, gy, m, width);
                else
#endif
                    gradient_row_scalar(rows, gx, gy, m, 1, width - 1);
                gradient_at(rows, width - 2, width - 1, width - 1, gx, gy, m);
            }
        }
        if (y < 0) continue;
        const s16 *up = y > 0 ? RING(magnitude, y - 1) : zeros, *down = y + 1 < height ? RING(magnitude, y + 1) : zeros;
        uint8_t *map_row = map + (ptrdiff_t)(y + 1) * row;
#ifdef HAVE_AVX2_PATH
        if (avx2)
            top = nms_row_avx2(up, RING(magnitude, y), down, RING(dx, y), RING(dy, y), map_row, (int)l.padded, low,
                               high, top);
        else
#endif
            top = nms_row_scalar(up, RING(magnitude, y), down, RING(dx, y), RING(dy, y), map_row, width, low, high,
                                 top);
        map_row[-1] = map_row[width] = 1;
    }
#undef PLANE
#undef RING
    /* Hysteresis: candidates (0) 8-connected to an edge become edges. */
    while (top > stack) {
        uint8_t *p = *--top;
#define GROW(q)                                                                                                        \
    if (!*(q)) *(q) = 2, *top++ = (q);
        GROW(p - 1) GROW(p + 1) GROW(p - row - 1) GROW(p - row) GROW(p - row + 1) GROW(p + row - 1) GROW(p + row)
            GROW(p + row + 1)
#undef GROW
    }
    for (int y = 0; y < height; y++) {
        const uint8_t *map_row = map + (ptrdiff_t)(y + 1) * row;
        uint8_t *out_row = out + (size_t)y * width * channels;
#ifdef HAVE_AVX2_PATH
        if (avx2)
            output_row_avx2(map_row, out_row, channels, width);
        else
#endif
            output_row_scalar(map_row, out_row, channels, 0, width);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_canny_kernel",
                                    "canny_edges() and canny_scratch_bytes(), called through ctypes", -1, NULL};

PyMODINIT_FUNC PyInit__canny_kernel(void) { return PyModule_Create(&module); }
