import { ClipError, UsageError } from "../errors.ts";
import { expandShards, type Partition, partitionFromEnv } from "../data/shards.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import { zeroShotClassifier } from "../eval/embed_data.ts";
import {
  checkLabels,
  type EvalOutcome,
  type GatheredSet,
  gatherParts,
  leftOutNote,
  linearProbeOutcome,
  probeClassCount,
  requireSamples,
  retrievalOutcome,
  zeroshotOutcome,
} from "../eval/eval_outcome.ts";
import {
  type ClassList,
  describePart,
  embedPart,
  type EvalPart,
  evalParts,
  type EvalPlan,
  type EvalSet,
  type EvalTask,
  ownerOf,
  type PartFeatures,
  TASK_NAMES,
} from "../eval/eval_parts.ts";
import { EvalStore } from "../eval/eval_store.ts";
import { loadTemplates, parseTemplates } from "../eval/templates.ts";
import { getGpu } from "../gpu/runtime.ts";
import type { ClipModel } from "../nn/clip.ts";
import type { Preprocess } from "../data/image.ts";
import { loadModel } from "../nn/load.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";
import { datasetSampleCount } from "./dataset_info.ts";
import { formatDuration, Progress } from "./progress.ts";

const HELP = `usage: clip eval --model M --data SHARDS --task zeroshot|retrieval|linear-probe [options]
       clip eval ... --out DIR [--shard-index I --shard-count N]     (one partition of the work)
       clip eval --merge DIR [--json]                                 (the metrics of all partitions)

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

partitioning (several processes or machines; the merge gives exactly the metrics of a single run):
  --out DIR              write this partition's features to DIR instead of printing metrics: one part per shard
                         (--data's shards, then --train-data's), part p in partition p % N; finished parts are kept
                         and skipped when a run restarts. Partition 0 also writes the zero-shot classifier.
  --shard-index I --shard-count N   this process's partition. Without them it comes from the scheduler's environment:
                         Kubernetes Indexed Jobs (JOB_COMPLETION_INDEX with CLIP_SHARD_COUNT or JOB_COMPLETIONS) or
                         Slurm arrays (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT); otherwise all parts run here.
                         A process given a partition of more than one needs --out.
  --merge DIR            once every partition has finished (their DIRs copied together, or one shared DIR): read all
                         parts and print the metrics. Needs no model or GPU: the evaluation is recorded in
                         DIR/plan.json. Fails naming the partitions whose parts are missing.

Each part is batched on its own, in a single run as in a partition, so on the same kind of device the merged metrics
equal a single run's exactly.
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
  out: { type: "string" },
  merge: { type: "string" },
  "shard-index": { type: "string" },
  "shard-count": { type: "string" },
} as const;

type Flags = { [K in keyof typeof FLAGS]?: (typeof FLAGS)[K]["type"] extends "boolean" ? boolean : string };

export interface EvalResult {
  dataset: string;
  model: string;
  task: string;
  metrics: Record<string, unknown>;
  samples: number;
  [extra: string]: unknown;
}

/** How each shard set is called in progress lines and messages, per task. */
function setLabel(task: EvalTask, set: EvalSet): string {
  if (task === "linear-probe") return set === "data" ? "probe test set" : "probe training set";
  return task === "zeroshot" ? "zero-shot" : "retrieval";
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

/** Class names: --classes-file, else classes.txt beside the first shard; null when neither exists. */
async function classListFor(shards: string[], file: string | undefined): Promise<ClassList | null> {
  if (file) {
    const names = await readLines(file);
    if (!names) throw new ClipError(`classes file ${file} not found`);
    return { names, source: file };
  }
  const dir = folderOf(shards[0]);
  const names = dir === null ? null : await readLines(`${dir}/classes.txt`);
  return names ? { names, source: "classes.txt" } : null;
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

/** The evaluation the flags describe; fails on bad flags before any model is loaded. */
async function planFrom(v: Flags): Promise<EvalPlan> {
  for (const required of ["model", "data", "task"] as const) {
    if (!v[required]) throw new UsageError(`eval: --${required} is required. Run 'clip eval --help' for usage.`);
  }
  if (!(v.task! in TASK_NAMES)) {
    throw new UsageError(`eval: --task must be one of ${Object.keys(TASK_NAMES).join(", ")}, got '${v.task}'.`);
  }
  const task = v.task as EvalTask;
  if (task === "linear-probe" && !v["train-data"]) {
    throw new UsageError("eval: --task linear-probe needs --train-data.");
  }
  const shards = expandShards(v.data!);
  const classes = task === "retrieval" ? null : await classListFor(shards, v["classes-file"]);
  if (task === "zeroshot" && !classes) {
    throw new UsageError("eval: no class names: put classes.txt beside the shards or pass --classes-file.");
  }
  return {
    task,
    model: v.model!,
    dataset: v.data!,
    trainDataset: v["train-data"] ?? null,
    shards: { data: shards, "train-data": v["train-data"] ? expandShards(v["train-data"]) : [] },
    classes,
    templates: task === "zeroshot" ? await templatesFor(shards, v.templates) : null,
  };
}

/** The partition from --shard-index/--shard-count, else from a batch scheduler's environment, else none. */
function partitionFrom(v: Flags): Partition | undefined {
  const index = v["shard-index"], count = v["shard-count"];
  if ((index === undefined) !== (count === undefined)) {
    throw new UsageError("eval: give --shard-index and --shard-count together.");
  }
  if (index === undefined) return partitionFromEnv(Deno.env.toObject());
  const n = intFlag("eval", "shard-count", count, 1);
  const i = intFlag("eval", "shard-index", index, 0);
  if (n < 1 || i >= n) throw new UsageError(`eval: --shard-index must be in 0..${n - 1} for --shard-count ${n}.`);
  return { index: i, count: n, source: "--shard-index/--shard-count" };
}

interface Encoder {
  model: ClipModel;
  preprocess: Preprocess;
  /** Loaded when the work needs the text tower (retrieval captions, the zero-shot classifier). */
  tokenizer?: ClipTokenizer;
  batchSize: number;
}

async function loadEncoder(plan: EvalPlan, batchSize: number, needsText: boolean): Promise<Encoder> {
  const { model, preprocess, source } = await loadModel(await getGpu(), plan.model, { inference: true });
  const shards = plan.shards.data.length + plan.shards["train-data"].length;
  console.error(`evaluating ${plan.model} (${source}) on ${shards} shard(s): ${TASK_NAMES[plan.task]}`);
  return { model, preprocess, batchSize, tokenizer: needsText ? await ClipTokenizer.load() : undefined };
}

function needsTextTower(plan: EvalPlan): boolean {
  return plan.task !== "linear-probe";
}

/** Embeds one part, failing early on labels outside a known class list (the merge would refuse them anyway). */
async function embedChecked(enc: Encoder, plan: EvalPlan, part: EvalPart, progress: Progress) {
  const features = await embedPart(enc.model, enc.preprocess, plan.task, part, {
    batchSize: enc.batchSize,
    tokenizer: enc.tokenizer,
    onProgress: (n) => progress.advance(n),
    onWarning: (m) => progress.note(`warning: ${m}`),
  });
  if (plan.classes && features.labels) {
    checkLabels(
      { keys: features.keys, labels: features.labels, shardOf: () => part.shard },
      plan.classes.names.length,
      plan.classes.source,
    );
  }
  return features;
}

async function buildClassifier(enc: Encoder, plan: EvalPlan): Promise<Float32Array> {
  const names = plan.classes!.names, templates = plan.templates!;
  console.error(`building the classifier: ${names.length} classes x ${templates.length} prompts`);
  return await zeroShotClassifier(enc.model, enc.tokenizer!, names, templates);
}

/**
 * The result of an evaluation from all its parts (in part order) and, for zero-shot, the classifier: shared by a
 * single run and a merge. Prints what was left out to stderr.
 */
function outcomeOf(
  plan: EvalPlan,
  parts: readonly { part: EvalPart; features: PartFeatures }[],
  classifier: Float32Array | null,
): EvalOutcome {
  const gathered = (set: EvalSet): GatheredSet => {
    const setParts = parts.filter((p) => p.part.set === set).map((p) => ({
      shard: p.part.shard,
      features: p.features,
    }));
    const g = gatherParts(setParts);
    const what = setLabel(plan.task, set);
    const note = leftOutNote(g, what);
    if (note) console.error(note);
    requireSamples(g, what, plan.task);
    return g;
  };
  if (plan.task === "zeroshot") return zeroshotOutcome(plan, gathered("data"), classifier!);
  if (plan.task === "retrieval") {
    const data = gathered("data");
    console.error(`retrieval: ${data.captions.flat().length} captions of ${data.keys.length} images`);
    return retrievalOutcome(data);
  }
  const train = gathered("train-data"), test = gathered("data");
  console.error(
    `fitting the probe: ${train.keys.length} samples, ${
      probeClassCount(plan, train, test)
    } classes, ${train.dim} features`,
  );
  return linearProbeOutcome(plan, train, test);
}

function formatMetric(value: unknown): string {
  return typeof value === "number" && Number.isFinite(value) ? `${(100 * value).toFixed(2)}%` : "n/a";
}

function printResult(result: EvalResult, json: boolean): void {
  if (json) {
    console.log(JSON.stringify(result, null, 2));
    return;
  }
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

function resultOf(plan: EvalPlan, outcome: EvalOutcome): EvalResult {
  return { dataset: plan.dataset, model: plan.model, task: TASK_NAMES[plan.task], ...outcome };
}

/** Every part in this process, held in memory. */
async function runSingle(plan: EvalPlan, batchSize: number, json: boolean): Promise<number> {
  const enc = await loadEncoder(plan, batchSize, needsTextTower(plan));
  const parts = evalParts(plan);
  const done: { part: EvalPart; features: PartFeatures }[] = [];
  // The probe's training set first, as its features are what the fit needs; results are gathered in part order.
  const sets: EvalSet[] = plan.task === "linear-probe" ? ["train-data", "data"] : ["data"];
  for (const set of sets) {
    const mine = parts.filter((p) => p.set === set);
    const progress = new Progress(
      "images",
      await datasetSampleCount(mine.map((p) => p.shard)),
      setLabel(plan.task, set),
    );
    for (const part of mine) done.push({ part, features: await embedChecked(enc, plan, part, progress) });
    progress.finish();
  }
  done.sort((a, b) => a.part.index - b.part.index);
  const classifier = plan.task === "zeroshot" ? await buildClassifier(enc, plan) : null;
  printResult(resultOf(plan, outcomeOf(plan, done, classifier)), json);
  return 0;
}

/** The parts of one partition, written to `out`; exit code 1 when a shard could not be read (a rerun retries it). */
async function runPartition(plan: EvalPlan, partition: Partition, out: string, batchSize: number): Promise<number> {
  const store = new EvalStore(out);
  await store.open(plan, partition.count);
  const all = evalParts(plan);
  const mine = all.filter((p) => ownerOf(p, partition.count) === partition.index);
  const todo: EvalPart[] = [];
  for (const part of mine) if (!(await store.isDone(plan, part))) todo.push(part);
  const writesClassifier = plan.task === "zeroshot" && partition.index === 0 && !(await store.hasClassifier());
  const where = partition.count > 1 ? `partition ${partition.index} of ${partition.count} (${partition.source}): ` : "";
  console.error(
    `${where}${mine.length} of ${all.length} parts, ${mine.length - todo.length} already done, ${todo.length} to embed`,
  );
  const mergeHint = `when all ${partition.count} partition(s) have finished: clip eval --merge ${out} [--json]`;
  if (todo.length === 0 && !writesClassifier) {
    console.error(mergeHint);
    return 0;
  }

  const enc = await loadEncoder(plan, batchSize, plan.task === "retrieval" || writesClassifier);
  const progress = new Progress("images", await datasetSampleCount(todo.map((p) => p.shard)));
  const failed: string[] = [];
  let written = 0, rows = 0;
  for (const [i, part] of todo.entries()) {
    progress.detail = `${part.set} part ${part.name} (${i + 1}/${todo.length})`;
    const features = await embedChecked(enc, plan, part, progress);
    if (features.failure !== undefined) {
      failed.push(`${describePart(part)} NOT written (run again to retry): ${features.failure}`);
      continue;
    }
    await store.writePart(part, features);
    written++;
    rows += features.keys.length;
  }
  progress.finish();
  if (writesClassifier) await store.writeClassifier(await buildClassifier(enc, plan), enc.model.config.embed_dim);
  const lines = [
    `wrote ${written} parts, ${rows} samples to ${out} in ${formatDuration(progress.seconds)}` +
    (writesClassifier ? ", and the zero-shot classifier" : ""),
    ...failed,
  ];
  if (failed.length === 0) lines.push(mergeHint);
  console.error(lines.join("\n  "));
  return failed.length > 0 ? 1 : 0;
}

/** Part names of one set, shortened after `max`. */
function partList(parts: readonly EvalPart[], max = 8): string {
  const bySet = (["data", "train-data"] as const).map((set) => {
    const names = parts.filter((p) => p.set === set).map((p) => p.name);
    if (names.length === 0) return null;
    const shown = names.length > max ? [...names.slice(0, max), `... (${names.length} in all)`] : names;
    return `${set} part${names.length > 1 ? "s" : ""} ${shown.join(", ")}`;
  });
  return bySet.filter((s) => s !== null).join("; ");
}

/** One line naming the partitions that have not finished and what each still owes. */
function missingMessage(
  dir: string,
  total: number,
  missing: readonly EvalPart[],
  classifierMissing: boolean,
  partitions: number,
): string {
  const owners = new Map<number, string[]>();
  const owe = (p: number, what: string) => owners.set(p, [...(owners.get(p) ?? []), what]);
  for (let p = 0; p < partitions; p++) {
    const parts = missing.filter((part) => ownerOf(part, partitions) === p);
    if (parts.length > 0) owe(p, partList(parts));
  }
  if (classifierMissing) owe(0, "the zero-shot classifier");
  const list = [...owners.entries()];
  const shown = list.slice(0, 6).map(([p, what]) => `partition ${p} (${what.join("; ")})`);
  if (list.length > 6) shown.push(`${list.length - 6} more`);
  const first = list[0][0];
  return `eval --merge: ${dir} lacks ${missing.length} of ${total} parts${
    classifierMissing ? " and the zero-shot classifier" : ""
  }: ${shown.join(", ")} of ${partitions} ${list.length > 1 ? "have" : "has"} not finished; run ${
    list.length > 1 ? "them" : "it"
  } again (e.g. --shard-index ${first} --shard-count ${partitions}, JOB_COMPLETION_INDEX=${first} or ` +
    `SLURM_ARRAY_TASK_ID=${first}) with --out ${dir}, or copy ${
      list.length > 1 ? "their" : "its"
    } output in, and merge again`;
}

/** Reads every part of DIR and prints the metrics, as a single run over the same shards would. */
async function runMerge(dir: string, json: boolean): Promise<number> {
  const store = new EvalStore(dir);
  const { plan, partitions } = await store.readPlan();
  const all = evalParts(plan);
  const missing: EvalPart[] = [];
  for (const part of all) if (!(await store.isDone(plan, part))) missing.push(part);
  const classifierMissing = plan.task === "zeroshot" && !(await store.hasClassifier());
  if (missing.length > 0 || classifierMissing) {
    throw new ClipError(missingMessage(dir, all.length, missing, classifierMissing, partitions));
  }
  console.error(`merging ${all.length} parts of ${partitions} partition(s) from ${dir}: ${TASK_NAMES[plan.task]}`);
  const parts = [];
  for (const part of all) parts.push({ part, features: await store.readPart(plan, part) });
  const classifier = plan.task === "zeroshot"
    ? await store.readClassifier(plan.classes!.names.length, parts[0].features.dim)
    : null;
  printResult(resultOf(plan, outcomeOf(plan, parts, classifier)), json);
  return 0;
}

/** Flags that describe the evaluation, which --merge reads from DIR/plan.json instead. */
const NOT_WITH_MERGE = [
  "model",
  "data",
  "task",
  "train-data",
  "classes-file",
  "templates",
  "batch-size",
  "out",
  "shard-index",
  "shard-count",
] as const;

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
    if (v.merge !== undefined) {
      const extra = NOT_WITH_MERGE.filter((f) => v[f] !== undefined);
      if (extra.length > 0) {
        throw new UsageError(
          `eval: --merge takes only --json (the evaluation is recorded in ${v.merge}/plan.json); drop --${
            extra.join(", --")
          }.`,
        );
      }
      return await runMerge(v.merge, v.json ?? false);
    }
    const plan = await planFrom(v);
    const batchSize = Math.max(1, intFlag("eval", "batch-size", v["batch-size"], 64));
    const partition = partitionFrom(v);
    if (v.out !== undefined) {
      return await runPartition(plan, partition ?? { index: 0, count: 1, source: "all parts" }, v.out, batchSize);
    }
    if (partition && partition.count > 1) {
      throw new UsageError(
        `eval: this process is partition ${partition.index} of ${partition.count} (${partition.source}): give ` +
          "--out DIR to write its features and merge them with 'clip eval --merge DIR', or --shard-index 0 " +
          "--shard-count 1 to evaluate everything here.",
      );
    }
    return await runSingle(plan, batchSize, v.json ?? false);
  },
};
