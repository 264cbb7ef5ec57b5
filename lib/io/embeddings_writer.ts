/**
 * Embedding parts in clip-retrieval's layout, so existing kNN tooling (autofaiss, embedding-reader) reads them:
 *
 *   DIR/img_emb/img_emb_{part}.npy        [rows, dim] L2-normalised image embeddings (float32 or float16)
 *   DIR/text_emb/text_emb_{part}.npy      [rows, dim] L2-normalised text embeddings
 *   DIR/metadata/metadata_{part}.parquet  columns key, caption, source; row i describes row i of the .npy files
 *   DIR/skipped/skipped_{part}.txt        inputs of the part that could not be embedded (only when there are some)
 *
 * A part is written as a whole: each file goes to `NAME.partial` and is renamed into place, metadata and the skipped
 * list first and the .npy files last. A part counts as done only when its metadata and every .npy file it should have
 * exist, so a run stopped at any point redoes at most the parts it was writing, and a finished part is never rewritten.
 * Part names are the same whichever process writes them, so the outputs of several processes merge by name.
 */
import { parquetWriteBuffer } from "hyparquet-writer";
import { encodeNpy, type NpyDType, toFloat16 } from "./npy.ts";

export type EmbeddingKind = "image" | "text";

export interface PartMetadata {
  key: string[];
  caption: string[];
  /** The shard or file each row came from. */
  source: string[];
}

export interface SkippedInput {
  source: string;
  key: string;
  reason: string;
}

export interface PartData {
  dim: number;
  /** [rows, dim] for each kind this writer writes. */
  embeddings: Partial<Record<EmbeddingKind, Float32Array>>;
  metadata: PartMetadata;
  skipped: SkippedInput[];
}

const FOLDER: Record<EmbeddingKind, string> = { image: "img_emb", text: "text_emb" };

/** The files of one part under `dir`. */
export function partPaths(dir: string, part: string) {
  return {
    npy: (kind: EmbeddingKind) => `${dir}/${FOLDER[kind]}/${FOLDER[kind]}_${part}.npy`,
    metadata: `${dir}/metadata/metadata_${part}.parquet`,
    skipped: `${dir}/skipped/skipped_${part}.txt`,
  };
}

async function exists(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

async function writeAtomically(path: string, bytes: Uint8Array): Promise<void> {
  const partial = `${path}.partial`;
  await Deno.writeFile(partial, bytes);
  await Deno.rename(partial, path);
}

/** The metadata table as parquet bytes. */
export function metadataParquet(metadata: PartMetadata): Uint8Array {
  const buffer = parquetWriteBuffer({
    columnData: [
      { name: "key", data: metadata.key, type: "STRING" },
      { name: "caption", data: metadata.caption, type: "STRING" },
      { name: "source", data: metadata.source, type: "STRING" },
    ],
  });
  return new Uint8Array(buffer);
}

/** Tab-separated: source, key, reason (tabs and newlines in them replaced by spaces). */
function skippedText(skipped: readonly SkippedInput[]): string {
  const clean = (s: string) => s.replace(/[\t\r\n]+/g, " ");
  return skipped.map((s) => `${clean(s.source)}\t${clean(s.key)}\t${clean(s.reason)}\n`).join("");
}

export class EmbeddingsWriter {
  /**
   * @param kinds which embeddings every part has (image, text or both)
   * @param dtype float32, or float16 to halve the size (rounded to nearest even)
   */
  constructor(
    readonly dir: string,
    readonly kinds: readonly EmbeddingKind[],
    readonly dtype: Extract<NpyDType, "f32" | "f16"> = "f32",
  ) {
    if (kinds.length === 0) throw new RangeError("an embeddings writer needs at least one kind of embedding");
  }

  /** Creates the folders (idempotent; several processes may call it at once). */
  async prepare(): Promise<void> {
    for (const sub of [...this.kinds.map((k) => FOLDER[k]), "metadata", "skipped"]) {
      await Deno.mkdir(`${this.dir}/${sub}`, { recursive: true });
    }
  }

  /** Whether a previous run finished this part. */
  async isDone(part: string): Promise<boolean> {
    const paths = partPaths(this.dir, part);
    for (const path of [paths.metadata, ...this.kinds.map(paths.npy)]) if (!(await exists(path))) return false;
    return true;
  }

  async writePart(part: string, data: PartData): Promise<void> {
    const rows = data.metadata.key.length;
    if (data.metadata.caption.length !== rows || data.metadata.source.length !== rows) {
      throw new RangeError(`part ${part}: metadata columns have different lengths`);
    }
    for (const kind of this.kinds) {
      const values = data.embeddings[kind];
      if (!values || values.length !== rows * data.dim) {
        throw new RangeError(
          `part ${part}: ${kind} embeddings hold ${values?.length ?? 0} values, expected ${rows} x ${data.dim}`,
        );
      }
    }
    const paths = partPaths(this.dir, part);
    await writeAtomically(paths.metadata, metadataParquet(data.metadata));
    if (data.skipped.length > 0) {
      await writeAtomically(paths.skipped, new TextEncoder().encode(skippedText(data.skipped)));
    } else {
      await Deno.remove(paths.skipped).catch(() => {}); // from an earlier, interrupted attempt
    }
    for (const kind of this.kinds) {
      const values = data.embeddings[kind]!;
      const shape = [rows, data.dim];
      const bytes = this.dtype === "f16"
        ? encodeNpy({ dtype: "f16", shape, data: toFloat16(values) })
        : encodeNpy({ dtype: "f32", shape, data: values });
      await writeAtomically(paths.npy(kind), bytes);
    }
  }
}
