// Reliability, in the sizes CI can afford: seeded fuzzing of the tar, safetensors, tokenizer, image and config readers;
// remote shards through a fault-injecting server; kill -9 of clip train (mid-checkpoint included) and clip embed;
// output folders that are read-only, missing or full; GPU limits; security. `deno task reliability` runs the long
// versions (20 training kills, thousands of fuzz inputs) and prints the table.
import assert from "node:assert/strict";
import { Rng } from "../lib/data/rng.ts";
import { openShard, redirectAllowed, type ShardRetry } from "../lib/data/shards.ts";
import { readTar, TarError } from "../lib/data/tar.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { cleanText } from "../lib/data/text_fix.ts";
import { ClipError } from "../lib/errors.ts";
import { GpuLimitError } from "../lib/gpu/buffer_pool.ts";
import { checkFolderPath, describeWriteFailure, ensureWritableFolder } from "../lib/io/output_folder.ts";
import { defaultPreprocess, expectedShapes, loadModelConfig } from "../lib/nn/config.ts";
import { FaultServer } from "../lib/reliability/fault_server.ts";
import { runFuzz } from "../lib/reliability/fuzz.ts";
import { streamOf } from "../lib/reliability/fuzz_target.ts";
import { runGpuLimitChecks } from "../lib/reliability/gpu_limits.ts";
import { runEmbedKillCycles } from "../lib/reliability/kill_embed.ts";
import { runTrainKillCycles } from "../lib/reliability/kill_train.ts";
import { runOutputFaults } from "../lib/reliability/output_faults.ts";
import { runRemoteShardFaults } from "../lib/reliability/remote_shards.ts";
import { runSecurityChecks } from "../lib/reliability/security.ts";
import { formatTable, fuzzRow } from "../lib/reliability/table.ts";
import { buildTar } from "../lib/reliability/tar_bytes.ts";
import type { FuzzTargetName } from "../lib/reliability/targets.ts";
import { findLatestCheckpoint, saveCheckpoint } from "../lib/train/checkpoint.ts";

async function withTempDir<T>(fn: (dir: string) => Promise<T>): Promise<T> {
  const dir = await Deno.makeTempDir({ prefix: "clip-reliability-test-" });
  try {
    return await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fuzzing

/** Per target: inputs, and outcomes the seeded inputs must reach (so the fuzzing provably reaches those checks). */
const FUZZ_PLAN: [FuzzTargetName, number, string[]][] = [
  ["tar", 300, ["TarError", "accepted", "skipped"]],
  [
    "safetensors",
    300,
    [
      "SafetensorsError:header-length",
      "SafetensorsError:header-json",
      "SafetensorsError:duplicate-key",
      "SafetensorsError:bad-offsets",
      "SafetensorsError:overlap",
      "SafetensorsError:byte-length",
      "SafetensorsError:bad-shape",
      "SafetensorsError:unknown-dtype",
      "accepted",
    ],
  ],
  ["tokenizer", 80, ["accepted"]],
  ["image", 150, ["ImageDecodeError", "ImageTooLargeError", "accepted"]],
  ["config", 300, ["ClipError", "accepted"]],
];

Deno.test("fuzz: every input ends accepted, skipped and counted, or refused by a named error; no crash, hang or memory blow-up", async () => {
  const rows = [];
  for (const [target, inputs, expected] of FUZZ_PLAN) {
    const report = await runFuzz(target, { seed: 20240601, inputs });
    assert.equal(report.inputs, inputs, target);
    assert.deepEqual(report.crashes, [], `${target} crashes`);
    assert.deepEqual(report.hangs, [], `${target} hangs`);
    assert.deepEqual(report.memory, [], `${target} memory`);
    for (const outcome of expected) assert.ok((report.outcomes[outcome] ?? 0) > 0, `${target} reached ${outcome}`);
    rows.push(fuzzRow(report));
  }
  const table = formatTable(rows);
  assert.match(table, /\| fuzz +\| tar +\| 300 +\| 0 +\| 0 /);
  assert.match(table, /1130 inputs fuzzed; 0 crashes, 0 hangs; 0 of 5 checks failed/);
});

Deno.test("fuzz: the tar and tokenizer inputs cover every offset class, absurd size, 1 MB string and surrogate class", async () => {
  const tar = await runFuzz("tar", { seed: 7, inputs: 200 });
  for (const kind of ["in-header", "block-boundary", "in-data", "in-padding", "in-end"]) {
    assert.ok(tar.kinds[`truncate:${kind}`] > 0, kind);
  }
  for (const kind of ["octal-8GiB", "base256-huge", "octal-200MB"]) assert.ok(tar.kinds[`size:${kind}`] > 0, kind);
  const tokenizer = await runFuzz("tokenizer", { seed: 11, inputs: 60 });
  assert.ok(Object.keys(tokenizer.kinds).some((k) => k.startsWith("1MB:")), "a 1 MB string");
  assert.ok(tokenizer.kinds.surrogates > 0 && tokenizer.kinds.controls > 0);
  assert.equal(tar.crashes.length + tar.hangs.length + tokenizer.crashes.length + tokenizer.hangs.length, 0);
});

Deno.test("tar: a 200 MB size field over 4 KB of data allocates for the data, not the size field", async () => {
  const { bytes } = buildTar([{ name: "a.jpg", data: new Uint8Array(4096) }]);
  const header = bytes.subarray(0, 512);
  header.set(new TextEncoder().encode((200_000_000).toString(8).padStart(11, "0") + "\0"), 124);
  header.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of header) sum += b;
  header.set(new TextEncoder().encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
  const before = Deno.memoryUsage().external;
  let error: unknown;
  try {
    for await (const _ of readTar(streamOf(bytes, 4096))) { /* drain */ }
  } catch (e) {
    error = e;
  }
  const grown = Deno.memoryUsage().external - before;
  assert.ok(error instanceof TarError && /truncated/.test(error.message), String(error));
  assert.ok(grown < 16 * 2 ** 20, `external memory grew by ${grown} bytes`);
  // A real member over 1 MiB, gathered piece by piece, reads back exactly whatever the chunking.
  const big = new Uint8Array(3 * 2 ** 20 + 123).map((_, i) => (i * 2654435761) >>> 24);
  const tar = buildTar([{ name: "big.bin", data: big }]).bytes;
  for (const chunk of [1000, 65536, tar.length]) {
    const entries = [];
    for await (const e of readTar(streamOf(tar, chunk))) entries.push(e);
    assert.equal(entries.length, 1);
    assert.deepEqual(entries[0].data, big);
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Tokenizer: the heap-ordered BPE against open_clip's textbook loop

/** open_clip's SimpleTokenizer.bpe, string for string, as the reference. */
async function textbookTokenizer(): Promise<(text: string) => number[]> {
  const url = new URL("../data/bpe_simple_vocab_16e6.txt.gz", import.meta.url);
  const text = await new Response((await Deno.open(url)).readable.pipeThrough(new DecompressionStream("gzip"))).text();
  const merges = text.split("\n").slice(1, 49152 - 256 - 2 + 1).map((l) => l.split(" ") as [string, string]);
  const printable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const byteChar = new Map<number, string>();
  let shifted = 0;
  for (let b = 0; b < 256; b++) if (printable(b)) byteChar.set(b, String.fromCharCode(b));
  for (let b = 0; b < 256; b++) if (!printable(b)) byteChar.set(b, String.fromCharCode(256 + shifted++));
  const vocab = [...byteChar.values()];
  vocab.push(...vocab.map((v) => v + "</w>"), ...merges.map(([a, b]) => a + b), "<start_of_text>", "<end_of_text>");
  const encoder = new Map(vocab.map((v, i) => [v, i]));
  const ranks = new Map(merges.map(([a, b], i) => [`${a} ${b}`, i]));
  const bpe = (token: string[]): string[] => {
    let word = [...token.slice(0, -1), token[token.length - 1] + "</w>"];
    while (word.length > 1) {
      let best: [string, string] | null = null;
      let bestRank = Infinity;
      for (let i = 0; i + 1 < word.length; i++) {
        const rank = ranks.get(`${word[i]} ${word[i + 1]}`) ?? Infinity;
        if (rank < bestRank) [bestRank, best] = [rank, [word[i], word[i + 1]]];
      }
      if (!best) break;
      const next: string[] = [];
      for (let i = 0; i < word.length;) {
        if (word[i] === best[0] && i + 1 < word.length && word[i + 1] === best[1]) {
          next.push(best[0] + best[1]);
          i += 2;
        } else next.push(word[i++]);
      }
      word = next;
    }
    return word;
  };
  const pieces = /<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^ \p{L}\p{N}]+/giu;
  return (text: string) =>
    [...cleanText(text).matchAll(pieces)].flatMap(([piece]) =>
      piece === "<start_of_text>" || piece === "<end_of_text>"
        ? [encoder.get(piece)!]
        : bpe([...new TextEncoder().encode(piece)].map((b) => byteChar.get(b)!)).map((t) => encoder.get(t)!)
    );
}

Deno.test("tokenizer: the heap-ordered BPE gives open_clip's textbook BPE ids; a 1 MB word takes seconds, not minutes", async () => {
  const tokenizer = await ClipTokenizer.load();
  const reference = await textbookTokenizer();
  const rng = new Rng(99);
  const alphabets = [
    "abcdefghijklmnopqrstuvwxyz",
    "aaaaabbbbeee",
    "éèàüößçñ",
    "αβγδεζηθ",
    "абвгдеж",
    "日本語中文字",
    "한국어글",
  ];
  for (let i = 0; i < 1500; i++) {
    const letters = alphabets[rng.int(alphabets.length)];
    let text = "";
    for (let n = 1 + rng.int(40); n > 0; n--) text += letters[rng.int(letters.length)] + (rng.int(9) === 0 ? " " : "");
    assert.deepEqual(tokenizer.encode(text), reference(text), JSON.stringify(text));
  }
  let huge = "";
  while (huge.length < 1_000_000) huge += "abcdefghijklmnopqrstuvwxyz"[rng.int(26)];
  const started = performance.now();
  const row = tokenizer.tokenize([huge]);
  const seconds = (performance.now() - started) / 1000;
  assert.ok(seconds < 20, `1 MB word took ${seconds} s`);
  assert.deepEqual([...row.subarray(1, 76)], tokenizer.encode(huge.slice(0, 2000)).slice(0, 75));
});

// ---------------------------------------------------------------------------------------------------------------
// Remote shards

Deno.test("shards: transient failures are retried with doubling backoff and resumed by Range; definite ones are not", async () => {
  const payload = buildTar([{ name: "a.jpg", data: new Uint8Array(100_000).map((_, i) => i % 251) }]).bytes;
  const files = new Map(["/500.tar", "/reset.tar", "/stall.tar", "/silent.tar", "/dead.tar"].map((p) => [p, payload]));
  const server = FaultServer.start({
    files,
    faults: new Map([
      ["/500.tar", ["http-500", "http-500"]],
      ["/reset.tar", ["reset", "reset"]],
      ["/stall.tar", ["stall"]],
      ["/silent.tar", ["no-response"]],
      ["/dead.tar", ["http-500", "http-500", "http-500"]],
    ]),
  });
  const read = async (stream: ReadableStream<Uint8Array>) => new Uint8Array(await new Response(stream).arrayBuffer());
  try {
    const retries: ShardRetry[] = [];
    const opts = {
      retries: 2,
      backoffMs: 50,
      timeoutMs: 300,
      stallTimeoutMs: 300,
      onRetry: (r: ShardRetry) => retries.push(r),
    };
    assert.deepEqual(await read(await openShard(server.url("/500.tar"), opts)), payload);
    assert.deepEqual(retries.map((r) => r.attempt), [1, 2]);
    assert.ok(
      retries[0].delayMs >= 50 && retries[0].delayMs <= 60 && retries[1].delayMs >= 100 && retries[1].delayMs <= 120,
    );
    assert.match(retries[0].reason, /HTTP 500/);

    assert.deepEqual(await read(await openShard(server.url("/reset.tar"), opts)), payload);
    assert.equal(server.rangeRequests, 2, "both reconnections continued where the body broke off");
    assert.deepEqual(await read(await openShard(server.url("/stall.tar"), opts)), payload);
    assert.deepEqual(await read(await openShard(server.url("/silent.tar"), opts)), payload);

    retries.length = 0;
    const started = performance.now();
    await assert.rejects(
      openShard(server.url("/dead.tar"), opts),
      (e: Error) => e instanceof ClipError && /dead\.tar failed: HTTP 500.*gave up after 3 attempts/.test(e.message),
    );
    assert.ok(performance.now() - started >= 150 && retries.length === 2);

    retries.length = 0;
    await assert.rejects(openShard(server.url("/missing.tar"), opts), /HTTP 404/);
    assert.equal(retries.length, 0, "a 404 is not retried");
    assert.deepEqual(server.injected, { "http-500": 5, reset: 2, stall: 1, "no-response": 1 });
  } finally {
    await server.close();
  }
  assert.equal(redirectAllowed("https://a.org/x.tar", "http://a.org/x.tar"), false);
  assert.equal(redirectAllowed("http://a.org/x.tar", "http://b.org/x.tar"), true);
  assert.equal(redirectAllowed("https://a.org/x.tar", "https://b.org/x.tar"), true);
});

Deno.test("remote shards: each fault kind is survived within the retries; past them the shard is skipped, warned and counted, and the run goes on", async () => {
  const report = await runRemoteShardFaults({ seed: 5, shards: 7 });
  assert.deepEqual(report.problems, []);
  assert.equal(report.samplesLost, 0);
  assert.ok(report.shardsGivenUp >= 1 && report.samplesSkippedCounted > 0);
  for (const [kind, n] of Object.entries(report.injected)) assert.ok(n > 0, kind);
  assert.ok(report.seconds < 30, `${report.seconds} s`);
});

// ---------------------------------------------------------------------------------------------------------------
// Checkpoints and kills

Deno.test("checkpoint: the latest pointer never names a partial checkpoint; re-saving a step replaces it whole", async () => {
  await withTempDir(async (dir) => {
    const config = await loadModelConfig("test-vit-micro");
    const weights = new Map(
      [...expectedShapes(config)].map(([k, shape]) => [k, {
        shape,
        data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(0.5),
      }]),
    );
    const moments = new Map([["m", { shape: [2], data: new Float32Array([1, 2]) }]]);
    const state = (step: number) => ({ step, epoch: 0, data: null, optimizerStep: step, settings: {} });
    const preprocess = defaultPreprocess(config);
    await saveCheckpoint(dir, config, preprocess, weights, moments, state(2));
    await saveCheckpoint(dir, config, preprocess, weights, moments, state(4));
    assert.equal(await findLatestCheckpoint(dir), `${dir}/checkpoints/step-0000004`);
    // A kill between writing the pointer and renaming step 6 into place: the pointer names a folder not there yet.
    await Deno.writeTextFile(`${dir}/latest`, "step-0000006\n");
    await Deno.mkdir(`${dir}/checkpoints/step-0000006.tmp-1`);
    await Deno.writeTextFile(`${dir}/checkpoints/step-0000006.tmp-1/state.json`, "{");
    assert.equal(await findLatestCheckpoint(dir), `${dir}/checkpoints/step-0000004`);
    // Resumed from step 2, the run saves step 4 again: the new folder replaces the old one, leftovers are gone.
    await saveCheckpoint(dir, config, preprocess, weights, moments, { ...state(4), epoch: 1 });
    const names = [];
    for await (const e of Deno.readDir(`${dir}/checkpoints`)) names.push(e.name);
    assert.deepEqual(names.sort(), ["step-0000002", "step-0000004"]);
    assert.equal(JSON.parse(await Deno.readTextFile(`${dir}/checkpoints/step-0000004/state.json`)).epoch, 1);
    assert.equal((await Deno.readTextFile(`${dir}/latest`)).trim(), "step-0000004");
  });
});

Deno.test("clip train: kill -9 while writing a checkpoint, after one and at random; every resume starts from the newest complete checkpoint and the losses equal the uninterrupted run's", async () => {
  await withTempDir(async (dir) => {
    const report = await runTrainKillCycles({
      workDir: dir,
      kills: 3,
      seed: 3,
      epochs: 1,
      moments: ["mid-checkpoint", "after-checkpoint", "random-time"],
      randomTimeMaxMs: 2500,
    });
    assert.deepEqual(report.problems, []);
    assert.equal(report.kills, 3);
    // Whether a kill lands inside the checkpoint write is a race with the writer; on a loaded machine try again.
    let whileWriting = report.killedWhileWritingCheckpoint;
    for (let attempt = 0; whileWriting === 0 && attempt < 3; attempt++) {
      const again = await runTrainKillCycles({
        workDir: `${dir}/again-${attempt}`,
        kills: 1,
        seed: 10 + attempt,
        epochs: 1,
        moments: ["mid-checkpoint"],
        randomTimeMaxMs: 2500,
      });
      assert.deepEqual(again.problems, []);
      whileWriting += again.killedWhileWritingCheckpoint;
    }
    assert.ok(whileWriting >= 1, "one kill struck while a checkpoint was being written");
    assert.ok(report.resumes >= 1);
    assert.equal(report.resumesVerified, report.resumes);
    assert.equal(report.stepsEqual, 6);
  });
});

Deno.test("clip embed: killed and restarted, finished parts are kept, the partial part is redone, and the rows equal an uninterrupted run's", async () => {
  await withTempDir(async (dir) => {
    const report = await runEmbedKillCycles({ workDir: dir, kills: 1, seed: 2 });
    assert.deepEqual(report.problems, []);
    assert.equal(report.kills, 1);
    assert.ok(report.partsKept >= 1 && report.partsKept < report.parts, `${report.partsKept} parts kept`);
    assert.equal(report.resumesVerified, report.resumes);
    assert.equal(report.partsDiffering, 0);
    assert.equal(report.rowsLost, 0);
  });
});

// ---------------------------------------------------------------------------------------------------------------
// Output folders, GPU limits, security

Deno.test("output folder: write failures are named (disk full, read-only, a file in the path)", async () => {
  const full = await Deno.writeFile("/dev/full", new Uint8Array(8)).then(() => null, (e) => e);
  assert.equal(describeWriteFailure(full), "the disk is full");
  assert.equal(describeWriteFailure(new Error("x (os error 30)")), "the file system is read-only");
  assert.equal(describeWriteFailure(new ClipError("not a write failure")), undefined);
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(`${dir}/file`, "x");
    await assert.rejects(
      ensureWritableFolder(`${dir}/file/out`, "--out"),
      /--out '.*file\/out' is not a writable folder: a part of the path is a file/,
    );
    await assert.rejects(checkFolderPath(`${dir}/file`, "--out"), /is a file, not a folder/);
    await ensureWritableFolder(`${dir}/new/out`, "--out");
    assert.deepEqual([...Deno.readDirSync(`${dir}/new/out`)], [], "the probe file is removed");
  });
});

Deno.test("output problems: read-only, through a file, missing, and full disks end in a clear error with no half-written file under a final name", async () => {
  await withTempDir(async (dir) => {
    const results = await runOutputFaults(dir);
    for (const r of results) assert.ok(r.ok, `${r.check} (${r.method}): ${r.detail}`);
    assert.equal(results.length, 6);
  });
});

Deno.test("GPU limits: oversized buffers and bindings are refused by name; clip embed suggests a smaller batch", async () => {
  const error = new GpuLimitError("maxStorageBufferBindingSize", 160 * 2 ** 20, 128 * 2 ** 20, "kernel k");
  assert.equal(error.suggestedBatchSize(1000), 800);
  assert.equal(new GpuLimitError("memory", null, null, "x").suggestedBatchSize(64), 32);
  assert.equal(error.suggestedBatchSize(1), 1);
  await withTempDir(async (dir) => {
    for (const r of await runGpuLimitChecks(dir)) assert.ok(r.ok, `${r.check}: ${r.detail}`);
  });
});

Deno.test("security: tar names never become paths, weights only from safetensors, no https-to-http redirect", async () => {
  await withTempDir(async (dir) => {
    for (const r of await runSecurityChecks(dir)) assert.ok(r.ok, `${r.check}: ${r.detail}`);
  });
});
