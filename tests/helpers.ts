// Shared test utilities: the runtime, seeded data, float64 references and closeness checks.
import { getGpu, type Gpu } from "../lib/gpu/runtime.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { requireGrad } from "../lib/tensor/autograd.ts";
import type { Shape, Tensor } from "../lib/tensor/tensor.ts";

export function gpu(): Promise<Gpu> {
  return getGpu();
}

/** Deterministic uniform values in [lo, hi) (mulberry32). */
export function randomArray(n: number, seed: number, lo = -1, hi = 1): Float64Array {
  let s = seed >>> 0;
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    out[i] = lo + (hi - lo) * (((t ^ (t >>> 14)) >>> 0) / 4294967296);
  }
  return out;
}

/** Rounds float64 values to float32, so the GPU and the reference start from identical inputs. */
export function f32(values: ArrayLike<number>): Float64Array {
  return Float64Array.from(Float32Array.from(values));
}

/** A tensor and its exact float64 values. */
export function param(
  g: Gpu,
  shape: Shape,
  seed: number,
  lo = -1,
  hi = 1,
  grad = true,
): { t: Tensor; v: Float64Array } {
  const v = f32(randomArray(shape.reduce((p, d) => p * d, 1), seed, lo, hi));
  const t = fromArray(g, Float32Array.from(v), shape);
  if (grad) requireGrad(t);
  return { t, v };
}

/**
 * Asserts |actual - expected| <= atol + rtol * |expected| elementwise, reporting the worst element.
 * Returns the largest absolute error, for notes and benchmarks.
 */
export function assertClose(
  actual: ArrayLike<number>,
  expected: ArrayLike<number>,
  { rtol = 1e-4, atol = 1e-5, what = "values" }: { rtol?: number; atol?: number; what?: string } = {},
): number {
  if (actual.length !== expected.length) {
    throw new Error(`${what}: length ${actual.length} != expected ${expected.length}`);
  }
  let worst = -1;
  let worstExcess = 0;
  let maxAbs = 0;
  for (let i = 0; i < actual.length; i++) {
    const err = Math.abs(actual[i] - expected[i]);
    if (!(err <= maxAbs)) maxAbs = Number.isNaN(err) ? Infinity : Math.max(maxAbs, err);
    const excess = Number.isNaN(err) ? Infinity : err - (atol + rtol * Math.abs(expected[i]));
    if (excess > worstExcess) {
      worstExcess = excess;
      worst = i;
    }
  }
  if (worst >= 0) {
    throw new Error(
      `${what}: element ${worst} is ${actual[worst]}, expected ${
        expected[worst]
      } (tolerance ${atol} + ${rtol}*|expected|; max abs error ${maxAbs})`,
    );
  }
  return maxAbs;
}

/** Float64 matmul reference: C[m,n] = sum_k A[m,k] B[k,n], with transposes in storage. */
export function refMatmul(
  a: ArrayLike<number>,
  b: ArrayLike<number>,
  m: number,
  n: number,
  k: number,
  transA = false,
  transB = false,
): Float64Array {
  const c = new Float64Array(m * n);
  for (let i = 0; i < m; i++) {
    for (let j = 0; j < n; j++) {
      let s = 0;
      for (let p = 0; p < k; p++) s += (transA ? a[p * m + i] : a[i * k + p]) * (transB ? b[j * k + p] : b[p * n + j]);
      c[i * n + j] = s;
    }
  }
  return c;
}

/** Reads a gradient that must exist. */
export async function gradOf(t: Tensor): Promise<Float32Array> {
  if (!t.grad) throw new Error(`no gradient on ${t}`);
  return await t.grad.read();
}

/** A raw little-endian float32 file (the fixtures' .f32). */
export async function f32File(path: string): Promise<Float32Array> {
  const bytes = await Deno.readFile(path);
  return new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}

/** A raw little-endian int32 file (the fixtures' .i32). */
export async function i32File(path: string): Promise<Int32Array> {
  const bytes = await Deno.readFile(path);
  return new Int32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
}
