/**
 * `deno task bench`: runs every benchmark, prints the adapter and a table, and writes bench/results.json as
 * {"adapter": {...}, "results": [{name, unit, ours, peer, ratio, note?}]}. peer and ratio stay null until a
 * reference implementation is measured beside ours.
 *
 * Flags: --skip-gpu, --skip-host (tokenizer and image loader), --out FILE.
 */
import { parseArgs } from "node:util";
import { getGpu } from "../lib/gpu/runtime.ts";
import { benchCompile, benchDispatch, benchElementwise, benchMatmuls } from "./matmul_bench.ts";
import type { BenchRow } from "./shared.ts";

interface HostBench {
  module: string;
  exportName: string;
}

// Benchmarks of the host-side pipeline, each returning {name, unit, value}; imported lazily so that a missing or
// broken one is reported instead of stopping the run.
const HOST_BENCHES: HostBench[] = [
  { module: "./tokenizer_bench.ts", exportName: "benchTokenizer" },
  { module: "./image_bench.ts", exportName: "benchDecode" },
  { module: "./tar_bench.ts", exportName: "benchTar" },
  { module: "./loader_bench.ts", exportName: "benchLoader" },
];

async function runHostBench(b: HostBench): Promise<BenchRow | string> {
  let mod: Record<string, unknown>;
  try {
    mod = await import(b.module);
  } catch (e) {
    return `skipped ${b.module}: ${(e as Error).message.split("\n")[0]}`;
  }
  const fn = mod[b.exportName];
  if (typeof fn !== "function") return `skipped ${b.module}: it has no ${b.exportName}()`;
  const r = await fn() as { name: string; unit: string; value: number; note?: string };
  return { name: r.name, unit: r.unit, ours: Math.round(r.value * 100) / 100, peer: null, ratio: null, note: r.note };
}

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

async function main(): Promise<number> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      "skip-gpu": { type: "boolean", default: false },
      "skip-host": { type: "boolean", default: false },
      out: { type: "string", default: new URL("./results.json", import.meta.url).pathname },
    },
  });
  const rows: BenchRow[] = [];
  const notes: string[] = [];
  let adapter: Record<string, unknown> = {};
  if (!values["skip-gpu"]) {
    const gpu = await getGpu();
    const a = gpu.adapter;
    adapter = {
      description: a.description,
      backend: a.backend,
      isSoftware: a.isSoftware,
      lanes: a.cpuLanes,
      vendor: a.vendor,
      architecture: a.architecture,
      lpNativeVectorWidth: Deno.env.get("LP_NATIVE_VECTOR_WIDTH") ?? null,
      cpus: navigator.hardwareConcurrency,
    };
    console.log(
      `adapter: ${a.description} | back end ${a.backend} | ${a.isSoftware ? `CPU, ${a.cpuLanes} lanes` : "GPU"}`,
    );
    // The compile row must come first: later rows would load the kernel.
    rows.push(await benchCompile(gpu));
    rows.push(...await benchMatmuls(gpu));
    rows.push(await benchElementwise(gpu));
    rows.push(await benchDispatch(gpu));
  }
  if (!values["skip-host"]) {
    for (const b of HOST_BENCHES) {
      const r = await runHostBench(b);
      if (typeof r === "string") notes.push(r);
      else rows.push(r);
    }
  }
  console.log(table(rows));
  for (const n of notes) console.log(n);
  await Deno.writeTextFile(values.out, JSON.stringify({ adapter, results: rows }, null, 2) + "\n");
  console.log(`wrote ${values.out}`);
  return 0;
}

if (import.meta.main) Deno.exit(await main());
