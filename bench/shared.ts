/**
 * What the benchmarks share: the row format of results.json, the timing loop for recorded GPU work, reproducible
 * synthetic inputs and the process's memory readings.
 */
import process from "node:process";
import type { Batch } from "../lib/data/loader.ts";
import type { Gpu } from "../lib/gpu/runtime.ts";
import type { ClipModel } from "../lib/nn/clip.ts";

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

export function row(name: string, unit: string, ours: number, note?: string): BenchRow {
  return { name, unit, ours: round2(ours), peer: null, ratio: null, ...(note ? { note } : {}) };
}

export function round2(x: number): number {
  return Math.round(x * 100) / 100;
}

const TARGET_SECONDS = 0.35;

/**
 * Milliseconds per operation: n operations in one submission, one wait, best of `repeats`; n is chosen so that a
 * submission holds about 0.35 s of work, which keeps the ~11 ms poll interval of the wait under a few percent.
 * `cpuMs` is the process's CPU time per operation in the same best run: on the CPU back end the driver's threads run
 * in this process, so work / cpuMs tells the speed per busy core even when other programs share the cores.
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

/** Wall seconds of each of `count` awaited calls. */
export async function timeCalls(fn: () => Promise<unknown>, count: number): Promise<number[]> {
  const seconds: number[] = [];
  for (let i = 0; i < count; i++) {
    const start = performance.now();
    await fn();
    seconds.push((performance.now() - start) / 1000);
  }
  return seconds;
}

export function median(xs: number[]): number {
  const sorted = [...xs].sort((a, b) => a - b);
  const mid = sorted.length >> 1;
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/**
 * On the CPU back end: the speed per busy core scaled to all cores (what an idle machine would give), as a note
 * fragment; empty on real GPUs. `perMs` is the work of one operation divided by 1e6 (GFLOP or GB).
 */
export function perCpuTimeNote(gpu: Gpu, perMs: number, cpuMs: number): string {
  if (!gpu.adapter.isSoftware) return "";
  const cores = navigator.hardwareConcurrency;
  return `; ${(perMs / cpuMs * cores).toFixed(0)} per CPU time x ${cores} cores`;
}

/** Reproducible values in [-1, 1) from a linear congruential generator. */
export function uniformRandom(count: number, seed: number): Float32Array {
  const out = new Float32Array(count);
  let s = seed >>> 0;
  for (let i = 0; i < count; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s / 2 ** 31 - 1;
  }
  return out;
}

const SOT = 49406;
const EOT = 49407;

/** A reproducible training batch of noise images and token rows of varying length (start, random ids, end). */
export function syntheticBatch(model: ClipModel, size: number, seed: number): Batch {
  const side = model.config.vision_cfg.image_size;
  const ctx = model.config.text_cfg.context_length;
  const vocab = model.config.text_cfg.vocab_size;
  let s = seed >>> 0;
  const next = () => (s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32;
  const images = new Float32Array(size * 3 * side * side).map(() => 2 * next() - 1);
  const tokens = new Int32Array(size * ctx);
  for (let b = 0; b < size; b++) {
    const length = 2 + Math.floor(next() * (ctx - 2));
    tokens[b * ctx] = SOT;
    for (let t = 1; t < length - 1; t++) tokens[b * ctx + t] = 1 + Math.floor(next() * (vocab - 3));
    tokens[b * ctx + length - 1] = EOT;
  }
  // Only what a training step reads is filled in.
  return {
    images,
    tokens,
    keys: [],
    captions: [],
    labels: new Int32Array(size).fill(-1),
    shards: [],
    size,
    position: { shard: 0, sample: 0 },
  } as unknown as Batch;
}

const MIB = 2 ** 20;

/**
 * Resident memory of this process in MiB, now and at its peak (VmRSS, VmHWM). On the CPU back end the driver's
 * buffers are ordinary process memory, so they are part of both; NaN where /proc is missing.
 */
export function processMemoryMiB(): { rss: number; peak: number } {
  let status = "";
  try {
    status = Deno.readTextFileSync("/proc/self/status");
  } catch {
    return { rss: NaN, peak: NaN };
  }
  const kib = (field: string) => Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)?.[1] ?? NaN);
  return { rss: kib("VmRSS") / 1024, peak: kib("VmHWM") / 1024 };
}

/** Buffers of the pool and live textures, in MiB. */
export function gpuMiB(gpu: Gpu): number {
  const m = gpu.memoryBytes;
  return (m.buffers + m.textures) / MIB;
}
