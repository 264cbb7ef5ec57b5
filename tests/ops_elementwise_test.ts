import { assertClose, f32, gpu, gradOf, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { add, div, exp, gelu, mean, mul, quickGelu, relu, scale, sub, sum } from "../lib/tensor/ops/elementwise.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import type { Tensor } from "../lib/tensor/tensor.ts";

// Loss = sum(out * w) with fixed random w, so each output element gets a distinct upstream gradient.
function weightedSum(out: Tensor, seed: number): { loss: Tensor; w: Float64Array } {
  const w = f32(randomArray(out.size, seed));
  const wt = fromArray(out.gpu, Float32Array.from(w), out.shape);
  return { loss: sum(mul(out, wt)), w };
}

const erf = (x: number) => {
  // float64 erf by its Taylor series / continued fraction is overkill here: use a high-precision series.
  let sumv = 0, term = x, n = 0;
  if (Math.abs(x) > 5) return Math.sign(x);
  while (Math.abs(term) > 1e-17 * Math.abs(sumv) || n < 5) {
    sumv += term / (2 * n + 1);
    n++;
    term *= -x * x / n;
    if (n > 200) break;
  }
  return 2 / Math.sqrt(Math.PI) * sumv;
};

const UNARY: [string, (t: Tensor) => Tensor, (x: number) => number, (x: number) => number][] = [
  ["exp", exp, Math.exp, Math.exp],
  [
    "gelu",
    gelu,
    (x) => 0.5 * x * (1 + erf(x / Math.SQRT2)),
    (x) => 0.5 * (1 + erf(x / Math.SQRT2)) + x * Math.exp(-x * x / 2) / Math.sqrt(2 * Math.PI),
  ],
  ["quick_gelu", quickGelu, (x) => x / (1 + Math.exp(-1.702 * x)), (x) => {
    const s = 1 / (1 + Math.exp(-1.702 * x));
    return s + 1.702 * x * s * (1 - s);
  }],
  ["relu", relu, (x) => Math.max(x, 0), (x) => x > 0 ? 1 : 0],
];

for (const [name, op, f, df] of UNARY) {
  Deno.test(`unary ${name}: forward and gradient match float64`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const x = param(g, [37, 13], 11, -3, 3);
      const out = op(x.t);
      const { loss, w } = weightedSum(out, 12);
      backward(loss);
      assertClose(await out.read(), Array.from(x.v, f), { what: `${name} forward` });
      assertClose(await gradOf(x.t), Array.from(x.v, (v, i) => df(v) * w[i]), { what: `${name} grad` });
    });
  });
}

const BINARY: [
  string,
  (a: Tensor, b: Tensor) => Tensor,
  (x: number, y: number) => number,
  (x: number, y: number) => [number, number],
][] = [
  ["add", add, (x, y) => x + y, () => [1, 1]],
  ["sub", sub, (x, y) => x - y, () => [1, -1]],
  ["mul", mul, (x, y) => x * y, (x, y) => [y, x]],
  ["div", div, (x, y) => x / y, (x, y) => [1 / y, -x / (y * y)]],
];

// Broadcast cases: [aShape, bShape]. Gradients of a broadcast operand are summed over the broadcast axes.
const SHAPES: [number[], number[]][] = [[[5, 7, 3], [5, 7, 3]], [[5, 7, 3], [3]], [[5, 1, 3], [7, 1]], [[1], [4, 9]]];

function broadcastIndex(i: number, outShape: number[], shape: number[]): number {
  let idx = 0, stride = 1, rem = i;
  const off = outShape.length - shape.length;
  for (let d = outShape.length - 1; d >= 0; d--) {
    const c = rem % outShape[d];
    rem = Math.floor(rem / outShape[d]);
    if (d >= off) {
      const s = shape[d - off];
      if (s !== 1) idx += c * stride;
      stride *= s;
    }
  }
  return idx;
}

for (const [name, op, f, df] of BINARY) {
  for (const [sa, sb] of SHAPES) {
    Deno.test(`binary ${name} ${JSON.stringify(sa)} x ${JSON.stringify(sb)}: forward and gradients`, async () => {
      const g = await gpu();
      await withScope(async () => {
        const a = param(g, sa, 21, -2, 2);
        const b = param(g, sb, 22, 0.5, 2);
        const out = op(a.t, b.t);
        const outShape = [...out.shape];
        const { loss, w } = weightedSum(out, 23);
        backward(loss);
        const exp = new Float64Array(out.size);
        const ga = new Float64Array(a.v.length), gb = new Float64Array(b.v.length);
        for (let i = 0; i < out.size; i++) {
          const ia = broadcastIndex(i, outShape, sa), ib = broadcastIndex(i, outShape, sb);
          exp[i] = f(a.v[ia], b.v[ib]);
          const [da, db] = df(a.v[ia], b.v[ib]);
          ga[ia] += da * w[i];
          gb[ib] += db * w[i];
        }
        assertClose(await out.read(), exp, { what: `${name} forward` });
        assertClose(await gradOf(a.t), ga, { what: `${name} grad a`, atol: 1e-5 });
        assertClose(await gradOf(b.t), gb, { what: `${name} grad b`, atol: 1e-5 });
      });
    });
  }
}

Deno.test("sum and mean over an axis, scale: forward and gradients", async () => {
  const g = await gpu();
  await withScope(async () => {
    const x = param(g, [3, 5, 4], 31);
    const s1 = sum(x.t, 1);
    const m2 = mean(x.t, -1);
    const sc = scale(x.t, -2.5);
    const total = add(add(sum(mul(s1, s1)), sum(m2)), sum(sc));
    backward(total);
    const e1 = new Float64Array(12), e2 = new Float64Array(15);
    for (let i = 0; i < 3; i++) {
      for (let j = 0; j < 5; j++) {
        for (let k = 0; k < 4; k++) {
          const v = x.v[(i * 5 + j) * 4 + k];
          e1[i * 4 + k] += v;
          e2[i * 5 + j] += v / 4;
        }
      }
    }
    assertClose(await s1.read(), e1, { what: "sum axis 1" });
    assertClose(await m2.read(), e2, { what: "mean axis -1" });
    const ge = new Float64Array(60);
    for (let i = 0; i < 3; i++) {
      for (let j = 0; j < 5; j++) {
        for (let k = 0; k < 4; k++) {
          ge[(i * 5 + j) * 4 + k] = 2 * e1[i * 4 + k] + 0.25 - 2.5;
        }
      }
    }
    assertClose(await gradOf(x.t), ge, { what: "grad" });
  });
});
