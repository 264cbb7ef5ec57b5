// Data movement: axis permutation and block copies along one axis (slice, concat and their gradients). Elements are
// moved as 32-bit words, so these kernels serve every 4-byte dtype. Shapes and offsets are baked in.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { contiguousStrides } from "./elementwise.ts";
import { gridWgsl } from "./grid.ts";

/**
 * The smallest equivalent problem: size-1 axes dropped and runs of input axes that stay adjacent and in order
 * merged. permute([B,T,H,D], [0,2,1,3]) stays 4-D, but [0,1,3,2] on [B,T,H,D] becomes [B*T,H,D] with [0,2,1].
 */
export function coalescePermutation(
  shape: readonly number[],
  axes: readonly number[],
): { shape: number[]; axes: number[] } {
  // Size-1 axes hold no data: drop them and number the others by their input order.
  const compact = new Map<number, number>();
  shape.forEach((d, a) => d !== 1 && compact.set(a, compact.size));
  const kept = axes.filter((a) => shape[a] !== 1);
  // Runs of output axes whose input axes are consecutive.
  const runs: number[][] = [];
  for (const a of kept) {
    const last = runs[runs.length - 1];
    if (last && compact.get(last[last.length - 1])! + 1 === compact.get(a)) last.push(a);
    else runs.push([a]);
  }
  const byInputOrder = runs.map((r, i) => ({ first: r[0], size: r.reduce((p, a) => p * shape[a], 1), outPos: i }))
    .sort((p, q) => p.first - q.first);
  const inPosOfRun = new Array<number>(runs.length);
  byInputOrder.forEach((r, inPos) => inPosOfRun[r.outPos] = inPos);
  return { shape: byInputOrder.map((r) => r.size), axes: inPosOfRun };
}

/**
 * Words moved per invocation: 4 (as one vec4) when the innermost axis stays innermost and its length is a multiple
 * of 4, as in attention's head split [B,T,H,D] -> [B,H,T,D]; a quarter of the invocations and index arithmetic.
 */
function permuteVectorWidth(shape: readonly number[], axes: readonly number[]): number {
  const last = shape.length - 1;
  return axes[last] === last && shape[last] % 4 === 0 ? 4 : 1;
}

/** Invocations of `permuteKernel` for this (coalesced) problem. */
export function permuteInvocations(shape: readonly number[], axes: readonly number[]): number {
  return shape.reduce((p, d) => p * d, 1) / permuteVectorWidth(shape, axes);
}

/** out = x with its axes reordered: out.shape[d] = shape[axes[d]]. Expects a coalesced problem. */
export function permuteKernel(shape: readonly number[], axes: readonly number[]): Kernel {
  const width = permuteVectorWidth(shape, axes);
  const words = shape.map((d, a) => a === shape.length - 1 ? d / width : d);
  const inStrides = contiguousStrides(words);
  const outShape = axes.map((a) => words[a]);
  const lines = ["var rem = i;", "var src = 0u;"];
  for (let d = outShape.length - 1; d >= 0; d--) {
    lines.push(`src += (rem % ${outShape[d]}u) * ${inStrides[axes[d]]}u;`);
    if (d > 0) lines.push(`rem = rem / ${outShape[d]}u;`);
  }
  const word = width === 4 ? "vec4<u32>" : "u32";
  return {
    key: `permute/${shape}/${axes}`,
    wgsl: () =>
      gridWgsl(
        permuteInvocations(shape, axes),
        `@group(0) @binding(0) var<storage, read> x: array<${word}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word}>;`,
        `${lines.join("\n  ")}
  out[i] = x[src];`,
      ),
  };
}

/** True when the innermost axis stays innermost, so the permutation moves whole contiguous rows of it. */
export function keepsInnerAxis(axes: readonly number[]): boolean {
  return axes[axes.length - 1] === axes.length - 1;
}

/** Invocations of `permuteRowsKernel`: one per row of the innermost axis. */
export function permuteRowsInvocations(shape: readonly number[]): number {
  return shape.reduce((p, d) => p * d, 1) / shape[shape.length - 1];
}

/**
 * The same permutation for the CPU fallback, where the cost per invocation dominates: one invocation per row of the
 * innermost axis (which must stay innermost) computes the row's two addresses once and copies it in a loop, as vec4
 * words when its length allows. Measured 2x faster than `permuteKernel` on lavapipe for attention's head split; on
 * GPUs neighbouring invocations would read far-apart rows, so they get `permuteKernel`.
 */
export function permuteRowsKernel(shape: readonly number[], axes: readonly number[]): Kernel {
  if (!keepsInnerAxis(axes)) throw new Error(`permuteRowsKernel: axes [${axes}] move the innermost axis`);
  const last = shape.length - 1;
  const width = shape[last] % 4 === 0 ? 4 : 1;
  const rowWords = shape[last] / width;
  const rowStrides = contiguousStrides(shape.slice(0, last));
  const outRows = axes.slice(0, last).map((a) => shape[a]);
  const lines = ["var rem = i;", "var src = 0u;"];
  for (let d = outRows.length - 1; d >= 0; d--) {
    lines.push(`src += (rem % ${outRows[d]}u) * ${rowStrides[axes[d]]}u;`);
    if (d > 0) lines.push(`rem = rem / ${outRows[d]}u;`);
  }
  const word = width === 4 ? "vec4<u32>" : "u32";
  return {
    key: `permute_rows/${shape}/${axes}`,
    wgsl: () =>
      gridWgsl(
        permuteRowsInvocations(shape),
        `@group(0) @binding(0) var<storage, read> x: array<${word}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word}>;`,
        `${lines.join("\n  ")}
  let src_word = src * ${rowWords}u;
  let dst_word = i * ${rowWords}u;
  for (var k = 0u; k < ${rowWords}u; k++) { out[dst_word + k] = x[src_word + k]; }`,
      ),
  };
}

/**
 * A tensor viewed as [outer, mid, inner] around one axis, and a block of `blockMid` entries of that axis starting at
 * `offset`: the geometry shared by slice, concat and their gradients.
 */
export interface AxisBlock {
  outer: number;
  mid: number;
  inner: number;
  offset: number;
  blockMid: number;
}

function blockKey(b: AxisBlock): string {
  return `${b.outer}/${b.mid}/${b.inner}/${b.offset}/${b.blockMid}`;
}

/**
 * Words of the block kernels: a vec4 of 4 elements when the inner size is a multiple of 4 (every block boundary is
 * then a whole word), otherwise one element. Loads dominate these kernels on the CPU fallback, where a vec4 load costs
 * about what a scalar one does.
 */
function blockWord(b: AxisBlock): { width: number; type: string } {
  return b.inner % 4 === 0 ? { width: 4, type: "vec4<u32>" } : { width: 1, type: "u32" };
}

/** Invocations of `extractBlockKernel` and `insertBlockKernel` (one per word of the block). */
export function blockInvocations(b: AxisBlock): number {
  return b.outer * b.blockMid * b.inner / blockWord(b).width;
}

/** Invocations of `padBlockKernel` (one per word of the whole tensor). */
export function padInvocations(b: AxisBlock): number {
  return b.outer * b.mid * b.inner / blockWord(b).width;
}

/** WGSL: `big` = the index in the whole tensor of word `i` of the dense block. */
function blockToWhole(b: AxisBlock): string {
  const inner = b.inner / blockWord(b).width;
  return `let big = (i / ${b.blockMid * inner}u) * ${b.mid * inner}u + ${b.offset * inner}u + i % ${
    b.blockMid * inner
  }u;`;
}

/** block = whole[:, offset:offset+blockMid, :] (slice forward, concat backward). */
export function extractBlockKernel(b: AxisBlock): Kernel {
  const { type } = blockWord(b);
  return {
    key: `block_extract/${blockKey(b)}`,
    wgsl: () =>
      gridWgsl(
        blockInvocations(b),
        `@group(0) @binding(0) var<storage, read> whole: array<${type}>;
@group(0) @binding(1) var<storage, read_write> block: array<${type}>;`,
        `${blockToWhole(b)}
  block[i] = whole[big];`,
      ),
  };
}

/** whole[:, offset:offset+blockMid, :] = block, leaving the rest of `whole` as it is (concat forward). */
export function insertBlockKernel(b: AxisBlock): Kernel {
  const { type } = blockWord(b);
  return {
    key: `block_insert/${blockKey(b)}`,
    wgsl: () =>
      gridWgsl(
        blockInvocations(b),
        `@group(0) @binding(0) var<storage, read> block: array<${type}>;
@group(0) @binding(1) var<storage, read_write> whole: array<${type}>;`,
        `${blockToWhole(b)}
  whole[big] = block[i];`,
      ),
  };
}

/**
 * whole = zeros with the block written at its place, in one pass (slice backward). Words outside the block are only
 * stored, never loaded.
 */
export function padBlockKernel(b: AxisBlock): Kernel {
  const { width, type } = blockWord(b);
  const inner = b.inner / width;
  return {
    key: `block_pad/${blockKey(b)}`,
    wgsl: () =>
      gridWgsl(
        padInvocations(b),
        `@group(0) @binding(0) var<storage, read> block: array<${type}>;
@group(0) @binding(1) var<storage, read_write> whole: array<${type}>;`,
        `let m = (i / ${inner}u) % ${b.mid}u;
  // Bit pattern 0 is 0.0 and 0i alike.
  var word = ${type}(0u);
  if (m >= ${b.offset}u && m < ${b.offset + b.blockMid}u) {
    word = block[(i / ${b.mid * inner}u) * ${b.blockMid * inner}u + (m - ${b.offset}u) * ${inner}u + i % ${inner}u];
  }
  whole[i] = word;`,
      ),
  };
}
