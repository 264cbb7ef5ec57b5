import {
  avgPoolBackwardKernel,
  avgPoolKernel,
  globalAvgPoolBackwardKernel,
  globalAvgPoolKernel,
  type PoolGeometry,
} from "../../../kernels/pool.ts";
import { perElementGroups } from "../../../kernels/nchw.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";
import { type Pair, toPair } from "./conv.ts";

function poolGeometry(x: Tensor, kernel: Pair, stride: Pair, padding: Pair): PoolGeometry {
  if (x.rank !== 4) throw new Error(`avgPool2d: input must be [N, C, H, W], got ${shapeString(x.shape)}`);
  const [n, c, height, width] = x.shape;
  const [kernelH, kernelW] = toPair(kernel, "avgPool2d kernel", 1);
  const [strideH, strideW] = toPair(stride, "avgPool2d stride", 1);
  const [padH, padW] = toPair(padding, "avgPool2d padding", 0);
  // PyTorch's rule: padding at most half the kernel, so that every window overlaps the image.
  if (2 * padH > kernelH || 2 * padW > kernelW) {
    throw new Error(`avgPool2d: padding ${padH},${padW} must be at most half the kernel ${kernelH}x${kernelW}`);
  }
  const outH = Math.floor((height + 2 * padH - kernelH) / strideH) + 1;
  const outW = Math.floor((width + 2 * padW - kernelW) / strideW) + 1;
  if (outH < 1 || outW < 1) {
    throw new Error(`avgPool2d: kernel ${kernelH}x${kernelW} does not fit input ${shapeString(x.shape)}`);
  }
  return { planes: n * c, height, width, kernelH, kernelW, strideH, strideW, padH, padW, outH, outW };
}

/**
 * Average pooling over kh x kw windows of x [N, C, H, W] -> [N, C, Ho, Wo], Ho = floor((H + 2 pad - kh) / stride) + 1.
 * Padded taps count in the divisor (PyTorch's count_include_pad=True), so every window divides by kh * kw.
 */
export function avgPool2d(x: Tensor, kernel: Pair, stride: Pair = kernel, padding: Pair = 0): Tensor {
  const g = poolGeometry(x, kernel, stride, padding);
  const out = empty(x.gpu, [x.shape[0], x.shape[1], g.outH, g.outW]);
  x.gpu.dispatch(avgPoolKernel(g), [x.buffer, out.buffer], perElementGroups(out.size));
  return record(out, "avgPool2d", [x], (dy) => {
    const dx = empty(x.gpu, x.shape);
    x.gpu.dispatch(avgPoolBackwardKernel(g), [dy.buffer, dx.buffer], perElementGroups(dx.size));
    return [dx];
  });
}

/** The mean over all pixels of each channel: x [N, C, H, W] -> [N, C]. */
export function globalAvgPool(x: Tensor): Tensor {
  if (x.rank !== 4) throw new Error(`globalAvgPool: input must be [N, C, H, W], got ${shapeString(x.shape)}`);
  const [n, c, h, w] = x.shape;
  const planes = n * c, pixels = h * w;
  const out = empty(x.gpu, [n, c]);
  x.gpu.dispatch(globalAvgPoolKernel(planes, pixels), [x.buffer, out.buffer], perElementGroups(planes));
  return record(out, "globalAvgPool", [x], (dy) => {
    const dx = empty(x.gpu, x.shape);
    x.gpu.dispatch(globalAvgPoolBackwardKernel(planes, pixels), [dy.buffer, dx.buffer], perElementGroups(dx.size));
    return [dx];
  });
}
