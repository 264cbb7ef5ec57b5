/**
 * Batches of decoded images, tokens, keys and labels from WebDataset shards.
 *
 * Decoding and preprocessing run in background threads (decode_pool.ts: `decodeWorkers` of them started for the
 * pass, or a `decodePool` shared with other passes), with up to `concurrency` images in flight, so they overlap each
 * other and the GPU's work on the previous batch; the calling thread only reads shards, tokenises and copies pixels
 * into the batch. Several readers (`workers`) each take their share of the shards (see webdataset.ts) and are
 * interleaved round-robin, so the order is deterministic for a given seed whatever the timing; the training crop of
 * each sample is drawn from (seed, epoch, key) alone, so it does not depend on timing or on the thread either.
 *
 * Every batch carries the reader positions just after its last sample: handing them back as `resumeFrom` continues
 * with the next batch exactly, even though the loader reads ahead.
 */
import { ClipError } from "../errors.ts";
import { type DecodedImage, DecodePool, defaultDecodeWorkers, type ImageDecoder, LocalDecoder } from "./decode_pool.ts";
import { ImageDecodeError, type Preprocess } from "./image.ts";
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
  /**
   * Hands `images` back to the loader for a later batch; read it no more afterwards. Optional for consumers, but
   * calling it once the images are uploaded saves allocating ~40 MB per batch (at 224 px, batch 64), whose first
   * touch costs page faults that can take as long as decoding the batch.
   */
  release?: () => void;
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
  /** Images decoding at once. Default 8, or 6 per decode worker if that is more (measured best at 12-24 for 2). */
  concurrency?: number;
  /**
   * Background threads that decode and preprocess images, started for each pass and stopped at its end. Default: one
   * per CPU core, up to 8. 0 decodes on the calling thread (sharp still decodes in its native threads, but the
   * resize then runs on the calling thread). Ignored when `decodePool` is given.
   */
  decodeWorkers?: number;
  /**
   * Decode on this pool's workers instead of starting new ones; the pool stays open after the pass. Worth it when
   * making several Loaders (one per epoch, or for validation): starting workers costs 0.1-0.2 s of CPU each and
   * their code then runs cold for a while (a 400-image pass runs at about 60% of the speed of one on a warm pool).
   */
  decodePool?: DecodePool;
  /** Take the caption from this field of the sample's .json instead of its .txt. */
  captionField?: string;
  resumeFrom?: LoaderPosition;
}

interface Decoded {
  key: string;
  shard: string;
  caption: string;
  label: number;
  image: DecodedImage | null;
  position: LoaderPosition;
}

const textDecoder = new TextDecoder();

/**
 * Released batch image buffers, kept for the next batches of any Loader (the next epoch's too): a fresh 40 MB buffer
 * costs thousands of page faults on first touch, which on some machines take as long as decoding the batch.
 */
const spareBatchImages: Float32Array[] = [];
const MAX_SPARE_BYTES = 128 << 20;

function takeBatchImages(length: number): Float32Array {
  const i = spareBatchImages.findIndex((b) => b.length === length);
  return i >= 0 ? spareBatchImages.splice(i, 1)[0] : new Float32Array(length);
}

function keepBatchImages(images: Float32Array): void {
  const held = spareBatchImages.reduce((n, b) => n + b.byteLength, 0);
  if (held + images.byteLength <= MAX_SPARE_BYTES) spareBatchImages.push(images);
}

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
    try {
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
    } finally {
      // Stopped early: close the shards still open.
      await Promise.all(iterators.map((it, w) => live[w] ? it.return?.(undefined) : undefined));
    }
  }

  private async decode(sample: RawSample, position: LoaderPosition, decoder: ImageDecoder): Promise<Decoded> {
    const caption = captionOf(sample, this.opts.captionField) ?? "";
    const label = labelOf(sample);
    const bytes = imageOf(sample);
    let image: DecodedImage | null = null;
    if (bytes) {
      // The crop depends only on (seed, epoch, key): the same whatever the decode order, worker or resume point.
      const cropSeed = this.opts.augment
        ? [this.opts.seed ?? 0, position.readers[0]?.epoch ?? 0, hashKey(sample.key)]
        : undefined;
      try {
        image = await decoder.decode({ bytes, preprocess: this.opts.preprocess, cropSeed });
      } catch (e) {
        if (!(e instanceof ImageDecodeError)) throw e;
        this.opts.onWarning?.(`skipped sample '${sample.key}' in ${sample.shard}: ${e.message}`);
      }
    }
    return { key: sample.key, shard: sample.shard, caption, label, image, position };
  }

  /** The batches of one pass (an epoch, or `numSamples` samples when resampling). */
  async *batches(): AsyncGenerator<Batch> {
    const { decodePool } = this.opts;
    const decodeWorkers = decodePool?.size ?? this.opts.decodeWorkers ?? defaultDecodeWorkers();
    if (!Number.isInteger(decodeWorkers) || decodeWorkers < 0) {
      throw new RangeError(`decodeWorkers must be a whole number >= 0, got ${decodeWorkers}`);
    }
    const concurrency = Math.max(1, this.opts.concurrency ?? Math.max(8, 6 * decodeWorkers));
    const ownPool = !decodePool && decodeWorkers > 0 ? new DecodePool(decodeWorkers) : undefined;
    try {
      const pool = decodePool ?? ownPool;
      // One slot per image in flight: each is copied into its batch and released before the next one is started.
      const decoder = pool ? pool.session(concurrency, this.opts.preprocess.size) : new LocalDecoder();
      try {
        yield* this.decodedBatches(decoder, concurrency);
      } finally {
        await decoder.close();
      }
    } finally {
      await ownPool?.close();
    }
  }

  private async *decodedBatches(decoder: ImageDecoder, concurrency: number): AsyncGenerator<Batch> {
    const { batchSize, contextLength, tokenizer } = this.opts;
    const size = this.opts.preprocess.size;
    const pixels = 3 * size * size;
    const pending: Promise<Decoded>[] = [];
    const source = this.interleaved();
    let exhausted = false;
    const fill = async () => {
      while (!exhausted && pending.length < concurrency) {
        const r = await source.next();
        if (r.done) exhausted = true;
        else {
          const decoded = this.decode(r.value.sample, r.value.position, decoder);
          decoded.catch(() => {}); // awaited in order below; this only keeps an early stop from leaving it unhandled
          pending.push(decoded);
        }
      }
    };
    let group: Decoded[] = [];
    let images = takeBatchImages(batchSize * pixels);
    try {
      while (true) {
        await fill();
        const head = pending.shift();
        if (!head) break;
        const d = await head;
        if (!d.image) {
          this.counters.skippedImages++;
          continue;
        }
        images.set(d.image.pixels, group.length * pixels);
        d.image.release();
        group.push(d);
        if (group.length === batchSize) {
          yield this.assemble(group, images, contextLength, tokenizer);
          group = [];
          images = takeBatchImages(batchSize * pixels);
        }
      }
      this.syncCounters();
      if (group.length > 0 && !this.opts.dropLast) {
        yield this.assemble(group, images.slice(0, group.length * pixels), contextLength, tokenizer);
      }
      keepBatchImages(images);
    } finally {
      await source.return(undefined);
    }
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

  private assemble(group: Decoded[], images: Float32Array, contextLength: number, tokenizer: ClipTokenizer): Batch {
    this.syncCounters();
    let released = false;
    const release = () => {
      if (released) return;
      released = true;
      if (group.length === this.opts.batchSize) keepBatchImages(images); // a short last batch is its own size
    };
    return {
      images,
      tokens: tokenizer.tokenize(group.map((d) => d.caption), contextLength),
      keys: group.map((d) => d.key),
      captions: group.map((d) => d.caption),
      labels: Int32Array.from(group, (d) => d.label),
      shards: group.map((d) => d.shard),
      size: group.length,
      position: group[group.length - 1].position,
      release,
    };
  }
}

/** A 31-bit FNV-1a hash of a sample key, to seed its augmentation. */
function hashKey(key: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < key.length; i++) h = Math.imul(h ^ key.charCodeAt(i), 0x01000193);
  return (h >>> 1);
}
