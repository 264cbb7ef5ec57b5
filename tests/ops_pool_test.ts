import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { avgPool2d, globalAvgPool } from "../lib/tensor/ops/pool.ts";
import { tidy, withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";
import { deepEqual, throws } from "node:assert/strict";

interface PoolCase {
  name: string;
  shape: [number, number, number, number];
  kernel: [number, number];
  stride?: [number, number];
  pad: [number, number];
}

/** The output shape of a pooling case. */
function pooledShape(c: PoolCase): [number, number, number, number] {
  const [n, ch, h, w] = c.shape;
  const [sh, sw] = c.stride ?? c.kernel;
  return [
    n,
    ch,
    Math.floor((h + 2 * c.pad[0] - c.kernel[0]) / sh) + 1,
    Math.floor((w + 2 * c.pad[1] - c.kernel[1]) / sw) + 1,
  ];
}

/** Direct float64 average pooling (padded taps count in the divisor) and dx for the upstream gradient dy. */
function reference(c: PoolCase, x: Float64Array, dy: Float64Array) {
  const [, , h, w] = c.shape;
  const [kh, kw] = c.kernel;
  const [sh, sw] = c.stride ?? c.kernel;
  const [ph, pw] = c.pad;
  const [n, ch, oh, ow] = pooledShape(c);
  const out = new Float64Array(n * ch * oh * ow);
  const dx = new Float64Array(x.length);
  for (let plane = 0; plane < n * ch; plane++) {
    for (let oy = 0; oy < oh; oy++) {
      for (let ox = 0; ox < ow; ox++) {
        const o = (plane * oh + oy) * ow + ox;
        for (let ky = 0; ky < kh; ky++) {
          for (let kx = 0; kx < kw; kx++) {
            const iy = oy * sh - ph + ky, ix = ox * sw - pw + kx;
            if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
            const idx = (plane * h + iy) * w + ix;
            out[o] += x[idx] / (kh * kw);
            dx[idx] += dy[o] / (kh * kw);
          }
        }
      }
    }
  }
  return { out, dx };
}

function weightedSum(out: Tensor, w: Float64Array): Tensor {
  return sum(mul(out, fromArray(out.gpu, Float32Array.from(w), out.shape)));
}

const CASES: PoolCase[] = [
  { name: "kernel 2 on odd sizes", shape: [2, 3, 7, 9], kernel: [2, 2], pad: [0, 0] },
  { name: "kernel 3 stride 2 padding 1", shape: [2, 3, 11, 8], kernel: [3, 3], stride: [2, 2], pad: [1, 1] },
  {
    name: "overlapping 3x2 windows, stride 1x2, padding 1x0",
    shape: [1, 4, 6, 7],
    kernel: [3, 2],
    stride: [1, 2],
    pad: [1, 0],
  },
];

for (const c of CASES) {
  Deno.test(`avgPool2d ${c.name}: forward and gradient match float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, c.shape, 201);
      const shape = pooledShape(c);
      const w = f32(randomArray(shape.reduce((p, d) => p * d, 1), 202));
      const ref = reference(c, x.v, w);
      const out = c.stride ? avgPool2d(x.t, c.kernel, c.stride, c.pad) : avgPool2d(x.t, c.kernel[0]);
      deepEqual(out.shape, shape);
      backward(weightedSum(out, w));
      assertClose(await out.read(), ref.out, { what: "forward" });
      assertClose(await gradOf(x.t), ref.dx, { what: "grad x" });
    });
  });
}

Deno.test("globalAvgPool: per-channel means and their gradient match float64", async () => {
  const g = await gpu();
  await withScope(async () => {
    const [n, c, h, wd] = [2, 5, 7, 3];
    const x = param(g, [n, c, h, wd], 211);
    const out = globalAvgPool(x.t);
    deepEqual(out.shape, [n, c]);
    const w = f32(randomArray(n * c, 212));
    backward(weightedSum(out, w));
    const mean = new Float64Array(n * c);
    for (let i = 0; i < x.v.length; i++) mean[Math.floor(i / (h * wd))] += x.v[i] / (h * wd);
    assertClose(await out.read(), mean, { what: "forward" });
    assertClose(await gradOf(x.t), Array.from(x.v, (_, i) => w[Math.floor(i / (h * wd))] / (h * wd)), {
      what: "grad x",
    });
  });
});

Deno.test("avgPool2d rejects padding over half the kernel and kernels larger than the input", async () => {
  const g = await gpu();
  tidy(() => {
    const x = param(g, [1, 2, 4, 4], 221, -1, 1, false).t;
    throws(() => avgPool2d(x, 2, 2, 2), /at most half the kernel/);
    throws(() => avgPool2d(x, 5), /does not fit/);
    throws(() => globalAvgPool(x.view([2, 4, 4])), /\[N, C, H, W\]/);
  });
});
