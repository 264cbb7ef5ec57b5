import {
  fusedBackwardRowsPerChunk,
  fusesLayerNormBackward,
  l2NormalizeBackwardKernel,
  l2NormalizeForwardKernel,
  layerNormBackwardFusedKernel,
  layerNormBackwardInputKernel,
  layerNormForwardKernel,
  layerNormParamPartialsInvocations,
  layerNormParamPartialsKernel,
  type RowShape,
} from "../../../kernels/norm.ts";
import { elementGroups } from "../../../kernels/grid.ts";
import { type RowLayout, rowWorkgroups } from "../../../kernels/rows.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";
import { sumAxesForward } from "./elementwise.ts";
import { rowLayoutFor } from "./strategy.ts";

/** The tensor as rows along its last axis. */
export function rowsOf(x: Tensor, op: string): RowShape {
  if (x.rank < 1) throw new Error(`${op}: needs a tensor of rank >= 1, got ${x}`);
  if (x.dtype !== "f32") throw new Error(`${op}: needs an f32 tensor, got ${x}`);
  const cols = x.shape[x.rank - 1];
  return { rows: cols === 0 ? 0 : x.size / cols, cols };
}

/**
 * Layer normalisation over the last axis: (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance
 * (as torch.nn.LayerNorm). weight and bias have the size of the last axis. The backward pass reuses each row's mean
 * and 1/std saved by the forward pass; dweight and dbias are summed over all rows.
 */
export function layerNorm(x: Tensor, weight: Tensor, bias: Tensor, eps = 1e-5): Tensor {
  const shape = rowsOf(x, "layerNorm");
  for (const [name, p] of [["weight", weight], ["bias", bias]] as const) {
    if (p.size !== shape.cols) {
      throw new Error(`layerNorm: ${name} ${shapeString(p.shape)} does not match the last axis of ${x}`);
    }
  }
  const gpu = x.gpu;
  const layout = rowLayoutFor(gpu, shape.cols);
  const y = empty(gpu, x.shape);
  const stats = empty(gpu, [shape.rows, 2]);
  gpu.dispatch(
    layerNormForwardKernel(shape, eps, layout),
    [x.buffer, weight.buffer, bias.buffer, y.buffer, stats.buffer],
    rowWorkgroups(shape.rows, layout),
  );
  record(y, "layerNorm", [x, weight, bias], (g) => {
    if (x.requiresGrad && weight.requiresGrad && bias.requiresGrad && fusesLayerNormBackward(layout, shape.cols)) {
      const grads = fusedBackward(x, weight, bias, stats, g, layout);
      stats.dispose();
      return grads;
    }
    let dx: Tensor | null = null;
    if (x.requiresGrad) {
      dx = empty(gpu, x.shape);
      gpu.dispatch(
        layerNormBackwardInputKernel(shape, layout),
        [x.buffer, weight.buffer, stats.buffer, g.buffer, dx.buffer],
        rowWorkgroups(shape.rows, layout),
      );
    }
    let dweight: Tensor | null = null;
    let dbias: Tensor | null = null;
    if (weight.requiresGrad || bias.requiresGrad) {
      const rowsPerChunk = paramRowsPerChunk(shape);
      const chunks = Math.ceil(shape.rows / rowsPerChunk);
      const dwPartial = empty(gpu, [chunks, shape.cols]);
      const dbPartial = empty(gpu, [chunks, shape.cols]);
      gpu.dispatch(
        layerNormParamPartialsKernel(shape, rowsPerChunk),
        [x.buffer, stats.buffer, g.buffer, dwPartial.buffer, dbPartial.buffer],
        elementGroups(layerNormParamPartialsInvocations(shape, rowsPerChunk)),
      );
      if (weight.requiresGrad) dweight = sumChunks(dwPartial, weight);
      if (bias.requiresGrad) dbias = sumChunks(dbPartial, bias);
      dwPartial.dispose();
      dbPartial.dispose();
    }
    stats.dispose();
    return [dx, dweight, dbias];
  });
  if (!y.node) stats.dispose();
  return y;
}

/** dx, dweight and dbias with one pass over the rows (CPU fallback; see layerNormBackwardFusedKernel). */
function fusedBackward(x: Tensor, weight: Tensor, bias: Tensor, stats: Tensor, g: Tensor, layout: RowLayout): Tensor[] {
  const shape = rowsOf(x, "layerNorm");
  const gpu = x.gpu;
  const rowsPerChunk = fusedBackwardRowsPerChunk(shape.rows);
  const chunks = Math.ceil(shape.rows / rowsPerChunk);
  const dx = empty(gpu, x.shape);
  const dwPartial = empty(gpu, [chunks, shape.cols]);
  const dbPartial = empty(gpu, [chunks, shape.cols]);
  gpu.dispatch(
    layerNormBackwardFusedKernel(shape, rowsPerChunk, layout),
    [x.buffer, weight.buffer, stats.buffer, g.buffer, dx.buffer, dwPartial.buffer, dbPartial.buffer],
    Math.ceil(chunks / layout.rowsPerGroup),
  );
  const grads = [dx, sumChunks(dwPartial, weight), sumChunks(dbPartial, bias)];
  dwPartial.dispose();
  dbPartial.dispose();
  return grads;
}

// The parameter gradients' first pass: about this many invocations, each over at least MIN_ROWS_PER_CHUNK rows.
const PARAM_PARTIAL_INVOCATIONS = 8192;
const MIN_ROWS_PER_CHUNK = 16;

function paramRowsPerChunk({ rows, cols }: RowShape): number {
  const perRow = cols % 4 === 0 ? cols / 4 : cols;
  const chunks = Math.max(1, Math.round(PARAM_PARTIAL_INVOCATIONS / perRow));
  return Math.max(1, Math.min(rows, Math.max(MIN_ROWS_PER_CHUNK, Math.ceil(rows / chunks))));
}

/** Sums [chunks, C] partial column sums into a gradient shaped like `param`. */
function sumChunks(partial: Tensor, param: Tensor): Tensor {
  const summed = sumAxesForward(partial, [true, false]);
  const out = summed.view(param.shape);
  summed.dispose();
  return out;
}

/**
 * x / max(||x||, eps) over the last axis, as torch.nn.functional.normalize(x, dim=-1). The backward pass needs each
 * row's denominator, saved by the forward pass.
 */
export function l2Normalize(x: Tensor, eps = 1e-12): Tensor {
  const shape = rowsOf(x, "l2Normalize");
  const gpu = x.gpu;
  const layout = rowLayoutFor(gpu, shape.cols);
  const y = empty(gpu, x.shape);
  const denom = empty(gpu, [shape.rows]);
  gpu.dispatch(
    l2NormalizeForwardKernel(shape, eps, layout),
    [x.buffer, y.buffer, denom.buffer],
    rowWorkgroups(shape.rows, layout),
  );
  record(y, "l2Normalize", [x], (g) => {
    const dx = empty(gpu, x.shape);
    gpu.dispatch(
      l2NormalizeBackwardKernel(shape, eps, layout),
      [x.buffer, denom.buffer, g.buffer, dx.buffer],
      rowWorkgroups(shape.rows, layout),
    );
    denom.dispose();
    return [dx];
  });
  if (!y.node) denom.dispose();
  return y;
}
