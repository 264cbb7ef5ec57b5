import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward, noGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { batchNorm2d } from "../lib/tensor/ops/batchnorm.ts";
import { tidy, withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";
import { throws } from "node:assert/strict";

// 3 x 4 x 11 x 9: 297 values per channel, more than one reduction workgroup's 256 lanes.
const [N, C, H, W] = [3, 4, 11, 9];
const PIXELS = H * W;
const COUNT = N * PIXELS;

interface Stats {
  mean: Float64Array;
  variance: Float64Array;
}

/** Biased per-channel mean and variance, in float64. */
function batchStats(x: Float64Array): Stats {
  const mean = new Float64Array(C), variance = new Float64Array(C);
  const channel = (i: number) => Math.floor(i / PIXELS) % C;
  for (let i = 0; i < x.length; i++) mean[channel(i)] += x[i] / COUNT;
  for (let i = 0; i < x.length; i++) variance[channel(i)] += (x[i] - mean[channel(i)]) ** 2 / COUNT;
  return { mean, variance };
}

/** Float64 batch norm with the given statistics, or with the batch's own when `stats` is null. */
function normalise(x: Float64Array, w: Float64Array, b: Float64Array, stats: Stats | null, eps: number): Float64Array {
  const { mean, variance } = stats ?? batchStats(x);
  return x.map((v, i) => {
    const c = Math.floor(i / PIXELS) % C;
    return (v - mean[c]) / Math.sqrt(variance[c] + eps) * w[c] + b[c];
  });
}

/** Central differences of `loss` with respect to each element of `v` (float64: accurate to about 1e-9 here). */
function numericGradient(v: Float64Array, loss: () => number): Float64Array {
  const h = 1e-5;
  return v.map((_, i) => {
    const keep = v[i];
    v[i] = keep + h;
    const up = loss();
    v[i] = keep - h;
    const down = loss();
    v[i] = keep;
    return (up - down) / (2 * h);
  });
}

function dot(a: Float64Array, b: Float64Array): number {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
}

function weightedSum(out: Tensor, w: Float64Array): Tensor {
  return sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape)));
}

Deno.test("batchNorm2d training: batch statistics, running-stat update and the full gradient match float64", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x = param(g, [N, C, H, W], 301, -1, 3);
    const w = param(g, [C], 302, 0.5, 1.5);
    const b = param(g, [C], 303);
    const rm = param(g, [C], 304, -0.5, 0.5, false);
    const rv = param(g, [C], 305, 0.5, 2, false);
    const out = batchNorm2d(x.t, w.t, b.t, rm.t, rv.t, { training: true });
    const up = f32(randomArray(out.size, 306));
    backward(weightedSum(out, up));
    const eps = 1e-5;
    assertClose(await out.read(), normalise(x.v, w.v, b.v, null, eps), { what: "forward" });
    const { mean, variance } = batchStats(x.v);
    assertClose(await rm.t.read(), rm.v.map((r, c) => 0.9 * r + 0.1 * mean[c]), { what: "running mean" });
    const unbiased = variance.map((v) => v * COUNT / (COUNT - 1));
    assertClose(await rv.t.read(), rv.v.map((r, c) => 0.9 * r + 0.1 * unbiased[c]), { what: "running var" });
    const loss = () => dot(normalise(x.v, w.v, b.v, null, eps), up);
    assertClose(await gradOf(x.t), numericGradient(x.v, loss), { what: "grad x" });
    assertClose(await gradOf(w.t), numericGradient(w.v, loss), { what: "grad weight" });
    assertClose(await gradOf(b.t), numericGradient(b.v, loss), { what: "grad bias" });
  });
});

Deno.test("batchNorm2d training: momentum and eps options over two steps, and updates without grad", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x1 = param(g, [N, C, H, W], 311, -2, 1, false);
    const x2 = param(g, [N, C, H, W], 312, 0, 4, false);
    const w = param(g, [C], 313, 0.5, 1.5, false);
    const b = param(g, [C], 314);
    const rm = param(g, [C], 315, -0.5, 0.5, false);
    const rv = param(g, [C], 316, 0.5, 2, false);
    const opts = { training: true, momentum: 0.3, eps: 1e-2 };
    batchNorm2d(x1.t, w.t, b.t, rm.t, rv.t, opts);
    const out2 = noGrad(() => batchNorm2d(x2.t, w.t, b.t, rm.t, rv.t, opts));
    let expMean = rm.v, expVar = rv.v;
    for (const x of [x1.v, x2.v]) {
      const s = batchStats(x);
      expMean = expMean.map((r, c) => 0.7 * r + 0.3 * s.mean[c]);
      expVar = expVar.map((r, c) => 0.7 * r + 0.3 * s.variance[c] * COUNT / (COUNT - 1));
    }
    assertClose(await rm.t.read(), expMean, { what: "running mean after two steps" });
    assertClose(await rv.t.read(), expVar, { what: "running var after two steps" });
    assertClose(await out2.read(), normalise(x2.v, w.v, b.v, null, 1e-2), { what: "forward with eps 1e-2" });
  });
});

Deno.test("batchNorm2d eval: running statistics normalise, stay unchanged, and the gradient is affine", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x = param(g, [N, C, H, W], 321, -1, 3);
    const w = param(g, [C], 322, 0.5, 1.5);
    const b = param(g, [C], 323);
    const rm = param(g, [C], 324, -0.5, 0.5, false);
    const rv = param(g, [C], 325, 0.5, 2, false);
    const out = batchNorm2d(x.t, w.t, b.t, rm.t, rv.t, { training: false });
    const up = f32(randomArray(out.size, 326));
    backward(weightedSum(out, up));
    const running = { mean: rm.v, variance: rv.v };
    assertClose(await out.read(), normalise(x.v, w.v, b.v, running, 1e-5), { what: "forward" });
    assertClose(await rm.t.read(), rm.v, { what: "running mean", atol: 0, rtol: 0 });
    assertClose(await rv.t.read(), rv.v, { what: "running var", atol: 0, rtol: 0 });
    const loss = () => dot(normalise(x.v, w.v, b.v, running, 1e-5), up);
    assertClose(await gradOf(x.t), numericGradient(x.v, loss), { what: "grad x" });
    assertClose(await gradOf(w.t), numericGradient(w.v, loss), { what: "grad weight" });
    assertClose(await gradOf(b.t), numericGradient(b.v, loss), { what: "grad bias" });
  });
});

Deno.test("batchNorm2d rejects mismatched parameters and single-value channels in training", async () => {
  const g = await gpu();
  tidy(() => {
    const x = param(g, [1, 3, 1, 1], 331, -1, 1, false).t;
    const p3 = param(g, [3], 332, 0.5, 1, false).t;
    const p2 = param(g, [2], 333, 0.5, 1, false).t;
    throws(() => batchNorm2d(x, p2, p3, p3, p3, { training: false }), /weight must be \[3\]/);
    throws(() => batchNorm2d(x, p3, p3, p3, p3, { training: true }), /more than one value per channel/);
  });
});
