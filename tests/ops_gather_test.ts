import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { embedding, gatherRows } from "../lib/tensor/ops/gather.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";

function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  return { loss: sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape))), w };
}

function randomIds(n: number, vocab: number, seed: number): Int32Array {
  return Int32Array.from(randomArray(n, seed, 0, vocab), Math.floor);
}

/**
 * The embedding forward pass, and the table gradient accumulated in float32 in increasing position order: the order
 * the kernel promises, so the GPU result must match it bit for bit (f32 addition is correctly rounded).
 */
function refEmbedding(table: Float64Array, ids: Int32Array, up: Float64Array, dim: number) {
  const out = new Float64Array(ids.length * dim);
  const dTable = new Float32Array(table.length);
  ids.forEach((id, p) => {
    for (let d = 0; d < dim; d++) {
      out[p * dim + d] = table[id * dim + d];
      dTable[id * dim + d] = Math.fround(dTable[id * dim + d] + up[p * dim + d]);
    }
  });
  return { out, dTable };
}

// [vocab, dim, ids shape, id range]: few ids so most repeat; more positions than one sort tile (512), so the
// long-distance sort steps run; and CLIP's vocabulary with a text batch whose tail is padding (id 0).
const EMBEDDING_CASES: [number, number, number[], number][] = [
  [50, 13, [3, 7], 9],
  [97, 5, [1300], 97],
  [49408, 8, [128, 77], 49408],
];

for (const [vocab, dim, idShape, idRange] of EMBEDDING_CASES) {
  Deno.test(`embedding [${vocab},${dim}] ids ${JSON.stringify(idShape)}: forward and ordered, repeatable gradient`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const table = param(g, [vocab, dim], 101);
      const n = idShape.reduce((p, d) => p * d, 1);
      const idValues = randomIds(n, idRange, 102);
      if (vocab === 49408) { for (let p = 0; p < n; p++) if (p % 77 > 20) idValues[p] = 0; }
      idValues[0] = vocab - 1;
      const ids = fromArray(g, idValues, idShape);
      const out = embedding(table.t, ids);
      assert.deepEqual(out.shape, [...idShape, dim]);
      const { loss, w } = weightedSum(out, 103);
      backward(loss);
      const ref = refEmbedding(table.v, idValues, w, dim);
      assertClose(await out.read(), ref.out, { rtol: 0, atol: 0, what: "embedding forward" });
      const first = await gradOf(table.t);
      assertClose(first, ref.dTable, { rtol: 0, atol: 0, what: "embedding dweight (f32, position order)" });
      // A second backward pass accumulates exactly the same sums again.
      table.t.grad!.dispose();
      table.t.grad = null;
      backward(sum(mul(embedding(table.t, ids), fromArray(g, Float32Array.from(w), out.shape))));
      assert.deepEqual(await gradOf(table.t), first);
    });
  });
}

Deno.test("embedding gradient agrees with a float64 sum within f32 rounding", async () => {
  const g = await gpu();
  await withScope(async () => {
    const vocab = 11, dim = 29;
    const table = param(g, [vocab, dim], 104);
    const idValues = randomIds(37 * 3, vocab, 105);
    const out = embedding(table.t, fromArray(g, idValues, [37, 3]));
    const { loss, w } = weightedSum(out, 106);
    backward(loss);
    const expected = new Float64Array(vocab * dim);
    idValues.forEach((id, p) => {
      for (let d = 0; d < dim; d++) expected[id * dim + d] += w[p * dim + d];
    });
    assertClose(await gradOf(table.t), expected, { what: "embedding dweight", atol: 1e-5 });
  });
});

Deno.test("gatherRows picks one row per batch entry; its gradient lands on those rows only", async () => {
  const g = await gpu();
  await withScope(async () => {
    const [batch, rows, dim] = [5, 13, 7];
    const x = param(g, [batch, rows, dim], 107);
    const pick = Int32Array.from([12, 0, 5, 5, 9]);
    const out = gatherRows(x.t, fromArray(g, pick, [batch]));
    assert.deepEqual(out.shape, [batch, dim]);
    const { loss, w } = weightedSum(out, 108);
    backward(loss);
    const expected: number[] = [];
    const dx = new Float64Array(x.v.length);
    for (let b = 0; b < batch; b++) {
      for (let d = 0; d < dim; d++) {
        const at = (b * rows + pick[b]) * dim + d;
        expected.push(x.v[at]);
        dx[at] = w[b * dim + d];
      }
    }
    assertClose(await out.read(), expected, { rtol: 0, atol: 0, what: "gatherRows forward" });
    assertClose(await gradOf(x.t), dx, { rtol: 0, atol: 0, what: "gatherRows dx" });
  });
});

Deno.test("embedding and gatherRows refuse float indices and mismatched shapes", async () => {
  const g = await gpu();
  await withScope(() => {
    const table = param(g, [10, 4], 109).t;
    assert.throws(() => embedding(table, fromArray(g, new Float32Array(3), [3])), /ids must be an i32 tensor/);
    const x = param(g, [2, 3, 4], 110).t;
    assert.throws(() => gatherRows(x, fromArray(g, new Int32Array(3), [3])), /one entry per batch entry/);
    assert.throws(() => gatherRows(table, fromArray(g, new Int32Array(10), [10])), /\[B, T, D\]/);
    return Promise.resolve();
  });
});
