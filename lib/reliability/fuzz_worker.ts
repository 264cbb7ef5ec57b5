/**
 * Runs fuzz inputs in a worker so that the harness can stop one that hangs (even in a synchronous loop) and measure
 * each input's memory on its own. Messages out: `ready` after the target's seeds are built, `start` and `done` around
 * each input, `end` after the last.
 */
import { Rng } from "../data/rng.ts";
import { fuzzTarget, type FuzzTargetName } from "./targets.ts";

export interface WorkerRequest {
  target: FuzzTargetName;
  seed: number;
  from: number;
  to: number;
}

export type Outcome =
  | { type: "accepted" | "skipped" }
  | { type: "refused"; label: string }
  | { type: "crash"; label: string; message: string };

export type WorkerMessage =
  | { type: "ready" }
  | { type: "start"; index: number; kind: string }
  | { type: "done"; index: number; kind: string; outcome: Outcome; ms: number; memoryBytes: number; inputBytes: number }
  | { type: "end" };

interface WorkerScope {
  postMessage(message: WorkerMessage): void;
  onmessage: ((event: MessageEvent<WorkerRequest>) => void) | null;
}

const scope = self as unknown as WorkerScope;

function classify(e: unknown, refusals: readonly string[]): Outcome {
  const error = e instanceof Error ? e : new Error(String(e));
  if (refusals.includes(error.name)) {
    const kind = (error as { kind?: unknown }).kind;
    return { type: "refused", label: typeof kind === "string" ? `${error.name}:${kind}` : error.name };
  }
  const where = error.stack?.split("\n").slice(1, 3).map((l) => l.trim()).join(" ") ?? "";
  return { type: "crash", label: error.name, message: `${error.name}: ${error.message} ${where}`.slice(0, 500) };
}

/** Bytes this input added: JavaScript heap plus array buffers, or the process's resident memory, whichever grew more. */
function growth(before: Deno.MemoryUsage, after: Deno.MemoryUsage): number {
  const js = after.heapUsed + after.external - (before.heapUsed + before.external);
  return Math.max(0, js, after.rss - before.rss);
}

scope.onmessage = async (event) => {
  const { target: name, seed, from, to } = event.data;
  const target = fuzzTarget(name);
  const state = await target.prepare();
  scope.postMessage({ type: "ready" });
  for (let index = from; index < to; index++) {
    const rng = Rng.derive(seed, index);
    const input = target.generate(state, rng);
    scope.postMessage({ type: "start", index, kind: input.kind });
    const before = Deno.memoryUsage();
    const started = performance.now();
    let outcome: Outcome;
    try {
      outcome = { type: await target.run(state, input.value, rng) };
    } catch (e) {
      outcome = classify(e, target.refusals);
    }
    const ms = performance.now() - started;
    const memoryBytes = growth(before, Deno.memoryUsage());
    scope.postMessage({ type: "done", index, kind: input.kind, outcome, ms, memoryBytes, inputBytes: input.bytes });
  }
  scope.postMessage({ type: "end" });
};
