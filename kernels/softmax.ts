// Softmax over the last axis, optionally scaled and causally masked. Row count, width, scale and the mask are baked in.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { f32Literal } from "./grid.ts";
import type { RowShape } from "./norm.ts";
import { F32_LOWEST, rowKernelWgsl, type RowLayout, rowLayoutKey } from "./rows.ts";

export interface SoftmaxSpec extends RowShape {
  /** Multiplies the logits before the softmax (attention's 1/sqrt(d)). */
  scale: number;
  /** Row i of every cols x cols block keeps columns 0..i only (row index taken modulo cols). */
  causal: boolean;
}

function specKey(s: SoftmaxSpec): string {
  return `${s.rows}/${s.cols}/${s.scale}/${s.causal ? "causal" : "full"}`;
}

/** WGSL for `limit`: the number of leading columns of this row that take part (the rest are masked to 0). */
function rowLimit(s: SoftmaxSpec): string {
  return s.causal ? `let limit = row % ${s.cols}u + 1u;` : `let limit = ${s.cols}u;`;
}

/** y = exp(s*x - max) / sum(exp(s*x - max)) over the unmasked columns; masked columns get 0. */
export function softmaxForwardKernel(spec: SoftmaxSpec, layout: RowLayout): Kernel {
  const { rows, cols } = spec;
  const scale = f32Literal(spec.scale);
  return {
    key: `softmax_fwd/${specKey(spec)}/${rowLayoutKey(layout)}`,
    wgsl: () =>
      rowKernelWgsl(
        rows,
        layout,
        `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;`,
        `let base = row * ${cols}u;
  ${rowLimit(spec)}
  var m = ${F32_LOWEST};
  for (var j = lane; j < limit; j += LANES) { m = max(m, x[base + j] * ${scale}); }
  let row_max_value = row_max(m);
  var s = 0.0;
  for (var j = lane; j < limit; j += LANES) { s += exp(x[base + j] * ${scale} - row_max_value); }
  let inv_sum = 1.0 / row_sum(s);
  if (valid) {
    for (var j = lane; j < ${cols}u; j += LANES) {
      y[base + j] = select(0.0, exp(x[base + j] * ${scale} - row_max_value) * inv_sum, j < limit);
    }
  }`,
      ),
  };
}

/** dx = scale * y * (g - sum(g * y)); masked columns have y = 0 and so get 0. */
export function softmaxBackwardKernel(spec: SoftmaxSpec, layout: RowLayout): Kernel {
  const { rows, cols } = spec;
  return {
    key: `softmax_bwd/${specKey(spec)}/${rowLayoutKey(layout)}`,
    wgsl: () =>
      rowKernelWgsl(
        rows,
        layout,
        `@group(0) @binding(0) var<storage, read> y: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;`,
        `let base = row * ${cols}u;
  ${rowLimit(spec)}
  var s = 0.0;
  for (var j = lane; j < limit; j += LANES) { s += g[base + j] * y[base + j]; }
  let gy = row_sum(s);
  if (valid) {
    for (var j = lane; j < ${cols}u; j += LANES) {
      dx[base + j] = ${f32Literal(spec.scale)} * y[base + j] * (g[base + j] - gy);
    }
  }`,
      ),
  };
}
