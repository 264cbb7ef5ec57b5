import { Loader } from "../data/loader.ts";
import type { ClipTokenizer } from "../data/tokenizer.ts";
import type { ClipModel } from "../nn/clip.ts";
import type { PreprocessConfig } from "../nn/config.ts";
import { noGrad } from "../tensor/autograd.ts";
import { fromArray } from "../tensor/create.ts";
import { l2Normalize } from "../tensor/ops.ts";
import { withScope } from "../tensor/tensor.ts";

export interface EmbeddedData {
  dim: number;
  /** [n, dim] L2-normalised. */
  images: Float32Array;
  texts: Float32Array;
  labels: Int32Array;
  keys: string[];
  captions: string[];
}

/** Normalised image and caption embeddings of every sample of some shards (eval transform, in shard order). */
export async function embedShards(
  model: ClipModel,
  shards: string[],
  preprocess: PreprocessConfig,
  tokenizer: ClipTokenizer,
  batchSize = 64,
  onWarning?: (m: string) => void,
): Promise<EmbeddedData> {
  const dim = model.config.embed_dim;
  const images: Float32Array[] = [], texts: Float32Array[] = [], labels: number[] = [];
  const keys: string[] = [], captions: string[] = [];
  const loader = new Loader({
    shards,
    tokenizer,
    preprocess,
    contextLength: model.contextLength,
    batchSize,
    augment: false,
    onWarning,
  });
  const size = model.config.vision_cfg.image_size;
  for await (const b of loader.batches()) {
    await withScope(async () => {
      const { img, txt } = noGrad(() => {
        const x = fromArray(model.params.gpu, b.images, [b.size, 3, size, size]);
        const text = model.uploadTokens(b.tokens);
        return { img: l2Normalize(model.encodeImage(x)), txt: l2Normalize(model.encodeText(text)) };
      });
      const [i, t] = await model.params.gpu.readMany([
        { buffer: img.buffer, bytes: img.byteLength },
        { buffer: txt.buffer, bytes: txt.byteLength },
      ]);
      images.push(new Float32Array(i));
      texts.push(new Float32Array(t));
    });
    b.release?.();
    labels.push(...b.labels);
    keys.push(...b.keys);
    captions.push(...b.captions);
  }
  const join = (parts: Float32Array[]) => {
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let o = 0;
    for (const p of parts) {
      out.set(p, o);
      o += p.length;
    }
    return out;
  };
  return { dim, images: join(images), texts: join(texts), labels: Int32Array.from(labels), keys, captions };
}

/**
 * CLIP's zero-shot classifier: each class's prompts embedded, normalised, averaged and normalised again.
 * Returns [classes, dim].
 */
export async function zeroShotClassifier(
  model: ClipModel,
  tokenizer: ClipTokenizer,
  classNames: string[],
  templates: string[],
): Promise<Float32Array> {
  const dim = model.config.embed_dim;
  const out = new Float32Array(classNames.length * dim);
  const texts = classNames.flatMap((c) => templates.map((t) => t.replaceAll("{}", c)));
  const chunk = 256;
  const all = new Float32Array(texts.length * dim);
  for (let start = 0; start < texts.length; start += chunk) {
    const part = texts.slice(start, start + chunk);
    await withScope(async () => {
      const emb = noGrad(() =>
        l2Normalize(model.encodeText(model.uploadTokens(tokenizer.tokenize(part, model.contextLength))))
      );
      all.set(await emb.read(), start * dim);
    });
  }
  // Mean and norm in float64, rounded once at the end: the classifier is as exact as its prompt embeddings.
  const row = new Float64Array(dim);
  for (let c = 0; c < classNames.length; c++) {
    row.fill(0);
    for (let t = 0; t < templates.length; t++) {
      const e = all.subarray((c * templates.length + t) * dim, (c * templates.length + t + 1) * dim);
      for (let k = 0; k < dim; k++) row[k] += e[k];
    }
    let sq = 0;
    for (let k = 0; k < dim; k++) sq += row[k] * row[k];
    const norm = Math.sqrt(sq) || 1;
    for (let k = 0; k < dim; k++) out[c * dim + k] = row[k] / norm;
  }
  return out;
}
