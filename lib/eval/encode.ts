/**
 * Inference-time feature extraction: L2-normalised image and text embeddings in batches, and a streaming image
 * pipeline that decodes with several images in flight (sharp works in its own threads, so decoding overlaps the
 * GPU's work) while keeping the input order and holding at most `concurrency` decoded images plus one batch.
 */
import { ImageDecodeError } from "../data/image.ts";
import { decodeEvalImage, type Preprocess } from "../data/image.ts";
import type { ClipTokenizer } from "../data/tokenizer.ts";
import type { ClipModel } from "../nn/clip.ts";
import { noGrad } from "../tensor/autograd.ts";
import { fromArray } from "../tensor/create.ts";
import { l2Normalize } from "../tensor/ops.ts";
import { withScope } from "../tensor/tensor.ts";

/** Normalised image features [count, embed_dim] of preprocessed pixels [count, 3, S, S]. */
export async function encodeImageBatch(model: ClipModel, pixels: Float32Array, count: number): Promise<Float32Array> {
  const size = model.config.vision_cfg.image_size;
  if (pixels.length !== count * 3 * size * size) {
    throw new RangeError(`expected ${count} images of 3x${size}x${size}, got ${pixels.length} values`);
  }
  return await withScope(async () => {
    const features = noGrad(() =>
      l2Normalize(model.encodeImage(fromArray(model.params.gpu, pixels, [count, 3, size, size])))
    );
    return await features.read();
  });
}

/** Normalised text features [texts, embed_dim], encoded `batchSize` at a time. */
export async function encodeTexts(
  model: ClipModel,
  tokenizer: ClipTokenizer,
  texts: readonly string[],
  batchSize = 256,
): Promise<Float32Array> {
  const dim = model.config.embed_dim;
  const out = new Float32Array(texts.length * dim);
  for (let start = 0; start < texts.length; start += batchSize) {
    const chunk = texts.slice(start, start + batchSize);
    const tokens = tokenizer.tokenize([...chunk], model.contextLength);
    const features = await withScope(async () => {
      const f = noGrad(() => l2Normalize(model.encodeText(model.uploadTokens(tokens))));
      return await f.read();
    });
    out.set(features, start * dim);
  }
  return out;
}

/** exp(logit_scale): the factor CLIP multiplies cosine similarities by before the softmax. */
export async function logitScaleOf(model: ClipModel): Promise<number> {
  return await withScope(async () => (await noGrad(() => model.logitScaleExp()).read())[0]);
}

/** One input of the image stream: something to report it by, and how to get its bytes. */
export interface ImageInput<T> {
  item: T;
  /** The encoded image. Throw ImageDecodeError for an input that cannot be read, to have it skipped. */
  load(): Promise<Uint8Array> | Uint8Array;
}

export interface EmbeddedBatch<T> {
  items: T[];
  /** [items.length, embed_dim], normalised. */
  embeddings: Float32Array;
}

export interface ImageStreamOptions<T> {
  batchSize: number;
  /** Images decoding at once. Default 8. */
  concurrency?: number;
  /** Called for each input that is skipped because it cannot be read or decoded. */
  onSkip?: (item: T, error: ImageDecodeError) => void;
}

/**
 * Embeds a stream of images in input order, `batchSize` at a time (the last batch may be smaller). Inputs whose
 * bytes cannot be read or decoded (ImageDecodeError) are reported through `onSkip` and left out.
 */
export async function* embedImageStream<T>(
  model: ClipModel,
  preprocess: Preprocess,
  inputs: AsyncIterable<ImageInput<T>> | Iterable<ImageInput<T>>,
  opts: ImageStreamOptions<T>,
): AsyncGenerator<EmbeddedBatch<T>> {
  const size = model.config.vision_cfg.image_size;
  if (preprocess.size !== size) {
    throw new RangeError(`preprocess size ${preprocess.size} differs from the model's image size ${size}`);
  }
  const pixelsPerImage = 3 * size * size;
  const concurrency = Math.max(1, opts.concurrency ?? 8);
  const decode = async (input: ImageInput<T>) => {
    try {
      return { item: input.item, pixels: await decodeEvalImage(await input.load(), preprocess) };
    } catch (e) {
      if (e instanceof ImageDecodeError) return { item: input.item, error: e };
      throw e;
    }
  };
  const iterator = Symbol.asyncIterator in inputs
    ? (inputs as AsyncIterable<ImageInput<T>>)[Symbol.asyncIterator]()
    : (inputs as Iterable<ImageInput<T>>)[Symbol.iterator]();
  const pending: Promise<Awaited<ReturnType<typeof decode>>>[] = [];
  let exhausted = false;
  let items: T[] = [];
  let pixels = new Float32Array(opts.batchSize * pixelsPerImage);
  try {
    while (true) {
      while (!exhausted && pending.length < concurrency) {
        const next = await iterator.next();
        if (next.done) exhausted = true;
        else {
          const p = decode(next.value);
          p.catch(() => {}); // awaited in order below; this only silences the rejection until then
          pending.push(p);
        }
      }
      const head = pending.shift();
      if (!head) break;
      const decoded = await head;
      if ("error" in decoded) {
        opts.onSkip?.(decoded.item, decoded.error!);
        continue;
      }
      pixels.set(decoded.pixels, items.length * pixelsPerImage);
      items.push(decoded.item);
      if (items.length === opts.batchSize) {
        yield { items, embeddings: await encodeImageBatch(model, pixels, items.length) };
        items = [];
        pixels = new Float32Array(opts.batchSize * pixelsPerImage);
      }
    }
    if (items.length > 0) {
      yield {
        items,
        embeddings: await encodeImageBatch(model, pixels.subarray(0, items.length * pixelsPerImage), items.length),
      };
    }
  } finally {
    // Stopped early (or failed): let the decodes in flight settle and close the source.
    await Promise.allSettled(pending);
    await iterator.return?.();
  }
}
