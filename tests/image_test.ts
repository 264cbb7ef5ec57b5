import assert from "node:assert/strict";
import sharp from "sharp";
import {
  centreCropRect,
  decodeEvalImage,
  decodeTrainImage,
  evalCropRgb,
  ImageDecodeError,
  ImageTooLargeError,
  imageToRgbPng,
  jpegHeader,
  normaliseRgb,
  OPENAI_MEAN,
  OPENAI_STD,
  type Preprocess,
  sampleResizedCrop,
  shortestSideSize,
} from "../lib/data/image.ts";
import { type Pixels, resizeBicubic } from "../lib/data/resample.ts";
import { SimdResizer } from "../lib/data/resample_simd.ts";

const FIXTURES = new URL("./fixtures/preprocess/", import.meta.url);
const OPENAI_224: Preprocess = { size: 224, mean: OPENAI_MEAN, std: OPENAI_STD };

/**
 * Largest allowed difference from open_clip's crop, in u8 levels. The resize reproduces Pillow's integer arithmetic
 * and sharp's JPEG/PNG decoders give Pillow's pixels, so the measured difference is 0 on every reference image.
 */
const MAX_U8_DIFF = 0;

const readFixture = (name: string) => Deno.readFile(new URL(name, FIXTURES));

function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): { max: number; mean: number } {
  assert.equal(a.length, b.length);
  let max = 0;
  let sum = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (d > max) max = d;
    sum += d;
  }
  return { max, mean: sum / a.length };
}

/** Equality of two tensors that reports the first difference instead of printing both arrays. */
function assertSameTensor(actual: Float32Array, expected: Float32Array, message = ""): void {
  assert.equal(actual.length, expected.length, `${message} length`);
  const i = actual.findIndex((v, k) => !Object.is(v, expected[k]));
  assert.equal(i, -1, `${message} first difference at ${i}: ${actual[i]} vs ${expected[i]}`);
}

/** A small deterministic generator for the tests (mulberry32). */
function seededRng(seed: number): () => number {
  let a = seed | 0;
  return () => {
    a = (a + 0x6d2b79f5) | 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Returns the given values in order, failing the test if more are drawn. */
function scriptedRng(values: number[]): () => number {
  let i = 0;
  return () => {
    assert.ok(i < values.length, "the crop sampler drew more random numbers than expected");
    return values[i++];
  };
}

async function png(data: Uint8Array, width: number, height: number, channels: 1 | 2 | 3 | 4): Promise<Uint8Array> {
  return new Uint8Array(await sharp(data, { raw: { width, height, channels } }).png().toBuffer());
}

function noiseImage(width: number, height: number, seed: number): Uint8Array {
  const rng = seededRng(seed);
  return Uint8Array.from({ length: width * height * 3 }, () => Math.floor(rng() * 256));
}

const REFERENCE_IMAGES = ["img0_300x200.jpg", "img1_200x333.png", "img2_64x64_rgba.png", "img3_513x287_gray.jpg"];

for (const name of REFERENCE_IMAGES) {
  const stem = name.replace(/\.(jpg|png)$/, "");
  Deno.test(`eval transform matches open_clip on ${name}`, async () => {
    const bytes = await readFixture(name);
    const crop = await evalCropRgb(bytes, 224);
    const diff = maxAbsDiff(crop, await readFixture(`${stem}.crop224_rgb.u8`));
    assert.ok(diff.max <= MAX_U8_DIFF, `u8 crop differs by up to ${diff.max} levels (mean ${diff.mean})`);

    const tensor = await decodeEvalImage(bytes, OPENAI_224);
    const reference = new Float32Array((await readFixture(`${stem}.preprocessed.f32`)).buffer);
    assert.equal(tensor.length, 3 * 224 * 224);
    // open_clip's tensor is (crop / 255 - mean) / std in float32: the same crop gives the same floats, bit for bit.
    const tensorDiff = maxAbsDiff(tensor, reference);
    assert.ok(tensorDiff.max <= MAX_U8_DIFF / 255 / 0.26, `tensor differs by up to ${tensorDiff.max}`);
  });
}

Deno.test("RGBA is resized premultiplied: the fully transparent red block of img2 comes out black", async () => {
  const crop = await evalCropRgb(await readFixture("img2_64x64_rgba.png"), 224);
  // Source block: 16x16 at the top-left of 64x64, i.e. 56x56 at 224; the bicubic support reaches 2 source pixels
  // (7 output pixels) across its edge, so the inner 48x48 is untouched by any opaque neighbour.
  for (let y = 0; y < 48; y++) {
    for (let x = 0; x < 48; x++) {
      const p = (y * 224 + x) * 3;
      assert.deepEqual([crop[p], crop[p + 1], crop[p + 2]], [0, 0, 0], `pixel (${x}, ${y})`);
    }
  }
});

Deno.test("greyscale images come out with three equal channels", async () => {
  const crop = await evalCropRgb(await readFixture("img3_513x287_gray.jpg"), 224);
  for (let p = 0; p < crop.length; p += 3) assert.ok(crop[p] === crop[p + 1] && crop[p] === crop[p + 2]);
});

Deno.test("palette, 1-bit, grey+alpha, CMYK and JPEG variants match Pillow 9.4", async () => {
  const manifest = JSON.parse(await Deno.readTextFile(new URL("pillow_modes/manifest.json", FIXTURES)));
  assert.equal(manifest.cases.length, 8);
  for (const { file, mode, crop } of manifest.cases) {
    const ours = await evalCropRgb(await readFixture(`pillow_modes/${file}`), manifest.size);
    const diff = maxAbsDiff(ours, await readFixture(`pillow_modes/${crop}`));
    assert.ok(diff.max <= MAX_U8_DIFF, `${file} (Pillow mode ${mode}) differs by up to ${diff.max} levels`);
  }
});

Deno.test("eval geometry: truncated long side and Python-rounded centre offset", () => {
  assert.deepEqual(shortestSideSize(300, 200, 224), { width: 336, height: 224 });
  assert.deepEqual(shortestSideSize(200, 333, 224), { width: 224, height: 372 }); // 372.96 truncated
  assert.deepEqual(shortestSideSize(513, 287, 224), { width: 400, height: 224 }); // 400.39
  // (225 - 224) / 2 = 0.5 rounds to 0 and (227 - 224) / 2 = 1.5 to 2: halves go to the even neighbour.
  assert.deepEqual(centreCropRect(225, 224, 224), { left: 0, top: 0, width: 224, height: 224 });
  assert.deepEqual(centreCropRect(224, 227, 224), { left: 0, top: 2, width: 224, height: 224 });
  assert.deepEqual(centreCropRect(336, 224, 224), { left: 56, top: 0, width: 224, height: 224 });
});

Deno.test("random resized crop: accepted box from the first attempt, hand-computed", () => {
  // area = U(0.9, 1) * 100 * 100 with u = 0.5 -> 9500; aspect = exp(U(log 3/4, log 4/3)) with u = 0.5 -> 1;
  // w = h = round(sqrt(9500)) = round(97.47) = 97; top = floor(0.6 * 4) = 2, left = floor(0.3 * 4) = 1.
  const rect = sampleResizedCrop(100, 100, scriptedRng([0.5, 0.5, 0.6, 0.3]));
  assert.deepEqual(rect, { left: 1, top: 2, width: 97, height: 97 });
  // u = 0 for the aspect -> 3/4: w = round(sqrt(9000 * 0.75)) = 82, h = round(sqrt(9000 / 0.75)) = 110 > 100 does
  // not fit; the second attempt (area 10000 * 0.95 = 9500, aspect 1) does.
  const retried = sampleResizedCrop(100, 100, scriptedRng([0, 0, 0.5, 0.5, 0, 0.999]));
  assert.deepEqual(retried, { left: 3, top: 0, width: 97, height: 97 });
});

Deno.test("random resized crop: fallback centre crop with the aspect clamped to 4/3", () => {
  // A 1000x10 image never fits a box of area >= 9000 with aspect <= 4/3: after 10 attempts (20 draws) the
  // fallback takes h = 10, w = round(10 * 4/3) = 13, centred: left = (1000 - 13) // 2 = 493.
  const rect = sampleResizedCrop(1000, 10, scriptedRng(new Array(20).fill(0.5)));
  assert.deepEqual(rect, { left: 493, top: 0, width: 13, height: 10 });
  const tall = sampleResizedCrop(10, 1000, scriptedRng(new Array(20).fill(0.5)));
  assert.deepEqual(tall, { left: 0, top: 493, width: 10, height: 13 }); // round(10 / (3/4)) = 13
});

Deno.test("train transform: same seed, same tensor; another seed, another crop", async () => {
  const bytes = await png(noiseImage(120, 90, 1), 120, 90, 3);
  const p: Preprocess = { size: 64, mean: OPENAI_MEAN, std: OPENAI_STD };
  const a = await decodeTrainImage(bytes, p, seededRng(42));
  const b = await decodeTrainImage(bytes, p, seededRng(42));
  const c = await decodeTrainImage(bytes, p, seededRng(43));
  assert.equal(a.length, 3 * 64 * 64);
  assertSameTensor(a, b);
  assert.ok(a.some((v, i) => v !== c[i]), "seeds 42 and 43 gave the same crop");
});

Deno.test("train transform resizes exactly the sampled crop", async () => {
  const p: Preprocess = { size: 48, mean: OPENAI_MEAN, std: OPENAI_STD };
  const bytes = await png(noiseImage(100, 100, 3), 100, 100, 3);
  // The hand-checked box above: {left 1, top 2, 97 x 97}.
  const trained = await decodeTrainImage(bytes, p, scriptedRng([0.5, 0.5, 0.6, 0.3]));
  // The same box cut out beforehand and put through the (reference-checked) eval transform, whose shortest-side
  // resize of a square is the same 48x48 resize with no further crop.
  const cropBytes = await sharp(bytes).extract({ left: 1, top: 2, width: 97, height: 97 }).png().toBuffer();
  assertSameTensor(trained, await decodeEvalImage(new Uint8Array(cropBytes), p));
  // One pixel off in either direction is a different tensor.
  const shifted = await sharp(bytes).extract({ left: 2, top: 1, width: 97, height: 97 }).png().toBuffer();
  const other = await decodeEvalImage(new Uint8Array(shifted), p);
  assert.ok(trained.some((v, i) => v !== other[i]), "a shifted crop gave the same tensor");
});

Deno.test("train transform: a uniform image gives its normalised colour everywhere", async () => {
  const colour = [200, 100, 30];
  const data = Uint8Array.from({ length: 77 * 53 * 3 }, (_, i) => colour[i % 3]);
  const p: Preprocess = { size: 32, mean: OPENAI_MEAN, std: OPENAI_STD };
  const tensor = await decodeTrainImage(await png(data, 77, 53, 3), p, seededRng(5));
  for (let c = 0; c < 3; c++) {
    const expected = (colour[c] / 255 - OPENAI_MEAN[c]) / OPENAI_STD[c];
    for (let i = 0; i < 32 * 32; i++) {
      assert.ok(
        Math.abs(tensor[c * 1024 + i] - expected) < 1e-6,
        `channel ${c}: ${tensor[c * 1024 + i]} vs ${expected}`,
      );
    }
  }
});

Deno.test("corrupt, truncated and non-image bytes throw ImageDecodeError", async () => {
  const jpeg = await readFixture("img0_300x200.jpg");
  const pngBytes = await readFixture("img1_200x333.png");
  const cases: [string, Uint8Array][] = [
    ["empty", new Uint8Array(0)],
    ["text", new TextEncoder().encode("a photo of a cat")],
    ["noise", noiseImage(40, 40, 9)],
    ["truncated JPEG", jpeg.subarray(0, jpeg.length >> 1)],
    ["truncated PNG", pngBytes.subarray(0, pngBytes.length >> 1)],
  ];
  for (const [label, bytes] of cases) {
    await assert.rejects(() => decodeEvalImage(bytes, OPENAI_224), ImageDecodeError, label);
    await assert.rejects(() => decodeTrainImage(bytes, OPENAI_224, seededRng(1)), ImageDecodeError, label);
  }
});

function pngChunk(type: string, body: Uint8Array): Uint8Array {
  const typeAndBody = new Uint8Array([...new TextEncoder().encode(type), ...body]);
  let crc = 0xffffffff;
  for (const byte of typeAndBody) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  const chunk = new Uint8Array(12 + body.length);
  const view = new DataView(chunk.buffer);
  view.setUint32(0, body.length);
  chunk.set(typeAndBody, 4);
  view.setUint32(8 + body.length, (crc ^ 0xffffffff) >>> 0);
  return chunk;
}

/** A PNG declaring `width` x `height` RGB whose pixel data is a few bytes long: what a decompression bomb looks like. */
function hugePng(width: number, height: number): Uint8Array {
  const ihdr = new Uint8Array(13);
  new DataView(ihdr.buffer).setUint32(0, width);
  new DataView(ihdr.buffer).setUint32(4, height);
  ihdr.set([8, 2, 0, 0, 0], 8); // 8-bit, truecolour, deflate, adaptive filter, no interlace
  const idat = new Uint8Array([0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01]); // zlib of one zero byte
  const signature = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  const chunks = [pngChunk("IHDR", ihdr), pngChunk("IDAT", idat), pngChunk("IEND", new Uint8Array(0))];
  return new Uint8Array([...signature, ...chunks.flatMap((c) => [...c])]);
}

Deno.test("an image over the pixel limit is refused from its header", async () => {
  const huge = hugePng(30000, 30000);
  const error = await decodeEvalImage(huge, OPENAI_224).then(() => undefined, (e) => e);
  assert.ok(error instanceof ImageTooLargeError, `expected ImageTooLargeError, got ${error}`);
  assert.ok(error instanceof ImageDecodeError, "loaders count it with the other undecodable images");
  assert.match(error.message, /30000x30000 = 900000000 pixels, over the limit of 100000000/);
  await assert.rejects(() => decodeTrainImage(huge, OPENAI_224, seededRng(1)), ImageTooLargeError);
  await assert.rejects(() => imageToRgbPng(huge), ImageTooLargeError);
  // The limit is configurable: the 300x200 reference image is refused under 50000 pixels, accepted at 60000.
  const jpeg = await readFixture("img0_300x200.jpg");
  await assert.rejects(() => evalCropRgb(jpeg, 224, { maxPixels: 50_000 }), ImageTooLargeError);
  assert.equal((await evalCropRgb(jpeg, 224, { maxPixels: 60_000 })).length, 224 * 224 * 3);
});

Deno.test("imageToRgbPng composites on the background and writes an RGB PNG", async () => {
  // Pixels: opaque blue, transparent red, half-transparent red (alpha 128), on a 3x1 RGBA image.
  const rgba = new Uint8Array([0, 0, 255, 255, 255, 0, 0, 0, 255, 0, 0, 128]);
  const out = await imageToRgbPng(await png(rgba, 3, 1, 4));
  const { data, info } = await sharp(out).raw().toBuffer({ resolveWithObject: true });
  assert.equal((await sharp(out).metadata()).format, "png");
  assert.equal(info.channels, 3);
  // Over white: 255 * a + 255 * (1 - a) = 255 for red; 0 * a + 255 * (1 - a) = 127 (a = 128/255) for green/blue.
  assert.deepEqual([...data], [0, 0, 255, 255, 255, 255, 255, 127, 127]);

  const onBlack = await imageToRgbPng(await png(rgba, 3, 1, 4), { r: 0, g: 0, b: 0 });
  assert.deepEqual([...(await sharp(onBlack).raw().toBuffer())], [0, 0, 255, 0, 0, 0, 128, 0, 0]);

  const grey = await imageToRgbPng(await png(new Uint8Array([10, 200]), 2, 1, 1));
  const greyRaw = await sharp(grey).raw().toBuffer({ resolveWithObject: true });
  assert.equal(greyRaw.info.channels, 3);
  assert.deepEqual([...greyRaw.data], [10, 10, 10, 200, 200, 200]);
});

/** Every reference image and Pillow-mode variant, with its name. */
async function allFixtureImages(): Promise<[string, Uint8Array][]> {
  const manifest = JSON.parse(await Deno.readTextFile(new URL("pillow_modes/manifest.json", FIXTURES)));
  const names = [...REFERENCE_IMAGES, ...manifest.cases.map((c: { file: string }) => `pillow_modes/${c.file}`)];
  return await Promise.all(names.map(async (n): Promise<[string, Uint8Array]> => [n, await readFixture(n)]));
}

Deno.test("SIMD resize equals the Pillow port byte for byte: 1-4 channels, up and down, windows, unchanged axes", () => {
  const simd = SimdResizer.create();
  assert.ok(simd, "this engine has WebAssembly SIMD");
  const rng = seededRng(11);
  const int = (lo: number, hi: number) => lo + Math.floor(rng() * (hi - lo + 1));
  for (let n = 0; n < 150; n++) {
    const channels = int(1, 4);
    const width = int(1, 120);
    const height = int(1, 120);
    // Saturated values half the time: they make the filter overshoot past 0 and 255, which must clip the same way.
    const data = Uint8Array.from(
      { length: width * height * channels },
      () => rng() < 0.5 ? int(0, 1) * 255 : int(0, 255),
    );
    const src: Pixels = { data, width, height, channels };
    // Every fifth case keeps the width and every seventh the height: Pillow skips that pass, rounding and all.
    const outWidth = n % 5 === 0 ? width : int(1, 260);
    const outHeight = n % 7 === 0 ? height : int(1, 260);
    const w = int(1, outWidth);
    const h = int(1, outHeight);
    const window = { left: int(0, outWidth - w), top: int(0, outHeight - h), width: w, height: h };
    const expected = resizeBicubic(src, outWidth, outHeight, window).data;
    const label = `${width}x${height}x${channels} -> ${outWidth}x${outHeight}, window ${JSON.stringify(window)}`;
    simd.resize(src, outWidth, outHeight, window, (planes) => {
      for (let y = 0; y < h; y++) {
        for (let x = 0; x < w; x++) {
          for (let c = 0; c < channels; c++) {
            const got = planes.data[c * planes.planeStride + y * planes.rowStride + x];
            const want = expected[(y * w + x) * channels + c];
            if (got !== want) assert.fail(`${label}: (${x}, ${y}, ${c}) is ${got}, not ${want}`);
          }
        }
      }
    });
  }
});

Deno.test("SIMD normalisation equals the float32 tables for every byte value, RGB and grey", () => {
  const simd = SimdResizer.create()!;
  const p: Preprocess = { size: 16, mean: OPENAI_MEAN, std: OPENAI_STD };
  // 16 x 16 pixels: red runs through all 256 values, green and blue through them in other orders.
  const rgb = Uint8Array.from({ length: 256 * 3 }, (_, i) => [i / 3, (i * 7) / 3, 255 - i / 3][i % 3] & 255);
  const expected = normaliseRgb(rgb, 16, p);
  const whole = { left: 0, top: 0, width: 16, height: 16 };
  const out = new Float32Array(3 * 256);
  // Unchanged size on both axes: the resize copies, so this checks the normalisation alone.
  simd.resizeNormalised({ data: rgb, width: 16, height: 16, channels: 3 }, 16, 16, whole, p, out);
  assertSameTensor(out, expected, "RGB");
  const grey = Uint8Array.from({ length: 256 }, (_, i) => i);
  const greyAsRgb = Uint8Array.from({ length: 256 * 3 }, (_, i) => Math.floor(i / 3));
  simd.resizeNormalised({ data: grey, width: 16, height: 16, channels: 1 }, 16, 16, whole, p, out);
  assertSameTensor(out, normaliseRgb(greyAsRgb, 16, p), "grey");
});

Deno.test("decodeEvalImage (SIMD path) equals the reference crop normalised, on every fixture image and mode", async () => {
  const p: Preprocess = { size: 64, mean: OPENAI_MEAN, std: OPENAI_STD };
  for (const [name, bytes] of await allFixtureImages()) {
    const expected = normaliseRgb(await evalCropRgb(bytes, 64), 64, p);
    assertSameTensor(await decodeEvalImage(bytes, p), expected, name);
  }
});

Deno.test("decode into a given tensor: the same values, in the caller's array; a wrong size is refused", async () => {
  const bytes = await readFixture("img0_300x200.jpg");
  const p: Preprocess = { size: 32, mean: OPENAI_MEAN, std: OPENAI_STD };
  const out = new Float32Array(3 * 32 * 32).fill(Number.NaN);
  assert.equal(await decodeEvalImage(bytes, p, {}, out), out);
  assertSameTensor(out, await decodeEvalImage(bytes, p));
  const trainOut = new Float32Array(3 * 32 * 32);
  assert.equal(await decodeTrainImage(bytes, p, seededRng(4), {}, trainOut), trainOut);
  assertSameTensor(trainOut, await decodeTrainImage(bytes, p, seededRng(4)));
  await assert.rejects(() => decodeEvalImage(bytes, p, {}, new Float32Array(10)), RangeError);
});

Deno.test("jpegHeader reads what sharp's metadata says, and leaves CMYK, PNG and broken headers to sharp", async () => {
  let read = 0;
  for (const [name, bytes] of await allFixtureImages()) {
    const header = jpegHeader(bytes);
    const meta = await sharp(bytes).metadata();
    if (meta.format !== "jpeg" || meta.space === "cmyk") {
      assert.equal(header, undefined, name);
      continue;
    }
    read++;
    const space = meta.space === "b-w" ? "grey" : "rgb";
    assert.deepEqual(header, { width: meta.width, height: meta.height, space, handling: "direct" }, name);
  }
  assert.equal(read, 4, "img0, img3 (grey), downscale_422 and progressive");
  const jpeg = await readFixture("img0_300x200.jpg");
  assert.equal(jpegHeader(jpeg.subarray(0, 20)), undefined, "cut before the frame header");
  assert.equal(jpegHeader(new Uint8Array([0xff, 0xd8, 0xff, 0xda, 0, 2])), undefined, "a scan before any frame");
});
