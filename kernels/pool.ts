// Average pooling over NCHW images: windowed (count_include_pad: padded taps count in the divisor, as PyTorch's
// default) and global, each with the gather-form backward (one invocation per input pixel, no atomics).
import type { Kernel } from "../lib/gpu/runtime.ts";
import { f32Literal, perElementKernel } from "./nchw.ts";

/** Sizes of a windowed pooling over `planes` = N * C independent images. */
export interface PoolGeometry {
  planes: number;
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

function poolKey(g: PoolGeometry): string {
  return [g.planes, g.height, g.width, g.kernelH, g.kernelW, g.strideH, g.strideW, g.padH, g.padW].join("x");
}

const IO_BINDINGS = `@group(0) @binding(0) var<storage, read> src: array<f32>;
@group(0) @binding(1) var<storage, read_write> dst: array<f32>;`;

/** out = mean over each kh x kw window of x (zeros where it overlaps the padding). Bindings: x, out. */
export function avgPoolKernel(g: PoolGeometry): Kernel {
  const P = g.outH * g.outW;
  return perElementKernel(
    `avg_pool/${poolKey(g)}`,
    g.planes * P,
    IO_BINDINGS,
    `let plane = i / ${P}u;
  let y0 = i32((i / ${g.outW}u) % ${g.outH}u) * ${g.strideH} - ${g.padH};
  let x0 = i32(i % ${g.outW}u) * ${g.strideW} - ${g.padW};
  let y1 = min(y0 + ${g.kernelH}, ${g.height});
  let x1 = min(x0 + ${g.kernelW}, ${g.width});
  let base = plane * ${g.height * g.width}u;
  var acc = 0.0;
  for (var y = max(y0, 0); y < y1; y++) {
    for (var x = max(x0, 0); x < x1; x++) {
      acc += src[base + u32(y) * ${g.width}u + u32(x)];
    }
  }
  dst[i] = acc * ${f32Literal(1 / (g.kernelH * g.kernelW))};`,
  );
}

/** dx = the sum over the windows covering each input pixel of dy / (kh * kw). Bindings: dy, dx. */
export function avgPoolBackwardKernel(g: PoolGeometry): Kernel {
  const HW = g.height * g.width;
  // Output rows covering input row iy: oy * stride - pad <= iy < oy * stride - pad + kernel.
  const range = (axis: "y" | "x", kernel: number, stride: number, pad: number, outSize: number) =>
    `let t${axis} = i${axis} + (${pad - kernel + 1});
  let o${axis}_lo = select(0, (t${axis} + ${stride - 1}) / ${stride}, t${axis} > 0);
  let o${axis}_hi = min((i${axis} + ${pad}) / ${stride}, ${outSize - 1});`;
  return perElementKernel(
    `avg_pool_bwd/${poolKey(g)}`,
    g.planes * HW,
    IO_BINDINGS,
    `let plane = i / ${HW}u;
  let iy = i32((i / ${g.width}u) % ${g.height}u);
  let ix = i32(i % ${g.width}u);
  ${range("y", g.kernelH, g.strideH, g.padH, g.outH)}
  ${range("x", g.kernelW, g.strideW, g.padW, g.outW)}
  let base = plane * ${g.outH * g.outW}u;
  var acc = 0.0;
  for (var oy = oy_lo; oy <= oy_hi; oy++) {
    for (var ox = ox_lo; ox <= ox_hi; ox++) {
      acc += src[base + u32(oy) * ${g.outW}u + u32(ox)];
    }
  }
  dst[i] = acc * ${f32Literal(1 / (g.kernelH * g.kernelW))};`,
  );
}

/** out[plane] = mean of the plane's `pixels` values. Bindings: x, out. */
export function globalAvgPoolKernel(planes: number, pixels: number): Kernel {
  return perElementKernel(
    `global_avg_pool/${planes}/${pixels}`,
    planes,
    IO_BINDINGS,
    `let base = i * ${pixels}u;
  var acc = 0.0;
  for (var p = 0u; p < ${pixels}u; p++) { acc += src[base + p]; }
  dst[i] = acc * ${f32Literal(1 / pixels)};`,
  );
}

/** dx[plane, p] = dy[plane] / pixels. Bindings: dy, dx. */
export function globalAvgPoolBackwardKernel(planes: number, pixels: number): Kernel {
  return perElementKernel(
    `global_avg_pool_bwd/${planes}/${pixels}`,
    planes * pixels,
    IO_BINDINGS,
    `dst[i] = src[i / ${pixels}u] * ${f32Literal(1 / pixels)};`,
  );
}
