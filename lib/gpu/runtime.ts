import { ClipError } from "../errors.ts";
import { BufferPool, GpuLimitError } from "./buffer_pool.ts";
import { type AdapterSummary, createDevice } from "./device.ts";

/**
 * A compute kernel specialisation. `key` names the kernel family and every value baked into its code (dtype, shape,
 * tile), so one key is one compiled pipeline; `wgsl` is only called on a cache miss.
 */
export interface Kernel {
  key: string;
  wgsl: () => string;
}

/** A buffer (whole, or a byte range of it) or a texture view bound at one binding index. */
export type Binding = GPUBuffer | { buffer: GPUBuffer; offset?: number; size?: number } | GPUTextureView;

export { GpuLimitError } from "./buffer_pool.ts";

export const STORAGE_USAGE = GPUBufferUsage.STORAGE | GPUBufferUsage.COPY_SRC | GPUBufferUsage.COPY_DST;
const MAX_WORKGROUPS = 65535;
const UNIFORM_CHUNK = 64 * 1024;

interface CompiledKernel {
  pipeline: GPUComputePipeline;
  layout: GPUBindGroupLayout;
  compileMs: number;
}

/** Counts that benchmarks and tests read to check that work is batched and memory reused. */
export interface RuntimeStats {
  dispatches: number;
  submits: number;
  reads: number;
  pipelinesCompiled: number;
  compileMs: number;
}

/**
 * The GPU runtime: one device, a buffer pool, a pipeline cache and a command recorder. Ops only record dispatches;
 * nothing reaches the GPU until `flush` (one submission for everything recorded since the last one) and nothing
 * waits on it except `read`, so a whole training step is one submission and at most one await.
 */
export class Gpu {
  readonly pool: BufferPool;
  readonly stats: RuntimeStats = { dispatches: 0, submits: 0, reads: 0, pipelinesCompiled: 0, compileMs: 0 };
  private pipelines = new Map<string, CompiledKernel>();
  private encoder: GPUCommandEncoder | null = null;
  private pass: GPUComputePassEncoder | null = null;
  private uniformChunks: GPUBuffer[] = [];
  private uniformStaging = new Uint8Array(UNIFORM_CHUNK);
  private uniformChunk = 0;
  private uniformOffset = 0;
  private readonly uniformAlign: number;
  private firstError: string | null = null;
  private firstErrorIsOutOfMemory = false;
  private profile: { querySet: GPUQuerySet; capacity: number; keys: string[] } | null = null;
  private lost = false;

  private constructor(readonly device: GPUDevice, readonly adapter: AdapterSummary) {
    this.pool = new BufferPool(device, STORAGE_USAGE);
    this.uniformAlign = device.limits.minUniformBufferOffsetAlignment;
    device.addEventListener("uncapturederror", (e) => {
      if (this.firstError !== null) return;
      const error = (e as GPUUncapturedErrorEvent).error;
      this.firstError = error.message;
      this.firstErrorIsOutOfMemory = error instanceof GPUOutOfMemoryError;
    });
    device.lost.then((info) => {
      this.lost = true;
      this.firstError ??= `device lost: ${info.message}`;
    });
  }

  static async create(): Promise<Gpu> {
    const { device, summary } = await createDevice();
    return new Gpu(device, summary);
  }

  get hasF16(): boolean {
    return this.device.features.has("shader-f16");
  }

  /** Compiles (or fetches from the cache) the pipeline of a kernel specialisation. */
  compile(kernel: Kernel): CompiledKernel {
    let compiled = this.pipelines.get(kernel.key);
    if (compiled) return compiled;
    const start = performance.now();
    const module = this.device.createShaderModule({ code: kernel.wgsl(), label: kernel.key });
    const pipeline = this.device.createComputePipeline({
      layout: "auto",
      compute: { module, entryPoint: "main" },
      label: kernel.key,
    });
    compiled = { pipeline, layout: pipeline.getBindGroupLayout(0), compileMs: performance.now() - start };
    this.stats.pipelinesCompiled++;
    this.stats.compileMs += compiled.compileMs;
    this.pipelines.set(kernel.key, compiled);
    return compiled;
  }

  /** Bytes of the textures made through `createTexture` (operand textures are pooled by their ops and kept). */
  private textureBytes = 0;

  /**
   * Device memory held for tensors: every buffer the pool has made (in use or free) and every texture made through
   * `createTexture`. Uniform arenas and read-back staging buffers are left out: they are small and do not grow with
   * the work.
   */
  get memoryBytes(): { buffers: number; textures: number } {
    return { buffers: this.pool.allocatedBytes, textures: this.textureBytes };
  }

  /** A single-level rgba32float 2-D texture, counted in `memoryBytes`. */
  createTexture(width: number, height: number, usage: GPUTextureUsageFlags, label: string): GPUTexture {
    const texture = this.device.createTexture({ size: [width, height], format: "rgba32float", usage, label });
    this.textureBytes += width * height * 16;
    return texture;
  }

  get pipelineCount(): number {
    return this.pipelines.size;
  }

  private commandEncoder(): GPUCommandEncoder {
    return this.encoder ??= this.device.createCommandEncoder();
  }

  private computePass(): GPUComputePassEncoder {
    return this.pass ??= this.commandEncoder().beginComputePass();
  }

  private endPass(): void {
    this.pass?.end();
    this.pass = null;
  }

  /** Copies uniform bytes into this recording's arena and returns where they will live on the GPU. */
  private stageUniforms(data: ArrayBufferView): { buffer: GPUBuffer; offset: number; size: number } {
    const size = Math.max(16, Math.ceil(data.byteLength / 16) * 16);
    if (size > UNIFORM_CHUNK) throw new Error(`uniform block of ${size} bytes is larger than ${UNIFORM_CHUNK}`);
    if (this.uniformOffset + size > UNIFORM_CHUNK) {
      this.writeUniformChunk();
      this.uniformChunk++;
      this.uniformOffset = 0;
    }
    while (this.uniformChunks.length <= this.uniformChunk) {
      this.uniformChunks.push(
        this.device.createBuffer({ size: UNIFORM_CHUNK, usage: GPUBufferUsage.UNIFORM | GPUBufferUsage.COPY_DST }),
      );
    }
    const offset = this.uniformOffset;
    this.uniformStaging.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), offset);
    this.uniformOffset = Math.ceil((offset + size) / this.uniformAlign) * this.uniformAlign;
    return { buffer: this.uniformChunks[this.uniformChunk], offset, size };
  }

  private writeUniformChunk(): void {
    if (this.uniformOffset === 0) return;
    // writeBuffer lands before the submission that follows it, and each chunk is rewritten only after the
    // previous recording was submitted, so a chunk never changes under commands that still read it.
    this.device.queue.writeBuffer(this.uniformChunks[this.uniformChunk], 0, this.uniformStaging, 0, this.uniformOffset);
  }

  /**
   * Records one dispatch. Bindings take indices 0..n-1 in order; `uniforms`, when given, is bound at index n.
   * `workgroups` may exceed the per-dimension limit in x: it is folded into y (kernels use `linearWorkgroup`).
   * `detail` (a shape, say) is appended to the kernel key in profiles, for kernels whose key leaves sizes out.
   */
  dispatch(
    kernel: Kernel,
    bindings: Binding[],
    workgroups: number | [number, number?, number?],
    uniforms?: ArrayBufferView,
    detail?: string,
  ) {
    this.checkBindingSizes(kernel, bindings);
    const { pipeline, layout } = this.compile(kernel);
    const entries: GPUBindGroupEntry[] = bindings.map((b, i) => ({ binding: i, resource: bindingResource(b) }));
    if (uniforms) entries.push({ binding: bindings.length, resource: this.stageUniforms(uniforms) });
    const bindGroup = this.device.createBindGroup({ layout, entries });
    const pass = this.profile ? this.profiledPass(detail ? `${kernel.key} ${detail}` : kernel.key) : this.computePass();
    pass.setPipeline(pipeline);
    pass.setBindGroup(0, bindGroup);
    const [x, y, z] = typeof workgroups === "number" ? foldWorkgroups(workgroups) : workgroups;
    if (x === 0 || (y ?? 1) === 0 || (z ?? 1) === 0) return;
    pass.dispatchWorkgroups(x, y ?? 1, z ?? 1);
    this.stats.dispatches++;
    if (this.profile) this.endPass();
  }

  /** A binding over the device's limit would fail validation and poison the whole submission: refuse it by name. */
  private checkBindingSizes(kernel: Kernel, bindings: Binding[]): void {
    const limit = this.device.limits.maxStorageBufferBindingSize;
    for (const b of bindings) {
      if (b instanceof GPUTextureView) continue;
      const size = b instanceof GPUBuffer ? b.size : b.size ?? b.buffer.size - (b.offset ?? 0);
      if (size > limit) throw new GpuLimitError("maxStorageBufferBindingSize", size, limit, `kernel ${kernel.key}`);
    }
  }

  /** A pass of its own for one dispatch, with timestamps around it (profiling only). */
  private profiledPass(key: string): GPUComputePassEncoder {
    const p = this.profile!;
    this.endPass();
    const i = p.keys.length;
    if (i >= p.capacity) return this.computePass();
    p.keys.push(key);
    this.pass = this.commandEncoder().beginComputePass({
      timestampWrites: { querySet: p.querySet, beginningOfPassWriteIndex: 2 * i, endOfPassWriteIndex: 2 * i + 1 },
    });
    return this.pass;
  }

  /**
   * Times every dispatch from now until `stopProfiling` with GPU timestamps (each dispatch then runs in a pass of
   * its own, which costs a little). Needs the adapter's timestamp-query feature.
   */
  startProfiling(capacity = 2048): void {
    if (!this.device.features.has("timestamp-query")) {
      throw new ClipError("profiling needs the adapter's timestamp-query feature, which this adapter lacks");
    }
    this.flush();
    this.profile = {
      querySet: this.device.createQuerySet({ type: "timestamp", count: 2 * capacity }),
      capacity,
      keys: [],
    };
  }

  /** Per-dispatch GPU times (ms) since `startProfiling`, in order. */
  async stopProfiling(): Promise<{ key: string; ms: number }[]> {
    const p = this.profile;
    if (!p) return [];
    this.profile = null;
    const n = p.keys.length;
    if (n === 0) return [];
    const resolved = this.device.createBuffer({
      size: 16 * n,
      usage: GPUBufferUsage.QUERY_RESOLVE | GPUBufferUsage.COPY_SRC,
    });
    this.withEncoder((e) => e.resolveQuerySet(p.querySet, 0, 2 * n, resolved, 0));
    const times = new BigInt64Array(await this.read(resolved, 16 * n));
    resolved.destroy();
    p.querySet.destroy();
    return p.keys.map((key, i) => ({ key, ms: Number(times[2 * i + 1] - times[2 * i]) / 1e6 }));
  }

  copyBuffer(src: GPUBuffer, srcOffset: number, dst: GPUBuffer, dstOffset: number, bytes: number): void {
    this.endPass();
    this.commandEncoder().copyBufferToBuffer(src, srcOffset, dst, dstOffset, bytes);
  }

  /** Access to the encoder for commands outside compute passes (texture copies, timestamp resolves). */
  withEncoder(fn: (encoder: GPUCommandEncoder) => void): void {
    this.endPass();
    fn(this.commandEncoder());
  }

  /** Submits everything recorded so far, without waiting for it. */
  flush(): void {
    if (!this.encoder) return;
    this.endPass();
    this.writeUniformChunk();
    this.device.queue.submit([this.encoder.finish()]);
    this.encoder = null;
    this.uniformChunk = 0;
    this.uniformOffset = 0;
    this.stats.submits++;
  }

  /** A pooled storage buffer holding `data`. Flushes first: a pooled buffer may still be read by recorded commands. */
  upload(data: ArrayBufferView): GPUBuffer {
    this.flush();
    const buffer = this.pool.acquire(data.byteLength);
    if (data.byteLength > 0) {
      this.device.queue.writeBuffer(buffer, 0, data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
    }
    return buffer;
  }

  /** Overwrites the start of an existing buffer with `data` (flushing first, as upload does). */
  write(buffer: GPUBuffer, data: ArrayBufferView, offset = 0): void {
    this.flush();
    this.device.queue.writeBuffer(buffer, offset, data.buffer as ArrayBuffer, data.byteOffset, data.byteLength);
  }

  /** Reads byte ranges of several buffers with one submission and one wait. */
  async readMany(ranges: { buffer: GPUBuffer; offset?: number; bytes: number }[]): Promise<ArrayBuffer[]> {
    const stagings = ranges.map((r) => {
      const size = Math.max(4, Math.ceil(r.bytes / 4) * 4);
      const staging = this.device.createBuffer({ size, usage: GPUBufferUsage.MAP_READ | GPUBufferUsage.COPY_DST });
      if (r.bytes > 0) this.copyBuffer(r.buffer, r.offset ?? 0, staging, 0, size);
      return staging;
    });
    this.flush();
    this.stats.reads++;
    try {
      await Promise.all(stagings.map((s) => s.mapAsync(GPUMapMode.READ)));
    } catch (e) {
      this.throwIfFailed();
      throw e;
    }
    this.throwIfFailed();
    return stagings.map((s, i) => {
      const out = s.getMappedRange().slice(0, ranges[i].bytes);
      s.unmap();
      s.destroy();
      return out;
    });
  }

  async read(buffer: GPUBuffer, bytes: number, offset = 0): Promise<ArrayBuffer> {
    return (await this.readMany([{ buffer, offset, bytes }]))[0];
  }

  /** Waits until the GPU has finished everything submitted (benchmarks and shutdown only). */
  async sync(): Promise<void> {
    this.flush();
    await this.device.queue.onSubmittedWorkDone();
    this.throwIfFailed();
  }

  private throwIfFailed(): void {
    if (this.firstError) {
      const message = this.firstError;
      const outOfMemory = this.firstErrorIsOutOfMemory;
      if (!this.lost) this.firstError = null;
      if (outOfMemory) {
        throw new GpuLimitError("memory", null, null, `${message}; ${this.pool.inUseBytes} bytes in use by tensors`);
      }
      throw new ClipError(`GPU error: ${message}`);
    }
  }

  destroy(): void {
    this.flush();
    this.pool.trim();
    for (const b of this.uniformChunks) b.destroy();
    this.device.destroy();
  }
}

function bindingResource(b: Binding): GPUBindingResource {
  if (b instanceof GPUBuffer) return { buffer: b };
  if (b instanceof GPUTextureView) return b;
  return { buffer: b.buffer, offset: b.offset ?? 0, size: b.size };
}

/** Splits a 1-D workgroup count over x and y when it exceeds the per-dimension limit. */
export function foldWorkgroups(count: number): [number, number, number] {
  if (count <= MAX_WORKGROUPS) return [count, 1, 1];
  const y = Math.ceil(count / MAX_WORKGROUPS);
  return [Math.ceil(count / y), y, 1];
}

/** WGSL to recover the 1-D workgroup index from a folded dispatch (pair with `foldWorkgroups`). */
export const LINEAR_WORKGROUP_WGSL = `
fn linear_workgroup(wid: vec3<u32>, nwg: vec3<u32>) -> u32 { return wid.x + wid.y * nwg.x; }`;

let shared: Promise<Gpu> | null = null;

/** The process-wide runtime, created on first use. */
export function getGpu(): Promise<Gpu> {
  return shared ??= Gpu.create();
}
