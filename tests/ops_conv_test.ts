import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { conv2d } from "../lib/tensor/ops/conv.ts";
import { batchNorm2d } from "../lib/tensor/ops/batchnorm.ts";
import { avgPool2d, globalAvgPool } from "../lib/tensor/ops/pool.ts";
import { Scope, tidy, withScope } from "../lib/tensor/tensor.ts";
import { deepEqual, equal, throws } from "node:assert/strict";

interface Case {
  name: string;
  n: number;
  cin: number;
  h: number;
  w: number;
  cout: number;
  kh: number;
  kw: number;
  stride: [number, number];
  pad: [number, number];
  bias: boolean;
  /** Forces the batch to be processed in several chunks. */
  maxChunkElements?: number;
}

interface Reference {
  out: Float64Array;
  dx: Float64Array;
  dw: Float64Array;
  dbias: Float64Array;
  oh: number;
  ow: number;
}

/** Direct float64 convolution and its gradients for the upstream gradient `up` (same shape as the output). */
function reference(c: Case, x: Float64Array, wt: Float64Array, b: Float64Array | null, upSeed: number): Reference {
  const oh = Math.floor((c.h + 2 * c.pad[0] - c.kh) / c.stride[0]) + 1;
  const ow = Math.floor((c.w + 2 * c.pad[1] - c.kw) / c.stride[1]) + 1;
  const up = f32(randomArray(c.n * c.cout * oh * ow, upSeed));
  const out = new Float64Array(c.n * c.cout * oh * ow);
  const dx = new Float64Array(x.length);
  const dw = new Float64Array(wt.length);
  const dbias = new Float64Array(c.cout);
  const xAt = (n: number, ci: number, y: number, xx: number) => ((n * c.cin + ci) * c.h + y) * c.w + xx;
  const wAt = (co: number, ci: number, ky: number, kx: number) => ((co * c.cin + ci) * c.kh + ky) * c.kw + kx;
  for (let n = 0; n < c.n; n++) {
    for (let co = 0; co < c.cout; co++) {
      for (let oy = 0; oy < oh; oy++) {
        for (let ox = 0; ox < ow; ox++) {
          const o = ((n * c.cout + co) * oh + oy) * ow + ox;
          let s = b ? b[co] : 0;
          for (let ci = 0; ci < c.cin; ci++) {
            for (let ky = 0; ky < c.kh; ky++) {
              const iy = oy * c.stride[0] - c.pad[0] + ky;
              if (iy < 0 || iy >= c.h) continue;
              for (let kx = 0; kx < c.kw; kx++) {
                const ix = ox * c.stride[1] - c.pad[1] + kx;
                if (ix < 0 || ix >= c.w) continue;
                s += x[xAt(n, ci, iy, ix)] * wt[wAt(co, ci, ky, kx)];
                dx[xAt(n, ci, iy, ix)] += up[o] * wt[wAt(co, ci, ky, kx)];
                dw[wAt(co, ci, ky, kx)] += up[o] * x[xAt(n, ci, iy, ix)];
              }
            }
          }
          out[o] = s;
          dbias[co] += up[o];
        }
      }
    }
  }
  return { out, dx, dw, dbias, oh, ow };
}

const CASES: Case[] = [
  {
    name: "3x3 stride 2 pad 1 with bias",
    n: 2,
    cin: 3,
    h: 11,
    w: 9,
    cout: 5,
    kh: 3,
    kw: 3,
    stride: [2, 2],
    pad: [1, 1],
    bias: true,
  },
  {
    name: "patch embedding 8x8 stride 8",
    n: 2,
    cin: 3,
    h: 16,
    w: 16,
    cout: 7,
    kh: 8,
    kw: 8,
    stride: [8, 8],
    pad: [0, 0],
    bias: false,
  },
  {
    name: "patch embedding with a ragged edge",
    n: 1,
    cin: 3,
    h: 21,
    w: 19,
    cout: 4,
    kh: 6,
    kw: 6,
    stride: [6, 6],
    pad: [0, 0],
    bias: false,
  },
  {
    name: "3x3 stride 1 pad 1",
    n: 3,
    cin: 4,
    h: 7,
    w: 10,
    cout: 6,
    kh: 3,
    kw: 3,
    stride: [1, 1],
    pad: [1, 1],
    bias: false,
  },
  {
    name: "1x1 pointwise with bias",
    n: 3,
    cin: 6,
    h: 5,
    w: 7,
    cout: 9,
    kh: 1,
    kw: 1,
    stride: [1, 1],
    pad: [0, 0],
    bias: true,
  },
  { name: "1x1 stride 2", n: 2, cin: 5, h: 9, w: 8, cout: 3, kh: 1, kw: 1, stride: [2, 2], pad: [0, 0], bias: false },
  {
    name: "rectangular kernel, mixed stride and padding",
    n: 2,
    cin: 3,
    h: 10,
    w: 11,
    cout: 4,
    kh: 3,
    kw: 2,
    stride: [2, 1],
    pad: [1, 0],
    bias: true,
  },
  // 5 images in chunks of 2, 2, 1: chunk offsets, the ragged last chunk and summed weight gradients.
  {
    name: "3x3 stride 2 pad 1 in batch chunks",
    n: 5,
    cin: 3,
    h: 11,
    w: 9,
    cout: 5,
    kh: 3,
    kw: 3,
    stride: [2, 2],
    pad: [1, 1],
    bias: true,
    maxChunkElements: 2 * 27 * 30,
  },
  {
    name: "1x1 pointwise in batch chunks",
    n: 3,
    cin: 6,
    h: 5,
    w: 7,
    cout: 4,
    kh: 1,
    kw: 1,
    stride: [1, 1],
    pad: [0, 0],
    bias: false,
    maxChunkElements: 6 * 35,
  },
];

for (const c of CASES) {
  Deno.test(`conv2d ${c.name}: forward and gradients match float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, [c.n, c.cin, c.h, c.w], 101);
      const wt = param(g, [c.cout, c.cin, c.kh, c.kw], 102);
      const b = c.bias ? param(g, [c.cout], 103) : null;
      const ref = reference(c, x.v, wt.v, b?.v ?? null, 104);
      const out = conv2d(x.t, wt.t, {
        bias: b?.t,
        stride: c.stride,
        padding: c.pad,
        maxChunkElements: c.maxChunkElements,
      });
      deepEqual(out.shape, [c.n, c.cout, ref.oh, ref.ow]);
      const up = f32(randomArray(out.size, 104));
      backward(sum(mul(out, fromArray(g, Float32Array.from(up), out.shape))));
      assertClose(await out.read(), ref.out, { what: "forward" });
      assertClose(await gradOf(x.t), ref.dx, { what: "grad x" });
      assertClose(await gradOf(wt.t), ref.dw, { what: "grad weight" });
      if (b) assertClose(await gradOf(b.t), ref.dbias, { what: "grad bias" });
    });
  });
}

Deno.test("conv2d with a frozen weight still gives the input gradient", async () => {
  const g = await gpu();
  await withScope(async () => {
    const c = CASES[0];
    const x = param(g, [c.n, c.cin, c.h, c.w], 111);
    const wt = param(g, [c.cout, c.cin, c.kh, c.kw], 112, -1, 1, false);
    const ref = reference({ ...c, bias: false }, x.v, wt.v, null, 113);
    const out = conv2d(x.t, wt.t, { stride: 2, padding: 1 });
    const up = f32(randomArray(out.size, 113));
    backward(sum(mul(out, fromArray(g, Float32Array.from(up), out.shape))));
    assertClose(await gradOf(x.t), ref.dx, { what: "grad x" });
    equal(wt.t.grad, null, "a frozen weight gets no gradient");
  });
});

Deno.test("conv2d rejects mismatched channels and kernels larger than the padded input", async () => {
  const g = await gpu();
  tidy(() => {
    const x = param(g, [1, 3, 4, 4], 121, -1, 1, false);
    throws(() => conv2d(x.t, param(g, [2, 4, 3, 3], 122, -1, 1, false).t), /expects 4 input channels/);
    throws(() => conv2d(x.t, param(g, [2, 3, 7, 7], 123, -1, 1, false).t), /does not fit/);
    throws(() => conv2d(x.t, param(g, [2, 3, 3, 3], 124, -1, 1, false).t, { stride: 0 }), /stride/);
  });
});

Deno.test("a conv, batch-norm and pooling step releases every temporary it makes", async () => {
  const g = await gpu();
  // No scope here: a temporary that a backward rule forgets to release stays in use instead of being swept up.
  equal(Scope.current, null);
  const running = [param(g, [4], 141, -1, 1, false).t, param(g, [4], 142, 0.5, 1, false).t];
  const leaked: number[] = [];
  // The first round may create runtime-lifetime constants; later rounds must return the pool to where they began.
  for (let round = 0; round < 3; round++) {
    const before = g.pool.inUseBytes;
    const x = param(g, [3, 2, 9, 9], 143), w = param(g, [4, 2, 3, 3], 144), b = param(g, [4], 145);
    const gamma = param(g, [4], 146), beta = param(g, [4], 147);
    const y = conv2d(x.t, w.t, { bias: b.t, stride: 2, padding: 1, maxChunkElements: 2 * 18 * 25 });
    const z = batchNorm2d(y, gamma.t, beta.t, running[0], running[1], { training: true });
    const pooled = avgPool2d(z, 2, 1, 1);
    const means = globalAvgPool(pooled);
    const loss = sum(means);
    backward(loss);
    await loss.read();
    for (const p of [x, w, b, gamma, beta]) p.t.grad?.dispose();
    for (const t of [x.t, w.t, b.t, gamma.t, beta.t, y, z, pooled, means, loss]) t.dispose();
    leaked.push(g.pool.inUseBytes - before);
  }
  for (const t of running) t.dispose();
  deepEqual(leaked.slice(1), [0, 0]);
});
