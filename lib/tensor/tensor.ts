import type { Gpu } from "../gpu/runtime.ts";

/** Element types: f16 holds matmul operands under `--precision f16` (every op computes and accumulates in f32). */
export type DType = "f32" | "f16" | "i32";

/** Bytes per element. */
export const DTYPE_BYTES: Record<DType, number> = { f32: 4, f16: 2, i32: 4 };

/** Bytes a tensor of `size` elements occupies: buffers and copies come in whole 4-byte words. */
export function storageBytes(size: number, dtype: DType): number {
  return Math.ceil(size * DTYPE_BYTES[dtype] / 4) * 4;
}
export type Shape = readonly number[];

/** A node of the autograd graph: how to turn the gradient of an op's output into gradients of its inputs. */
export interface GradNode {
  op: string;
  inputs: readonly Tensor[];
  /** Returns one gradient per input (null where an input needs none). Only records GPU work. */
  backward(gradOutput: Tensor): (Tensor | null)[];
}

export function sizeOf(shape: Shape): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

export function shapeString(shape: Shape): string {
  return `[${shape.join(",")}]`;
}

// Tensors that share a buffer (views made by reshape) count their users here; the last one returns it to the pool.
const bufferUsers = new WeakMap<GPUBuffer, number>();

/**
 * A dense row-major tensor in a GPU buffer. Tensors made inside a `Scope` are released when the scope ends unless
 * kept; parameters are made outside any scope and live until disposed.
 */
export class Tensor {
  readonly size: number;
  requiresGrad = false;
  grad: Tensor | null = null;
  node: GradNode | null = null;
  private disposed = false;

  constructor(readonly gpu: Gpu, readonly buffer: GPUBuffer, readonly shape: Shape, readonly dtype: DType = "f32") {
    for (const d of shape) {
      if (!Number.isInteger(d) || d < 0) throw new Error(`invalid tensor shape ${shapeString(shape)}`);
    }
    this.size = sizeOf(shape);
    bufferUsers.set(buffer, (bufferUsers.get(buffer) ?? 0) + 1);
    Scope.current?.track(this);
  }

  get rank(): number {
    return this.shape.length;
  }

  get byteLength(): number {
    return storageBytes(this.size, this.dtype);
  }

  get isDisposed(): boolean {
    return this.disposed;
  }

  /** Returns the buffer to the pool once no other view uses it. Safe to call twice. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    const users = (bufferUsers.get(this.buffer) ?? 1) - 1;
    bufferUsers.set(this.buffer, users);
    if (users === 0) this.gpu.pool.release(this.buffer);
  }

  /** The same data under another shape of equal size, sharing the buffer. */
  view(shape: Shape): Tensor {
    this.assertLive();
    if (sizeOf(shape) !== this.size) {
      throw new Error(`cannot view ${shapeString(this.shape)} as ${shapeString(shape)}: sizes differ`);
    }
    return new Tensor(this.gpu, this.buffer, shape, this.dtype);
  }

  /** The values as f32 (an f16 tensor's values are widened exactly). */
  async read(): Promise<Float32Array> {
    this.assertLive();
    if (this.dtype === "i32") throw new Error("read(): use readInt() for i32 tensors");
    const bytes = await this.gpu.read(this.buffer, this.byteLength);
    if (this.dtype === "f16") return Float32Array.from(new Float16Array(bytes, 0, this.size));
    return new Float32Array(bytes);
  }

  async readInt(): Promise<Int32Array> {
    this.assertLive();
    return new Int32Array(await this.gpu.read(this.buffer, this.byteLength));
  }

  /** Reads a scalar (one-element) tensor. */
  async item(): Promise<number> {
    if (this.size !== 1) throw new Error(`item() needs a one-element tensor, got ${shapeString(this.shape)}`);
    return (await this.read())[0];
  }

  assertLive(): void {
    if (this.disposed) throw new Error(`use of a disposed tensor ${shapeString(this.shape)}`);
  }

  toString(): string {
    return `Tensor(${this.dtype}${shapeString(this.shape)})`;
  }
}

/**
 * Collects the tensors made while it is current, and releases all of them but the kept ones when it ends. Scopes
 * nest; a kept tensor moves to the enclosing scope.
 */
export class Scope {
  static current: Scope | null = null;
  private tensors = new Set<Tensor>();
  readonly parent: Scope | null;

  constructor() {
    this.parent = Scope.current;
    Scope.current = this;
  }

  track(t: Tensor): void {
    this.tensors.add(t);
  }

  /** Stops tracking a tensor here without handing it to the enclosing scope. */
  forget(t: Tensor): void {
    this.tensors.delete(t);
  }

  /** Removes a tensor from this scope so that it outlives it (in the enclosing scope, if any). */
  keep(t: Tensor): Tensor {
    if (this.tensors.delete(t)) this.parent?.track(t);
    return t;
  }

  end(keep: Iterable<Tensor> = []): void {
    for (const t of keep) this.keep(t);
    for (const t of this.tensors) t.dispose();
    this.tensors.clear();
    if (Scope.current === this) Scope.current = this.parent;
  }
}

/** Runs `fn` in a new scope and keeps the tensors it returns (a tensor, an array, or an object of tensors). */
export function tidy<T>(fn: () => T): T {
  const scope = new Scope();
  let result: T;
  try {
    result = fn();
  } catch (e) {
    scope.end();
    throw e;
  }
  if (result instanceof Promise) {
    scope.end();
    throw new Error("tidy() takes a synchronous function: end a Scope yourself around awaits");
  }
  scope.end(tensorsIn(result));
  return result;
}

/** Runs an async function in a new scope that ends (releasing everything made in it) when the function settles. */
export async function withScope<T>(fn: () => Promise<T>): Promise<T> {
  const scope = new Scope();
  try {
    return await fn();
  } finally {
    scope.end();
  }
}

function* tensorsIn(value: unknown): Generator<Tensor> {
  if (value instanceof Tensor) yield value;
  else if (Array.isArray(value)) { for (const v of value) yield* tensorsIn(v); }
  else if (value && typeof value === "object" && Object.getPrototypeOf(value) === Object.prototype) {
    for (const v of Object.values(value)) yield* tensorsIn(v);
  }
}

/** Makes a tensor outlive every scope (parameters, optimizer state, leaf gradients). */
export function persist(t: Tensor): Tensor {
  for (let s = Scope.current; s; s = s.parent) s.forget(t);
  return t;
}
