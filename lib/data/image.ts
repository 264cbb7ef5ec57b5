/**
 * Image decoding (sharp) and CLIP preprocessing, matching open_clip's transforms.
 *
 * sharp decodes; the resize is Pillow's own algorithm (./resample.ts), because open_clip resizes with Pillow and
 * no sharp kernel reproduces it: measured on the reference images, sharp's resize differs by up to 131 levels when
 * upscaling (its upscaler uses another pixel-centre convention), its best affine setting by 11, and downscaling by
 * 8, while the port matches to the bit. RGB and grey images, the common case, take the same arithmetic as
 * WebAssembly SIMD kernels (./resample_simd.ts), about five times faster. Pillow semantics kept on purpose: no EXIF
 * rotation, embedded ICC profiles not applied, RGBA/LA resized premultiplied, palette and 1-bit images resized
 * nearest-neighbour.
 */
import sharp, { type Metadata, type OutputInfo } from "sharp";
import { ClipError } from "../errors.ts";
import {
  type Pixels,
  premultiplyAlpha,
  type Rect,
  resizeBicubic,
  resizeNearest,
  unpremultiplyAlpha,
} from "./resample.ts";
import { SimdResizer } from "./resample_simd.ts";

/** Model input geometry and normalisation. */
export interface Preprocess {
  size: number;
  mean: [number, number, number];
  std: [number, number, number];
}

export const OPENAI_MEAN: [number, number, number] = [0.48145466, 0.4578275, 0.40821073];
export const OPENAI_STD: [number, number, number] = [0.26862954, 0.26130258, 0.27577711];

/** Refuse larger images before decoding them: a 10000 x 10000 image is already 300 MB of RGB pixels. */
export const DEFAULT_MAX_PIXELS = 100_000_000;

export interface DecodeLimits {
  /** Largest width x height accepted; larger images are refused from their header, before any pixel is decoded. */
  maxPixels?: number;
}

/** The bytes are not a decodable image (corrupt, truncated, unsupported or too large). Loaders skip and count these. */
export class ImageDecodeError extends ClipError {
  override name = "ImageDecodeError";
}

/** The image header declares more pixels than the limit; nothing was decoded. */
export class ImageTooLargeError extends ImageDecodeError {
  override name = "ImageTooLargeError";
  constructor(readonly width: number, readonly height: number, readonly maxPixels: number) {
    super(
      `image is ${width}x${height} = ${width * height} pixels, over the limit of ${maxPixels}; ` +
        `skip it or raise the pixel limit`,
    );
  }
}

/** RandomResizedCrop parameters (open_clip's training defaults). */
export const TRAIN_CROP_SCALE: readonly [number, number] = [0.9, 1.0];
export const TRAIN_CROP_RATIO: readonly [number, number] = [3 / 4, 4 / 3];

/**
 * How Pillow treats the decoded pixels when resizing and converting to RGB: "direct" (L, RGB: filtered as they are),
 * "premultiplied" (RGBA, LA: filtered with colour premultiplied by alpha, which is then dropped), "nearest" (palette
 * and 1-bit images: Pillow resizes these nearest-neighbour whatever filter is asked for, and ignores palette
 * transparency) or "cmyk" (filtered as CMYK, then Pillow's naive CMYK -> RGB).
 */
type Handling = "direct" | "premultiplied" | "nearest" | "cmyk";

interface DecodedImage {
  /** 1 (grey), 3 (RGB) or 4 (RGBA with "premultiplied", CMYK with "cmyk") channels. */
  readonly pixels: Pixels;
  readonly handling: Handling;
}

export interface Header {
  readonly width: number;
  readonly height: number;
  readonly space: "grey" | "rgb" | "cmyk";
  readonly handling: Handling;
}

// Fail on corrupt or truncated pixel data (Pillow raises on a truncated file too) but tolerate mere warnings such
// as stray bytes between JPEG markers, which Pillow also decodes.
const FAIL_ON = "error";

function decodeError(bytes: Uint8Array, e: unknown): ImageDecodeError {
  const reason = e instanceof Error ? e.message.split("\n")[0] : String(e);
  return new ImageDecodeError(
    `cannot decode a ${bytes.length}-byte image: ${reason}; the data is corrupt, truncated or not an image`,
    { cause: e },
  );
}

/**
 * The header of an 8-bit baseline, extended or progressive JPEG with 1 or 3 components (what sharp's metadata would
 * report for it), read from its SOF segment without a round trip through sharp; undefined for anything else.
 */
export function jpegHeader(bytes: Uint8Array): Header | undefined {
  if (bytes.length < 4 || bytes[0] !== 0xff || bytes[1] !== 0xd8) return undefined;
  let p = 2;
  while (p + 4 <= bytes.length) {
    if (bytes[p] !== 0xff) return undefined;
    const marker = bytes[p + 1];
    if (marker === 0xff) {
      p++; // fill byte
      continue;
    }
    if (marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
      p += 2; // markers without a length
      continue;
    }
    const length = (bytes[p + 2] << 8) | bytes[p + 3];
    if (length < 2) return undefined;
    if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
      // Start of frame: precision, height, width, components. Only the common huffman-coded frames are read here.
      if (marker > 0xc2 || p + 10 > bytes.length) return undefined;
      const precision = bytes[p + 4];
      const height = (bytes[p + 5] << 8) | bytes[p + 6];
      const width = (bytes[p + 7] << 8) | bytes[p + 8];
      const components = bytes[p + 9];
      if (precision !== 8 || width === 0 || height === 0 || (components !== 1 && components !== 3)) return undefined;
      return { width, height, space: components === 1 ? "grey" : "rgb", handling: "direct" };
    }
    if (marker === 0xda || marker === 0xd9) return undefined; // scan or end before any frame header
    p += 2 + length;
  }
  return undefined;
}

/** Reads the header only, and enforces the pixel limit before anything is decoded. */
async function readHeader(bytes: Uint8Array, maxPixels: number): Promise<Header> {
  // Most images are JPEGs whose header says all there is to know: that saves a call into sharp (~0.3 ms of CPU).
  const jpeg = jpegHeader(bytes);
  if (jpeg) {
    if (jpeg.width * jpeg.height > maxPixels) throw new ImageTooLargeError(jpeg.width, jpeg.height, maxPixels);
    return jpeg;
  }
  let meta: Metadata;
  try {
    // Reading the header decodes no pixels, so sharp's own limit is lifted here to report ours, with the size.
    meta = await sharp(bytes, { failOn: FAIL_ON, limitInputPixels: false }).metadata();
  } catch (e) {
    throw decodeError(bytes, e);
  }
  const { width, height } = meta;
  if (!width || !height) throw decodeError(bytes, new Error("the header declares no size"));
  if (width * height > maxPixels) throw new ImageTooLargeError(width, height, maxPixels);
  const space = meta.space === "cmyk" ? "cmyk" : meta.space === "b-w" || meta.space === "grey16" ? "grey" : "rgb";
  let handling: Handling = meta.hasAlpha ? "premultiplied" : "direct";
  if (meta.isPalette === true || meta.bitsPerSample === 1) handling = "nearest";
  else if (space === "cmyk") handling = "cmyk";
  return { width, height, space, handling };
}

/** Decodes `bytes` (or only the rectangle `choose` picks) to 8-bit pixels as Pillow would hold them. */
async function decodePixels(
  bytes: Uint8Array,
  limits: DecodeLimits,
  choose?: (width: number, height: number) => Rect,
): Promise<DecodedImage> {
  const maxPixels = limits.maxPixels ?? DEFAULT_MAX_PIXELS;
  const header = await readHeader(bytes, maxPixels);
  // Pillow ignores embedded ICC profiles: keeping the profile leaves the stored values untransformed.
  let pipeline = sharp(bytes, { failOn: FAIL_ON, limitInputPixels: maxPixels }).keepIccProfile();
  if (header.space === "cmyk") {
    // Process in CMYK so that sharp hands back the stored ink values instead of converting them to sRGB.
    pipeline = pipeline.pipelineColourspace("cmyk").toColourspace("cmyk");
  } else if (header.space === "grey" && header.handling !== "premultiplied") {
    // One channel instead of sharp's default expansion to RGB: a third of the work, the same values. (sharp's b-w
    // output drops alpha, so grey + alpha stays RGBA, which filters to the same values too.)
    pipeline = pipeline.toColourspace("b-w");
  }
  const region = choose?.(header.width, header.height);
  if (region) pipeline = pipeline.extract(region);
  let raw: { data: Uint8Array; info: OutputInfo };
  try {
    raw = await pipeline.raw({ depth: "uchar" }).toBuffer({ resolveWithObject: true });
  } catch (e) {
    throw decodeError(bytes, e);
  }
  const { width, height, channels } = raw.info;
  const pixels: Pixels = { data: raw.data, width, height, channels };
  const transparencyToDrop = header.handling === "nearest" && (channels === 2 || channels === 4);
  return { pixels: transparencyToDrop ? dropLastChannel(pixels) : pixels, handling: header.handling };
}

function dropLastChannel(src: Pixels): Pixels {
  const channels = src.channels - 1;
  const count = src.width * src.height;
  const out = new Uint8Array(count * channels);
  for (let i = 0; i < count; i++) {
    for (let c = 0; c < channels; c++) out[i * channels + c] = src.data[i * src.channels + c];
  }
  return { ...src, data: out, channels };
}

/** Pillow's `Image.resize(size, BICUBIC)` for this image's mode, returning only `window` of the result. */
function resizeAsPillow(image: DecodedImage, width: number, height: number, window?: Rect): Pixels {
  const { pixels } = image;
  switch (image.handling) {
    case "nearest":
      return resizeNearest(pixels, width, height, window);
    case "premultiplied":
      return unpremultiplyAlpha(resizeBicubic(premultiplyAlpha(pixels), width, height, window));
    default:
      return resizeBicubic(pixels, width, height, window);
  }
}

let simdResizer: SimdResizer | null | undefined;

/** This thread's SIMD resizer, or null where WebAssembly SIMD is unavailable. */
function resizer(): SimdResizer | null {
  if (simdResizer === undefined) simdResizer = SimdResizer.create() ?? null;
  return simdResizer;
}

/**
 * Pillow's resize of this image to `width` x `height` (only `window` of it), convert("RGB") and normalisation, as the
 * model input. Images filtered as they are (RGB, grey) take the SIMD kernels; the others (alpha, CMYK, palette) the
 * general path, which gives these the same result too.
 */
function resizeToTensor(
  image: DecodedImage,
  width: number,
  height: number,
  window: Rect,
  p: Preprocess,
  out: Float32Array | undefined,
): Float32Array {
  const simd = image.handling === "direct" ? resizer() : null;
  if (!simd) return normaliseRgb(toRgb(resizeAsPillow(image, width, height, window), image.handling), p.size, p, out);
  return simd.resizeNormalised(image.pixels, width, height, window, p, outputTensor(p.size, out));
}

/** Pillow's `convert("RGB")`: alpha dropped, grey replicated, CMYK by its naive formula. */
function toRgb(src: Pixels, handling: Handling): Uint8Array {
  if (src.channels === 3) return src.data;
  const count = src.width * src.height;
  const { data, channels } = src;
  const out = new Uint8Array(count * 3);
  for (let i = 0, p = 0; i < count; i++, p += channels) {
    if (handling === "cmyk") {
      const inverseK = 255 - data[p + 3];
      for (let c = 0; c < 3; c++) out[3 * i + c] = inverseK - mulDiv255(data[p + c], inverseK);
    } else if (channels < 3) {
      out[3 * i] = out[3 * i + 1] = out[3 * i + 2] = data[p];
    } else {
      out[3 * i] = data[p];
      out[3 * i + 1] = data[p + 1];
      out[3 * i + 2] = data[p + 2];
    }
  }
  return out;
}

/** Pillow's MULDIV255: a * b / 255 rounded, in integers. */
function mulDiv255(a: number, b: number): number {
  const t = a * b + 128;
  return ((t >> 8) + t) >> 8;
}

/** Python's round(): halves go to the even neighbour. */
function roundHalfEven(x: number): number {
  const floor = Math.floor(x);
  const fraction = x - floor;
  if (fraction !== 0.5) return Math.round(x);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** torchvision's Resize(size) for an int size: the short side becomes `size`, the long side is truncated. */
export function shortestSideSize(width: number, height: number, size: number): { width: number; height: number } {
  if (width <= height) return { width: size, height: Math.floor((size * height) / width) };
  return { width: Math.floor((size * width) / height), height: size };
}

/** torchvision's CenterCrop offsets: round((side - size) / 2) with Python's rounding. */
export function centreCropRect(width: number, height: number, size: number): Rect {
  return {
    left: roundHalfEven((width - size) / 2),
    top: roundHalfEven((height - size) / 2),
    width: size,
    height: size,
  };
}

function checkSize(size: number): void {
  if (!Number.isInteger(size) || size < 1) throw new RangeError(`image size must be a positive integer, got ${size}`);
}

/**
 * open_clip's eval transform up to the tensor conversion: Resize(size, bicubic) on the shortest side, CenterCrop(size),
 * convert("RGB"). Returns size x size x 3 bytes (HWC). Throws ImageDecodeError for undecodable or oversized input.
 */
export async function evalCropRgb(bytes: Uint8Array, size: number, limits: DecodeLimits = {}): Promise<Uint8Array> {
  checkSize(size);
  const image = await decodePixels(bytes, limits);
  const { width, height } = image.pixels;
  const resized = shortestSideSize(width, height, size);
  const crop = centreCropRect(resized.width, resized.height, size);
  return toRgb(resizeAsPillow(image, resized.width, resized.height, crop), image.handling);
}

/** One lookup table per channel: torchvision's float32 ToTensor (/255) then Normalize ((x - mean) / std), bit for bit. */
function normalisationTables(p: Preprocess): Float32Array[] {
  return [0, 1, 2].map((c) => {
    const mean = Math.fround(p.mean[c]);
    const std = Math.fround(p.std[c]);
    const table = new Float32Array(256);
    for (let v = 0; v < 256; v++) table[v] = Math.fround(Math.fround(v / 255) - mean) / std;
    return table;
  });
}

let cachedTables: { mean: readonly number[]; std: readonly number[]; tables: Float32Array[] } | undefined;

/** The tables of `p`, kept for the next image with the same normalisation. */
function tablesFor(p: Preprocess): Float32Array[] {
  const c = cachedTables;
  if (c && c.mean.every((m, i) => m === p.mean[i]) && c.std.every((s, i) => s === p.std[i])) return c.tables;
  const tables = normalisationTables(p);
  cachedTables = { mean: [...p.mean], std: [...p.std], tables };
  return tables;
}

function outputTensor(size: number, out: Float32Array | undefined): Float32Array {
  if (!out) return new Float32Array(3 * size * size);
  if (out.length !== 3 * size * size) {
    throw new RangeError(`the output holds ${out.length} floats, not 3x${size}x${size} = ${3 * size * size}`);
  }
  return out;
}

/** Turns HWC RGB bytes into the normalised CHW float32 model input (written to `out` when given). */
export function normaliseRgb(rgb: Uint8Array, size: number, p: Preprocess, out?: Float32Array): Float32Array {
  if (rgb.length !== size * size * 3) {
    throw new RangeError(`expected ${size}x${size}x3 = ${size * size * 3} bytes of RGB, got ${rgb.length}`);
  }
  const tables = tablesFor(p);
  const plane = size * size;
  const tensor = outputTensor(size, out);
  for (let c = 0; c < 3; c++) {
    const table = tables[c];
    for (let i = 0; i < plane; i++) tensor[c * plane + i] = table[rgb[3 * i + c]];
  }
  return tensor;
}

/**
 * open_clip's eval transform: [3, size, size] float32 CHW, written to `out` when given. Throws ImageDecodeError for
 * undecodable or oversized input.
 */
export async function decodeEvalImage(
  bytes: Uint8Array,
  p: Preprocess,
  limits: DecodeLimits = {},
  out?: Float32Array,
): Promise<Float32Array> {
  checkSize(p.size);
  const image = await decodePixels(bytes, limits);
  const { width, height } = image.pixels;
  const resized = shortestSideSize(width, height, p.size);
  const crop = centreCropRect(resized.width, resized.height, p.size);
  return resizeToTensor(image, resized.width, resized.height, crop, p, out);
}

/**
 * torchvision's RandomResizedCrop.get_params with `rng` (uniform in [0, 1)) in place of torch's generator:
 * up to 10 tries of area = U(scale) * W * H and aspect = exp(U(log ratio)), accepted when the rounded box fits, at a
 * uniform position; otherwise a centre crop with the aspect clamped into `ratio`.
 */
export function sampleResizedCrop(
  width: number,
  height: number,
  rng: () => number,
  scale: readonly [number, number] = TRAIN_CROP_SCALE,
  ratio: readonly [number, number] = TRAIN_CROP_RATIO,
): Rect {
  const area = width * height;
  const logRatio = [Math.log(ratio[0]), Math.log(ratio[1])];
  const randint = (n: number) => Math.min(Math.floor(rng() * n), n - 1);
  for (let attempt = 0; attempt < 10; attempt++) {
    const targetArea = area * (scale[0] + (scale[1] - scale[0]) * rng());
    const aspect = Math.exp(logRatio[0] + (logRatio[1] - logRatio[0]) * rng());
    const w = roundHalfEven(Math.sqrt(targetArea * aspect));
    const h = roundHalfEven(Math.sqrt(targetArea / aspect));
    if (w > 0 && w <= width && h > 0 && h <= height) {
      const top = randint(height - h + 1);
      const left = randint(width - w + 1);
      return { left, top, width: w, height: h };
    }
  }
  const inRatio = width / height;
  let w = width;
  let h = height;
  if (inRatio < Math.min(...ratio)) h = roundHalfEven(w / Math.min(...ratio));
  else if (inRatio > Math.max(...ratio)) w = roundHalfEven(h * Math.max(...ratio));
  return { left: Math.floor((width - w) / 2), top: Math.floor((height - h) / 2), width: w, height: h };
}

/**
 * open_clip's training transform: RandomResizedCrop(size, scale (0.9, 1), ratio (3/4, 4/3), bicubic), RGB,
 * normalise; written to `out` when given. The crop is drawn from `rng`, so the same sequence gives the same tensor.
 */
export async function decodeTrainImage(
  bytes: Uint8Array,
  p: Preprocess,
  rng: () => number,
  limits: DecodeLimits = {},
  out?: Float32Array,
): Promise<Float32Array> {
  checkSize(p.size);
  // Pillow crops and then resizes the crop, so the filter never reads outside it: decoding just the crop is the same.
  const image = await decodePixels(bytes, limits, (width, height) => sampleResizedCrop(width, height, rng));
  return resizeToTensor(image, p.size, p.size, { left: 0, top: 0, width: p.size, height: p.size }, p, out);
}

/** Composites the image on `background` and re-encodes it as an 8-bit RGB PNG (no alpha), keeping any ICC profile. */
export async function imageToRgbPng(
  bytes: Uint8Array,
  background: { r: number; g: number; b: number } = { r: 255, g: 255, b: 255 },
  limits: DecodeLimits = {},
): Promise<Uint8Array> {
  const maxPixels = limits.maxPixels ?? DEFAULT_MAX_PIXELS;
  const header = await readHeader(bytes, maxPixels);
  // CMYK goes through sharp's conversion to sRGB; other images keep their values and their ICC profile.
  let pipeline = sharp(bytes, { failOn: FAIL_ON, limitInputPixels: maxPixels });
  if (header.space !== "cmyk") pipeline = pipeline.keepIccProfile();
  try {
    const png = await pipeline.flatten({ background }).toColourspace("srgb").png().toBuffer();
    return new Uint8Array(png.buffer, png.byteOffset, png.length);
  } catch (e) {
    throw decodeError(bytes, e);
  }
}
