import {
  binaryKernel,
  type BinaryOp,
  broadcastStrides,
  chunkCount,
  type ChunkSum,
  chunkSumKernel,
  chunkSumWorkgroups,
  elementGroups,
  unaryBackwardKernel,
  unaryKernel,
  type UnaryOp,
} from "../../../kernels/elementwise.ts";
import { record } from "../autograd.ts";
import { empty, emptyLike, full, linearCombination } from "../create.ts";
import { persist, type Shape, shapeString, Tensor } from "../tensor.ts";

export function broadcastShapes(a: Shape, b: Shape): number[] {
  const rank = Math.max(a.length, b.length);
  const out: number[] = [];
  for (let d = 0; d < rank; d++) {
    const x = a[d - rank + a.length] ?? 1;
    const y = b[d - rank + b.length] ?? 1;
    if (x !== y && x !== 1 && y !== 1) {
      throw new Error(`shapes ${shapeString(a)} and ${shapeString(b)} do not broadcast`);
    }
    out.push(x === 1 ? y : x);
  }
  return out;
}

// ---- sums over axes ----

// A pass gives each output word its own chunk of rows: enough chunks that about this many invocations share the
// work, each summing at least MIN_ROWS_PER_CHUNK rows; at most SINGLE_PASS_ROWS rows are summed in one pass.
const TARGET_INVOCATIONS = 16384;
const MIN_ROWS_PER_CHUNK = 64;
const SINGLE_PASS_ROWS = 256;

/** Rows per chunk for one pass over [outer, rows, cols]. */
function rowsPerChunk(outer: number, rows: number, cols: number): number {
  const words = outer * (cols % 4 === 0 ? cols / 4 : cols);
  if (rows <= SINGLE_PASS_ROWS || words >= TARGET_INVOCATIONS) return rows;
  const perChunk = Math.max(MIN_ROWS_PER_CHUNK, Math.ceil(rows / Math.ceil(TARGET_INVOCATIONS / words)));
  // A single column reads runs of 4 rows as one word when chunks start on whole words.
  return cols === 1 ? Math.ceil(perChunk / 4) * 4 : perChunk;
}

/** The shape with size-1 axes dropped and neighbouring axes of the same kind (summed or kept) merged. */
function mergeAxes(shape: Shape, reduced: readonly boolean[]): { sizes: number[]; summed: boolean[] } {
  const sizes: number[] = [];
  const summed: boolean[] = [];
  shape.forEach((d, i) => {
    if (d === 1) return;
    if (summed.length && summed[summed.length - 1] === reduced[i]) sizes[sizes.length - 1] *= d;
    else {
      sizes.push(d);
      summed.push(reduced[i]);
    }
  });
  return { sizes, summed };
}

/**
 * Sums over the marked axes of `a` (removed from the result); `scale` multiplies the result (mean = 1/count).
 * The innermost summed axis goes first, as [outer, rows, cols] with rows summed in chunks, pass after pass, until one
 * chunk is left; then the next summed axis. The order of additions is fixed, so results are deterministic.
 */
export function sumAxesForward(a: Tensor, reduced: readonly boolean[], scale = 1): Tensor {
  const outShape = a.shape.filter((_, d) => !reduced[d]);
  if (a.size === 0) return full(a.gpu, outShape, 0);
  let { sizes, summed } = mergeAxes(a.shape, reduced);
  if (!summed.includes(true)) {
    // Nothing to add up: out = a * scale, as a pass over a single row.
    sizes = [1, a.size];
    summed = [true, false];
  }
  let current = a;
  while (summed.includes(true)) {
    const axis = summed.lastIndexOf(true);
    const outer = sizes.slice(0, axis).reduce((p, d) => p * d, 1);
    const cols = sizes.slice(axis + 1).reduce((p, d) => p * d, 1);
    let rows = sizes[axis];
    const lastAxis = summed.indexOf(true) === axis;
    do {
      const perChunk = rowsPerChunk(outer, rows, cols);
      const pass: ChunkSum = { outer, rows, cols, rowsPerChunk: perChunk, scale: 1 };
      const chunks = chunkCount(pass);
      if (chunks === 1 && lastAxis) pass.scale = scale;
      const next = chunks === 1 && lastAxis ? empty(a.gpu, outShape) : empty(a.gpu, [outer * chunks * cols]);
      a.gpu.dispatch(chunkSumKernel(pass), [current.buffer, next.buffer], chunkSumWorkgroups(pass));
      if (current !== a) current.dispose();
      current = next;
      rows = chunks;
    } while (rows > 1);
    ({ sizes, summed } = mergeAxes(sizes.filter((_, d) => d !== axis), summed.filter((_, d) => d !== axis)));
  }
  return current;
}

/** Sums a broadcast gradient back to the operand's shape. */
export function sumToShape(g: Tensor, shape: Shape): Tensor {
  if (g.shape.length === shape.length && g.shape.every((d, i) => d === shape[i])) return g;
  const offset = g.shape.length - shape.length;
  const reduced = g.shape.map((d, i) => i < offset || (shape[i - offset] === 1 && d !== 1));
  const summed = sumAxesForward(g, reduced);
  const out = summed.view(shape);
  summed.dispose();
  return out;
}

/** Expands `g` (shape `from`) back over the reduced axes to `to` by broadcasting: the backward of a sum. */
function broadcastTo(g: Tensor, to: Shape, reduced: readonly boolean[], scale: number): Tensor {
  const keptShape = to.map((d, i) => reduced[i] ? 1 : d);
  const out = empty(g.gpu, to);
  // out = 0 + g * scale, with g broadcast: reuse the binary kernel with a zero-stride operand.
  const gStrides = broadcastStrides(keptShape, to);
  g.gpu.dispatch(
    binaryKernel("mul", to, gStrides, to.map(() => 0)),
    [g.buffer, scalarBuffer(g, scale), out.buffer],
    elementGroups(out.size),
  );
  return out;
}

const scalarCache = new WeakMap<object, Map<number, Tensor>>();
/** A persistent one-element tensor holding `value` (shared per runtime). */
function scalarBuffer(like: Tensor, value: number): GPUBuffer {
  let m = scalarCache.get(like.gpu);
  if (!m) scalarCache.set(like.gpu, m = new Map());
  let t = m.get(value);
  if (!t) {
    // Runtime-lifetime constants, detached from every scope; filled by a dispatch so that no upload splits a step.
    t = persist(full(like.gpu, [1], value));
    m.set(value, t);
  }
  return t.buffer;
}

function normaliseAxis(axis: number, rank: number): number {
  const a = axis < 0 ? axis + rank : axis;
  if (a < 0 || a >= rank) throw new Error(`axis ${axis} out of range for rank ${rank}`);
  return a;
}

/** Sum over one axis (or all axes when `axis` is undefined). */
export function sum(a: Tensor, axis?: number, scale = 1): Tensor {
  const reduced = axis === undefined
    ? a.shape.map(() => true)
    : a.shape.map((_, d) => d === normaliseAxis(axis, a.rank));
  const out = sumAxesForward(a, reduced, scale);
  return record(out, "sum", [a], (g) => [broadcastTo(g, a.shape, reduced, scale)]);
}

/** Mean over one axis (or all axes). */
export function mean(a: Tensor, axis?: number): Tensor {
  const count = axis === undefined ? a.size : a.shape[normaliseAxis(axis, a.rank)];
  return sum(a, axis, 1 / count);
}

// ---- binary ops with broadcasting ----

function binaryForward(op: BinaryOp, a: Tensor, b: Tensor): Tensor {
  const shape = broadcastShapes(a.shape, b.shape);
  const out = empty(a.gpu, shape);
  a.gpu.dispatch(
    binaryKernel(op, shape, broadcastStrides(a.shape, shape), broadcastStrides(b.shape, shape)),
    [a.buffer, b.buffer, out.buffer],
    elementGroups(out.size),
  );
  return out;
}

export function add(a: Tensor, b: Tensor): Tensor {
  const out = binaryForward("add", a, b);
  return record(out, "add", [a, b], (g) => [
    a.requiresGrad ? sumToShape(g, a.shape) : null,
    b.requiresGrad ? sumToShape(g, b.shape) : null,
  ]);
}

export function sub(a: Tensor, b: Tensor): Tensor {
  const out = binaryForward("sub", a, b);
  return record(out, "sub", [a, b], (g) => [
    a.requiresGrad ? sumToShape(g, a.shape) : null,
    b.requiresGrad ? reduceOwned(linearCombination(g, -1), b.shape) : null,
  ]);
}

export function mul(a: Tensor, b: Tensor): Tensor {
  const out = binaryForward("mul", a, b);
  return record(out, "mul", [a, b], (g) => [
    a.requiresGrad ? reduceOwned(binaryForward("mul", g, b), a.shape) : null,
    b.requiresGrad ? reduceOwned(binaryForward("mul", g, a), b.shape) : null,
  ]);
}

export function div(a: Tensor, b: Tensor): Tensor {
  const out = binaryForward("div", a, b);
  return record(out, "div", [a, b], (g) => {
    const ga = a.requiresGrad ? reduceOwned(binaryForward("div", g, b), a.shape) : null;
    let gb: Tensor | null = null;
    if (b.requiresGrad) {
      // d(a/b)/db = -out / b
      const t = binaryForward("div", out, b);
      const u = binaryForward("mul", g, t);
      t.dispose();
      const neg = linearCombination(u, -1);
      u.dispose();
      gb = reduceOwned(neg, b.shape);
    }
    return [ga, gb];
  });
}

/** sumToShape for a temporary gradient: frees the temporary when a reduction made a new tensor. */
function reduceOwned(g: Tensor, shape: Shape): Tensor {
  const r = sumToShape(g, shape);
  if (r !== g) g.dispose();
  return r;
}

/** a * alpha for a constant alpha. */
export function scale(a: Tensor, alpha: number): Tensor {
  const out = linearCombination(a, alpha);
  return record(out, "scale", [a], (g) => [linearCombination(g, alpha)]);
}

// ---- unary maps ----

export function unary(op: UnaryOp, a: Tensor): Tensor {
  const out = emptyLike(a);
  a.gpu.dispatch(unaryKernel(op, a.size), [a.buffer, out.buffer], elementGroups(a.size));
  return record(out, op, [a], (g) => {
    const ga = emptyLike(a);
    a.gpu.dispatch(unaryBackwardKernel(op, a.size), [a.buffer, out.buffer, g.buffer, ga.buffer], elementGroups(a.size));
    return [ga];
  });
}

export const exp = (a: Tensor) => unary("exp", a);
export const gelu = (a: Tensor) => unary("gelu", a);
export const quickGelu = (a: Tensor) => unary("quick_gelu", a);
export const relu = (a: Tensor) => unary("relu", a);

/** Reinterprets the shape (no copy). Gradients flow through unchanged. */
export function reshape(a: Tensor, shape: Shape): Tensor {
  const known = shape.filter((d) => d !== -1).reduce((p, d) => p * d, 1);
  const resolved = shape.map((d) => d === -1 ? a.size / known : d);
  const out = a.view(resolved);
  return record(out, "reshape", [a], (g) => [g.view(a.shape)]);
}
