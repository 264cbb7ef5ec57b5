// Zero-shot classification: the prompt-ensemble classifier against a float64 reference built from the model's own
// per-prompt text features, the probabilities, the template sets, and `clip classify --json` end to end.
import assert from "node:assert/strict";
import { zeroshotCommand } from "../lib/commands/zeroshot.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { zeroShotClassifier } from "../lib/eval/embed_data.ts";
import {
  fillTemplate,
  loadTemplates,
  OPENAI_IMAGENET_TEMPLATES,
  parseTemplates,
  SIMPLE_IMAGENET_TEMPLATES,
} from "../lib/eval/templates.ts";
import { zeroShotProbabilities } from "../lib/eval/zeroshot.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { loadModel } from "../lib/nn/load.ts";
import {
  captured,
  FIXTURE_IMAGES,
  maxAbsDiff,
  PREPROCESS_DIR,
  referenceClassifier,
  referenceFeaturesOfFiles,
  VIT_TINY,
} from "./eval_helpers.ts";

const CLASSES = ["cat", "dog", "a red square", "grey stripes"];

function softmaxRows(logits: Float64Array, classes: number): Float64Array {
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length / classes; i++) {
    const row = logits.subarray(i * classes, (i + 1) * classes);
    const max = Math.max(...row);
    const e = row.map((v) => Math.exp(v - max));
    const sum = e.reduce((a, b) => a + b, 0);
    out.set(e.map((v) => v / sum), i * classes);
  }
  return out;
}

Deno.test("zeroShotClassifier equals the float64 prompt-ensemble reference (simple and openai templates)", async () => {
  const gpu = await getGpu();
  const { model } = await loadModel(gpu, VIT_TINY);
  const tokenizer = await ClipTokenizer.load();
  // Two classes with the 80 prompts keep it to one batch of 160 prompts.
  const cases: [string[], readonly string[]][] = [
    [CLASSES, SIMPLE_IMAGENET_TEMPLATES],
    [CLASSES.slice(0, 2), OPENAI_IMAGENET_TEMPLATES],
  ];
  for (const [classes, templates] of cases) {
    const got = await zeroShotClassifier(model, tokenizer, classes, [...templates]);
    const want = await referenceClassifier(model, tokenizer, classes, templates);
    const err = maxAbsDiff(got, want);
    assert.ok(err < 2e-7, `${templates.length} templates: classifier differs from the reference by ${err}`);
    // And it is not a single prompt's embedding: the ensemble moves the class vectors.
    const single = await referenceClassifier(model, tokenizer, classes, [templates[0]]);
    assert.ok(maxAbsDiff(got, single) > 1e-2);
  }
});

Deno.test("zeroShotProbabilities: softmax of scale x cosine, worked by hand", () => {
  const images = Float32Array.of(1, 0, 0.6, 0.8);
  const classifier = Float32Array.of(1, 0, 0, 1);
  const p = zeroShotProbabilities(images, classifier, 2, 100);
  // Image 0: logits (100, 0); image 1: logits (60, 80) up to float32 rounding of 0.6 and 0.8.
  const l60 = 100 * Math.fround(0.6), l80 = 100 * Math.fround(0.8);
  const expected = [1 / (1 + Math.exp(-100)), Math.exp(-100) / (1 + Math.exp(-100)), 0, 0];
  expected[2] = 1 / (1 + Math.exp(l80 - l60));
  expected[3] = 1 / (1 + Math.exp(l60 - l80));
  assert.ok(maxAbsDiff(p, expected) < 1e-15);
});

Deno.test("template sets: OpenAI's 80 and open_clip's 7, each with one {} and no repeats", async () => {
  assert.equal(OPENAI_IMAGENET_TEMPLATES.length, 80);
  assert.equal(SIMPLE_IMAGENET_TEMPLATES.length, 7);
  for (const set of [OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES]) {
    assert.equal(new Set(set).size, set.length);
    for (const t of set) assert.equal(t.split("{}").length, 2, t);
  }
  for (const t of SIMPLE_IMAGENET_TEMPLATES) assert.ok(OPENAI_IMAGENET_TEMPLATES.includes(t), t);
  assert.equal(OPENAI_IMAGENET_TEMPLATES[0], "a bad photo of a {}.");
  assert.equal(OPENAI_IMAGENET_TEMPLATES[79], "a tattoo of the {}.");
  assert.equal(fillTemplate("a {} in a video game.", "cat"), "a cat in a video game.");
  assert.deepEqual(parseTemplates("# prompts\na photo of a {c}.\n\n  itap of {}  \n", "t.txt"), [
    "a photo of a {}.",
    "itap of {}",
  ]);
  assert.throws(() => parseTemplates("a photo\n", "t.txt"), /no \{\}/);
  assert.deepEqual(await loadTemplates("simple"), [...SIMPLE_IMAGENET_TEMPLATES]);
  await assert.rejects(loadTemplates("/nonexistent/templates.txt"), /neither a built-in set/);
});

Deno.test("clip classify --json: probabilities of every image equal the float64 reference", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const paths = FIXTURE_IMAGES.map((f) => `${PREPROCESS_DIR}/${f}`);
    await Deno.writeFile(`${dir}/broken.png`, new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3]));
    const { result, stdout, stderr } = await captured(() =>
      zeroshotCommand.run([
        "--model",
        VIT_TINY,
        "--classes",
        CLASSES.join(", "),
        "--top",
        "3",
        "--json",
        ...paths.slice(0, 2),
        `${dir}/broken.png`,
        ...paths.slice(2),
      ])
    );
    assert.equal(result, 1, "a broken image makes the exit code 1");
    assert.match(stderr, /broken\.png/);
    const out = JSON.parse(stdout) as { image: string; predictions: { label: string; probability: number }[] }[];
    assert.deepEqual(out.map((r) => r.image), paths);

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, VIT_TINY);
    const tokenizer = await ClipTokenizer.load();
    const classifier = await referenceClassifier(model, tokenizer, CLASSES, SIMPLE_IMAGENET_TEMPLATES);
    const images = await referenceFeaturesOfFiles(model, preprocess, paths.map((p) => Deno.readFileSync(p)));
    // exp(logit_scale) of the fixture, from its manifest: 100.00000762939453.
    const scale = 100.00000762939453;
    const dim = 32, k = CLASSES.length;
    const logits = new Float64Array(paths.length * k);
    for (let i = 0; i < paths.length; i++) {
      for (let c = 0; c < k; c++) {
        let s = 0;
        for (let d = 0; d < dim; d++) s += images[i * dim + d] * classifier[c * dim + d];
        logits[i * k + c] = scale * s;
      }
    }
    const probs = softmaxRows(logits, k);
    for (let i = 0; i < paths.length; i++) {
      const row = Array.from(probs.subarray(i * k, (i + 1) * k));
      const order = row.map((p, c) => ({ p, c })).sort((a, b) => b.p - a.p).slice(0, 3);
      assert.deepEqual(out[i].predictions.map((p) => p.label), order.map((o) => CLASSES[o.c]), paths[i]);
      // 100 x cosine: a 1e-7 error in a cosine moves a logit by 1e-5, and a probability by less.
      assert.ok(maxAbsDiff(out[i].predictions.map((p) => p.probability), order.map((o) => o.p)) < 2e-5);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip zeroshot refuses a missing or single class list", async () => {
  const run = (args: string[]) => captured(() => zeroshotCommand.run(args));
  await assert.rejects(run(["--model", VIT_TINY, "x.jpg"]), /exactly one of --classes and --classes-file/);
  await assert.rejects(run(["--model", VIT_TINY, "--classes", "cat", "x.jpg"]), /at least 2 classes/);
  await assert.rejects(run(["--model", VIT_TINY, "--classes", "cat,dog"]), /one or more images/);
});
