import { type RowLayout, rowLayout } from "../../../kernels/rows.ts";
import type { Gpu } from "../../gpu/runtime.ts";

/** Which adapter's row layout to use: the one detected, or the other one (to test both on one machine). */
export type RowStrategy = "auto" | "cpu" | "gpu";

let strategy: RowStrategy = "auto";

/** The row layout for rows of `cols` columns on this adapter. */
export function layoutFor(gpu: Gpu, cols: number): RowLayout {
  const software = strategy === "auto" ? gpu.adapter.isSoftware : strategy === "cpu";
  return rowLayout(cols, software);
}

/**
 * Runs `fn` with row kernels laid out for the given kind of adapter, so that tests on the CPU fallback also cover
 * the many-lanes-per-row kernels real GPUs get (and the other way round). Ops record the layout when they run.
 */
export async function withRowStrategy<T>(s: RowStrategy, fn: () => Promise<T>): Promise<T> {
  const before = strategy;
  strategy = s;
  try {
    return await fn();
  } finally {
    strategy = before;
  }
}
