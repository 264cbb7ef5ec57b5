// The texture-operand matmul path (the fast path on CPU back ends), forced on, against float64 references. Every
// case runs each texture kernel the device has, so the suite pays each kernel's compile once per orientation
// (seconds, then Mesa's disk cache).
import assert from "node:assert/strict";
import { assertClose, f32, gpu, gradOf, param, randomArray, refMatmul } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import {
  canShareA,
  FLAT_KERNEL,
  matmul,
  matmulForward,
  planMatmul,
  setMatmulPath,
  setTextureKernel,
  SHARED_KERNEL,
} from "../lib/tensor/ops/matmul.ts";
import { operandCopies, operandLayout, TEXTURE_SEGMENT_ROWS } from "../kernels/matmul_texture.ts";
import { withScope } from "../lib/tensor/tensor.ts";

/**
 * Runs `fn` with the texture path forced, once per texture kernel this device can run: the flat 32x32 kernel, and
 * the kernel whose lanes share A's rows where the device has subgroups as wide as its workgroups (lavapipe on
 * Vulkan; not Mesa's GL driver).
 */
async function withEachTextureKernel(fn: (kernel: string) => Promise<void>): Promise<void> {
  const g = await gpu();
  const kernels = [FLAT_KERNEL, ...(canShareA(g.adapter) ? [SHARED_KERNEL] : [])];
  const previousPath = setMatmulPath("texture");
  try {
    for (const kernel of kernels) {
      const previous = setTextureKernel(kernel);
      try {
        await withScope(() => fn(`${kernel.tile.tm}x${kernel.tile.tn}${kernel.shareA ? " sharing A" : ""}`));
      } finally {
        setTextureKernel(previous);
      }
    }
  } finally {
    setMatmulPath(previousPath);
  }
}

/** erf in float64: its Maclaurin series up to |x| = 4 (100 terms), and +-1 beyond (erfc(4) < 2e-8). */
function erf(x: number): number {
  if (Math.abs(x) > 4) return Math.sign(x);
  let term = x, total = x;
  for (let n = 1; n < 100; n++) {
    term *= -x * x / n;
    total += term / (2 * n + 1);
  }
  return 2 / Math.sqrt(Math.PI) * total;
}
const gelu = (x: number) => 0.5 * x * (1 + erf(x / Math.SQRT2));

// Shapes that are multiples of no tile size; N=45 takes the scratch-buffer route, K=37 pads the k passes.
const M = 70, N = 45, K = 37;

Deno.test("texture matmul: all transposes on a 70x45x37 product", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    for (const transA of [false, true]) {
      for (const transB of [false, true]) {
        const a = param(g, transA ? [K, M] : [M, K], 11, -1, 1, false);
        const b = param(g, transB ? [N, K] : [K, N], 12, -1, 1, false);
        assert.equal(planMatmul(a.t, b.t, { transA, transB }).path, "texture");
        const { out } = matmulForward(a.t, b.t, { transA, transB });
        assertClose(await out.read(), refMatmul(a.v, b.v, M, N, K, transA, transB), {
          what: `${transA ? "A^T" : "A"} x ${transB ? "B^T" : "B"} (${kernel})`,
        });
      }
    }
  });
});

Deno.test("texture matmul: batch 3 with a shared transposed weight, bias + gelu + residual, pre-activation", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    const B = 3;
    const a = param(g, [B, M, K], 21, -1, 1, false);
    const w = param(g, [N, K], 22, -1, 1, false);
    const bias = param(g, [N], 23, -1, 1, false);
    const res = param(g, [B, M, N], 24, -1, 1, false);
    const { out, pre } = matmulForward(
      a.t,
      w.t,
      { transB: true, bias: bias.t, activation: "gelu", residual: res.t },
      true,
    );
    assert.ok(pre);
    const z = new Float64Array(B * M * N);
    for (let bi = 0; bi < B; bi++) {
      z.set(refMatmul(a.v.subarray(bi * M * K, (bi + 1) * M * K), w.v, M, N, K, false, true), bi * M * N);
    }
    for (let i = 0; i < z.length; i++) z[i] += bias.v[i % N];
    assertClose(await pre.read(), z, { what: `pre-activation (${kernel})` });
    assertClose(await out.read(), z.map((v, i) => gelu(v) + res.v[i]), { what: `output (${kernel})` });
  });
});

Deno.test("texture matmul: batched A and B with a vec4 epilogue, and a shared A (N a multiple of 4)", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    const B = 3, m = 50, n = 52, k = 64;
    const a = param(g, [B, m, k], 31, -1, 1, false);
    const b = param(g, [B, n, k], 32, -1, 1, false);
    const bias = param(g, [n], 34, -1, 1, false);
    const res = param(g, [B, m, n], 35, -1, 1, false);
    const { out, pre } = matmulForward(
      a.t,
      b.t,
      { transB: true, bias: bias.t, activation: "quick_gelu", residual: res.t },
      true,
    );
    assert.ok(pre);
    // Without the pre-activation the activation runs in place over C (the route inference takes).
    const inPlace = matmulForward(a.t, b.t, { transB: true, bias: bias.t, activation: "quick_gelu", residual: res.t });
    assert.equal(inPlace.pre, null);
    const shared = param(g, [k, m], 33, -1, 1, false);
    const out2 = matmulForward(shared.t, b.t, { transA: true, transB: true }).out;
    const z = new Float64Array(B * m * n);
    const expected2 = new Float64Array(B * m * n);
    for (let bi = 0; bi < B; bi++) {
      const bb = b.v.subarray(bi * n * k, (bi + 1) * n * k);
      z.set(refMatmul(a.v.subarray(bi * m * k, (bi + 1) * m * k), bb, m, n, k, false, true), bi * m * n);
      expected2.set(refMatmul(shared.v, bb, m, n, k, true, true), bi * m * n);
    }
    for (let i = 0; i < z.length; i++) z[i] += bias.v[i % n];
    const quickGelu = (x: number) => x / (1 + Math.exp(-1.702 * x));
    assertClose(await pre.read(), z, { what: `pre-activation (${kernel})` });
    assertClose(await out.read(), z.map((v, i) => quickGelu(v) + res.v[i]), { what: `batched, epilogue (${kernel})` });
    assertClose(await inPlace.out.read(), z.map((v, i) => quickGelu(v) + res.v[i]), {
      what: `epilogue in place (${kernel})`,
    });
    assertClose(await out2.read(), expected2, { what: `shared A (${kernel})` });
  });
});

Deno.test("texture matmul: bias and residual added as the blocks are stored (no activation, N a multiple of 4)", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    // 70 rows and 52 columns leave partial 32x32 blocks, so the bias loads past N and the guarded stores both run.
    const B = 2, m = 70, n = 52, k = 40;
    const a = param(g, [B, m, k], 51, -1, 1, false);
    const w = param(g, [n, k], 52, -1, 1, false);
    const bias = param(g, [n], 53, -1, 1, false);
    const res = param(g, [B, m, n], 54, -1, 1, false);
    const plan = planMatmul(a.t, w.t, { transB: true, bias: bias.t, residual: res.t });
    assert.ok(plan.texture?.spec.bias && plan.texture.spec.residual, "bias and residual are fused into the stores");
    assert.equal(plan.texture.spec.shareA, kernel.includes("sharing"));
    const both = matmulForward(a.t, w.t, { transB: true, bias: bias.t, residual: res.t }).out;
    const biasOnly = matmulForward(a.t, w.t, { transB: true, bias: bias.t }).out;
    const product = new Float64Array(B * m * n);
    for (let bi = 0; bi < B; bi++) {
      product.set(refMatmul(a.v.subarray(bi * m * k, (bi + 1) * m * k), w.v, m, n, k, false, true), bi * m * n);
    }
    const withBias = product.map((v, i) => v + bias.v[i % n]);
    assertClose(await biasOnly.read(), withBias, { what: `product + bias (${kernel})` });
    assertClose(await both.read(), withBias.map((v, i) => v + res.v[i]), {
      what: `product + bias + residual (${kernel})`,
    });
  });
});

Deno.test("texture matmul: gradients through the fast path match float64", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    const a = param(g, [M, K], 41);
    const b = param(g, [N, K], 42);
    const bias = param(g, [N], 43);
    const out = matmul(a.t, b.t, { transB: true, bias: bias.t, activation: "gelu" });
    const w = f32(randomArray(M * N, 44));
    backward(sum(mul(out, fromArray(g, Float32Array.from(w), [M, N]))));
    const z = refMatmul(a.v, b.v, M, N, K, false, true);
    for (let i = 0; i < z.length; i++) z[i] += bias.v[i % N];
    assertClose(await out.read(), z.map(gelu), { what: `forward (${kernel})` });
    const h = 1e-4;
    const dz = z.map((v, i) => w[i] * (gelu(v + h) - gelu(v - h)) / (2 * h));
    assertClose(await gradOf(a.t), refMatmul(dz, b.v, M, K, N), { what: `grad A (${kernel})`, rtol: 1e-3, atol: 1e-4 });
    assertClose(await gradOf(b.t), refMatmul(dz, a.v, N, K, M, true), {
      what: `grad B (${kernel})`,
      rtol: 1e-3,
      atol: 1e-4,
    });
    assertClose(await gradOf(bias.t), columnSums(dz, M, N), { what: `grad bias (${kernel})`, rtol: 1e-3, atol: 1e-4 });
  });
});

function columnSums(x: ArrayLike<number>, rows: number, cols: number): Float64Array {
  const out = new Float64Array(cols);
  for (let i = 0; i < rows * cols; i++) out[i % cols] += x[i];
  return out;
}

Deno.test("texture matmul: the bias gradient comes from the weight-gradient product's dZ texture", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    // [K,N] weight: dZ is B of dW = A^T dZ. 20000 rows wrap its texture into two segments; 10 columns pad a texel.
    const rows = 20000, inner = 3, cols = 10;
    const x = param(g, [rows, inner], 61);
    const w = param(g, [inner, cols], 62);
    const bias = param(g, [cols], 63);
    const weights = f32(randomArray(rows * cols, 64));
    backward(sum(mul(matmul(x.t, w.t, { bias: bias.t }), fromArray(g, Float32Array.from(weights), [rows, cols]))));
    assertClose(await gradOf(bias.t), columnSums(weights, rows, cols), { what: `grad bias, [K,N] weight (${kernel})` });
    assertClose(await gradOf(w.t), refMatmul(x.v, weights, inner, cols, rows, true), { what: `grad W (${kernel})` });
  });
});

/** Float64 dot products at `count` random positions of C = A op(B) (A [batch?, m, k]; B [batch, k, n] or [batch, n, k]). */
function sampledCheck(
  actual: Float32Array,
  a: Float64Array,
  b: Float64Array,
  dims: { batch: number; m: number; n: number; k: number; transB?: boolean },
  count: number,
  seed: number,
  kernel: string,
): void {
  const { batch, m, n, k } = dims;
  const picks = randomArray(count, seed, 0, batch * m * n);
  const got: number[] = [];
  const want: number[] = [];
  for (const p of picks) {
    const idx = Math.floor(p);
    const bi = Math.floor(idx / (m * n));
    const i = Math.floor(idx / n) % m;
    const j = idx % n;
    let s = 0;
    for (let q = 0; q < k; q++) {
      s += a[bi * m * k + i * k + q] * b[bi * k * n + (dims.transB ? j * k + q : q * n + j)];
    }
    got.push(actual[idx]);
    want.push(s);
  }
  assertClose(got, want, { what: `sampled ${batch}x${m}x${n}x${k} (${kernel})` });
}

Deno.test("texture matmul: 300x260x129 sampled at 200 positions", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    const m = 300, n = 260, k = 129;
    const a = param(g, [m, k], 51, -1, 1, false);
    const b = param(g, [k, n], 52, -1, 1, false);
    const out = matmulForward(a.t, b.t).out;
    sampledCheck(await out.read(), a.v, b.v, { batch: 1, m, n, k }, 200, 53, kernel);
  });
});

Deno.test("texture matmul: operands taller than one texture wrap into segments (copy and pack routes)", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    // A: 20000 rows of 64 floats go by buffer-to-texture copies into two segments; B (36 columns) by the pack kernel.
    const m = 20000, n = 36, k = 64;
    const a = param(g, [m, k], 61, -1, 1, false);
    const b = param(g, [k, n], 62, -1, 1, false);
    const plan = planMatmul(a.t, b.t);
    assert.ok(plan.texture?.geometry.a.copied && !plan.texture.geometry.b.copied);
    assert.equal(operandCopies(plan.texture.geometry.a).length, 2);
    sampledCheck(await matmulForward(a.t, b.t).out.read(), a.v, b.v, { batch: 1, m, n, k }, 200, 63, kernel);
    // 600 products of 40x16 @ 16x40 pack 600 x 64 padded rows of A and 600 x 16 k rows of B: both wrap.
    const batch = 600, bm = 40, bn = 40, bk = 16;
    const ba = param(g, [batch, bm, bk], 64, -1, 1, false);
    const bb = param(g, [batch, bk, bn], 65, -1, 1, false);
    const bplan = planMatmul(ba.t, bb.t);
    assert.ok(bplan.texture && bplan.texture.geometry.a.width > bplan.texture.geometry.a.texelsPerRow);
    sampledCheck(
      await matmulForward(ba.t, bb.t).out.read(),
      ba.v,
      bb.v,
      { batch, m: bm, n: bn, k: bk },
      200,
      66,
      kernel,
    );
  });
});

Deno.test("texture matmul: batched attention-like product copied unpadded, tiles straddling batch entries", async () => {
  const g = await gpu();
  await withEachTextureKernel(async (kernel) => {
    // 400 x (50x64 @ (40x64)^T): A's 20000 stored rows and B^T's 16000 are copied as they are; A's segments overlap
    // by a tile because its batch entries (50 rows) do not start on tile boundaries.
    const batch = 400, m = 50, n = 40, k = 64;
    const a = param(g, [batch, m, k], 81, -1, 1, false);
    const b = param(g, [batch, n, k], 82, -1, 1, false);
    const plan = planMatmul(a.t, b.t, { transB: true });
    assert.ok(plan.texture?.geometry.a.copied && plan.texture.geometry.b.copied);
    assert.ok(plan.texture.geometry.a.segmentStep < TEXTURE_SEGMENT_ROWS);
    const out = await matmulForward(a.t, b.t, { transB: true }).out.read();
    sampledCheck(out, a.v, b.v, { batch, m, n, k, transB: true }, 300, 83, kernel);
  });
});

Deno.test("operand layouts: padding, segments and when a plain copy fills the texture", () => {
  const packed = operandLayout(70, 37, 3, "tile", 32, 8);
  assert.deepEqual(
    [packed.copied, packed.rowsPerBatch, packed.texelsPerRow, packed.width, packed.height],
    [false, 96, 10, 10, 288],
  );
  const tall = operandLayout(20000, 128, 1, "tile", 32, 8);
  assert.deepEqual([tall.copied, tall.segmentStep, tall.width, tall.height], [true, TEXTURE_SEGMENT_ROWS, 64, 16384]);
  assert.deepEqual(operandCopies(tall).map((c) => [c.bufferOffset, c.x, c.height]), [
    [0, 0, TEXTURE_SEGMENT_ROWS],
    [TEXTURE_SEGMENT_ROWS * 512, 32, 20000 - TEXTURE_SEGMENT_ROWS],
  ]);
  // Unaligned tile rows: segments start a tile apart less than their height, so they overlap by one tile.
  const ragged = operandLayout(16400, 64, 1, "tile", 32, 8);
  assert.equal(ragged.segmentStep, TEXTURE_SEGMENT_ROWS - 32);
  assert.deepEqual(operandCopies(ragged).map((c) => [c.bufferOffset, c.x, c.height]), [
    [0, 0, TEXTURE_SEGMENT_ROWS],
    [(TEXTURE_SEGMENT_ROWS - 32) * 256, 16, 16400 - (TEXTURE_SEGMENT_ROWS - 32)],
  ]);
  // A tile may start on any row, so a last segment can be needed for the final rows even when the previous one
  // reaches the end.
  const edge = operandLayout(2 * (TEXTURE_SEGMENT_ROWS - 32) + 1, 64, 1, "tile", 32, 8);
  assert.deepEqual(operandCopies(edge).map((c) => [c.x, c.height]), [
    [0, TEXTURE_SEGMENT_ROWS],
    [16, TEXTURE_SEGMENT_ROWS - 31],
    [32, 1],
  ]);
  assert.equal(operandLayout(37, 128, 1, "k", 8, 32).copied, false, "k rows need zero padding to 8");
  assert.equal(operandLayout(32, 96, 1, "k", 8, 32).copied, false, "copied rows must be 256-byte aligned");
});

Deno.test("auto path: small products use the buffer kernel, large ones the texture path on CPU back ends", async () => {
  const g = await gpu();
  await withScope(async () => {
    const small = param(g, [8, 8], 71, -1, 1, false).t;
    assert.equal(planMatmul(small, small).path, "buffer");
    const big = fromArray(g, new Float32Array(256 * 256), [256, 256]);
    assert.equal(planMatmul(big, big).path, g.adapter.isSoftware ? "texture" : "buffer");
    await g.sync();
  });
});
