/**
 * GPU limits: a tensor over `maxBufferSize` and a binding over `maxStorageBufferBindingSize` are refused with a
 * GpuLimitError naming the limit before the driver sees them, the device keeps working afterwards, and `clip embed`
 * with a batch too large for the device ends with that error and a smaller --batch-size to try.
 */
import { Gpu, GpuLimitError } from "../gpu/runtime.ts";
import { runClip } from "./cli_process.ts";

export interface GpuLimitResult {
  check: string;
  ok: boolean;
  detail: string;
}

function refusal(fn: () => unknown): unknown {
  try {
    fn();
    return undefined;
  } catch (e) {
    return e;
  }
}

export async function runGpuLimitChecks(workDir: string): Promise<GpuLimitResult[]> {
  const results: GpuLimitResult[] = [];
  const gpu = await Gpu.create();
  try {
    const limits = gpu.device.limits;
    const tooBig = refusal(() => gpu.pool.acquire(limits.maxBufferSize + 4));
    results.push({
      check: "tensor over maxBufferSize",
      ok: tooBig instanceof GpuLimitError && tooBig.limit === "maxBufferSize",
      detail: (tooBig as Error)?.message ?? "accepted",
    });
    const wide = gpu.pool.acquire(limits.maxStorageBufferBindingSize + 4);
    const kernel = { key: "limit_probe", wgsl: () => "@compute @workgroup_size(1) fn main() {}" };
    const overBinding = refusal(() => gpu.dispatch(kernel, [wide], 1));
    gpu.pool.release(wide);
    gpu.pool.trim();
    results.push({
      check: "binding over maxStorageBufferBindingSize",
      ok: overBinding instanceof GpuLimitError && overBinding.limit === "maxStorageBufferBindingSize",
      detail: (overBinding as Error)?.message ?? "accepted",
    });
    // The device still works: a round trip through a small buffer after the refusals.
    const data = new Float32Array([1, 2, 3, 4]);
    const buffer = gpu.upload(data);
    const back = new Float32Array(await gpu.read(buffer, data.byteLength));
    gpu.pool.release(buffer);
    results.push({
      check: "device usable after a refusal",
      ok: back.every((x, i) => x === data[i]),
      detail: `read back ${[...back].join(", ")}`,
    });
  } finally {
    gpu.destroy();
  }

  // A batch whose activations cannot be bound: 70000 texts x 16 tokens x 32 floats is 143 MB per tensor.
  const texts = `${workDir}/texts.txt`;
  await Deno.writeTextFile(texts, Array.from({ length: 70000 }, (_, i) => `a photo of thing ${i}`).join("\n"));
  const args = ["embed", "--model", "test-vit-micro", "--texts", texts, "--out", `${workDir}/out`];
  const run = await runClip([...args, "--batch-size", "70000", "--part-size", "70000"]);
  const suggested = Number(/try --batch-size (\d+)/.exec(run.stderr)?.[1]);
  results.push({
    check: "clip embed: batch too large for the device",
    ok: run.code === 1 && /maxStorageBufferBindingSize/.test(run.stderr) && suggested > 0 && suggested < 70000 &&
      !/unexpected error|panicked/.test(run.stderr),
    detail: run.stderr.trim().split("\n").at(-1) ?? "",
  });
  return results;
}
