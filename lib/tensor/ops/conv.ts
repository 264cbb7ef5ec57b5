import {
  channelBiasKernel,
  chunkUniform,
  col2imKernel,
  type ColumnLayout,
  type ConvGeometry,
  im2colKernel,
  outputPixels,
  patchSize,
} from "../../../kernels/conv.ts";
import { perElementGroups } from "../../../kernels/nchw.ts";
import type { Gpu } from "../../gpu/runtime.ts";
import { record } from "../autograd.ts";
import { addInto, empty } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";
import { sumAxesForward } from "./elementwise.ts";
import { matmulForward } from "./matmul.ts";

/** A size given once for both spatial axes, or as [height, width]. */
export type Pair = number | readonly [number, number];

export function toPair(v: Pair, what: string, min: number): [number, number] {
  const [a, b] = typeof v === "number" ? [v, v] : v;
  if (!Number.isInteger(a) || !Number.isInteger(b) || a < min || b < min) {
    throw new Error(`${what} must be integers >= ${min}, got ${JSON.stringify(v)}`);
  }
  return [a, b];
}

export interface Conv2dOptions {
  /** [Cout], added to every output pixel of its channel. */
  bias?: Tensor;
  stride?: Pair;
  /** Zero padding on each side. */
  padding?: Pair;
  /**
   * The largest temporary (in elements) one batch chunk may make; the batch is processed in chunks of whole images
   * that fit. Defaults to half of what one storage binding holds; tests lower it to exercise chunking.
   */
  maxChunkElements?: number;
}

/** Checks the operand shapes and works out the per-image geometry. */
export function conv2dGeometry(x: Tensor, weight: Tensor, stride: Pair = 1, padding: Pair = 0): ConvGeometry {
  if (x.rank !== 4) throw new Error(`conv2d: input must be [N, Cin, H, W], got ${shapeString(x.shape)}`);
  if (weight.rank !== 4) {
    throw new Error(`conv2d: weight must be [Cout, Cin, kh, kw], got ${shapeString(weight.shape)}`);
  }
  const [, inChannels, height, width] = x.shape;
  const [, wIn, kernelH, kernelW] = weight.shape;
  if (wIn !== inChannels) {
    throw new Error(
      `conv2d: weight ${shapeString(weight.shape)} expects ${wIn} input channels, input ${
        shapeString(x.shape)
      } has ${inChannels}`,
    );
  }
  const [strideH, strideW] = toPair(stride, "conv2d stride", 1);
  const [padH, padW] = toPair(padding, "conv2d padding", 0);
  const outH = Math.floor((height + 2 * padH - kernelH) / strideH) + 1;
  const outW = Math.floor((width + 2 * padW - kernelW) / strideW) + 1;
  if (outH < 1 || outW < 1 || kernelH < 1 || kernelW < 1) {
    throw new Error(
      `conv2d: kernel ${kernelH}x${kernelW} with padding ${padH},${padW} does not fit input ${shapeString(x.shape)}`,
    );
  }
  return { inChannels, height, width, kernelH, kernelW, strideH, strideW, padH, padW, outH, outW };
}

/** A 1x1, stride 1, unpadded convolution: its unfolded columns are the input itself. */
function isPointwise(g: ConvGeometry): boolean {
  return g.kernelH === 1 && g.kernelW === 1 && g.strideH === 1 && g.strideW === 1 && g.padH === 0 && g.padW === 0;
}

/** The geometry whose "channel_major" unfolding transposes [N, C, H, W] to [C, N, H*W]. */
function transposeGeometry(channels: number, height: number, width: number): ConvGeometry {
  return {
    inChannels: channels,
    height,
    width,
    kernelH: 1,
    kernelW: 1,
    strideH: 1,
    strideW: 1,
    padH: 0,
    padW: 0,
    outH: height,
    outW: width,
  };
}

/**
 * The default chunk budget: half of what one storage binding holds (rounded down to a power of two so that pooled
 * buffers stay within it). The other half is headroom for the matmul's own padded copies of its operands; chunks
 * this large are already far past the size where splitting costs anything.
 */
function chunkBudgetElements(gpu: Gpu): number {
  const limits = gpu.device.limits;
  const bytes = Math.min(limits.maxStorageBufferBindingSize, limits.maxBufferSize);
  return 2 ** Math.floor(Math.log2(bytes)) / 4 / 2;
}

interface Chunk {
  first: number;
  count: number;
}

/** Splits `batch` images into near-equal chunks whose temporaries (`perImage` elements each) fit `maxElements`. */
function planChunks(batch: number, perImage: number, maxElements: number): Chunk[] {
  if (perImage > maxElements) {
    throw new Error(
      `conv2d: one image needs a ${perImage}-element temporary, more than the chunk budget of ${maxElements}`,
    );
  }
  const chunkCount = Math.ceil(batch / Math.floor(maxElements / perImage));
  const size = Math.ceil(batch / chunkCount);
  const chunks: Chunk[] = [];
  for (let first = 0; first < batch; first += size) chunks.push({ first, count: Math.min(size, batch - first) });
  return chunks;
}

/** Unfolds images [first, first + count) of `x` (NCHW) into columns in the given layout. */
function unfold(x: Tensor, g: ConvGeometry, chunk: Chunk, layout: ColumnLayout): Tensor {
  const K = patchSize(g), P = outputPixels(g);
  const cols = empty(x.gpu, layout === "per_image" ? [chunk.count, K, P] : [K, chunk.count * P]);
  x.gpu.dispatch(
    im2colKernel(g, chunk.count, layout),
    [x.buffer, cols.buffer],
    perElementGroups(cols.size),
    chunkUniform(chunk.first),
  );
  return cols;
}

/** Copies images [first, first + count) of a [N, ...] tensor into a new [count, ...rest] tensor. */
function sliceImages(t: Tensor, chunk: Chunk): Tensor {
  const perImage = t.size / t.shape[0];
  const out = empty(t.gpu, [chunk.count, ...t.shape.slice(1)]);
  t.gpu.copyBuffer(t.buffer, chunk.first * perImage * 4, out.buffer, 0, chunk.count * perImage * 4);
  return out;
}

/** Turns an owned tensor into a view of another shape, releasing the original handle. */
function reshaped(t: Tensor, shape: readonly number[]): Tensor {
  const v = t.view(shape);
  t.dispose();
  return v;
}

function chunksFor(x: Tensor, weight: Tensor, g: ConvGeometry, maxChunkElements?: number): Chunk[] {
  const perImage = Math.max(patchSize(g), weight.shape[0]) * outputPixels(g);
  return planChunks(x.shape[0], perImage, maxChunkElements ?? chunkBudgetElements(x.gpu));
}

/** Records the convolution without autograd: out[n] = W [Cout, K] x im2col(x[n]) [K, P] (+ bias per channel). */
export function conv2dForward(x: Tensor, weight: Tensor, opts: Conv2dOptions = {}): Tensor {
  const g = conv2dGeometry(x, weight, opts.stride, opts.padding);
  const [batch] = x.shape;
  const outChannels = weight.shape[0];
  if (opts.bias && (opts.bias.rank !== 1 || opts.bias.size !== outChannels)) {
    throw new Error(`conv2d: bias must be [${outChannels}], got ${shapeString(opts.bias.shape)}`);
  }
  const K = patchSize(g), P = outputPixels(g);
  const outShape = [batch, outChannels, g.outH, g.outW];
  const w2 = weight.view([outChannels, K]);
  const chunks = chunksFor(x, weight, g, opts.maxChunkElements);
  let out: Tensor;
  if (chunks.length === 1) {
    const cols = isPointwise(g) ? x.view([batch, K, P]) : unfold(x, g, chunks[0], "per_image");
    out = reshaped(matmulForward(w2, cols).out, outShape);
    cols.dispose();
  } else {
    out = empty(x.gpu, outShape);
    for (const chunk of chunks) {
      const cols = unfold(x, g, chunk, "per_image");
      const part = matmulForward(w2, cols).out;
      const bytes = chunk.count * outChannels * P * 4;
      x.gpu.copyBuffer(part.buffer, 0, out.buffer, chunk.first * outChannels * P * 4, bytes);
      cols.dispose();
      part.dispose();
    }
  }
  w2.dispose();
  if (opts.bias) {
    x.gpu.dispatch(
      channelBiasKernel(batch, outChannels, P),
      [out.buffer, opts.bias.buffer],
      perElementGroups(out.size),
    );
  }
  return out;
}

/** dx = col2im(W^T dY), chunk by chunk. */
function conv2dInputGrad(dy: Tensor, x: Tensor, weight: Tensor, g: ConvGeometry, chunks: Chunk[]): Tensor {
  const [batch] = x.shape;
  const outChannels = weight.shape[0];
  const K = patchSize(g), P = outputPixels(g);
  const w2 = weight.view([outChannels, K]);
  const dy3 = dy.view([batch, outChannels, P]);
  let dx: Tensor;
  if (chunks.length === 1 && isPointwise(g)) {
    dx = reshaped(matmulForward(w2, dy3, { transA: true }).out, x.shape);
  } else {
    dx = empty(x.gpu, x.shape);
    for (const chunk of chunks) {
      const dyChunk = chunks.length === 1 ? dy3 : sliceImages(dy3, chunk);
      const dcols = matmulForward(w2, dyChunk, { transA: true }).out;
      x.gpu.dispatch(
        col2imKernel(g, chunk.count),
        [dcols.buffer, dx.buffer],
        perElementGroups(chunk.count * x.size / batch),
        chunkUniform(chunk.first),
      );
      dcols.dispose();
      if (dyChunk !== dy3) dyChunk.dispose();
    }
  }
  dy3.dispose();
  w2.dispose();
  return dx;
}

/** dW = sum over images and pixels of dY x im2col(x)^T, as one matmul per chunk over channel-major operands. */
function conv2dWeightGrad(dy: Tensor, x: Tensor, weight: Tensor, g: ConvGeometry, chunks: Chunk[]): Tensor {
  const outChannels = weight.shape[0];
  const dyGeometry = transposeGeometry(outChannels, g.outH, g.outW);
  let dw: Tensor | null = null;
  for (const chunk of chunks) {
    const cols = unfold(x, g, chunk, "channel_major");
    const dyT = unfold(dy, dyGeometry, chunk, "channel_major");
    const part = matmulForward(dyT, cols, { transB: true }).out;
    if (dw) {
      addInto(dw, part);
      part.dispose();
    } else dw = part;
    cols.dispose();
    dyT.dispose();
  }
  return reshaped(dw!, weight.shape);
}

/**
 * 2-D convolution, NCHW, groups 1, dilation 1: x [N, Cin, H, W] * weight [Cout, Cin, kh, kw] -> [N, Cout, Ho, Wo]
 * with Ho = floor((H + 2 pad - kh) / stride) + 1. Backward gives dx, dweight and dbias.
 */
export function conv2d(x: Tensor, weight: Tensor, opts: Conv2dOptions = {}): Tensor {
  const out = conv2dForward(x, weight, opts);
  const g = conv2dGeometry(x, weight, opts.stride, opts.padding);
  const bias = opts.bias;
  const inputs = bias ? [x, weight, bias] : [x, weight];
  return record(out, "conv2d", inputs, (dy) => {
    const chunks = chunksFor(x, weight, g, opts.maxChunkElements);
    const grads: (Tensor | null)[] = [
      x.requiresGrad ? conv2dInputGrad(dy, x, weight, g, chunks) : null,
      weight.requiresGrad ? conv2dWeightGrad(dy, x, weight, g, chunks) : null,
    ];
    if (bias) {
      let dbias: Tensor | null = null;
      if (bias.requiresGrad) {
        const dy3 = dy.view([x.shape[0], weight.shape[0], outputPixels(g)]);
        dbias = sumAxesForward(dy3, [true, false, true]);
        dy3.dispose();
      }
      grads.push(dbias);
    }
    return grads;
  });
}
