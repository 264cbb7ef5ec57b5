// The fused attention kernels against a float64 reference: outputs and the gradient of the packed q/k/v tensor,
// causal and not, with token counts that fill no whole workgroup.
import assert from "node:assert/strict";
import { assertClose, gpu, param, randomArray } from "./helpers.ts";
import { backward } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { attention, canShareRows, setAttentionReads } from "../lib/tensor/ops/attention.ts";
import { mul, sum } from "../lib/tensor/ops/elementwise.ts";
import { withScope } from "../lib/tensor/tensor.ts";

interface Case {
  batch: number;
  tokens: number;
  heads: number;
  headDim: number;
  causal: boolean;
}

/** out and d(sum(out * up))/dqkv in float64, straight from the definitions (P kept explicitly). */
function reference(qkv: Float64Array, up: Float64Array, c: Case): { out: Float64Array; dqkv: Float64Array } {
  const { batch, tokens: t, heads, headDim: dh } = c;
  const w = heads * dh;
  const at = (b: number, i: number, part: number, h: number, e: number) => ((b * t + i) * 3 + part) * w + h * dh + e;
  const outAt = (b: number, i: number, h: number, e: number) => (b * t + i) * w + h * dh + e;
  const out = new Float64Array(batch * t * w);
  const dqkv = new Float64Array(qkv.length);
  const scale = 1 / Math.sqrt(dh);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      const p = Array.from({ length: t }, () => new Float64Array(t));
      for (let i = 0; i < t; i++) {
        let max = -Infinity;
        for (let j = 0; j < t; j++) {
          if (c.causal && j > i) {
            p[i][j] = -Infinity;
            continue;
          }
          let s = 0;
          for (let e = 0; e < dh; e++) s += qkv[at(b, i, 0, h, e)] * qkv[at(b, j, 1, h, e)];
          p[i][j] = s * scale;
          max = Math.max(max, p[i][j]);
        }
        let total = 0;
        for (let j = 0; j < t; j++) total += p[i][j] = Math.exp(p[i][j] - max);
        for (let j = 0; j < t; j++) p[i][j] /= total;
        for (let e = 0; e < dh; e++) {
          let s = 0;
          for (let j = 0; j < t; j++) s += p[i][j] * qkv[at(b, j, 2, h, e)];
          out[outAt(b, i, h, e)] = s;
        }
      }
      for (let i = 0; i < t; i++) {
        // dP_ij = up_i . v_j; dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)
        const dp = new Float64Array(t);
        let rowDot = 0;
        for (let j = 0; j < t; j++) {
          for (let e = 0; e < dh; e++) dp[j] += up[outAt(b, i, h, e)] * qkv[at(b, j, 2, h, e)];
          rowDot += p[i][j] * dp[j];
        }
        for (let j = 0; j < t; j++) {
          const ds = p[i][j] * (dp[j] - rowDot) * scale;
          for (let e = 0; e < dh; e++) {
            dqkv[at(b, i, 0, h, e)] += ds * qkv[at(b, j, 1, h, e)];
            dqkv[at(b, j, 1, h, e)] += ds * qkv[at(b, i, 0, h, e)];
            dqkv[at(b, j, 2, h, e)] += p[i][j] * up[outAt(b, i, h, e)];
          }
        }
      }
    }
  }
  return { out, dqkv };
}

const CASES: Case[] = [
  { batch: 3, tokens: 19, heads: 2, headDim: 8, causal: false },
  { batch: 2, tokens: 37, heads: 3, headDim: 32, causal: true },
  { batch: 2, tokens: 50, heads: 2, headDim: 64, causal: false },
  { batch: 1, tokens: 1, heads: 1, headDim: 4, causal: true },
];

// "shared" runs where the device has subgroups as wide as a workgroup (lavapipe on Vulkan); elsewhere the case
// checks that forcing it is refused by name.
for (
  const [c, reads] of CASES.flatMap((c) => (["buffer", "texture", "shared"] as const).map((r) => [c, r] as const))
) {
  Deno.test(
    `attention (${reads} reads): B=${c.batch} T=${c.tokens} H=${c.heads} Dh=${c.headDim} ${
      c.causal ? "causal" : "full"
    } vs float64${reads === "shared" ? " (refused by name without subgroups)" : ""}`,
    async () => {
      const g = await gpu();
      const previous = setAttentionReads(reads);
      await withScope(async () => {
        const width = c.heads * c.headDim;
        // Scores of a few units, so the softmax is neither flat nor one-hot.
        const qkv = param(g, [c.batch, c.tokens, 3 * width], 71, -1.5, 1.5);
        const upValues = Float64Array.from(Float32Array.from(randomArray(c.batch * c.tokens * width, 72)));
        const up = fromArray(g, Float32Array.from(upValues), [c.batch, c.tokens, width]);
        if (reads === "shared" && !canShareRows(g)) {
          assert.throws(() => attention(qkv.t, { heads: c.heads, causal: c.causal }), /shared reads need subgroups/);
          return;
        }
        const out = attention(qkv.t, { heads: c.heads, causal: c.causal });
        backward(sum(mul(out, up)));
        const want = reference(qkv.v, upValues, c);
        assertClose(await out.read(), want.out, { rtol: 1e-5, atol: 1e-6, what: "output" });
        assertClose(await qkv.t.grad!.read(), want.dqkv, { rtol: 1e-4, atol: 1e-5, what: "gradient of qkv" });
      }).finally(() => setAttentionReads(previous));
    },
  );
}
