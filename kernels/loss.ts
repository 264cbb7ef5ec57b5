// Cross-entropy over the last axis of [N, C] logits with integer class targets. The forward pass writes each row's
// loss and log-sum-exp (kept for the backward pass); the mean over rows is a separate sum.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { f32Literal, gridWgsl } from "./grid.ts";
import type { RowShape } from "./norm.ts";
import { F32_LOWEST, rowKernelWgsl, type RowLayout, rowLayoutKey } from "./rows.ts";

// Targets outside [0, C) cannot be reported without a read-back; they are clamped so no read leaves the row.
const target = (cols: number, expr: string) => `u32(clamp(${expr}, 0i, ${cols - 1}i))`;

/** loss[row] = logsumexp(x[row]) - x[row, target[row]]; lse[row] = logsumexp(x[row]). */
export function crossEntropyForwardKernel({ rows, cols }: RowShape, layout: RowLayout): Kernel {
  return {
    key: `xent_fwd/${rows}/${cols}/${rowLayoutKey(layout)}`,
    wgsl: () =>
      rowKernelWgsl(
        rows,
        layout,
        `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;`,
        `let base = row * ${cols}u;
  var m = ${F32_LOWEST};
  for (var j = lane; j < ${cols}u; j += LANES) { m = max(m, x[base + j]); }
  let row_max_value = row_max(m);
  var s = 0.0;
  for (var j = lane; j < ${cols}u; j += LANES) { s += exp(x[base + j] - row_max_value); }
  let log_sum = row_max_value + log(row_sum(s));
  if (valid && lane == 0u) {
    lse[row] = log_sum;
    loss[row] = log_sum - x[base + ${target(cols, "targets[row]")}];
  }`,
      ),
  };
}

/** dx = g * (softmax(x) - onehot(target)) * scale, one invocation per logit; g is the scalar upstream gradient. */
export function crossEntropyBackwardKernel({ rows, cols }: RowShape, scale: number): Kernel {
  return {
    key: `xent_bwd/${rows}/${cols}/${scale}`,
    wgsl: () =>
      gridWgsl(
        rows * cols,
        `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read> lse: array<f32>;
@group(0) @binding(3) var<storage, read> g: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;`,
        `let row = i / ${cols}u;
  let hit = select(0.0, 1.0, i % ${cols}u == ${target(cols, "targets[row]")});
  dx[i] = g[0] * ${f32Literal(scale)} * (exp(x[i] - lse[row]) - hit);`,
      ),
  };
}
