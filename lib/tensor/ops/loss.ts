import { crossEntropyBackwardKernel, crossEntropyForwardKernel } from "../../../kernels/loss.ts";
import { elementGroups } from "../../../kernels/grid.ts";
import { rowWorkgroups } from "../../../kernels/rows.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import type { Tensor } from "../tensor.ts";
import { sumAxesForward } from "./elementwise.ts";
import { rowLayoutFor } from "./strategy.ts";

/**
 * Mean cross-entropy of [N, C] logits against class indices (an i32 tensor [N]), as torch.nn.functional.cross_entropy
 * with its default mean reduction: a scalar (shape []). Log-softmax is taken stably inside. Targets must lie in
 * [0, C): out-of-range values are clamped on the GPU rather than reported. Backward: (softmax - onehot) / N.
 */
export function crossEntropy(logits: Tensor, targets: Tensor): Tensor {
  if (logits.rank !== 2 || logits.dtype !== "f32") {
    throw new Error(`crossEntropy: logits must be an f32 [N, C] tensor, got ${logits}`);
  }
  const [rows, cols] = logits.shape;
  if (targets.dtype !== "i32" || targets.size !== rows) {
    throw new Error(`crossEntropy: targets must be an i32 tensor of ${rows} class indices, got ${targets}`);
  }
  if (rows === 0 || cols === 0) throw new Error(`crossEntropy: empty logits ${logits}`);
  const gpu = logits.gpu;
  const shape = { rows, cols };
  const layout = rowLayoutFor(gpu, cols);
  const rowLoss = empty(gpu, [rows]);
  const lse = empty(gpu, [rows]);
  gpu.dispatch(
    crossEntropyForwardKernel(shape, layout),
    [logits.buffer, targets.buffer, rowLoss.buffer, lse.buffer],
    rowWorkgroups(rows, layout),
  );
  const loss = sumAxesForward(rowLoss, [true], 1 / rows);
  rowLoss.dispose();
  record(loss, "crossEntropy", [logits], (g) => {
    const dx = empty(gpu, logits.shape);
    gpu.dispatch(
      crossEntropyBackwardKernel(shape, 1 / rows),
      [logits.buffer, targets.buffer, lse.buffer, g.buffer, dx.buffer],
      elementGroups(rows * cols),
    );
    lse.dispose();
    return [dx];
  });
  if (!loss.node) lse.dispose();
  return loss;
}
