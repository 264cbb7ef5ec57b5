/**
 * The training loop: batches from the loader, one recorded step (forward, backward, AdamW) per optimisation step,
 * one read of the loss per step, checkpoints every N steps and at the end, validation, and exact resume.
 * Reports through callbacks; it never prints.
 */
import { ClipError } from "../errors.ts";
import { type Batch, Loader, type LoaderCounters, type LoaderPosition } from "../data/loader.ts";
import { DecodePool } from "../data/decode_pool.ts";
import type { ClipTokenizer } from "../data/tokenizer.ts";
import type { Gpu } from "../gpu/runtime.ts";
import type { ClipModel } from "../nn/clip.ts";
import type { PreprocessConfig } from "../nn/config.ts";
import { Scope } from "../tensor/tensor.ts";
import { findLatestCheckpoint, loadCheckpointState, saveCheckpoint, type TrainState } from "./checkpoint.ts";
import { AdamW, type AdamWConfig } from "./optimizer.ts";
import { cosineLr } from "./schedule.ts";
import { recordStep } from "./step.ts";
import { type Precision, withPrecision } from "../tensor/precision.ts";

export interface TrainOptions {
  shards: string[];
  batchSize: number;
  /** Optimisation steps per epoch (from the shards' sample count, last partial batch dropped). */
  stepsPerEpoch: number;
  epochs: number;
  lr: number;
  warmup: number;
  seed: number;
  accumFreq: number;
  /** Matmul operand precision of the training steps (f32 master weights and gradients either way). */
  precision: Precision;
  adamw: AdamWConfig;
  out: string;
  saveEvery: number;
  workers: number;
  shuffleBuffer: number;
  /** Stop after this many steps of this process (tests, time-boxed runs); the schedule still spans the whole run. */
  maxSteps?: number;
  /** Called between steps; returning true saves a checkpoint and stops (SIGINT/SIGTERM). */
  shouldStop?: () => boolean;
}

export interface StepReport {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  lr: number;
  logitScale: number;
  gradNorm: number;
  samplesPerSecond: number;
  /** Share of the step's wall time spent waiting for the loader. */
  dataWait: number;
  etaSeconds: number;
}

export interface TrainCallbacks {
  onStep?(r: StepReport): void;
  onCheckpoint?(path: string, step: number): Promise<void> | void;
  onEpochEnd?(epoch: number, step: number): Promise<void> | void;
  onWarning?(message: string): void;
}

export interface TrainResult {
  step: number;
  /** What the loaders read and skipped over this run. */
  data: LoaderCounters;
  stoppedEarly: boolean;
  lastCheckpoint: string | null;
  resumedFrom: string | null;
}

export interface TrainContext {
  gpu: Gpu;
  model: ClipModel;
  preprocess: PreprocessConfig;
  tokenizer: ClipTokenizer;
}

function settingsOf(opts: TrainOptions, model: ClipModel): Record<string, unknown> {
  return {
    config: model.config,
    shards: opts.shards,
    batchSize: opts.batchSize,
    accumFreq: opts.accumFreq,
    precision: opts.precision,
    seed: opts.seed,
    workers: opts.workers,
    shuffleBuffer: opts.shuffleBuffer,
  };
}

function shortJson(v: unknown): string {
  const text = JSON.stringify(v) ?? "unset";
  return text.length > 60 ? "another value" : text;
}

/** Runs (or resumes, when `resume` names a checkpoint) training. */
export async function train(
  ctx: TrainContext,
  opts: TrainOptions,
  callbacks: TrainCallbacks = {},
  resume: string | null = null,
): Promise<TrainResult> {
  const { model, gpu } = ctx;
  const optimizer = new AdamW(gpu, model.params.trainable(), opts.adamw);
  const totalSteps = opts.stepsPerEpoch * opts.epochs;
  const settings = settingsOf(opts, model);
  let step = 0;
  let epoch = 0;
  let position: LoaderPosition | undefined;
  if (resume) {
    const loaded = await loadCheckpointState(resume);
    const saved = loaded.state.settings as Record<string, unknown>;
    const differing = Object.keys({ ...saved, ...settings })
      .filter((k) => JSON.stringify(saved[k]) !== JSON.stringify(settings[k]));
    if (differing.length) {
      throw new ClipError(
        `the checkpoint ${resume} was made with other settings (${
          differing.map((k) => `${k}: ${shortJson(saved[k])} there, ${shortJson(settings[k])} now`).join("; ")
        }); resume with the same ones`,
      );
    }
    optimizer.loadState(loaded.optimizer, loaded.state.optimizerStep);
    step = loaded.state.step;
    epoch = loaded.state.epoch;
    position = loaded.state.data as LoaderPosition | undefined;
  }
  let lastCheckpoint: string | null = null;

  const save = async () => {
    const state: TrainState = { step, epoch, data: position, optimizerStep: optimizer.step, settings };
    lastCheckpoint = await saveCheckpoint(
      opts.out,
      model.config,
      ctx.preprocess,
      await model.params.download(),
      await optimizer.state(),
      state,
    );
    await callbacks.onCheckpoint?.(lastCheckpoint, step);
  };

  const started = performance.now();
  const startStep = step;
  let stepsThisRun = 0;
  let stoppedEarly = false;
  let savedAt = step;
  const data: LoaderCounters = {
    samples: 0,
    skippedMissingKeys: 0,
    skippedCorrupt: 0,
    failedShards: 0,
    skippedImages: 0,
  };
  const addCounters = (c: LoaderCounters) => {
    for (const k of Object.keys(data) as (keyof LoaderCounters)[]) data[k] += c[k];
  };
  // One pool of decode workers for the whole run: starting them for every epoch costs a cold start each time.
  const decodePool = new DecodePool();
  try {
    outer: while (epoch < opts.epochs && step < totalSteps) {
      const loader = new Loader({
        decodePool,
        shards: opts.shards,
        tokenizer: ctx.tokenizer,
        preprocess: ctx.preprocess,
        contextLength: model.contextLength,
        batchSize: opts.batchSize,
        augment: true,
        dropLast: true,
        workers: opts.workers,
        shuffleShards: true,
        shuffleBuffer: opts.shuffleBuffer,
        seed: opts.seed,
        epoch,
        resumeFrom: position,
        onWarning: callbacks.onWarning,
      });
      const iterator = loader.batches()[Symbol.asyncIterator]();
      while (step < totalSteps) {
        const waitStart = performance.now();
        const group: Batch[] = [];
        while (group.length < opts.accumFreq) {
          const r = await iterator.next();
          if (r.done) break;
          group.push(r.value);
        }
        if (group.length < opts.accumFreq) break; // the epoch's last partial step is dropped
        const stepStart = performance.now();
        const lr = cosineLr(opts.lr, opts.warmup, totalSteps, step);
        const scope = new Scope();
        let loss: number, logitScale: number, gradNorm: number;
        try {
          const lossTensor = withPrecision(opts.precision, () => recordStep(model, optimizer, group, lr));
          const [l, clip, scale] = await gpu.readMany([
            { buffer: lossTensor.buffer, bytes: 4 },
            { buffer: optimizer.clipState.buffer, bytes: 8 },
            { buffer: model.params.get("logit_scale").buffer, bytes: 4 },
          ]);
          loss = new Float32Array(l)[0];
          gradNorm = new Float32Array(clip)[1];
          logitScale = Math.exp(new Float32Array(scale)[0]);
        } finally {
          scope.end();
          // The step's inputs were uploaded when it was recorded: the batch buffers can serve the next batches.
          for (const b of group) b.release?.();
        }
        if (!Number.isFinite(loss)) {
          throw new ClipError(
            `training diverged at step ${step + 1}: the loss is ${loss}. The last good checkpoint is ${
              lastCheckpoint ?? (await findLatestCheckpoint(opts.out)) ?? "none (no checkpoint was saved yet)"
            }; lower --lr, raise --warmup or set --grad-clip, then --resume latest.`,
          );
        }
        step++;
        stepsThisRun++;
        position = group[group.length - 1].position;
        const now = performance.now();
        const elapsed = (now - started) / 1000;
        const rate = (step - startStep) / elapsed;
        callbacks.onStep?.({
          step,
          totalSteps,
          epoch,
          loss,
          lr,
          logitScale,
          gradNorm,
          samplesPerSecond: group.reduce((n, b) => n + b.size, 0) / ((now - waitStart) / 1000),
          dataWait: (stepStart - waitStart) / (now - waitStart),
          etaSeconds: (totalSteps - step) / Math.max(rate, 1e-9),
        });
        if (opts.saveEvery > 0 && step % opts.saveEvery === 0) {
          await save();
          savedAt = step;
        }
        if (opts.shouldStop?.() || (opts.maxSteps !== undefined && stepsThisRun >= opts.maxSteps)) {
          stoppedEarly = true;
          await iterator.return?.(undefined);
          addCounters(loader.counters);
          break outer;
        }
      }
      await iterator.return?.(undefined);
      addCounters(loader.counters);
      epoch++;
      position = undefined;
      await callbacks.onEpochEnd?.(epoch, step);
    }
  } finally {
    await decodePool.close();
  }
  if (savedAt !== step || !lastCheckpoint) await save();
  return { step, data, stoppedEarly, lastCheckpoint, resumedFrom: resume };
}
