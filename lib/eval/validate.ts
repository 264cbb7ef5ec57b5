import type { ClipTokenizer } from "../data/tokenizer.ts";
import type { ClipModel } from "../nn/clip.ts";
import type { PreprocessConfig } from "../nn/config.ts";
import { datasetClasses } from "../commands/dataset_info.ts";
import { embedShards } from "./embed_data.ts";
import { classificationMetrics, retrievalRecall, similarity } from "./metrics.ts";
import { zeroShotClassifier } from "./embed_data.ts";

/**
 * What training reports on held-out shards: retrieval recall@1/5/10 both ways (each image with its own caption), and
 * zero-shot accuracy when the shards' folder has classes.txt and every sample a class.
 */
export async function validationMetrics(
  model: ClipModel,
  preprocess: PreprocessConfig,
  tokenizer: ClipTokenizer,
  shards: string[],
  onWarning?: (m: string) => void,
): Promise<Record<string, number>> {
  const data = await embedShards(model, shards, preprocess, tokenizer, 128, onWarning);
  const metrics: Record<string, number> = retrievalRecall(
    data.images,
    data.texts,
    data.dim,
    data.keys.map((_, i) => i),
  );
  const classes = await datasetClasses(shards);
  if (classes && data.labels.every((l) => l >= 0)) {
    const classifier = await zeroShotClassifier(model, tokenizer, classes.names, classes.templates);
    const m = classificationMetrics(similarity(data.images, classifier, data.dim), classes.names.length, data.labels);
    Object.assign(metrics, { acc1: m.acc1, acc5: m.acc5, mean_per_class_recall: m.mean_per_class_recall });
  }
  return metrics;
}

/** The mean of the two retrieval directions at K, as the quality bar states it. */
export function meanRecall(metrics: Record<string, number>, k: number): number {
  return (metrics[`image_retrieval_recall@${k}`] + metrics[`text_retrieval_recall@${k}`]) / 2;
}
