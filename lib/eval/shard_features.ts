/**
 * Image embeddings of every sample of some shards, for evaluation: in shard order, with whatever each task needs
 * from the sample (its class, its captions) kept beside each embedding. Held in memory: evaluation sets are small.
 */
import type { Preprocess } from "../data/image.ts";
import { imageOf } from "../data/loader.ts";
import { IMAGE_EXTENSIONS, type RawSample, type Requirement, WebDatasetReader } from "../data/webdataset.ts";
import type { ClipModel } from "../nn/clip.ts";
import { embedImageStream, type ImageInput } from "./encode.ts";

export interface ShardFeatures<T> {
  dim: number;
  /** [items.length, dim], normalised. */
  embeddings: Float32Array;
  items: T[];
  /** Samples left out: undecodable images, and samples lacking a required file. */
  skippedImages: number;
  skippedIncomplete: number;
  /** Shards that could not be read, or were truncated. */
  damagedShards: number;
  /** Of the damaged shards, those that could not be opened or read (as opposed to truncated or corrupt ones). */
  unreadableShards: number;
}

export interface ShardFeatureOptions<T> {
  /** Files a sample must have besides an image. */
  required: Requirement[];
  /** What to keep of each sample; throw to refuse a sample the task cannot use. */
  describe: (sample: RawSample) => T;
  batchSize: number;
  concurrency?: number;
  onProgress?: (samples: number) => void;
  onWarning?: (message: string) => void;
}

export async function embedShardImages<T>(
  model: ClipModel,
  preprocess: Preprocess,
  shards: readonly string[],
  opts: ShardFeatureOptions<T>,
): Promise<ShardFeatures<T>> {
  const reader = new WebDatasetReader({
    shards,
    required: [IMAGE_EXTENSIONS, ...opts.required],
    onWarning: opts.onWarning,
  });
  const inputs = async function* (): AsyncGenerator<ImageInput<T>> {
    for await (const sample of reader.samples()) {
      const bytes = imageOf(sample)!;
      yield { item: opts.describe(sample), load: () => bytes };
    }
  };
  const items: T[] = [];
  const chunks: Float32Array[] = [];
  let skippedImages = 0;
  for await (
    const batch of embedImageStream(model, preprocess, inputs(), {
      batchSize: opts.batchSize,
      concurrency: opts.concurrency,
      onSkip: (_item, error) => {
        skippedImages++;
        opts.onWarning?.(`skipped an image: ${error.message}`);
      },
    })
  ) {
    items.push(...batch.items);
    chunks.push(batch.embeddings);
    opts.onProgress?.(batch.items.length);
  }
  const dim = model.config.embed_dim;
  const embeddings = new Float32Array(items.length * dim);
  chunks.reduce((offset, c) => (embeddings.set(c, offset), offset + c.length), 0);
  return {
    dim,
    embeddings,
    items,
    skippedImages,
    skippedIncomplete: reader.counters.skippedMissingKeys,
    damagedShards: reader.counters.failedShards + reader.counters.skippedCorrupt,
    unreadableShards: reader.counters.failedShards,
  };
}

const utf8 = new TextDecoder();

/**
 * A sample's captions for retrieval: the `captions` field of its .json when present (a list of strings, or one
 * string), else every non-empty line of its .txt (several captions of one image, one per line).
 */
export function captionsOf(sample: RawSample): string[] {
  const json = sample.files.get("json");
  if (json) {
    try {
      const value = JSON.parse(utf8.decode(json))?.captions;
      if (Array.isArray(value)) {
        return value.filter((c) => typeof c === "string" && c.trim() !== "").map((c) => c.trim());
      }
      if (typeof value === "string" && value.trim() !== "") return [value.trim()];
    } catch {
      // not JSON: fall back to the .txt
    }
  }
  const txt = sample.files.get("txt");
  if (!txt) return [];
  return utf8.decode(txt).split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "");
}

/** Retrieval needs a caption list: a .json with `captions`, or a .txt. */
export const CAPTION_REQUIREMENT: Requirement = ["json:captions", "txt"];
/** Classification needs a class index. */
export const CLASS_REQUIREMENT: Requirement = ["cls"];
