/**
 * Memory over a long training run: emoji-tiny steps at a small batch (as bench/train_bench.ts runs them) for
 * --steps steps, with resident memory and device memory read after the warm-up and at the end. A step of fixed shapes
 * should allocate nothing after its first run, so both should stay flat.
 *
 *   deno run -A --v8-flags=--expose-gc bench/memory_bench.ts [--json] [--steps 1000] [--batch 8] [--warmup 10]
 *
 * With --expose-gc the JavaScript heap is collected before each reading, so that garbage not yet collected is not
 * counted as growth.
 */
import { parseArgs } from "node:util";
import { type ChildReport, printReport } from "./child.ts";
import { gpuMiB, processMemoryMiB, row } from "./shared.ts";
import { TRAIN, trainingSetup, trainStep } from "./train_bench.ts";

function settledMemory(gpu: Parameters<typeof gpuMiB>[0]): { rss: number; gpu: number; jsHeap: number } {
  (globalThis as { gc?: () => void }).gc?.();
  return { rss: processMemoryMiB().rss, gpu: gpuMiB(gpu), jsHeap: Deno.memoryUsage().heapTotal / 2 ** 20 };
}

export async function measureMemory(steps: number, batchSize: number, warmup: number): Promise<ChildReport> {
  const { gpu, model, optimizer, batch } = await trainingSetup(batchSize);
  for (let i = 0; i < warmup; i++) await trainStep(model, optimizer, batch, TRAIN.lr);
  const before = settledMemory(gpu);
  const start = performance.now();
  let highest = before.rss;
  for (let i = 1; i <= steps; i++) {
    await trainStep(model, optimizer, batch, TRAIN.lr);
    if (i % 100 === 0) {
      highest = Math.max(highest, processMemoryMiB().rss);
      const heap = Deno.memoryUsage();
      console.error(
        `memory bench: step ${i}/${steps}, RSS ${processMemoryMiB().rss.toFixed(0)} MiB (JS heap ${
          (heap.heapUsed / 2 ** 20).toFixed(0)
        } of ${(heap.heapTotal / 2 ** 20).toFixed(0)} MiB, external ${
          (heap.external / 2 ** 20).toFixed(0)
        } MiB), device ${((gpu.memoryBytes.buffers + gpu.memoryBytes.textures) / 2 ** 20).toFixed(0)} MiB`,
      );
    }
  }
  const seconds = (performance.now() - start) / 1000;
  const after = settledMemory(gpu);
  const run = `${steps} emoji-tiny steps at batch ${batchSize} after ${warmup} warm-up steps (${
    (seconds / steps * 1000).toFixed(0)
  } ms/step)`;
  return {
    rows: [
      row(
        "emoji_tiny_train_rss_growth",
        "MiB",
        after.rss - before.rss,
        `VmRSS ${before.rss.toFixed(0)} -> ${after.rss.toFixed(0)} MiB (highest at a 100-step mark ${
          highest.toFixed(0)
        }) over ${run}; of it, the JS heap V8 reserved went ${before.jsHeap.toFixed(0)} -> ${
          after.jsHeap.toFixed(0)
        } MiB (V8 sizes its heap to the allocation rate; it levels off)`,
      ),
      row(
        "emoji_tiny_train_gpu_growth",
        "MiB",
        after.gpu - before.gpu,
        `buffer pool + textures ${before.gpu.toFixed(1)} -> ${after.gpu.toFixed(1)} MiB over the same steps`,
      ),
    ],
  };
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      json: { type: "boolean", default: false },
      steps: { type: "string", default: "1000" },
      batch: { type: "string", default: "8" },
      warmup: { type: "string", default: "10" },
    },
  });
  printReport(await measureMemory(Number(values.steps), Number(values.batch), Number(values.warmup)), values.json);
  Deno.exit(0);
}
