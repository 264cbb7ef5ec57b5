/**
 * Attention forward and backward through the public ops, called as the model's attention calls them: scores =
 * q k^T (transB), softmax with the 1/sqrt(head width) scale folded in, times v, then backward from a fixed upstream
 * gradient into q, k and v.
 */
import type { Gpu } from "../lib/gpu/runtime.ts";
import { backward, requireGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { matmul, softmax } from "../lib/tensor/ops.ts";
import { Scope, withScope } from "../lib/tensor/tensor.ts";
import { type BenchRow, perCpuTimeNote, row, timePerOp, uniformRandom } from "./shared.ts";

/** ViT-B/32 attention for 64 images: 12 heads over 50 tokens of width 64. */
export const ATTENTION = { images: 64, heads: 12, tokens: 50, headWidth: 64 };

/** Multiply-adds of the six products (two forward, four backward) as 2 flops each; softmax is not counted. */
export function attentionFlop(a = ATTENTION): number {
  return 6 * 2 * a.images * a.heads * a.tokens * a.tokens * a.headWidth;
}

export async function benchAttention(gpu: Gpu): Promise<BenchRow> {
  const a = ATTENTION;
  const shape = [a.images * a.heads, a.tokens, a.headWidth];
  const count = shape[0] * shape[1] * shape[2];
  return await withScope(async () => {
    const [q, k, v] = [1, 2, 3].map((seed) => requireGrad(fromArray(gpu, uniformRandom(count, seed), shape)));
    const upstream = fromArray(gpu, uniformRandom(count, 4), shape);
    const scale = 1 / Math.sqrt(a.headWidth);
    try {
      const { ms, cpuMs, n } = await timePerOp(gpu, () => {
        const scope = new Scope();
        const out = matmul(softmax(matmul(q, k, { transB: true }), { scale }), v);
        backward(out, upstream);
        scope.end();
      });
      const flop = attentionFlop();
      return row(
        "attention_fwd_bwd",
        "GFLOP/s",
        flop / (ms * 1e6),
        `[${shape}] q,k,v: softmax(q k^T / 8) v and its backward; flops of the 6 products only; ${
          ms.toFixed(1)
        } ms each, ${n} per submit${perCpuTimeNote(gpu, flop / 1e6, cpuMs)}`,
      );
    } finally {
      // Leaf gradients live outside scopes.
      for (const t of [q, k, v]) t.grad?.dispose();
    }
  });
}
