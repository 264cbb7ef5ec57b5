/** What a fuzz target is: seeds, a seeded input generator, and a run that either accepts, skips or refuses by name. */
import type { Rng } from "../data/rng.ts";

export interface FuzzInput<T> {
  /** The class of input (e.g. `truncate:in-data`), reported so failures can be grouped. */
  kind: string;
  value: T;
  /** Size of the input in bytes, the yardstick for the memory bound. */
  bytes: number;
}

/** How one input ended without a bug: taken as valid, or a sample skipped and counted by the reader. */
export type Accepted = "accepted" | "skipped";

export interface FuzzTarget<S, T> {
  name: string;
  /** Names of the errors that are clean refusals (anything else thrown is a crash). */
  refusals: readonly string[];
  /** Builds the seeds and anything else the target needs, once per worker. */
  prepare(): Promise<S>;
  /** Input for the given generator: the same Rng state gives the same input. */
  generate(state: S, rng: Rng): FuzzInput<T>;
  /** Runs the code under test on one input. Throws a refusal, or anything else for a bug. */
  run(state: S, input: T, rng: Rng): Promise<Accepted>;
}

/** A result that should be impossible (data invented, an id out of range): counted as a crash. */
export class InvariantError extends Error {
  override name = "InvariantError";
}

/** A ReadableStream over `bytes` in chunks of `chunk` bytes. */
export function streamOf(bytes: Uint8Array, chunk: number): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (at >= bytes.length) return controller.close();
      controller.enqueue(bytes.slice(at, at + chunk));
      at += chunk;
    },
  });
}
