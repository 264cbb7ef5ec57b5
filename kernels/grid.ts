// One invocation per output element over a 1-D grid of any size (folded into y past 65535 workgroups), for the op
// families whose kernels are plain index maps (layout, gather, loss gradients, column partial sums).
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";

/**
 * Put first in a module that names f16 (WGSL wants enable directives before any declaration); valid only on devices
 * created with the shader-f16 feature.
 */
export const ENABLE_F16 = "enable f16;\n";

/** Elements covered by one workgroup of a grid kernel. */
export const ELEMENTWISE_WG = 256;

/** Number of workgroups for one invocation per element (fold them with the runtime's 1-D dispatch). */
export function elementGroups(n: number): number {
  return Math.ceil(n / ELEMENTWISE_WG);
}

/**
 * A kernel whose `body` runs once for each `i` in [0, n), with `bindings` (and `helpers`) declared at module scope;
 * `body` may `return` to skip an element. Vector kernels pass a smaller workgroup so that one still covers
 * ELEMENTWISE_WG elements.
 */
export function gridWgsl(
  n: number,
  bindings: string,
  body: string,
  helpers = "",
  workgroupSize = ELEMENTWISE_WG,
): string {
  return `${LINEAR_WORKGROUP_WGSL}
${helpers}
${bindings}
@compute @workgroup_size(${workgroupSize})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${workgroupSize}u + lid.x;
  if (i >= ${n}u) { return; }
  ${body}
}`;
}

/** `gridWgsl` as a cacheable kernel. */
export function gridKernel(
  key: string,
  n: number,
  bindings: string,
  body: string,
  helpers = "",
  workgroupSize?: number,
): Kernel {
  return { key, wgsl: () => gridWgsl(n, bindings, body, helpers, workgroupSize) };
}

/** A float constant as WGSL source (finite values only; kernels bake hyper-parameters such as eps). */
export function f32Literal(v: number): string {
  if (!Number.isFinite(v)) throw new Error(`cannot bake the non-finite constant ${v} into a kernel`);
  return `f32(${v.toExponential()})`;
}
