/**
 * The reliability table: one row per fuzz target, fault kind, resume scenario, output problem, GPU limit and
 * security check, with what was thrown at it and what came out (crashes, hangs, samples lost, resumes verified).
 */
import type { FaultKind } from "./fault_server.ts";
import type { FuzzReport } from "./fuzz.ts";
import type { EmbedKillReport } from "./kill_embed.ts";
import type { TrainKillReport } from "./kill_train.ts";
import type { RemoteShardReport } from "./remote_shards.ts";

export interface Row {
  area: string;
  check: string;
  /** Inputs fuzzed or faults injected. */
  count: number;
  outcome: string;
  crashes: number;
  hangs: number;
  /** Samples or rows lost that should not have been; "-" where it does not apply. */
  lost: string;
  /** Resumes verified out of resumes made; "-" where it does not apply. */
  resumes: string;
  ok: boolean;
}

export interface CheckResult {
  check: string;
  ok: boolean;
  detail: string;
  method?: string;
}

function topOutcomes(outcomes: Record<string, number>, n = 3): string {
  const sorted = Object.entries(outcomes).sort((a, b) => b[1] - a[1]);
  const shown = sorted.slice(0, n).map(([k, v]) => `${k} ${v}`);
  if (sorted.length > n) shown.push(`${sorted.length - n} more kinds`);
  return shown.join(", ");
}

export function fuzzRow(r: FuzzReport): Row {
  const problems = r.memory.length > 0 ? `; ${r.memory.length} over the memory bound` : "";
  return {
    area: "fuzz",
    check: r.target,
    count: r.inputs,
    outcome: `${topOutcomes(r.outcomes)}; max ${(r.maxMemoryBytes / 2 ** 20).toFixed(0)} MiB, ${
      (r.maxMs / 1000).toFixed(1)
    } s per input${problems}`,
    crashes: r.crashes.length,
    hangs: r.hangs.length,
    lost: "-",
    resumes: "-",
    ok: r.crashes.length === 0 && r.hangs.length === 0 && r.memory.length === 0,
  };
}

export function remoteRows(r: RemoteShardReport): Row[] {
  const rows: Row[] = (Object.entries(r.injected) as [FaultKind, number][]).map(([kind, count]) => ({
    area: "faults",
    check: `remote shard: ${kind}`,
    count,
    outcome: "injected",
    crashes: 0,
    hangs: 0,
    lost: "-",
    resumes: "-",
    ok: true,
  }));
  rows.push({
    area: "faults",
    check: `remote shards: retries over ${r.shards} shards`,
    count: r.retries,
    outcome: `${r.shardsGivenUp} shards given up, warned and counted; ${r.samplesRead} samples ` +
      `read in ${r.seconds.toFixed(1)} s${r.problems.length ? `; ${r.problems.join("; ")}` : ""}`,
    crashes: 0,
    hangs: 0,
    lost: `${r.samplesLost} (+${r.samplesSkippedCounted} counted)`,
    resumes: "-",
    ok: r.problems.length === 0,
  });
  return rows;
}

export function trainKillRow(r: TrainKillReport): Row {
  return {
    area: "resume",
    check: "clip train: kill -9",
    count: r.kills,
    outcome:
      `${r.byMoment["mid-checkpoint"]} mid-checkpoint, ${r.byMoment["after-checkpoint"]} after a checkpoint, ${
        r.byMoment["random-time"]
      } random; ${r.killedWhileWritingCheckpoint} left a half-written checkpoint; ${r.stepsEqual}/${r.steps} losses equal` +
      (r.problems.length ? `; ${r.problems.join("; ")}` : ""),
    crashes: 0,
    hangs: 0,
    lost: r.stepsEqual === r.steps ? "0" : `${r.steps - r.stepsEqual} steps`,
    resumes: `${r.resumesVerified}/${r.resumes}`,
    ok: r.problems.length === 0 && r.stepsEqual === r.steps && r.resumesVerified === r.resumes,
  };
}

export function embedKillRow(r: EmbedKillReport): Row {
  return {
    area: "resume",
    check: "clip embed: kill -9",
    count: r.kills,
    outcome: `${r.partsKept} finished parts kept, ${r.parts - r.partsDiffering}/${r.parts} parts equal` +
      (r.problems.length ? `; ${r.problems.join("; ")}` : ""),
    crashes: 0,
    hangs: 0,
    lost: String(r.rowsLost),
    resumes: `${r.resumesVerified}/${r.resumes}`,
    ok: r.problems.length === 0 && r.rowsLost === 0,
  };
}

export function checkRows(area: string, results: readonly CheckResult[]): Row[] {
  return results.map((r) => ({
    area,
    check: r.method ? `${r.check} (${r.method})` : r.check,
    count: 1,
    outcome: r.detail.length > 160 ? `${r.detail.slice(0, 157)}...` : r.detail,
    crashes: 0,
    hangs: 0,
    lost: "-",
    resumes: "-",
    ok: r.ok,
  }));
}

/** A plain-text table (Markdown pipes), with totals. */
export function formatTable(rows: readonly Row[]): string {
  const header = [
    "area",
    "check",
    "inputs/faults",
    "crashes",
    "hangs",
    "samples lost",
    "resumes verified",
    "status",
    "outcome",
  ];
  const body = rows.map((r) => [
    r.area,
    r.check,
    String(r.count),
    String(r.crashes),
    String(r.hangs),
    r.lost,
    r.resumes,
    r.ok ? "ok" : "FAIL",
    r.outcome,
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  const failed = rows.filter((r) => !r.ok).length;
  const total = (f: (r: Row) => number) => rows.reduce((n, r) => n + f(r), 0);
  return [
    line(header),
    line(widths.map((w) => "-".repeat(w))),
    ...body.map(line),
    "",
    `${total((r) => (r.area === "fuzz" ? r.count : 0))} inputs fuzzed; ${total((r) => r.crashes)} crashes, ${
      total((r) => r.hangs)
    } hangs; ${failed} of ${rows.length} checks failed`,
  ].join("\n");
}
