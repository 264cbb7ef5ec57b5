/**
 * `clip train` killed with SIGKILL again and again, resumed with `--resume latest` each time, then run to the end.
 * Kill moments: while a checkpoint is being written (as soon as its temporary folder appears), shortly after a new
 * checkpoint, or at a random time (startup, mid-step, anywhere). Checked after every kill:
 *  - every folder with a step name is a complete, readable checkpoint (no partial one can be taken as the latest);
 *  - findLatestCheckpoint names the newest of them, and the resumed run says it resumes from exactly that one;
 * and at the end, every step's loss in the log equals the uninterrupted run's, each step logged once.
 */
import { Rng } from "../data/rng.ts";
import { SafetensorsFile } from "../io/safetensors.ts";
import { findLatestCheckpoint } from "../train/checkpoint.ts";
import { ClipProcess, makeImageShards, runClip, waitFor } from "./cli_process.ts";
import { pick } from "./mutate.ts";

export type KillMoment = "mid-checkpoint" | "after-checkpoint" | "random-time";

export interface TrainKillOptions {
  workDir: string;
  kills: number;
  seed: number;
  /** Kill moments in order; drawn at random (seeded) when absent. */
  moments?: KillMoment[];
  /** Epochs of 6 steps each. */
  epochs: number;
  /** Latest moment of a random-time kill after the start. Default 6000 ms. */
  randomTimeMaxMs?: number;
  onEvent?: (line: string) => void;
}

export interface TrainKillReport {
  kills: number;
  byMoment: Record<KillMoment, number>;
  /** Kills that left a checkpoint's temporary folder behind: the process died while writing it. */
  killedWhileWritingCheckpoint: number;
  /** Restarts that resumed from a checkpoint, and how many of those resumed from the expected one. */
  resumes: number;
  resumesVerified: number;
  steps: number;
  /** Steps whose loss after all the kills equals the uninterrupted run's. */
  stepsEqual: number;
  problems: string[];
  seconds: number;
}

function trainArgs(data: string, out: string, epochs: number, extra: string[] = []): string[] {
  return [
    "train",
    ...["--model", "test-vit-micro", "--train-data", data, "--out", out, "--batch-size", "6"],
    ...["--epochs", String(epochs), "--lr", "5e-3", "--warmup", "3", "--save-every", "1"],
    ...["--workers", "2", "--shuffle-buffer", "8", ...extra],
  ];
}

async function readLosses(out: string): Promise<{ losses: Map<number, number>; duplicates: number }> {
  const losses = new Map<number, number>();
  let duplicates = 0;
  const text = await Deno.readTextFile(`${out}/log.jsonl`).catch(() => "");
  for (const line of text.split("\n").filter(Boolean)) {
    const entry = JSON.parse(line);
    if (typeof entry.loss !== "number") continue;
    if (losses.has(entry.step)) duplicates++;
    losses.set(entry.step, entry.loss);
  }
  return { losses, duplicates };
}

async function isReadableCheckpoint(path: string, step: number): Promise<boolean> {
  try {
    const state = JSON.parse(await Deno.readTextFile(`${path}/state.json`));
    if (state.step !== step) return false;
    JSON.parse(await Deno.readTextFile(`${path}/open_clip_config.json`));
    for (const f of ["open_clip_model.safetensors", "optimizer.safetensors"]) {
      (await SafetensorsFile.open(`${path}/${f}`)).close();
    }
    return true;
  } catch {
    return false;
  }
}

/** The newest checkpoint that reads back completely, checked independently of the trainer; notes partial ones. */
async function newestReadableCheckpoint(out: string, problems: string[]): Promise<string | null> {
  const root = `${out}/checkpoints`;
  let best: { step: number; path: string } | null = null;
  try {
    for await (const e of Deno.readDir(root)) {
      const m = /^step-(\d+)$/.exec(e.name);
      if (!m || !e.isDirectory) continue;
      const path = `${root}/${e.name}`;
      if (!(await isReadableCheckpoint(path, Number(m[1])))) {
        problems.push(`${e.name} carries a step name but does not read back completely`);
        continue;
      }
      if (!best || Number(m[1]) > best.step) best = { step: Number(m[1]), path };
    }
  } catch {
    return null;
  }
  return best?.path ?? null;
}

async function writingCheckpoint(out: string): Promise<boolean> {
  try {
    for await (const e of Deno.readDir(`${out}/checkpoints`)) {
      if (/^step-\d+\.tmp-\d+$/.test(e.name)) return true;
    }
  } catch {
    // not created yet
  }
  return false;
}

function stepOf(path: string | null): number {
  return path ? Number(/step-(\d+)$/.exec(path)![1]) : 0;
}

export async function runTrainKillCycles(opts: TrainKillOptions): Promise<TrainKillReport> {
  const started = performance.now();
  const log = opts.onEvent ?? (() => {});
  const rng = new Rng(opts.seed);
  const report: TrainKillReport = {
    kills: 0,
    byMoment: { "mid-checkpoint": 0, "after-checkpoint": 0, "random-time": 0 },
    killedWhileWritingCheckpoint: 0,
    resumes: 0,
    resumesVerified: 0,
    steps: 6 * opts.epochs,
    stepsEqual: 0,
    problems: [],
    seconds: 0,
  };
  const dataDir = `${opts.workDir}/data`;
  await Deno.mkdir(dataDir, { recursive: true });
  const data = await makeImageShards(dataDir, 3, 12);
  const reference = await runClip(trainArgs(data, `${opts.workDir}/reference`, opts.epochs));
  if (reference.code !== 0) throw new Error(`the uninterrupted run failed: ${reference.stderr}`);
  const expectedLosses = (await readLosses(`${opts.workDir}/reference`)).losses;
  log(`uninterrupted run: ${expectedLosses.size} steps`);

  const out = `${opts.workDir}/killed`;
  /** Starts a run, resuming when a checkpoint exists, and checks that it resumes from the newest readable one. */
  const start = async (): Promise<{ process: ClipProcess; from: number }> => {
    const expected = await newestReadableCheckpoint(out, report.problems);
    const chosen = await findLatestCheckpoint(out);
    if (chosen !== expected) {
      report.problems.push(`findLatestCheckpoint chose ${chosen}, the newest readable checkpoint is ${expected}`);
    }
    const process = new ClipProcess(trainArgs(data, out, opts.epochs, expected ? ["--resume", "latest"] : []));
    if (expected) {
      report.resumes++;
      await waitFor(() => process.stderr.includes("resuming from"), process, 120_000, 20);
      if (process.stderr.includes(`resuming from ${expected}`)) report.resumesVerified++;
      else report.problems.push(`restart did not resume from ${expected}: ${process.stderr.slice(0, 300)}`);
    }
    return { process, from: stepOf(expected) };
  };

  for (let k = 0; k < opts.kills; k++) {
    const moment = opts.moments?.[k] ??
      pick(rng, ["mid-checkpoint", "mid-checkpoint", "after-checkpoint", "after-checkpoint", "random-time"] as const);
    const { process, from } = await start();
    let ready: boolean;
    if (moment === "mid-checkpoint") {
      ready = await waitFor(() => writingCheckpoint(out), process, 120_000, 2);
    } else if (moment === "after-checkpoint") {
      ready = await waitFor(async () => stepOf(await findLatestCheckpoint(out)) > from, process, 120_000, 10);
      if (ready) await new Promise((r) => setTimeout(r, rng.int(500)));
    } else {
      await new Promise((r) => setTimeout(r, 200 + rng.int(opts.randomTimeMaxMs ?? 6000)));
      ready = true;
    }
    process.kill();
    const { code } = await process.wait();
    if (!ready || code === 0) {
      log(`kill ${k + 1}: the run ended (code ${code}) before the ${moment} moment; no more kills`);
      if (code !== 0) {
        report.problems.push(`run ended with code ${code} before its kill: ${process.stderr.slice(-400)}`);
      }
      break;
    }
    report.kills++;
    report.byMoment[moment]++;
    const whileWriting = await writingCheckpoint(out);
    if (whileWriting) report.killedWhileWritingCheckpoint++;
    log(`kill ${k + 1} (${moment}${whileWriting ? ", checkpoint half-written" : ""}) after resuming at step ${from}`);
  }

  const { process } = await start();
  const final = await process.wait();
  if (final.code !== 0) report.problems.push(`the final run failed: ${final.stderr.slice(-500)}`);
  const { losses, duplicates } = await readLosses(out);
  if (duplicates > 0) report.problems.push(`${duplicates} steps are logged twice`);
  for (const [step, loss] of expectedLosses) {
    if (losses.get(step) === loss) report.stepsEqual++;
    else report.problems.push(`step ${step}: loss ${losses.get(step)} after the kills, ${loss} uninterrupted`);
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}
