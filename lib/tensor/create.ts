import type { Gpu } from "../gpu/runtime.ts";
import { accumulateKernel, elementGroups, fillKernel, linearCombinationKernel } from "../../kernels/elementwise.ts";
import { type DType, type Shape, shapeString, sizeOf, Tensor } from "./tensor.ts";

/** An uninitialised tensor from the buffer pool. */
export function empty(gpu: Gpu, shape: Shape, dtype: DType = "f32"): Tensor {
  return new Tensor(gpu, gpu.pool.acquire(sizeOf(shape) * 4), shape, dtype);
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

/** Uploads host data. The shape must match the data's length. */
export function fromArray(gpu: Gpu, data: ArrayLike<number> | Float32Array | Int32Array, shape: Shape): Tensor {
  const dtype: DType = data instanceof Int32Array ? "i32" : "f32";
  if (sizeOf(shape) !== data.length) {
    throw new Error(`fromArray: ${data.length} values do not fill shape ${shapeString(shape)}`);
  }
  const view = data instanceof Float32Array || data instanceof Int32Array ? data : Float32Array.from(data);
  return new Tensor(gpu, gpu.upload(view), shape, dtype);
}

export function copyOf(t: Tensor): Tensor {
  const out = emptyLike(t);
  t.gpu.copyBuffer(t.buffer, 0, out.buffer, 0, t.byteLength);
  return out;
}

/** dst += src in place (gradient accumulation). */
export function addInto(dst: Tensor, src: Tensor): void {
  if (dst.size !== src.size) throw new Error(`addInto: ${dst} and ${src} differ in size`);
  dst.gpu.dispatch(accumulateKernel(dst.size), [dst.buffer, src.buffer], elementGroups(dst.size));
}

/** alpha * a (+ beta * b), no autograd: a building block for optimizers and backward rules. */
export function linearCombination(a: Tensor, alpha: number, b?: Tensor, beta = 0): Tensor {
  const out = emptyLike(a);
  const bindings = b ? [a.buffer, b.buffer, out.buffer] : [a.buffer, out.buffer];
  a.gpu.dispatch(linearCombinationKernel(a.size, alpha, b ? beta : null), bindings, elementGroups(a.size));
  return out;
}
