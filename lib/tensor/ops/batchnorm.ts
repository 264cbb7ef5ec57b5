import {
  batchNormAffineInputGradKernel,
  batchNormApplyKernel,
  batchNormGradSumsKernel,
  batchNormInputGradKernel,
  type BatchNormShape,
  batchStatsKernel,
  type StatsKind,
} from "../../../kernels/batchnorm.ts";
import { perElementGroups } from "../../../kernels/nchw.ts";
import { isGradEnabled, record } from "../autograd.ts";
import { copyOf, empty } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";

export interface BatchNormOptions {
  /** Normalise with the batch's statistics and update the running ones (true), or use the running ones (false). */
  training: boolean;
  /** Weight of the batch statistics in the running-average update. */
  momentum?: number;
  eps?: number;
}

function checkOperands(x: Tensor, params: Record<string, Tensor>): BatchNormShape {
  if (x.rank !== 4) throw new Error(`batchNorm2d: input must be [N, C, H, W], got ${shapeString(x.shape)}`);
  const [images, channels, h, w] = x.shape;
  for (const [name, t] of Object.entries(params)) {
    if (t.rank !== 1 || t.size !== channels) {
      throw new Error(`batchNorm2d: ${name} must be [${channels}] for input ${shapeString(x.shape)}, got ${t}`);
    }
  }
  return { images, channels, pixels: h * w };
}

/**
 * 2-D batch normalisation over x [N, C, H, W], as PyTorch's BatchNorm2d. In training the batch mean and biased
 * variance normalise x, and runningMean/runningVar are updated in place as PyTorch does (with the unbiased variance)
 * by the same recorded work, with or without autograd; in eval the running statistics normalise x and nothing is
 * updated. PyTorch's num_batches_tracked counter is the caller's to keep. Backward gives dx (through the batch
 * statistics in training, affine only in eval), dweight and dbias.
 */
export function batchNorm2d(
  x: Tensor,
  weight: Tensor,
  bias: Tensor,
  runningMean: Tensor,
  runningVar: Tensor,
  opts: BatchNormOptions,
): Tensor {
  const shape = checkOperands(x, { weight, bias, runningMean, runningVar });
  const eps = opts.eps ?? 1e-5;
  const momentum = opts.momentum ?? 0.1;
  const gpu = x.gpu;
  const needGrad = isGradEnabled() && [x, weight, bias].some((t) => t.requiresGrad);
  // The statistics that normalise this batch; the backward keeps them (so later updates of the running buffers do
  // not change it), without grad they are released at once or were never copied.
  let kind: StatsKind;
  let mean: Tensor, stat: Tensor;
  if (opts.training) {
    if (shape.images * shape.pixels < 2) {
      throw new Error(`batchNorm2d: training needs more than one value per channel, got ${shapeString(x.shape)}`);
    }
    kind = "batch";
    mean = empty(gpu, [shape.channels]);
    stat = empty(gpu, [shape.channels]);
    gpu.dispatch(
      batchStatsKernel(shape, eps, momentum),
      [x.buffer, mean.buffer, stat.buffer, runningMean.buffer, runningVar.buffer],
      shape.channels,
    );
  } else {
    kind = "running";
    mean = needGrad ? copyOf(runningMean) : runningMean;
    stat = needGrad ? copyOf(runningVar) : runningVar;
  }
  const out = empty(gpu, x.shape);
  gpu.dispatch(
    batchNormApplyKernel(shape, kind, eps),
    [x.buffer, mean.buffer, stat.buffer, weight.buffer, bias.buffer, out.buffer],
    perElementGroups(out.size),
  );
  if (!needGrad) {
    if (mean !== runningMean) mean.dispose();
    if (stat !== runningVar) stat.dispose();
    return out;
  }
  return record(out, "batchNorm2d", [x, weight, bias], (dy) => {
    const sumDy = empty(gpu, [shape.channels]);
    const sumDyXhat = empty(gpu, [shape.channels]);
    gpu.dispatch(
      batchNormGradSumsKernel(shape, kind, eps),
      [x.buffer, dy.buffer, mean.buffer, stat.buffer, sumDy.buffer, sumDyXhat.buffer],
      shape.channels,
    );
    let dx: Tensor | null = null;
    if (x.requiresGrad) {
      dx = empty(gpu, x.shape);
      if (kind === "batch") {
        gpu.dispatch(
          batchNormInputGradKernel(shape, eps),
          [x.buffer, dy.buffer, mean.buffer, stat.buffer, weight.buffer, sumDy.buffer, sumDyXhat.buffer, dx.buffer],
          perElementGroups(dx.size),
        );
      } else {
        gpu.dispatch(
          batchNormAffineInputGradKernel(shape, eps),
          [dy.buffer, stat.buffer, weight.buffer, dx.buffer],
          perElementGroups(dx.size),
        );
      }
    }
    mean.dispose();
    stat.dispose();
    const dweight = weight.requiresGrad ? sumDyXhat : (sumDyXhat.dispose(), null);
    const dbias = bias.requiresGrad ? sumDy : (sumDy.dispose(), null);
    return [dx, dweight, dbias];
  });
}
