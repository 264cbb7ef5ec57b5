/**
 * GPU kernel benchmarks: matmul throughput at CLIP-sized shapes, elementwise bandwidth, per-dispatch overhead and the
 * first compile of the big matmul kernel, timed with `timePerOp` (n operations in one submission, best of three).
 */
import type { Gpu } from "../lib/gpu/runtime.ts";
import { fillKernel } from "../kernels/elementwise.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { add } from "../lib/tensor/ops/elementwise.ts";
import { matmulForward, type MatmulOptions, type MatmulPlan, planMatmul } from "../lib/tensor/ops/matmul.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import { type BenchRow, perCpuTimeNote, row, timePerOp, uniformRandom } from "./shared.ts";

export interface MatmulCase {
  name: string;
  batch: number;
  m: number;
  k: number;
  n: number;
  opts?: MatmulOptions;
  bias?: boolean;
  describe: string;
}

export const MATMUL_CASES: MatmulCase[] = [
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
    const idle = perCpuTimeNote(gpu, flop / 1e6, cpuMs);
    return row(
      c.name,
      "GFLOP/s",
      flop / (ms * 1e6),
      `${c.describe}; ${plan.path} path${textureKernelNote(plan)}; ${ms.toFixed(2)} ms each, ${n} per submit${idle}`,
    );
  });
}

function textureKernelNote(plan: MatmulPlan): string {
  const spec = plan.texture?.spec;
  return spec ? ` (${spec.tile.tm}x${spec.tile.tn}${spec.shareA ? ", lanes share A" : ""})` : "";
}

/** Throughput of the matmul shapes the CLIP encoders run, through the public op (path chosen as in training). */
export async function benchMatmuls(gpu: Gpu): Promise<BenchRow[]> {
  const rows: BenchRow[] = [];
  for (const c of MATMUL_CASES) rows.push(await benchMatmulCase(gpu, c));
  return rows;
}

export const ELEMENTWISE_SIZE = 1 << 24;

/** Bandwidth of a large elementwise add (two reads and one write of 16M floats). */
export async function benchElementwise(gpu: Gpu): Promise<BenchRow> {
  return await withScope(async () => {
    const size = ELEMENTWISE_SIZE;
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

/** Seconds below which a first use of the texture kernel can only have come from Mesa's on-disk shader cache. */
const CACHE_HIT_MS = 2000;

/**
 * Time of the first use of the texture matmul kernel that large products run in this process: its compile (or a
 * load from the driver's on-disk cache) plus one small product (its operand packing included) and the wait. Run it
 * before anything else uses the kernel.
 */
export async function benchCompile(gpu: Gpu): Promise<BenchRow> {
  if (!gpu.adapter.isSoftware) {
    return row("pipeline_compile_matmul", "ms", NaN, "texture kernel not used on this adapter");
  }
  // Big enough for the texture path and for the planner's choice at large shapes.
  const side = 256;
  return await withScope(async () => {
    const a = fromArray(gpu, uniformRandom(side * side, 1), [side, side]);
    const b = fromArray(gpu, uniformRandom(side * side, 2), [side, side]);
    await gpu.sync();
    const spec = planMatmul(a, b).texture?.spec;
    if (!spec) throw new Error("benchCompile: a 256^3 product did not take the texture path");
    const start = performance.now();
    matmulForward(a, b);
    await gpu.sync();
    const ms = performance.now() - start;
    const warm = ms < CACHE_HIT_MS;
    return row(
      "pipeline_compile_matmul",
      "ms",
      ms,
      `first use of the ${spec.tile.tm}x${spec.tile.tn}/${spec.lanes}-lane kernel${
        spec.shareA ? " sharing A" : ""
      }; Mesa disk cache ${warm ? "warm (loaded, not compiled)" : "cold (compiled)"}, inferred from the time`,
    );
  });
}
