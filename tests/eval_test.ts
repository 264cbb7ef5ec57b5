// `clip eval` end to end with the vit_tiny fixture model on small generated shards: each task's JSON against
// references computed here from features taken directly from the model (float64 scores, brute-force ranks).
import assert from "node:assert/strict";
import { evalCommand } from "../lib/commands/eval.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { linearProbe } from "../lib/eval/linear_probe.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { loadModel } from "../lib/nn/load.ts";
import { noGrad } from "../lib/tensor/autograd.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import {
  captured,
  colourImage,
  maxAbsDiff,
  normaliseRows,
  referenceClassifier,
  referenceFeaturesOfFiles,
  type SampleSpec,
  VIT_TINY,
  writeShards,
} from "./eval_helpers.ts";

const COLOURS: [string, [number, number, number]][] = [
  ["red", [200, 30, 40]],
  ["green", [40, 180, 60]],
  ["blue", [30, 50, 210]],
];

interface Labelled {
  key: string;
  label: number;
  image: Uint8Array;
}

/** `perClass` images of each colour, classes interleaved, split over `shards` shards. */
async function colourSet(perClass: number, seed: number): Promise<Labelled[]> {
  const out: Labelled[] = [];
  for (let i = 0; i < perClass; i++) {
    for (const [label, [, rgb]] of COLOURS.entries()) {
      out.push({ key: `c${label}_${seed}_${i}`, label, image: await colourImage(...rgb, (i * 3 + seed) % 7) });
    }
  }
  return out;
}

async function writeLabelled(dir: string, samples: Labelled[], shards: number): Promise<string> {
  await Deno.mkdir(dir, { recursive: true });
  const specs: SampleSpec[][] = Array.from({ length: shards }, () => []);
  samples.forEach((s, i) => specs[i % shards].push({ key: s.key, files: { png: s.image, cls: String(s.label) } }));
  await writeShards(dir, specs);
  return `${dir}/shard-{000000..${String(shards - 1).padStart(6, "0")}}.tar`;
}

/** Shard order: shard 0's samples, then shard 1's, ... */
function inShardOrder<T>(samples: T[], shards: number): T[] {
  return Array.from({ length: shards }, (_, s) => samples.filter((_, i) => i % shards === s)).flat();
}

async function runEval(args: string[]) {
  const { result, stdout } = await captured(() => evalCommand.run([...args, "--json"]));
  assert.equal(result, 0);
  return JSON.parse(stdout);
}

function argmaxRows(scores: Float64Array, k: number): number[] {
  return Array.from({ length: scores.length / k }, (_, i) => {
    const row = Array.from(scores.subarray(i * k, (i + 1) * k));
    return row.indexOf(Math.max(...row));
  });
}

function cosines(a: Float64Array, b: Float64Array, dim: number): Float64Array {
  const n = a.length / dim, m = b.length / dim;
  const out = new Float64Array(n * m);
  for (let i = 0; i < n; i++) {
    for (let j = 0; j < m; j++) {
      let s = 0;
      for (let k = 0; k < dim; k++) s += a[i * dim + k] * b[j * dim + k];
      out[i * m + j] = s;
    }
  }
  return out;
}

Deno.test("clip eval --task zeroshot: metrics from classes.txt/templates.txt, and from --classes-file/--templates", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const samples = await colourSet(4, 1);
    const spec = await writeLabelled(`${dir}/data`, samples, 2);
    await Deno.writeTextFile(`${dir}/data/classes.txt`, COLOURS.map(([n]) => n).join("\n") + "\n");
    await Deno.writeTextFile(`${dir}/data/templates.txt`, "a {} image.\na photo that is {}.\n");
    const ordered = inShardOrder(samples, 2);

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const tokenizer = await ClipTokenizer.load();
    const images = await referenceFeaturesOfFiles(model, preprocess, ordered.map((s) => s.image));
    const labels = ordered.map((s) => s.label);

    const check = async (args: string[], names: string[], templates: string[]) => {
      const result = await runEval(["--model", VIT_TINY, "--data", spec, "--task", "zeroshot", ...args]);
      const classifier = await referenceClassifier(model, tokenizer, names, templates);
      const predicted = argmaxRows(cosines(images, classifier, 32), 3);
      const recall = names.map((_, c) => {
        const of = labels.flatMap((l, i) => l === c ? [predicted[i]] : []);
        return of.filter((p) => p === c).length / of.length;
      });
      assert.equal(result.task, "zeroshot_classification");
      assert.equal(result.dataset, spec);
      assert.equal(result.model, VIT_TINY);
      assert.equal(result.samples, 12);
      assert.equal(result.metrics.acc1, predicted.filter((p, i) => p === labels[i]).length / 12);
      assert.equal(result.metrics.acc5, null, "acc5 is undefined with 3 classes");
      assert.ok(Math.abs(result.metrics.mean_per_class_recall - recall.reduce((a, b) => a + b) / 3) < 1e-12);
      assert.deepEqual(result.metrics.per_class_recall, Object.fromEntries(names.map((n, c) => [n, recall[c]])));
      return result.metrics.acc1 as number;
    };
    await check([], ["red", "green", "blue"], ["a {} image.", "a photo that is {}."]);
    await Deno.writeTextFile(`${dir}/names.txt`, "crimson\nlime\nnavy\n");
    await check(
      ["--classes-file", `${dir}/names.txt`, "--templates", "simple"],
      ["crimson", "lime", "navy"],
      [
        "itap of a {}.",
        "a bad photo of the {}.",
        "a origami {}.",
        "a photo of the large {}.",
        "a {} in a video game.",
        "art of the {}.",
        "a photo of the small {}.",
      ],
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Rank of the best of `targets` among `scores`, ties counted against (non-targets first among equals). */
function rank(scores: number[], targets: Set<number>): number {
  const best = Math.max(...[...targets].map((t) => scores[t]));
  return scores.filter((s, j) => s >= best && !targets.has(j)).length;
}

Deno.test("clip eval --task retrieval: several captions per image from .txt lines or a .json list", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const images = await colourSet(2, 5); // 6 images
    const captionLists = [
      ["a red thing", "something crimson"],
      ["a green thing"],
      ["a blue thing", "navy", "the sea"],
      ["red again", "scarlet"],
      ["lime", "grass"],
      ["sky"],
    ];
    const specs: SampleSpec[][] = [[], []];
    images.forEach((s, i) => {
      // Image 4 carries its captions in a .json list; its .txt (ignored) says something else.
      const files: Record<string, Uint8Array | string> = i === 4
        ? { png: s.image, json: JSON.stringify({ captions: captionLists[i] }), txt: "ignored caption" }
        : { png: s.image, txt: captionLists[i].join("\n") + "\n" };
      specs[i < 3 ? 0 : 1].push({ key: s.key, files });
    });
    await Deno.mkdir(`${dir}/data`);
    const shards = await writeShards(`${dir}/data`, specs);
    const result = await runEval(["--model", VIT_TINY, "--data", shards.join("::"), "--task", "retrieval"]);

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const tokenizer = await ClipTokenizer.load();
    const imageEmb = await referenceFeaturesOfFiles(model, preprocess, images.map((s) => s.image));
    const captions = captionLists.flat();
    const textToImage = captionLists.flatMap((list, i) => list.map(() => i));
    const raw = await withScope(async () =>
      await noGrad(() => model.encodeText(model.uploadTokens(tokenizer.tokenize(captions, 77)))).read()
    );
    const textEmb = normaliseRows(raw, 32);
    const n = captions.length; // 11
    const scores = cosines(imageEmb, textEmb, 32); // [6, n]
    const expected: Record<string, number> = {};
    for (const k of [1, 5, 10]) {
      const t2i = textToImage.filter((img, j) =>
        rank(Array.from({ length: 6 }, (_, i) => scores[i * n + j]), new Set([img])) < k
      );
      const i2t = captionLists.filter((_, i) => {
        const own = new Set(textToImage.flatMap((img, j) => img === i ? [j] : []));
        return rank(Array.from(scores.subarray(i * n, (i + 1) * n)), own) < k;
      });
      expected[`image_retrieval_recall@${k}`] = t2i.length / n;
      expected[`text_retrieval_recall@${k}`] = i2t.length / 6;
    }
    assert.equal(result.task, "zeroshot_retrieval");
    assert.equal(result.samples, 6);
    assert.equal(result.captions, 11);
    assert.deepEqual(result.metrics, expected);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip eval --task linear-probe: separates colours and equals the probe on direct features", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const train = await colourSet(8, 2); // 24
    const test = await colourSet(4, 3); // 12
    const trainSpec = await writeLabelled(`${dir}/train`, train, 2);
    const testSpec = await writeLabelled(`${dir}/test`, test, 3);
    const result = await runEval([
      "--model",
      VIT_TINY,
      "--data",
      testSpec,
      "--train-data",
      trainSpec,
      "--task",
      "linear-probe",
    ]);
    assert.equal(result.task, "linear_probe");
    assert.equal(result.samples, 12);
    assert.equal(result.train_samples, 24);
    assert.equal(result.metrics.acc1, 1, "colour classes are linearly separable in the features");
    assert.equal(result.metrics.mean_per_class_recall, 1);

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const trainOrdered = inShardOrder(train, 2), testOrdered = inShardOrder(test, 3);
    const trainFeatures = await referenceFeaturesOfFiles(model, preprocess, trainOrdered.map((s) => s.image));
    const testFeatures = await referenceFeaturesOfFiles(model, preprocess, testOrdered.map((s) => s.image));
    const reference = linearProbe(
      { features: Float32Array.from(trainFeatures), labels: trainOrdered.map((s) => s.label) },
      { features: Float32Array.from(testFeatures), labels: testOrdered.map((s) => s.label) },
      32,
      3,
    );
    assert.equal(result.l2, reference.l2);
    assert.deepEqual(result.validation.map((v: { acc1: number }) => v.acc1), reference.validation.map((v) => v.acc1));
    assert.ok(maxAbsDiff([result.metrics.acc1], [reference.metrics.acc1]) === 0);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip eval refuses missing flags, missing class names and labels outside the classes", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const spec = await writeLabelled(`${dir}/data`, await colourSet(1, 0), 1);
    const run = (args: string[]) => captured(() => evalCommand.run(["--model", VIT_TINY, "--data", spec, ...args]));
    await assert.rejects(run(["--task", "bogus"]), /--task must be one of/);
    await assert.rejects(run(["--task", "linear-probe"]), /needs --train-data/);
    await assert.rejects(run(["--task", "zeroshot"]), /classes\.txt/);
    await Deno.writeTextFile(`${dir}/two.txt`, "red\ngreen\n");
    await assert.rejects(
      run(["--task", "zeroshot", "--classes-file", `${dir}/two.txt`]),
      /class 2, outside the 2 classes/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
