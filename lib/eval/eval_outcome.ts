/**
 * The metrics of an evaluation from its parts, in part order: the one computation behind a single run and a merge of
 * partitions, so the two agree exactly. Results carry CLIP_benchmark's metric names.
 */
import { ClipError } from "../errors.ts";
import type { EvalPlan, LeftOut, PartFeatures } from "./eval_parts.ts";
import { linearProbe } from "./linear_probe.ts";
import { classificationMetrics, retrievalRecall, similarity } from "./metrics.ts";

/** The parts of one shard set joined in order. */
export interface GatheredSet {
  dim: number;
  /** [samples, dim], normalised. */
  images: Float32Array;
  keys: string[];
  /** The shard of each sample, for messages. */
  shards: string[];
  labels: number[];
  captions: string[][];
  /** [captions, dim], normalised (retrieval). */
  texts: Float32Array;
  leftOut: LeftOut;
  /** Shards the set was read from. */
  shardCount: number;
}

function concat(arrays: readonly Float32Array[]): Float32Array {
  const out = new Float32Array(arrays.reduce((n, a) => n + a.length, 0));
  arrays.reduce((offset, a) => (out.set(a, offset), offset + a.length), 0);
  return out;
}

/** Joins parts, given with the shard each was read from, in the order given. */
export function gatherParts(parts: readonly { shard: string; features: PartFeatures }[]): GatheredSet {
  if (parts.length === 0) throw new RangeError("a shard set needs at least one part");
  const dim = parts[0].features.dim;
  const bad = parts.find((p) => p.features.dim !== dim);
  if (bad) {
    throw new ClipError(
      `the part of ${bad.shard} has ${bad.features.dim}-dimensional features, others ${dim}: ` +
        "parts of different models cannot be merged",
    );
  }
  const leftOut: LeftOut = { undecodableImages: 0, incompleteSamples: 0, damagedShards: 0 };
  for (const { features } of parts) {
    leftOut.undecodableImages += features.leftOut.undecodableImages;
    leftOut.incompleteSamples += features.leftOut.incompleteSamples;
    leftOut.damagedShards += features.leftOut.damagedShards;
  }
  return {
    dim,
    images: concat(parts.map((p) => p.features.images)),
    keys: parts.flatMap((p) => p.features.keys),
    shards: parts.flatMap((p) => p.features.keys.map(() => p.shard)),
    labels: parts.flatMap((p) => p.features.labels ?? []),
    captions: parts.flatMap((p) => p.features.captions ?? []),
    texts: concat(parts.map((p) => p.features.texts ?? new Float32Array())),
    leftOut,
    shardCount: parts.length,
  };
}

/** What a task needs of each sample besides an image, for messages. */
const NEEDS: Record<EvalPlan["task"], string> = {
  zeroshot: "a .cls class index",
  retrieval: "captions (a .json 'captions' list or a .txt)",
  "linear-probe": "a .cls class index",
};

/** A line about samples left out of a set, or null when none were. */
export function leftOutNote(set: GatheredSet, what: string): string | null {
  const l = set.leftOut;
  if (l.undecodableImages + l.incompleteSamples + l.damagedShards === 0) return null;
  return `${what}: ${set.keys.length} samples used; left out ${l.undecodableImages} undecodable images, ` +
    `${l.incompleteSamples} incomplete samples; ${l.damagedShards} damaged shards`;
}

/** Fails when a set has no usable sample: no metric means anything then. */
export function requireSamples(set: GatheredSet, what: string, task: EvalPlan["task"]): void {
  if (set.keys.length > 0) return;
  throw new ClipError(
    `no usable samples in ${set.shardCount} shard(s) for ${what}: each needs an image and ${NEEDS[task]}`,
  );
}

/** Fails on the first label outside 0..classes-1 (a .cls that is not a class index counts as -1). */
export function checkLabels(
  samples: { keys: readonly string[]; labels: readonly number[]; shardOf: (i: number) => string },
  classes: number,
  source: string,
): void {
  const i = samples.labels.findIndex((label) => !(label >= 0 && label < classes));
  if (i < 0) return;
  throw new ClipError(
    `sample '${samples.keys[i]}' in ${samples.shardOf(i)} has class ${samples.labels[i]}, outside the ${classes} ` +
      `classes of ${source}; check the .cls files against the class list`,
  );
}

function labelsCheckable(set: GatheredSet) {
  return { keys: set.keys, labels: set.labels, shardOf: (i: number) => set.shards[i] };
}

export interface EvalOutcome {
  metrics: Record<string, unknown>;
  samples: number;
  [extra: string]: unknown;
}

/** Zero-shot classification of `data` by a classifier [classes, dim] (see zeroShotClassifier). */
export function zeroshotOutcome(plan: EvalPlan, data: GatheredSet, classifier: Float32Array): EvalOutcome {
  const { names, source } = plan.classes!;
  checkLabels(labelsCheckable(data), names.length, source);
  const scores = similarity(data.images, classifier, data.dim);
  const m = classificationMetrics(scores, names.length, data.labels);
  const perClass: Record<string, number | null> = {};
  names.forEach((name, c) => perClass[name] = Number.isNaN(m.per_class_recall[c]) ? null : m.per_class_recall[c]);
  return {
    metrics: { acc1: m.acc1, acc5: m.acc5, mean_per_class_recall: m.mean_per_class_recall, per_class_recall: perClass },
    samples: data.keys.length,
  };
}

/** Retrieval recall@1/5/10 both ways between the images of `data` and all their captions. */
export function retrievalOutcome(data: GatheredSet): EvalOutcome {
  const textToImage = data.captions.flatMap((list, image) => list.map(() => image));
  return {
    metrics: retrievalRecall(data.images, data.texts, data.dim, textToImage, [1, 5, 10]),
    samples: data.keys.length,
    captions: textToImage.length,
  };
}

/** The number of classes of a linear probe: the class list's, else one more than the largest label seen. */
export function probeClassCount(plan: EvalPlan, train: GatheredSet, test: GatheredSet): number {
  if (plan.classes) return plan.classes.names.length;
  let max = -1;
  for (const set of [train, test]) for (const label of set.labels) max = Math.max(max, label);
  return max + 1;
}

/** A linear probe fitted on `train`'s features and scored on `test`'s. */
export function linearProbeOutcome(plan: EvalPlan, train: GatheredSet, test: GatheredSet): EvalOutcome {
  const classes = probeClassCount(plan, train, test);
  const source = plan.classes ? plan.classes.source : "the labels seen";
  checkLabels(labelsCheckable(train), classes, source);
  checkLabels(labelsCheckable(test), classes, source);
  const result = linearProbe(
    { features: train.images, labels: train.labels },
    { features: test.images, labels: test.labels },
    train.dim,
    classes,
  );
  return {
    metrics: {
      acc1: result.metrics.acc1,
      acc5: result.metrics.acc5,
      mean_per_class_recall: result.metrics.mean_per_class_recall,
    },
    samples: test.keys.length,
    train_samples: train.keys.length,
    l2: result.l2,
    validation: result.validation,
  };
}
