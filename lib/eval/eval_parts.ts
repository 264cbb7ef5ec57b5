/**
 * The unit of work of `clip eval`: one part per shard, holding what the metrics need of that shard's samples
 * (normalised image features, keys, labels or captions and caption features, and counts of what was left out).
 *
 * A single run embeds every part in this process; a partitioned run embeds the parts of its partition (part p goes to
 * partition p % count, as `clip embed` assigns them) and stores them, and a merge reads them all back. The metrics are
 * computed from the parts in part order in every case, and each part is batched on its own, so a merged evaluation
 * gives the same numbers as a single run.
 */
import type { Preprocess } from "../data/image.ts";
import { labelOf } from "../data/loader.ts";
import type { ClipTokenizer } from "../data/tokenizer.ts";
import type { RawSample } from "../data/webdataset.ts";
import { partName } from "../io/embed_inputs.ts";
import type { ClipModel } from "../nn/clip.ts";
import { encodeTexts } from "./encode.ts";
import { CAPTION_REQUIREMENT, captionsOf, CLASS_REQUIREMENT, embedShardImages } from "./shard_features.ts";

export type EvalTask = "zeroshot" | "retrieval" | "linear-probe";

/** Task names as CLIP_benchmark reports them. */
export const TASK_NAMES: Readonly<Record<EvalTask, string>> = {
  zeroshot: "zeroshot_classification",
  retrieval: "zeroshot_retrieval",
  "linear-probe": "linear_probe",
};

/** The shard sets an evaluation reads, named after their flags: --data, and --train-data for the linear probe. */
export type EvalSet = "data" | "train-data";

export interface ClassList {
  names: string[];
  /** Where the names came from, for messages (a file path, or "classes.txt"). */
  source: string;
}

/** Everything that decides an evaluation's parts and metrics; the same in every partition of one evaluation. */
export interface EvalPlan {
  task: EvalTask;
  /** --model and --data as given, reported in the result. */
  model: string;
  dataset: string;
  trainDataset: string | null;
  shards: { data: string[]; "train-data": string[] };
  /** Class names: required by zero-shot; for the probe optional (null: as many classes as the labels seen). */
  classes: ClassList | null;
  /** Zero-shot prompts; null for the other tasks. */
  templates: string[] | null;
}

export interface EvalPart {
  /** Position over all parts (--data's shards, then --train-data's): decides the partition. */
  index: number;
  set: EvalSet;
  /** The part's name within its set: the shard's index, zero-padded so names sort in order. */
  name: string;
  shard: string;
}

/** Every part of the plan: one per shard of --data, then one per shard of --train-data. */
export function evalParts(plan: EvalPlan): EvalPart[] {
  const parts: EvalPart[] = [];
  for (const set of ["data", "train-data"] as const) {
    const shards = plan.shards[set];
    shards.forEach((shard, i) => parts.push({ index: parts.length, set, name: partName(i, shards.length), shard }));
  }
  return parts;
}

/** The partition that computes a part. */
export function ownerOf(part: EvalPart, partitionCount: number): number {
  return part.index % partitionCount;
}

export function describePart(part: EvalPart): string {
  return `${part.set} part ${part.name} (${part.shard})`;
}

/** Samples left out of a part, and why. */
export interface LeftOut {
  undecodableImages: number;
  /** Samples without the files the task needs. */
  incompleteSamples: number;
  /** The shard could not be read, or was truncated or corrupt (1 or 0 for a part). */
  damagedShards: number;
}

export interface PartFeatures {
  dim: number;
  /** [keys.length, dim], L2-normalised. */
  images: Float32Array;
  keys: string[];
  /** Class index of each sample (zero-shot and linear probe). */
  labels?: number[];
  /** Captions of each sample (retrieval). */
  captions?: string[][];
  /** [captions.flat().length, dim], L2-normalised (retrieval). */
  texts?: Float32Array;
  leftOut: LeftOut;
  /** Set when the shard could not be opened or read: a partitioned run does not store such a part, so a rerun retries. */
  failure?: string;
}

export interface PartEmbeddingOptions {
  batchSize: number;
  /** Needed for retrieval's caption features. */
  tokenizer?: ClipTokenizer;
  onProgress?: (images: number) => void;
  onWarning?: (message: string) => void;
}

type Described = { key: string; label: number } | { key: string; captions: string[] };

/** The features of one part: its shard's samples that have an image and what `task` needs, in shard order. */
export async function embedPart(
  model: ClipModel,
  preprocess: Preprocess,
  task: EvalTask,
  part: EvalPart,
  opts: PartEmbeddingOptions,
): Promise<PartFeatures> {
  const retrieval = task === "retrieval";
  if (retrieval && !opts.tokenizer) throw new Error("retrieval parts need a tokenizer for their captions");
  const warnings: string[] = [];
  const features = await embedShardImages<Described>(model, preprocess, [part.shard], {
    required: [retrieval ? CAPTION_REQUIREMENT : CLASS_REQUIREMENT],
    describe: (s: RawSample) => retrieval ? { key: s.key, captions: captionsOf(s) } : { key: s.key, label: labelOf(s) },
    batchSize: opts.batchSize,
    onProgress: opts.onProgress,
    onWarning: (m) => {
      warnings.push(m);
      opts.onWarning?.(m);
    },
  });
  const out: PartFeatures = {
    dim: features.dim,
    images: features.embeddings,
    keys: features.items.map((it) => it.key),
    leftOut: {
      undecodableImages: features.skippedImages,
      incompleteSamples: features.skippedIncomplete,
      damagedShards: features.damagedShards,
    },
  };
  if (retrieval) {
    out.captions = features.items.map((it) => (it as { captions: string[] }).captions);
    out.texts = await encodeTexts(model, opts.tokenizer!, out.captions.flat(), opts.batchSize);
  } else {
    out.labels = features.items.map((it) => (it as { label: number }).label);
  }
  if (features.unreadableShards > 0) out.failure = warnings.at(-1) ?? `shard ${part.shard} could not be read`;
  return out;
}
