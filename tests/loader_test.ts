import assert from "node:assert/strict";
import sharp from "sharp";
import { type Batch, Loader, type LoaderOptions } from "../lib/data/loader.ts";
import { DecodePool, liveDecodeWorkers } from "../lib/data/decode_pool.ts";
import { ClipError } from "../lib/errors.ts";
import { ImageDecodeError, OPENAI_MEAN, OPENAI_STD } from "../lib/data/image.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";

const SIZE = 16;
const tokenizer = await ClipTokenizer.load();

/** Solid-colour PNGs whose red channel encodes the sample index, so decoded pixels identify the sample. */
async function solidPng(index: number): Promise<Uint8Array> {
  return new Uint8Array(
    await sharp({ create: { width: 20, height: 24, channels: 3, background: { r: index * 5, g: 100, b: 200 } } })
      .png().toBuffer(),
  );
}

/** 3 shards x 8 samples; sample 5 of shard 1 has a corrupt image, sample 2 of shard 2 has no caption. */
async function makeShards(dir: string): Promise<{ shards: string[]; valid: string[] }> {
  const enc = new TextEncoder();
  const shards: string[] = [];
  const valid: string[] = [];
  for (let s = 0; s < 3; s++) {
    const path = `${dir}/shard-${s}.tar`;
    const w = await TarWriter.create(path);
    for (let i = 0; i < 8; i++) {
      const index = s * 8 + i;
      const key = `s${index.toString().padStart(3, "0")}`;
      const corrupt = s === 1 && i === 5;
      const noCaption = s === 2 && i === 2;
      await w.add(`${key}.png`, corrupt ? enc.encode("not a png at all") : await solidPng(index));
      if (!noCaption) await w.add(`${key}.txt`, enc.encode(`a photo of sample ${index}`));
      await w.add(`${key}.cls`, enc.encode(String(index % 3)));
      if (!corrupt && !noCaption) valid.push(key);
    }
    await w.close();
    shards.push(path);
  }
  return { shards, valid };
}

function options(shards: string[], extra: Partial<LoaderOptions> = {}): LoaderOptions {
  return {
    shards,
    tokenizer,
    preprocess: { size: SIZE, mean: OPENAI_MEAN, std: OPENAI_STD },
    contextLength: 16,
    batchSize: 4,
    augment: false,
    seed: 7,
    ...extra,
  };
}

async function collect(loader: Loader): Promise<Batch[]> {
  const out: Batch[] = [];
  for await (const b of loader.batches()) out.push(b);
  return out;
}

Deno.test("loader: every valid sample once per epoch across workers; bad samples skipped and counted", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards, valid } = await makeShards(dir);
    const warnings: string[] = [];
    const loader = new Loader(options(shards, { workers: 2, onWarning: (m) => warnings.push(m) }));
    const batches = await collect(loader);
    const keys = batches.flatMap((b) => b.keys);
    assert.deepEqual([...keys].sort(), valid);
    assert.equal(loader.counters.skippedImages, 1);
    assert.equal(loader.counters.skippedMissingKeys, 1);
    assert.ok(warnings.some((w) => w.includes("s013")), "the corrupt image is named in a warning");
    // Pixels and tokens line up with keys: red channel = index * 5, caption names the index.
    for (const b of batches) {
      b.keys.forEach((key, i) => {
        const index = Number(key.slice(1));
        const red = b.images[i * 3 * SIZE * SIZE] * OPENAI_STD[0] + OPENAI_MEAN[0];
        assert.ok(Math.abs(red * 255 - index * 5) < 1e-3, `pixel of ${key}`);
        assert.equal(b.labels[i], index % 3);
        const expected = tokenizer.tokenize([`a photo of sample ${index}`], 16);
        assert.deepEqual(b.tokens.subarray(i * 16, (i + 1) * 16), expected);
      });
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loader: resuming from a batch's position gives exactly the remaining batches (shuffled, augmented)", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards } = await makeShards(dir);
    const opts = options(shards, { workers: 2, shuffleShards: true, shuffleBuffer: 5, augment: true, dropLast: true });
    const full = await collect(new Loader(opts));
    assert.ok(full.length >= 4);
    const resumed = await collect(new Loader({ ...opts, resumeFrom: full[1].position }));
    assert.equal(resumed.length, full.length - 2);
    resumed.forEach((b, i) => {
      assert.deepEqual(b.keys, full[i + 2].keys);
      assert.deepEqual(b.images, full[i + 2].images);
    });
    // A different seed gives a different order.
    const other = await collect(new Loader({ ...opts, seed: 8 }));
    assert.notDeepEqual(other.flatMap((b) => b.keys), full.flatMap((b) => b.keys));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Photo-like JPEGs of several sizes (the common decode path: JPEG header read directly, SIMD resize). */
async function makeJpegShard(dir: string, count: number): Promise<string> {
  const path = `${dir}/jpegs.tar`;
  const w = await TarWriter.create(path);
  for (let i = 0; i < count; i++) {
    const width = 40 + 7 * i;
    const height = 60 - 3 * i;
    const pixels = Uint8Array.from({ length: width * height * 3 }, (_, k) => (k * (i + 3) + (k >> 5)) & 255);
    const jpeg = await sharp(pixels, { raw: { width, height, channels: 3 } }).jpeg({ quality: 85 }).toBuffer();
    await w.add(`j${i}.jpg`, new Uint8Array(jpeg));
    await w.add(`j${i}.txt`, new TextEncoder().encode(`jpeg number ${i}`));
  }
  await w.close();
  return path;
}

function assertSameImages(actual: Batch[], expected: Batch[], label: string): void {
  assert.deepEqual(actual.map((b) => b.keys), expected.map((b) => b.keys), `${label}: keys`);
  actual.forEach((b, i) => {
    const k = b.images.findIndex((v, j) => !Object.is(v, expected[i].images[j]));
    assert.equal(k, -1, `${label}: batch ${i} differs first at ${k}`);
  });
}

Deno.test("loader: decode workers give exactly the batches decoded on the calling thread (eval and train)", async () => {
  const dir = await Deno.makeTempDir();
  const pool = new DecodePool(2);
  try {
    const { shards } = await makeShards(dir);
    const jpegs = await makeJpegShard(dir, 6);
    for (const augment of [false, true]) {
      const opts = options([...shards, jpegs], { workers: 2, augment, batchSize: 5 });
      const onThread = await collect(new Loader({ ...opts, decodeWorkers: 0 }));
      assert.equal(onThread.reduce((n, b) => n + b.size, 0), 22 + 6);
      assertSameImages(await collect(new Loader({ ...opts, decodeWorkers: 2 })), onThread, `augment ${augment}`);
      // A pool shared by several loaders, as a training run's epochs do: the same again, and it stays open.
      assertSameImages(
        await collect(new Loader({ ...opts, decodePool: pool })),
        onThread,
        `shared, augment ${augment}`,
      );
      assert.equal(liveDecodeWorkers(), 2, "the shared pool's workers outlive the pass");
    }
  } finally {
    await pool.close();
    await Deno.remove(dir, { recursive: true });
  }
  assert.equal(liveDecodeWorkers(), 0);
});

Deno.test("loader: its decode workers stop when the pass ends, is stopped early or fails", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards } = await makeShards(dir);
    const opts = options(shards, { decodeWorkers: 2 });
    await collect(new Loader(opts));
    assert.equal(liveDecodeWorkers(), 0, "after a whole pass");
    for await (const _ of new Loader(opts).batches()) break;
    assert.equal(liveDecodeWorkers(), 0, "after break");
    // The corrupt image's warning throws: the pass fails, and still stops its workers.
    const failing = new Loader({
      ...opts,
      onWarning: (m) => {
        throw new Error(`refused: ${m}`);
      },
    });
    await assert.rejects(() => collect(failing), /refused: skipped sample 's013'/);
    assert.equal(liveDecodeWorkers(), 0, "after a failure");
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loader: a program that drops a pass without finishing it still exits", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards } = await makeShards(dir);
    const child = new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("./loader_abandon_child.ts", import.meta.url).pathname, ...shards],
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const timer = setTimeout(() => child.kill("SIGKILL"), 60_000);
    const { code, stdout, stderr } = await child.output();
    clearTimeout(timer);
    const out = new TextDecoder().decode(stdout);
    assert.equal(
      code,
      0,
      `exit code ${code} (137: killed after a minute, i.e. hung); ${new TextDecoder().decode(stderr)}`,
    );
    assert.match(out, /first batch of 4; 2 decode workers running/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("loader: released batch memory is reused by later batches, with the right pixels", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards } = await makeShards(dir);
    const opts = options(shards, { decodeWorkers: 0, dropLast: true });
    const kept = await collect(new Loader(opts));
    const buffers = new Set<ArrayBufferLike>();
    let i = 0;
    for await (const b of new Loader(opts).batches()) {
      assertSameImages([b], [kept[i++]], `batch ${i}`);
      buffers.add(b.images.buffer);
      b.release?.();
    }
    assert.equal(i, kept.length);
    assert.ok(buffers.size < kept.length, `${kept.length} batches in ${buffers.size} buffers`);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("decode pool: undecodable images and failures are told apart; a closed pool refuses work", async () => {
  const pool = new DecodePool(1);
  try {
    const p = { size: 8, mean: OPENAI_MEAN, std: OPENAI_STD };
    const session = pool.session(2, 8);
    const png = await solidPng(3);
    const image = await session.decode({ bytes: png.slice(), preprocess: p });
    const red = image.pixels[0] * OPENAI_STD[0] + OPENAI_MEAN[0];
    assert.ok(Math.abs(red * 255 - 15) < 1e-3, `red channel ${red * 255}`);
    image.release();
    await assert.rejects(() => session.decode({ bytes: new Uint8Array([1, 2, 3]), preprocess: p }), ImageDecodeError);
    // A crop seed that is no integer fails inside the worker: not an image problem, so not an ImageDecodeError.
    const failure = await session.decode({ bytes: png.slice(), preprocess: p, cropSeed: [0.5] }).catch((e) => e);
    assert.ok(failure instanceof ClipError && !(failure instanceof ImageDecodeError), String(failure));
    assert.match(failure.message, /image decoding failed unexpectedly: RangeError/);
    await assert.rejects(() => session.decode({ bytes: png.slice(), preprocess: { ...p, size: 16 } }), RangeError);
    await session.close();
  } finally {
    await pool.close();
  }
  assert.equal(liveDecodeWorkers(), 0);
  assert.throws(() => pool.session(1, 8), /the image decode pool is closed/);
});
