// Shared by the embed, zero-shot and eval tests: the fixture model, reference features computed without the code
// under test, shard building, and capturing what a command prints.
import sharp from "sharp";
import { parquetReadObjects } from "hyparquet";
import { decodeEvalImage } from "../lib/data/image.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";
import type { ClipModel } from "../lib/nn/clip.ts";
import type { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { fillTemplate } from "../lib/eval/templates.ts";
import type { PreprocessConfig } from "../lib/nn/config.ts";
import { noGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { withScope } from "../lib/tensor/tensor.ts";

export const VIT_TINY = new URL("./fixtures/models/vit_tiny", import.meta.url).pathname;
export const PREPROCESS_DIR = new URL("./fixtures/preprocess", import.meta.url).pathname;
/** The fixture photos, in name order: odd sizes, RGBA, greyscale. */
export const FIXTURE_IMAGES = ["img0_300x200.jpg", "img1_200x333.png", "img2_64x64_rgba.png", "img3_513x287_gray.jpg"];

/** Rows divided by their float64 norm. */
export function normaliseRows(values: Float32Array, dim: number): Float64Array {
  const out = new Float64Array(values.length);
  for (let r = 0; r < values.length / dim; r++) {
    let sq = 0;
    for (let k = 0; k < dim; k++) sq += values[r * dim + k] ** 2;
    const norm = Math.sqrt(sq);
    for (let k = 0; k < dim; k++) out[r * dim + k] = values[r * dim + k] / norm;
  }
  return out;
}

/** The model's image features of model inputs [n, 3, S, S], normalised in float64 here (not by the code under test). */
export async function referenceImageFeatures(model: ClipModel, pixels: Float32Array, n: number): Promise<Float64Array> {
  const size = model.config.vision_cfg.image_size;
  const raw = await withScope(async () =>
    await noGrad(() => model.encodeImage(fromArray(model.params.gpu, pixels, [n, 3, size, size]))).read()
  );
  return normaliseRows(raw, model.config.embed_dim);
}

/** Reference features of encoded images: decodeEvalImage, then the model, one image at a time. */
export async function referenceFeaturesOfFiles(
  model: ClipModel,
  preprocess: PreprocessConfig,
  images: Uint8Array[],
): Promise<Float64Array> {
  const dim = model.config.embed_dim;
  const out = new Float64Array(images.length * dim);
  for (let i = 0; i < images.length; i++) {
    const pixels = await decodeEvalImage(images[i], preprocess);
    out.set(await referenceImageFeatures(model, pixels, 1), i * dim);
  }
  return out;
}

/** Largest |a - b| over two equally long arrays. */
export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} != ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
}

export interface SampleSpec {
  key: string;
  files: Record<string, Uint8Array | string>;
}

/** Writes one tar per entry of `shards` as `dir/shard-NNNNNN.tar`; returns their paths. */
export async function writeShards(dir: string, shards: SampleSpec[][]): Promise<string[]> {
  const paths: string[] = [];
  for (const [i, samples] of shards.entries()) {
    const path = `${dir}/shard-${String(i).padStart(6, "0")}.tar`;
    const writer = await TarWriter.create(path);
    for (const s of samples) {
      for (const [ext, data] of Object.entries(s.files)) {
        await writer.add(`${s.key}.${ext}`, typeof data === "string" ? new TextEncoder().encode(data) : data);
      }
    }
    await writer.close();
    paths.push(path);
  }
  return paths;
}

/** A small PNG of one colour with a gradient, so images of one colour still differ a little. */
export async function colourImage(r: number, g: number, b: number, variant: number): Promise<Uint8Array> {
  const w = 24 + variant, h = 20 + 2 * variant;
  const pixels = new Uint8Array(w * h * 3);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const shade = ((x + y + 5 * variant) % 16) - 8;
      pixels.set([r, g, b].map((c) => Math.max(0, Math.min(255, c + shade))), 3 * (y * w + x));
    }
  }
  const png = await sharp(pixels, { raw: { width: w, height: h, channels: 3 } }).png().toBuffer();
  return new Uint8Array(png);
}

export async function readParquet(path: string): Promise<Record<string, unknown>[]> {
  const bytes = await Deno.readFile(path);
  return await parquetReadObjects({ file: bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength) });
}

/** Runs `fn` with console.log and console.error captured; returns what they printed and `fn`'s result. */
export async function captured<T>(fn: () => Promise<T>): Promise<{ result: T; stdout: string; stderr: string }> {
  const log = console.log, error = console.error;
  let stdout = "", stderr = "";
  console.log = (...args: unknown[]) => stdout += args.join(" ") + "\n";
  console.error = (...args: unknown[]) => stderr += args.join(" ") + "\n";
  try {
    const result = await fn();
    return { result, stdout, stderr };
  } finally {
    console.log = log;
    console.error = error;
  }
}

/** CLIP's classifier in float64 from raw (unnormalised) prompt features computed with the model directly. */
export async function referenceClassifier(
  model: ClipModel,
  tokenizer: ClipTokenizer,
  classes: string[],
  templates: readonly string[],
): Promise<Float64Array> {
  const dim = model.config.embed_dim;
  const prompts = classes.flatMap((c) => templates.map((t) => fillTemplate(t, c)));
  const raw = await withScope(async () =>
    await noGrad(() => model.encodeText(model.uploadTokens(tokenizer.tokenize(prompts, model.contextLength)))).read()
  );
  const perPrompt = normaliseRows(raw, dim);
  const out = new Float64Array(classes.length * dim);
  for (let c = 0; c < classes.length; c++) {
    const mean = new Float64Array(dim);
    for (let t = 0; t < templates.length; t++) {
      for (let k = 0; k < dim; k++) mean[k] += perPrompt[(c * templates.length + t) * dim + k] / templates.length;
    }
    const norm = Math.sqrt(mean.reduce((s, v) => s + v * v, 0));
    for (let k = 0; k < dim; k++) out[c * dim + k] = mean[k] / norm;
  }
  return out;
}
