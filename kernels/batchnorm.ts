// Batch normalisation over NCHW images: per-channel statistics (one workgroup per channel, two passes for an accurate
// variance, updating the running statistics in place), the normalise-and-scale map, and the backward's per-channel
// sums and input gradient. Statistics come either from the batch (mean, 1/sqrt(var + eps)) or from running buffers
// (mean, var), which the kernels turn into a scale themselves.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { f32Literal, perElementKernel, REDUCE_WG, workgroupSumWgsl } from "./nchw.ts";

/** The sizes of a batch-norm: `images` x `channels` planes of `pixels` values each. */
export interface BatchNormShape {
  images: number;
  channels: number;
  pixels: number;
}

/** "batch": the stats buffers hold mean and 1/sqrt(var + eps); "running": they hold mean and var. */
export type StatsKind = "batch" | "running";

function shapeKey(s: BatchNormShape): string {
  return `${s.images}x${s.channels}x${s.pixels}`;
}

/** WGSL for the per-channel scale 1/sqrt(var + eps) from the second stats buffer. */
function inverseStd(kind: StatsKind, eps: number): string {
  return kind === "batch" ? "stat[c]" : `inverseSqrt(stat[c] + ${f32Literal(eps)})`;
}

/**
 * A kernel with one REDUCE_WG-lane workgroup per channel; `body` runs with `c` (the channel), `lane`, and the helper
 * `element(j)`: the flat index of the channel's j-th value (0 <= j < images * pixels).
 */
function perChannelKernel(key: string, s: BatchNormShape, declarations: string, body: string): Kernel {
  return {
    key,
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
${declarations}
fn element(c: u32, j: u32) -> u32 {
  let n = j / ${s.pixels}u;
  return (n * ${s.channels}u + c) * ${s.pixels}u + (j - n * ${s.pixels}u);
}
@compute @workgroup_size(${REDUCE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let c = linear_workgroup(wid, nwg);
  if (c >= ${s.channels}u) { return; }
  let lane = lid.x;
  ${body}
}`,
  };
}

/**
 * Batch statistics of x per channel, and the running-statistics update PyTorch makes in training:
 * running = (1 - momentum) running + momentum batch, with the unbiased variance for running_var.
 * Bindings: x, mean (out), invstd (out), running_mean (in/out), running_var (in/out). One workgroup per channel.
 */
export function batchStatsKernel(s: BatchNormShape, eps: number, momentum: number): Kernel {
  const count = s.images * s.pixels;
  return perChannelKernel(
    `bn_stats/${shapeKey(s)}/${eps}/${momentum}`,
    s,
    `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> mean_out: array<f32>;
@group(0) @binding(2) var<storage, read_write> invstd_out: array<f32>;
@group(0) @binding(3) var<storage, read_write> running_mean: array<f32>;
@group(0) @binding(4) var<storage, read_write> running_var: array<f32>;
${workgroupSumWgsl("f32")}`,
    `var total = 0.0;
  for (var j = lane; j < ${count}u; j += ${REDUCE_WG}u) { total += x[element(c, j)]; }
  let mean = workgroup_sum(total, lane) * ${f32Literal(1 / count)};
  var squares = 0.0;
  for (var j = lane; j < ${count}u; j += ${REDUCE_WG}u) {
    let d = x[element(c, j)] - mean;
    squares += d * d;
  }
  let variance = workgroup_sum(squares, lane) * ${f32Literal(1 / count)};
  if (lane == 0u) {
    mean_out[c] = mean;
    invstd_out[c] = inverseSqrt(variance + ${f32Literal(eps)});
    let m = ${f32Literal(momentum)};
    running_mean[c] = (1.0 - m) * running_mean[c] + m * mean;
    running_var[c] = (1.0 - m) * running_var[c] + m * variance * ${f32Literal(count / (count - 1))};
  }`,
  );
}

/** y = (x - mean) / sqrt(var + eps) * weight + bias. Bindings: x, mean, stat, weight, bias, y. */
export function batchNormApplyKernel(s: BatchNormShape, kind: StatsKind, eps: number): Kernel {
  return perElementKernel(
    `bn_apply/${shapeKey(s)}/${kind}/${eps}`,
    s.images * s.channels * s.pixels,
    `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> mean: array<f32>;
@group(0) @binding(2) var<storage, read> stat: array<f32>;
@group(0) @binding(3) var<storage, read> weight: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;`,
    `let c = (i / ${s.pixels}u) % ${s.channels}u;
  y[i] = (x[i] - mean[c]) * ${inverseStd(kind, eps)} * weight[c] + bias[c];`,
  );
}

/**
 * Per channel: sum(dy) (the bias gradient) and sum(dy * xhat) (the weight gradient), xhat the normalised input.
 * Bindings: x, dy, mean, stat, sum_dy (out), sum_dy_xhat (out). One workgroup per channel.
 */
export function batchNormGradSumsKernel(s: BatchNormShape, kind: StatsKind, eps: number): Kernel {
  const count = s.images * s.pixels;
  return perChannelKernel(
    `bn_grad_sums/${shapeKey(s)}/${kind}/${eps}`,
    s,
    `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> mean: array<f32>;
@group(0) @binding(3) var<storage, read> stat: array<f32>;
@group(0) @binding(4) var<storage, read_write> sum_dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> sum_dy_xhat: array<f32>;
${workgroupSumWgsl("vec2<f32>")}`,
    `let mu = mean[c];
  let scale = ${inverseStd(kind, eps)};
  var acc = vec2<f32>(0.0, 0.0);
  for (var j = lane; j < ${count}u; j += ${REDUCE_WG}u) {
    let e = element(c, j);
    let g = dy[e];
    acc += vec2<f32>(g, g * (x[e] - mu) * scale);
  }
  let sums = workgroup_sum(acc, lane);
  if (lane == 0u) {
    sum_dy[c] = sums.x;
    sum_dy_xhat[c] = sums.y;
  }`,
  );
}

/**
 * dx with batch statistics: weight * invstd * (dy - sum(dy) / M - xhat * sum(dy xhat) / M), M = images * pixels
 * (the mean and variance depend on every x). Bindings: x, dy, mean, stat, weight, sum_dy, sum_dy_xhat, dx.
 */
export function batchNormInputGradKernel(s: BatchNormShape, eps: number): Kernel {
  const count = s.images * s.pixels;
  return perElementKernel(
    `bn_dx/${shapeKey(s)}/${eps}`,
    s.images * s.channels * s.pixels,
    `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> dy: array<f32>;
@group(0) @binding(2) var<storage, read> mean: array<f32>;
@group(0) @binding(3) var<storage, read> stat: array<f32>;
@group(0) @binding(4) var<storage, read> weight: array<f32>;
@group(0) @binding(5) var<storage, read> sum_dy: array<f32>;
@group(0) @binding(6) var<storage, read> sum_dy_xhat: array<f32>;
@group(0) @binding(7) var<storage, read_write> dx: array<f32>;`,
    `let c = (i / ${s.pixels}u) % ${s.channels}u;
  let scale = ${inverseStd("batch", eps)};
  let xhat = (x[i] - mean[c]) * scale;
  let inv_count = ${f32Literal(1 / count)};
  dx[i] = weight[c] * scale * (dy[i] - sum_dy[c] * inv_count - xhat * sum_dy_xhat[c] * inv_count);`,
  );
}

/** dx with fixed (running) statistics: an affine map, so dx = dy * weight / sqrt(var + eps). Bindings: dy, stat,
 * weight, dx. */
export function batchNormAffineInputGradKernel(s: BatchNormShape, eps: number): Kernel {
  return perElementKernel(
    `bn_dx_affine/${shapeKey(s)}/${eps}`,
    s.images * s.channels * s.pixels,
    `@group(0) @binding(0) var<storage, read> dy: array<f32>;
@group(0) @binding(1) var<storage, read> stat: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;`,
    `let c = (i / ${s.pixels}u) % ${s.channels}u;
  dx[i] = dy[i] * weight[c] * ${inverseStd("running", eps)};`,
  );
}
