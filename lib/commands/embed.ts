import { ClipError, UsageError } from "../errors.ts";
import { partitionFromEnv } from "../data/shards.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import { type EmbedPlan, inputCount, kindsOf, type Part, planParts, runEmbedJob } from "../eval/embed_job.ts";
import { isShardSpec, partsOfPartition, resolveImageSource, resolveTextSource } from "../io/embed_inputs.ts";
import { type EmbeddingKind, EmbeddingsWriter, partPaths } from "../io/embeddings_writer.ts";
import { getGpu, GpuLimitError } from "../gpu/runtime.ts";
import { checkFolderPath, ensureWritableFolder, writeFailureError } from "../io/output_folder.ts";
import { loadModel } from "../nn/load.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";
import { datasetSampleCount } from "./dataset_info.ts";
import { formatDuration, Progress } from "./progress.ts";

const HELP = `usage: clip embed --model M (--images SRC [IMAGE...] | --texts SRC) --out DIR [options]

Writes L2-normalised embeddings in clip-retrieval's layout, for kNN indexes (autofaiss, embedding-reader):
  DIR/img_emb/img_emb_PART.npy, DIR/text_emb/text_emb_PART.npy   [rows, dim] float32 (or float16)
  DIR/metadata/metadata_PART.parquet                              key, caption, source (shard or file), one row per
                                                                  embedding row, in input order
  DIR/skipped/skipped_PART.txt                                    inputs that could not be read (source, key, reason)

inputs:
  --model M            config name or JSON, checkpoint folder, hf-hub:ORG/NAME, or pretrained tag
  --images SRC         WebDataset shards (tar paths, {000..099} ranges, '::' lists, URLs, a folder of .tar files),
                       a folder of images (searched recursively, name order), a list file (one path per line,
                       relative to the list's folder), or image files (more may follow as arguments)
  --texts SRC          a text file (one text per line; key = line number from 0) or shards (their .txt captions)
                       --images S --texts S with the same shards embeds both in one pass, rows aligned

output and batching:
  --out DIR            output folder (created; finished parts already in it are kept and skipped)
  --batch-size B       images or texts per forward pass (default 64)
  --dtype f32|f16      element type of the .npy files (default f32)
  --part-size N        inputs per part for files and text lines (default 10000); shards: one part per shard
  --concurrency N      images decoding at once (default 8)

partitioning (several processes or machines, outputs merge by part name):
  --shard-index I --shard-count N   take parts I, I+N, I+2N, ... (part p = shard p, or the p-th run of --part-size)
  Without them the partition comes from the scheduler's environment: Kubernetes Indexed Jobs
  (JOB_COMPLETION_INDEX with CLIP_SHARD_COUNT or JOB_COMPLETIONS) or Slurm arrays (SLURM_ARRAY_TASK_ID,
  SLURM_ARRAY_TASK_COUNT); otherwise everything runs here.

Each part's files are written under temporary names and renamed, the .npy files last; a part counts as done when its
metadata and .npy files exist, so an interrupted run resumes where it stopped when started again. A shard that cannot
be read is left unwritten (exit code 1) and retried by the next run.`;

const FLAGS = {
  model: { type: "string" },
  images: { type: "string" },
  texts: { type: "string" },
  out: { type: "string" },
  "batch-size": { type: "string" },
  dtype: { type: "string" },
  "part-size": { type: "string" },
  concurrency: { type: "string" },
  "shard-index": { type: "string" },
  "shard-count": { type: "string" },
} as const;

function planFrom(images: string | undefined, extraImages: string[], texts: string | undefined): EmbedPlan {
  if (images !== undefined && texts !== undefined) {
    if (images !== texts || !isShardSpec(images) || extraImages.length > 0) {
      throw new UsageError(
        "embed: --images and --texts together must name the same shards (captions embedded beside their images); " +
          "embed different sources in separate runs.",
      );
    }
    const source = resolveImageSource([images]);
    if (source.kind !== "shards") throw new UsageError("embed: --images and --texts together need shards.");
    return { mode: "both", source };
  }
  if (images !== undefined) return { mode: "image", source: resolveImageSource([images, ...extraImages]) };
  if (extraImages.length > 0) throw new UsageError("embed: image arguments need --images (use --images FIRST ...).");
  return { mode: "text", source: resolveTextSource(texts!) };
}

function partitionFrom(index: string | undefined, count: string | undefined) {
  if ((index === undefined) !== (count === undefined)) {
    throw new UsageError("embed: give --shard-index and --shard-count together.");
  }
  if (index !== undefined) {
    const n = intFlag("embed", "shard-count", count, 1);
    const i = intFlag("embed", "shard-index", index, 0);
    if (n < 1 || i >= n) throw new UsageError(`embed: --shard-index must be in 0..${n - 1} for --shard-count ${n}.`);
    return { index: i, count: n, source: "--shard-index/--shard-count" };
  }
  return partitionFromEnv(Deno.env.toObject()) ?? { index: 0, count: 1, source: "" };
}

export const embedCommand: Command = {
  name: "embed",
  summary: "Embed images or texts to .npy files with metadata (clip-retrieval layout).",
  help: HELP,
  async run(argv) {
    const { values: v, positionals } = parseCommandArgs("embed", argv, FLAGS, true);
    if (v.help) {
      console.log(HELP);
      return 0;
    }
    for (const required of ["model", "out"] as const) {
      if (!v[required]) throw new UsageError(`embed: --${required} is required. Run 'clip embed --help' for usage.`);
    }
    if (v.images === undefined && v.texts === undefined) {
      throw new UsageError("embed: give --images or --texts. Run 'clip embed --help' for usage.");
    }
    const dtype = v.dtype ?? "f32";
    if (dtype !== "f32" && dtype !== "f16") throw new UsageError(`embed: --dtype must be f32 or f16, got '${dtype}'.`);
    const batchSize = intFlag("embed", "batch-size", v["batch-size"], 64);
    const partSize = intFlag("embed", "part-size", v["part-size"], 10_000);
    if (batchSize < 1 || partSize < 1) throw new UsageError("embed: --batch-size and --part-size must be at least 1.");
    const concurrency = Math.max(1, intFlag("embed", "concurrency", v.concurrency, 8));
    const partition = partitionFrom(v["shard-index"], v["shard-count"]);
    const plan = planFrom(v.images, positionals, v.texts);
    const out = v.out!;
    await checkFolderPath(out, "--out");
    const writer = new EmbeddingsWriter(out, kindsOf(plan), dtype);

    const all = planParts(plan, partSize);
    const mine = partsOfPartition(all.length, partition.index, partition.count).map((i) => all[i]);
    const todo: Part[] = [];
    for (const part of mine) if (!(await writer.isDone(part.name))) todo.push(part);
    const where = partition.count > 1
      ? `partition ${partition.index} of ${partition.count} (${partition.source}): `
      : "";
    console.error(
      `${where}${mine.length} of ${all.length} parts, ${
        mine.length - todo.length
      } already done, ${todo.length} to embed`,
    );
    if (todo.length === 0) return 0;
    await ensureWritableFolder(out, "--out");

    const gpu = await getGpu();
    const { model, preprocess, source } = await loadModel(gpu, v.model!, { inference: true });
    const tokenizer = kindsOf(plan).includes("text") ? await ClipTokenizer.load() : undefined;
    const total = inputCount(plan, todo) ??
      (plan.source.kind === "shards" ? await datasetSampleCount(todo.map((p) => p.shard!)) : null);
    const unit = plan.mode === "text" ? "texts" : "images";
    console.error(`embedding with ${v.model} (${source}), ${model.config.embed_dim} dims, into ${out}`);
    const progress = new Progress(unit, total);
    let started = 0;
    const job = runEmbedJob(plan, {
      model,
      preprocess,
      tokenizer,
      writer,
      batchSize,
      partSize,
      concurrency,
      partition,
      onPartStart: (part) => {
        started++;
        progress.detail = `part ${part.name} (${started}/${todo.length})`;
      },
      onProgress: (n) => progress.advance(n),
      onPartDone: (r) => {
        if (r.failed) progress.note(`part ${r.part.name} not written: ${r.failed}`);
        else if (r.skipped > 0) progress.note(`part ${r.part.name}: ${r.skipped} inputs skipped (see ${out}/skipped/)`);
      },
      onWarning: (m) => progress.note(`warning: ${m}`),
    });
    const summary = await job.catch(async (e) => {
      if (e instanceof GpuLimitError) {
        throw new ClipError(
          `embed: ${e.message}; try --batch-size ${e.suggestedBatchSize(batchSize)} or smaller (now ${batchSize})`,
        );
      }
      await removePartialFiles(out, todo.map((p) => p.name), kindsOf(plan));
      throw writeFailureError(e, out, "finished parts are kept: free space, then run the same command again");
    });
    progress.finish();
    const lines = [
      `wrote ${summary.written} parts, ${summary.rows} rows in ${formatDuration(progress.seconds)} (${
        progress.rate.toFixed(1)
      } ${unit}/s)`,
    ];
    if (summary.skipped > 0) lines.push(`${summary.skipped} inputs skipped, listed in ${out}/skipped/`);
    if (summary.incompleteSamples > 0) {
      lines.push(`${summary.incompleteSamples} shard samples lacked the files needed and were left out`);
    }
    for (const f of summary.failed) lines.push(`part ${f.part} NOT written (run again to retry): ${f.reason}`);
    console.error(lines.join("\n  "));
    return summary.failed.length > 0 ? 1 : 0;
  },
};

/**
 * Drops the `.partial` files of this run's parts after a failed write, so nothing half-written stays on a full disk.
 * Only this run's parts: other processes may be writing other parts of the same folder.
 */
async function removePartialFiles(out: string, parts: string[], kinds: EmbeddingKind[]): Promise<void> {
  for (const part of parts) {
    const paths = partPaths(out, part);
    for (const path of [paths.metadata, paths.skipped, ...kinds.map(paths.npy)]) {
      await Deno.remove(`${path}.partial`).catch(() => {});
    }
  }
}
