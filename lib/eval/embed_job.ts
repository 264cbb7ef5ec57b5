/**
 * The work of `clip embed`: embed the parts of one partition and write each as it completes.
 *
 * Memory stays bounded by one part (its embeddings and metadata) plus the decode window, whatever the input size.
 * Parts already written by an earlier run are skipped (see EmbeddingsWriter.isDone). A shard that cannot be opened or
 * read is not written, so that a rerun retries it; it is reported in the summary. A shard that turns out truncated
 * or corrupt is written with the samples read before the damage, and the damage is listed in the part's skipped file.
 */
import { ImageDecodeError, type Preprocess } from "../data/image.ts";
import { captionOf, imageOf } from "../data/loader.ts";
import type { ClipTokenizer } from "../data/tokenizer.ts";
import { IMAGE_EXTENSIONS, type RawSample, type Requirement, WebDatasetReader } from "../data/webdataset.ts";
import { type ImageSource, partName, partRange, partsOfPartition, type TextSource } from "../io/embed_inputs.ts";
import type { EmbeddingKind, EmbeddingsWriter, PartMetadata, SkippedInput } from "../io/embeddings_writer.ts";
import type { ClipModel } from "../nn/clip.ts";
import { embedImageStream, encodeTexts, type ImageInput } from "./encode.ts";

/** What to embed: images (from shards or files), texts (from a file or shards), or both from the same shards. */
export type EmbedPlan =
  | { mode: "image"; source: ImageSource }
  | { mode: "text"; source: TextSource }
  | { mode: "both"; source: { kind: "shards"; shards: string[] } };

export interface Part {
  index: number;
  name: string;
  /** The shard of a shard part. */
  shard?: string;
  /** The input range of a file or line part. */
  range?: [number, number];
}

export function kindsOf(plan: EmbedPlan): EmbeddingKind[] {
  return plan.mode === "both" ? ["image", "text"] : [plan.mode];
}

/** Every part of the input, numbered globally: one per shard, or one per `partSize` files or lines. */
export function planParts(plan: EmbedPlan, partSize: number): Part[] {
  const source = plan.source;
  if (source.kind === "shards") {
    return source.shards.map((shard, index) => ({ index, name: partName(index, source.shards.length), shard }));
  }
  if (!Number.isInteger(partSize) || partSize < 1) throw new RangeError(`part size must be >= 1, got ${partSize}`);
  const total = source.kind === "files" ? source.files.length : source.lines.length;
  const count = Math.ceil(total / partSize);
  return Array.from({ length: count }, (_, index) => ({
    index,
    name: partName(index, count),
    range: partRange(index, partSize, total),
  }));
}

/** How many inputs the given parts hold, or null when only the shards' contents would tell. */
export function inputCount(plan: EmbedPlan, parts: readonly Part[]): number | null {
  if (plan.source.kind === "shards") return null;
  return parts.reduce((n, p) => n + (p.range![1] - p.range![0]), 0);
}

export interface EmbedJobOptions {
  model: ClipModel;
  preprocess: Preprocess;
  /** Needed for text embeddings. */
  tokenizer?: ClipTokenizer;
  writer: EmbeddingsWriter;
  batchSize: number;
  partSize: number;
  partition: { index: number; count: number };
  /** Images decoding at once. Default 8. */
  concurrency?: number;
  /** Inputs handled (embedded or skipped) since the last call: called after every batch and every skip. */
  onProgress?: (inputs: number) => void;
  onPartStart?: (part: Part) => void;
  onPartDone?: (report: PartReport) => void;
  onWarning?: (message: string) => void;
}

export interface PartReport {
  part: Part;
  rows: number;
  skipped: number;
  /** Set when the part was not written (its shard could not be read): a rerun retries it. */
  failed?: string;
}

export interface EmbedSummary {
  /** Parts of this partition. */
  parts: number;
  /** Parts found complete from an earlier run. */
  alreadyDone: number;
  written: number;
  rows: number;
  skipped: number;
  /** Parts not written, with why. */
  failed: { part: string; reason: string }[];
  /** Shard samples left out for lacking the files the mode needs (e.g. no image). */
  incompleteSamples: number;
}

interface Row {
  key: string;
  caption: string;
  source: string;
}

/** Rows and embeddings of one part, gathered batch by batch. */
class PartBuffer {
  readonly metadata: PartMetadata = { key: [], caption: [], source: [] };
  readonly chunks: Record<EmbeddingKind, Float32Array[]> = { image: [], text: [] };
  readonly skipped: SkippedInput[] = [];

  add(rows: readonly Row[], embeddings: Partial<Record<EmbeddingKind, Float32Array>>): void {
    for (const r of rows) {
      this.metadata.key.push(r.key);
      this.metadata.caption.push(r.caption);
      this.metadata.source.push(r.source);
    }
    for (const kind of ["image", "text"] as const) {
      const e = embeddings[kind];
      if (e) this.chunks[kind].push(e);
    }
  }

  joined(kind: EmbeddingKind): Float32Array {
    const parts = this.chunks[kind];
    const out = new Float32Array(parts.reduce((n, p) => n + p.length, 0));
    let offset = 0;
    for (const p of parts) {
      out.set(p, offset);
      offset += p.length;
    }
    return out;
  }
}

function requirementsOf(mode: EmbedPlan["mode"]): Requirement[] {
  if (mode === "image") return [IMAGE_EXTENSIONS];
  if (mode === "text") return [["txt"]];
  return [IMAGE_EXTENSIONS, ["txt"]];
}

async function readFileForEmbedding(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    // A missing or unreadable file is a bad input like an undecodable one: skipped and listed, not fatal.
    throw new ImageDecodeError(`cannot read ${path}: ${(e as Error).message}`);
  }
}

export async function runEmbedJob(plan: EmbedPlan, opts: EmbedJobOptions): Promise<EmbedSummary> {
  const kinds = kindsOf(plan);
  if (kinds.includes("text") && !opts.tokenizer) throw new Error("text embeddings need a tokenizer");
  const all = planParts(plan, opts.partSize);
  const mine = partsOfPartition(all.length, opts.partition.index, opts.partition.count).map((i) => all[i]);
  const summary: EmbedSummary = {
    parts: mine.length,
    alreadyDone: 0,
    written: 0,
    rows: 0,
    skipped: 0,
    failed: [],
    incompleteSamples: 0,
  };
  await opts.writer.prepare();
  for (const part of mine) {
    if (await opts.writer.isDone(part.name)) {
      summary.alreadyDone++;
      continue;
    }
    opts.onPartStart?.(part);
    const buffer = new PartBuffer();
    let failure: string | undefined;
    if (part.shard !== undefined) {
      const result = await embedShard(plan.mode, part.shard, buffer, opts);
      failure = result.failure;
      summary.incompleteSamples += result.incomplete;
    } else if (plan.source.kind === "files") {
      const [start, end] = part.range!;
      const files = plan.source.files.slice(start, end);
      const inputs = files.map((f) => ({
        item: { key: f.key, caption: "", source: f.path },
        load: () => readFileForEmbedding(f.path),
      }));
      await embedImages(inputs, ["image"], buffer, opts);
    } else if (plan.source.kind === "lines") {
      const [start, end] = part.range!;
      const file = plan.source.file;
      const lines = plan.source.lines;
      for (let s = start; s < end; s += opts.batchSize) {
        const e = Math.min(end, s + opts.batchSize);
        const texts = lines.slice(s, e);
        const embeddings = await encodeTexts(opts.model, opts.tokenizer!, texts, opts.batchSize);
        buffer.add(texts.map((caption, i) => ({ key: String(s + i), caption, source: file })), { text: embeddings });
        opts.onProgress?.(e - s);
      }
    }
    const rows = buffer.metadata.key.length;
    if (failure !== undefined) {
      summary.failed.push({ part: part.name, reason: failure });
      opts.onPartDone?.({ part, rows, skipped: buffer.skipped.length, failed: failure });
      continue;
    }
    const embeddings: Partial<Record<EmbeddingKind, Float32Array>> = {};
    for (const kind of kinds) embeddings[kind] = buffer.joined(kind);
    await opts.writer.writePart(part.name, {
      dim: opts.model.config.embed_dim,
      embeddings,
      metadata: buffer.metadata,
      skipped: buffer.skipped,
    });
    summary.written++;
    summary.rows += rows;
    summary.skipped += buffer.skipped.length;
    opts.onPartDone?.({ part, rows, skipped: buffer.skipped.length });
  }
  return summary;
}

/** Embeds images (and, when `withText`, their captions) into the buffer, recording undecodable ones as skipped. */
async function embedImages(
  inputs: AsyncIterable<ImageInput<Row>> | Iterable<ImageInput<Row>>,
  kinds: EmbeddingKind[],
  buffer: PartBuffer,
  opts: EmbedJobOptions,
): Promise<void> {
  const withText = kinds.includes("text");
  const stream = embedImageStream(opts.model, opts.preprocess, inputs, {
    batchSize: opts.batchSize,
    concurrency: opts.concurrency,
    onSkip: (row, error) => {
      buffer.skipped.push({ source: row.source, key: row.key, reason: error.message });
      opts.onProgress?.(1);
    },
  });
  for await (const batch of stream) {
    const text = withText
      ? await encodeTexts(opts.model, opts.tokenizer!, batch.items.map((r) => r.caption), opts.batchSize)
      : undefined;
    buffer.add(batch.items, { image: batch.embeddings, text });
    opts.onProgress?.(batch.items.length);
  }
}

async function embedShard(
  mode: EmbedPlan["mode"],
  shard: string,
  buffer: PartBuffer,
  opts: EmbedJobOptions,
): Promise<{ failure?: string; incomplete: number }> {
  const warnings: string[] = [];
  const reader = new WebDatasetReader({
    shards: [shard],
    required: requirementsOf(mode),
    onWarning: (m) => {
      warnings.push(m);
      opts.onWarning?.(m);
    },
  });
  const row = (sample: RawSample): Row => ({ key: sample.key, caption: captionOf(sample) ?? "", source: shard });
  if (mode === "text") {
    let pending: Row[] = [];
    const flush = async () => {
      const embeddings = await encodeTexts(opts.model, opts.tokenizer!, pending.map((r) => r.caption), opts.batchSize);
      buffer.add(pending, { text: embeddings });
      opts.onProgress?.(pending.length);
      pending = [];
    };
    for await (const sample of reader.samples()) {
      pending.push(row(sample));
      if (pending.length === opts.batchSize) await flush();
    }
    if (pending.length > 0) await flush();
  } else {
    const inputs = async function* (): AsyncGenerator<ImageInput<Row>> {
      for await (const sample of reader.samples()) {
        const bytes = imageOf(sample)!; // the reader only hands out samples with an image
        yield { item: row(sample), load: () => bytes };
      }
    };
    await embedImages(inputs(), mode === "both" ? ["image", "text"] : ["image"], buffer, opts);
  }
  const c = reader.counters;
  if (c.failedShards > 0) return { failure: warnings.at(-1) ?? `shard ${shard} could not be read`, incomplete: 0 };
  if (c.skippedCorrupt > 0) {
    buffer.skipped.push({ source: shard, key: "", reason: warnings.at(-1) ?? "shard is truncated or corrupt" });
  }
  return { incomplete: c.skippedMissingKeys };
}
