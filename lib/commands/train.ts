import { ClipError, UsageError } from "../errors.ts";
import { expandShards } from "../data/shards.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import { validateShards } from "../data/webdataset.ts";
import { IMAGE_EXTENSIONS } from "../data/webdataset.ts";
import { getGpu, GpuLimitError } from "../gpu/runtime.ts";
import { ensureWritableFolder, writeFailureError } from "../io/output_folder.ts";
import { loadModel } from "../nn/load.ts";
import { findLatestCheckpoint } from "../train/checkpoint.ts";
import { OPEN_CLIP_ADAMW } from "../train/optimizer.ts";
import { lineChartSvg, type Series } from "../train/plot.ts";
import { type StepReport, train } from "../train/trainer.ts";
import type { LoaderCounters } from "../data/loader.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";
import { datasetSampleCount } from "./dataset_info.ts";
import { validationMetrics } from "../eval/validate.ts";
import { assertPrecisionSupported, type Precision, PRECISIONS } from "../tensor/precision.ts";

const HELP = `usage: clip train --model CONFIG|PATH --train-data SHARDS --out DIR [options]

Contrastive training (symmetric InfoNCE with a learned temperature, AdamW, cosine schedule with warmup), from
scratch (a config name or JSON) or from weights (a checkpoint folder, hf-hub:ORG/NAME, a pretrained tag).

data:
  --train-data SHARDS     WebDataset tar shards: paths, {000..099} ranges, '::'-joined lists, a folder, http(s) URLs
  --val-data SHARDS       evaluated at the end of every epoch: retrieval R@1/5/10 both ways, and zero-shot accuracy
                          when the shards' folder has classes.txt (prompts from templates.txt, else 'a photo of a {}.')
  --train-num-samples N   samples per epoch (default: from sizes.json beside the shards)
  --workers N             shard readers (default 2)
  --shuffle-buffer N      sample shuffle buffer (default 1000)

optimisation:
  --batch-size B          samples per micro-batch (default 128)
  --epochs E              (default 1)
  --lr X                  peak learning rate (default 5e-4)
  --wd X                  weight decay, not applied to gains, biases and the logit scale (default 0.2)
  --warmup N              linear warmup steps, then cosine to 0 (default 100)
  --beta1, --beta2, --eps AdamW (defaults 0.9, 0.98, 1e-6)
  --grad-clip X           clip the global gradient norm to X (default off)
  --accum-freq K          accumulate K micro-batches per step: the update of one K-times larger batch (default 1)
  --precision f32|f16     f16: matmul operands (weights, activations) in f16 with f32 accumulation; master weights,
                          gradients, norms, softmax and loss stay f32 (needs shader-f16: Vulkan, Metal, DX12; default f32)
  --seed N                (default 0)

output:
  --out DIR               run folder: checkpoints/, latest weights in open_clip's layout, log.jsonl, loss.svg
  --save-every N          checkpoint every N steps (default: every epoch's end only)
  --resume latest|PATH    continue a run exactly where its checkpoint left off
  --max-steps N           stop (with a checkpoint) after N steps of this run

SIGINT/SIGTERM save a checkpoint and exit; '--resume latest' continues.`;

const FLAGS = {
  model: { type: "string" },
  "train-data": { type: "string" },
  "val-data": { type: "string" },
  "train-num-samples": { type: "string" },
  workers: { type: "string" },
  "shuffle-buffer": { type: "string" },
  "batch-size": { type: "string" },
  epochs: { type: "string" },
  lr: { type: "string" },
  wd: { type: "string" },
  warmup: { type: "string" },
  beta1: { type: "string" },
  beta2: { type: "string" },
  eps: { type: "string" },
  "grad-clip": { type: "string" },
  "accum-freq": { type: "string" },
  precision: { type: "string" },
  seed: { type: "string" },
  out: { type: "string" },
  "save-every": { type: "string" },
  resume: { type: "string" },
  "max-steps": { type: "string" },
} as const;

function numberFlag(name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isFinite(n) || n < 0) {
    throw new UsageError(`train: --${name} must be a non-negative number, got '${value}'.`);
  }
  return n;
}

interface LogLine {
  step: number;
  [k: string]: unknown;
}

/** The log's lines; a line cut short by a kill is dropped rather than costing the whole log. */
async function readLog(path: string): Promise<LogLine[]> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch {
    return [];
  }
  const lines: LogLine[] = [];
  for (const line of text.split("\n")) {
    if (!line) continue;
    try {
      lines.push(JSON.parse(line));
    } catch {
      // A partial last line from an interrupted write: that step is run again after the resume anyway.
    }
  }
  return lines;
}

/** Replaces a file's contents so that a kill leaves the old contents or the new, never a truncated file. */
async function replaceTextFile(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp-${Deno.pid}`;
  await Deno.writeTextFile(tmp, text);
  await Deno.rename(tmp, path);
}

function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds)) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60);
  return h > 0 ? `${h}h${String(m).padStart(2, "0")}m` : `${m}m${String(s % 60).padStart(2, "0")}s`;
}

function progressLine(r: StepReport, epochs: number): string {
  return `epoch ${r.epoch + 1}/${epochs}  step ${r.step}/${r.totalSteps}  loss ${r.loss.toFixed(4)}  lr ${
    r.lr.toExponential(2)
  }  scale ${r.logitScale.toFixed(2)}  ${r.samplesPerSecond.toFixed(1)} samples/s  data wait ${
    (100 * r.dataWait).toFixed(0)
  }%  eta ${formatDuration(r.etaSeconds)}`;
}

function dataSummary(c: LoaderCounters): string {
  const skipped = [
    [c.skippedImages, "undecodable images"],
    [c.skippedMissingKeys, "samples without an image or caption"],
    [c.skippedCorrupt, "shards cut short by a corrupt or truncated tar"],
    [c.failedShards, "shards that could not be read"],
  ].filter(([n]) => (n as number) > 0).map(([n, what]) => `${n} ${what}`);
  return `data: ${c.samples} samples read${
    skipped.length ? `; skipped ${skipped.join(", ")} (see the warnings above)` : ", none skipped"
  }`;
}

export const trainCommand: Command = {
  name: "train",
  summary: "Train a CLIP model contrastively on image-caption shards.",
  help: HELP,
  async run(argv) {
    const { values: v } = parseCommandArgs("train", argv, FLAGS);
    if (v.help) {
      console.log(HELP);
      return 0;
    }
    for (const required of ["model", "train-data", "out"] as const) {
      if (!v[required]) throw new UsageError(`train: --${required} is required. Run 'clip train --help' for usage.`);
    }
    const precision = (v.precision ?? "f32") as Precision;
    if (!PRECISIONS.includes(precision)) {
      throw new UsageError(`train: --precision must be f32 or f16, got '${v.precision}'.`);
    }
    const out = v.out!;
    const batchSize = intFlag("train", "batch-size", v["batch-size"], 128);
    const accumFreq = Math.max(1, intFlag("train", "accum-freq", v["accum-freq"], 1));
    const epochs = intFlag("train", "epochs", v.epochs, 1);
    if (batchSize < 2) {
      throw new UsageError("train: --batch-size must be at least 2 (contrastive pairs need negatives).");
    }
    const shards = expandShards(v["train-data"]!);
    await validateShards(shards, [IMAGE_EXTENSIONS, ["txt"]]);
    const numSamples = v["train-num-samples"] !== undefined
      ? intFlag("train", "train-num-samples", v["train-num-samples"], 0)
      : await datasetSampleCount(shards);
    if (numSamples === null) {
      throw new UsageError(
        `train: cannot tell how many samples ${
          v["train-data"]
        } holds (no sizes.json beside the shards); pass --train-num-samples.`,
      );
    }
    const stepsPerEpoch = Math.floor(numSamples / (batchSize * accumFreq));
    if (stepsPerEpoch < 1) {
      throw new UsageError(
        `train: ${numSamples} samples make no full step of ${batchSize * accumFreq}; lower --batch-size.`,
      );
    }
    const valShards = v["val-data"] ? expandShards(v["val-data"]) : null;
    await ensureWritableFolder(out, "--out");

    let resume: string | null = null;
    if (v.resume) {
      resume = v.resume === "latest" ? await findLatestCheckpoint(out) : v.resume;
      if (!resume) {
        throw new ClipError(`train: --resume latest: ${out} has no complete checkpoint; start without --resume.`);
      }
    }
    const gpu = await getGpu();
    assertPrecisionSupported(gpu, precision);
    const seed = intFlag("train", "seed", v.seed, 0);
    // A resumed run loads the checkpoint's weights; anything else starts from --model.
    const { model, preprocess, source } = await loadModel(gpu, resume ?? v.model!, { seed });
    const tokenizer = await ClipTokenizer.load();
    await Deno.mkdir(out, { recursive: true });
    const logPath = `${out}/log.jsonl`;
    let log = await readLog(logPath);
    const resumeStep = resume ? JSON.parse(await Deno.readTextFile(`${resume}/state.json`)).step as number : 0;
    // A new run starts a new log; a resumed one drops the lines of steps after its checkpoint (they run again).
    log = resume ? log.filter((l) => l.step <= resumeStep) : [];
    await replaceTextFile(logPath, log.map((l) => JSON.stringify(l) + "\n").join(""));
    const logFile = await Deno.open(logPath, { append: true });
    const encoder = new TextEncoder();

    const tty = Deno.stderr.isTerminal();
    let lastPrint = 0;
    let stopRequested = false;
    const onSignal = () => {
      stopRequested = true;
      console.error("\nclip: stopping after this step; saving a checkpoint (press again to wait)...");
    };
    const signals: Deno.Signal[] = Deno.build.os === "windows" ? ["SIGINT"] : ["SIGINT", "SIGTERM"];
    for (const s of signals) Deno.addSignalListener(s, onSignal);

    console.error(
      `training ${v.model} (${source}) on ${shards.length} shard(s), ${numSamples} samples/epoch, ${stepsPerEpoch} steps/epoch x ${epochs} epochs, batch ${
        batchSize * accumFreq
      }${precision === "f16" ? ", f16 matmul operands" : ""}${resume ? `, resuming from ${resume}` : ""}`,
    );
    const writePlot = async () => {
      const lines = await readLog(logPath);
      const series: Series[] = [{
        name: "training loss",
        axis: "left",
        points: lines.filter((l) => typeof l.loss === "number").map((l) => [l.step, l.loss as number]),
      }];
      const val = lines.filter((l) => l.val);
      for (const key of ["text_retrieval_recall@1", "image_retrieval_recall@1", "acc1"]) {
        const pts = val.filter((l) => typeof (l.val as Record<string, number>)[key] === "number")
          .map((l) => [l.step, (l.val as Record<string, number>)[key]] as [number, number]);
        if (pts.length) series.push({ name: `val ${key}`, axis: "right", points: pts });
      }
      const tmp = `${out}/loss.svg.tmp`;
      await Deno.writeTextFile(tmp, lineChartSvg(series, `clip train: ${v.model}`));
      await Deno.rename(tmp, `${out}/loss.svg`);
    };

    const validate = async (step: number) => {
      if (!valShards) return;
      const metrics = await validationMetrics(
        model,
        preprocess,
        tokenizer,
        valShards,
        (m) => console.error(`warning: ${m}`),
      );
      await logFile.write(encoder.encode(JSON.stringify({ step, val: metrics }) + "\n"));
      console.error(
        `validation at step ${step}: ` +
          Object.entries(metrics).map(([k, x]) => `${k} ${(100 * x).toFixed(1)}%`).join("  "),
      );
    };

    const started = performance.now();
    let lastReport: StepReport | null = null;
    try {
      const result = await train(
        { gpu, model, preprocess, tokenizer },
        {
          shards,
          batchSize,
          stepsPerEpoch,
          epochs,
          lr: numberFlag("lr", v.lr, 5e-4),
          warmup: intFlag("train", "warmup", v.warmup, 100),
          seed,
          accumFreq,
          precision,
          adamw: {
            ...OPEN_CLIP_ADAMW,
            beta1: numberFlag("beta1", v.beta1, OPEN_CLIP_ADAMW.beta1),
            beta2: numberFlag("beta2", v.beta2, OPEN_CLIP_ADAMW.beta2),
            eps: numberFlag("eps", v.eps, OPEN_CLIP_ADAMW.eps),
            weightDecay: numberFlag("wd", v.wd, OPEN_CLIP_ADAMW.weightDecay),
            gradClip: numberFlag("grad-clip", v["grad-clip"], 0),
          },
          out,
          saveEvery: intFlag("train", "save-every", v["save-every"], 0),
          workers: Math.max(1, intFlag("train", "workers", v.workers, 2)),
          shuffleBuffer: intFlag("train", "shuffle-buffer", v["shuffle-buffer"], 1000),
          maxSteps: v["max-steps"] !== undefined ? intFlag("train", "max-steps", v["max-steps"], 0) : undefined,
          shouldStop: () => stopRequested,
        },
        {
          onStep: (r) => {
            lastReport = r;
            logFile.writeSync(encoder.encode(
              JSON.stringify({
                step: r.step,
                epoch: r.epoch,
                loss: r.loss,
                lr: r.lr,
                logit_scale: r.logitScale,
                grad_norm: r.gradNorm,
                samples_per_s: r.samplesPerSecond,
                data_wait: r.dataWait,
                time: new Date().toISOString(),
              }) + "\n",
            ));
            const now = performance.now();
            if (tty) Deno.stderr.writeSync(encoder.encode(`\r\x1b[K${progressLine(r, epochs)}`));
            else if (now - lastPrint > 10_000 || r.step === r.totalSteps || r.step === 1) {
              console.error(progressLine(r, epochs));
              lastPrint = now;
            }
          },
          onEpochEnd: async (_epoch, step) => {
            if (tty) Deno.stderr.writeSync(encoder.encode("\n"));
            await validate(step);
          },
          onCheckpoint: async (path) => {
            await writePlot();
            if (tty) Deno.stderr.writeSync(encoder.encode("\n"));
            console.error(`checkpoint: ${path}`);
          },
          onWarning: (m) => console.error(`warning: ${m}`),
        },
        resume,
      );
      await writePlot();
      const seconds = (performance.now() - started) / 1000;
      const r = lastReport as StepReport | null;
      console.error(
        [
          result.stoppedEarly ? `stopped at step ${result.step}` : `finished ${result.step} steps`,
          r ? `final loss ${r.loss.toFixed(4)}, logit scale ${r.logitScale.toFixed(2)}` : "",
          `${formatDuration(seconds)}`,
          `weights: ${out}/open_clip_model.safetensors`,
          `checkpoint: ${result.lastCheckpoint}`,
          `log: ${logPath}, plot: ${out}/loss.svg`,
          dataSummary(result.data),
        ].filter(Boolean).join("\n  "),
      );
      return 0;
    } catch (e) {
      if (e instanceof GpuLimitError) {
        const smaller = e.suggestedBatchSize(batchSize);
        throw new ClipError(
          smaller >= 2
            ? `train: ${e.message}; try --batch-size ${smaller} or smaller (now ${batchSize}), with --accum-freq to keep ` +
              "the effective batch"
            : `train: ${e.message}, even at the smallest batch; use a smaller model or a device with larger limits`,
        );
      }
      throw writeFailureError(e, out, "the last complete checkpoint is kept: free space, then --resume latest");
    } finally {
      for (const s of signals) Deno.removeSignalListener(s, onSignal);
      logFile.close();
    }
  },
};
