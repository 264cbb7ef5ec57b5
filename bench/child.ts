/**
 * Workloads that run in a process of their own, so that each one's peak memory is its own: the bench starts
 * `deno run -A bench/<script>.ts --json ...` and reads one JSON report from the last line of its stdout; the child's
 * progress goes to stderr, which the bench passes through.
 */
import type { BenchRow } from "./shared.ts";

export interface ChildReport {
  rows: BenchRow[];
  /** Values the bench compares with the peer's (embeddings, losses). */
  checks?: Record<string, unknown>;
}

const REPO_ROOT = new URL("..", import.meta.url).pathname;

export async function runChild(script: string, args: string[] = [], denoFlags: string[] = []): Promise<ChildReport> {
  const path = new URL(script, import.meta.url).pathname;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", ...denoFlags, path, "--json", ...args],
    cwd: REPO_ROOT,
    stdout: "piped",
    stderr: "inherit",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).trim().split("\n");
  if (!out.success) throw new Error(`${script} exited with code ${out.code}`);
  return JSON.parse(lines[lines.length - 1]) as ChildReport;
}

/** How a child script ends: the JSON report for the bench, or readable lines when run by hand. */
export function printReport(report: ChildReport, json: boolean): void {
  if (json) {
    console.log(JSON.stringify(report));
    return;
  }
  for (const r of report.rows) console.log(`${r.name}: ${r.ours} ${r.unit}${r.note ? ` (${r.note})` : ""}`);
}
