/**
 * Pillow's 8-bit resampling, reproduced integer for integer, so that images resized here match open_clip's
 * preprocessing (which resizes with Pillow) exactly rather than to within a few levels.
 *
 * Bicubic follows Pillow's `ImagingResample`: a separable filter (Keys cubic, a = -0.5) whose support widens by
 * the downscale factor (antialiasing), weights normalised per output pixel and quantised to 22-bit fixed point,
 * the horizontal pass first with its result rounded to 8 bits, then the vertical pass. Nearest follows Pillow's
 * affine nearest scaling, which Pillow uses instead of any filter for palette and 1-bit images.
 */

/** Interleaved 8-bit pixels, row-major: `data[(y * width + x) * channels + c]`. */
export interface Pixels {
  readonly data: Uint8Array;
  readonly width: number;
  readonly height: number;
  readonly channels: number;
}

/** A rectangle in pixel units. */
export interface Rect {
  readonly left: number;
  readonly top: number;
  readonly width: number;
  readonly height: number;
}

/** Pillow: 32 bits minus 8 for the pixel value minus 2 of headroom for filter overshoot. */
export const PRECISION_BITS = 22;
const ROUNDING_HALF = 1 << (PRECISION_BITS - 1);
const BICUBIC_SUPPORT = 2;

function bicubicFilter(x: number): number {
  const a = -0.5;
  if (x < 0) x = -x;
  if (x < 1) return ((a + 2) * x - (a + 3)) * x * x + 1;
  if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
  return 0;
}

/** The source span and fixed-point weights of each output index along one axis. */
export interface AxisWeights {
  /** First source index read by each output index. */
  readonly first: Int32Array;
  /** Number of source indices read by each output index. */
  readonly count: Int32Array;
  /** `taps` weights per output index (zero past `count`). */
  readonly weights: Int32Array;
  readonly taps: number;
}

/** Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for output indices [start, start + length). */
export function bicubicAxisWeights(inSize: number, outSize: number, start: number, length: number): AxisWeights {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1);
  const support = BICUBIC_SUPPORT * filterScale;
  const taps = Math.ceil(support) * 2 + 1;
  const first = new Int32Array(length);
  const count = new Int32Array(length);
  const weights = new Int32Array(length * taps);
  const raw = new Float64Array(taps);
  for (let o = 0; o < length; o++) {
    const center = (start + o + 0.5) * scale;
    // Pillow rounds with a C cast (truncation towards zero) before clamping.
    const min = Math.max(Math.trunc(center - support + 0.5), 0);
    const n = Math.min(Math.trunc(center + support + 0.5), inSize) - min;
    let total = 0;
    for (let t = 0; t < n; t++) {
      raw[t] = bicubicFilter((t + min - center + 0.5) / filterScale);
      total += raw[t];
    }
    for (let t = 0; t < n; t++) {
      const w = total !== 0 ? raw[t] / total : raw[t];
      weights[o * taps + t] = Math.trunc(w < 0 ? w * (1 << PRECISION_BITS) - 0.5 : w * (1 << PRECISION_BITS) + 0.5);
    }
    first[o] = min;
    count[o] = n;
  }
  return { first, count, weights, taps };
}

function clip8(sum: number): number {
  // The sum stays within int32 (weights sum to 2^22, overshoot is bounded), so `>>` is an exact floor division.
  const v = sum >> PRECISION_BITS;
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/** Filters every row in [rowStart, rowStart + rows) of `src` along x into `columns` output columns. */
function horizontalPass(src: Pixels, rowStart: number, rows: number, axis: AxisWeights): Pixels {
  const { data, width, channels } = src;
  const { first, count, weights, taps } = axis;
  const columns = first.length;
  const out = new Uint8Array(columns * rows * channels);
  for (let y = 0; y < rows; y++) {
    const rowBase = (rowStart + y) * width * channels;
    const outBase = y * columns * channels;
    if (channels === 3) {
      // The common case, with the three channel sums in one pass over the taps.
      for (let o = 0; o < columns; o++) {
        const n = count[o];
        const k = o * taps;
        let r = ROUNDING_HALF, g = ROUNDING_HALF, b = ROUNDING_HALF;
        for (let t = 0, p = rowBase + first[o] * 3; t < n; t++, p += 3) {
          const w = weights[k + t];
          r += data[p] * w;
          g += data[p + 1] * w;
          b += data[p + 2] * w;
        }
        const q = outBase + o * 3;
        out[q] = clip8(r);
        out[q + 1] = clip8(g);
        out[q + 2] = clip8(b);
      }
      continue;
    }
    for (let o = 0; o < columns; o++) {
      const n = count[o];
      const k = o * taps;
      const pixelBase = rowBase + first[o] * channels;
      for (let c = 0; c < channels; c++) {
        let sum = ROUNDING_HALF;
        for (let t = 0, p = pixelBase + c; t < n; t++, p += channels) sum += data[p] * weights[k + t];
        out[outBase + o * channels + c] = clip8(sum);
      }
    }
  }
  return { data: out, width: columns, height: rows, channels };
}

/** Filters `src` (whose row 0 is source row `rowOffset`) along y. */
function verticalPass(src: Pixels, rowOffset: number, axis: AxisWeights): Pixels {
  const { data, width, channels } = src;
  const { first, count, weights, taps } = axis;
  const rows = first.length;
  const stride = width * channels;
  const out = new Uint8Array(rows * stride);
  const sums = new Float64Array(stride);
  for (let o = 0; o < rows; o++) {
    // Accumulate whole rows at a time: contiguous reads, one weight per source row.
    sums.fill(ROUNDING_HALF);
    const n = count[o];
    const k = o * taps;
    for (let t = 0; t < n; t++) {
      const w = weights[k + t];
      const rowBase = (first[o] - rowOffset + t) * stride;
      for (let i = 0; i < stride; i++) sums[i] += data[rowBase + i] * w;
    }
    const outBase = o * stride;
    for (let i = 0; i < stride; i++) out[outBase + i] = clip8(sums[i]);
  }
  return { data: out, width, height: rows, channels };
}

/** Copies a rectangle out of `src`. */
export function cropPixels(src: Pixels, rect: Rect): Pixels {
  const { data, width, channels } = src;
  if (rect.left < 0 || rect.top < 0 || rect.left + rect.width > width || rect.top + rect.height > src.height) {
    throw new RangeError(
      `crop ${rect.width}x${rect.height}+${rect.left}+${rect.top} lies outside a ${width}x${src.height} image`,
    );
  }
  const rowBytes = rect.width * channels;
  const out = new Uint8Array(rect.height * rowBytes);
  for (let y = 0; y < rect.height; y++) {
    const from = ((rect.top + y) * width + rect.left) * channels;
    out.set(data.subarray(from, from + rowBytes), y * rowBytes);
  }
  return { data: out, width: rect.width, height: rect.height, channels };
}

function wholeImage(width: number, height: number): Rect {
  return { left: 0, top: 0, width, height };
}

function checkWindow(outWidth: number, outHeight: number, window: Rect): void {
  if (
    window.left < 0 || window.top < 0 || window.width <= 0 || window.height <= 0 ||
    window.left + window.width > outWidth || window.top + window.height > outHeight
  ) {
    throw new RangeError(
      `window ${window.width}x${window.height}+${window.left}+${window.top} lies outside the ${outWidth}x${outHeight} output`,
    );
  }
}

/**
 * Resizes `src` to `outWidth` x `outHeight` exactly as Pillow's `Image.resize(..., BICUBIC)` on an 8-bit image,
 * and returns only the `window` of that result (the default is all of it). Output pixels depend only on their own
 * weights, so computing just a window (say, the centre crop) gives the same values as resizing and then cropping.
 */
export function resizeBicubic(
  src: Pixels,
  outWidth: number,
  outHeight: number,
  window: Rect = wholeImage(outWidth, outHeight),
): Pixels {
  checkWindow(outWidth, outHeight, window);
  // Pillow skips a pass whose size does not change, which also skips its rounding.
  const vertical = outHeight !== src.height
    ? bicubicAxisWeights(src.height, outHeight, window.top, window.height)
    : undefined;
  const rowStart = vertical ? vertical.first[0] : window.top;
  const rowEnd = vertical ? vertical.first[window.height - 1] + vertical.count[window.height - 1] : rowStart +
    window.height;
  const rows = rowEnd - rowStart;
  const horizontalDone = outWidth !== src.width
    ? horizontalPass(src, rowStart, rows, bicubicAxisWeights(src.width, outWidth, window.left, window.width))
    : cropPixels(src, { left: window.left, top: rowStart, width: window.width, height: rows });
  return vertical ? verticalPass(horizontalDone, rowStart, vertical) : horizontalDone;
}

/** Source indices of Pillow's affine nearest scaling (`ImagingScaleAffine`), including its accumulated position. */
function nearestIndices(inSize: number, outSize: number, start: number, length: number): Int32Array {
  const step = inSize / outSize;
  const indices = new Int32Array(length);
  let position = step * 0.5;
  for (let o = 0; o < start + length; o++, position += step) {
    if (o >= start) indices[o - start] = Math.min(Math.max(Math.trunc(position), 0), inSize - 1);
  }
  return indices;
}

/** Resizes `src` as Pillow's `Image.resize` does for palette and 1-bit images (nearest neighbour); see resizeBicubic. */
export function resizeNearest(
  src: Pixels,
  outWidth: number,
  outHeight: number,
  window: Rect = wholeImage(outWidth, outHeight),
): Pixels {
  checkWindow(outWidth, outHeight, window);
  const { data, width, channels } = src;
  const xs = nearestIndices(width, outWidth, window.left, window.width);
  const ys = nearestIndices(src.height, outHeight, window.top, window.height);
  const out = new Uint8Array(window.width * window.height * channels);
  let i = 0;
  for (let y = 0; y < window.height; y++) {
    const rowBase = ys[y] * width;
    for (let x = 0; x < window.width; x++) {
      const p = (rowBase + xs[x]) * channels;
      for (let c = 0; c < channels; c++) out[i++] = data[p + c];
    }
  }
  return { data: out, width: window.width, height: window.height, channels };
}

/** Pillow's RGBA -> RGBa (and LA -> La): colour channels times alpha / 255, rounded. The last channel is alpha. */
export function premultiplyAlpha(src: Pixels): Pixels {
  const { data, channels } = src;
  const out = new Uint8Array(data);
  for (let p = 0; p < out.length; p += channels) {
    const alpha = out[p + channels - 1];
    for (let c = 0; c < channels - 1; c++) {
      const t = out[p + c] * alpha + 128;
      out[p + c] = ((t >> 8) + t) >> 8;
    }
  }
  return { ...src, data: out };
}

/**
 * Pillow's RGBa -> RGBA (and La -> LA): colour * 255 / alpha, floored and clipped. Pillow leaves the colour as is
 * where alpha is 0 or 255, so fully transparent pixels keep their premultiplied colour (black, unless filter
 * overshoot left something).
 */
export function unpremultiplyAlpha(src: Pixels): Pixels {
  const { data, channels } = src;
  const out = new Uint8Array(data);
  for (let p = 0; p < out.length; p += channels) {
    const alpha = out[p + channels - 1];
    if (alpha === 0 || alpha === 255) continue;
    for (let c = 0; c < channels - 1; c++) out[p + c] = Math.min(255, Math.floor((255 * out[p + c]) / alpha));
  }
  return { ...src, data: out };
}
