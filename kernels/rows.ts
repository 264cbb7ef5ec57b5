// Row kernels: a shared skeleton for ops that reduce along the last axis (layer norm, softmax, cross-entropy, L2
// normalisation). A row is handled by `lanes` invocations that stride over its columns and combine their partial
// results through workgroup memory; with one lane a row is a plain loop and the kernel has no barriers at all. For
// the CPU fallback's one-lane layout, rows up to MAX_REGISTER_COLUMNS wide are instead loaded once into registers
// (registerRowKernelWgsl and its helpers).
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

/**
 * Rows held in registers, for the CPU fallback's layout (one invocation per row). Every storage-buffer load there runs
 * a loop over the SIMD lanes, so a row kernel costs about what its loads do: loading each row once into named values
 * (a fully unrolled template, no private arrays) instead of once per pass, and as vec4 words where the width allows,
 * measured 2-2.7x faster on lavapipe (layer-norm backward at [8320, 128], softmax over 65 columns). Wider rows keep
 * the loop kernels: compile time grows faster than the width (lavapipe, layer norm: 128 columns about 1.5 s, 256
 * about 6 s, 1024 nearly 3 minutes without the shader cache).
 */
const MAX_REGISTER_COLUMNS = 128;

/** A row as words: vec4 when the width is a multiple of 4 (rows then start on whole words), otherwise f32. */
export interface RowWords {
  count: number;
  width: 1 | 4;
  type: "vec4<f32>" | "f32";
}

export function rowWords(cols: number): RowWords {
  return cols % 4 === 0 ? { count: cols / 4, width: 4, type: "vec4<f32>" } : { count: cols, width: 1, type: "f32" };
}

/** True when a row kernel for this layout and width should keep each row in registers. */
export function keepsRowInRegisters(layout: RowLayout, cols: number): boolean {
  return layout.lanes === 1 && cols > 0 && cols <= MAX_REGISTER_COLUMNS;
}

/** `line(k)` for every word k of the row, one statement per line. */
export function perWord(words: RowWords, line: (k: number) => string): string {
  return Array.from({ length: words.count }, (_, k) => line(k)).join("\n  ");
}

/** `term(0) op term(1) op ...` over the words, as a balanced tree (shorter dependency chains, smaller rounding). */
export function wordTree(words: RowWords, op: (a: string, b: string) => string, term: (k: number) => string): string {
  return tree(words.count, op, term);
}

/** WGSL expression: the sum of the components of a word-typed expression. */
export function wordSum(words: RowWords, v: string): string {
  return words.width === 4 ? `dot(${v}, vec4<f32>(1.0))` : v;
}

/** WGSL expression: the largest component of a word-typed expression. */
export function wordMax(words: RowWords, v: string): string {
  return words.width === 4 ? `max(max(${v}.x, ${v}.y), max(${v}.z, ${v}.w))` : v;
}

/** WGSL expression: true for the components of word k whose column is below `limit` (a u32 expression). */
export function wordColumnBelow(words: RowWords, k: number, limit: string): string {
  return words.width === 4
    ? `(vec4<u32>(${4 * k}u, ${4 * k + 1}u, ${4 * k + 2}u, ${4 * k + 3}u) < vec4<u32>(${limit}))`
    : `(${k}u < ${limit})`;
}

/**
 * Rows of a width that is not a multiple of 4, taken `count` at a time so that every group starts on a whole vec4 word
 * and spans `words` of them: 4 rows of 65 columns are 65 aligned words, where one row alone would need 65 scalar
 * loads. Element e of the group (row e / cols, column e % cols) is component e % 4 of word e / 4, known when the
 * kernel is generated. Used when the row count is a multiple of the group size.
 */
export interface RowGroup {
  count: number;
  words: number;
}

export function rowGroup(cols: number): RowGroup {
  const count = cols % 4 === 0 ? 1 : cols % 2 === 0 ? 2 : 4;
  return { count, words: count * cols / 4 };
}

/** True when a register kernel should load this shape by row groups (see RowGroup). */
export function loadsRowGroups(layout: RowLayout, rows: number, cols: number): boolean {
  const group = rowGroup(cols);
  return keepsRowInRegisters(layout, cols) && group.count > 1 && rows % group.count === 0;
}

/** WGSL expression for element `e` of a row group whose words are named `${prefix}0`, `${prefix}1`, ... */
export function groupElement(prefix: string, e: number): string {
  return `${prefix}${e >> 2}.${"xyzw"[e & 3]}`;
}

/** A balanced tree `op`-combining term(0..n-1). */
export function tree(n: number, op: (a: string, b: string) => string, term: (i: number) => string): string {
  const build = (lo: number, hi: number): string =>
    hi - lo === 1 ? term(lo) : op(build(lo, (lo + hi) >> 1), build((lo + hi) >> 1, hi));
  return build(0, n);
}

/**
 * A complete register-row kernel (CPU layout only): `body` runs once per row (or row group) with its index `row` in
 * scope (always valid: there are no barriers, so padding invocations return first).
 */
export function registerRowKernelWgsl(count: number, layout: RowLayout, bindings: string, body: string): string {
  if (layout.lanes !== 1) throw new Error("registerRowKernelWgsl: needs the one-invocation-per-row layout");
  return `${LINEAR_WORKGROUP_WGSL}
${bindings}
@compute @workgroup_size(${layout.rowsPerGroup})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lidx: u32) {
  let row = linear_workgroup(wid, nwg) * ${layout.rowsPerGroup}u + lidx;
  if (row >= ${count}u) { return; }
  ${body}
}`;
}

/** Workgroups of a row kernel of this shape and layout (row-group kernels take several rows per invocation). */
export function rowKernelWorkgroups(rows: number, cols: number, layout: RowLayout): number {
  const perInvocation = loadsRowGroups(layout, rows, cols) ? rowGroup(cols).count : 1;
  return Math.ceil(rows / perInvocation / layout.rowsPerGroup);
}
