// Pieces shared by the image kernel families (conv, pool, batchnorm): a one-invocation-per-element template whose
// grid may exceed the per-dimension workgroup limit, and a workgroup-wide sum for per-channel reductions.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { elementGroups, ELEMENTWISE_WG, gridKernel } from "./grid.ts";

export const PER_ELEMENT_WG = ELEMENTWISE_WG;

/** Workgroups for one invocation per element (fold them with the runtime's 1-D dispatch). */
export const perElementGroups = elementGroups;

/**
 * A kernel whose invocation `i` (0 <= i < n) runs `body`. `declarations` holds bindings, structs and helper
 * functions; `body` may `return` to skip an element.
 */
export function perElementKernel(key: string, n: number, declarations: string, body: string): Kernel {
  return gridKernel(key, n, declarations, body);
}

/** Threads of a per-channel reduction workgroup (a power of two). */
export const REDUCE_WG = 256;

/**
 * WGSL for `workgroup_sum(v, lane)`: the sum of `v` over the workgroup's REDUCE_WG lanes, returned to every lane.
 * It contains barriers, so every lane must call it in uniform control flow. `T` is f32 or a vector of f32.
 */
export function workgroupSumWgsl(type: "f32" | "vec2<f32>"): string {
  return `
var<workgroup> partial_sums: array<${type}, ${REDUCE_WG}>;
fn workgroup_sum(v: ${type}, lane: u32) -> ${type} {
  partial_sums[lane] = v;
  workgroupBarrier();
  for (var stride = ${REDUCE_WG / 2}u; stride > 0u; stride = stride / 2u) {
    if (lane < stride) { partial_sums[lane] = partial_sums[lane] + partial_sums[lane + stride]; }
    workgroupBarrier();
  }
  let total = partial_sums[0];
  // Every lane must read the total before a later call overwrites the scratch space.
  workgroupBarrier();
  return total;
}`;
}

/** A WGSL f32 literal that round-trips `v` (finite values only). */
export function f32Literal(v: number): string {
  if (!Number.isFinite(v)) throw new Error(`f32Literal: ${v} is not finite`);
  return `f32(${v.toExponential()})`;
}
