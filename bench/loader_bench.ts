/**
 * Data loader throughput: Loader.batches() at 224 px, batch 64, over two WebDataset shards of synthetic 300-500 px
 * JPEGs with captions, once with the eval transform and once with the training transform (random resized crop).
 * Everything a training step waits for is timed: shard reading, decoding, resizing, normalising, tokenising and
 * batch assembly, from the batches() call to the last batch. The consumer releases each batch, as a training step
 * does once the images are on the GPU.
 *
 * "warm" passes share one decode pool, as the epochs of a training run do, after an untimed warm-up pass; "cold"
 * passes start their own decode workers (what a one-off Loader pays, startup included).
 *
 * Standalone: `deno run -A bench/loader_bench.ts [--images N] [--repeat N] [--decode-workers N] [--concurrency N]
 * [--cold] [--keep-batches]` prints one JSON line per pass.
 */
import process from "node:process";
import { parseArgs } from "node:util";
import sharp from "sharp";
import { DecodePool, defaultDecodeWorkers } from "../lib/data/decode_pool.ts";
import { OPENAI_MEAN, OPENAI_STD, type Preprocess } from "../lib/data/image.ts";
import { Loader } from "../lib/data/loader.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";

const IMAGE_COUNT = 400;
const SHARD_COUNT = 2;
export const BATCH_SIZE = 64;
export const PREPROCESS: Preprocess = { size: 224, mean: OPENAI_MEAN, std: OPENAI_STD };

const WORDS = ["a", "photo", "of", "the", "red", "small", "dog", "cat", "house", "on", "a", "sunny", "beach", "street"];

/** A linear congruential generator: the same images and captions on every run. */
export function lcg(seed: number): () => number {
  let state = seed >>> 0;
  return () => (state = (Math.imul(state, 1103515245) + 12345) >>> 0) / 4294967296;
}

/**
 * Photo-like content (smooth colour gradients, a few soft blobs and mild noise) encoded at quality 90, so that the
 * JPEGs are about as large and as costly to decode as photographs of the same size.
 */
export async function syntheticJpeg(random: () => number): Promise<Uint8Array> {
  const width = 300 + Math.floor(random() * 201);
  const height = 300 + Math.floor(random() * 201);
  const phase = random() * 6;
  const blobs = Array.from({ length: 4 }, () => [random() * width, random() * height, 20 + random() * 80]);
  const pixels = new Uint8Array(width * height * 3);
  const noise = lcg(Math.floor(random() * 1e9));
  const gx = Float64Array.from({ length: width }, (_, x) => 100 * Math.sin(x / 23 + phase));
  const shade = new Float64Array(width);
  for (let y = 0; y < height; y++) {
    const gy = 100 * Math.cos(y / 31 - phase);
    shade.fill(0);
    for (const [bx, by, r] of blobs) {
      // Only the columns near the blob can be inside it.
      for (let x = Math.max(0, Math.floor(bx - r)); x < Math.min(width, Math.ceil(bx + r) + 1); x++) {
        if ((x - bx) ** 2 + (y - by) ** 2 < r * r) shade[x] += 40;
      }
    }
    for (let x = 0; x < width; x++) {
      const i = (y * width + x) * 3;
      pixels[i] = 128 + gx[x] - shade[x] + 16 * noise();
      pixels[i + 1] = 128 + gy + shade[x] / 2 + 16 * noise();
      pixels[i + 2] = ((x + y) >> 1) + shade[x] + 16 * noise();
    }
  }
  const jpeg = await sharp(pixels, { raw: { width, height, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
  return new Uint8Array(jpeg.buffer, jpeg.byteOffset, jpeg.length);
}

/** Writes `count` samples (jpg + txt) round-robin into `shardCount` tar shards under `dir`; returns their paths. */
export async function writeSyntheticShards(dir: string, count = IMAGE_COUNT, shardCount = SHARD_COUNT) {
  const random = lcg(20240601);
  const writers = await Promise.all(
    Array.from({ length: shardCount }, (_, s) => TarWriter.create(`${dir}/bench-${s}.tar`)),
  );
  const encoder = new TextEncoder();
  const write = async (n: number, jpeg: Promise<Uint8Array>, caption: string) => {
    const key = `sample${n.toString().padStart(6, "0")}`;
    const writer = writers[n % shardCount];
    await writer.add(`${key}.jpg`, await jpeg);
    await writer.add(`${key}.txt`, encoder.encode(caption));
  };
  // Each image's pixels are drawn while the previous one is being encoded in sharp's threads.
  let previous: (() => Promise<void>) | undefined;
  for (let n = 0; n < count; n++) {
    const words = Array.from({ length: 5 + Math.floor(random() * 10) }, () => WORDS[Math.floor(random() * 14)]);
    const jpeg = syntheticJpeg(random);
    await previous?.();
    previous = () => write(n, jpeg, words.join(" "));
  }
  await previous?.();
  for (const w of writers) await w.close();
  return writers.map((_, s) => `${dir}/bench-${s}.tar`);
}

export interface LoaderPass {
  transform: "eval" | "train";
  /** Whether the pass used an already running decode pool. */
  warm: boolean;
  images: number;
  seconds: number;
  imagesPerSecond: number;
  /** CPU time of the whole process (every thread) per image: what the pass costs whatever else the machine runs. */
  cpuMsPerImage: number;
}

export interface LoaderBenchOptions {
  /** Default: one per core; 0 decodes on the calling thread. */
  decodeWorkers?: number;
  concurrency?: number;
  /** Decode on this running pool (warm) instead of the Loader starting its own workers (cold). */
  decodePool?: DecodePool;
  /** Keep every batch instead of releasing it once used, as a consumer that never calls `release()` does. */
  keepBatches?: boolean;
}

/** Times one full pass of Loader.batches() over `shards`. */
export async function timeLoaderPass(
  shards: string[],
  tokenizer: ClipTokenizer,
  augment: boolean,
  opts: LoaderBenchOptions = {},
): Promise<LoaderPass> {
  const loader = new Loader({
    shards,
    tokenizer,
    preprocess: PREPROCESS,
    contextLength: 77,
    batchSize: BATCH_SIZE,
    augment,
    workers: SHARD_COUNT,
    seed: 1,
    decodeWorkers: opts.decodeWorkers,
    decodePool: opts.decodePool,
    concurrency: opts.concurrency,
  });
  let images = 0;
  const cpuStart = process.cpuUsage();
  const start = performance.now();
  for await (const batch of loader.batches()) {
    images += batch.size;
    // A training step releases the batch once its images are uploaded to the GPU.
    if (!opts.keepBatches) batch.release?.();
  }
  const seconds = (performance.now() - start) / 1000;
  const cpu = process.cpuUsage(cpuStart);
  return {
    transform: augment ? "train" : "eval",
    warm: opts.decodePool !== undefined,
    images,
    seconds,
    imagesPerSecond: images / seconds,
    cpuMsPerImage: (cpu.user + cpu.system) / 1000 / images,
  };
}

/**
 * Eval and training passes over freshly written shards, `repeat` rounds of both: warm (one shared decode pool, after
 * an untimed warm-up pass) unless `cold` or `decodeWorkers` is 0.
 */
export async function measureLoader(
  opts: LoaderBenchOptions & { images?: number; repeat?: number; cold?: boolean } = {},
): Promise<LoaderPass[]> {
  const tokenizer = await ClipTokenizer.load();
  const dir = await Deno.makeTempDir({ prefix: "clip-loader-bench-" });
  const workers = opts.decodeWorkers ?? defaultDecodeWorkers();
  const pool = !opts.cold && workers > 0 ? new DecodePool(workers) : undefined;
  try {
    const shards = await writeSyntheticShards(dir, opts.images ?? IMAGE_COUNT);
    const passOpts = { ...opts, decodePool: pool };
    if (!opts.cold) await timeLoaderPass(shards, tokenizer, true, passOpts);
    const passes: LoaderPass[] = [];
    for (let r = 0; r < (opts.repeat ?? 1); r++) {
      for (const augment of [false, true]) passes.push(await timeLoaderPass(shards, tokenizer, augment, passOpts));
    }
    return passes;
  } finally {
    await pool?.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** The row for `deno task bench`: the slower of the warm eval and training passes, in images per second. */
export async function benchLoader(): Promise<{ name: "loader_224"; unit: "images/s"; value: number }> {
  const passes = await measureLoader();
  return { name: "loader_224", unit: "images/s", value: Math.min(...passes.map((p) => p.imagesPerSecond)) };
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      images: { type: "string" },
      repeat: { type: "string" },
      "decode-workers": { type: "string" },
      concurrency: { type: "string" },
      cold: { type: "boolean", default: false },
      "keep-batches": { type: "boolean", default: false },
    },
  });
  const int = (v: string | undefined) => (v === undefined ? undefined : Number.parseInt(v, 10));
  const passes = await measureLoader({
    images: int(values.images),
    repeat: int(values.repeat),
    decodeWorkers: int(values["decode-workers"]),
    concurrency: int(values.concurrency),
    cold: values.cold,
    keepBatches: values["keep-batches"],
  });
  for (const p of passes) {
    console.log(JSON.stringify({
      ...p,
      seconds: Number(p.seconds.toFixed(3)),
      imagesPerSecond: Math.round(p.imagesPerSecond),
      cpuMsPerImage: Number(p.cpuMsPerImage.toFixed(2)),
    }));
  }
}
