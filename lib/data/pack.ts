/**
 * Writing WebDataset shards: samples (a key and its files) go into `PREFIX-000000.tar`, `PREFIX-000001.tar`, ... in
 * the order they are given, a new shard starting when the current one holds `maxSamples` samples or the next sample
 * would take it past `maxBytes`. `packFrom` turns a folder or caption table (./pack_sources.ts) into such shards,
 * storing each image's bytes as they are, with `sizes.json` ({shard: samples}) and `stats.json` beside them.
 */

import { join } from "node:path";
import { ClipError } from "../errors.ts";
import { TarWriter } from "./tar_writer.ts";
import {
  type ImageRef,
  ImageSkip,
  listSource,
  type ListSourceOptions,
  loadImage,
  type LoadImageOptions,
  type SkippedItem,
  type SourceKind,
} from "./pack_sources.ts";

/** One member of a sample: stored as `KEY.EXT`. */
export interface SampleFile {
  ext: string;
  data: Uint8Array;
}

export interface ShardLimits {
  /** Samples per shard (at least 1). */
  maxSamples: number;
  /** Bytes per shard; a single sample larger than this still gets a shard of its own. Infinity for no limit. */
  maxBytes: number;
}

/** `{shard file name: sample count}`, in shard order. */
export type ShardSizes = Record<string, number>;

const BLOCK = 512;
const END_OF_ARCHIVE = 2 * BLOCK;
/** Keeps every member name within the 100-byte ustar name field, so the byte accounting below is exact. */
const MAX_MEMBER_NAME = 100;
const SHARD_DIGITS = 6;
const encoder = new TextEncoder();

export function shardName(prefix: string, index: number): string {
  return `${prefix}-${String(index).padStart(SHARD_DIGITS, "0")}.tar`;
}

/** True for names `shardName(prefix, i)` gives, and their unfinished `.tmp` files. */
export function isShardName(prefix: string, name: string): boolean {
  if (!name.startsWith(`${prefix}-`)) return false;
  return /^\d{6,}\.tar(\.tmp)?$/.test(name.slice(prefix.length + 1));
}

/** Bytes a member takes in a ustar archive: one header block and the data padded to whole blocks. */
function memberBytes(size: number): number {
  return BLOCK + Math.ceil(size / BLOCK) * BLOCK;
}

/** Writes samples into a numbered sequence of tar shards in `dir`. Call `close()` to finish (or `abort()`). */
export class ShardSequenceWriter {
  readonly #sizes: ShardSizes = {};
  #writer: TarWriter | undefined;
  #shardIndex = 0;
  #samplesInShard = 0;
  #bytesInShard = 0;

  constructor(readonly dir: string, readonly prefix: string, readonly limits: ShardLimits) {
    if (!Number.isInteger(limits.maxSamples) || limits.maxSamples < 1) {
      throw new RangeError(`maxSamples must be a positive integer, got ${limits.maxSamples}`);
    }
    if (!(limits.maxBytes > 0)) throw new RangeError(`maxBytes must be positive, got ${limits.maxBytes}`);
  }

  /** Appends one sample; its files are written in the order given. */
  async add(key: string, files: readonly SampleFile[]): Promise<void> {
    let bytes = 0;
    for (const file of files) {
      const name = `${key}.${file.ext}`;
      if (encoder.encode(name).length > MAX_MEMBER_NAME) {
        throw new RangeError(`member name ${name} is over ${MAX_MEMBER_NAME} bytes`);
      }
      bytes += memberBytes(file.data.length);
    }
    const full = this.#samplesInShard >= this.limits.maxSamples ||
      this.#bytesInShard + bytes + END_OF_ARCHIVE > this.limits.maxBytes;
    if (this.#writer && full) await this.#finishShard();
    if (!this.#writer) {
      this.#writer = await TarWriter.create(join(this.dir, shardName(this.prefix, this.#shardIndex)));
      this.#samplesInShard = 0;
      this.#bytesInShard = 0;
    }
    for (const file of files) await this.#writer.add(`${key}.${file.ext}`, file.data);
    this.#samplesInShard++;
    this.#bytesInShard += bytes;
  }

  /** Finishes the last shard and returns the sample count of every shard written. */
  async close(): Promise<ShardSizes> {
    if (this.#writer) await this.#finishShard();
    return { ...this.#sizes };
  }

  /** Drops the shard being written (finished shards stay). */
  async abort(): Promise<void> {
    await this.#writer?.abort();
    this.#writer = undefined;
  }

  async #finishShard(): Promise<void> {
    const writer = this.#writer!;
    this.#writer = undefined;
    await writer.close();
    this.#sizes[shardName(this.prefix, this.#shardIndex)] = this.#samplesInShard;
    this.#shardIndex++;
  }
}

/**
 * Maps `fn` over `items` with up to `concurrency` calls in flight and yields the results in input order, so work such
 * as downloads or image conversion overlaps while the shards stay deterministic.
 */
export async function* mapOrdered<T, R>(
  items: Iterable<T>,
  concurrency: number,
  fn: (item: T) => Promise<R>,
): AsyncGenerator<R> {
  const iterator = items[Symbol.iterator]();
  const pending: Promise<R>[] = [];
  const launch = () => {
    const next = iterator.next();
    if (next.done) return false;
    const promise = fn(next.value);
    promise.catch(() => {}); // awaited below in order; this only stops an early rejection counting as unhandled
    pending.push(promise);
    return true;
  };
  while (pending.length < concurrency && launch());
  while (pending.length > 0) {
    const result = await pending.shift()!;
    launch();
    yield result;
  }
}

/** Writes pretty JSON with a final newline, through a temporary file so readers never see half a file. */
export async function writeJsonFile(path: string, value: unknown): Promise<void> {
  await writeTextFileAtomic(path, JSON.stringify(value, null, 2) + "\n");
}

export async function writeTextFileAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp`;
  await Deno.writeTextFile(tmp, text);
  await Deno.rename(tmp, path);
}

/** Removes `dir`'s files for which `select` holds; returns their names. */
export async function removeFiles(dir: string, select: (name: string) => boolean): Promise<string[]> {
  const removed: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.isFile && select(entry.name)) {
      await Deno.remove(join(dir, entry.name));
      removed.push(entry.name);
    }
  }
  return removed.sort();
}

export interface PackProgress {
  /** Entries handled so far (packed or skipped) out of `total`. */
  done: number;
  total: number;
  packed: number;
  skipped: number;
}

export interface PackFromOptions extends ListSourceOptions {
  src: string;
  out: string;
  /** Shard and key prefix. Default "data". */
  prefix?: string;
  /** Default 10000 samples. */
  maxSamples?: number;
  /** Default 1 GiB. */
  maxBytes?: number;
  /** Replace shards already in `out` with this prefix. Without it, finding any is an error. */
  force?: boolean;
  /** Images read or downloaded at once. Default 16. */
  concurrency?: number;
  load?: LoadImageOptions;
  onProgress?: (progress: PackProgress) => void;
}

/** What stats.json holds for a `--from` pack. */
export interface PackFromStats {
  source: string;
  kind: SourceKind;
  image_column?: string;
  caption_column?: string;
  samples: number;
  skipped: number;
  shards: number;
  /** Image bytes stored, all samples together. */
  image_bytes: number;
  /** Samples per stored image extension. */
  formats: Record<string, number>;
  /** Skipped entries per reason. */
  skip_reasons: Record<string, number>;
  skipped_items: SkippedItem[];
}

export interface PackFromResult {
  sizes: ShardSizes;
  stats: PackFromStats;
}

export const DEFAULT_SHARD_SAMPLES = 10_000;
export const DEFAULT_SHARD_BYTES = 1 << 30;

/** Shard prefixes become key prefixes too, and WebDataset cuts keys at the first dot. */
const PREFIX_PATTERN = /^[A-Za-z0-9_-]{1,40}$/;

export function checkPrefix(prefix: string): void {
  if (!PREFIX_PATTERN.test(prefix)) {
    throw new ClipError(
      `shard prefix '${prefix}' is not allowed: use 1-40 letters, digits, '-' or '_' (no dots or slashes)`,
    );
  }
}

/**
 * Packs a folder or caption table into shards in `out`. Keys are `PREFIX-NNNNNN`, numbered by the entry's place in
 * the source (folder name order, table row), so a skipped entry leaves a gap rather than renumbering the rest.
 * Each sample holds the image (its own bytes), `txt` (the caption) and `json` (source, caption).
 */
export async function packFrom(opts: PackFromOptions): Promise<PackFromResult> {
  const prefix = opts.prefix ?? "data";
  checkPrefix(prefix);
  const listing = await listSource(opts.src, opts);
  await prepareOutput(opts.out, prefix, opts.force ?? false);

  const writer = new ShardSequenceWriter(opts.out, prefix, {
    maxSamples: opts.maxSamples ?? DEFAULT_SHARD_SAMPLES,
    maxBytes: opts.maxBytes ?? DEFAULT_SHARD_BYTES,
  });
  const digits = Math.max(6, String(listing.entries - 1).length);
  const skipped: SkippedItem[] = [...listing.skipped];
  const formats: Record<string, number> = {};
  let imageBytes = 0;
  let packed = 0;
  const total = listing.items.length + listing.skipped.length;
  const progress = () => opts.onProgress?.({ done: packed + skipped.length, total, packed, skipped: skipped.length });

  const load = (ref: ImageRef) =>
    loadImage(ref, opts.load).then((image) => ({ image }), (e) => {
      if (e instanceof ImageSkip) return { skip: e };
      throw e;
    });
  try {
    for await (
      const { item, result } of mapOrdered(
        listing.items,
        opts.concurrency ?? 16,
        async (item) => ({ item, result: await load(item.image) }),
      )
    ) {
      if ("skip" in result) {
        const row = listing.kind === "folder" ? {} : { row: item.index + 1 };
        skipped.push({ source: item.source, ...row, reason: result.skip.reason, detail: result.skip.detail });
      } else {
        const key = `${prefix}-${String(item.index).padStart(digits, "0")}`;
        const meta = { source: item.source, caption: item.caption };
        await writer.add(key, [
          { ext: result.image.ext, data: result.image.bytes },
          { ext: "txt", data: encoder.encode(item.caption) },
          { ext: "json", data: encoder.encode(JSON.stringify(meta)) },
        ]);
        formats[result.image.ext] = (formats[result.image.ext] ?? 0) + 1;
        imageBytes += result.image.bytes.length;
        packed++;
      }
      if ((packed + skipped.length) % 100 === 0) progress();
    }
  } catch (e) {
    await writer.abort();
    throw e;
  }
  const sizes = await writer.close();
  progress();
  if (packed === 0) {
    throw new ClipError(
      `none of the ${listing.items.length} images in ${opts.src} could be read (first problem: ` +
        `${describeSkip(skipped[0])}); nothing was packed`,
    );
  }
  // Listing and loading find problems at different times; report them in source order.
  skipped.sort((a, b) => (a.row ?? 0) - (b.row ?? 0) || (a.source < b.source ? -1 : a.source > b.source ? 1 : 0));
  const skipReasons: Record<string, number> = {};
  for (const s of skipped) skipReasons[s.reason] = (skipReasons[s.reason] ?? 0) + 1;
  const stats: PackFromStats = {
    source: opts.src,
    kind: listing.kind,
    ...(listing.kind === "folder" ? {} : { image_column: listing.imageColumn, caption_column: listing.captionColumn }),
    samples: packed,
    skipped: skipped.length,
    shards: Object.keys(sizes).length,
    image_bytes: imageBytes,
    formats,
    skip_reasons: skipReasons,
    skipped_items: skipped,
  };
  await writeJsonFile(join(opts.out, "sizes.json"), sizes);
  await writeJsonFile(join(opts.out, "stats.json"), stats);
  return { sizes, stats };
}

export function describeSkip(s: SkippedItem | undefined): string {
  if (!s) return "unknown";
  const where = s.row === undefined ? s.source : `${s.source} (row ${s.row})`;
  return `${where}: ${s.reason}${s.detail ? ` (${s.detail})` : ""}`;
}

/** Creates `out`; refuses to mix with an earlier pack of the same prefix unless `force`, which removes it. */
async function prepareOutput(out: string, prefix: string, force: boolean): Promise<void> {
  try {
    await Deno.mkdir(out, { recursive: true });
  } catch (e) {
    throw new ClipError(`cannot create output folder ${out}: ${(e as Error).message}`);
  }
  const earlier = (name: string) => isShardName(prefix, name) || name === "sizes.json" || name === "stats.json";
  if (!force) {
    for await (const entry of Deno.readDir(out)) {
      if (entry.isFile && earlier(entry.name)) {
        throw new ClipError(
          `${out} already holds ${entry.name} from an earlier pack: use --force to replace it, another --out, ` +
            `or another --prefix`,
        );
      }
    }
  }
  await removeFiles(out, earlier);
}
