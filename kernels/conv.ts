// 2-D convolution as im2col + matmul: kernels that unfold image patches into columns (im2col), fold column gradients
// back onto the image (col2im) and add a per-channel bias. The matmuls themselves are the matmul family's. Every size
// is baked in; only the first image of a batch chunk is a uniform, so all chunks of one convolution share a pipeline.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { perElementKernel } from "./nchw.ts";

/** The sizes of one convolution over a single image (NCHW, groups 1, dilation 1). */
export interface ConvGeometry {
  inChannels: number;
  height: number;
  width: number;
  kernelH: number;
  kernelW: number;
  strideH: number;
  strideW: number;
  padH: number;
  padW: number;
  outH: number;
  outW: number;
}

/** Rows of the unfolded matrix: one per (input channel, kernel row, kernel column), in weight order. */
export function patchSize(g: ConvGeometry): number {
  return g.inChannels * g.kernelH * g.kernelW;
}

/** Columns of the unfolded matrix per image: one per output pixel. */
export function outputPixels(g: ConvGeometry): number {
  return g.outH * g.outW;
}

function geometryKey(g: ConvGeometry): string {
  return [g.inChannels, g.height, g.width, g.kernelH, g.kernelW, g.strideH, g.strideW, g.padH, g.padW].join("x");
}

/**
 * How the unfolded columns of a chunk of `images` images are stored:
 * - "per_image": [images, K, P], so out[n] = W [Cout, K] x cols[n] is a batched matmul that lands in NCHW order;
 * - "channel_major": [K, images, P], so the weight gradient, a contraction over images and pixels together, is one
 *   matmul with dY in the same layout ([Cout, images, P], the unfolding of a 1x1 convolution).
 */
export type ColumnLayout = "per_image" | "channel_major";

/** The uniform block of the chunked kernels: the index of the chunk's first image in the whole batch. */
const CHUNK_UNIFORM_WGSL = `struct Chunk { first_image: u32, _pad0: u32, _pad1: u32, _pad2: u32 }`;

export function chunkUniform(firstImage: number): Uint32Array {
  return new Uint32Array([firstImage, 0, 0, 0]);
}

/**
 * cols = im2col(x[first_image .. first_image + images]); bindings: x (whole batch), cols, chunk uniform.
 * Out-of-image taps (padding) read as zero.
 */
export function im2colKernel(g: ConvGeometry, images: number, layout: ColumnLayout): Kernel {
  const K = patchSize(g), P = outputPixels(g);
  const taps = g.kernelH * g.kernelW;
  const decompose = layout === "per_image"
    ? `let n = i / ${K * P}u; let k = (i / ${P}u) % ${K}u;`
    : `let k = i / ${images * P}u; let n = (i / ${P}u) % ${images}u;`;
  return perElementKernel(
    `im2col/${geometryKey(g)}/${images}/${layout}`,
    images * K * P,
    `${CHUNK_UNIFORM_WGSL}
@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> cols: array<f32>;
@group(0) @binding(2) var<uniform> chunk: Chunk;`,
    `${decompose}
  let p = i % ${P}u;
  let ci = k / ${taps}u;
  let ky = i32((k / ${g.kernelW}u) % ${g.kernelH}u);
  let kx = i32(k % ${g.kernelW}u);
  let iy = i32(p / ${g.outW}u) * ${g.strideH} - ${g.padH} + ky;
  let ix = i32(p % ${g.outW}u) * ${g.strideW} - ${g.padW} + kx;
  var v = 0.0;
  if (iy >= 0 && iy < ${g.height} && ix >= 0 && ix < ${g.width}) {
    let image = chunk.first_image + n;
    v = x[((image * ${g.inChannels}u + ci) * ${g.height}u + u32(iy)) * ${g.width}u + u32(ix)];
  }
  cols[i] = v;`,
  );
}

/**
 * dx[first_image .. first_image + images] = col2im(dcols) with dcols stored "per_image" [images, K, P]. Each input
 * pixel gathers the column entries of every output pixel whose window covers it, so no two invocations write the
 * same element; it walks only those output pixels (at most ceil(kernel / stride) per axis), not every kernel tap.
 * Bindings: dcols, dx (whole batch), chunk uniform.
 */
export function col2imKernel(g: ConvGeometry, images: number): Kernel {
  const K = patchSize(g), P = outputPixels(g);
  const HW = g.height * g.width;
  // Output rows whose window covers input row iy: oy * stride - pad <= iy <= oy * stride - pad + kernel - 1.
  const coveringRange = (axis: "y" | "x", kernel: number, stride: number, pad: number, outSize: number) =>
    `let t${axis} = i${axis} + (${pad - kernel + 1});
  let o${axis}_lo = select(0, (t${axis} + ${stride - 1}) / ${stride}, t${axis} > 0);
  let o${axis}_hi = min((i${axis} + ${pad}) / ${stride}, ${outSize - 1});`;
  return perElementKernel(
    `col2im/${geometryKey(g)}/${images}`,
    images * g.inChannels * HW,
    `${CHUNK_UNIFORM_WGSL}
@group(0) @binding(0) var<storage, read> dcols: array<f32>;
@group(0) @binding(1) var<storage, read_write> dx: array<f32>;
@group(0) @binding(2) var<uniform> chunk: Chunk;`,
    `let n = i / ${g.inChannels * HW}u;
  let ci = (i / ${HW}u) % ${g.inChannels}u;
  let iy = i32((i / ${g.width}u) % ${g.height}u);
  let ix = i32(i % ${g.width}u);
  ${coveringRange("y", g.kernelH, g.strideH, g.padH, g.outH)}
  ${coveringRange("x", g.kernelW, g.strideW, g.padW, g.outW)}
  let base = n * ${K * P}u + ci * ${g.kernelH * g.kernelW * P}u;
  var acc = 0.0;
  for (var oy = oy_lo; oy <= oy_hi; oy++) {
    let ky = iy + ${g.padH} - oy * ${g.strideH};
    for (var ox = ox_lo; ox <= ox_hi; ox++) {
      let kx = ix + ${g.padW} - ox * ${g.strideW};
      acc += dcols[base + u32(ky * ${g.kernelW} + kx) * ${P}u + u32(oy * ${g.outW} + ox)];
    }
  }
  dx[chunk.first_image * ${g.inChannels * HW}u + i] = acc;`,
  );
}

/** out[n, c, p] += bias[c] in place, for out of shape [images, channels, pixels]. Bindings: out, bias. */
export function channelBiasKernel(images: number, channels: number, pixels: number): Kernel {
  return perElementKernel(
    `conv_bias/${images}/${channels}/${pixels}`,
    images * channels * pixels,
    `@group(0) @binding(0) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> bias: array<f32>;`,
    `out[i] = out[i] + bias[(i / ${pixels}u) % ${channels}u];`,
  );
}
