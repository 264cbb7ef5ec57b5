// The vectorised and multi-pass kernel paths (vec4 words, chunked sums, buffer copies for contiguous blocks) against
// float64 references, on shapes chosen to take each path: sizes that are and are not multiples of 4, sums long
// enough to need several passes, blocks with and without anything outside their axis.
import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { addInto, copyOf, fromArray, full, linearCombination } from "../lib/tensor/create.ts";
import { add, div, exp, gelu, mul, quickGelu, relu, sub, sum, sumAxesForward } from "../lib/tensor/ops/elementwise.ts";
import { concat, slice } from "../lib/tensor/ops/layout.ts";
import { layerNorm } from "../lib/tensor/ops/norm.ts";
import { softmax } from "../lib/tensor/ops/softmax.ts";
import { withKernelStrategy } from "../lib/tensor/ops/strategy.ts";
import { type Tensor, withScope } from "../lib/tensor/tensor.ts";

/** Loss = sum(out * w) with fixed random w, so each output element gets a distinct upstream gradient. */
function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  return { loss: sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape))), w };
}

/** Float64 sum of `values` (shape `shape`) over the marked axes. */
function refSum(values: ArrayLike<number>, shape: number[], reduced: boolean[], scale: number): Float64Array {
  const outShape = shape.filter((_, d) => !reduced[d]);
  const out = new Float64Array(outShape.reduce((p, d) => p * d, 1));
  for (let i = 0; i < values.length; i++) {
    let rem = i, o = 0, stride = 1;
    for (let d = shape.length - 1; d >= 0; d--) {
      const c = rem % shape[d];
      rem = Math.floor(rem / shape[d]);
      if (!reduced[d]) {
        o += c * stride;
        stride *= shape[d];
      }
    }
    out[o] += values[i] * scale;
  }
  return out;
}

// [shape, reduced axes, scale]: vec4 columns over many chunks (two passes), scalar columns, a single column of whole
// words, a single column of odd length, two separate summed axes, only size-1 axes summed, a huge single sum.
const SUM_CASES: [number[], number[], number][] = [
  [[1000, 36], [0], 1],
  [[3, 700, 5], [1], 0.5],
  [[2, 3000], [1], 1],
  [[6001], [0], 1 / 6001],
  [[4, 50, 6, 9], [0, 2], 1],
  [[5, 1, 3], [1], -2],
  [[70000], [0], 1],
];

for (const [shape, axes, scale] of SUM_CASES) {
  Deno.test(`sumAxesForward ${JSON.stringify(shape)} over ${JSON.stringify(axes)} matches float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, shape, 301, -1, 1, false);
      const reduced = shape.map((_, d) => axes.includes(d));
      const out = sumAxesForward(x.t, reduced, scale);
      assert.deepEqual(out.shape, shape.filter((_, d) => !reduced[d]));
      assertClose(await out.read(), refSum(x.v, shape, reduced, scale), { rtol: 1e-5, atol: 2e-5, what: "sum" });
    });
  });
}

const UNARY: [string, (t: Tensor) => Tensor, (x: number) => number, (x: number) => number][] = [
  ["exp", exp, Math.exp, Math.exp],
  ["quick_gelu", quickGelu, (x) => x / (1 + Math.exp(-1.702 * x)), (x) => {
    const s = 1 / (1 + Math.exp(-1.702 * x));
    return s + 1.702 * x * s * (1 - s);
  }],
  ["relu", relu, (x) => Math.max(x, 0), (x) => x > 0 ? 1 : 0],
];

for (const [name, op, f, df] of UNARY) {
  Deno.test(`unary ${name} on whole vec4 words: forward and gradient match float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, [29, 12], 311, -3, 3);
      const out = op(x.t);
      const { loss, w } = weightedSum(out, 312);
      backward(loss);
      assertClose(await out.read(), Array.from(x.v, f), { what: `${name} forward` });
      assertClose(await gradOf(x.t), Array.from(x.v, (v, i) => df(v) * w[i]), { what: `${name} grad` });
    });
  });
}

Deno.test("gelu on whole vec4 words equals the scalar kernel bit for bit", async () => {
  const g = await gpu();
  await withScope(async () => {
    // 4 * 97 elements take the vec4 kernel, 97 the scalar one; the same values must come out of both.
    const values = Float32Array.from(randomArray(4 * 97, 313, -4, 4));
    const vec = await gelu(fromArray(g, values, [4, 97])).read();
    for (let r = 0; r < 4; r++) {
      const row = await gelu(fromArray(g, values.slice(97 * r, 97 * (r + 1)), [97])).read();
      assert.deepEqual(vec.slice(97 * r, 97 * (r + 1)), row);
    }
  });
});

function broadcastIndex(i: number, outShape: number[], shape: number[]): number {
  let idx = 0, stride = 1, rem = i;
  const off = outShape.length - shape.length;
  for (let d = outShape.length - 1; d >= 0; d--) {
    const c = rem % outShape[d];
    rem = Math.floor(rem / outShape[d]);
    if (d >= off && shape[d - off] !== 1) idx += c * stride;
    if (d >= off) stride *= shape[d - off];
  }
  return idx;
}

const BINARY: [string, (a: Tensor, b: Tensor) => Tensor, (x: number, y: number) => number, number[], number[]][] = [
  ["add (row broadcast)", add, (x, y) => x + y, [6, 8], [8]],
  ["mul (column broadcast)", mul, (x, y) => x * y, [5, 3, 8], [5, 3, 1]],
  ["sub (same shape)", sub, (x, y) => x - y, [3, 4, 8], [3, 4, 8]],
  ["div (scalar)", div, (x, y) => x / y, [7, 4], [1]],
];

for (const [name, op, f, sa, sb] of BINARY) {
  Deno.test(`binary ${name} on vec4 words: forward and gradients match float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const a = param(g, sa, 321, -2, 2);
      const b = param(g, sb, 322, 0.5, 2);
      const out = op(a.t, b.t);
      const outShape = [...out.shape];
      const { loss, w } = weightedSum(out, 323);
      backward(loss);
      const expected = new Float64Array(out.size);
      const ga = new Float64Array(a.v.length), gb = new Float64Array(b.v.length);
      const h = 1e-3;
      for (let i = 0; i < out.size; i++) {
        const ia = broadcastIndex(i, outShape, sa), ib = broadcastIndex(i, outShape, sb);
        const x = a.v[ia], y = b.v[ib];
        expected[i] = f(x, y);
        // The ops are polynomials or quotients in x and y: central differences are exact enough at this step.
        ga[ia] += (f(x + h, y) - f(x - h, y)) / (2 * h) * w[i];
        gb[ib] += (f(x, y + h) - f(x, y - h)) / (2 * h) * w[i];
      }
      assertClose(await out.read(), expected, { what: `${name} forward` });
      assertClose(await gradOf(a.t), ga, { what: `${name} grad a`, atol: 1e-4 });
      assertClose(await gradOf(b.t), gb, { what: `${name} grad b`, atol: 1e-4 });
    });
  });
}

Deno.test("fill, linear combination and accumulation on vec4 words", async () => {
  const g = await gpu();
  await withScope(async () => {
    const a = param(g, [9, 4], 331, -1, 1, false);
    const b = param(g, [9, 4], 332, -1, 1, false);
    assert.deepEqual(Array.from(await full(g, [9, 4], 2.5).read()), new Array(36).fill(2.5));
    const i32 = await full(g, [8], -7, "i32").readInt();
    assert.deepEqual(Array.from(i32), new Array(8).fill(-7));
    const c = linearCombination(a.t, 1.5, b.t, -0.25);
    assertClose(await c.read(), Array.from(a.v, (v, i) => 1.5 * v - 0.25 * b.v[i]), { what: "lincomb" });
    const acc = copyOf(a.t);
    addInto(acc, b.t);
    assertClose(await acc.read(), Array.from(a.v, (v, i) => v + b.v[i]), { what: "accumulate" });
  });
});

/** Float64 slice along one axis as [outer, mid, inner]. */
function refSlice(v: Float64Array, shape: number[], axis: number, from: number, to: number): number[] {
  const inner = shape.slice(axis + 1).reduce((p, d) => p * d, 1);
  const out: number[] = [];
  for (let i = 0; i < v.length; i++) {
    const m = Math.floor(i / inner) % shape[axis];
    if (m >= from && m < to) out.push(v[i]);
  }
  return out;
}

// [shape, axis, start, end]: vec4 words inside a middle axis, a contiguous leading block (buffer copies and clears),
// an empty slice of the leading axis.
const SLICE_CASES: [number[], number, number, number][] = [
  [[3, 5, 8], 1, 1, 4],
  [[3, 4, 2, 3], 0, 1, 2],
  [[6, 4], 0, 2, 2],
];

for (const [shape, axis, start, end] of SLICE_CASES) {
  Deno.test(`slice ${JSON.stringify(shape)} axis ${axis} [${start}, ${end}) by words or copies`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, shape, 341);
      // A non-zero gradient from elsewhere too, so that the padded slice gradient is added to something.
      const out = slice(x.t, axis, start, end);
      const { loss, w } = weightedSum(out, 342);
      const other = mul(x.t, fromArray(g, new Float32Array(x.v.length).fill(0.5), shape));
      backward(add(loss, sum(other)));
      const expected = refSlice(x.v, shape, axis, start, end);
      assertClose(await out.read(), expected, { rtol: 0, atol: 0, what: "slice forward" });
      const inner = shape.slice(axis + 1).reduce((p, d) => p * d, 1);
      const dx = new Float64Array(x.v.length).fill(0.5);
      let k = 0;
      for (let i = 0; i < x.v.length; i++) {
        const m = Math.floor(i / inner) % shape[axis];
        // One f32 addition on the GPU: rounding its exact float64 sum once gives the same value.
        if (m >= start && m < end) dx[i] = Math.fround(0.5 + w[k++]);
      }
      assertClose(await gradOf(x.t), dx, { rtol: 0, atol: 0, what: "slice dx" });
    });
  });
}

Deno.test("concat along the leading axis (copies) and a middle axis (vec4 words): forward and gradients", async () => {
  const g = await gpu();
  await withScope(async () => {
    for (const [shapes, axis] of [[[[2, 8], [3, 8]], 0], [[[2, 3, 4], [2, 2, 4]], 1]] as [number[][], number][]) {
      const inputs = shapes.map((s, k) => param(g, s, 350 + k));
      const out = concat(inputs.map((p) => p.t), axis);
      const { loss, w } = weightedSum(out, 355);
      backward(loss);
      const outer = shapes[0].slice(0, axis).reduce((p, d) => p * d, 1);
      const expected: number[] = [];
      const grads = inputs.map((p) => new Float64Array(p.v.length));
      for (let i = 0; i < outer; i++) {
        inputs.forEach((p, k) => {
          const block = p.v.length / outer;
          for (let r = 0; r < block; r++) {
            grads[k][i * block + r] = w[expected.length];
            expected.push(p.v[i * block + r]);
          }
        });
      }
      assertClose(await out.read(), expected, { rtol: 0, atol: 0, what: `concat axis ${axis}` });
      for (const [k, p] of inputs.entries()) {
        assertClose(await gradOf(p.t), grads[k], { rtol: 0, atol: 0, what: `concat axis ${axis} grad ${k}` });
      }
    }
  });
});

Deno.test("gradients of slices that split a tensor along its leading axis add block by block", async () => {
  const g = await gpu();
  await withScope(async () => {
    // As attention splits q, k, v: each slice's gradient is padded to the whole tensor; the sums add only blocks.
    const x = param(g, [3, 5, 8], 361);
    const parts = [0, 1, 2].map((k) => slice(x.t, 0, k, k + 1));
    const weighted = parts.map((p, k) => weightedSum(p, 362 + k));
    backward(add(add(weighted[0].loss, weighted[1].loss), weighted[2].loss));
    const dx = weighted.flatMap((w) => Array.from(w.w));
    assertClose(await gradOf(x.t), dx, { rtol: 0, atol: 0, what: "dx" });
    for (const [k, p] of parts.entries()) {
      assertClose(await p.read(), x.v.slice(40 * k, 40 * (k + 1)), { rtol: 0, atol: 0, what: `part ${k}` });
    }
  });
});

// Row kernels of the CPU layout that keep rows in registers: vec4 words (widths 128 and 20; layer norm's backward in
// one pass over chunks of rows, 70 rows making three chunks), and rows of odd or even widths loaded 4 or 2 at a time
// as whole words (softmax 65 and causal 6).
const LAYER_NORM_ROWS: number[][] = [[10, 128], [4, 3, 20], [70, 16]];

for (const shape of LAYER_NORM_ROWS) {
  Deno.test(`layerNorm ${JSON.stringify(shape)} with rows in registers: forward and gradients match float64`, async () => {
    const g = await gpu();
    await withKernelStrategy("cpu", () =>
      withScope(async () => {
        const cols = shape[shape.length - 1];
        const x = param(g, shape, 371, -2, 3);
        const weight = param(g, [cols], 372, 0.5, 1.5);
        const bias = param(g, [cols], 373);
        const out = layerNorm(x.t, weight.t, bias.t);
        const { loss, w } = weightedSum(out, 374);
        backward(loss);
        const y = new Float64Array(x.v.length), dx = new Float64Array(x.v.length);
        const dw = new Float64Array(cols), db = new Float64Array(cols);
        for (let r = 0; r < x.v.length / cols; r++) {
          const row = x.v.subarray(r * cols, (r + 1) * cols);
          const mu = row.reduce((a, v) => a + v, 0) / cols;
          const rstd = 1 / Math.sqrt(row.reduce((a, v) => a + (v - mu) ** 2, 0) / cols + 1e-5);
          let meanGw = 0, meanGwx = 0;
          for (let c = 0; c < cols; c++) {
            const xhat = (row[c] - mu) * rstd, up = w[r * cols + c];
            y[r * cols + c] = xhat * weight.v[c] + bias.v[c];
            meanGw += up * weight.v[c] / cols;
            meanGwx += up * weight.v[c] * xhat / cols;
            dw[c] += up * xhat;
            db[c] += up;
          }
          for (let c = 0; c < cols; c++) {
            const xhat = (row[c] - mu) * rstd;
            dx[r * cols + c] = rstd * (w[r * cols + c] * weight.v[c] - meanGw - xhat * meanGwx);
          }
        }
        assertClose(await out.read(), y, { what: "layerNorm forward" });
        assertClose(await gradOf(x.t), dx, { what: "layerNorm dx", atol: 1e-4 });
        assertClose(await gradOf(weight.t), dw, { what: "layerNorm dweight", atol: 1e-4 });
        assertClose(await gradOf(bias.t), db, { what: "layerNorm dbias", atol: 1e-4 });
      }));
  });
}

const SOFTMAX_ROWS: [number[], boolean][] = [[[8, 65], false], [[2, 2, 6, 6], true], [[16, 32], false], [
  [2, 8, 8],
  true,
]];

for (const [shape, causal] of SOFTMAX_ROWS) {
  const name = `softmax ${JSON.stringify(shape)}${causal ? " causal" : ""} with rows in registers`;
  Deno.test(`${name}: forward and gradient match float64`, async () => {
    const g = await gpu();
    await withKernelStrategy("cpu", () =>
      withScope(async () => {
        const cols = shape[shape.length - 1];
        const scaleBy = 0.7;
        const x = param(g, shape, 381, -4, 4);
        const out = softmax(x.t, { causal, scale: scaleBy });
        const { loss, w } = weightedSum(out, 382);
        backward(loss);
        const y = new Float64Array(x.v.length), dx = new Float64Array(x.v.length);
        for (let r = 0; r < x.v.length / cols; r++) {
          const o = r * cols, limit = causal ? (r % cols) + 1 : cols;
          let m = -Infinity, total = 0, gy = 0;
          for (let j = 0; j < limit; j++) m = Math.max(m, scaleBy * x.v[o + j]);
          for (let j = 0; j < limit; j++) total += Math.exp(scaleBy * x.v[o + j] - m);
          for (let j = 0; j < limit; j++) {
            y[o + j] = Math.exp(scaleBy * x.v[o + j] - m) / total;
            gy += w[o + j] * y[o + j];
          }
          for (let j = 0; j < cols; j++) dx[o + j] = scaleBy * y[o + j] * (w[o + j] - gy);
        }
        assertClose(await out.read(), y, { what: "softmax forward", atol: 1e-6 });
        assertClose(await gradOf(x.t), dx, { what: "softmax dx", atol: 1e-6 });
      }));
  });
}
