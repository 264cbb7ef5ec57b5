// Row kernels: a shared skeleton for ops that reduce along the last axis (layer norm, softmax, cross-entropy, L2
// normalisation). A row is handled by `lanes` invocations that stride over its columns and combine their partial
// results through workgroup memory; with one lane a row is a plain loop and the kernel has no barriers at all.
import { LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";

/** How rows map onto invocations: `lanes` invocations per row, `rowsPerGroup` rows per workgroup. */
export interface RowLayout {
  lanes: number;
  rowsPerGroup: number;
}

const MAX_LANES = 256;
const TARGET_COLUMNS_PER_LANE = 4;
const MIN_WORKGROUP = 64;
// Rows per workgroup on the CPU fallback: a multiple of its SIMD width (8 or 16 lanes), and small enough that a
// few thousand rows still make enough workgroups to share between the CPU's threads.
const CPU_ROWS_PER_GROUP = 16;

function nextPowerOfTwo(n: number): number {
  let p = 1;
  while (p < n) p *= 2;
  return p;
}

/**
 * The layout for rows of `cols` columns. GPUs want many lanes per row (coalesced loads, short loops). The CPU
 * fallback (llvmpipe/lavapipe) packs invocations into SIMD lanes and makes every barrier a switch between all of a
 * workgroup's invocations: there one invocation per row measured 2-4x faster than 8-128 lanes per row (layer norm
 * of [9856, 512] on lavapipe, 2 cores).
 */
export function rowLayout(cols: number, software: boolean): RowLayout {
  if (software) return { lanes: 1, rowsPerGroup: CPU_ROWS_PER_GROUP };
  const lanes = Math.min(MAX_LANES, nextPowerOfTwo(Math.ceil(cols / TARGET_COLUMNS_PER_LANE)));
  return { lanes, rowsPerGroup: Math.max(1, MIN_WORKGROUP / lanes) };
}

export function rowLayoutKey(layout: RowLayout): string {
  return `${layout.lanes}x${layout.rowsPerGroup}`;
}

export function rowWorkgroups(rows: number, layout: RowLayout): number {
  return Math.ceil(rows / layout.rowsPerGroup);
}

/**
 * A complete row kernel. `body` runs once per invocation with these names in scope: `row` (clamped to a valid row, so
 * loads are always in bounds), `valid` (false for the padding rows of the last workgroup: guard stores with it),
 * `lane` and the constant `LANES` (stride over columns as `for (var j = lane; j < C; j += LANES)`), and the functions
 * `row_sum(v)` and `row_max(v)`, which combine one value per lane into the row's total. They contain barriers, so the
 * body must call them from uniform control flow (never inside `if (valid)`).
 */
export function rowKernelWgsl(rows: number, layout: RowLayout, bindings: string, body: string, helpers = ""): string {
  const { lanes, rowsPerGroup } = layout;
  const size = lanes * rowsPerGroup;
  const reducers = lanes === 1
    ? `fn row_sum(v: f32) -> f32 { return v; }
fn row_max(v: f32) -> f32 { return v; }`
    : `var<workgroup> lane_partials: array<f32, ${size}>;
var<private> slot: u32;
var<private> my_lane: u32;
fn row_sum(v: f32) -> f32 {
  lane_partials[slot] = v;
  workgroupBarrier();
  for (var s = ${lanes / 2}u; s > 0u; s = s >> 1u) {
    if (my_lane < s) { lane_partials[slot] = lane_partials[slot] + lane_partials[slot + s]; }
    workgroupBarrier();
  }
  let total = lane_partials[slot - my_lane];
  workgroupBarrier();
  return total;
}
fn row_max(v: f32) -> f32 {
  lane_partials[slot] = v;
  workgroupBarrier();
  for (var s = ${lanes / 2}u; s > 0u; s = s >> 1u) {
    if (my_lane < s) { lane_partials[slot] = max(lane_partials[slot], lane_partials[slot + s]); }
    workgroupBarrier();
  }
  let total = lane_partials[slot - my_lane];
  workgroupBarrier();
  return total;
}`;
  return `${LINEAR_WORKGROUP_WGSL}
${helpers}
${bindings}
${reducers}
const LANES = ${lanes}u;
@compute @workgroup_size(${size})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lidx: u32) {
  let lane = lidx % LANES;
  let raw_row = linear_workgroup(wid, nwg) * ${rowsPerGroup}u + lidx / LANES;
  let valid = raw_row < ${rows}u;
  let row = min(raw_row, ${Math.max(rows, 1) - 1}u);
  ${lanes === 1 ? "" : "slot = lidx; my_lane = lane;"}
  ${body}
}`;
}

/** The most negative finite f32: the start of a running maximum. */
export const F32_LOWEST = "-3.4028234663852886e38";
