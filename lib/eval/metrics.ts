// Retrieval and classification metrics over L2-normalised embeddings, named as CLIP_benchmark names them.
//
// Ties: a candidate scoring exactly as high as the best correct one is ranked ahead of it. torch.topk (which
// CLIP_benchmark uses) breaks ties arbitrarily; counting them against the model is deterministic and keeps a degenerate
// model (all embeddings equal) at chance level instead of a perfect score. Other correct candidates (the other
// captions of the same image) never count against each other.

/** Dot product of row `i` of `a` and row `j` of `b`, accumulated in float64 in index order. */
function dotRows(a: Float32Array, i: number, b: Float32Array, j: number, dim: number): number {
  let s = 0;
  const ai = i * dim, bj = j * dim;
  for (let k = 0; k < dim; k++) s += a[ai + k] * b[bj + k];
  return s;
}

/** Row-major similarity a b^T of [n, d] and [m, d] embeddings. */
export function similarity(a: Float32Array, b: Float32Array, dim: number): Float32Array {
  const n = a.length / dim, m = b.length / dim;
  const out = new Float32Array(n * m);
  for (let i = 0; i < n; i++) for (let j = 0; j < m; j++) out[i * m + j] = dotRows(a, i, b, j, dim);
  return out;
}

/**
 * The rank (0 = best) of the best of `targets` among `count` candidates whose scores are `score(j)`: how many
 * non-target candidates score at least as high as the best target.
 */
function bestRank(score: (j: number) => number, count: number, targets: readonly number[]): number {
  if (targets.length === 0) return Infinity;
  let best = -Infinity;
  for (const t of targets) best = Math.max(best, score(t));
  const isTarget = targets.length === 1 ? (j: number) => j === targets[0] : (j: number) => targets.includes(j);
  let rank = 0;
  for (let j = 0; j < count; j++) if (score(j) >= best && !isTarget(j)) rank++;
  return rank;
}

/** Scores computed at once by retrievalRecall: 4M floats, 16 MB. */
const SCORE_BLOCK_VALUES = 1 << 22;

export interface RetrievalMetrics {
  /** `image_retrieval_recall@K` (text to image) and `text_retrieval_recall@K` (image to text), in [0, 1]. */
  [name: string]: number;
}

/**
 * Recall@K both ways, as CLIP-style papers and CLIP_benchmark define it. `textToImage[j]` is the image of caption j
 * (an image may have several captions).
 * image_retrieval_recall@K: share of captions whose image ranks in the top K images;
 * text_retrieval_recall@K: share of images with at least one of their captions in the top K captions.
 * `blockValues` bounds the scores held at once (the result does not depend on it).
 */
export function retrievalRecall(
  imageEmb: Float32Array,
  textEmb: Float32Array,
  dim: number,
  textToImage: readonly number[],
  ks: readonly number[] = [1, 5, 10],
  blockValues = SCORE_BLOCK_VALUES,
): RetrievalMetrics {
  const nImages = imageEmb.length / dim;
  const nTexts = textEmb.length / dim;
  if (textToImage.length !== nTexts) {
    throw new RangeError(`retrieval: ${nTexts} captions but ${textToImage.length} caption-to-image indices`);
  }
  const captionsOf: number[][] = Array.from({ length: nImages }, () => []);
  textToImage.forEach((img, j) => {
    if (!Number.isInteger(img) || img < 0 || img >= nImages) {
      throw new RangeError(`retrieval: caption ${j} points at image ${img}, outside 0..${nImages - 1}`);
    }
    captionsOf[img].push(j);
  });
  // The score matrix is never held whole (5,000 images x 25,000 captions would be 500 MB): image rows are scored in
  // blocks, each block settles its images' ranks and adds to every caption's count of images scoring at least as high
  // as the caption's own. The own scores are rounded to float32 exactly as the blocks are, so ties stay exact.
  const own = textToImage.map((img, j) => Math.fround(dotRows(imageEmb, img, textEmb, j, dim)));
  const textRanks = new Array<number>(nTexts).fill(0);
  const imageRanks = new Array<number>(nImages);
  const blockRows = Math.max(1, Math.floor(blockValues / Math.max(1, nTexts)));
  for (let start = 0; start < nImages; start += blockRows) {
    const end = Math.min(nImages, start + blockRows);
    const block = similarity(imageEmb.subarray(start * dim, end * dim), textEmb, dim);
    for (let i = start; i < end; i++) {
      const row = block.subarray((i - start) * nTexts, (i - start + 1) * nTexts);
      imageRanks[i] = bestRank((j) => row[j], nTexts, captionsOf[i]);
      for (let j = 0; j < nTexts; j++) if (row[j] >= own[j] && textToImage[j] !== i) textRanks[j]++;
    }
  }
  const out: RetrievalMetrics = {};
  for (const k of ks) {
    out[`image_retrieval_recall@${k}`] = textRanks.filter((r) => r < k).length / nTexts;
    out[`text_retrieval_recall@${k}`] = imageRanks.filter((r) => r < k).length / nImages;
  }
  return out;
}

export interface ClassificationMetrics {
  acc1: number;
  /** NaN with fewer than 5 classes, as CLIP_benchmark reports it. */
  acc5: number;
  /** Balanced accuracy: the mean recall over the classes that occur in `labels` (sklearn's balanced_accuracy_score). */
  mean_per_class_recall: number;
  /** Recall of each class; NaN for classes with no sample. */
  per_class_recall: number[];
}

/** Top-1/top-5 accuracy and per-class recall from [n, classes] scores and true labels in 0..classes-1. */
export function classificationMetrics(
  scores: ArrayLike<number>,
  numClasses: number,
  labels: ArrayLike<number>,
): ClassificationMetrics {
  const n = labels.length;
  if (scores.length !== n * numClasses) {
    throw new RangeError(`classification: ${scores.length} scores for ${n} samples x ${numClasses} classes`);
  }
  let top1 = 0, top5 = 0;
  const hits = new Array<number>(numClasses).fill(0);
  const counts = new Array<number>(numClasses).fill(0);
  for (let i = 0; i < n; i++) {
    const label = labels[i];
    if (!Number.isInteger(label) || label < 0 || label >= numClasses) {
      throw new RangeError(`classification: sample ${i} has label ${label}, outside 0..${numClasses - 1}`);
    }
    const rank = bestRank((j) => scores[i * numClasses + j], numClasses, [label]);
    counts[label]++;
    if (rank < 1) {
      top1++;
      hits[label]++;
    }
    if (rank < 5) top5++;
  }
  const perClass = counts.map((c, k) => c > 0 ? hits[k] / c : NaN);
  const present = perClass.filter((r) => !Number.isNaN(r));
  return {
    acc1: top1 / n,
    acc5: numClasses >= 5 ? top5 / n : NaN,
    mean_per_class_recall: present.reduce((a, b) => a + b, 0) / Math.max(1, present.length),
    per_class_recall: perClass,
  };
}
