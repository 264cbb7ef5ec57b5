/**
 * Batches of decoded images, tokens, keys and labels from WebDataset shards.
 *
 * Decoding runs in sharp's native thread pool, with up to `concurrency` images in flight, so it overlaps both the
 * other decodes and the GPU's work on the previous batch; the JavaScript thread only tokenises and assembles. Several
 * readers (`workers`) each take their share of the shards (see webdataset.ts) and are interleaved round-robin, so
 * the order is deterministic for a given seed whatever the timing.
 *
 * Every batch carries the reader positions just after its last sample: handing them back as `resumeFrom` continues
 * with the next batch exactly, even though the loader reads ahead.
 */
import { ClipError } from "../errors.ts";
import { decodeEvalImage, decodeTrainImage, ImageDecodeError, type Preprocess } from "./image.ts";
import { Rng } from "./rng.ts";
import type { ClipTokenizer } from "./tokenizer.ts";
import {
  type DataPosition,
  IMAGE_EXTENSIONS,
  type RawSample,
  type Requirement,
  type WebDatasetOptions,
  WebDatasetReader,
} from "./webdataset.ts";

export interface Batch {
  /** [B, 3, S, S] normalised pixels. */
  images: Float32Array;
  /** [B, context] token ids. */
  tokens: Int32Array;
  keys: string[];
  captions: string[];
  /** Class indices from `.cls`, -1 where a sample has none. */
  labels: Int32Array;
  shards: string[];
  size: number;
  /** Resume point after this batch. */
  position: LoaderPosition;
}

export interface LoaderPosition {
  readers: DataPosition[];
  /** The reader the next sample is taken from. */
  next: number;
}

export interface LoaderCounters {
  samples: number;
  skippedMissingKeys: number;
  skippedCorrupt: number;
  failedShards: number;
  skippedImages: number;
}

export interface LoaderOptions
  extends Omit<WebDatasetOptions, "workerIndex" | "workerCount" | "resumeFrom" | "required"> {
  tokenizer: ClipTokenizer;
  preprocess: Preprocess;
  contextLength: number;
  batchSize: number;
  /** Random resized crop (training) instead of the eval transform. */
  augment: boolean;
  /** Drop a final batch smaller than batchSize. */
  dropLast?: boolean;
  /** Readers, each with its own share of the shards. Default 1. */
  workers?: number;
  /** Images decoding at once. Default 8. */
  concurrency?: number;
  /** Take the caption from this field of the sample's .json instead of its .txt. */
  captionField?: string;
  resumeFrom?: LoaderPosition;
}

interface Decoded {
  key: string;
  shard: string;
  caption: string;
  label: number;
  image: Float32Array | null;
  position: LoaderPosition;
}

const textDecoder = new TextDecoder();

export function captionOf(sample: RawSample, field?: string): string | null {
  if (field) {
    const json = sample.files.get("json");
    if (!json) return null;
    try {
      const value = JSON.parse(textDecoder.decode(json))[field];
      return typeof value === "string" ? value : value == null ? null : String(value);
    } catch {
      return null;
    }
  }
  const txt = sample.files.get("txt");
  return txt ? textDecoder.decode(txt).trim() : null;
}

export function imageOf(sample: RawSample): Uint8Array | null {
  for (const ext of IMAGE_EXTENSIONS) {
    const bytes = sample.files.get(ext);
    if (bytes) return bytes;
  }
  return null;
}

export function labelOf(sample: RawSample): number {
  const cls = sample.files.get("cls");
  if (!cls) return -1;
  const n = Number.parseInt(textDecoder.decode(cls).trim(), 10);
  return Number.isInteger(n) && n >= 0 ? n : -1;
}

export class Loader {
  readonly counters: LoaderCounters = {
    samples: 0,
    skippedMissingKeys: 0,
    skippedCorrupt: 0,
    failedShards: 0,
    skippedImages: 0,
  };
  private readers: WebDatasetReader[];
  private next: number;

  constructor(private opts: LoaderOptions) {
    const workers = opts.workers ?? 1;
    if (opts.resumeFrom && opts.resumeFrom.readers.length !== workers) {
      throw new ClipError(`the saved data position has ${opts.resumeFrom.readers.length} readers, not ${workers}`);
    }
    const required: Requirement[] = [IMAGE_EXTENSIONS, opts.captionField ? [`json:${opts.captionField}`] : ["txt"]];
    this.readers = Array.from({ length: workers }, (_, w) =>
      new WebDatasetReader({
        ...opts,
        workerIndex: w,
        workerCount: workers,
        required,
        resumeFrom: opts.resumeFrom?.readers[w],
        epoch: opts.resumeFrom ? undefined : opts.epoch,
      }));
    this.next = opts.resumeFrom?.next ?? 0;
  }

  /** Raw samples from the readers in round-robin order, each with the position just after it. */
  private async *interleaved(): AsyncGenerator<{ sample: RawSample; position: LoaderPosition }> {
    const iterators = this.readers.map((r) => r.samples()[Symbol.asyncIterator]());
    const live = iterators.map(() => true);
    let remaining = iterators.length;
    while (remaining > 0) {
      const w = this.next;
      this.next = (this.next + 1) % iterators.length;
      if (!live[w]) continue;
      const r = await iterators[w].next();
      if (r.done) {
        live[w] = false;
        remaining--;
        continue;
      }
      yield { sample: r.value, position: { readers: this.readers.map((x) => x.position()), next: this.next } };
    }
  }

  private async decode(sample: RawSample, position: LoaderPosition): Promise<Decoded> {
    const { preprocess } = this.opts;
    const caption = captionOf(sample, this.opts.captionField) ?? "";
    const bytes = imageOf(sample);
    let image: Float32Array | null = null;
    if (bytes) {
      try {
        if (this.opts.augment) {
          // The crop depends only on (seed, epoch, key): the same whatever the decode order or resume point.
          const rng = Rng.derive(this.opts.seed ?? 0, position.readers[0]?.epoch ?? 0, hashKey(sample.key));
          image = await decodeTrainImage(bytes, preprocess, () => rng.next());
        } else image = await decodeEvalImage(bytes, preprocess);
      } catch (e) {
        if (!(e instanceof ImageDecodeError)) throw e;
        this.opts.onWarning?.(`skipped sample '${sample.key}' in ${sample.shard}: ${e.message}`);
      }
    }
    return { key: sample.key, shard: sample.shard, caption, label: labelOf(sample), image, position };
  }

  /** The batches of one pass (an epoch, or `numSamples` samples when resampling). */
  async *batches(): AsyncGenerator<Batch> {
    const { batchSize, contextLength, tokenizer } = this.opts;
    const concurrency = Math.max(1, this.opts.concurrency ?? 8);
    const size = this.opts.preprocess.size;
    const pending: Promise<Decoded>[] = [];
    const source = this.interleaved();
    let exhausted = false;
    let group: Decoded[] = [];
    const fill = async () => {
      while (!exhausted && pending.length < concurrency) {
        const r = await source.next();
        if (r.done) exhausted = true;
        else pending.push(this.decode(r.value.sample, r.value.position));
      }
    };
    while (true) {
      await fill();
      const head = pending.shift();
      if (!head) break;
      const d = await head;
      if (!d.image) {
        this.counters.skippedImages++;
        continue;
      }
      group.push(d);
      if (group.length === batchSize) {
        yield this.assemble(group, size, contextLength, tokenizer);
        group = [];
      }
    }
    this.syncCounters();
    if (group.length > 0 && !this.opts.dropLast) yield this.assemble(group, size, contextLength, tokenizer);
  }

  private syncCounters(): void {
    const c = this.counters;
    c.samples =
      c.skippedMissingKeys =
      c.skippedCorrupt =
      c.failedShards =
        0;
    for (const r of this.readers) {
      c.samples += r.counters.samples;
      c.skippedMissingKeys += r.counters.skippedMissingKeys;
      c.skippedCorrupt += r.counters.skippedCorrupt;
      c.failedShards += r.counters.failedShards;
    }
  }

  private assemble(group: Decoded[], size: number, contextLength: number, tokenizer: ClipTokenizer): Batch {
    this.syncCounters();
    const pixels = 3 * size * size;
    const images = new Float32Array(group.length * pixels);
    group.forEach((d, i) => images.set(d.image!, i * pixels));
    return {
      images,
      tokens: tokenizer.tokenize(group.map((d) => d.caption), contextLength),
      keys: group.map((d) => d.key),
      captions: group.map((d) => d.caption),
      labels: Int32Array.from(group, (d) => d.label),
      shards: group.map((d) => d.shard),
      size: group.length,
      position: group[group.length - 1].position,
    };
  }
}

/** A 31-bit FNV-1a hash of a sample key, to seed its augmentation. */
function hashKey(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  return (h >>> 1);
}
