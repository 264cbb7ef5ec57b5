import { ClipError } from "../errors.ts";

export type GpuLimitName = "maxBufferSize" | "maxStorageBufferBindingSize" | "memory";

function formatBytes(bytes: number): string {
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GiB`;
  if (bytes >= 2 ** 20) return `${(bytes / 2 ** 20).toFixed(1)} MiB`;
  return `${bytes} bytes`;
}

/**
 * Work that does not fit the device: one buffer over `maxBufferSize`, one binding over
 * `maxStorageBufferBindingSize`, or the device's memory exhausted. Thrown before the driver is asked (for the size
 * limits) or on the next read (out of memory), instead of a validation error that would leave every later result
 * undefined. `suggestedBatchSize` scales a batch size down so that the request would fit.
 */
export class GpuLimitError extends ClipError {
  override name = "GpuLimitError";
  constructor(
    readonly limit: GpuLimitName,
    /** Bytes asked for, when known (not for out-of-memory). */
    readonly requestedBytes: number | null,
    /** The device's limit in bytes, when known. */
    readonly limitBytes: number | null,
    what: string,
  ) {
    super(
      limit === "memory"
        ? `the GPU ran out of memory (${what}): the batch does not fit this device`
        : `${what} needs ${formatBytes(requestedBytes!)} (${requestedBytes} bytes) in one GPU buffer, over this ` +
          `device's ${limit} of ${formatBytes(limitBytes!)} (${limitBytes} bytes): the batch does not fit this device`,
    );
  }

  /** The largest batch size that would bring the request under the limit (sizes scale with the batch), at least 1. */
  suggestedBatchSize(batchSize: number): number {
    const ratio = this.requestedBytes && this.limitBytes ? this.limitBytes / this.requestedBytes : 0.5;
    return Math.max(1, Math.min(batchSize - 1, Math.floor(batchSize * ratio)));
  }
}

/**
 * Reuses GPU buffers across steps. Sizes are rounded up to one of four classes per power of two, so a buffer serves
 * any request within 25% of its size and a training step of fixed shapes allocates nothing after its first run.
 * Releasing while commands that use the buffer are still queued is safe: the queue runs in order, so a later user
 * of the same buffer can only run after the earlier one.
 */
export class BufferPool {
  private free = new Map<number, GPUBuffer[]>();
  private sizeOf = new WeakMap<GPUBuffer, number>();
  /** Bytes of all buffers the pool has created and not destroyed. */
  allocatedBytes = 0;
  /** Bytes handed out and not yet released. */
  inUseBytes = 0;
  peakInUseBytes = 0;

  constructor(private device: GPUDevice, private usage: GPUBufferUsageFlags) {}

  static sizeClass(bytes: number): number {
    const min = 256;
    if (bytes <= min) return min;
    const octave = 2 ** Math.floor(Math.log2(bytes));
    const step = octave / 4;
    return Math.ceil(bytes / step) * step;
  }

  acquire(bytes: number): GPUBuffer {
    const limits = this.device.limits;
    if (bytes > limits.maxBufferSize) {
      throw new GpuLimitError("maxBufferSize", bytes, limits.maxBufferSize, "a tensor");
    }
    let size = BufferPool.sizeClass(bytes);
    // Rounding up to the size class must not push a buffer that fits a limit over it.
    for (const limit of [limits.maxStorageBufferBindingSize, limits.maxBufferSize]) {
      if (bytes <= limit && size > limit) size = limit - (limit % 4) >= bytes ? limit - (limit % 4) : limit;
    }
    const list = this.free.get(size);
    let buffer = list?.pop();
    if (!buffer) {
      buffer = this.device.createBuffer({ size, usage: this.usage });
      this.sizeOf.set(buffer, size);
      this.allocatedBytes += size;
    }
    this.inUseBytes += size;
    this.peakInUseBytes = Math.max(this.peakInUseBytes, this.inUseBytes);
    return buffer;
  }

  release(buffer: GPUBuffer): void {
    const size = this.sizeOf.get(buffer);
    if (size === undefined) throw new Error("BufferPool.release: buffer does not belong to this pool");
    this.inUseBytes -= size;
    let list = this.free.get(size);
    if (!list) this.free.set(size, list = []);
    list.push(buffer);
  }

  /** Destroys every free buffer (for example before a large allocation that might not fit). */
  trim(): void {
    for (const [size, list] of this.free) {
      for (const b of list) b.destroy();
      this.allocatedBytes -= size * list.length;
    }
    this.free.clear();
  }
}
