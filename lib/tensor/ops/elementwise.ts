import {
  binaryKernel,
  type BinaryOp,
  broadcastStrides,
  elementGroups,
  sumAxesKernel,
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

/** Sums over the marked axes of `a` (removed from the result); `scale` multiplies the result (mean = 1/count). */
export function sumAxesForward(a: Tensor, reduced: readonly boolean[], scale = 1): Tensor {
  const outShape = a.shape.filter((_, d) => !reduced[d]);
  const out = empty(a.gpu, outShape);
  const n = out.size;
  a.gpu.dispatch(sumAxesKernel(a.shape, reduced, scale), [a.buffer, out.buffer], elementGroups(n));
  return out;
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
