import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { l2Normalize, layerNorm } from "../lib/tensor/ops/norm.ts";
import { type KernelStrategy, withKernelStrategy } from "../lib/tensor/ops/strategy.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";

// Loss = sum(out * w) with fixed random w, so each output element gets a distinct upstream gradient.
function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  return { loss: sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape))), w };
}

interface LayerNormRef {
  y: Float64Array;
  dx: Float64Array;
  dweight: Float64Array;
  dbias: Float64Array;
}

function refLayerNorm(
  x: Float64Array,
  weight: Float64Array,
  bias: Float64Array,
  up: Float64Array,
  cols: number,
  eps: number,
): LayerNormRef {
  const rows = x.length / cols;
  const y = new Float64Array(x.length), dx = new Float64Array(x.length);
  const dweight = new Float64Array(cols), dbias = new Float64Array(cols);
  for (let r = 0; r < rows; r++) {
    const row = x.subarray(r * cols, (r + 1) * cols);
    const mean = row.reduce((a, v) => a + v, 0) / cols;
    const variance = row.reduce((a, v) => a + (v - mean) ** 2, 0) / cols;
    const rstd = 1 / Math.sqrt(variance + eps);
    const xhat = Array.from(row, (v) => (v - mean) * rstd);
    let meanGw = 0, meanGwx = 0;
    for (let c = 0; c < cols; c++) {
      const g = up[r * cols + c];
      y[r * cols + c] = xhat[c] * weight[c] + bias[c];
      meanGw += g * weight[c] / cols;
      meanGwx += g * weight[c] * xhat[c] / cols;
      dweight[c] += g * xhat[c];
      dbias[c] += g;
    }
    for (let c = 0; c < cols; c++) {
      dx[r * cols + c] = rstd * (up[r * cols + c] * weight[c] - meanGw - xhat[c] * meanGwx);
    }
  }
  return { y, dx, dweight, dbias };
}

function refL2Normalize(x: Float64Array, up: Float64Array, cols: number, eps: number) {
  const y = new Float64Array(x.length), dx = new Float64Array(x.length);
  for (let r = 0; r < x.length / cols; r++) {
    const o = r * cols;
    let sq = 0;
    for (let c = 0; c < cols; c++) sq += x[o + c] ** 2;
    const norm = Math.sqrt(sq);
    const d = Math.max(norm, eps);
    let gy = 0;
    for (let c = 0; c < cols; c++) {
      y[o + c] = x[o + c] / d;
      gy += up[o + c] * y[o + c];
    }
    for (let c = 0; c < cols; c++) dx[o + c] = norm > eps ? (up[o + c] - y[o + c] * gy) / norm : up[o + c] / eps;
  }
  return { y, dx };
}

// Every case runs with both row layouts: one invocation per row (the CPU fallback's) and many lanes per row.
const STRATEGIES: KernelStrategy[] = ["cpu", "gpu"];

// [shape, x range]: widths that are multiples of no lane count, a 3-D input, a wide row, and an offset mean in
// both a register row and a looped one.
const LAYER_NORM_CASES: [number[], number, number][] = [
  [[37, 29], -2, 2],
  [[3, 5, 29], -1, 3],
  [[6, 1024], -1, 1],
  [[7, 77], 30, 31],
  [[5, 772], 30, 31],
];

for (const strategy of STRATEGIES) {
  for (const [shape, lo, hi] of LAYER_NORM_CASES) {
    Deno.test(`layerNorm ${JSON.stringify(shape)} x in [${lo},${hi}) (${strategy} layout): forward and gradients`, async () => {
      const g = await gpu();
      await withKernelStrategy(strategy, () =>
        withScope(async () => {
          const cols = shape[shape.length - 1];
          const x = param(g, shape, 41, lo, hi);
          const weight = param(g, [cols], 42, 0.5, 1.5);
          const bias = param(g, [cols], 43);
          const out = layerNorm(x.t, weight.t, bias.t);
          const { loss, w } = weightedSum(out, 44);
          backward(loss);
          const ref = refLayerNorm(x.v, weight.v, bias.v, w, cols, 1e-5);
          assertClose(await out.read(), ref.y, { what: "layerNorm forward" });
          assertClose(await gradOf(x.t), ref.dx, { what: "layerNorm dx", atol: 1e-4 });
          assertClose(await gradOf(weight.t), ref.dweight, { what: "layerNorm dweight", atol: 1e-4 });
          assertClose(await gradOf(bias.t), ref.dbias, { what: "layerNorm dbias", atol: 1e-4 });
        }));
    });
  }
}

Deno.test("layerNorm: only the inputs that need gradients get them; eps is honoured", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x = param(g, [5, 13], 45, -1e-3, 1e-3);
    const weight = param(g, [13], 46, 0.5, 1.5, false);
    const bias = param(g, [13], 47, -1, 1, false);
    const eps = 1e-4; // far above the variance (about 3e-7), so the output depends strongly on eps
    const out = layerNorm(x.t, weight.t, bias.t, eps);
    const { loss, w } = weightedSum(out, 48);
    backward(loss);
    const ref = refLayerNorm(x.v, weight.v, bias.v, w, 13, eps);
    assertClose(await out.read(), ref.y, { what: "forward" });
    assertClose(await gradOf(x.t), ref.dx, { what: "dx" });
    if (weight.t.grad || bias.t.grad) throw new Error("parameters without requiresGrad received gradients");
  });
});

const L2_CASES: [number, number][] = [[37, 29], [4, 512], [9, 3]];

for (const strategy of STRATEGIES) {
  for (const [rows, cols] of L2_CASES) {
    Deno.test(`l2Normalize [${rows},${cols}] (${strategy} layout): forward and gradient`, async () => {
      const g = await gpu();
      await withKernelStrategy(strategy, () =>
        withScope(async () => {
          const x = param(g, [rows, cols], 51, -2, 2);
          const out = l2Normalize(x.t);
          const { loss, w } = weightedSum(out, 52);
          backward(loss);
          const ref = refL2Normalize(x.v, w, cols, 1e-12);
          assertClose(await out.read(), ref.y, { what: "l2Normalize forward" });
          assertClose(await gradOf(x.t), ref.dx, { what: "l2Normalize dx" });
        }));
    });
  }
}

Deno.test("l2Normalize: rows whose norm is below eps are divided by eps, with the matching gradient", async () => {
  const g = await gpu();
  await withScope(async () => {
    const rows = 3, cols = 7, eps = 1e-3;
    // Row 1 has a norm of about 6e-5 < eps; rows 0 and 2 are ordinary.
    const v = f32(randomArray(rows * cols, 53, -1, 1).map((e, i) => (i >= cols && i < 2 * cols) ? e * 4e-5 : e));
    const x = fromArray(g, Float32Array.from(v), [rows, cols]);
    x.requiresGrad = true;
    const out = l2Normalize(x, eps);
    const { loss, w } = weightedSum(out, 54);
    backward(loss);
    const ref = refL2Normalize(v, w, cols, eps);
    assertClose(await out.read(), ref.y, { what: "forward" });
    assertClose(await gradOf(x), ref.dx, { what: "dx" });
  });
});
