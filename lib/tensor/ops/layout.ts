import {
  type AxisBlock,
  blockInvocations,
  coalescePermutation,
  extractBlockKernel,
  insertBlockKernel,
  keepsInnerAxis,
  padBlockKernel,
  padInvocations,
  permuteInvocations,
  permuteKernel,
  permuteRowsInvocations,
  permuteRowsKernel,
} from "../../../kernels/layout.ts";
import { elementGroups } from "../../../kernels/grid.ts";
import { record } from "../autograd.ts";
import { copyOf, empty, markZeroOutside } from "../create.ts";
import { type Shape, shapeString, type Tensor } from "../tensor.ts";
import { prefersCpuKernels } from "./strategy.ts";

const MAX_PERMUTE_RANK = 6;

function normaliseAxis(axis: number, rank: number, op: string): number {
  const a = axis < 0 ? axis + rank : axis;
  if (!Number.isInteger(a) || a < 0 || a >= rank) {
    throw new Error(`${op}: axis ${axis} is out of range for rank ${rank}`);
  }
  return a;
}

/** Records the permutation without autograd (the backward pass uses it with the inverse axes). */
function permuteForward(x: Tensor, axes: readonly number[], cpuKernels: boolean): Tensor {
  const out = empty(x.gpu, axes.map((a) => x.shape[a]), x.dtype);
  if (x.size === 0) return out;
  const small = coalescePermutation(x.shape, axes);
  if (small.axes.every((a, i) => a === i)) {
    x.gpu.copyBuffer(x.buffer, 0, out.buffer, 0, x.byteLength);
  } else if (cpuKernels && keepsInnerAxis(small.axes)) {
    x.gpu.dispatch(
      permuteRowsKernel(small.shape, small.axes),
      [x.buffer, out.buffer],
      elementGroups(permuteRowsInvocations(small.shape)),
    );
  } else {
    x.gpu.dispatch(
      permuteKernel(small.shape, small.axes),
      [x.buffer, out.buffer],
      elementGroups(permuteInvocations(small.shape, small.axes)),
    );
  }
  return out;
}

/**
 * Reorders the axes (rank <= 6): out.shape[d] = x.shape[axes[d]], as torch.permute. Negative axes count from the end.
 * The result is a new dense tensor; the gradient is permuted back with the inverse order.
 */
export function permute(x: Tensor, axes: readonly number[]): Tensor {
  if (x.rank > MAX_PERMUTE_RANK) throw new Error(`permute: rank ${x.rank} of ${x} is above ${MAX_PERMUTE_RANK}`);
  const order = axes.map((a) => normaliseAxis(a, x.rank, "permute"));
  if (order.length !== x.rank || new Set(order).size !== x.rank) {
    throw new Error(`permute: [${axes}] is not a permutation of the ${x.rank} axes of ${x}`);
  }
  const inverse = new Array<number>(order.length);
  order.forEach((a, d) => inverse[a] = d);
  const cpuKernels = prefersCpuKernels(x.gpu);
  const out = permuteForward(x, order, cpuKernels);
  return record(out, "permute", [x], (g) => [permuteForward(g, inverse, cpuKernels)]);
}

/** Swaps two axes. */
export function transpose(x: Tensor, a: number, b: number): Tensor {
  const axes = x.shape.map((_, d) => d);
  const i = normaliseAxis(a, x.rank, "transpose");
  const j = normaliseAxis(b, x.rank, "transpose");
  [axes[i], axes[j]] = [axes[j], axes[i]];
  return permute(x, axes);
}

function blockAround(shape: Shape, axis: number, offset: number, blockMid: number): AxisBlock {
  return {
    outer: shape.slice(0, axis).reduce((p, d) => p * d, 1),
    mid: shape[axis],
    inner: shape.slice(axis + 1).reduce((p, d) => p * d, 1),
    offset,
    blockMid,
  };
}

/**
 * When nothing lies outside the axis (outer = 1), a block is one contiguous byte range of the whole tensor: moved by
 * buffer copies and clears (memcpy and memset on the CPU fallback, many times faster than any kernel there).
 */
function isContiguous(b: AxisBlock): boolean {
  return b.outer === 1;
}

/** whole[..., offset:offset+n, ...] along `axis` as a new tensor (no autograd). */
function extract(whole: Tensor, axis: number, offset: number, n: number): Tensor {
  const shape = whole.shape.map((d, i) => i === axis ? n : d);
  const out = empty(whole.gpu, shape, whole.dtype);
  if (out.size === 0) return out;
  const block = blockAround(whole.shape, axis, offset, n);
  if (isContiguous(block)) {
    whole.gpu.copyBuffer(whole.buffer, 4 * offset * block.inner, out.buffer, 0, out.byteLength);
  } else {
    whole.gpu.dispatch(extractBlockKernel(block), [whole.buffer, out.buffer], elementGroups(blockInvocations(block)));
  }
  return out;
}

/** A tensor of `shape` that is zero except for `block`'s entries, which come from `g` (the backward of a slice). */
function pad(g: Tensor, shape: Shape, block: AxisBlock): Tensor {
  const whole = empty(g.gpu, shape, g.dtype);
  if (whole.size === 0) return whole;
  if (isContiguous(block)) {
    const start = 4 * block.offset * block.inner;
    const end = start + g.byteLength;
    g.gpu.withEncoder((e) => {
      if (start > 0) e.clearBuffer(whole.buffer, 0, start);
      if (end < whole.byteLength) e.clearBuffer(whole.buffer, end, whole.byteLength - end);
    });
    if (g.size > 0) g.gpu.copyBuffer(g.buffer, 0, whole.buffer, start, g.byteLength);
    // Slices of one tensor (attention's q, k, v) each pad their gradient; the sum of those then adds only blocks.
    markZeroOutside(whole, block.offset * block.inner, g.size);
  } else {
    g.gpu.dispatch(padBlockKernel(block), [g.buffer, whole.buffer], elementGroups(padInvocations(block)));
  }
  return whole;
}

/**
 * Joins tensors along `axis`; all other axes must agree, as must the dtypes. Each input's gradient is its slice of
 * the output's gradient.
 */
export function concat(tensors: readonly Tensor[], axis: number): Tensor {
  if (tensors.length === 0) throw new Error("concat: needs at least one tensor");
  const first = tensors[0];
  const ax = normaliseAxis(axis, first.rank, "concat");
  for (const t of tensors) {
    const same = t.rank === first.rank && t.dtype === first.dtype &&
      t.shape.every((d, i) => i === ax || d === first.shape[i]);
    if (!same) {
      throw new Error(
        `concat: ${t} does not match ${first} outside axis ${axis}; shapes ${
          tensors.map((u) => shapeString(u.shape)).join(" ")
        }`,
      );
    }
  }
  const offsets: number[] = [];
  let total = 0;
  for (const t of tensors) {
    offsets.push(total);
    total += t.shape[ax];
  }
  const outShape = first.shape.map((d, i) => i === ax ? total : d);
  const out = empty(first.gpu, outShape, first.dtype);
  tensors.forEach((t, k) => {
    if (t.size === 0) return;
    const block = blockAround(outShape, ax, offsets[k], t.shape[ax]);
    if (isContiguous(block)) t.gpu.copyBuffer(t.buffer, 0, out.buffer, 4 * offsets[k] * block.inner, t.byteLength);
    else t.gpu.dispatch(insertBlockKernel(block), [t.buffer, out.buffer], elementGroups(blockInvocations(block)));
  });
  return record(
    out,
    "concat",
    tensors,
    (g) => tensors.map((t, k) => t.requiresGrad ? extract(g, ax, offsets[k], t.shape[ax]) : null),
  );
}

/**
 * Entries start..end-1 along `axis` (negative values count from the end, as in Python), as a new tensor. The
 * gradient is the output's gradient placed into zeros of the input's shape.
 */
export function slice(
  x: Tensor,
  axis: number,
  start: number,
  end: number = x.shape[normaliseAxis(axis, x.rank, "slice")],
): Tensor {
  const ax = normaliseAxis(axis, x.rank, "slice");
  const size = x.shape[ax];
  const from = start < 0 ? start + size : start;
  const to = end < 0 ? end + size : end;
  if (!Number.isInteger(from) || !Number.isInteger(to) || from < 0 || to > size || from > to) {
    throw new Error(`slice: [${start}, ${end}) is not a range of axis ${axis} (size ${size}) of ${x}`);
  }
  if (from === 0 && to === size) {
    const out = copyOf(x);
    return record(out, "slice", [x], (g) => [g]);
  }
  const out = extract(x, ax, from, to - from);
  return record(out, "slice", [x], (g) => [pad(g, x.shape, blockAround(x.shape, ax, from, to - from))]);
}
