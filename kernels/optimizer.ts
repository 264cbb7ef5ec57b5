// Optimizer kernels: the AdamW update (with a gradient scale read from the GPU, so clipping needs no readback) and the
// pieces of the global gradient norm. Sizes travel in uniforms: one pipeline serves every parameter tensor.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";

export const OPTIMIZER_WG = 256;

/** Uniform block of `adamwKernel`, in order. */
export interface AdamWUniforms {
  n: number;
  lr: number;
  weightDecay: number;
  beta1: number;
  beta2: number;
  eps: number;
  /** 1 - beta1^t and 1 - beta2^t for the step t being taken. */
  biasCorrection1: number;
  biasCorrection2: number;
  /** The updated value is clamped into [clampMin, clampMax] (the logit scale's [0, ln 100]); ±Infinity for none. */
  clampMin: number;
  clampMax: number;
}

export function adamwUniforms(u: AdamWUniforms): ArrayBuffer {
  const buf = new ArrayBuffer(48);
  new Uint32Array(buf, 0, 1)[0] = u.n;
  new Float32Array(buf, 4, 9).set([
    u.lr,
    u.weightDecay,
    u.beta1,
    u.beta2,
    u.eps,
    u.biasCorrection1,
    u.biasCorrection2,
    Math.max(u.clampMin, -3.4e38),
    Math.min(u.clampMax, 3.4e38),
  ]);
  return buf;
}

/**
 * PyTorch's AdamW, elementwise: p -= lr*wd*p; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
 * p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps), with g = grad * gradScale[0].
 */
export function adamwKernel(): Kernel {
  return {
    key: "adamw",
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
struct U { n: u32, lr: f32, wd: f32, b1: f32, b2: f32, eps: f32, bc1: f32, bc2: f32, clamp_min: f32, clamp_max: f32 };
@group(0) @binding(0) var<storage, read_write> param: array<f32>;
@group(0) @binding(1) var<storage, read> grad: array<f32>;
@group(0) @binding(2) var<storage, read_write> m: array<f32>;
@group(0) @binding(3) var<storage, read_write> v: array<f32>;
@group(0) @binding(4) var<storage, read> grad_scale: array<f32>;
@group(0) @binding(5) var<uniform> u: U;
@compute @workgroup_size(${OPTIMIZER_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${OPTIMIZER_WG}u + lid.x;
  if (i >= u.n) { return; }
  let g = grad[i] * grad_scale[0];
  var p = param[i] * (1.0 - u.lr * u.wd);
  let mi = u.b1 * m[i] + (1.0 - u.b1) * g;
  let vi = u.b2 * v[i] + (1.0 - u.b2) * g * g;
  m[i] = mi;
  v[i] = vi;
  p = p - (u.lr / u.bc1) * mi / (sqrt(vi) / sqrt(u.bc2) + u.eps);
  param[i] = clamp(p, u.clamp_min, u.clamp_max);
}`,
  };
}

/** One workgroup per tensor: partial[slot] = sum(grad^2). Tree reduction in workgroup memory. */
export function sumSquaresKernel(): Kernel {
  return {
    key: "sum_squares",
    wgsl: () => `
struct U { n: u32, slot: u32 };
@group(0) @binding(0) var<storage, read> grad: array<f32>;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<uniform> u: U;
var<workgroup> acc: array<f32, ${OPTIMIZER_WG}>;
@compute @workgroup_size(${OPTIMIZER_WG})
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
  var s = 0.0;
  for (var i = lid.x; i < u.n; i += ${OPTIMIZER_WG}u) { let g = grad[i]; s += g * g; }
  acc[lid.x] = s;
  workgroupBarrier();
  for (var w = ${OPTIMIZER_WG / 2}u; w > 0u; w = w / 2u) {
    if (lid.x < w) { acc[lid.x] += acc[lid.x + w]; }
    workgroupBarrier();
  }
  if (lid.x == 0u) { partial[u.slot] = acc[0]; }
}`,
  };
}

/**
 * out[0] = min(1, maxNorm / (sqrt(sum(partial)) + 1e-6)) (torch.nn.utils.clip_grad_norm_'s coefficient),
 * out[1] = the norm itself (for logs). A maxNorm of 0 disables clipping (coefficient 1).
 */
export function clipCoefficientKernel(): Kernel {
  return {
    key: "clip_coefficient",
    wgsl: () => `
struct U { count: u32, max_norm: f32 };
@group(0) @binding(0) var<storage, read> partial: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> u: U;
@compute @workgroup_size(1)
fn main() {
  var s = 0.0;
  for (var i = 0u; i < u.count; i++) { s += partial[i]; }
  let norm = sqrt(s);
  out[1] = norm;
  out[0] = select(1.0, min(1.0, u.max_norm / (norm + 1e-6)), u.max_norm > 0.0);
}`,
  };
}
