/**
 * What `clip embed` reads, and how the work is cut into parts.
 *
 * Image sources: a shard spec (tar files, `{000..099}` ranges, `::` lists, URLs, or a folder holding .tar files), or
 * image files: a folder (searched recursively, files in name order), a list file (one path per line, relative paths
 * taken from the list's folder), or the image files themselves. Text sources: a text file (one text per line) or a
 * shard spec (the samples' captions).
 *
 * Parts are numbered over the whole input, so every process computes the same parts: one part per shard, or one per
 * `partSize` consecutive files or lines. Part i belongs to partition i % count, the rule partitionShards uses.
 */
import { ClipError, UsageError } from "../errors.ts";
import { expandShards } from "../data/shards.ts";

/** Image file extensions a folder scan picks up (the formats sharp decodes). */
export const IMAGE_FILE_EXTENSIONS: readonly string[] = ["jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "avif"];

export interface ImageFile {
  path: string;
  /** The path without its extension: relative to the folder, or as written in the list or on the command line. */
  key: string;
}

export type ImageSource = { kind: "shards"; shards: string[] } | { kind: "files"; files: ImageFile[] };
export type TextSource = { kind: "shards"; shards: string[] } | { kind: "lines"; file: string; lines: string[] };

function extensionOf(path: string): string {
  const base = path.slice(path.lastIndexOf("/") + 1);
  const dot = base.lastIndexOf(".");
  return dot <= 0 ? "" : base.slice(dot + 1).toLowerCase();
}

function withoutExtension(path: string): string {
  const slash = path.lastIndexOf("/");
  const dot = path.lastIndexOf(".");
  return dot > slash + 1 ? path.slice(0, dot) : path;
}

function isImageFile(path: string): boolean {
  return IMAGE_FILE_EXTENSIONS.includes(extensionOf(path));
}

function statOrNull(path: string): Deno.FileInfo | null {
  try {
    return Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return null;
    throw new ClipError(`cannot read "${path}": ${(e as Error).message}`);
  }
}

function folderHasTars(path: string): boolean {
  for (const entry of Deno.readDirSync(path)) {
    if (entry.isFile && entry.name.toLowerCase().endsWith(".tar")) return true;
  }
  return false;
}

/** A spec read as WebDataset shards rather than as image or text files. */
export function isShardSpec(spec: string): boolean {
  if (/^https?:\/\//i.test(spec) || spec.includes("::") || /\{[^}]*\.\.[^}]*\}/.test(spec)) return true;
  if (spec.toLowerCase().endsWith(".tar")) return true;
  const info = statOrNull(spec);
  return info !== null && info.isDirectory && folderHasTars(spec);
}

/** Image files under a folder, recursively, in name order of their relative paths. */
function scanFolder(root: string): ImageFile[] {
  const found: string[] = [];
  const walk = (relative: string) => {
    const dir = relative ? `${root}/${relative}` : root;
    for (const entry of Deno.readDirSync(dir)) {
      const rel = relative ? `${relative}/${entry.name}` : entry.name;
      if (entry.isDirectory) walk(rel);
      else if (entry.isFile && isImageFile(entry.name)) found.push(rel);
    }
  };
  walk("");
  found.sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
  const base = root.replace(/\/+$/, "");
  return found.map((rel) => ({ path: `${base}/${rel}`, key: withoutExtension(rel) }));
}

function readListFile(path: string): ImageFile[] {
  const text = Deno.readTextFileSync(path);
  const dir = path.includes("/") ? path.slice(0, path.lastIndexOf("/")) : ".";
  return text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#")).map((line) => ({
    path: line.startsWith("/") ? line : `${dir}/${line}`,
    key: withoutExtension(line),
  }));
}

/** Resolves `--images` (and any extra image paths) into shards or an ordered list of image files. */
export function resolveImageSource(sources: readonly string[]): ImageSource {
  if (sources.length === 0) throw new UsageError("embed: no images given");
  const shardSpecs = sources.filter(isShardSpec);
  if (shardSpecs.length > 0) {
    if (sources.length > 1) {
      throw new UsageError(
        "embed: give shards as one spec (join several with '::'), not together with other image sources",
      );
    }
    return { kind: "shards", shards: expandShards(sources[0]) };
  }
  const files: ImageFile[] = [];
  for (const source of sources) {
    const info = statOrNull(source);
    if (!info) throw new ClipError(`image source "${source}" does not exist; pass shards, a folder, a list or images`);
    if (info.isDirectory) {
      const found = scanFolder(source);
      if (found.length === 0) {
        throw new ClipError(`folder "${source}" holds no image files (${IMAGE_FILE_EXTENSIONS.join(", ")})`);
      }
      files.push(...found);
    } else if (isImageFile(source)) {
      files.push({ path: source, key: withoutExtension(source) });
    } else {
      const listed = readListFile(source);
      if (listed.length === 0) throw new ClipError(`list file "${source}" names no images (one path per line)`);
      files.push(...listed);
    }
  }
  return { kind: "files", files };
}

/** Resolves `--texts`: a file of lines, or shards whose captions are embedded. */
export function resolveTextSource(source: string): TextSource {
  if (isShardSpec(source)) return { kind: "shards", shards: expandShards(source) };
  const info = statOrNull(source);
  if (!info || !info.isFile) {
    throw new ClipError(`text source "${source}" is not a file; pass a text file (one text per line) or shards`);
  }
  const lines = Deno.readTextFileSync(source).split(/\r?\n/);
  if (lines.length > 0 && lines[lines.length - 1] === "") lines.pop(); // the final newline ends a line, not one more
  if (lines.length === 0) throw new ClipError(`text file "${source}" is empty`);
  return { kind: "lines", file: source, lines };
}

/** Part names: the index zero-padded to the width of the largest index, so names sort in part order. */
export function partName(index: number, partCount: number): string {
  const width = String(Math.max(0, partCount - 1)).length;
  return String(index).padStart(width, "0");
}

/** The parts (indices) of one partition. */
export function partsOfPartition(partCount: number, index: number, count: number): number[] {
  if (!Number.isInteger(count) || count < 1) throw new UsageError(`partition count must be >= 1, got ${count}`);
  if (!Number.isInteger(index) || index < 0 || index >= count) {
    throw new UsageError(`partition index must be in 0..${count - 1}, got ${index}`);
  }
  const parts: number[] = [];
  for (let p = index; p < partCount; p += count) parts.push(p);
  return parts;
}

/** The [start, end) input range of part `index` when parts are runs of `partSize` inputs. */
export function partRange(index: number, partSize: number, total: number): [number, number] {
  return [index * partSize, Math.min(total, (index + 1) * partSize)];
}
