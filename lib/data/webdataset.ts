/**
 * WebDataset sample iteration: tar members grouped into samples, with shard shuffling, a sample shuffle buffer,
 * resampling, partitioning across machines and workers, and a position that can be saved and resumed exactly.
 *
 * Samples. Consecutive members sharing a key form one sample. WebDataset's rule: the key is the member's path up to
 * the first dot after the last '/', the extension is the rest, lower-cased (`a/b.c/x.seg.JPG` -> key `a/b.c/x`,
 * extension `seg.jpg`). Members whose base name has no key before a dot (`README`, `.hidden`) are ignored.
 *
 * Epoch order. Non-resampled: the shard list, shuffled with `Rng(seed + epoch)` when `shuffleShards` is set, is split
 * so shard i goes to machine i % shardCount, and that machine's shards j to worker j % workerCount. Every (machine,
 * worker) pair computes the same shuffled list, so together they read every shard, hence every sample, exactly once
 * per epoch. Resampled: each reader draws shards with replacement from the whole list, from a stream seeded by
 * (seed, epoch, shardIndex, workerIndex), until `numSamples` samples have been produced.
 *
 * Robustness. A shard that cannot be opened, a tar that is truncated or corrupt, or a download that fails is counted,
 * reported through `onWarning` and skipped (the sample being assembled when the error struck is dropped); samples
 * lacking the required files are counted and skipped. Nothing is thrown mid-run for a bad shard or sample, except in
 * resampled mode when 64 shards drawn in a row produced no sample, which would otherwise loop forever.
 *
 * Resuming. `position()` describes the stream just after the last sample handed out:
 *  - `epoch`, and the `fingerprint` of the settings that fix the order (shards, seed, shuffle, partition, filter);
 *  - `shardCursor`: the index, in this reader's shard order for the epoch, of the shard the source reads next (in
 *    resampled mode, the number of the draw), and `samplesInShard`: how many key groups of it were already consumed;
 *  - `samplesYielded`, counted against `numSamples`;
 *  - with a shuffle buffer, the buffer's generator state and the (shardCursor, group index) of every sample sitting in
 *    the buffer, in buffer order.
 * A reader built with the same options and `resumeFrom: position` recomputes the epoch's shard order, re-reads just
 * the samples that were in the buffer (tar has no index, so it streams those shards up to them), reopens the source at
 * (shardCursor, samplesInShard) and continues: the samples it yields are exactly those the original reader would
 * have yielded next. Positions are per reader: a loader with several workers saves one per worker.
 */

import { ClipError, UsageError } from "../errors.ts";
import { Rng } from "./rng.ts";
import { openShard as openShardDefault, partitionShards } from "./shards.ts";
import { readTar, type TarEntry, TarError } from "./tar.ts";

export interface RawSample {
  /** WebDataset's `__key__`: the member path up to the first dot of its base name. */
  key: string;
  /** The shard (path or URL) the sample came from: WebDataset's `__url__`. */
  shard: string;
  /** Member data by lower-case extension (`jpg`, `txt`, `json`, `seg.png`, ...). */
  files: Map<string, Uint8Array>;
}

export const IMAGE_EXTENSIONS: readonly string[] = ["jpg", "jpeg", "png", "webp"];

/**
 * One requirement: the sample must contain at least one of these. An entry is an extension (`txt`) or
 * `extension:field` (`json:caption`), which holds when that file parses as a JSON object whose field is a
 * non-empty string or any other non-null value.
 */
export type Requirement = readonly string[];

/** An image and a caption, the caption from a `.txt` or a `caption` field of a `.json`. */
export const IMAGE_TEXT_REQUIREMENTS: readonly Requirement[] = [IMAGE_EXTENSIONS, ["txt", "json:caption"]];

export interface WebDatasetCounters {
  /** Samples handed out. */
  samples: number;
  /** Key groups skipped because a required file was missing. */
  skippedMissingKeys: number;
  /** Shards cut short by a truncated or corrupt tar. */
  skippedCorrupt: number;
  /** Shards that could not be opened or whose download failed. */
  failedShards: number;
}

export interface DataPosition {
  epoch: number;
  shardCursor: number;
  samplesInShard: number;
  samplesYielded: number;
  /** Present when a shuffle buffer is used: generator state and buffered samples as [shardCursor, groupIndex]. */
  shuffle?: { rng: number[]; buffered: [number, number][] };
  /** Identifies the settings that fix the sample order; resuming with different ones is refused. */
  fingerprint: string;
}

export interface WebDatasetOptions {
  /** Shard locations, as returned by expandShards. */
  shards: readonly string[];
  /** Default 0; taken from `resumeFrom` when resuming. */
  epoch?: number;
  /** Default 0. */
  seed?: number;
  /** Shuffle the shard order each epoch with `Rng(seed + epoch)`. Default false. */
  shuffleShards?: boolean;
  /** Size of the sample shuffle buffer; 0 or 1 keeps the order. Default 0. */
  shuffleBuffer?: number;
  /** Draw shards with replacement (endless unless `numSamples` is set). Default false. */
  resampled?: boolean;
  /** Stop after this many samples. */
  numSamples?: number;
  /** This machine's partition. Default 0 of 1. */
  shardIndex?: number;
  shardCount?: number;
  /** This worker's partition within the machine's shards. Default 0 of 1. */
  workerIndex?: number;
  workerCount?: number;
  /** Every requirement must hold for a sample to be handed out. Default: none. */
  required?: readonly Requirement[];
  onWarning?: (message: string) => void;
  /** How to open a shard; defaults to shards.ts openShard. */
  openShard?: (location: string) => Promise<ReadableStream<Uint8Array>>;
  /** Members above this size are skipped (see readTar). */
  maxMemberBytes?: number;
  /** Continue from a saved position instead of the start of the epoch. */
  resumeFrom?: DataPosition;
}

/** Consecutive resampled shards without a sample after which resampling gives up. */
const MAX_EMPTY_DRAWS = 64;

/** WebDataset's name split, or undefined for members that belong to no sample. */
export function splitMemberName(name: string): { key: string; extension: string } | undefined {
  const slash = name.lastIndexOf("/");
  const dot = name.indexOf(".", slash + 1);
  if (dot <= slash + 1) return undefined; // no dot, or nothing before it
  return { key: name.slice(0, dot), extension: name.slice(dot + 1).toLowerCase() };
}

const utf8 = new TextDecoder();

function holds(files: Map<string, Uint8Array>, alternative: string): boolean {
  const colon = alternative.indexOf(":");
  if (colon < 0) return files.has(alternative);
  const data = files.get(alternative.slice(0, colon));
  if (!data) return false;
  try {
    const value = JSON.parse(utf8.decode(data))?.[alternative.slice(colon + 1)];
    return value !== undefined && value !== null && value !== "";
  } catch {
    return false;
  }
}

function meetsRequirements(files: Map<string, Uint8Array>, required: readonly Requirement[]): boolean {
  return required.every((alternatives) => alternatives.some((alternative) => holds(files, alternative)));
}

export function describeRequirements(required: readonly Requirement[]): string {
  return required.map((alternatives) =>
    alternatives.length === 1 ? alternatives[0] : `one of ${alternatives.join("/")}`
  )
    .join(" and ");
}

interface Group {
  key: string;
  files: Map<string, Uint8Array>;
  /** Position among the shard's key groups, counting groups later filtered out. */
  index: number;
  /** Ended by the end of the archive, so nothing follows it in the shard. */
  last: boolean;
}

/** Groups consecutive members by key. A group is complete when a member with another key arrives, or at the end. */
async function* groupMembers(
  entries: AsyncIterable<TarEntry>,
  onDuplicate: (key: string, extension: string) => void,
): AsyncGenerator<Group> {
  let current: Group | undefined;
  let index = 0;
  for await (const entry of entries) {
    const parts = splitMemberName(entry.name);
    if (!parts) continue;
    if (current?.key === parts.key) {
      if (current.files.has(parts.extension)) onDuplicate(parts.key, parts.extension);
      else current.files.set(parts.extension, entry.data);
      continue;
    }
    if (current) yield current;
    current = { key: parts.key, files: new Map([[parts.extension, entry.data]]), index: index++, last: false };
  }
  if (current) yield { ...current, last: true };
}

/** A sample with where it came from, so the stream position can be recorded. */
interface Positioned {
  sample: RawSample;
  cursor: number;
  index: number;
  last: boolean;
}

/** The shards this reader visits in an epoch, by cursor: a finite list, or an endless seeded sequence of draws. */
interface ShardOrder {
  at(cursor: number): string | undefined;
  readonly length: number;
}

/** The settings that fix which shards a reader visits, and in what order. */
interface OrderSettings {
  shards: readonly string[];
  seed: number;
  epoch: number;
  shuffleShards: boolean;
  resampled: boolean;
  shardIndex: number;
  shardCount: number;
  workerIndex: number;
  workerCount: number;
}

function epochOrder(opts: OrderSettings): ShardOrder {
  if (opts.resampled) {
    const rng = Rng.derive(opts.seed, opts.epoch, opts.shardIndex, opts.workerIndex, 0x5a3d);
    const draws: number[] = [];
    return {
      length: Infinity,
      at(cursor) {
        while (draws.length <= cursor) draws.push(rng.int(opts.shards.length));
        return opts.shards[draws[cursor]];
      },
    };
  }
  const all = [...opts.shards];
  if (opts.shuffleShards) new Rng(opts.seed + opts.epoch).shuffle(all);
  const mine = partitionShards(
    partitionShards(all, opts.shardIndex, opts.shardCount),
    opts.workerIndex,
    opts.workerCount,
  );
  return { length: mine.length, at: (cursor) => mine[cursor] };
}

/** 64-bit FNV-1a (two 32-bit lanes) as hex: a cheap identity check, not a security measure. */
function fingerprintOf(value: unknown): string {
  const text = JSON.stringify(value);
  let a = 0x811c9dc5, b = 0x050c5d1f;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    a = Math.imul(a ^ c, 0x01000193);
    b = Math.imul(b ^ c, 0x01000193) ^ (a >>> 13);
  }
  return (a >>> 0).toString(16).padStart(8, "0") + (b >>> 0).toString(16).padStart(8, "0");
}

function checkInteger(name: string, value: number, min: number): void {
  if (!Number.isSafeInteger(value) || value < min) {
    throw new UsageError(`${name} must be an integer >= ${min}, got ${value}`);
  }
}

function checkPartition(what: string, index: number, count: number): void {
  checkInteger(`${what} count`, count, 1);
  checkInteger(`${what} index`, index, 0);
  if (index >= count) throw new UsageError(`${what} index ${index} must be below the ${what} count ${count}`);
}

/**
 * Iterates samples for one epoch (or `numSamples` in resampled mode). Use one reader per epoch and worker:
 * `for await (const s of reader.samples())`, then read `reader.counters`; `reader.position()` at any point.
 */
export class WebDatasetReader {
  readonly counters: WebDatasetCounters = { samples: 0, skippedMissingKeys: 0, skippedCorrupt: 0, failedShards: 0 };
  readonly epoch: number;
  readonly #shards: readonly string[];
  readonly #order: ShardOrder;
  readonly #required: readonly Requirement[];
  readonly #bufferSize: number;
  readonly #limit: number;
  readonly #resampled: boolean;
  readonly #fingerprint: string;
  readonly #warn: (message: string) => void;
  readonly #open: (location: string) => Promise<ReadableStream<Uint8Array>>;
  readonly #maxMemberBytes?: number;
  readonly #resume?: DataPosition;
  readonly #partitionLabel: string;
  #rng: Rng;
  #buffer: Positioned[] = [];
  #cursor = 0;
  #inShard = 0;
  #yielded = 0;
  #started = false;

  constructor(opts: WebDatasetOptions) {
    if (opts.shards.length === 0) throw new ClipError("no shards to read; check the shard spec");
    const settings = {
      shards: opts.shards,
      seed: opts.seed ?? 0,
      shuffleShards: opts.shuffleShards ?? false,
      shuffleBuffer: opts.shuffleBuffer ?? 0,
      resampled: opts.resampled ?? false,
      shardIndex: opts.shardIndex ?? 0,
      shardCount: opts.shardCount ?? 1,
      workerIndex: opts.workerIndex ?? 0,
      workerCount: opts.workerCount ?? 1,
      required: opts.required ?? [],
    };
    checkInteger("seed", settings.seed, Number.MIN_SAFE_INTEGER);
    checkInteger("shuffle buffer", settings.shuffleBuffer, 0);
    checkPartition("shard", settings.shardIndex, settings.shardCount);
    checkPartition("worker", settings.workerIndex, settings.workerCount);
    if (opts.numSamples !== undefined) checkInteger("number of samples", opts.numSamples, 0);
    const resume = opts.resumeFrom;
    if (resume && opts.epoch !== undefined && opts.epoch !== resume.epoch) {
      throw new UsageError(`epoch ${opts.epoch} contradicts the resumed position's epoch ${resume.epoch}`);
    }
    this.epoch = resume?.epoch ?? opts.epoch ?? 0;
    checkInteger("epoch", this.epoch, 0);
    this.#fingerprint = fingerprintOf(settings);
    this.#order = epochOrder({ ...settings, epoch: this.epoch });
    this.#shards = opts.shards;
    this.#required = settings.required;
    this.#bufferSize = settings.shuffleBuffer;
    this.#resampled = settings.resampled;
    this.#limit = opts.numSamples ?? Infinity;
    this.#warn = opts.onWarning ?? (() => {});
    this.#open = opts.openShard ?? ((location) => openShardDefault(location));
    this.#maxMemberBytes = opts.maxMemberBytes;
    this.#partitionLabel = `machine ${settings.shardIndex} of ${settings.shardCount}, worker ${settings.workerIndex} ` +
      `of ${settings.workerCount}`;
    this.#rng = Rng.derive(settings.seed, this.epoch, settings.shardIndex, settings.workerIndex, 0xb0ff);
    if (resume) {
      if (resume.fingerprint !== this.#fingerprint) {
        throw new ClipError(
          "the saved data position was made with other shards, seed, shuffle, partition or filter settings; " +
            "resume with the original settings or start the epoch over",
        );
      }
      this.#cursor = resume.shardCursor;
      this.#inShard = resume.samplesInShard;
      this.#yielded = resume.samplesYielded;
      if (resume.shuffle) this.#rng = Rng.fromState(resume.shuffle.rng);
      this.#resume = resume;
    }
  }

  /** Where the stream stands after the last sample handed out; pass it as `resumeFrom` to continue from there. */
  position(): DataPosition {
    if (!this.#started && this.#resume) return structuredClone(this.#resume);
    return {
      epoch: this.epoch,
      shardCursor: this.#cursor,
      samplesInShard: this.#inShard,
      samplesYielded: this.#yielded,
      shuffle: this.#bufferSize > 1
        ? { rng: this.#rng.state(), buffered: this.#buffer.map((b) => [b.cursor, b.index]) }
        : undefined,
      fingerprint: this.#fingerprint,
    };
  }

  /** The samples, in order. Can be iterated once. */
  async *samples(): AsyncGenerator<RawSample> {
    if (this.#started) throw new Error("WebDatasetReader.samples() can be iterated only once; create a new reader");
    this.#started = true;
    if (this.#order.length === 0) {
      this.#warn(
        `no shards for ${this.#partitionLabel}: ${this.#shards.length} shards do not go around; ` +
          "use fewer machines or workers, or more shards",
      );
    }
    if (this.#resume?.shuffle) await this.#restoreBuffer(this.#resume.shuffle.buffered);
    if (this.#yielded >= this.#limit) return;

    const shuffling = this.#bufferSize > 1;
    for await (const item of this.#source()) {
      // The source is suspended until the next pull, so the position recorded here holds while `item` is handed out.
      if (item.last) {
        this.#cursor = item.cursor + 1;
        this.#inShard = 0;
      } else {
        this.#cursor = item.cursor;
        this.#inShard = item.index + 1;
      }
      let out = item;
      if (shuffling) {
        if (this.#buffer.length < this.#bufferSize) {
          this.#buffer.push(item);
          continue;
        }
        const k = this.#rng.int(this.#bufferSize);
        out = this.#buffer[k];
        this.#buffer[k] = item;
      }
      yield this.#handOut(out);
      if (this.#yielded >= this.#limit) return;
    }
    this.#cursor = this.#order.length; // finite here: a resampled source never runs out
    this.#inShard = 0;
    while (this.#buffer.length > 0) {
      const k = this.#rng.int(this.#buffer.length);
      const out = this.#buffer[k];
      this.#buffer[k] = this.#buffer[this.#buffer.length - 1];
      this.#buffer.pop();
      yield this.#handOut(out);
      if (this.#yielded >= this.#limit) return;
    }
  }

  #handOut(item: Positioned): RawSample {
    this.#yielded++;
    this.counters.samples++;
    return item.sample;
  }

  /** Samples in shard order from the current position on. */
  async *#source(): AsyncGenerator<Positioned> {
    const startCursor = this.#cursor;
    const startInShard = this.#inShard;
    let emptyDraws = 0;
    for (let cursor = startCursor;; cursor++) {
      const shard = this.#order.at(cursor);
      if (shard === undefined) return;
      let produced = 0;
      for await (const item of this.#readShard(shard, cursor, cursor === startCursor ? startInShard : 0, false)) {
        produced++;
        yield item;
      }
      if (!this.#resampled) continue;
      emptyDraws = produced > 0 ? 0 : emptyDraws + 1;
      if (emptyDraws >= MAX_EMPTY_DRAWS) {
        throw new ClipError(
          `resampling drew ${MAX_EMPTY_DRAWS} shards in a row without a usable sample (last: ${shard}); ` +
            "check the shards and the required extensions",
        );
      }
    }
  }

  /**
   * The samples of one shard from key group `skip` on. Failures end the shard, never the run. `quiet` (used while
   * restoring a shuffle buffer) neither counts nor warns, since those samples were accounted for the first time.
   */
  async *#readShard(shard: string, cursor: number, skip: number, quiet: boolean): AsyncGenerator<Positioned> {
    const warn = quiet ? () => {} : this.#warn;
    let stream: ReadableStream<Uint8Array>;
    try {
      stream = await this.#open(shard);
    } catch (e) {
      if (!quiet) this.counters.failedShards++;
      warn(`shard ${shard} skipped: ${(e as Error).message}`);
      return;
    }
    const entries = readTar(stream, {
      maxMemberBytes: this.#maxMemberBytes,
      onSkippedMember: (m) =>
        warn(`${shard}: member "${m.name}" at offset ${m.offset} skipped: ${m.size} bytes is over the size limit`),
    });
    const onDuplicate = (key: string, ext: string) =>
      warn(`${shard}: sample "${key}" has two ".${ext}" files; kept the first`);
    try {
      for await (const group of groupMembers(entries, onDuplicate)) {
        if (group.index < skip) continue;
        if (!meetsRequirements(group.files, this.#required)) {
          if (!quiet) this.counters.skippedMissingKeys++;
          continue;
        }
        const sample = { key: group.key, shard, files: group.files };
        yield { sample, cursor, index: group.index, last: group.last };
      }
    } catch (e) {
      if (e instanceof TarError) {
        if (!quiet) this.counters.skippedCorrupt++;
        warn(`shard ${shard} is corrupt, rest of it skipped: ${e.message}`);
      } else {
        if (!quiet) this.counters.failedShards++;
        warn(`reading shard ${shard} failed, rest of it skipped: ${(e as Error).message}`);
      }
    }
  }

  /** Re-reads the samples that sat in the shuffle buffer when the position was saved, in their buffer order. */
  async #restoreBuffer(buffered: readonly [number, number][]): Promise<void> {
    const wanted = new Map<number, Set<number>>();
    for (const [cursor, index] of buffered) {
      if (!wanted.has(cursor)) wanted.set(cursor, new Set());
      wanted.get(cursor)!.add(index);
    }
    const found = new Map<string, Positioned>();
    for (const cursor of [...wanted.keys()].sort((a, b) => a - b)) {
      const shard = this.#order.at(cursor);
      if (shard === undefined) continue;
      const indices = wanted.get(cursor)!;
      const first = Math.min(...indices), lastWanted = Math.max(...indices);
      for await (const item of this.#readShard(shard, cursor, first, true)) {
        if (indices.has(item.index)) found.set(`${cursor}:${item.index}`, item);
        if (item.index >= lastWanted) break;
      }
    }
    this.#buffer = buffered.map(([c, i]) => found.get(`${c}:${i}`)).filter((item): item is Positioned => !!item);
    const lost = buffered.length - this.#buffer.length;
    if (lost > 0) this.#warn(`resuming: ${lost} samples of the shuffle buffer could not be re-read and are skipped`);
  }
}

export interface ShardCheck {
  shard: string;
  /** Key groups examined. */
  samplesChecked: number;
  /** Extensions seen, sorted. */
  extensions: string[];
}

/**
 * Checks before a run starts that the first shard opens and that one of its first `maxSamples` samples has the
 * required files. Throws ClipError naming the shard (and the extensions it does have) otherwise.
 */
export async function validateShards(
  shards: readonly string[],
  required: readonly Requirement[],
  opts: { maxSamples?: number; openShard?: (location: string) => Promise<ReadableStream<Uint8Array>> } = {},
): Promise<ShardCheck> {
  const shard = shards[0];
  if (shard === undefined) throw new ClipError("no shards to read; check the shard spec");
  const maxSamples = opts.maxSamples ?? 100;
  const open = opts.openShard ?? ((location: string) => openShardDefault(location));
  let stream: ReadableStream<Uint8Array>;
  try {
    stream = await open(shard);
  } catch (e) {
    throw new ClipError(`cannot read the first shard ${shard}: ${(e as Error).message}`);
  }
  const extensions = new Set<string>();
  let checked = 0;
  const report = () => ({ shard, samplesChecked: checked, extensions: [...extensions].sort() });
  try {
    for await (const group of groupMembers(readTar(stream), () => {})) {
      checked++;
      for (const ext of group.files.keys()) extensions.add(ext);
      if (meetsRequirements(group.files, required)) return report();
      if (checked >= maxSamples) break;
    }
  } catch (e) {
    if (!(e instanceof TarError) || checked === 0) {
      throw new ClipError(`the first shard ${shard} is not a readable tar archive: ${(e as Error).message}`);
    }
  }
  if (checked === 0) {
    throw new ClipError(`the first shard ${shard} holds no samples (no member named like KEY.EXTENSION)`);
  }
  const found = extensions.size > 0 ? [...extensions].sort().join(", ") : "none";
  throw new ClipError(
    `none of the first ${checked} samples of ${shard} has ${describeRequirements(required)}; ` +
      `extensions found: ${found}`,
  );
}
