/**
 * GPU kernel benchmarks: matmul throughput at CLIP-sized shapes, elementwise bandwidth, per-dispatch overhead and the
 * first compile of the big matmul kernel. Timing: n operations recorded into one submission, then one wait for the
 * queue, best of three; n is chosen so that a submission holds about 0.35 s of work, which keeps the ~11 ms poll
 * interval of the wait under a few percent.
 */
import process from "node:process";
import type { Gpu } from "../lib/gpu/runtime.ts";
import { fillKernel } from "../kernels/elementwise.ts";
import {
  K_STEP,
  operandLayout,
  textureMatmulKernel,
  textureMatmulUniforms,
  textureMatmulWorkgroups,
} from "../kernels/matmul_texture.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { add } from "../lib/tensor/ops/elementwise.ts";
import { matmulForward, type MatmulOptions, planMatmul, textureSpecFor } from "../lib/tensor/ops/matmul.ts";
import { withScope } from "../lib/tensor/tensor.ts";

export interface BenchRow {
  name: string;
  unit: string;
  ours: number;
  /** The same measurement for a reference implementation, when one is run. */
  peer: number | null;
  ratio: number | null;
  /** How the number was obtained, where that matters for reading it. */
  note?: string;
}

const TARGET_SECONDS = 0.35;

/**
 * Milliseconds per operation: n operations in one submission, one wait, best of `repeats`. `cpuMs` is the process's
 * CPU time per operation in the same best run: on the CPU back end the driver's threads run in this process, so
 * work / cpuMs tells the speed per busy core even when other programs share the cores.
 */
export async function timePerOp(
  gpu: Gpu,
  record: () => void,
  repeats = 3,
): Promise<{ ms: number; cpuMs: number; n: number }> {
  record(); // compile and allocate outside the timed submissions
  await gpu.sync();
  let start = performance.now();
  record();
  await gpu.sync();
  const single = performance.now() - start;
  const n = Math.max(2, Math.min(1000, Math.round(TARGET_SECONDS * 1000 / Math.max(single, 0.01))));
  let best = Infinity;
  let bestCpu = Infinity;
  for (let r = 0; r < repeats; r++) {
    start = performance.now();
    const cpuStart = process.cpuUsage();
    for (let i = 0; i < n; i++) record();
    await gpu.sync();
    const ms = (performance.now() - start) / n;
    const cpu = process.cpuUsage(cpuStart);
    if (ms < best) {
      best = ms;
      bestCpu = (cpu.user + cpu.system) / 1000 / n;
    }
  }
  return { ms: best, cpuMs: bestCpu, n };
}

function uniformRandom(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  let s = seed >>> 0;
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

function row(name: string, unit: string, ours: number, note?: string): BenchRow {
  return { name, unit, ours: Math.round(ours * 100) / 100, peer: null, ratio: null, ...(note ? { note } : {}) };
}

interface MatmulCase {
  name: string;
  batch: number;
  m: number;
  k: number;
  n: number;
  opts?: MatmulOptions;
  bias?: boolean;
  describe: string;
}

const MATMUL_CASES: MatmulCase[] = [
  { name: "matmul_1024", batch: 1, m: 1024, k: 1024, n: 1024, describe: "1024^3" },
  {
    name: "matmul_vitb_mlp",
    batch: 1,
    m: 3200,
    k: 768,
    n: 3072,
    describe: "3200x768 @ 768x3072 (ViT-B/32 MLP up-projection, 64 images)",
  },
  {
    name: "matmul_vitb_mlp_linear",
    batch: 1,
    m: 3200,
    k: 768,
    n: 3072,
    opts: { transB: true, activation: "gelu" },
    bias: true,
    describe: "the same as a Linear layer: weight [3072,768] transposed, + bias, gelu",
  },
  {
    name: "matmul_attention",
    batch: 768,
    m: 50,
    k: 64,
    n: 50,
    opts: { transB: true },
    describe: "768 x (50x64 @ (50x64)^T): attention scores, 64 images x 12 heads",
  },
];

async function benchMatmulCase(gpu: Gpu, c: MatmulCase): Promise<BenchRow> {
  return await withScope(async () => {
    const lead = c.batch > 1 ? [c.batch] : [];
    const a = fromArray(gpu, uniformRandom(c.batch * c.m * c.k, 1), [...lead, c.m, c.k]);
    const bShape = c.opts?.transB ? [...lead, c.n, c.k] : [...lead, c.k, c.n];
    const b = fromArray(gpu, uniformRandom(c.batch * c.k * c.n, 2), bShape);
    const opts: MatmulOptions = { ...c.opts };
    if (c.bias) opts.bias = fromArray(gpu, uniformRandom(c.n, 3), [c.n]);
    const plan = planMatmul(a, b, opts);
    const { ms, cpuMs, n } = await timePerOp(gpu, () => matmulForward(a, b, opts).out.dispose());
    const flop = 2 * c.batch * c.m * c.n * c.k;
    // On the CPU back end: the speed per busy core, scaled to all cores, which is what an idle machine would give.
    const idle = gpu.adapter.isSoftware
      ? `; ${
        (flop / (cpuMs * 1e6) * navigator.hardwareConcurrency).toFixed(0)
      } per CPU time x ${navigator.hardwareConcurrency} cores`
      : "";
    return row(
      c.name,
      "GFLOP/s",
      flop / (ms * 1e6),
      `${c.describe}; ${plan.path} path; ${ms.toFixed(2)} ms each, ${n} per submit${idle}`,
    );
  });
}

/** Throughput of the matmul shapes the CLIP encoders run, through the public op (path chosen as in training). */
export async function benchMatmuls(gpu: Gpu): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  for (const c of MATMUL_CASES) rows.push(await benchMatmulCase(gpu, c));
  return rows;
}

/** Bandwidth of a large elementwise add (two reads and one write of 16M floats). */
export async function benchElementwise(gpu: Gpu): Promise<BenchRow> {
  return await withScope(async () => {
    const size = 1 << 24;
    const a = fromArray(gpu, uniformRandom(size, 4), [size]);
    const b = fromArray(gpu, uniformRandom(size, 5), [size]);
    const { ms } = await timePerOp(gpu, () => add(a, b).dispose());
    return row("elementwise_add_16M", "GB/s", 3 * size * 4 / (ms * 1e6), "out = a + b over 2^24 f32");
  });
}

/** Cost of one dispatch of a one-workgroup kernel, recorded back to back (bind group creation included). */
export async function benchDispatch(gpu: Gpu): Promise<BenchRow> {
  const buffer = gpu.pool.acquire(256);
  const kernel = fillKernel(1, 0);
  const count = 1000;
  try {
    const { ms } = await timePerOp(gpu, () => {
      for (let i = 0; i < count; i++) gpu.dispatch(kernel, [buffer], 1);
    });
    return row("dispatch_overhead", "us/dispatch", ms * 1000 / count, `${count} dispatches in one submission`);
  } finally {
    gpu.pool.release(buffer);
  }
}

/** Seconds below which a first use of the 32x32 kernel can only have come from Mesa's on-disk shader cache. */
const CACHE_HIT_MS = 2000;

/**
 * Time of the first use of the texture matmul kernel in this process: its compile (or a load from the driver's
 * on-disk cache) plus one tiny dispatch and the wait. Run it before anything else uses the kernel.
 */
export async function benchCompile(gpu: Gpu): Promise<BenchRow> {
  if (!gpu.adapter.isSoftware) {
    return row("pipeline_compile_matmul", "ms", NaN, "texture kernel not used on this adapter");
  }
  const spec = textureSpecFor(gpu.adapter);
  const a = operandLayout(32, 32, 1, "tile", spec.tile.tm, K_STEP);
  const geometry = { batch: 1, m: 32, n: 32, k: 32, a, b: operandLayout(32, 32, 1, "k", K_STEP, spec.tile.tn) };
  const texture = () =>
    gpu.device.createTexture({ size: [16, 32], format: "rgba32float", usage: GPUTextureUsage.STORAGE_BINDING });
  const [ta, tb] = [texture(), texture()];
  const out = gpu.pool.acquire(32 * 32 * 4);
  const start = performance.now();
  gpu.dispatch(
    textureMatmulKernel(spec),
    [ta.createView(), tb.createView(), out],
    textureMatmulWorkgroups(spec, geometry),
    textureMatmulUniforms(spec, geometry, { rows: 32, cols: 32, rowStride: 32 }),
  );
  await gpu.sync();
  const ms = performance.now() - start;
  gpu.pool.release(out);
  ta.destroy();
  tb.destroy();
  const warm = ms < CACHE_HIT_MS;
  return row(
    "pipeline_compile_matmul",
    "ms",
    ms,
    `first use of ${spec.tile.tm}x${spec.tile.tn}/${spec.lanes}-lane kernel; Mesa disk cache ${
      warm ? "warm (loaded, not compiled)" : "cold (compiled)"
    }, inferred from the time`,
  );
}
