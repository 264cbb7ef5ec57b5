import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, scale, sum } from "../lib/tensor/ops/elementwise.ts";
import { crossEntropy } from "../lib/tensor/ops/loss.ts";
import { type KernelStrategy, withKernelStrategy } from "../lib/tensor/ops/strategy.ts";
import { softmax } from "../lib/tensor/ops/softmax.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";

function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  return { loss: sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape))), w };
}

/** Float64 softmax of scale*x over rows of `cols`, causal rows seeing columns 0..(row mod cols); and dx for upstream g. */
function refSoftmax(x: Float64Array, g: Float64Array, cols: number, scaleBy: number, causal: boolean) {
  const y = new Float64Array(x.length), dx = new Float64Array(x.length);
  for (let r = 0; r < x.length / cols; r++) {
    const o = r * cols;
    const limit = causal ? (r % cols) + 1 : cols;
    let m = -Infinity;
    for (let j = 0; j < limit; j++) m = Math.max(m, scaleBy * x[o + j]);
    let s = 0;
    for (let j = 0; j < limit; j++) s += Math.exp(scaleBy * x[o + j] - m);
    let gy = 0;
    for (let j = 0; j < limit; j++) {
      y[o + j] = Math.exp(scaleBy * x[o + j] - m) / s;
      gy += g[o + j] * y[o + j];
    }
    for (let j = 0; j < cols; j++) dx[o + j] = scaleBy * y[o + j] * (g[o + j] - gy);
  }
  return { y, dx };
}

const STRATEGIES: KernelStrategy[] = ["cpu", "gpu"];

// [shape, causal, scale, x range]: odd widths, causal attention scores T=13 with batch and heads, a scaled width
// of 77, logits large enough that an unshifted exp would overflow, and a wide row.
const SOFTMAX_CASES: [number[], boolean, number, number][] = [
  [[37, 29], false, 1, 3],
  [[2, 3, 13, 13], true, 1, 3],
  [[5, 77], false, 0.125, 4],
  [[4, 7, 7], true, 0.5, 4],
  [[3, 31], false, 1, 150],
  [[3, 1000], false, 1, 5],
];

for (const strategy of STRATEGIES) {
  for (const [shape, causal, scaleBy, range] of SOFTMAX_CASES) {
    const name = `softmax ${JSON.stringify(shape)}${causal ? " causal" : ""} scale ${scaleBy} |x| < ${range}`;
    Deno.test(`${name} (${strategy} layout): forward and gradient`, async () => {
      const g = await gpu();
      await withKernelStrategy(strategy, () =>
        withScope(async () => {
          const cols = shape[shape.length - 1];
          const x = param(g, shape, 61, -range, range);
          const out = softmax(x.t, { causal, scale: scaleBy });
          const { loss, w } = weightedSum(out, 62);
          backward(loss);
          const ref = refSoftmax(x.v, w, cols, scaleBy, causal);
          assertClose(await out.read(), ref.y, { what: "softmax forward", atol: 1e-6 });
          assertClose(await gradOf(x.t), ref.dx, { what: "softmax dx", atol: 1e-6 });
        }));
    });
  }
}

Deno.test("softmax: a causal mask on non-square scores is refused", async () => {
  const g = await gpu();
  await withScope(() => {
    const x = param(g, [4, 5], 63);
    assert.throws(() => softmax(x.t, { causal: true }), /square \[\.\.\., T, T\] scores/);
    return Promise.resolve();
  });
});

function refCrossEntropy(x: Float64Array, targets: Int32Array, cols: number, upstream: number) {
  const rows = targets.length;
  let loss = 0;
  const dx = new Float64Array(x.length);
  for (let r = 0; r < rows; r++) {
    const o = r * cols;
    let m = -Infinity;
    for (let j = 0; j < cols; j++) m = Math.max(m, x[o + j]);
    let s = 0;
    for (let j = 0; j < cols; j++) s += Math.exp(x[o + j] - m);
    const lse = m + Math.log(s);
    loss += (lse - x[o + targets[r]]) / rows;
    for (let j = 0; j < cols; j++) {
      dx[o + j] = upstream * (Math.exp(x[o + j] - lse) - (j === targets[r] ? 1 : 0)) / rows;
    }
  }
  return { loss, dx };
}

// [rows, cols, logit range]: odd sizes, a CLIP-like square batch with large logits, and one class column.
const CE_CASES: [number, number, number][] = [[37, 29, 3], [16, 16, 100], [5, 1, 2], [3, 700, 5]];

for (const strategy of STRATEGIES) {
  for (const [rows, cols, range] of CE_CASES) {
    Deno.test(`crossEntropy [${rows},${cols}] |x| < ${range} (${strategy} layout): loss and gradient`, async () => {
      const g = await gpu();
      await withKernelStrategy(strategy, () =>
        withScope(async () => {
          const x = param(g, [rows, cols], 71, -range, range);
          // Seeded classes covering both ends of the range.
          const classes = Int32Array.from(randomArray(rows, 72, 0, cols), Math.floor);
          classes[0] = 0;
          classes[rows - 1] = cols - 1;
          const targets = fromArray(g, classes, [rows]);
          const loss = crossEntropy(x.t, targets);
          // A non-unit upstream gradient checks that the backward pass scales by it.
          backward(scale(loss, 2.5));
          const ref = refCrossEntropy(x.v, classes, cols, 2.5);
          if (loss.shape.length !== 0) throw new Error(`loss shape ${loss.shape} is not a scalar`);
          assertClose([await loss.item()], [ref.loss], { what: "crossEntropy loss" });
          assertClose(await gradOf(x.t), ref.dx, { what: "crossEntropy dx", atol: 1e-6 });
        }));
    });
  }
}

Deno.test("crossEntropy: bad target tensors are refused", async () => {
  const g = await gpu();
  await withScope(() => {
    const x = param(g, [4, 5], 73);
    for (const targets of [fromArray(g, new Int32Array(3), [3]), fromArray(g, new Float32Array(4), [4])]) {
      assert.throws(() => crossEntropy(x.t, targets), /i32 tensor of 4 class indices/);
    }
    return Promise.resolve();
  });
});
