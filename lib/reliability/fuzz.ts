/**
 * The fuzz harness: runs a target's inputs (seed, 0..n-1) in a worker and sorts every input into accepted, skipped,
 * refused by a named error, or a failure: a crash (any other error), a hang (no answer within `hangMs`: the worker
 * is terminated and a new one continues after that input) or memory growth beyond what the input's size explains.
 */
import type { FuzzTargetName } from "./targets.ts";
import type { WorkerMessage, WorkerRequest } from "./fuzz_worker.ts";

export interface FuzzOptions {
  seed: number;
  inputs: number;
  /** An input running longer than this is a hang. Default 20 s. */
  hangMs?: number;
  /** Memory an input of `bytes` may add. Default 64 MiB + 32 x its size. */
  memoryLimit?: (bytes: number) => number;
  /** Called after each input. */
  onProgress?: (done: number, total: number) => void;
}

export interface FuzzFailure {
  index: number;
  kind: string;
  message: string;
}

export interface FuzzReport {
  target: FuzzTargetName;
  seed: number;
  /** Inputs that ran to an outcome (hangs included). */
  inputs: number;
  /** Counts by outcome: `accepted`, `skipped`, or the refusing error's name (and kind). */
  outcomes: Record<string, number>;
  /** Counts by input class. */
  kinds: Record<string, number>;
  crashes: FuzzFailure[];
  hangs: FuzzFailure[];
  /** Inputs whose memory growth exceeded the limit. */
  memory: FuzzFailure[];
  /** Largest memory growth of one input, in bytes. */
  maxMemoryBytes: number;
  /** Slowest input, in milliseconds. */
  maxMs: number;
  seconds: number;
}

const defaultMemoryLimit = (bytes: number) => 64 * 2 ** 20 + 32 * bytes;

function bump(counts: Record<string, number>, key: string): void {
  counts[key] = (counts[key] ?? 0) + 1;
}

/** Runs `inputs` inputs of a target; never throws for what an input does. */
export async function runFuzz(target: FuzzTargetName, opts: FuzzOptions): Promise<FuzzReport> {
  const hangMs = opts.hangMs ?? 20_000;
  const memoryLimit = opts.memoryLimit ?? defaultMemoryLimit;
  const report: FuzzReport = {
    target,
    seed: opts.seed,
    inputs: 0,
    outcomes: {},
    kinds: {},
    crashes: [],
    hangs: [],
    memory: [],
    maxMemoryBytes: 0,
    maxMs: 0,
    seconds: 0,
  };
  const started = performance.now();
  let next = 0;
  while (next < opts.inputs) {
    next = await runWorker(target, next, opts, hangMs, memoryLimit, report);
  }
  report.seconds = (performance.now() - started) / 1000;
  return report;
}

/** One worker from input `from` on; returns where the next worker must start (after a hang or crash, or the end). */
function runWorker(
  target: FuzzTargetName,
  from: number,
  opts: FuzzOptions,
  hangMs: number,
  memoryLimit: (bytes: number) => number,
  report: FuzzReport,
): Promise<number> {
  const worker = new Worker(new URL("./fuzz_worker.ts", import.meta.url).href, { type: "module" });
  return new Promise((resolve) => {
    let ready = false;
    let current = { index: from, kind: "(seeds)" };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const finish = (resumeAt: number) => {
      clearTimeout(timer);
      worker.terminate();
      resolve(resumeAt);
    };
    const fail = (list: FuzzFailure[], message: string) => {
      list.push({ ...current, message });
      report.inputs++;
      bump(report.kinds, current.kind);
      finish(current.index + 1);
    };
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        if (!ready) {
          report.crashes.push({ ...current, message: `preparing the target took over ${hangMs} ms` });
          return finish(opts.inputs);
        }
        fail(report.hangs, `no result after ${hangMs} ms`);
      }, hangMs);
    };
    worker.onmessage = (event: MessageEvent<WorkerMessage>) => {
      const m = event.data;
      if (m.type === "ready") ready = true;
      else if (m.type === "start") current = { index: m.index, kind: m.kind };
      else if (m.type === "done") {
        report.inputs++;
        bump(report.kinds, m.kind);
        report.maxMemoryBytes = Math.max(report.maxMemoryBytes, m.memoryBytes);
        report.maxMs = Math.max(report.maxMs, m.ms);
        const o = m.outcome;
        if (o.type === "crash") report.crashes.push({ index: m.index, kind: m.kind, message: o.message });
        else bump(report.outcomes, o.type === "refused" ? o.label : o.type);
        if (m.memoryBytes > memoryLimit(m.inputBytes)) {
          report.memory.push({
            index: m.index,
            kind: m.kind,
            message: `grew memory by ${m.memoryBytes} bytes for a ${m.inputBytes}-byte input`,
          });
        }
        opts.onProgress?.(m.index + 1, opts.inputs);
      } else if (m.type === "end") return finish(opts.inputs);
      arm();
    };
    worker.onerror = (event) => {
      event.preventDefault();
      if (!ready) {
        report.crashes.push({ ...current, message: `the target could not be prepared: ${event.message}` });
        return finish(opts.inputs);
      }
      // An error that escaped the worker's own handling (e.g. a rejection in a callback) belongs to the input running.
      fail(report.crashes, `uncaught in the worker: ${event.message}`);
    };
    const request: WorkerRequest = { target, seed: opts.seed, from, to: opts.inputs };
    worker.postMessage(request);
    arm();
  });
}
