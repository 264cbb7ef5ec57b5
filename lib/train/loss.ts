import { add, crossEntropy, matmul, mul, scale } from "../tensor/ops.ts";
import { fromArray } from "../tensor/create.ts";
import { persist, type Tensor } from "../tensor/tensor.ts";

const labelCache = new WeakMap<object, Map<number, Tensor>>();

/** The targets 0..B-1, uploaded once per batch size (uploads flush, so they must not happen mid-step). */
export function diagonalLabels(like: Tensor, batch: number): Tensor {
  let m = labelCache.get(like.gpu);
  if (!m) labelCache.set(like.gpu, m = new Map());
  let t = m.get(batch);
  if (!t) {
    t = persist(fromArray(like.gpu, Int32Array.from({ length: batch }, (_, i) => i), [batch]));
    m.set(batch, t);
  }
  return t;
}

/**
 * open_clip's ClipLoss on one device: logits = exp(t) I T^T, loss = (CE(logits, diag) + CE(logits^T, diag)) / 2.
 * The two directions are two matmuls rather than a transpose: the same cost, and no extra kernel.
 */
export function clipLoss(imageFeatures: Tensor, textFeatures: Tensor, logitScaleExp: Tensor, labels: Tensor): Tensor {
  const perImage = mul(matmul(imageFeatures, textFeatures, { transB: true }), logitScaleExp);
  const perText = mul(matmul(textFeatures, imageFeatures, { transB: true }), logitScaleExp);
  return scale(add(crossEntropy(perImage, labels), crossEntropy(perText, labels)), 0.5);
}
