import { UsageError } from "../errors.ts";
import type { Gpu } from "../gpu/runtime.ts";

/** The numeric precision of a model's matrix products: f32 throughout, or f16 operands with f32 accumulation. */
export type Precision = "f32" | "f16";

export const PRECISIONS: readonly Precision[] = ["f32", "f16"];

let current: Precision = "f32";

/**
 * Runs `fn` with every matmul taking f16 operands (PyTorch's autocast for matrix products): weights and activations
 * are rounded to f16 on their way into each product, which accumulates, and writes its result, in f32. Everything
 * else (norms, softmax, losses, gradients, master weights, optimizer state) stays f32.
 */
export function withPrecision<T>(precision: Precision, fn: () => T): T {
  const before = current;
  current = precision;
  try {
    return fn();
  } finally {
    current = before;
  }
}

/** The operand type matmuls use now. */
export function matmulOperandType(): Precision {
  return current;
}

/** Throws a message naming the fix when a device cannot run `precision`. */
export function assertPrecisionSupported(gpu: Gpu, precision: Precision): void {
  if (precision === "f16" && !gpu.hasF16) {
    throw new UsageError(
      `--precision f16 needs the adapter's shader-f16 feature, which ${gpu.adapter.description} (${gpu.adapter.backend} back end) lacks; ` +
        "use --precision f32, or a Vulkan, Metal or DX12 back end (DENO_WEBGPU_BACKEND=vulkan)",
    );
  }
}
