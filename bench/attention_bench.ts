/**
 * Attention forward and backward through the public op the model calls: the fused `attention` over a packed q/k/v
 * projection [B, T, 3W] (heads split and merged inside the kernels), then backward from a fixed upstream gradient
 * into qkv.
 */
import type { Gpu } from "../lib/gpu/runtime.ts";
import { backward, requireGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { attention } from "../lib/tensor/ops.ts";
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
  const width = a.heads * a.headWidth;
  const count = a.images * a.tokens * width;
  return await withScope(async () => {
    const qkv = requireGrad(fromArray(gpu, uniformRandom(3 * count, 1), [a.images, a.tokens, 3 * width]));
    const upstream = fromArray(gpu, uniformRandom(count, 4), [a.images, a.tokens, width]);
    try {
      const { ms, cpuMs, n } = await timePerOp(gpu, () => {
        const scope = new Scope();
        backward(attention(qkv, { heads: a.heads }), upstream);
        scope.end();
      });
      const flop = attentionFlop();
      return row(
        "attention_fwd_bwd",
        "GFLOP/s",
        flop / (ms * 1e6),
        `qkv [${a.images},${a.tokens},${3 * width}], ${a.heads} heads: softmax(q k^T / 8) v and its backward, fused; ` +
          `flops of the 6 products only; ${ms.toFixed(1)} ms each, ${n} per submit${
            perCpuTimeNote(gpu, flop / 1e6, cpuMs)
          }`,
      );
    } finally {
      // Leaf gradients live outside scopes.
      qkv.grad?.dispose();
    }
  });
}
