/**
 * Where a training step's GPU time goes: runs whole training steps (forward, backward, AdamW; one submission each) of
 * a model on synthetic data and prints GPU time per kernel family from per-dispatch timestamps, plus the wall time of
 * unprofiled steps. A family is the first segment of a kernel key (`sum_axes/8320,512/10/1` -> `sum_axes`).
 *
 *   deno run -A bench/profile_step.ts [--model emoji-tiny] [--batch 128] [--warmup 2] [--steps 3] [--top 15]
 *                                     [--family NAME] [--json FILE]
 *
 * --family NAME also lists that family's kernels one by one (full keys, summed over the first profiled step).
 *
 * Profiled steps put every dispatch in a pass of its own, so their total is a little above an unprofiled step's. On a
 * shared machine the minimum over steps is the steadier number; both minimum and median are printed.
 */
import { parseArgs } from "node:util";
import { getGpu } from "../lib/gpu/runtime.ts";
import { loadModel } from "../lib/nn/load.ts";
import { Scope } from "../lib/tensor/tensor.ts";
import { AdamW, OPEN_CLIP_ADAMW } from "../lib/train/optimizer.ts";
import { recordStep } from "../lib/train/step.ts";
import { median, syntheticBatch } from "./shared.ts";

interface FamilyTimes {
  dispatches: number;
  /** GPU milliseconds of this family in each profiled step. */
  perStep: number[];
}

const fmt = (ms: number) => ms.toFixed(1).padStart(9);

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      model: { type: "string", default: "emoji-tiny" },
      batch: { type: "string", default: "128" },
      warmup: { type: "string", default: "2" },
      steps: { type: "string", default: "3" },
      top: { type: "string", default: "15" },
      family: { type: "string" },
      json: { type: "string" },
    },
  });
  const batchSize = Number(values.batch);
  const warmup = Number(values.warmup);
  const steps = Number(values.steps);
  const top = Number(values.top);
  if (![batchSize, warmup, steps, top].every((v) => Number.isInteger(v) && v >= 0) || batchSize < 1 || steps < 1) {
    console.error("--batch and --steps must be positive integers, --warmup and --top non-negative");
    return 2;
  }
  const gpu = await getGpu();
  const { model } = await loadModel(gpu, values.model!);
  const optimizer = new AdamW(gpu, model.params.trainable(), OPEN_CLIP_ADAMW);
  const batch = syntheticBatch(model, batchSize, 1);
  console.log(`adapter: ${gpu.adapter.description} | ${values.model} | batch ${batchSize}`);

  const runStep = async (): Promise<{ ms: number; loss: number; dispatches: number }> => {
    const before = gpu.stats.dispatches;
    const start = performance.now();
    const scope = new Scope();
    try {
      const loss = await recordStep(model, optimizer, [batch], 1e-4).item();
      return { ms: performance.now() - start, loss, dispatches: gpu.stats.dispatches - before };
    } finally {
      scope.end();
    }
  };

  for (let i = 0; i < warmup; i++) {
    const r = await runStep();
    console.log(`warm-up step ${i}: ${r.ms.toFixed(0)} ms, loss ${r.loss.toFixed(5)}, ${r.dispatches} dispatches`);
  }
  const wall: number[] = [];
  for (let i = 0; i < steps; i++) wall.push((await runStep()).ms);
  if (!gpu.device.features.has("timestamp-query")) {
    console.log(`wall time per step: min ${Math.min(...wall).toFixed(0)} ms, median ${median(wall).toFixed(0)} ms`);
    console.error("this adapter has no timestamp queries, so there is no per-kernel profile (try the Vulkan back end)");
    return 1;
  }

  const families = new Map<string, FamilyTimes>();
  const slowest: { key: string; ms: number }[] = [];
  const gpuTotals: number[] = [];
  for (let i = 0; i < steps; i++) {
    // A query set holds at most 4096 timestamps, two per dispatch: steps of more dispatches are timed in part.
    gpu.startProfiling(2048);
    await runStep();
    const times = await gpu.stopProfiling();
    gpuTotals.push(times.reduce((a, t) => a + t.ms, 0));
    const stepFamilies = new Map<string, number>();
    for (const t of times) {
      const family = t.key.split("/")[0];
      stepFamilies.set(family, (stepFamilies.get(family) ?? 0) + t.ms);
      if (i === 0) {
        const f = families.get(family) ?? { dispatches: 0, perStep: [] };
        f.dispatches++;
        families.set(family, f);
      }
    }
    for (const [family, ms] of stepFamilies) families.get(family)?.perStep.push(ms);
    if (i === 0) slowest.push(...times);
  }

  console.log(
    `wall time per step (unprofiled): min ${Math.min(...wall).toFixed(0)} ms, median ${median(wall).toFixed(0)} ms` +
      ` | GPU time per profiled step: min ${Math.min(...gpuTotals).toFixed(0)} ms, median ${
        median(gpuTotals).toFixed(0)
      } ms`,
  );
  console.log(`${"family".padEnd(28)} ${"n".padStart(5)} ${"min ms".padStart(9)} ${"median".padStart(9)}`);
  const rows = [...families].map(([family, f]) => ({
    family,
    dispatches: f.dispatches,
    minMs: Math.min(...f.perStep),
    medianMs: median(f.perStep),
  })).sort((a, b) => b.medianMs - a.medianMs);
  for (const r of rows) {
    console.log(`${r.family.padEnd(28)} ${String(r.dispatches).padStart(5)} ${fmt(r.minMs)} ${fmt(r.medianMs)}`);
  }
  if (top > 0) {
    console.log(`slowest dispatches of the first profiled step:`);
    for (const t of slowest.sort((a, b) => b.ms - a.ms).slice(0, top)) console.log(`${fmt(t.ms)}  ${t.key}`);
  }
  if (values.family) {
    const keys = new Map<string, { n: number; ms: number }>();
    for (const t of slowest.filter((t) => t.key.split("/")[0] === values.family)) {
      const k = keys.get(t.key) ?? { n: 0, ms: 0 };
      k.n++;
      k.ms += t.ms;
      keys.set(t.key, k);
    }
    console.log(`kernels of ${values.family} in the first profiled step:`);
    for (const [key, k] of [...keys].sort((a, b) => b[1].ms - a[1].ms)) {
      console.log(`${fmt(k.ms)} ${String(k.n).padStart(4)}x  ${key}`);
    }
  }
  if (values.json) {
    const report = {
      adapter: gpu.adapter.description,
      model: values.model,
      batch: batchSize,
      wallMs: wall,
      gpuMs: gpuTotals,
      families: rows,
    };
    await Deno.writeTextFile(values.json, JSON.stringify(report, null, 2) + "\n");
  }
  return 0;
}

if (import.meta.main) Deno.exit(await main());
