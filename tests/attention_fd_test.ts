// Finite-difference checks of composite functions built from the ops. The GPU computes the loss and its gradients by
// autograd in f32; a float64 forward pass written here computes the same loss, and central differences of it (in
// float64 on the CPU: f32 differences would drown in rounding) give the reference gradient of every parameter.
//
// Tolerance, per element: |autograd - finite difference| <= 2e-5 * (largest |finite difference| of that tensor)
// + 1e-4 * |finite difference|. The float64 differences (step 1e-5) are accurate to about 1e-10 here, so the bound
// measures the f32 autograd error: at most 1.1e-6 of each tensor's largest gradient when written (Vulkan and GL).
import { assertClose, gpu, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import {
  add,
  crossEntropy,
  embedding,
  gatherRows,
  l2Normalize,
  layerNorm,
  matmul,
  mul,
  permute,
  reshape,
  scale,
  softmax,
  sum,
} from "../lib/tensor/ops.ts";
import { type Tensor, withScope } from "../lib/tensor/tensor.ts";

const EPS_LN = 1e-5;
const EPS_L2 = 1e-12;
const FD_STEP = 1e-5;
const REL_TO_MAX = 2e-5;
const REL_TO_SELF = 1e-4;

// ---- float64 reference building blocks (row-major arrays) ----

function refLayerNorm(x: Float64Array, w: Float64Array, b: Float64Array, cols: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let o = 0; o < x.length; o += cols) {
    let mean = 0;
    for (let c = 0; c < cols; c++) mean += x[o + c] / cols;
    let variance = 0;
    for (let c = 0; c < cols; c++) variance += (x[o + c] - mean) ** 2 / cols;
    const rstd = 1 / Math.sqrt(variance + EPS_LN);
    for (let c = 0; c < cols; c++) y[o + c] = (x[o + c] - mean) * rstd * w[c] + b[c];
  }
  return y;
}

/** x [rows, in] times weight [out, in] transposed, plus bias [out] (a torch Linear). */
function refLinear(x: Float64Array, weight: Float64Array, bias: Float64Array | null, cin: number, cout: number) {
  const rows = x.length / cin;
  const y = new Float64Array(rows * cout);
  for (let r = 0; r < rows; r++) {
    for (let o = 0; o < cout; o++) {
      let s = bias ? bias[o] : 0;
      for (let i = 0; i < cin; i++) s += x[r * cin + i] * weight[o * cin + i];
      y[r * cout + o] = s;
    }
  }
  return y;
}

/** Causal multi-head attention on [B, T, C] q, k, v; head h owns columns h*Dh..(h+1)*Dh-1. */
function refCausalAttention(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  b: number,
  t: number,
  c: number,
  heads: number,
) {
  const dh = c / heads;
  const out = new Float64Array(b * t * c);
  for (let bi = 0; bi < b; bi++) {
    for (let h = 0; h < heads; h++) {
      const at = (ti: number, d: number) => (bi * t + ti) * c + h * dh + d;
      for (let i = 0; i < t; i++) {
        const scores: number[] = [];
        for (let j = 0; j <= i; j++) {
          let s = 0;
          for (let d = 0; d < dh; d++) s += q[at(i, d)] * k[at(j, d)];
          scores.push(s / Math.sqrt(dh));
        }
        const m = Math.max(...scores);
        const e = scores.map((s) => Math.exp(s - m));
        const total = e.reduce((p, x) => p + x, 0);
        for (let d = 0; d < dh; d++) {
          let s = 0;
          for (let j = 0; j <= i; j++) s += e[j] / total * v[at(j, d)];
          out[at(i, d)] = s;
        }
      }
    }
  }
  return out;
}

function refL2Normalize(x: Float64Array, cols: number): Float64Array {
  const y = new Float64Array(x.length);
  for (let o = 0; o < x.length; o += cols) {
    let sq = 0;
    for (let c = 0; c < cols; c++) sq += x[o + c] ** 2;
    const d = Math.max(Math.sqrt(sq), EPS_L2);
    for (let c = 0; c < cols; c++) y[o + c] = x[o + c] / d;
  }
  return y;
}

const dot = (a: ArrayLike<number>, b: ArrayLike<number>) => {
  let s = 0;
  for (let i = 0; i < a.length; i++) s += a[i] * b[i];
  return s;
};

// ---- the check ----

interface Leaf {
  name: string;
  t: Tensor;
  v: Float64Array;
}

/**
 * Compares each leaf's autograd gradient with central differences of `refLoss` (which reads the leaves' float64
 * values, perturbed in place one entry at a time). Returns the largest gradient of all (a scale for other checks).
 */
async function checkAgainstFiniteDifferences(
  leaves: Leaf[],
  refLoss: () => number,
): Promise<number> {
  let largest = 0;
  for (const leaf of leaves) {
    const fd = new Float64Array(leaf.v.length);
    for (let i = 0; i < leaf.v.length; i++) {
      const keep = leaf.v[i];
      leaf.v[i] = keep + FD_STEP;
      const up = refLoss();
      leaf.v[i] = keep - FD_STEP;
      const down = refLoss();
      leaf.v[i] = keep;
      fd[i] = (up - down) / (2 * FD_STEP);
    }
    if (!leaf.t.grad) throw new Error(`${leaf.name} got no gradient`);
    const got = await leaf.t.grad.read();
    const scaleOf = Math.max(...Array.from(fd, Math.abs));
    if (!(scaleOf > 0)) throw new Error(`${leaf.name}: the loss does not depend on it; the check would be empty`);
    assertClose(got, fd, {
      rtol: REL_TO_SELF,
      atol: REL_TO_MAX * scaleOf,
      what: `d loss / d ${leaf.name}`,
    });
    largest = Math.max(largest, scaleOf);
  }
  return largest;
}

for (const heads of [1, 3]) {
  Deno.test(`attention block with ${heads} head(s): autograd matches float64 finite differences`, async () => {
    const g = await gpu();
    await withScope(async () => {
      const [b, t, c] = [2, 7, 12];
      const dh = c / heads;
      let seed = 200;
      const leaf = (name: string, shape: number[], lo = -1, hi = 1): Leaf => ({
        name,
        ...param(g, shape, seed++, lo, hi),
      });
      const x = leaf("x", [b, t, c]);
      const lnW = leaf("ln.weight", [c], 0.5, 1.5);
      const lnB = leaf("ln.bias", [c], -0.2, 0.2);
      const [wq, wk, wv, wo] = ["q", "k", "v", "out"].map((n) => leaf(`${n}.weight`, [c, c], -0.5, 0.5));
      const [bq, bk, bv, bo] = ["q", "k", "v", "out"].map((n) => leaf(`${n}.bias`, [c], -0.2, 0.2));
      const w = Float64Array.from(Float32Array.from(randomArray(b * t * c, seed++)));

      // GPU: x -> layerNorm -> q,k,v -> heads -> causal softmax(q k^T / sqrt(dh)) v -> merge -> out proj -> + x
      // -> l2Normalize -> sum(* w)
      const h = layerNorm(x.t, lnW.t, lnB.t, EPS_LN);
      const split = (p: Tensor) => permute(reshape(p, [b, t, heads, dh]), [0, 2, 1, 3]);
      const q = split(matmul(h, wq.t, { transB: true, bias: bq.t }));
      const k = split(matmul(h, wk.t, { transB: true, bias: bk.t }));
      const v = split(matmul(h, wv.t, { transB: true, bias: bv.t }));
      const probs = softmax(scale(matmul(q, k, { transB: true }), 1 / Math.sqrt(dh)), { causal: true });
      const merged = reshape(permute(matmul(probs, v), [0, 2, 1, 3]), [b, t, c]);
      const y = l2Normalize(add(matmul(merged, wo.t, { transB: true, bias: bo.t }), x.t));
      const loss = sum(mul(y, fromArray(g, Float32Array.from(w), [b, t, c])));
      backward(loss);

      const refLoss = () => {
        const hr = refLayerNorm(x.v, lnW.v, lnB.v, c);
        const att = refCausalAttention(
          refLinear(hr, wq.v, bq.v, c, c),
          refLinear(hr, wk.v, bk.v, c, c),
          refLinear(hr, wv.v, bv.v, c, c),
          b,
          t,
          c,
          heads,
        );
        const proj = refLinear(att, wo.v, bo.v, c, c);
        return dot(refL2Normalize(proj.map((p, i) => p + x.v[i]), c), w);
      };
      assertClose([await loss.item()], [refLoss()], { what: "loss" });
      const largest = await checkAgainstFiniteDifferences([x, lnW, lnB, wq, wk, wv, wo, bq, bv, bo], refLoss);
      // The key bias adds q.b_k to every score of a softmax row, which the softmax ignores: its exact gradient is 0,
      // and autograd's may differ from 0 only by f32 rounding, small against the other gradients.
      const dbk = await bk.t.grad!.read();
      assertClose(dbk, new Float64Array(c), { rtol: 0, atol: 1e-5 * largest, what: "d loss / d k.bias" });
    });
  });
}

Deno.test("text-tower path: embedding -> layerNorm -> gatherRows -> l2Normalize -> logits -> crossEntropy", async () => {
  const g = await gpu();
  await withScope(async () => {
    const [b, t, c, vocab, classes] = [3, 6, 10, 9, 5];
    let seed = 300;
    const leaf = (name: string, shape: number[], lo = -1, hi = 1): Leaf => ({
      name,
      ...param(g, shape, seed++, lo, hi),
    });
    const table = leaf("token_embedding", [vocab, c]);
    const pos = leaf("positional_embedding", [t, c], -0.3, 0.3);
    const lnW = leaf("ln.weight", [c], 0.5, 1.5);
    const lnB = leaf("ln.bias", [c], -0.2, 0.2);
    const head = leaf("head.weight", [classes, c], -2, 2);
    // Ids repeat within and across sequences; each sequence is read at its own end position.
    const ids = Int32Array.from([1, 4, 4, 8, 0, 0, 2, 4, 1, 1, 8, 0, 3, 3, 3, 7, 5, 6]);
    const ends = Int32Array.from([3, 5, 2]);
    const targets = Int32Array.from([2, 0, 4]);

    const x = add(embedding(table.t, fromArray(g, ids, [b, t])), pos.t);
    const feats = l2Normalize(gatherRows(layerNorm(x, lnW.t, lnB.t, EPS_LN), fromArray(g, ends, [b])));
    const logits = scale(matmul(feats, head.t, { transB: true }), 4);
    const loss = crossEntropy(logits, fromArray(g, targets, [b]));
    backward(loss);

    const refLoss = () => {
      const xr = new Float64Array(b * t * c);
      for (let p = 0; p < b * t; p++) {
        for (let d = 0; d < c; d++) xr[p * c + d] = table.v[ids[p] * c + d] + pos.v[(p % t) * c + d];
      }
      const normed = refLayerNorm(xr, lnW.v, lnB.v, c);
      const picked = new Float64Array(b * c);
      for (let s = 0; s < b; s++) picked.set(normed.subarray((s * t + ends[s]) * c, (s * t + ends[s] + 1) * c), s * c);
      const lg = refLinear(refL2Normalize(picked, c), head.v, null, c, classes).map((z) => 4 * z);
      let total = 0;
      for (let s = 0; s < b; s++) {
        const row = lg.subarray(s * classes, (s + 1) * classes);
        const m = Math.max(...row);
        total += (m + Math.log(row.reduce((p, z) => p + Math.exp(z - m), 0)) - row[targets[s]]) / b;
      }
      return total;
    };
    assertClose([await loss.item()], [refLoss()], { what: "loss" });
    // Only the positions picked at each sequence's end reach the loss: table rows read nowhere else get a zero
    // gradient, which the differences confirm as well.
    await checkAgainstFiniteDifferences([table, pos, lnW, lnB, head], refLoss);
  });
});
