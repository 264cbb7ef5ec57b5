import { type RowLayout, rowLayout } from "../../../kernels/rows.ts";
import type { Gpu } from "../../gpu/runtime.ts";

/**
 * Which kind of adapter kernels are shaped for: the one detected ("auto"), or a forced one, so that tests on the
 * CPU fallback also cover the kernels real GPUs get (and the other way round). Real GPUs want many invocations with
 * neighbouring ones touching neighbouring addresses; the CPU fallback (llvmpipe/lavapipe) pays a high cost per
 * invocation and per barrier, and wants fewer invocations that each loop over contiguous data.
 */
export type KernelStrategy = "auto" | "cpu" | "gpu";

let strategy: KernelStrategy = "auto";

/** True when kernels should be shaped for the CPU fallback. */
export function prefersCpuKernels(gpu: Gpu): boolean {
  return strategy === "auto" ? gpu.adapter.isSoftware : strategy === "cpu";
}

/** The row layout for rows of `cols` columns on this adapter. */
export function rowLayoutFor(gpu: Gpu, cols: number): RowLayout {
  return rowLayout(cols, prefersCpuKernels(gpu));
}

/**
 * Runs `fn` with kernels shaped for the given kind of adapter. Ops choose when they record, and backward rules reuse
 * the forward pass's choice.
 */
export async function withKernelStrategy<T>(s: KernelStrategy, fn: () => Promise<T>): Promise<T> {
  const before = strategy;
  strategy = s;
  try {
    return await fn();
  } finally {
    strategy = before;
  }
}
