import { ClipError, UsageError } from "../errors.ts";
import type { Preprocess } from "../data/image.ts";
import { labelOf } from "../data/loader.ts";
import { expandShards } from "../data/shards.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import type { RawSample, Requirement } from "../data/webdataset.ts";
import { zeroShotClassifier } from "../eval/embed_data.ts";
import { encodeTexts } from "../eval/encode.ts";
import { linearProbe } from "../eval/linear_probe.ts";
import { classificationMetrics, retrievalRecall, similarity } from "../eval/metrics.ts";
import {
  CAPTION_REQUIREMENT,
  captionsOf,
  CLASS_REQUIREMENT,
  embedShardImages,
  type ShardFeatures,
} from "../eval/shard_features.ts";
import { loadTemplates, parseTemplates } from "../eval/templates.ts";
import { getGpu } from "../gpu/runtime.ts";
import type { ClipModel } from "../nn/clip.ts";
import { loadModel } from "../nn/load.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";
import { datasetSampleCount } from "./dataset_info.ts";
import { Progress } from "./progress.ts";

const HELP = `usage: clip eval --model M --data SHARDS --task zeroshot|retrieval|linear-probe [options]

Evaluates a model on WebDataset shards and reports CLIP_benchmark's metrics. With --json, prints
{"dataset", "model", "task", "metrics": {...}} (task names as CLIP_benchmark's: zeroshot_classification,
zeroshot_retrieval, linear_probe); otherwise a readable summary. Progress goes to stderr.

tasks:
  zeroshot       samples need an image and a .cls class index. Class names from --classes-file or classes.txt beside
                 the shards; prompts from --templates, else templates.txt beside the shards, else 'openai'.
                 metrics: acc1, acc5 (null with fewer than 5 classes), mean_per_class_recall (balanced accuracy),
                 per_class_recall {class: recall, null for classes without samples}
  retrieval      samples need an image and captions: the 'captions' list of a .json, else each non-empty line of the
                 .txt (so an image may have several captions). metrics: image_retrieval_recall@1/5/10 (text to
                 image) and text_retrieval_recall@1/5/10 (image to text: any of the image's captions in the top K)
  linear-probe   multinomial logistic regression (float64, L-BFGS) on the normalised image features of --train-data,
                 its L2 strength chosen on a held-out 20% of them from a small grid and refitted on all, scored on
                 --data. metrics: acc1, acc5, mean_per_class_recall

options:
  --model M              config name or JSON, checkpoint folder, hf-hub:ORG/NAME, or pretrained tag
  --data SHARDS          tar paths, {000..099} ranges, '::' lists, a folder of .tar files, or URLs
  --train-data SHARDS    training shards of the linear probe
  --classes-file F       class names, one per line (line i = class index i)
  --templates T          'openai' (CLIP's 80 ImageNet prompts), 'simple' (7) or a file (one per line, {} = class)
  --batch-size B         images per forward pass (default 64)
  --json                 print the result as JSON on stdout

Ties in scores count against the model (a deterministic choice; torch.topk breaks them arbitrarily).`;

const FLAGS = {
  model: { type: "string" },
  data: { type: "string" },
  task: { type: "string" },
  "train-data": { type: "string" },
  "classes-file": { type: "string" },
  templates: { type: "string" },
  "batch-size": { type: "string" },
  json: { type: "boolean" },
} as const;

const TASKS = { zeroshot: "zeroshot_classification", retrieval: "zeroshot_retrieval", "linear-probe": "linear_probe" };
type Task = keyof typeof TASKS;

export interface EvalResult {
  dataset: string;
  model: string;
  task: string;
  metrics: Record<string, unknown>;
  samples: number;
  [extra: string]: unknown;
}

interface Context {
  model: ClipModel;
  preprocess: Preprocess;
  batchSize: number;
}

function folderOf(shard: string): string | null {
  if (/^https?:\/\//i.test(shard)) return null;
  return shard.includes("/") ? shard.slice(0, shard.lastIndexOf("/")) : ".";
}

async function readLines(path: string): Promise<string[] | null> {
  try {
    return (await Deno.readTextFile(path)).split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "");
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new ClipError(`cannot read ${path}: ${(e as Error).message}`);
  }
}

/** Class names: --classes-file, else classes.txt beside the first shard. */
async function classNamesFor(shards: string[], file: string | undefined): Promise<string[]> {
  if (file) {
    const names = await readLines(file);
    if (!names) throw new ClipError(`classes file ${file} not found`);
    return names;
  }
  const dir = folderOf(shards[0]);
  const names = dir === null ? null : await readLines(`${dir}/classes.txt`);
  if (!names) {
    throw new UsageError("eval: no class names: put classes.txt beside the shards or pass --classes-file.");
  }
  return names;
}

/** Templates: --templates, else templates.txt beside the first shard, else OpenAI's 80. */
async function templatesFor(shards: string[], spec: string | undefined): Promise<string[]> {
  if (spec) return await loadTemplates(spec);
  const dir = folderOf(shards[0]);
  if (dir !== null) {
    const path = `${dir}/templates.txt`;
    const text = await Deno.readTextFile(path).catch(() => null);
    if (text !== null) return parseTemplates(text, path);
  }
  return await loadTemplates("openai");
}

async function embedWithProgress<T>(
  ctx: Context,
  shards: string[],
  what: string,
  required: Requirement[],
  describe: (sample: RawSample) => T,
): Promise<ShardFeatures<T>> {
  const progress = new Progress("images", await datasetSampleCount(shards), what);
  const features = await embedShardImages(ctx.model, ctx.preprocess, shards, {
    required,
    describe,
    batchSize: ctx.batchSize,
    onProgress: (n) => progress.advance(n),
    onWarning: (m) => progress.note(`warning: ${m}`),
  });
  progress.finish();
  if (features.items.length === 0) {
    throw new ClipError(
      `no usable samples in ${shards.length} shard(s) for ${what}: each needs an image and ${
        required.map((r) => r.join(" or ")).join(" and ")
      }`,
    );
  }
  if (features.skippedImages + features.skippedIncomplete + features.damagedShards > 0) {
    console.error(
      `${what}: ${features.items.length} samples used; left out ${features.skippedImages} undecodable images, ` +
        `${features.skippedIncomplete} incomplete samples; ${features.damagedShards} damaged shards`,
    );
  }
  return features;
}

function labelled(sample: RawSample): { key: string; shard: string; label: number } {
  return { key: sample.key, shard: sample.shard, label: labelOf(sample) };
}

function checkLabels(items: { key: string; shard: string; label: number }[], classes: number, source: string): void {
  const bad = items.find((it) => it.label < 0 || it.label >= classes);
  if (bad) {
    throw new ClipError(
      `sample '${bad.key}' in ${bad.shard} has class ${bad.label}, outside the ${classes} classes of ${source}; ` +
        "check the .cls files against the class list",
    );
  }
}

async function zeroshot(ctx: Context, shards: string[], classesFile?: string, templatesSpec?: string) {
  const names = await classNamesFor(shards, classesFile);
  const templates = await templatesFor(shards, templatesSpec);
  const data = await embedWithProgress(ctx, shards, "zero-shot", [CLASS_REQUIREMENT], labelled);
  checkLabels(data.items, names.length, classesFile ?? "classes.txt");
  console.error(`building the classifier: ${names.length} classes x ${templates.length} prompts`);
  const tokenizer = await ClipTokenizer.load();
  const classifier = await zeroShotClassifier(ctx.model, tokenizer, names, templates);
  const scores = similarity(data.embeddings, classifier, data.dim);
  const m = classificationMetrics(scores, names.length, data.items.map((it) => it.label));
  const perClass: Record<string, number | null> = {};
  names.forEach((name, c) => perClass[name] = Number.isNaN(m.per_class_recall[c]) ? null : m.per_class_recall[c]);
  return {
    metrics: { acc1: m.acc1, acc5: m.acc5, mean_per_class_recall: m.mean_per_class_recall, per_class_recall: perClass },
    samples: data.items.length,
  };
}

async function retrieval(ctx: Context, shards: string[]) {
  const data = await embedWithProgress(ctx, shards, "retrieval", [CAPTION_REQUIREMENT], (s) => captionsOf(s));
  const captions: string[] = [];
  const textToImage: number[] = [];
  data.items.forEach((list, image) => {
    for (const c of list) {
      captions.push(c);
      textToImage.push(image);
    }
  });
  console.error(`embedding ${captions.length} captions of ${data.items.length} images`);
  const tokenizer = await ClipTokenizer.load();
  const texts = await encodeTexts(ctx.model, tokenizer, captions, ctx.batchSize);
  return {
    metrics: retrievalRecall(data.embeddings, texts, data.dim, textToImage, [1, 5, 10]),
    samples: data.items.length,
    captions: captions.length,
  };
}

async function linearProbeTask(ctx: Context, shards: string[], trainShards: string[], classesFile?: string) {
  const train = await embedWithProgress(ctx, trainShards, "probe training set", [CLASS_REQUIREMENT], labelled);
  const test = await embedWithProgress(ctx, shards, "probe test set", [CLASS_REQUIREMENT], labelled);
  const dir = folderOf(shards[0]);
  const names = classesFile ? await classNamesFor(shards, classesFile) : dir && await readLines(`${dir}/classes.txt`);
  const maxLabel = Math.max(...train.items.map((it) => it.label), ...test.items.map((it) => it.label));
  const classes = names ? names.length : maxLabel + 1;
  checkLabels(train.items, classes, names ? "the class list" : "the labels seen");
  checkLabels(test.items, classes, names ? "the class list" : "the labels seen");
  console.error(`fitting the probe: ${train.items.length} samples, ${classes} classes, ${train.dim} features`);
  const result = linearProbe(
    { features: train.embeddings, labels: train.items.map((it) => it.label) },
    { features: test.embeddings, labels: test.items.map((it) => it.label) },
    train.dim,
    classes,
  );
  return {
    metrics: {
      acc1: result.metrics.acc1,
      acc5: result.metrics.acc5,
      mean_per_class_recall: result.metrics.mean_per_class_recall,
    },
    samples: test.items.length,
    train_samples: train.items.length,
    l2: result.l2,
    validation: result.validation,
  };
}

function formatMetric(value: unknown): string {
  return typeof value === "number" && Number.isFinite(value) ? `${(100 * value).toFixed(2)}%` : "n/a";
}

export const evalCommand: Command = {
  name: "eval",
  summary: "Evaluate a model: zero-shot accuracy, retrieval recall@K, linear probe.",
  help: HELP,
  async run(argv) {
    const { values: v } = parseCommandArgs("eval", argv, FLAGS);
    if (v.help) {
      console.log(HELP);
      return 0;
    }
    for (const required of ["model", "data", "task"] as const) {
      if (!v[required]) throw new UsageError(`eval: --${required} is required. Run 'clip eval --help' for usage.`);
    }
    if (!(v.task! in TASKS)) {
      throw new UsageError(`eval: --task must be one of ${Object.keys(TASKS).join(", ")}, got '${v.task}'.`);
    }
    const task = v.task as Task;
    if (task === "linear-probe" && !v["train-data"]) {
      throw new UsageError("eval: --task linear-probe needs --train-data.");
    }
    const batchSize = Math.max(1, intFlag("eval", "batch-size", v["batch-size"], 64));
    const shards = expandShards(v.data!);
    const trainShards = v["train-data"] ? expandShards(v["train-data"]) : [];

    const gpu = await getGpu();
    const { model, preprocess, source } = await loadModel(gpu, v.model!);
    console.error(`evaluating ${v.model} (${source}) on ${shards.length} shard(s): ${TASKS[task]}`);
    const ctx: Context = { model, preprocess, batchSize };
    const outcome = task === "zeroshot"
      ? await zeroshot(ctx, shards, v["classes-file"], v.templates)
      : task === "retrieval"
      ? await retrieval(ctx, shards)
      : await linearProbeTask(ctx, shards, trainShards, v["classes-file"]);
    const result: EvalResult = { dataset: v.data!, model: v.model!, task: TASKS[task], ...outcome };
    if (v.json) console.log(JSON.stringify(result, null, 2));
    else {
      console.log(`${result.task} of ${result.model} on ${result.dataset} (${result.samples} samples)`);
      for (const [name, value] of Object.entries(result.metrics)) {
        if (name === "per_class_recall") {
          const entries = Object.entries(value as Record<string, number | null>);
          console.log(`  per-class recall:`);
          for (const [cls, r] of entries) console.log(`    ${formatMetric(r).padStart(8)}  ${cls}`);
        } else console.log(`  ${name.padEnd(28)} ${formatMetric(value)}`);
      }
      if (typeof result.l2 === "number") console.log(`  (probe L2 strength ${result.l2}, chosen on 20% held out)`);
    }
    return 0;
  },
};
