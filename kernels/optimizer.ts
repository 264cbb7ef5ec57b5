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
 * Each invocation updates one vec4 word (4 elements: a quarter of the loads, which dominate on the CPU fallback). The
 * last word of a tensor whose size is not a multiple of 4 reaches into the padding of its pooled buffers (sizes are
 * whole 16-byte words); the padding keeps its old bits.
 */
export function adamwKernel(): Kernel {
  return {
    key: "adamw4",
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
struct U { n: u32, lr: f32, wd: f32, b1: f32, b2: f32, eps: f32, bc1: f32, bc2: f32, clamp_min: f32, clamp_max: f32 };
@group(0) @binding(0) var<storage, read_write> param: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> m: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> v: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> grad_scale: array<f32>;
@group(0) @binding(5) var<uniform> u: U;
@compute @workgroup_size(${OPTIMIZER_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${OPTIMIZER_WG}u + lid.x;
  if (4u * i >= u.n) { return; }
  let padding = vec4<u32>(4u * i) + vec4<u32>(0u, 1u, 2u, 3u) >= vec4<u32>(u.n);
  let g = grad[i] * grad_scale[0];
  let p0 = param[i];
  let m0 = m[i];
  let v0 = v[i];
  var p = p0 * (1.0 - u.lr * u.wd);
  let mi = u.b1 * m0 + (1.0 - u.b1) * g;
  let vi = u.b2 * v0 + (1.0 - u.b2) * g * g;
  m[i] = select(mi, m0, padding);
  v[i] = select(vi, v0, padding);
  p = p - (u.lr / u.bc1) * mi / (sqrt(vi) / sqrt(u.bc2) + u.eps);
  param[i] = select(clamp(p, vec4<f32>(u.clamp_min), vec4<f32>(u.clamp_max)), p0, padding);
}`,
  };
}

/** Workgroups of an `adamwKernel` dispatch for a tensor of n elements (before folding). */
export function adamwWorkgroups(n: number): number {
  return Math.ceil(Math.ceil(n / 4) / OPTIMIZER_WG);
}

/**
 * vec4 words of gradient per partial sum of squares (at most): each invocation sums that many, so a large tensor is
 * spread over many invocations (and cores) and no workgroup needs barriers.
 */
export const SUM_SQUARES_WORDS = 256;

/** Partial sums `sumSquaresKernel` writes for a tensor of n elements. */
export function sumSquaresPartials(n: number): number {
  return Math.max(1, Math.ceil(Math.ceil(n / 4) / SUM_SQUARES_WORDS));
}

/** Workgroups of a `sumSquaresKernel` dispatch for a tensor of n elements (before folding). */
export function sumSquaresWorkgroups(n: number): number {
  return Math.ceil(sumSquaresPartials(n) / OPTIMIZER_WG);
}

/**
 * partial[first + j] = sum of grad^2 over the words j, j + P, j + 2P, ... of a tensor of n elements, for the
 * P = `sumSquaresPartials(n)` partial sums (the padding of the last word counts as 0). Neighbouring invocations read
 * neighbouring words (coalesced on GPUs) and the assignment is fixed, so the total is deterministic.
 */
export function sumSquaresKernel(): Kernel {
  return {
    key: "sum_squares4",
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
struct U { n: u32, first: u32 };
@group(0) @binding(0) var<storage, read> grad: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> partial: array<f32>;
@group(0) @binding(2) var<uniform> u: U;
@compute @workgroup_size(${OPTIMIZER_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let j = linear_workgroup(wid, nwg) * ${OPTIMIZER_WG}u + lid.x;
  let words = (u.n + 3u) / 4u;
  let partials = max(1u, (words + ${SUM_SQUARES_WORDS - 1}u) / ${SUM_SQUARES_WORDS}u);
  if (j >= partials) { return; }
  let whole = u.n / 4u;
  var s = vec4<f32>(0.0);
  for (var w = j; w < whole; w += partials) {
    let g = grad[w];
    s += g * g;
  }
  if (whole < words && whole % partials == j) {
    // The last word of a size that is not a multiple of 4: its padding counts as 0.
    let inside = vec4<u32>(4u * whole) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(u.n);
    let g = select(vec4<f32>(0.0), grad[whole], inside);
    s += g * g;
  }
  partial[u.first + j] = (s.x + s.y) + (s.z + s.w);
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
