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
    const size = BufferPool.sizeClass(bytes);
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
