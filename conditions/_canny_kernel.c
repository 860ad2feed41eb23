/* The gradients OpenCV's Canny uses on a 3-channel image, in one pass over the three colour planes.
 *
 * For each pixel: the 3x3 Sobel dx, dy of each channel (border replicated), the L1 magnitude |dx| + |dy|, and the
 * dx, dy of the channel with the largest magnitude (the first channel on ties), as OpenCV's generic multi-channel
 * Canny does before non-maximum suppression. cv2.Canny(dx, dy, low, high) on the result equals cv2.Canny on the
 * RGB image, bit for bit (tests/test_conditions.py). conditions/canny.py calls canny_gradients through ctypes and
 * falls back to the same computation in OpenCV/numpy calls when this file was not compiled.
 *
 * Built by setup.py as the extension module conditions._canny_kernel; the module itself is empty.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* One row: up, mid, down are rows y-1, y, y+1 (replicated at the image edges) of one plane; x from x0 to x1-1 with
 * left/right neighbours at x-1 and x+1, which the caller keeps inside the row. */
static inline void sobel_at(const uint8_t *up, const uint8_t *mid, const uint8_t *down, int left, int x, int right,
                            int *dx, int *dy) {
    *dx = (up[right] - up[left]) + 2 * (mid[right] - mid[left]) + (down[right] - down[left]);
    *dy = (down[left] - up[left]) + 2 * (down[x] - up[x]) + (down[right] - up[right]);
}

static inline void choose(const uint8_t *const rows[3][3], int left, int x, int right, int16_t *dx_out,
                          int16_t *dy_out) {
    int best_dx, best_dy, dx, dy;
    sobel_at(rows[0][0], rows[0][1], rows[0][2], left, x, right, &best_dx, &best_dy);
    int best = abs(best_dx) + abs(best_dy);
    for (int c = 1; c < 3; c++) {
        sobel_at(rows[c][0], rows[c][1], rows[c][2], left, x, right, &dx, &dy);
        int magnitude = abs(dx) + abs(dy);
        if (magnitude > best) {
            best = magnitude;
            best_dx = dx;
            best_dy = dy;
        }
    }
    *dx_out = (int16_t)best_dx;
    *dy_out = (int16_t)best_dy;
}

typedef int16_t s16;
static inline s16 abs16(s16 v) { return v < 0 ? (s16)-v : v; }
/* x = 1 .. width-2 of one row, all in int16 with branchless selects, so that gcc -O3 vectorises it (SSE2:
 * 8 pixels per instruction); r0/r1/r2 are the rows above, at and below of the red plane, g and b likewise. */
__attribute__((target_clones("avx2", "default"))) static void interior(const uint8_t *restrict r0, const uint8_t *restrict r1, const uint8_t *restrict r2,
              const uint8_t *restrict g0, const uint8_t *restrict g1, const uint8_t *restrict g2,
              const uint8_t *restrict b0, const uint8_t *restrict b1, const uint8_t *restrict b2,
              s16 *restrict dx, s16 *restrict dy, int width) {
    for (int x = 1; x < width - 1; x++) {
        s16 rdx = (s16)((s16)r0[x + 1] - (s16)r0[x - 1] + 2 * ((s16)r1[x + 1] - (s16)r1[x - 1]) + (s16)r2[x + 1] - (s16)r2[x - 1]);
        s16 rdy = (s16)((s16)r2[x - 1] - (s16)r0[x - 1] + 2 * ((s16)r2[x] - (s16)r0[x]) + (s16)r2[x + 1] - (s16)r0[x + 1]);
        s16 gdx = (s16)((s16)g0[x + 1] - (s16)g0[x - 1] + 2 * ((s16)g1[x + 1] - (s16)g1[x - 1]) + (s16)g2[x + 1] - (s16)g2[x - 1]);
        s16 gdy = (s16)((s16)g2[x - 1] - (s16)g0[x - 1] + 2 * ((s16)g2[x] - (s16)g0[x]) + (s16)g2[x + 1] - (s16)g0[x + 1]);
        s16 bdx = (s16)((s16)b0[x + 1] - (s16)b0[x - 1] + 2 * ((s16)b1[x + 1] - (s16)b1[x - 1]) + (s16)b2[x + 1] - (s16)b2[x - 1]);
        s16 bdy = (s16)((s16)b2[x - 1] - (s16)b0[x - 1] + 2 * ((s16)b2[x] - (s16)b0[x]) + (s16)b2[x + 1] - (s16)b0[x + 1]);
        s16 rm = (s16)(abs16(rdx) + abs16(rdy)), gm = (s16)(abs16(gdx) + abs16(gdy)), bm = (s16)(abs16(bdx) + abs16(bdy));
        s16 g_wins = (s16)-(gm > rm);          /* all ones where green wins */
        s16 bdx1 = (s16)((gdx & g_wins) | (rdx & ~g_wins)), bdy1 = (s16)((gdy & g_wins) | (rdy & ~g_wins));
        s16 best = (s16)((gm & g_wins) | (rm & ~g_wins));
        s16 b_wins = (s16)-(bm > best);
        dx[x] = (s16)((bdx & b_wins) | (bdx1 & ~b_wins));
        dy[x] = (s16)((bdy & b_wins) | (bdy1 & ~b_wins));
    }
}

/* planes: 3 pointers to H x W uint8 planes (row stride W); dx, dy: H x W int16 outputs. */
void canny_gradients(const uint8_t *red, const uint8_t *green, const uint8_t *blue, int16_t *dx, int16_t *dy,
                     int height, int width) {
    const uint8_t *planes[3] = {red, green, blue};
    for (int y = 0; y < height; y++) {
        int above = y > 0 ? y - 1 : 0, below = y < height - 1 ? y + 1 : height - 1;
        const uint8_t *rows[3][3];
        for (int c = 0; c < 3; c++) {
            rows[c][0] = planes[c] + (size_t)above * width;
            rows[c][1] = planes[c] + (size_t)y * width;
            rows[c][2] = planes[c] + (size_t)below * width;
        }
        int16_t *dx_row = dx + (size_t)y * width, *dy_row = dy + (size_t)y * width;
        if (width == 1) {
            choose(rows, 0, 0, 0, dx_row, dy_row);
            continue;
        }
        choose(rows, 0, 0, 1, dx_row, dy_row);
        interior(rows[0][0], rows[0][1], rows[0][2], rows[1][0], rows[1][1], rows[1][2], rows[2][0], rows[2][1],
                 rows[2][2], dx_row, dy_row, width);
        choose(rows, width - 2, width - 1, width - 1, dx_row + width - 1, dy_row + width - 1);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_canny_kernel",
                                    "canny_gradients(), called through ctypes", -1, NULL};

PyMODINIT_FUNC PyInit__canny_kernel(void) { return PyModule_Create(&module); }
