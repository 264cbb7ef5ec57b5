/**
 * Training throughput of the emoji-tiny model: whole optimisation steps (forward, backward and AdamW in one
 * submission, open_clip's hyperparameters) on a synthetic batch of 128, each ending with the reads the trainer makes
 * (loss, gradient norm, logit scale). Two warm-up steps compile the kernels; the row is the best of the timed steps.
 * Also reports the process's peak resident memory and the device memory held.
 *
 *   deno run -A bench/train_bench.ts [--json] [--steps 3] [--export DIR]
 *
 * --export DIR writes the initial weights (emoji_tiny_weights.safetensors) and the batch
 * (emoji_tiny_inputs.safetensors) for the peer; the warm-up losses go into the report's checks.
 */
import { parseArgs } from "node:util";
import type { Batch } from "../lib/data/loader.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { loadModelConfig } from "../lib/nn/config.ts";
import { Scope } from "../lib/tensor/tensor.ts";
import { AdamW, OPEN_CLIP_ADAMW } from "../lib/train/optimizer.ts";
import { recordStep } from "../lib/train/step.ts";
import { type ChildReport, printReport } from "./child.ts";
import { writeInputs, writeWeights } from "./export.ts";
import { gpuMiB, median, processMemoryMiB, row, syntheticBatch, timeCalls } from "./shared.ts";

export const TRAIN = { model: "emoji-tiny", seed: 0, batch: 128, dataSeed: 1, lr: 1e-4, warmup: 2 };

/** One step as the trainer runs it, reads included; returns the loss. */
export async function trainStep(model: ClipModel, optimizer: AdamW, batch: Batch, lr: number): Promise<number> {
  const scope = new Scope();
  try {
    const loss = recordStep(model, optimizer, [batch], lr);
    const [l] = await model.params.gpu.readMany([
      { buffer: loss.buffer, bytes: 4 },
      { buffer: optimizer.clipState.buffer, bytes: 8 },
      { buffer: model.params.get("logit_scale").buffer, bytes: 4 },
    ]);
    return new Float32Array(l)[0];
  } finally {
    scope.end();
  }
}

/** A fresh emoji-tiny model, its optimizer and a synthetic batch of `batchSize`. */
export async function trainingSetup(batchSize: number) {
  const gpu = await getGpu();
  const model = ClipModel.init(gpu, await loadModelConfig(TRAIN.model), TRAIN.seed);
  const optimizer = new AdamW(gpu, model.params.trainable(), OPEN_CLIP_ADAMW);
  return { gpu, model, optimizer, batch: syntheticBatch(model, batchSize, TRAIN.dataSeed) };
}

export async function measureTraining(steps: number, exportDir?: string): Promise<ChildReport> {
  const { gpu, model, optimizer, batch } = await trainingSetup(TRAIN.batch);
  if (exportDir) {
    const side = model.config.vision_cfg.image_size;
    await writeWeights(model, `${exportDir}/emoji_tiny_weights.safetensors`);
    await writeInputs(
      `${exportDir}/emoji_tiny_inputs.safetensors`,
      batch.images,
      [batch.size, 3, side, side],
      batch.tokens,
      [batch.size, model.contextLength],
    );
  }
  const losses: number[] = [];
  const step = async () => losses.push(await trainStep(model, optimizer, batch, TRAIN.lr));
  const warm = await timeCalls(step, TRAIN.warmup);
  console.error(`emoji-tiny warm-up steps: ${warm.map((s) => s.toFixed(1)).join(", ")} s`);
  const times = await timeCalls(step, steps);
  const memory = processMemoryMiB();
  return {
    rows: [
      row(
        "emoji_tiny_train",
        "samples/s",
        TRAIN.batch / Math.min(...times),
        `batch ${TRAIN.batch}, AdamW; best of ${steps} steps (median ${
          median(times).toFixed(2)
        } s) after ${TRAIN.warmup} warm-up steps (first ${warm[0].toFixed(1)} s with kernel compiles)`,
      ),
      row("emoji_tiny_train_peak_rss", "MiB", memory.peak, "VmHWM of a process that ran only the row above"),
      row("emoji_tiny_train_gpu_bytes", "MiB", gpuMiB(gpu), "buffer pool (weights, moments included) + textures"),
    ],
    checks: { losses },
  };
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      json: { type: "boolean", default: false },
      steps: { type: "string", default: "3" },
      export: { type: "string" },
    },
  });
  printReport(await measureTraining(Number(values.steps), values.export), values.json);
  Deno.exit(0);
}
