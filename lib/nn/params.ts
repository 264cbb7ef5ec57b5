import { ClipError } from "../errors.ts";
import { isBufferKey } from "./config.ts";
import type { Gpu } from "../gpu/runtime.ts";
import { requireGrad } from "../tensor/autograd.ts";
import { fromArray } from "../tensor/create.ts";
import { persist, type Shape, shapeString, type Tensor } from "../tensor/tensor.ts";

/** A host-side tensor: what checkpoints hold and initialisers produce. */
export interface HostTensor {
  shape: number[];
  data: Float32Array;
}

/**
 * The parameters of a model by open_clip state-dict name. Parameters live outside every scope; buffers (batch-norm
 * running statistics) are stored here too but never require gradients.
 */
export class Params {
  readonly tensors = new Map<string, Tensor>();

  constructor(readonly gpu: Gpu) {}

  get(name: string): Tensor {
    const t = this.tensors.get(name);
    if (!t) throw new ClipError(`model parameter '${name}' is missing`);
    return t;
  }

  has(name: string): boolean {
    return this.tensors.has(name);
  }

  /** Uploads host tensors; `isBuffer(name)` marks the ones that are state, not trainable parameters. */
  static upload(gpu: Gpu, host: Map<string, HostTensor>, isBuffer: (name: string) => boolean = isBufferKey): Params {
    const p = new Params(gpu);
    for (const [name, h] of host) {
      const t = persist(fromArray(gpu, h.data, h.shape));
      if (!isBuffer(name)) requireGrad(t);
      p.tensors.set(name, t);
    }
    return p;
  }

  /** Trainable parameters in a stable order. */
  trainable(): [string, Tensor][] {
    return [...this.tensors].filter(([, t]) => t.requiresGrad);
  }

  async download(): Promise<Map<string, HostTensor>> {
    const names = [...this.tensors.keys()];
    const datas = await this.gpu.readMany(
      names.map((n) => ({ buffer: this.get(n).buffer, bytes: this.get(n).byteLength })),
    );
    return new Map(names.map((n, i) => [n, { shape: [...this.get(n).shape], data: new Float32Array(datas[i]) }]));
  }

  dispose(): void {
    for (const t of this.tensors.values()) {
      t.grad?.dispose();
      t.dispose();
    }
    this.tensors.clear();
  }
}

export function expectShape(name: string, t: Tensor, shape: Shape): void {
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new ClipError(`parameter '${name}' has shape ${shapeString(t.shape)}, expected ${shapeString(shape)}`);
  }
}
