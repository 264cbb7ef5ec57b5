import { softmaxBackwardKernel, softmaxForwardKernel, type SoftmaxSpec } from "../../../kernels/softmax.ts";
import { rowKernelWorkgroups } from "../../../kernels/rows.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import type { Tensor } from "../tensor.ts";
import { rowsOf } from "./norm.ts";
import { rowLayoutFor } from "./strategy.ts";

export interface SoftmaxOptions {
  /**
   * Mask for attention over [..., T, T] scores: row i of each T x T block sees columns 0..i only (the others come
   * out 0, as if their logits were -inf).
   */
  causal?: boolean;
  /** Multiplies the logits first: softmax(scale * x) in one pass (attention's 1/sqrt(head width)). */
  scale?: number;
}

/** Softmax over the last axis, stable (the row maximum is subtracted before exp). */
export function softmax(x: Tensor, opts: SoftmaxOptions = {}): Tensor {
  const causal = opts.causal ?? false;
  const rowShape = rowsOf(x, "softmax");
  if (causal && (x.rank < 2 || x.shape[x.rank - 2] !== rowShape.cols)) {
    throw new Error(`softmax: a causal mask needs square [..., T, T] scores, got ${x}`);
  }
  const spec: SoftmaxSpec = { ...rowShape, scale: opts.scale ?? 1, causal };
  const gpu = x.gpu;
  const layout = rowLayoutFor(gpu, spec.cols);
  const y = empty(gpu, x.shape);
  gpu.dispatch(
    softmaxForwardKernel(spec, layout),
    [x.buffer, y.buffer],
    rowKernelWorkgroups(spec.rows, spec.cols, layout),
  );
  return record(y, "softmax", [x], (g) => {
    const dx = empty(gpu, x.shape);
    gpu.dispatch(
      softmaxBackwardKernel(spec, layout),
      [y.buffer, g.buffer, dx.buffer],
      rowKernelWorkgroups(spec.rows, spec.cols, layout),
    );
    return [dx];
  });
}
