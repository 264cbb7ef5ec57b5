import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray, refMatmul } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { matmul, planMatmul, setMatmulPath } from "../lib/tensor/ops/matmul.ts";
import { cast } from "../lib/tensor/ops/cast.ts";
import { withScope } from "../lib/tensor/tensor.ts";

// Shapes that are multiples of no tile size.
const M = 37, N = 29, K = 43;

/** The storage-buffer kernels: the plain one (small products on CPU back ends) and the workgroup-tiled one (GPUs). */
const STORAGE_PATHS = ["buffer", "tiled"] as const;

async function onPath(path: typeof STORAGE_PATHS[number], fn: () => Promise<void>): Promise<void> {
  const previous = setMatmulPath(path);
  try {
    await withScope(fn);
  } finally {
    setMatmulPath(previous);
  }
}

for (const path of STORAGE_PATHS) {
  for (const transA of [false, true]) {
    for (const transB of [false, true]) {
      Deno.test(`matmul (${path}) ${transA ? "A^T" : "A"} x ${transB ? "B^T" : "B"} with bias and relu: forward and gradients`, async () => {
        const g = await gpu();
        await onPath(path, async () => {
          const a = param(g, transA ? [K, M] : [M, K], 1);
          const b = param(g, transB ? [N, K] : [K, N], 2);
          const bias = param(g, [N], 3);
          const out = matmul(a.t, b.t, { transA, transB, bias: bias.t, activation: "relu" });
          const w = f32(randomArray(M * N, 4));
          backward(sum(mul(out, fromArray(g, Float32Array.from(w), [M, N]))));
          const z = refMatmul(a.v, b.v, M, N, K, transA, transB);
          for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) z[i * N + j] += bias.v[j];
          assertClose(await out.read(), z.map((v) => Math.max(v, 0)), { what: "forward" });
          const dz = z.map((v, i) => v > 0 ? w[i] : 0);
          // dA = dZ op(B)^T; stored transposed when transA.
          const bKN = transB ? transposed(b.v, N, K) : b.v;
          const da = refMatmul(dz, bKN, M, K, N, false, true);
          assertClose(await gradOf(a.t), transA ? transposed(da, M, K) : da, { what: "grad A" });
          const aMK = transA ? transposed(a.v, K, M) : a.v;
          const db = refMatmul(aMK, dz, K, N, M, true, false);
          assertClose(await gradOf(b.t), transB ? transposed(db, K, N) : db, { what: "grad B" });
          const dbias = new Float64Array(N);
          for (let i = 0; i < M; i++) for (let j = 0; j < N; j++) dbias[j] += dz[i * N + j];
          assertClose(await gradOf(bias.t), dbias, { what: "grad bias" });
        });
      });
    }
  }

  Deno.test(`batched matmul (${path}) with a shared weight: gradients summed over the batch`, async () => {
    const g = await gpu();
    await onPath(path, async () => {
      const B = 3;
      const a = param(g, [B, M, K], 5);
      const w = param(g, [N, K], 6);
      const out = matmul(a.t, w.t, { transB: true });
      const up = f32(randomArray(B * M * N, 7));
      backward(sum(mul(out, fromArray(g, Float32Array.from(up), [B, M, N]))));
      const expOut = new Float64Array(B * M * N);
      const gw = new Float64Array(N * K);
      const ga = new Float64Array(B * M * K);
      for (let bi = 0; bi < B; bi++) {
        const ab = a.v.subarray(bi * M * K, (bi + 1) * M * K);
        expOut.set(refMatmul(ab, w.v, M, N, K, false, true), bi * M * N);
        const ub = up.subarray(bi * M * N, (bi + 1) * M * N);
        const gwb = refMatmul(ub, ab, N, K, M, true, false);
        for (let i = 0; i < gw.length; i++) gw[i] += gwb[i];
        ga.set(refMatmul(ub, w.v, M, K, N), bi * M * K);
      }
      assertClose(await out.read(), expOut, { what: "forward" });
      assertClose(await gradOf(w.t), gw, { what: "grad W" });
      assertClose(await gradOf(a.t), ga, { what: "grad A" });
    });
  });
}

Deno.test("tiled matmul: several workgroup tiles and a ragged k slab, residual, f16 operands", async () => {
  const g = await gpu();
  // 64-row and 64-column tiles with 16-deep slabs: 150 x 130 x 70 leaves partial tiles on every side.
  const [m, n, k] = [150, 130, 70];
  await onPath("tiled", async () => {
    const a = param(g, [m, k], 41, -1, 1, false);
    const b = param(g, [n, k], 42, -1, 1, false);
    const residual = param(g, [m, n], 43, -1, 1, false);
    assert.equal(planMatmul(a.t, b.t, { transB: true }).path, "tiled");
    const out = matmul(a.t, b.t, { transB: true, residual: residual.t });
    const want = refMatmul(a.v, b.v, m, n, k, false, true).map((v, i) => v + residual.v[i]);
    assertClose(await out.read(), want, { what: "A B^T + residual" });
    if (g.hasF16) {
      const half = (v: Float64Array) => Float64Array.from(Float16Array.from(v));
      const out16 = matmul(cast(a.t, "f16"), cast(b.t, "f16"), { transB: true });
      assertClose(await out16.read(), refMatmul(half(a.v), half(b.v), m, n, k, false, true), {
        rtol: 1e-5,
        what: "f16 operands",
      });
    }
  });
});

function transposed(x: ArrayLike<number>, rows: number, cols: number): Float64Array {
  const out = new Float64Array(rows * cols);
  for (let i = 0; i < rows; i++) for (let j = 0; j < cols; j++) out[j * rows + i] = x[i * cols + j];
  return out;
}
