// Retrieval recall and classification metrics on small cases worked out by hand, and on random data against a
// sort-based float64 reference.
import assert from "node:assert/strict";
import { classificationMetrics, retrievalRecall, similarity } from "../lib/eval/metrics.ts";
import { randomArray } from "./helpers.ts";

const S = Math.SQRT1_2;

// Images I0 = (1, 0), I1 = (0, 1), I2 = (s, s). Captions: T0 = (1, 0) and T1 = (0, 1) and T4 = (1, 0) describe I0,
// T2 = (s, s) describes I1, T3 = (-1, 0) describes I2.
const IMAGES = Float32Array.of(1, 0, 0, 1, S, S);
const TEXTS = Float32Array.of(1, 0, 0, 1, S, S, -1, 0, 1, 0);
const TEXT_TO_IMAGE = [0, 0, 1, 2, 0];

Deno.test("retrievalRecall: hand-computed ranks with ties and several captions per image", () => {
  const m = retrievalRecall(IMAGES, TEXTS, 2, TEXT_TO_IMAGE, [1, 2, 3, 5]);
  assert.deepEqual(retrievalRecall(IMAGES, TEXTS, 2, TEXT_TO_IMAGE, [1, 2, 3, 5], 5), m, "one image row per block");
  // Text -> image ranks: T0 0; T1 2 (I1 = 1 and I2 = s beat I0 = 0); T2 2 (I2 = 1 beats, I0 = s ties with I1 = s and
  // a tie counts against); T3 1 (I1 = 0 beats I2 = -s); T4 0.
  assert.equal(m["image_retrieval_recall@1"], 2 / 5);
  assert.equal(m["image_retrieval_recall@2"], 3 / 5);
  assert.equal(m["image_retrieval_recall@3"], 5 / 5);
  // Image -> text: I0's best captions T0 and T4 tie at 1 but are both its own, so rank 0; I1's T2 = s is beaten by
  // T1 = 1, rank 1; I2's T3 = -s is beaten by T0, T1, T2 and T4, rank 4.
  assert.equal(m["text_retrieval_recall@1"], 1 / 3);
  assert.equal(m["text_retrieval_recall@2"], 2 / 3);
  assert.equal(m["text_retrieval_recall@3"], 2 / 3);
  assert.equal(m["text_retrieval_recall@5"], 3 / 3);
  assert.deepEqual(Object.keys(m).sort(), [
    "image_retrieval_recall@1",
    "image_retrieval_recall@2",
    "image_retrieval_recall@3",
    "image_retrieval_recall@5",
    "text_retrieval_recall@1",
    "text_retrieval_recall@2",
    "text_retrieval_recall@3",
    "text_retrieval_recall@5",
  ]);
});

Deno.test("retrievalRecall: identical embeddings everywhere score chance, not a perfect recall", () => {
  const same = new Float32Array(4 * 3).fill(1 / Math.sqrt(3));
  const m = retrievalRecall(same, same, 3, [0, 1, 2, 3], [1, 4]);
  assert.equal(m["image_retrieval_recall@1"], 0);
  assert.equal(m["text_retrieval_recall@1"], 0);
  assert.equal(m["image_retrieval_recall@4"], 1);
  assert.equal(m["text_retrieval_recall@4"], 1);
});

Deno.test("retrievalRecall refuses captions pointing at missing images", () => {
  assert.throws(() => retrievalRecall(IMAGES, TEXTS, 2, [0, 0, 1, 3, 0]), RangeError);
  assert.throws(() => retrievalRecall(IMAGES, TEXTS, 2, [0, 0, 1]), RangeError);
});

/** Reference: sort candidates by score (float64), non-targets first among equals, and take the first target's place. */
function referenceRank(scores: number[], targets: Set<number>): number {
  const order = scores.map((s, j) => ({ s, j })).sort((a, b) =>
    b.s - a.s || Number(targets.has(a.j)) - Number(targets.has(b.j))
  );
  return order.findIndex((o) => targets.has(o.j));
}

Deno.test("retrievalRecall matches a sort-based float64 reference on random embeddings", () => {
  const dim = 8, nImages = 20, nTexts = 45;
  const normalise = (v: Float64Array) => {
    const out = new Float32Array(v.length);
    for (let r = 0; r < v.length / dim; r++) {
      const row = v.subarray(r * dim, (r + 1) * dim);
      const norm = Math.hypot(...row);
      for (let k = 0; k < dim; k++) out[r * dim + k] = row[k] / norm;
    }
    return out;
  };
  const images = normalise(randomArray(nImages * dim, 11));
  const texts = normalise(randomArray(nTexts * dim, 12));
  const textToImage = Array.from({ length: nTexts }, (_, j) => j % nImages);
  const got = retrievalRecall(images, texts, dim, textToImage, [1, 5, 10]);
  // Scored three image rows at a time (blocks of 135 values), the result is the same.
  assert.deepEqual(retrievalRecall(images, texts, dim, textToImage, [1, 5, 10], 3 * nTexts), got);
  assert.deepEqual(retrievalRecall(images, texts, dim, textToImage, [1, 5, 10], 1), got);
  const dot = (i: number, j: number) => {
    let s = 0;
    for (let k = 0; k < dim; k++) s += images[i * dim + k] * texts[j * dim + k];
    return Math.fround(s);
  };
  for (const k of [1, 5, 10]) {
    let textHits = 0, imageHits = 0;
    for (let j = 0; j < nTexts; j++) {
      const scores = Array.from({ length: nImages }, (_, i) => dot(i, j));
      if (referenceRank(scores, new Set([textToImage[j]])) < k) textHits++;
    }
    for (let i = 0; i < nImages; i++) {
      const scores = Array.from({ length: nTexts }, (_, j) => dot(i, j));
      const own = new Set(textToImage.flatMap((img, j) => img === i ? [j] : []));
      if (referenceRank(scores, own) < k) imageHits++;
    }
    assert.equal(got[`image_retrieval_recall@${k}`], textHits / nTexts, `image recall@${k}`);
    assert.equal(got[`text_retrieval_recall@${k}`], imageHits / nImages, `text recall@${k}`);
  }
});

Deno.test("similarity is a b^T", () => {
  const a = Float32Array.of(1, 2, 3, 4, 5, 6); // [2, 3]
  const b = Float32Array.of(1, 0, -1, 0.5, 0.5, 0.5); // [2, 3]
  assert.deepEqual([...similarity(a, b, 3)], [-2, 3, -2, 7.5]);
});

Deno.test("classificationMetrics: hand-computed acc1, acc5, balanced accuracy and per-class recall", () => {
  const scores = [
    [0.9, 0.1, 0.2, 0.3, 0.4, 0.5], // label 0: rank 0
    [0.5, 0.5, 0.1, 0.1, 0.1, 0.1], // label 1: tied with class 0, rank 1
    [0.9, 0.8, 0.1, 0.7, 0.6, 0.5], // label 2: last, rank 5
    [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], // label 2: rank 3
    [0.2, 0.1, 0.1, 0.1, 0.1, 0.1], // label 0: rank 0
  ].flat();
  const m = classificationMetrics(scores, 6, [0, 1, 2, 2, 0]);
  assert.equal(m.acc1, 2 / 5);
  assert.equal(m.acc5, 4 / 5);
  assert.deepEqual(m.per_class_recall, [1, 0, 0, NaN, NaN, NaN]);
  // Classes 3-5 have no samples: the mean runs over classes 0-2 only, as sklearn's balanced_accuracy_score does.
  assert.equal(m.mean_per_class_recall, 1 / 3);
});

Deno.test("classificationMetrics: balanced accuracy differs from accuracy on unbalanced classes", () => {
  // 4 samples of class 0 all right, 1 sample of class 1 wrong: acc1 0.8, balanced (1 + 0) / 2.
  const scores = [[1, 0], [1, 0], [1, 0], [1, 0], [1, 0]].flat();
  const m = classificationMetrics(scores, 2, [0, 0, 0, 0, 1]);
  assert.equal(m.acc1, 0.8);
  assert.equal(m.mean_per_class_recall, 0.5);
  assert.ok(Number.isNaN(m.acc5), "acc5 is undefined with fewer than 5 classes");
});

Deno.test("classificationMetrics refuses labels outside the classes and mismatched scores", () => {
  assert.throws(() => classificationMetrics([1, 0], 2, [2]), RangeError);
  assert.throws(() => classificationMetrics([1, 0], 2, [-1]), RangeError);
  assert.throws(() => classificationMetrics([1, 0, 0], 2, [0]), RangeError);
});
