// Zero-shot class probabilities: softmax over classes of exp(logit_scale) x cosine(image, class), as CLIP computes
// its logits (the scale is the model's learned temperature, 100 for OpenAI's weights).

/**
 * Probabilities [n, classes] for normalised image embeddings [n, dim] and a normalised classifier [classes, dim]
 * (see zeroShotClassifier), computed in float64.
 */
export function zeroShotProbabilities(
  images: Float32Array,
  classifier: Float32Array,
  dim: number,
  logitScale: number,
): Float64Array {
  const n = images.length / dim, classes = classifier.length / dim;
  if (!Number.isInteger(n) || !Number.isInteger(classes)) {
    throw new RangeError(`embeddings of ${images.length} and ${classifier.length} values are not rows of ${dim}`);
  }
  const out = new Float64Array(n * classes);
  for (let i = 0; i < n; i++) {
    const row = out.subarray(i * classes, (i + 1) * classes);
    let max = -Infinity;
    for (let c = 0; c < classes; c++) {
      let s = 0;
      for (let k = 0; k < dim; k++) s += images[i * dim + k] * classifier[c * dim + k];
      row[c] = logitScale * s;
      max = Math.max(max, row[c]);
    }
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += row[c] = Math.exp(row[c] - max);
    for (let c = 0; c < classes; c++) row[c] /= sum;
  }
  return out;
}
