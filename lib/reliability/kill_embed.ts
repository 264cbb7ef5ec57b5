/**
 * `clip embed` killed with SIGKILL and started again, as many times as asked, then run to the end. Checked: the
 * restart reports the finished parts as done; those parts' files are never rewritten (same inode and modification
 * time); no `.partial` file is left; and every part's embeddings and metadata equal an uninterrupted run's, byte for
 * byte.
 */
import { Rng } from "../data/rng.ts";
import { ClipProcess, makeImageShards, runClip, waitFor } from "./cli_process.ts";

export interface EmbedKillOptions {
  workDir: string;
  kills: number;
  seed: number;
  shards?: number;
  samplesPerShard?: number;
  onEvent?: (line: string) => void;
}

export interface EmbedKillReport {
  kills: number;
  parts: number;
  /** Restarts after a kill, and those that reported exactly the parts finished before the kill as done. */
  resumes: number;
  resumesVerified: number;
  /** Parts finished before a kill and left untouched by the restarts. */
  partsKept: number;
  /** Parts whose files differ from the uninterrupted run's, or are missing. */
  partsDiffering: number;
  /** Embedding rows missing from the final output compared with the uninterrupted run. */
  rowsLost: number;
  problems: string[];
  seconds: number;
}

const SUBFOLDERS = ["img_emb", "metadata"] as const;

function embedArgs(data: string, out: string): string[] {
  return ["embed", "--model", "test-vit-micro", "--images", data, "--out", out, "--batch-size", "4"];
}

/** Names of the finished parts (metadata and embeddings both present), with a fingerprint of their files. */
async function finishedParts(out: string): Promise<Map<string, string>> {
  const parts = new Map<string, string>();
  try {
    for await (const e of Deno.readDir(`${out}/img_emb`)) {
      const m = /^img_emb_(\d+)\.npy$/.exec(e.name);
      if (!m) continue;
      const files = [`${out}/img_emb/${e.name}`, `${out}/metadata/metadata_${m[1]}.parquet`];
      try {
        const stats = await Promise.all(files.map((f) => Deno.stat(f)));
        parts.set(m[1], stats.map((s) => `${s.ino}:${s.mtime?.getTime()}`).join(","));
      } catch {
        // embeddings without metadata cannot happen (metadata is renamed first); not finished either way
      }
    }
  } catch {
    // nothing written yet
  }
  return parts;
}

async function filesUnder(dir: string): Promise<string[]> {
  const names: string[] = [];
  for (const sub of SUBFOLDERS) {
    try {
      for await (const e of Deno.readDir(`${dir}/${sub}`)) names.push(`${sub}/${e.name}`);
    } catch {
      // absent
    }
  }
  return names.sort();
}

function npyRows(bytes: Uint8Array): number {
  const headerLength = bytes[8] | (bytes[9] << 8);
  const header = new TextDecoder().decode(bytes.subarray(10, 10 + headerLength));
  return Number(/'shape': \((\d+),/.exec(header)?.[1] ?? 0);
}

export async function runEmbedKillCycles(opts: EmbedKillOptions): Promise<EmbedKillReport> {
  const started = performance.now();
  const log = opts.onEvent ?? (() => {});
  const rng = new Rng(opts.seed);
  const dataDir = `${opts.workDir}/data`;
  await Deno.mkdir(dataDir, { recursive: true });
  const shards = opts.shards ?? 6;
  const data = await makeImageShards(dataDir, shards, opts.samplesPerShard ?? 40);
  const reference = await runClip(embedArgs(data, `${opts.workDir}/reference`));
  if (reference.code !== 0) throw new Error(`the uninterrupted embed failed: ${reference.stderr}`);

  const out = `${opts.workDir}/killed`;
  const report: EmbedKillReport = {
    kills: 0,
    parts: shards,
    resumes: 0,
    resumesVerified: 0,
    partsKept: 0,
    partsDiffering: 0,
    rowsLost: 0,
    problems: [],
    seconds: 0,
  };
  const kept = new Map<string, string>(); // part -> fingerprint when first seen finished
  for (let k = 0; k < opts.kills; k++) {
    const before = await finishedParts(out);
    if (before.size === shards) break;
    const process = new ClipProcess(embedArgs(data, out));
    // Kill once one more part is finished, a moment later: usually in the middle of the next part.
    const progressed = await waitFor(async () => (await finishedParts(out)).size > before.size, process, 120_000, 5);
    if (progressed) await new Promise((r) => setTimeout(r, rng.int(120)));
    process.kill();
    const { code, stderr } = await process.wait();
    if (k > 0) {
      report.resumes++;
      if (stderr.includes(`${before.size} already done`)) report.resumesVerified++;
      else report.problems.push(`restart ${k + 1} did not report ${before.size} parts done: ${stderr.slice(0, 300)}`);
    }
    if (code === 0) {
      log(`kill ${k + 1}: embed finished before the kill`);
      break;
    }
    report.kills++;
    const after = await finishedParts(out);
    for (const [part, fingerprint] of after) if (!kept.has(part)) kept.set(part, fingerprint);
    log(`kill ${k + 1}: ${after.size} of ${shards} parts finished`);
  }
  const doneBefore = (await finishedParts(out)).size;
  const final = await runClip(embedArgs(data, out));
  if (final.code !== 0) report.problems.push(`the final run failed: ${final.stderr.slice(-400)}`);
  report.resumes++;
  if (!final.stderr.includes(`${doneBefore} already done`)) {
    report.problems.push(`the final run did not report ${doneBefore} parts done`);
  } else report.resumesVerified++;

  const now = await finishedParts(out);
  for (const [part, fingerprint] of kept) {
    if (now.get(part) === fingerprint) report.partsKept++;
    else report.problems.push(`part ${part} was rewritten after it had finished`);
  }
  const left = (await filesUnder(out)).filter((f) => f.endsWith(".partial"));
  if (left.length > 0) report.problems.push(`partial files left: ${left.join(", ")}`);
  const expected = await filesUnder(`${opts.workDir}/reference`);
  for (const name of expected) {
    const a = await Deno.readFile(`${opts.workDir}/reference/${name}`);
    const b = await Deno.readFile(`${out}/${name}`).catch(() => null);
    if (name.endsWith(".npy")) report.rowsLost += Math.max(0, npyRows(a) - (b ? npyRows(b) : 0));
    if (!b || a.length !== b.length || !a.every((x, i) => x === b[i])) {
      report.partsDiffering++;
      report.problems.push(`${name} differs from the uninterrupted run's`);
    }
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}
