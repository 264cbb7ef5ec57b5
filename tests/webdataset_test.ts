import assert from "node:assert/strict";
import { ClipError, UsageError } from "../lib/errors.ts";
import { Rng } from "../lib/data/rng.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";
import {
  type DataPosition,
  IMAGE_TEXT_REQUIREMENTS,
  type RawSample,
  splitMemberName,
  validateShards,
  type WebDatasetOptions,
  WebDatasetReader,
} from "../lib/data/webdataset.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------------------------
// Rng

/** xoshiro128** written independently with BigInt arithmetic, as the reference for the 32-bit implementation. */
function referenceXoshiro(state: number[], count: number): number[] {
  const mask = (1n << 32n) - 1n;
  let [s0, s1, s2, s3] = state.map(BigInt);
  const rotl = (x: bigint, k: bigint) => ((x << k) | (x >> (32n - k))) & mask;
  const out: number[] = [];
  for (let i = 0; i < count; i++) {
    out.push(Number((rotl((s1 * 5n) & mask, 7n) * 9n) & mask));
    const t = (s1 << 9n) & mask;
    s2 ^= s0;
    s3 ^= s1;
    s1 ^= s2;
    s0 ^= s3;
    s2 ^= t;
    s3 = rotl(s3, 11n);
  }
  return out;
}

Deno.test("rng: xoshiro128** matches hand-computed and BigInt reference outputs", () => {
  const rng = Rng.fromState([1, 2, 3, 4]);
  const got = Array.from({ length: 1000 }, () => rng.nextUint32());
  // First three by hand: rotl(2*5, 7)*9 = 11520; then s1 = 0 gives 0; then s1 = 1029 gives 5145 << 7 * 9.
  assert.deepEqual(got.slice(0, 3), [11520, 0, 5927040]);
  assert.deepEqual(got, referenceXoshiro([1, 2, 3, 4], 1000));
  const seeded = new Rng(42);
  const state = seeded.state();
  assert.deepEqual(Array.from({ length: 100 }, () => seeded.nextUint32()), referenceXoshiro(state, 100));
});

Deno.test("rng: state save/restore continues the exact sequence", () => {
  const rng = new Rng(2024);
  for (let i = 0; i < 137; i++) rng.next();
  const saved = JSON.parse(JSON.stringify(rng.state()));
  const expected = [rng.next(), rng.int(1000), rng.int(7), rng.shuffle([1, 2, 3, 4, 5, 6]), rng.next()];
  const restored = Rng.fromState(saved);
  assert.deepEqual([
    restored.next(),
    restored.int(1000),
    restored.int(7),
    restored.shuffle([1, 2, 3, 4, 5, 6]),
    restored.next(),
  ], expected);
  assert.throws(() => Rng.fromState([0, 0, 0, 0]), RangeError);
  assert.throws(() => Rng.fromState([1, 2, 3]), RangeError);
  assert.throws(() => Rng.fromState([1, 2, 3, 2 ** 32]), RangeError);
});

Deno.test("rng: seeds and derived seeds give distinct, reproducible streams", () => {
  const draw = (rng: Rng) => Array.from({ length: 8 }, () => rng.nextUint32());
  assert.deepEqual(draw(new Rng(7)), draw(new Rng(7)));
  assert.notDeepEqual(draw(new Rng(7)), draw(new Rng(8)));
  assert.notDeepEqual(draw(new Rng(1)), draw(new Rng(1 + 2 ** 32))); // the high half of a seed matters
  assert.notDeepEqual(draw(new Rng(-1)), draw(new Rng(1)));
  assert.deepEqual(draw(Rng.derive(1, 2, 3)), draw(Rng.derive(1, 2, 3)));
  assert.notDeepEqual(draw(Rng.derive(1, 2, 3)), draw(Rng.derive(1, 3, 2)));
  assert.throws(() => new Rng(0.5), RangeError);
});

Deno.test("rng: next, int and shuffle have the right ranges and distributions", () => {
  const rng = new Rng(99);
  const n = 100_000;
  let sum = 0;
  for (let i = 0; i < n; i++) {
    const x = rng.next();
    assert.ok(x >= 0 && x < 1);
    sum += x;
  }
  // Mean of U(0,1) is 0.5 with standard error 1/sqrt(12 n) = 0.0009: allow 5 standard errors.
  assert.ok(Math.abs(sum / n - 0.5) < 0.0046, `mean ${sum / n}`);
  const counts = new Array(10).fill(0);
  for (let i = 0; i < n; i++) counts[rng.int(10)]++;
  const chi2 = counts.reduce((s, c) => s + (c - n / 10) ** 2 / (n / 10), 0);
  assert.ok(chi2 < 27.9, `chi-square ${chi2} (9 degrees of freedom, p = 0.001 at 27.9)`);
  const shuffled = rng.shuffle(Array.from({ length: 50 }, (_, i) => i));
  assert.deepEqual([...shuffled].sort((a, b) => a - b), Array.from({ length: 50 }, (_, i) => i));
  assert.notDeepEqual(shuffled, Array.from({ length: 50 }, (_, i) => i));
});

// ---------------------------------------------------------------------------------------------------------------
// WebDataset

/** Shard i holds `sizes[i]` samples `s{i}_{j}` with a fake image and a caption. Returns the shard paths. */
async function writeShards(dir: string, sizes: number[]): Promise<string[]> {
  const paths: string[] = [];
  for (const [i, size] of sizes.entries()) {
    const path = `${dir}/shard-${String(i).padStart(6, "0")}.tar`;
    const writer = await TarWriter.create(path);
    for (let j = 0; j < size; j++) {
      await writer.add(`s${i}_${j}.jpg`, new Uint8Array(100 + j).fill(i));
      await writer.add(`s${i}_${j}.txt`, encoder.encode(`caption ${i} ${j}`));
    }
    await writer.close();
    paths.push(path);
  }
  return paths;
}

async function writeTar(path: string, members: [string, string][]): Promise<void> {
  const writer = await TarWriter.create(path);
  for (const [name, text] of members) await writer.add(name, encoder.encode(text));
  await writer.close();
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function collect(reader: WebDatasetReader, limit = Infinity): Promise<RawSample[]> {
  const out: RawSample[] = [];
  if (limit <= 0) return out;
  for await (const sample of reader.samples()) {
    out.push(sample);
    if (out.length >= limit) break;
  }
  return out;
}

async function keys(opts: WebDatasetOptions): Promise<string[]> {
  return (await collect(new WebDatasetReader(opts))).map((s) => s.key);
}

const SIZES = [3, 5, 4, 6, 2, 7, 5]; // 7 shards, 32 samples
const ALL_KEYS = SIZES.flatMap((n, i) => Array.from({ length: n }, (_, j) => `s${i}_${j}`));

Deno.test("webdataset: member names split at the first dot of the base name", () => {
  assert.deepEqual(splitMemberName("a/b.c/x.seg.JPG"), { key: "a/b.c/x", extension: "seg.jpg" });
  assert.deepEqual(splitMemberName("000123.txt"), { key: "000123", extension: "txt" });
  assert.deepEqual(splitMemberName("./dir/k.Json"), { key: "./dir/k", extension: "json" });
  assert.equal(splitMemberName("README"), undefined);
  assert.equal(splitMemberName(".hidden"), undefined);
  assert.equal(splitMemberName("dir/.x.jpg"), undefined);
});

Deno.test("webdataset: consecutive members with one key form a sample", async () => {
  await withTempDir(async (dir) => {
    await writeTar(`${dir}/a.tar`, [
      ["k1.jpg", "i1"],
      ["k1.TXT", "t1"],
      ["README", "not a sample"],
      ["k2.jpg", "i2"],
      ["k2.json", '{"caption":"c2"}'],
      ["k1.txt", "again"], // the key comes back after another: a new sample, as WebDataset does
    ]);
    const samples = await collect(new WebDatasetReader({ shards: [`${dir}/a.tar`] }));
    assert.deepEqual(
      samples.map((s) => [s.key, s.shard, [...s.files].map(([ext, data]) => `${ext}=${decoder.decode(data)}`)]),
      [
        ["k1", `${dir}/a.tar`, ["jpg=i1", "txt=t1"]],
        ["k2", `${dir}/a.tar`, ["jpg=i2", 'json={"caption":"c2"}']],
        ["k1", `${dir}/a.tar`, ["txt=again"]],
      ],
    );
  });
});

Deno.test("webdataset: machines x workers read every sample exactly once per epoch", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, SIZES);
    for (const shuffleShards of [false, true]) {
      for (const [shardCount, workerCount] of [[1, 1], [2, 1], [3, 2], [2, 4], [1, 7]]) {
        const seen: string[] = [];
        for (let shardIndex = 0; shardIndex < shardCount; shardIndex++) {
          for (let workerIndex = 0; workerIndex < workerCount; workerIndex++) {
            seen.push(
              ...await keys({
                shards,
                shardIndex,
                shardCount,
                workerIndex,
                workerCount,
                shuffleShards,
                seed: 5,
                epoch: 2,
              }),
            );
          }
        }
        assert.deepEqual(seen.sort(), [...ALL_KEYS].sort(), `${shardCount} machines x ${workerCount} workers`);
      }
    }
    // Without shuffling, one reader keeps the archive order.
    assert.deepEqual(await keys({ shards }), ALL_KEYS);
  });
});

Deno.test("webdataset: shard and sample shuffling are deterministic by seed and epoch", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, SIZES);
    const base = { shards, shuffleShards: true, shuffleBuffer: 8 };
    const a = await keys({ ...base, seed: 1, epoch: 0 });
    assert.deepEqual(await keys({ ...base, seed: 1, epoch: 0 }), a);
    assert.deepEqual([...a].sort(), [...ALL_KEYS].sort());
    assert.notDeepEqual(a, ALL_KEYS);
    assert.notDeepEqual(await keys({ ...base, seed: 2, epoch: 0 }), a);
    assert.notDeepEqual(await keys({ ...base, seed: 1, epoch: 1 }), a);
    // Shard shuffling alone keeps each shard's samples together and in order.
    const shardOnly = await keys({ shards, shuffleShards: true, seed: 3 });
    const shardSequence = shardOnly.map((k) => k.split("_")[0]).filter((s, i, all) => i === 0 || all[i - 1] !== s);
    assert.equal(shardSequence.length, SIZES.length);
    assert.notDeepEqual(shardSequence, SIZES.map((_, i) => `s${i}`));
    // Shard order is Rng(seed + epoch)'s shuffle, as documented.
    assert.deepEqual(shardSequence, new Rng(3).shuffle(SIZES.map((_, i) => `s${i}`)));
  });
});

Deno.test("webdataset: resampled mode draws shards with replacement and stops at numSamples", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, SIZES);
    const reader = new WebDatasetReader({ shards, resampled: true, numSamples: 100, seed: 9, shuffleBuffer: 5 });
    const got = (await collect(reader)).map((s) => s.key);
    assert.equal(got.length, 100);
    assert.equal(reader.counters.samples, 100);
    assert.ok(got.every((k) => ALL_KEYS.includes(k)));
    assert.ok(new Set(got).size < 100, "100 draws from 32 samples must repeat some");
    assert.deepEqual(await keys({ shards, resampled: true, numSamples: 100, seed: 9, shuffleBuffer: 5 }), got);
    // Workers draw independent streams.
    assert.notDeepEqual(
      await keys({
        shards,
        resampled: true,
        numSamples: 100,
        seed: 9,
        shuffleBuffer: 5,
        workerIndex: 1,
        workerCount: 2,
      }),
      got,
    );
  });
});

Deno.test("webdataset: samples lacking required files are skipped and counted", async () => {
  await withTempDir(async (dir) => {
    await writeTar(`${dir}/a.tar`, [
      ["ok1.jpg", "i"],
      ["ok1.txt", "a cat"],
      ["nocap.jpg", "i"],
      ["noimg.txt", "a dog"],
      ["json.png", "i"],
      ["json.json", '{"caption":"a bird"}'],
      ["emptyjson.webp", "i"],
      ["emptyjson.json", '{"caption":""}'],
      ["badjson.jpeg", "i"],
      ["badjson.json", "{not json"],
      ["ok2.JPEG", "i"],
      ["ok2.txt", "a fish"],
    ]);
    const reader = new WebDatasetReader({ shards: [`${dir}/a.tar`], required: IMAGE_TEXT_REQUIREMENTS });
    assert.deepEqual((await collect(reader)).map((s) => s.key), ["ok1", "json", "ok2"]);
    assert.deepEqual(reader.counters, { samples: 3, skippedMissingKeys: 4, skippedCorrupt: 0, failedShards: 0 });
  });
});

Deno.test("webdataset: corrupt, truncated and missing shards are counted and skipped", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, [4, 4, 4, 4]);
    // Shard 1: cut inside the image of its third sample (each member is a 512-byte header and 512 bytes of data).
    const bytes1 = await Deno.readFile(shards[1]);
    const thirdImageData = 2 * 2048 + 512;
    await Deno.writeFile(shards[1], bytes1.subarray(0, thirdImageData + 50));
    // Shard 2: a flipped byte in the header of its third sample's image (each sample is 2 x 1024 bytes).
    const bytes2 = await Deno.readFile(shards[2]);
    bytes2[2 * 2048 + 10] ^= 0xff;
    await Deno.writeFile(shards[2], bytes2);
    await Deno.remove(shards[3]);
    const warnings: string[] = [];
    const reader = new WebDatasetReader({ shards, onWarning: (m) => warnings.push(m) });
    const got = (await collect(reader)).map((s) => s.key);
    // A sample is known complete only once the next key's member has been read whole, so the damage also takes the
    // sample being assembled (s1_1, s2_1): shards 1 and 2 yield what came before it.
    assert.deepEqual(got, ["s0_0", "s0_1", "s0_2", "s0_3", "s1_0", "s2_0"]);
    assert.deepEqual(reader.counters, { samples: 6, skippedMissingKeys: 0, skippedCorrupt: 2, failedShards: 1 });
    assert.equal(warnings.length, 3);
    assert.match(warnings[0], /shard-000001\.tar is corrupt.*truncated.*offset 4658/);
    assert.match(warnings[1], /shard-000002\.tar is corrupt.*checksum at offset 4096/);
    assert.match(warnings[2], /shard-000003\.tar skipped: shard not found/);
  });
});

Deno.test("webdataset: http shards stream from a server; unreachable ones are counted as failed", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, [3, 2]);
    const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, async (request) => {
      const name = new URL(request.url).pathname.slice(1);
      if (name === "shard-000000.tar") return new Response(await Deno.readFile(shards[0]));
      return new Response("missing", { status: 404 });
    });
    try {
      const base = `http://127.0.0.1:${server.addr.port}`;
      const warnings: string[] = [];
      const reader = new WebDatasetReader({
        shards: [`${base}/shard-000000.tar`, `${base}/gone.tar`, "http://127.0.0.1:1/unreachable.tar", shards[1]],
        onWarning: (m) => warnings.push(m),
        required: IMAGE_TEXT_REQUIREMENTS,
      });
      const got = await collect(reader);
      assert.deepEqual(got.map((s) => s.key), ["s0_0", "s0_1", "s0_2", "s1_0", "s1_1"]);
      assert.equal(got[0].shard, `${base}/shard-000000.tar`);
      assert.equal(decoder.decode(got[2].files.get("txt")), "caption 0 2");
      assert.deepEqual(reader.counters, { samples: 5, skippedMissingKeys: 0, skippedCorrupt: 0, failedShards: 2 });
      assert.match(warnings[0], /gone\.tar skipped: .*HTTP 404/);
      assert.match(warnings[1], /unreachable\.tar skipped/);
    } finally {
      await server.shutdown();
    }
  });
});

Deno.test("webdataset: validateShards checks the first shard before work starts", async () => {
  await withTempDir(async (dir) => {
    const [good] = await writeShards(dir, [2]);
    assert.deepEqual(await validateShards([good], IMAGE_TEXT_REQUIREMENTS), {
      shard: good,
      samplesChecked: 1,
      extensions: ["jpg", "txt"],
    });
    await writeTar(`${dir}/cls.tar`, [["a.jpg", "i"], ["a.cls", "3"], ["b.jpg", "i"], ["b.cls", "4"]]);
    await assert.rejects(validateShards([`${dir}/cls.tar`], IMAGE_TEXT_REQUIREMENTS), (e: Error) => {
      assert.ok(e instanceof ClipError);
      assert.match(e.message, /cls\.tar/);
      assert.match(e.message, /none of the first 2 samples/);
      assert.match(e.message, /extensions found: cls, jpg/);
      return true;
    });
    await Deno.writeFile(`${dir}/junk.tar`, new Uint8Array(700).fill(65));
    await assert.rejects(
      validateShards([`${dir}/junk.tar`], IMAGE_TEXT_REQUIREMENTS),
      /junk\.tar is not a readable tar/,
    );
    await assert.rejects(validateShards([`${dir}/absent.tar`], IMAGE_TEXT_REQUIREMENTS), /absent\.tar/);
  });
});

Deno.test("webdataset: a saved position resumes the exact remaining stream", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, SIZES);
    const configs: [string, WebDatasetOptions][] = [
      ["plain", { shards }],
      ["shuffled shards + buffer", { shards, shuffleShards: true, shuffleBuffer: 6, seed: 4, epoch: 1 }],
      ["worker partition", { shards, shuffleShards: true, shuffleBuffer: 3, workerIndex: 1, workerCount: 2, seed: 8 }],
      ["resampled", { shards, resampled: true, numSamples: 40, shuffleBuffer: 5, seed: 6 }],
    ];
    for (const [label, opts] of configs) {
      const full = await keys(opts);
      for (const stopAt of [0, 1, 3, 8, 13, full.length - 1, full.length]) {
        const first = new WebDatasetReader(opts);
        const head = (await collect(first, stopAt)).map((s) => s.key);
        const saved: DataPosition = JSON.parse(JSON.stringify(first.position()));
        assert.equal(saved.samplesYielded, stopAt);
        if (opts.shuffleBuffer && stopAt > 0 && stopAt < full.length - opts.shuffleBuffer) {
          assert.equal(saved.shuffle?.buffered.length, opts.shuffleBuffer, "the buffer is part of the position");
        }
        const rest = await keys({ ...opts, resumeFrom: saved });
        assert.deepEqual([...head, ...rest], full, `${label}, resumed after ${stopAt}`);
      }
    }
    // Resuming opens only the shards still ahead: after 13 samples (3 + 5 + 4 + 1) that is shards 3 to 6.
    const opened: string[] = [];
    const openShard = (location: string) => {
      opened.push(location);
      return Deno.open(location).then((f) => f.readable);
    };
    const first = new WebDatasetReader({ shards });
    await collect(first, 13);
    assert.deepEqual(first.position(), { ...first.position(), shardCursor: 3, samplesInShard: 1 });
    const rest = await keys({ shards, openShard, resumeFrom: first.position() });
    assert.equal(rest[0], "s3_1");
    assert.deepEqual(opened, shards.slice(3));

    assert.throws(() => new WebDatasetReader({ shards, resampled: true, workerIndex: 2, workerCount: 2 }), UsageError);
    const saved = new WebDatasetReader({ shards, seed: 1 }).position();
    assert.throws(() => new WebDatasetReader({ shards, seed: 2, resumeFrom: saved }), ClipError);
  });
});

Deno.test("webdataset: empty partitions and oversized members are reported", async () => {
  await withTempDir(async (dir) => {
    const shards = await writeShards(dir, [2, 2]);
    const warnings: string[] = [];
    assert.deepEqual(await keys({ shards, workerIndex: 2, workerCount: 3, onWarning: (m) => warnings.push(m) }), []);
    assert.match(warnings[0], /no shards for machine 0 of 1, worker 2 of 3/);
    warnings.length = 0;
    const reader = new WebDatasetReader({
      shards: [shards[0]],
      maxMemberBytes: 100,
      onWarning: (m) => warnings.push(m),
    });
    // s0_0.jpg is 100 bytes and stays; s0_1.jpg is 101 bytes and is dropped, leaving its caption.
    const got = await collect(reader);
    assert.deepEqual(got.map((s) => [s.key, [...s.files.keys()]]), [["s0_0", ["jpg", "txt"]], ["s0_1", ["txt"]]]);
    assert.match(warnings[0], /"s0_1\.jpg" at offset 2048 skipped: 101 bytes/);
  });
});
