// `clip embed` end to end with the vit_tiny fixture model: rows against features computed directly, the
// clip-retrieval layout, partitions (flags and scheduler environment) that merge by part name, resume, skipped and
// unreadable inputs, text embeddings, float16 output, and the 224 px preprocessing against open_clip's tensors.
import assert from "node:assert/strict";
import { embedCommand } from "../lib/commands/embed.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { encodeTexts } from "../lib/eval/encode.ts";
import { runEmbedJob } from "../lib/eval/embed_job.ts";
import { EmbeddingsWriter } from "../lib/io/embeddings_writer.ts";
import { readNpy, toFloat16 } from "../lib/io/npy.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { loadModel } from "../lib/nn/load.ts";
import {
  captured,
  FIXTURE_IMAGES,
  maxAbsDiff,
  normaliseRows,
  PREPROCESS_DIR,
  readParquet,
  referenceFeaturesOfFiles,
  referenceImageFeatures,
  type SampleSpec,
  VIT_TINY,
  writeShards,
} from "./eval_helpers.ts";

/**
 * Tolerance between `clip embed` rows and features computed directly (normalised in float64): the same float32 kernels
 * with other batch shapes, and float32 normalisation. Measured: 2.4e-8 (32 px fixture model), 4.5e-8 (224 px).
 */
const ROW_TOLERANCE = 5e-7;

async function embed(args: string[]): Promise<{ code: number; stderr: string }> {
  const { result, stderr } = await captured(() => embedCommand.run(args));
  return { code: result, stderr };
}

async function npyRows(path: string): Promise<{ shape: number[]; data: Float32Array }> {
  const a = await readNpy(path);
  assert.equal(a.dtype, "f32", path);
  return { shape: a.shape, data: a.data as Float32Array };
}

Deno.test("clip embed: a folder of images, rows equal the model's normalised features, bad images listed", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.mkdir(`${dir}/imgs/sub`, { recursive: true });
    const bytes = FIXTURE_IMAGES.map((f) => Deno.readFileSync(`${PREPROCESS_DIR}/${f}`));
    // Name order: a.jpg, b.png, c_bad.jpg, d.png, sub/e.jpg (the folder is searched recursively).
    const layout: [string, Uint8Array][] = [
      ["a.jpg", bytes[0]],
      ["b.png", bytes[1]],
      ["c_bad.jpg", bytes[0].slice(0, 200)], // truncated JPEG
      ["d.png", bytes[2]],
      ["sub/e.jpg", bytes[3]],
    ];
    for (const [name, data] of layout) await Deno.writeFile(`${dir}/imgs/${name}`, data);
    await Deno.writeTextFile(`${dir}/imgs/notes.txt`, "not an image");

    const out = `${dir}/out`;
    const { code } = await embed(["--model", VIT_TINY, "--images", `${dir}/imgs`, "--out", out, "--part-size", "3"]);
    assert.equal(code, 0);

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const want = await referenceFeaturesOfFiles(model, preprocess, [bytes[0], bytes[1], bytes[2], bytes[3]]);
    const part0 = await npyRows(`${out}/img_emb/img_emb_0.npy`);
    const part1 = await npyRows(`${out}/img_emb/img_emb_1.npy`);
    // Part 0 = inputs 0-2 (a, b, c_bad: c skipped), part 1 = inputs 3-4 (d, sub/e).
    assert.deepEqual(part0.shape, [2, 32]);
    assert.deepEqual(part1.shape, [2, 32]);
    const got = new Float32Array([...part0.data, ...part1.data]);
    const err = maxAbsDiff(got, want);
    assert.ok(err <= ROW_TOLERANCE, `embed rows differ from direct features by ${err}`);

    const meta0 = await readParquet(`${out}/metadata/metadata_0.parquet`);
    const meta1 = await readParquet(`${out}/metadata/metadata_1.parquet`);
    assert.deepEqual(meta0.map((r) => r.key), ["a", "b"]);
    assert.deepEqual(meta1.map((r) => r.key), ["d", "sub/e"]);
    assert.deepEqual(meta1.map((r) => r.source), [`${dir}/imgs/d.png`, `${dir}/imgs/sub/e.jpg`]);
    assert.deepEqual(meta0.map((r) => r.caption), ["", ""]);

    const skipped = (await Deno.readTextFile(`${out}/skipped/skipped_0.txt`)).trim().split("\t");
    assert.deepEqual(skipped.slice(0, 2), [`${dir}/imgs/c_bad.jpg`, "c_bad"]);
    await assert.rejects(Deno.stat(`${out}/skipped/skipped_1.txt`), Deno.errors.NotFound);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** 7 shards of 1-3 samples (image + caption), keys unique across shards. */
async function sevenShards(dir: string): Promise<{ shards: string[]; keys: string[]; captions: string[] }> {
  const bytes = FIXTURE_IMAGES.map((f) => Deno.readFileSync(`${PREPROCESS_DIR}/${f}`));
  const specs: SampleSpec[][] = [];
  const keys: string[] = [], captions: string[] = [];
  for (let s = 0; s < 7; s++) {
    const samples: SampleSpec[] = [];
    for (let j = 0; j < 1 + (s % 3); j++) {
      const key = `s${s}_${j}`;
      const caption = `a photo number ${j} in shard ${s}`;
      samples.push({ key, files: { jpg: bytes[(s + j) % 4], txt: caption } });
      keys.push(key);
      captions.push(caption);
    }
    specs.push(samples);
  }
  return { shards: await writeShards(dir, specs), keys, captions };
}

Deno.test("clip embed: 3 partitions of 7 shards (flags and JOB_COMPLETION_INDEX) merge into the single-run output", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { keys, captions } = await sevenShards(dir);
    const spec = `${dir}/shard-{000000..000006}.tar`;
    const common = ["--model", VIT_TINY, "--images", spec, "--texts", spec, "--batch-size", "2"];
    const whole = `${dir}/whole`, merged = `${dir}/merged`;
    assert.equal((await embed([...common, "--out", whole])).code, 0);
    for (const index of [0, 1]) {
      const args = [...common, "--out", merged, "--shard-index", String(index), "--shard-count", "3"];
      assert.equal((await embed(args)).code, 0);
    }
    const wroteAfterTwo = [...Deno.readDirSync(`${merged}/img_emb`)].map((e) => e.name).sort();
    // Partition 0 has shards 0, 3, 6 and partition 1 has shards 1, 4.
    assert.deepEqual(wroteAfterTwo, [
      "img_emb_0.npy",
      "img_emb_1.npy",
      "img_emb_3.npy",
      "img_emb_4.npy",
      "img_emb_6.npy",
    ]);
    // The third process takes its partition from a Kubernetes Indexed Job's environment. A child process: test
    // modules share one process, so setting the variables here would leak into tests running beside this one.
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", new URL("../cli.ts", import.meta.url).pathname, "embed", ...common, "--out", merged],
      env: { JOB_COMPLETION_INDEX: "2", CLIP_SHARD_COUNT: "3" },
      stdout: "null",
      stderr: "piped",
    }).output();
    const childErr = new TextDecoder().decode(child.stderr);
    assert.equal(child.code, 0, childErr);
    assert.match(childErr, /partition 2 of 3 \(JOB_COMPLETION_INDEX of CLIP_SHARD_COUNT\)/);

    // Every part exactly once, named by shard index, byte-identical to the single run's.
    for (const sub of ["img_emb", "text_emb", "metadata"]) {
      const names = [...Deno.readDirSync(`${merged}/${sub}`)].map((e) => e.name).sort();
      assert.deepEqual(names, [...Deno.readDirSync(`${whole}/${sub}`)].map((e) => e.name).sort());
      assert.equal(names.length, 7, sub);
      for (const name of names) {
        assert.deepEqual(
          await Deno.readFile(`${merged}/${sub}/${name}`),
          await Deno.readFile(`${whole}/${sub}/${name}`),
        );
      }
    }
    // Concatenated in part order, the metadata lists every sample once, in shard order, with its caption and shard.
    const rows = [];
    for (let p = 0; p < 7; p++) rows.push(...await readParquet(`${merged}/metadata/metadata_${p}.parquet`));
    assert.deepEqual(rows.map((r) => r.key), keys);
    assert.deepEqual(rows.map((r) => r.caption), captions);
    assert.equal(rows[0].source, `${dir}/shard-000000.tar`);

    // Text rows are the model's caption embeddings, aligned with the image rows.
    const gpu = await getGpu();
    const { model } = await loadModel(gpu, VIT_TINY);
    const tokenizer = await ClipTokenizer.load();
    const texts = [];
    for (let p = 0; p < 7; p++) texts.push(...(await npyRows(`${merged}/text_emb/text_emb_${p}.npy`)).data);
    const wantTexts = await encodeTexts(model, tokenizer, captions, 3);
    assert.ok(maxAbsDiff(texts, wantTexts) <= ROW_TOLERANCE);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip embed: a rerun skips finished parts and redoes only incomplete ones", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await sevenShards(dir);
    const out = `${dir}/out`;
    const args = ["--model", VIT_TINY, "--images", `${dir}`, "--out", out];
    assert.equal((await embed(args)).code, 0);
    const before = new Map<string, Uint8Array>();
    for (const sub of ["img_emb", "metadata"]) {
      for (const e of Deno.readDirSync(`${out}/${sub}`)) {
        before.set(`${sub}/${e.name}`, Deno.readFileSync(`${out}/${sub}/${e.name}`));
      }
    }
    // Part 2 lost its .npy (a run stopped between the metadata and the array); part 5 lost its metadata.
    await Deno.remove(`${out}/img_emb/img_emb_2.npy`);
    await Deno.remove(`${out}/metadata/metadata_5.parquet`);
    // Mark the finished parts, so rewriting one would show.
    const mtimes = new Map<string, number>();
    for (const p of [0, 1, 3, 4, 6]) {
      mtimes.set(`${p}`, Deno.statSync(`${out}/img_emb/img_emb_${p}.npy`).mtime!.getTime());
    }
    await new Promise((r) => setTimeout(r, 20));

    const { code, stderr } = await embed(args);
    assert.equal(code, 0);
    assert.match(stderr, /7 of 7 parts, 5 already done, 2 to embed/);
    assert.match(stderr, /wrote 2 parts/);
    for (const [p, t] of mtimes) assert.equal(Deno.statSync(`${out}/img_emb/img_emb_${p}.npy`).mtime!.getTime(), t);
    for (const [name, bytes] of before) assert.deepEqual(Deno.readFileSync(`${out}/${name}`), bytes, name);
    // Nothing left under temporary names.
    for (const sub of ["img_emb", "metadata", "skipped"]) {
      assert.ok([...Deno.readDirSync(`${out}/${sub}`)].every((e) => !e.name.endsWith(".partial")));
    }
    // A third run has nothing to do and does not even load the model.
    const again = await embed(args);
    assert.match(again.stderr, /7 already done, 0 to embed/);
    assert.doesNotMatch(again.stderr, /embedding with/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip embed: an unreadable shard is reported and not written; a truncated one keeps what it had", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { shards } = await sevenShards(dir);
    // Shard 2 holds s2_0, s2_1, s2_2 (jpg + txt each). Cut it inside s2_2's image: s2_0 and s2_1 are complete, but the
    // reader only knows s2_1 is complete when the next member arrives, so s2_1 is lost with s2_2.
    const imageBytes = (i: number) => Deno.readFileSync(`${PREPROCESS_DIR}/${FIXTURE_IMAGES[i]}`).length;
    const captionBytes = (j: number) => new TextEncoder().encode(`a photo number ${j} in shard 2`).length;
    const sizes = [imageBytes(2), captionBytes(0), imageBytes(3), captionBytes(1)];
    const cut = sizes.reduce((at, n) => at + 512 + Math.ceil(n / 512) * 512, 0) + 512 + 100;
    Deno.writeFileSync(shards[2], Deno.readFileSync(shards[2]).slice(0, cut));
    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const writer = new EmbeddingsWriter(`${dir}/out`, ["image"]);
    const summary = await runEmbedJob(
      { mode: "image", source: { kind: "shards", shards: [shards[0], `${dir}/missing.tar`, shards[2]] } },
      { model, preprocess, writer, batchSize: 4, partSize: 1, partition: { index: 0, count: 1 } },
    );
    assert.equal(summary.written, 2);
    assert.deepEqual(summary.failed.map((f) => f.part), ["1"]);
    assert.equal(await writer.isDone("1"), false);
    assert.deepEqual((await readNpy(`${dir}/out/img_emb/img_emb_2.npy`)).shape, [1, 32]);
    assert.deepEqual((await readParquet(`${dir}/out/metadata/metadata_2.parquet`)).map((r) => r.key), ["s2_0"]);
    assert.match(await Deno.readTextFile(`${dir}/out/skipped/skipped_2.txt`), /shard-000002\.tar.*corrupt/);

    // Through the command: a shard that cannot be fetched leaves its part unwritten and the exit code 1.
    const spec = `${shards[0]}::http://127.0.0.1:9/gone.tar`;
    const { code, stderr } = await embed(["--model", VIT_TINY, "--images", spec, "--out", `${dir}/out2`]);
    assert.equal(code, 1);
    assert.match(stderr, /part 1 NOT written/);
    assert.ok(await new EmbeddingsWriter(`${dir}/out2`, ["image"]).isDone("0"));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip embed --texts FILE --dtype f16: rows are the model's text embeddings rounded to float16", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const lines = ["a photo of a cat", "", "A DIAGRAM of two dogs", "café crème", "the last line"];
    await Deno.writeTextFile(`${dir}/texts.txt`, lines.join("\n") + "\n");
    const out = `${dir}/out`;
    const { code } = await embed([
      "--model",
      VIT_TINY,
      "--texts",
      `${dir}/texts.txt`,
      "--out",
      out,
      "--dtype",
      "f16",
      "--part-size",
      "2",
      "--batch-size",
      "3",
    ]);
    assert.equal(code, 0);
    const gpu = await getGpu();
    const { model } = await loadModel(gpu, VIT_TINY);
    const want = await encodeTexts(model, await ClipTokenizer.load(), lines, 8);
    const got: number[] = [];
    const keys: unknown[] = [];
    for (const p of [0, 1, 2]) {
      const a = await readNpy(`${out}/text_emb/text_emb_${p}.npy`);
      assert.equal(a.dtype, "f16");
      assert.deepEqual(a.shape, [p < 2 ? 2 : 1, 32]);
      got.push(...a.data);
      keys.push(...(await readParquet(`${out}/metadata/metadata_${p}.parquet`)).map((r) => r.key));
    }
    // float16 has an 11-bit significand: rounding moves a unit-norm component by at most 2^-12.
    assert.ok(maxAbsDiff(got, toFloat16(want)) <= 2 ** -11, "f16 rows are the f32 rows rounded");
    assert.ok(maxAbsDiff(got, want) <= 2 ** -12);
    assert.deepEqual(keys, ["0", "1", "2", "3", "4"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip embed: refuses contradictory or incomplete invocations", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(`${dir}/t.txt`, "x\n");
    const run = (args: string[]) => captured(() => embedCommand.run(args));
    await assert.rejects(run(["--images", dir, "--out", dir]), /--model is required/);
    await assert.rejects(run(["--model", VIT_TINY, "--out", dir]), /--images or --texts/);
    await assert.rejects(
      run(["--model", VIT_TINY, "--images", dir, "--texts", `${dir}/t.txt`, "--out", `${dir}/o`]),
      /same shards/,
    );
    await assert.rejects(
      run(["--model", VIT_TINY, "--texts", `${dir}/t.txt`, "--out", dir, "--shard-index", "1"]),
      /together/,
    );
    await assert.rejects(
      run(["--model", VIT_TINY, "--texts", `${dir}/t.txt`, "--out", dir, "--shard-index", "3", "--shard-count", "3"]),
      /0\.\.2/,
    );
    await assert.rejects(
      run(["--model", VIT_TINY, "--texts", `${dir}/t.txt`, "--out", dir, "--dtype", "f64"]),
      /f32 or f16/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip embed at 224 px: rows match a model run on open_clip's preprocessed tensors", async () => {
  // A randomly initialised 224 px ViT (patch 32, one layer): what matters here is the input pipeline. decodeEvalImage
  // reproduces open_clip's resize and crop to the bit, so the rows must equal the features of open_clip's own
  // preprocessed tensors (tests/fixtures/preprocess/*.preprocessed.f32) up to float32 kernel rounding.
  const dir = await Deno.makeTempDir();
  try {
    const config = {
      embed_dim: 16,
      quick_gelu: true,
      vision_cfg: { image_size: 224, layers: 1, width: 32, patch_size: 32, head_width: 16, mlp_ratio: 2.0 },
      text_cfg: { context_length: 77, vocab_size: 49408, width: 32, heads: 2, layers: 1, mlp_ratio: 2.0 },
    };
    const configPath = `${dir}/vit224.json`;
    await Deno.writeTextFile(configPath, JSON.stringify(config));
    const list = FIXTURE_IMAGES.map((f) => `${PREPROCESS_DIR}/${f}`).join("\n");
    await Deno.writeTextFile(`${dir}/list.txt`, list + "\n");
    const { code } = await embed(["--model", configPath, "--images", `${dir}/list.txt`, "--out", `${dir}/out`]);
    assert.equal(code, 0);
    const got = await npyRows(`${dir}/out/img_emb/img_emb_0.npy`);
    assert.deepEqual(got.shape, [4, 16]);

    const gpu = await getGpu();
    const { model } = await loadModel(gpu, configPath); // the same seed (0) as the command's
    const pixels = new Float32Array(4 * 3 * 224 * 224);
    FIXTURE_IMAGES.forEach((f, i) => {
      const name = f.replace(/\.(jpg|png)$/, ".preprocessed.f32");
      pixels.set(new Float32Array(Deno.readFileSync(`${PREPROCESS_DIR}/${name}`).buffer), i * 3 * 224 * 224);
    });
    const want = await referenceImageFeatures(model, pixels, 4);
    const err = maxAbsDiff(got.data, want);
    assert.ok(err <= ROW_TOLERANCE, `224 px rows differ from open_clip-preprocessed features by ${err}`);
    // Rows are unit vectors.
    const norms = normaliseRows(got.data, 16);
    assert.ok(maxAbsDiff(norms, got.data) <= 1e-6);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
