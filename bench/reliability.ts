/**
 * `deno task reliability`: fuzzing, fault injection and hostile inputs, ending in one table (stdout). Progress goes
 * to stderr. Exit code 1 when any check failed.
 *
 *   --inputs N        fuzz inputs per target (default 2000)
 *   --targets a,b     fuzz targets (default all: tar, safetensors, tokenizer, image, config)
 *   --kills N         kill -9 cycles of clip train (default 20)
 *   --embed-kills N   kill -9 cycles of clip embed (default 5)
 *   --shards N        remote shards behind the fault server (default 24)
 *   --seed N          (default 1)
 *   --fuzz-only       only the fuzz targets (`deno task fuzz`)
 */
import { parseArgs } from "node:util";
import { runFuzz } from "../lib/reliability/fuzz.ts";
import { runGpuLimitChecks } from "../lib/reliability/gpu_limits.ts";
import { runEmbedKillCycles } from "../lib/reliability/kill_embed.ts";
import { runTrainKillCycles } from "../lib/reliability/kill_train.ts";
import { runOutputFaults } from "../lib/reliability/output_faults.ts";
import { runRemoteShardFaults } from "../lib/reliability/remote_shards.ts";
import { runSecurityChecks } from "../lib/reliability/security.ts";
import {
  checkRows,
  embedKillRow,
  formatTable,
  fuzzRow,
  remoteRows,
  type Row,
  trainKillRow,
} from "../lib/reliability/table.ts";
import { FUZZ_TARGET_NAMES, type FuzzTargetName } from "../lib/reliability/targets.ts";

const { values: v } = parseArgs({
  args: Deno.args,
  options: {
    inputs: { type: "string", default: "2000" },
    targets: { type: "string" },
    kills: { type: "string", default: "20" },
    "embed-kills": { type: "string", default: "5" },
    shards: { type: "string", default: "24" },
    seed: { type: "string", default: "1" },
    "fuzz-only": { type: "boolean", default: false },
  },
});

const seed = Number(v.seed);
const targets = (v.targets?.split(",") ?? FUZZ_TARGET_NAMES) as FuzzTargetName[];
for (const t of targets) {
  if (!FUZZ_TARGET_NAMES.includes(t)) throw new Error(`unknown target ${t}; known: ${FUZZ_TARGET_NAMES.join(", ")}`);
}
const note = (m: string) => console.error(`reliability: ${m}`);
const rows: Row[] = [];
const started = performance.now();

for (const target of targets) {
  const inputs = Number(v.inputs);
  let shown = 0;
  const report = await runFuzz(target, {
    seed,
    inputs,
    onProgress: (done) => {
      if (done - shown >= inputs / 10) {
        shown = done;
        note(`fuzz ${target}: ${done}/${inputs}`);
      }
    },
  });
  for (const f of [...report.crashes, ...report.hangs, ...report.memory]) {
    note(`fuzz ${target}: input ${f.index} (${f.kind}, seed ${seed}): ${f.message}`);
  }
  rows.push(fuzzRow(report));
}

if (!v["fuzz-only"]) {
  const work = await Deno.makeTempDir({ prefix: "clip-reliability-" });
  try {
    note("remote shards through the fault-injecting server");
    rows.push(...remoteRows(await runRemoteShardFaults({ seed, shards: Number(v.shards) })));
    note(`clip train: ${v.kills} kill -9 cycles`);
    const train = await runTrainKillCycles({
      workDir: `${work}/train`,
      kills: Number(v.kills),
      seed,
      epochs: 4,
      onEvent: (m) => note(`train: ${m}`),
    });
    rows.push(trainKillRow(train));
    note(`clip embed: ${v["embed-kills"]} kill -9 cycles`);
    const embed = await runEmbedKillCycles({
      workDir: `${work}/embed`,
      kills: Number(v["embed-kills"]),
      seed,
      shards: 8,
      onEvent: (m) => note(`embed: ${m}`),
    });
    rows.push(embedKillRow(embed));
    note("output problems");
    await Deno.mkdir(`${work}/output`);
    rows.push(...checkRows("output", await runOutputFaults(`${work}/output`)));
    note("GPU limits");
    await Deno.mkdir(`${work}/gpu`);
    rows.push(...checkRows("gpu", await runGpuLimitChecks(`${work}/gpu`)));
    note("security");
    await Deno.mkdir(`${work}/security`);
    rows.push(...checkRows("security", await runSecurityChecks(`${work}/security`)));
  } finally {
    await Deno.remove(work, { recursive: true }).catch(() => {});
  }
}

note(`done in ${((performance.now() - started) / 1000).toFixed(0)} s`);
console.log(formatTable(rows));
Deno.exit(rows.every((r) => r.ok) ? 0 : 1);
