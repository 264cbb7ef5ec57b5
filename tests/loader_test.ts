import assert from "node:assert/strict";
import sharp from "sharp";
import { type Batch, Loader, type LoaderOptions } from "../lib/data/loader.ts";
import { OPENAI_MEAN, OPENAI_STD } from "../lib/data/image.ts";
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
