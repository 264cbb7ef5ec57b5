/** Forward layer norm over the rows of ViT-B/32 activations for 64 images, as memory bandwidth. */
import type { Gpu } from "../lib/gpu/runtime.ts";
import { noGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { layerNorm } from "../lib/tensor/ops.ts";
import { Scope, withScope } from "../lib/tensor/tensor.ts";
import { type BenchRow, perCpuTimeNote, row, timePerOp, uniformRandom } from "./shared.ts";

export const LAYER_NORM = { rows: 64 * 50, cols: 768, eps: 1e-5 };

/** The op's own traffic: x read and y written once, gain and bias read once (no statistics or scratch). */
export function layerNormBytes(s = LAYER_NORM): number {
  return (2 * s.rows * s.cols + 2 * s.cols) * 4;
}

export async function benchLayerNorm(gpu: Gpu): Promise<BenchRow> {
  const { rows, cols, eps } = LAYER_NORM;
  return await withScope(async () => {
    const x = fromArray(gpu, uniformRandom(rows * cols, 5), [rows, cols]);
    const gain = fromArray(gpu, uniformRandom(cols, 6), [cols]);
    const bias = fromArray(gpu, uniformRandom(cols, 7), [cols]);
    const { ms, cpuMs, n } = await timePerOp(gpu, () => {
      // The op makes more than its output (row statistics for a backward pass): a scope releases all of it.
      const scope = new Scope();
      noGrad(() => layerNorm(x, gain, bias, eps));
      scope.end();
    });
    const bytes = layerNormBytes();
    return row(
      "layer_norm",
      "GB/s",
      bytes / (ms * 1e6),
      `[${rows}, ${cols}] with gain and bias; bytes = x read + y written; ${ms.toFixed(2)} ms each, ${n} per submit${
        perCpuTimeNote(gpu, bytes / 1e6, cpuMs)
      }`,
    );
  });
}
