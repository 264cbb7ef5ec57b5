// Row gathers by integer index (embedding lookup, one row per batch entry) and their gradients. Indices outside
// their range cannot be reported without a read-back; they are clamped so that no access leaves its tensor.
//
// The embedding gradient sums the upstream rows of every position that looked up the same vocabulary row. WGSL has
// no float atomics, and summing in whatever order threads arrive would not be reproducible, so the positions are
// first sorted by (id, position) with a bitonic network, each id's run of the sorted list is located, and one
// invocation per (vocabulary row, column) sums its run in position order: O(N log^2 N + V*D + N*D) work for N
// positions, deterministic and free of races.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { gridWgsl } from "./grid.ts";

const clampIndex = (expr: string, size: number) => `u32(clamp(${expr}, 0i, ${size - 1}i))`;

/** out[p, :] = weight[ids[p], :] for `positions` ids into a [vocab, dim] table. */
export function embeddingForwardKernel(positions: number, vocab: number, dim: number): Kernel {
  return {
    key: `embedding_fwd/${positions}/${vocab}/${dim}`,
    wgsl: () =>
      gridWgsl(
        positions * dim,
        `@group(0) @binding(0) var<storage, read> weight: array<f32>;
@group(0) @binding(1) var<storage, read> ids: array<i32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;`,
        `out[i] = weight[${clampIndex(`ids[i / ${dim}u]`, vocab)} * ${dim}u + i % ${dim}u];`,
      ),
  };
}

/** The sort's length: a power of two at least 2. Entries past the positions are padding that sorts last. */
export function sortLength(positions: number): number {
  let n = 2;
  while (n < positions) n *= 2;
  return n;
}

/** keys[s] = (id of position s, s); padding entries get (u32 max, u32 max). */
export function sortKeysInitKernel(positions: number, vocab: number): Kernel {
  const length = sortLength(positions);
  return {
    key: `embedding_keys/${positions}/${vocab}`,
    wgsl: () =>
      gridWgsl(
        length,
        `@group(0) @binding(0) var<storage, read> ids: array<i32>;
@group(0) @binding(1) var<storage, read_write> keys: array<vec2<u32>>;`,
        `if (i < ${positions}u) {
    keys[i] = vec2<u32>(${clampIndex("ids[i]", vocab)}, i);
  } else {
    keys[i] = vec2<u32>(0xffffffffu, 0xffffffffu);
  }`,
      ),
  };
}

const KEY_LESS_WGSL = `
fn key_less(a: vec2<u32>, b: vec2<u32>) -> bool { return a.x < b.x || (a.x == b.x && a.y < b.y); }`;

/** Invocations per workgroup of the in-tile sort; a tile holds twice as many keys. */
export function bitonicTileThreads(length: number): number {
  return Math.min(256, length / 2);
}

/**
 * Bitonic stages k = k_first..k_last (uniforms, doubling) restricted to compare distances below the tile size, run
 * in workgroup memory: with k_first = 2 and k_last = tile it sorts every tile; with k_first = k_last = k it finishes
 * stage k after the global steps have handled the distances of a tile or more.
 */
export function bitonicTileKernel(length: number): Kernel {
  const threads = bitonicTileThreads(length);
  const tile = 2 * threads;
  return {
    key: `bitonic_tile/${length}`,
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
${KEY_LESS_WGSL}
struct Stages { k_first: u32, k_last: u32 }
@group(0) @binding(0) var<storage, read_write> keys: array<vec2<u32>>;
@group(0) @binding(1) var<uniform> stages: Stages;
var<workgroup> tile: array<vec2<u32>, ${tile}>;
@compute @workgroup_size(${threads})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let base = linear_workgroup(wid, nwg) * ${tile}u;
  // A folded dispatch (over 65535 tiles) rounds the count up; the whole workgroup leaves together, so no barrier is
  // skipped by some invocations and not others.
  if (base >= ${length}u) { return; }
  let t = lid.x;
  tile[t] = keys[base + t];
  tile[t + ${threads}u] = keys[base + t + ${threads}u];
  workgroupBarrier();
  for (var k = stages.k_first; k <= stages.k_last; k = k << 1u) {
    for (var j = min(k >> 1u, ${threads}u); j > 0u; j = j >> 1u) {
      let lo = (t / j) * 2u * j + t % j;
      let a = tile[lo];
      let b = tile[lo + j];
      if (key_less(b, a) == (((base + lo) & k) == 0u)) {
        tile[lo] = b;
        tile[lo + j] = a;
      }
      workgroupBarrier();
    }
  }
  keys[base + t] = tile[t];
  keys[base + t + ${threads}u] = tile[t + ${threads}u];
}`,
  };
}

/** One compare-exchange step (stage k, distance j: uniforms) over the whole list, for distances of a tile or more. */
export function bitonicStepKernel(length: number): Kernel {
  return {
    key: `bitonic_step/${length}`,
    wgsl: () =>
      gridWgsl(
        length / 2,
        `struct Sweep { k: u32, j: u32 }
@group(0) @binding(0) var<storage, read_write> keys: array<vec2<u32>>;
@group(0) @binding(1) var<uniform> sweep: Sweep;`,
        `let lo = (i / sweep.j) * 2u * sweep.j + i % sweep.j;
  let hi = lo + sweep.j;
  let a = keys[lo];
  let b = keys[hi];
  if (key_less(b, a) == ((lo & sweep.k) == 0u)) {
    keys[lo] = b;
    keys[hi] = a;
  }`,
        KEY_LESS_WGSL,
      ),
  };
}

/**
 * runs[2*id], runs[2*id+1] = the first and one-past-last index of id's entries in the sorted keys. Each boundary is
 * written by the one position where it occurs; ids that do not occur keep the zeros they were filled with.
 */
export function runBoundsKernel(positions: number): Kernel {
  return {
    key: `embedding_runs/${positions}`,
    wgsl: () =>
      gridWgsl(
        positions,
        `@group(0) @binding(0) var<storage, read> keys: array<vec2<u32>>;
@group(0) @binding(1) var<storage, read_write> runs: array<u32>;`,
        `let id = keys[i].x;
  if (i == 0u || keys[i - 1u].x != id) { runs[2u * id] = i; }
  if (i == ${positions - 1}u || keys[i + 1u].x != id) { runs[2u * id + 1u] = i + 1u; }`,
      ),
  };
}

/**
 * dweight[v, d] = sum of g[p, d] over the positions p of id v, in increasing p. When dim is a multiple of 4 each
 * invocation sums four columns as a vec4 (a quarter of the invocations, one run lookup per four columns).
 */
export function embeddingBackwardKernel(vocab: number, dim: number): Kernel {
  const width = dim % 4 === 0 ? 4 : 1;
  const type = width === 4 ? "vec4<f32>" : "f32";
  const rowWidth = dim / width;
  return {
    key: `embedding_bwd/${vocab}/${dim}`,
    wgsl: () =>
      gridWgsl(
        vocab * rowWidth,
        `@group(0) @binding(0) var<storage, read> keys: array<vec2<u32>>;
@group(0) @binding(1) var<storage, read> runs: array<vec2<u32>>;
@group(0) @binding(2) var<storage, read> g: array<${type}>;
@group(0) @binding(3) var<storage, read_write> dweight: array<${type}>;`,
        `let run = runs[i / ${rowWidth}u];
  let d = i % ${rowWidth}u;
  var acc = ${type}(0.0);
  for (var s = run.x; s < run.y; s++) { acc += g[keys[s].y * ${rowWidth}u + d]; }
  dweight[i] = acc;`,
      ),
  };
}

/** Invocations the embedding backward kernel needs. */
export function embeddingBackwardInvocations(vocab: number, dim: number): number {
  return vocab * (dim % 4 === 0 ? dim / 4 : dim);
}

/** out[b, :] = x[b, index[b], :] for x [batch, rows, dim]. */
export function gatherRowsForwardKernel(batch: number, rows: number, dim: number): Kernel {
  return {
    key: `gather_rows_fwd/${batch}/${rows}/${dim}`,
    wgsl: () =>
      gridWgsl(
        batch * dim,
        `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> index: array<i32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;`,
        `let b = i / ${dim}u;
  out[i] = x[(b * ${rows}u + ${clampIndex("index[b]", rows)}) * ${dim}u + i % ${dim}u];`,
      ),
  };
}

/** dx[b, t, :] = g[b, :] where t = index[b], else 0: every element written once, so no zero-fill is needed. */
export function gatherRowsBackwardKernel(batch: number, rows: number, dim: number): Kernel {
  return {
    key: `gather_rows_bwd/${batch}/${rows}/${dim}`,
    wgsl: () =>
      gridWgsl(
        batch * rows * dim,
        `@group(0) @binding(0) var<storage, read> g: array<f32>;
@group(0) @binding(1) var<storage, read> index: array<i32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;`,
        `let b = i / ${rows * dim}u;
  let t = (i / ${dim}u) % ${rows}u;
  dx[i] = select(0.0, g[b * ${dim}u + i % ${dim}u], t == ${clampIndex("index[b]", rows)});`,
      ),
  };
}
