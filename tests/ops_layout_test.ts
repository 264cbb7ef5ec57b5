import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { coalescePermutation } from "../kernels/layout.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { concat, permute, slice, transpose } from "../lib/tensor/ops/layout.ts";
import { type KernelStrategy, withKernelStrategy } from "../lib/tensor/ops/strategy.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";

function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  return { loss: sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape))), w };
}

function stridesOf(shape: readonly number[]): number[] {
  const s = shape.map(() => 1);
  for (let d = shape.length - 2; d >= 0; d--) s[d] = s[d + 1] * shape[d + 1];
  return s;
}

/** For each output element of permute(shape, axes), the flat index of the input element it copies. */
function refPermuteIndex(shape: readonly number[], axes: readonly number[]): number[] {
  const outShape = axes.map((a) => shape[a]);
  const inStrides = stridesOf(shape);
  const n = shape.reduce((p, d) => p * d, 1);
  const src: number[] = [];
  for (let i = 0; i < n; i++) {
    let rem = i, idx = 0;
    for (let d = outShape.length - 1; d >= 0; d--) {
      idx += (rem % outShape[d]) * inStrides[axes[d]];
      rem = Math.floor(rem / outShape[d]);
    }
    src.push(idx);
  }
  return src;
}

// [shape, axes]: attention head splits and merges (innermost axis kept, of odd length or a multiple of 4 as in vec4
// copies), the fused q/k/v split of rank 5, a reversal of rank 6 with a size-1 axis, a pure size-1 move (a copy
// after coalescing), negative axes, and rank 1.
const PERMUTE_CASES: [number[], number[]][] = [
  [[2, 13, 3, 5], [0, 2, 1, 3]],
  [[2, 3, 13, 8], [0, 2, 1, 3]],
  [[2, 7, 3, 4, 8], [2, 0, 3, 1, 4]],
  [[5, 4, 12], [1, 0, 2]],
  [[3, 5, 7, 2], [3, 1, 0, 2]],
  [[2, 1, 3, 2, 5, 3], [5, 3, 1, 0, 4, 2]],
  [[4, 1, 7], [1, 0, 2]],
  [[37, 29], [-1, -2]],
  [[11], [0]],
];

// Both kernel shapes: one invocation per element (GPUs) and one per row of the innermost axis (the CPU fallback).
const STRATEGIES: KernelStrategy[] = ["cpu", "gpu"];

for (const strategy of STRATEGIES) {
  for (const [shape, axes] of PERMUTE_CASES) {
    Deno.test(`permute ${JSON.stringify(shape)} by ${JSON.stringify(axes)} (${strategy} kernels): forward and gradient`, async () => {
      const g = await gpu();
      await withKernelStrategy(strategy, () =>
        withScope(async () => {
          const x = param(g, shape, 81);
          const out = permute(x.t, axes);
          const order = axes.map((a) => a < 0 ? a + shape.length : a);
          assert.deepEqual(out.shape, order.map((a) => shape[a]));
          const { loss, w } = weightedSum(out, 82);
          backward(loss);
          const src = refPermuteIndex(shape, order);
          const dx = new Float64Array(x.v.length);
          src.forEach((s, i) => dx[s] += w[i]);
          assertClose(await out.read(), src.map((s) => x.v[s]), { rtol: 0, atol: 0, what: "permute forward" });
          assertClose(await gradOf(x.t), dx, { rtol: 0, atol: 0, what: "permute dx" });
        }));
    });
  }
}

Deno.test("coalescePermutation merges axes that stay adjacent and drops size-1 axes", () => {
  assert.deepEqual(coalescePermutation([2, 3, 4, 5], [0, 1, 3, 2]), { shape: [6, 4, 5], axes: [0, 2, 1] });
  assert.deepEqual(coalescePermutation([2, 3, 4, 5], [2, 3, 0, 1]), { shape: [6, 20], axes: [1, 0] });
  assert.deepEqual(coalescePermutation([2, 1, 3], [2, 1, 0]), { shape: [2, 3], axes: [1, 0] });
  assert.deepEqual(coalescePermutation([4, 1, 7], [1, 0, 2]), { shape: [28], axes: [0] });
  assert.deepEqual(coalescePermutation([2, 3, 1, 4], [0, 2, 1, 3]), { shape: [24], axes: [0] });
});

Deno.test("transpose swaps two axes, and permute moves i32 data bit-exactly", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x = param(g, [3, 37, 29], 83);
    const t = transpose(x.t, -1, 1);
    assert.deepEqual(t.shape, [3, 29, 37]);
    const src = refPermuteIndex([3, 37, 29], [0, 2, 1]);
    assertClose(await t.read(), src.map((s) => x.v[s]), { rtol: 0, atol: 0, what: "transpose" });
    const ids = Int32Array.from({ length: 6 * 7 }, (_, i) => (i * 2654435761) | 0);
    const p = permute(fromArray(g, ids, [6, 7]), [1, 0]);
    assert.equal(p.dtype, "i32");
    assert.deepEqual(Array.from(await p.readInt()), refPermuteIndex([6, 7], [1, 0]).map((s) => ids[s]));
  });
});

Deno.test("permute refuses axes that are not a permutation", async () => {
  const g = await gpu();
  await withScope(() => {
    const x = param(g, [2, 3, 4], 84);
    assert.throws(() => permute(x.t, [0, 1]), /not a permutation/);
    assert.throws(() => permute(x.t, [0, 1, 1]), /not a permutation/);
    assert.throws(() => permute(x.t, [0, 1, 3]), /out of range/);
    return Promise.resolve();
  });
});

// [shapes, axis]: along the first, a middle and the last axis; the second input of each case needs no gradient.
const CONCAT_CASES: [number[][], number][] = [
  [[[3, 5], [4, 5], [1, 5]], 0],
  [[[2, 3, 7], [2, 1, 7], [2, 5, 7]], 1],
  [[[5, 3, 2], [5, 3, 11]], -1],
];

for (const [shapes, axis] of CONCAT_CASES) {
  Deno.test(`concat ${JSON.stringify(shapes)} on axis ${axis}: forward and gradients`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const inputs = shapes.map((s, k) => param(g, s, 90 + k, -1, 1, k !== 1));
      const out = concat(inputs.map((p) => p.t), axis);
      const ax = axis < 0 ? axis + shapes[0].length : axis;
      const { loss, w } = weightedSum(out, 89);
      backward(loss);
      // Reference: walk the output in order, taking each input's rows of the axis in turn.
      const outer = shapes[0].slice(0, ax).reduce((p, d) => p * d, 1);
      const inner = shapes[0].slice(ax + 1).reduce((p, d) => p * d, 1);
      const expected: number[] = [];
      const grads = inputs.map((p) => new Float64Array(p.v.length));
      let o = 0;
      for (let i = 0; i < outer; i++) {
        inputs.forEach((p, k) => {
          const block = shapes[k][ax] * inner;
          for (let r = 0; r < block; r++) {
            expected.push(p.v[i * block + r]);
            grads[k][i * block + r] = w[o++];
          }
        });
      }
      assert.deepEqual(out.shape, shapes[0].map((d, i) => i === ax ? shapes.reduce((p, s) => p + s[ax], 0) : d));
      assertClose(await out.read(), expected, { rtol: 0, atol: 0, what: "concat forward" });
      for (const [k, p] of inputs.entries()) {
        if (k === 1) assert.equal(p.t.grad, null);
        else assertClose(await gradOf(p.t), grads[k], { rtol: 0, atol: 0, what: `concat grad ${k}` });
      }
    });
  });
}

Deno.test("concat refuses inputs that differ outside the axis or in dtype", async () => {
  const g = await gpu();
  await withScope(() => {
    const a = param(g, [2, 3], 95).t;
    assert.throws(() => concat([a, param(g, [3, 3], 96).t], 1), /does not match/);
    assert.throws(() => concat([a, fromArray(g, new Int32Array(6), [2, 3])], 0), /does not match/);
    assert.throws(() => concat([], 0), /at least one/);
    return Promise.resolve();
  });
});

// [shape, axis, start, end]: a middle block of a middle axis, negative bounds on the last axis, the first row, the
// whole axis (a copy whose gradient passes straight through).
const SLICE_CASES: [number[], number, number, number][] = [
  [[3, 13, 5], 1, 4, 11],
  [[7, 29], -1, -20, -3],
  [[37, 29], 0, 0, 1],
  [[4, 6], 1, 0, 6],
];

for (const [shape, axis, start, end] of SLICE_CASES) {
  Deno.test(`slice ${JSON.stringify(shape)} axis ${axis} [${start}, ${end}): forward and gradient`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, shape, 97);
      const out = slice(x.t, axis, start, end);
      const { loss, w } = weightedSum(out, 98);
      backward(loss);
      const ax = axis < 0 ? axis + shape.length : axis;
      const from = start < 0 ? start + shape[ax] : start, to = end < 0 ? end + shape[ax] : end;
      const inner = shape.slice(ax + 1).reduce((p, d) => p * d, 1);
      const expected: number[] = [];
      const dx = new Float64Array(x.v.length);
      for (let i = 0; i < x.v.length; i++) {
        const m = Math.floor(i / inner) % shape[ax];
        if (m >= from && m < to) {
          dx[i] = w[expected.length];
          expected.push(x.v[i]);
        }
      }
      assert.deepEqual(out.shape, shape.map((d, i) => i === ax ? to - from : d));
      assertClose(await out.read(), expected, { rtol: 0, atol: 0, what: "slice forward" });
      assertClose(await gradOf(x.t), dx, { rtol: 0, atol: 0, what: "slice dx" });
    });
  });
}

Deno.test("slice refuses ranges outside the axis", async () => {
  const g = await gpu();
  await withScope(() => {
    const x = param(g, [4, 6], 99).t;
    assert.throws(() => slice(x, 1, 2, 7), /not a range/);
    assert.throws(() => slice(x, 1, 4, 3), /not a range/);
    assert.throws(() => slice(x, 2, 0, 1), /out of range/);
    return Promise.resolve();
  });
});
