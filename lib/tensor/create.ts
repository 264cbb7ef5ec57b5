import type { Gpu } from "../gpu/runtime.ts";
import {
  accumulateKernel,
  accumulateRangeKernel,
  elementGroups,
  fillKernel,
  linearCombinationKernel,
} from "../../kernels/elementwise.ts";
import { type DType, type Shape, shapeString, sizeOf, storageBytes, Tensor } from "./tensor.ts";

/** An uninitialised tensor from the buffer pool. */
export function empty(gpu: Gpu, shape: Shape, dtype: DType = "f32"): Tensor {
  return new Tensor(gpu, gpu.pool.acquire(storageBytes(sizeOf(shape), dtype)), shape, dtype);
}

export function emptyLike(t: Tensor): Tensor {
  return empty(t.gpu, t.shape, t.dtype);
}

export function full(gpu: Gpu, shape: Shape, value: number, dtype: DType = "f32"): Tensor {
  const t = empty(gpu, shape, dtype);
  gpu.dispatch(fillKernel(t.size, value, dtype), [t.buffer], elementGroups(t.size));
  return t;
}

export function zeros(gpu: Gpu, shape: Shape, dtype: DType = "f32"): Tensor {
  return full(gpu, shape, 0, dtype);
}

export function fullLike(t: Tensor, value: number): Tensor {
  return full(t.gpu, t.shape, value, t.dtype);
}

/** Uploads host data (Int32Array: i32, Float16Array: f16, anything else: f32). The shape must match its length. */
export function fromArray(
  gpu: Gpu,
  data: ArrayLike<number> | Float32Array | Float16Array | Int32Array,
  shape: Shape,
): Tensor {
  const dtype: DType = data instanceof Int32Array ? "i32" : data instanceof Float16Array ? "f16" : "f32";
  if (sizeOf(shape) !== data.length) {
    throw new Error(`fromArray: ${data.length} values do not fill shape ${shapeString(shape)}`);
  }
  let view: ArrayBufferView;
  if (data instanceof Float16Array) {
    // Buffer writes come in whole 4-byte words: an odd count gets one padding half.
    view = data.length % 2 === 0 ? data : Float16Array.from({ length: data.length + 1 }, (_, i) => data[i] ?? 0);
  } else view = data instanceof Float32Array || data instanceof Int32Array ? data : Float32Array.from(data);
  return new Tensor(gpu, gpu.upload(view), shape, dtype);
}

export function copyOf(t: Tensor): Tensor {
  const out = emptyLike(t);
  t.gpu.copyBuffer(t.buffer, 0, out.buffer, 0, t.byteLength);
  return out;
}

/**
 * Tensors known to be zero outside one range of elements (a slice's gradient padded to the whole input), by buffer
 * with the tensor that made the promise: a later tensor on the same pooled buffer, or a write through `addInto`,
 * voids it.
 */
const zeroOutside = new WeakMap<GPUBuffer, { owner: Tensor; first: number; count: number }>();

/**
 * Records that `t` is zero outside elements [first, first + count), so that `addInto(dst, t)` only adds that range.
 * Only for tensors whose other elements are exactly +0 or -0 and that nothing writes afterwards.
 */
export function markZeroOutside(t: Tensor, first: number, count: number): void {
  zeroOutside.set(t.buffer, { owner: t, first, count });
}

/**
 * dst += src in place (gradient accumulation). Where src is known to be zero outside a range, only that range is
 * added: the other elements of dst would get + 0, which leaves every value unchanged (a -0 would become +0).
 */
export function addInto(dst: Tensor, src: Tensor): void {
  if (dst.size !== src.size) throw new Error(`addInto: ${dst} and ${src} differ in size`);
  zeroOutside.delete(dst.buffer);
  const known = zeroOutside.get(src.buffer);
  if (known && known.owner === src && !src.isDisposed) {
    if (known.count > 0) {
      dst.gpu.dispatch(
        accumulateRangeKernel(known.first, known.count),
        [dst.buffer, src.buffer],
        elementGroups(known.count),
      );
    }
    return;
  }
  dst.gpu.dispatch(accumulateKernel(dst.size), [dst.buffer, src.buffer], elementGroups(dst.size));
}

/** alpha * a (+ beta * b), no autograd: a building block for optimizers and backward rules. */
export function linearCombination(a: Tensor, alpha: number, b?: Tensor, beta = 0): Tensor {
  const out = emptyLike(a);
  const bindings = b ? [a.buffer, b.buffer, out.buffer] : [a.buffer, out.buffer];
  a.gpu.dispatch(linearCombinationKernel(a.size, alpha, b ? beta : null), bindings, elementGroups(a.size));
  return out;
}
