/**
 * `deno task bench`: runs every benchmark, then the PyTorch peer on the same workloads, prints the adapter and a
 * table, and writes bench/results.json as {"adapter": {...}, "results": [{name, unit, ours, peer, ratio, note?}]}.
 * ratio is oriented so that above 1 means ours is better: ours / peer for throughput, peer / ours for memory and
 * times. peer and ratio are null where the peer has no counterpart or could not run.
 *
 * Flags: --skip-gpu, --skip-host (tokenizer and image loader), --skip-peer, --only NAME[,NAME...] (rows to run; a
 * benchmark runs when any of its rows is named), --memory-steps N (training steps of the memory-growth rows, default
 * 1000; 0 skips them), --embed-batches N, --train-steps N (timed batches and steps of the model rows), --out FILE.
 */
import { parseArgs } from "node:util";
import { getGpu, type Gpu } from "../lib/gpu/runtime.ts";
import { benchAttention } from "./attention_bench.ts";
import { type ChildReport, runChild } from "./child.ts";
import { benchLayerNorm } from "./layer_norm_bench.ts";
import { benchCompile, benchDispatch, benchElementwise, benchMatmuls, MATMUL_CASES } from "./matmul_bench.ts";
import { mergePeer } from "./peer_merge.ts";
import { writePeerPlan } from "./peer_plan.ts";
import { PEER_PYTHON, peerUnavailable, runPeer } from "./peer.ts";
import type { BenchRow } from "./shared.ts";

interface Options {
  embedBatches: number;
  trainSteps: number;
  memorySteps: number;
  /** Where the children write the files the peer reads; absent when the peer does not run. */
  exportDir?: string;
}

interface Job {
  rows: string[];
  kind: "gpu" | "host" | "child";
  run: (gpu: () => Promise<Gpu>, o: Options) => Promise<BenchRow[] | ChildReport | string>;
}

// Benchmarks of the host-side pipeline, each returning {name, unit, value, note?}; imported lazily so that a missing
// or broken one is reported instead of stopping the run.
function hostJob(row: string, module: string, exportName: string): Job {
  return {
    rows: [row],
    kind: "host",
    run: async () => {
      let mod: Record<string, unknown>;
      try {
        mod = await import(module);
      } catch (e) {
        return `skipped ${module}: ${(e as Error).message.split("\n")[0]}`;
      }
      const fn = mod[exportName];
      if (typeof fn !== "function") return `skipped ${module}: it has no ${exportName}()`;
      const r = await fn() as { name: string; unit: string; value: number; note?: string };
      return [{
        name: r.name,
        unit: r.unit,
        ours: Math.round(r.value * 100) / 100,
        peer: null,
        ratio: null,
        note: r.note,
      }];
    },
  };
}

const exportArgs = (o: Options) => (o.exportDir ? ["--export", o.exportDir] : []);

const JOBS: Job[] = [
  // The compile row must come first: later rows would load the kernel.
  { rows: ["pipeline_compile_matmul"], kind: "gpu", run: async (gpu) => [await benchCompile(await gpu())] },
  { rows: MATMUL_CASES.map((c) => c.name), kind: "gpu", run: async (gpu) => await benchMatmuls(await gpu()) },
  { rows: ["elementwise_add_16M"], kind: "gpu", run: async (gpu) => [await benchElementwise(await gpu())] },
  { rows: ["dispatch_overhead"], kind: "gpu", run: async (gpu) => [await benchDispatch(await gpu())] },
  { rows: ["attention_fwd_bwd"], kind: "gpu", run: async (gpu) => [await benchAttention(await gpu())] },
  { rows: ["layer_norm"], kind: "gpu", run: async (gpu) => [await benchLayerNorm(await gpu())] },
  hostJob("tokenizer", "./tokenizer_bench.ts", "benchTokenizer"),
  hostJob("decode_224", "./image_bench.ts", "benchDecode"),
  hostJob("tar_read", "./tar_bench.ts", "benchTar"),
  hostJob("loader_224", "./loader_bench.ts", "benchLoader"),
  {
    rows: ["vitb32_image_embed", "vitb32_text_embed", "vitb32_embed_peak_rss", "vitb32_embed_gpu_bytes"],
    kind: "child",
    run: (_, o) => runChild("./embed_bench.ts", ["--batches", String(o.embedBatches), ...exportArgs(o)]),
  },
  {
    rows: ["emoji_tiny_train", "emoji_tiny_train_peak_rss", "emoji_tiny_train_gpu_bytes"],
    kind: "child",
    run: (_, o) => runChild("./train_bench.ts", ["--steps", String(o.trainSteps), ...exportArgs(o)]),
  },
  {
    rows: ["emoji_tiny_train_rss_growth", "emoji_tiny_train_gpu_growth"],
    kind: "child",
    run: (_, o) =>
      o.memorySteps > 0
        ? runChild("./memory_bench.ts", ["--steps", String(o.memorySteps)], ["--v8-flags=--expose-gc"])
        : Promise.resolve("memory-growth rows skipped (--memory-steps 0)"),
  },
];

function table(rows: BenchRow[]): string {
  const header = ["name", "unit", "ours", "peer", "ratio", "note"];
  const cells = rows.map((r) => [
    r.name,
    r.unit,
    Number.isFinite(r.ours) ? String(r.ours) : "-",
    r.peer === null ? "-" : String(r.peer),
    r.ratio === null ? "-" : String(r.ratio),
    r.note ?? "",
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...cells.map((c) => (i === 5 ? 0 : c[i].length))));
  const line = (c: string[]) =>
    c.map((v, i) => (i === 5 ? v : i >= 2 && i <= 4 ? v.padStart(widths[i]) : v.padEnd(widths[i]))).join("  ");
  return [line(header), ...cells.map(line)].join("\n");
}

function adapterSummary(gpu: Gpu): Record<string, unknown> {
  const a = gpu.adapter;
  console.log(
    `adapter: ${a.description} | back end ${a.backend} | ${a.isSoftware ? `CPU, ${a.cpuLanes} lanes` : "GPU"}`,
  );
  return {
    description: a.description,
    backend: a.backend,
    isSoftware: a.isSoftware,
    lanes: a.cpuLanes,
    vendor: a.vendor,
    architecture: a.architecture,
    lpNativeVectorWidth: Deno.env.get("LP_NATIVE_VECTOR_WIDTH") ?? null,
    cpus: navigator.hardwareConcurrency,
  };
}

const positiveInt = (v: string, flag: string) => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${flag} must be a non-negative integer, got ${v}`);
  return n;
};

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      "skip-gpu": { type: "boolean", default: false },
      "skip-host": { type: "boolean", default: false },
      "skip-peer": { type: "boolean", default: false },
      only: { type: "string" },
      "memory-steps": { type: "string", default: "1000" },
      "embed-batches": { type: "string", default: "3" },
      "train-steps": { type: "string", default: "3" },
      out: { type: "string", default: new URL("./results.json", import.meta.url).pathname },
    },
  });
  const started = performance.now();
  const only = values.only ? new Set(values.only.split(",").map((s) => s.trim())) : null;
  const unknown = only ? [...only].filter((n) => !JOBS.some((j) => j.rows.includes(n))) : [];
  if (unknown.length) {
    console.error(`unknown rows: ${unknown.join(", ")}; rows are ${JOBS.flatMap((j) => j.rows).join(", ")}`);
    return 2;
  }
  const jobs = JOBS.filter((j) =>
    (!only || j.rows.some((r) => only.has(r))) &&
    !(values["skip-gpu"] && j.kind !== "host") && !(values["skip-host"] && j.kind === "host")
  );
  const options: Options = {
    embedBatches: Math.max(1, positiveInt(values["embed-batches"], "--embed-batches")),
    trainSteps: Math.max(1, positiveInt(values["train-steps"], "--train-steps")),
    memorySteps: positiveInt(values["memory-steps"], "--memory-steps"),
  };
  // Known before the children run, so that they write the peer's inputs only when it will read them.
  const peerMissing = values["skip-peer"] ? "skipped (--skip-peer)" : await peerUnavailable();
  if (!peerMissing) options.exportDir = await Deno.makeTempDir({ prefix: "clip-bench-peer-" });

  const rows: BenchRow[] = [];
  const notes: string[] = [];
  const checks: Record<string, unknown> = {};
  let gpu: Gpu | null = null;
  const gpuOnce = async () => gpu ??= await getGpu();
  let adapter: Record<string, unknown> = {};
  if (jobs.some((j) => j.kind !== "host")) adapter = adapterSummary(await gpuOnce());
  try {
    for (const job of jobs) {
      let result: BenchRow[] | ChildReport | string;
      try {
        result = await job.run(gpuOnce, options);
      } catch (e) {
        result = `${job.rows.join(", ")} failed: ${(e as Error).message.split("\n")[0]}`;
      }
      if (typeof result === "string") {
        notes.push(result);
        continue;
      }
      const report = Array.isArray(result) ? { rows: result } : result;
      Object.assign(checks, report.checks ?? {});
      rows.push(...report.rows.filter((r) => !only || only.has(r.name)));
    }
    adapter.oursThreads = navigator.hardwareConcurrency;
    if (peerMissing) {
      adapter.peer = `not available: ${peerMissing}`;
      notes.push(`peer not available: ${peerMissing}`);
    } else {
      const planPath = await writePeerPlan({
        dir: options.exportDir!,
        ran: (name) => rows.some((r) => r.name === name),
        exported: { embed: "imageEmbedding" in checks, train: "losses" in checks },
        embedBatches: options.embedBatches,
        trainSteps: options.trainSteps,
      });
      const peer = await runPeer(planPath);
      if (typeof peer === "string") {
        adapter.peer = `not available: ${peer}`;
        notes.push(`peer not available: ${peer}`);
      } else {
        mergePeer(rows, peer, checks);
        notes.push(...peer.errors.map((e) => `peer: ${e}`));
        adapter.peer = {
          python: `${PEER_PYTHON} ${peer.python}`,
          torch: peer.torch,
          blas: peer.blas,
          threadsTried: peer.threadsTried,
          threadsByRow: Object.fromEntries(Object.entries(peer.rows).map(([name, r]) => [name, r.threads])),
        };
      }
    }
  } finally {
    if (options.exportDir) await Deno.remove(options.exportDir, { recursive: true });
  }
  console.log(table(rows));
  for (const n of notes) console.log(n);
  console.log(`wall time ${((performance.now() - started) / 1000).toFixed(0)} s`);
  await Deno.writeTextFile(values.out!, JSON.stringify({ adapter, results: rows }, null, 2) + "\n");
  console.log(`wrote ${values.out}`);
  return 0;
}

if (import.meta.main) Deno.exit(await main());
