// One invocation per output element over a 1-D grid of any size (folded into y past 65535 workgroups), for the op
// families whose kernels are plain index maps (layout, gather, loss gradients, column partial sums).
import { LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { ELEMENTWISE_WG } from "./elementwise.ts";

export { elementGroups } from "./elementwise.ts";

/** A kernel whose `body` runs once for each `i` in [0, n), with `bindings` declared at module scope. */
export function gridWgsl(n: number, bindings: string, body: string, helpers = ""): string {
  return `${LINEAR_WORKGROUP_WGSL}
${helpers}
${bindings}
@compute @workgroup_size(${ELEMENTWISE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${ELEMENTWISE_WG}u + lid.x;
  if (i >= ${n}u) { return; }
  ${body}
}`;
}

/** A float constant as WGSL source (finite values only; kernels bake hyper-parameters such as eps). */
export function f32Literal(v: number): string {
  if (!Number.isFinite(v)) throw new Error(`cannot bake the non-finite constant ${v} into a kernel`);
  return `f32(${v.toExponential()})`;
}
