/**
 * What `clip pack --from` reads: a folder of images with same-named `.txt` captions, or a CSV/TSV/JSONL table with an
 * image column (a path relative to the table, an absolute path or an http(s) URL) and a caption column. Listing
 * reads every caption up front, so problems with the source itself (missing, empty, no caption column) are reported
 * before any shard is written; images are fetched later, one by one, by `loadImage`.
 */

import { dirname, extname, isAbsolute, join, resolve } from "node:path";
import { ClipError } from "../errors.ts";

export type SourceKind = "folder" | "csv" | "tsv" | "jsonl";

export type ImageRef = { kind: "file"; path: string } | { kind: "url"; url: string };

/** One image-caption pair to pack. `index` numbers the source's entries (skipped ones included), so keys are stable. */
export interface PackItem {
  index: number;
  /** The image as the source names it: a file name, a path as written in the table, or a URL. */
  source: string;
  image: ImageRef;
  caption: string;
}

/** An entry left out, with a short reason that is counted (`missing file`) and an optional detail. */
export interface SkippedItem {
  source: string;
  /** 1-based data row of a table (the header is not counted). */
  row?: number;
  reason: string;
  detail?: string;
}

export interface SourceListing {
  kind: SourceKind;
  items: PackItem[];
  skipped: SkippedItem[];
  /** Number of entries in the source (folder images, table rows): one more than the largest index. */
  entries: number;
  imageColumn?: string;
  captionColumn?: string;
}

export interface ListSourceOptions {
  imageColumn?: string;
  captionColumn?: string;
}

/** Column names tried, in order, when no column is given; open_clip's CSV loader uses `filepath` and `title`. */
const IMAGE_COLUMNS = ["image", "url", "filepath", "image_path", "path"];
const CAPTION_COLUMNS = ["caption", "text", "title"];

/** Extensions (lower-case) of the images a WebDataset loader decodes, and the one each is stored under. */
const IMAGE_EXTENSIONS: Record<string, string> = { jpg: "jpg", jpeg: "jpg", png: "png", webp: "webp" };

const utf8 = new TextDecoder();

function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

/** The stored extension for a file or URL name (`photo.JPEG` -> `jpg`), or undefined when it is not one we know. */
export function imageExtension(name: string): string | undefined {
  let path = name;
  if (isUrl(name)) {
    try {
      path = decodeURIComponent(new URL(name).pathname);
    } catch {
      return undefined;
    }
  }
  return IMAGE_EXTENSIONS[extname(path).slice(1).toLowerCase()];
}

/** The format the bytes announce (magic numbers), so an HTML error page or a GIF is not packed as an image. */
export function sniffImageExtension(bytes: Uint8Array): string | undefined {
  if (bytes.length >= 3 && bytes[0] === 0xff && bytes[1] === 0xd8 && bytes[2] === 0xff) return "jpg";
  const png = [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a];
  if (bytes.length >= 8 && png.every((b, i) => bytes[i] === b)) return "png";
  const ascii = (from: number, to: number) => String.fromCharCode(...bytes.subarray(from, to));
  if (bytes.length >= 12 && ascii(0, 4) === "RIFF" && ascii(8, 12) === "WEBP") return "webp";
  return undefined;
}

async function statOrUndefined(path: string): Promise<Deno.FileInfo | undefined> {
  try {
    return await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new ClipError(`cannot read ${path}: ${(e as Error).message}`);
  }
}

/** Lists `src` (a folder or a .csv/.tsv/.jsonl file). Throws ClipError when it is missing, of unknown type or empty. */
export async function listSource(src: string, opts: ListSourceOptions = {}): Promise<SourceListing> {
  const info = await statOrUndefined(src);
  if (!info) {
    throw new ClipError(`${src} does not exist: give a folder of images with .txt captions or a CSV/TSV/JSONL file`);
  }
  let listing: SourceListing;
  if (info.isDirectory) listing = await listFolder(src);
  else {
    const ext = extname(src).toLowerCase();
    const kind: SourceKind | undefined = ext === ".csv"
      ? "csv"
      : ext === ".tsv"
      ? "tsv"
      : ext === ".jsonl" || ext === ".ndjson"
      ? "jsonl"
      : undefined;
    if (!kind) {
      throw new ClipError(
        `${src}: unknown source type '${ext || "(no extension)"}'; use a folder, or a .csv, .tsv or .jsonl file`,
      );
    }
    listing = await listTable(src, kind, opts);
  }
  if (listing.items.length === 0) {
    const why = listing.kind === "folder"
      ? "no image (.jpg, .jpeg, .png, .webp) with a same-named .txt caption"
      : listing.entries === 0
      ? "no data rows"
      : "no row with both an image and a caption";
    throw new ClipError(`${src} is empty: it has ${why}; nothing to pack`);
  }
  return listing;
}

function stem(name: string): string {
  const dot = name.lastIndexOf(".");
  return dot > 0 ? name.slice(0, dot) : name;
}

/** Sorting by UTF-16 code units is the same on every machine and locale, unlike localeCompare. */
function byName(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

async function listFolder(dir: string): Promise<SourceListing> {
  const images: string[] = [];
  const captions = new Set<string>();
  for await (const entry of Deno.readDir(dir)) {
    if (!entry.isFile && !entry.isSymlink) continue;
    const ext = extname(entry.name).slice(1).toLowerCase();
    if (IMAGE_EXTENSIONS[ext]) images.push(entry.name);
    else if (ext === "txt") captions.add(entry.name);
  }
  images.sort(byName);
  const items: PackItem[] = [];
  const skipped: SkippedItem[] = [];
  const used = new Set<string>();
  for (const [index, name] of images.entries()) {
    const captionName = `${stem(name)}.txt`;
    if (!captions.has(captionName)) {
      skipped.push({ source: name, reason: "no caption file", detail: `${captionName} not found` });
      continue;
    }
    used.add(captionName);
    let caption: string;
    try {
      caption = utf8.decode(await Deno.readFile(join(dir, captionName))).trim();
    } catch (e) {
      skipped.push({ source: name, reason: "unreadable caption file", detail: (e as Error).message });
      continue;
    }
    if (caption === "") {
      skipped.push({ source: name, reason: "empty caption", detail: `${captionName} is empty` });
      continue;
    }
    items.push({ index, source: name, image: { kind: "file", path: join(dir, name) }, caption });
  }
  // A caption whose image was skipped above is already reported; the rest have no image at all.
  const imageStems = new Set(images.map(stem));
  for (const name of [...captions].filter((c) => !used.has(c) && !imageStems.has(stem(c))).sort(byName)) {
    skipped.push({
      source: name,
      reason: "no image file",
      detail: `no .jpg, .jpeg, .png or .webp named ${stem(name)}`,
    });
  }
  return { kind: "folder", items, skipped, entries: images.length };
}

/** A row of a table, by column name. */
type Row = Map<string, unknown>;

async function listTable(file: string, kind: Exclude<SourceKind, "folder">, opts: ListSourceOptions) {
  let text: string;
  try {
    text = utf8.decode(await Deno.readFile(file));
  } catch (e) {
    throw new ClipError(`cannot read ${file}: ${(e as Error).message}`);
  }
  if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // spreadsheet programs write a byte-order mark
  const { columns, rows } = kind === "jsonl"
    ? parseJsonl(text, file)
    : parseDelimited(text, kind === "csv" ? "," : "\t");
  if (columns.length === 0) throw new ClipError(`${file} is empty: it has no header and no rows; nothing to pack`);
  const imageColumn = chooseColumn(columns, opts.imageColumn, IMAGE_COLUMNS, "image", file);
  const captionColumn = chooseColumn(columns, opts.captionColumn, CAPTION_COLUMNS, "caption", file);
  const base = dirname(resolve(file));
  const items: PackItem[] = [];
  const skipped: SkippedItem[] = [];
  for (const [index, row] of rows.entries()) {
    const rowNumber = index + 1;
    const image = cellText(row.get(imageColumn));
    const caption = cellText(row.get(captionColumn));
    if (image === "") {
      skipped.push({ source: file, row: rowNumber, reason: "no image", detail: `empty '${imageColumn}'` });
      continue;
    }
    if (caption === "") {
      skipped.push({ source: image, row: rowNumber, reason: "empty caption", detail: `empty '${captionColumn}'` });
      continue;
    }
    const ref: ImageRef = isUrl(image)
      ? { kind: "url", url: image }
      : { kind: "file", path: isAbsolute(image) ? image : join(base, image) };
    items.push({ index, source: image, image: ref, caption });
  }
  return { kind, items, skipped, entries: rows.length, imageColumn, captionColumn };
}

function cellText(value: unknown): string {
  if (value === undefined || value === null) return "";
  return (typeof value === "string" ? value : typeof value === "object" ? "" : String(value)).trim();
}

function chooseColumn(columns: string[], given: string | undefined, candidates: string[], what: string, file: string) {
  const list = columns.map((c) => `'${c}'`).join(", ");
  if (given !== undefined) {
    if (columns.includes(given)) return given;
    throw new ClipError(`${file} has no ${what} column '${given}'; its columns are ${list}`);
  }
  for (const candidate of candidates) {
    const found = columns.find((c) => c.trim().toLowerCase() === candidate);
    if (found !== undefined) return found;
  }
  const flag = what === "image" ? "--image-col" : "--caption-col";
  throw new ClipError(
    `${file} has no ${what} column (looked for ${candidates.map((c) => `'${c}'`).join(", ")}); ` +
      `its columns are ${list}: name the right one with ${flag}`,
  );
}

/** JSON Lines: one object per line; blank lines are allowed. Columns are every key seen, in first-seen order. */
function parseJsonl(text: string, file: string): { columns: string[]; rows: Row[] } {
  const columns = new Set<string>();
  const rows: Row[] = [];
  const lines = text.split("\n");
  for (const [i, line] of lines.entries()) {
    if (line.trim() === "") continue;
    let value: unknown;
    try {
      value = JSON.parse(line);
    } catch (e) {
      throw new ClipError(`${file} line ${i + 1} is not valid JSON (${(e as Error).message}); fix or remove it`);
    }
    if (typeof value !== "object" || value === null || Array.isArray(value)) {
      throw new ClipError(
        `${file} line ${i + 1} is not a JSON object; each line must be {"image": ..., "caption": ...}`,
      );
    }
    const row: Row = new Map(Object.entries(value));
    for (const key of row.keys()) columns.add(key);
    rows.push(row);
  }
  return { columns: [...columns], rows };
}

/**
 * RFC 4180 CSV (or the same with tabs): quoted fields may hold the delimiter, doubled quotes and newlines; CRLF and
 * LF both end a record. The first record is the header. A quote inside an unquoted field is kept as text, which
 * is how tab-separated files without quoting (most caption dumps) read correctly.
 */
export function parseDelimited(text: string, delimiter: string): { columns: string[]; rows: Row[] } {
  const records: string[][] = [];
  let record: string[] = [];
  let field = "";
  let i = 0;
  let fieldStart = true;
  const endField = () => {
    record.push(field);
    field = "";
    fieldStart = true;
  };
  const endRecord = () => {
    endField();
    if (!(record.length === 1 && record[0] === "")) records.push(record); // blank line
    record = [];
  };
  while (i < text.length) {
    const c = text[i];
    if (fieldStart && c === '"') {
      // Quoted field: read to the closing quote, turning "" into ".
      i++;
      for (;;) {
        const close = text.indexOf('"', i);
        if (close < 0) {
          field += text.slice(i);
          i = text.length;
          break;
        }
        field += text.slice(i, close);
        if (text[close + 1] === '"') {
          field += '"';
          i = close + 2;
        } else {
          i = close + 1;
          break;
        }
      }
      fieldStart = false;
      continue;
    }
    fieldStart = false;
    if (c === delimiter) endField();
    else if (c === "\n") endRecord();
    else if (c === "\r" && text[i + 1] === "\n") {
      endRecord();
      i++;
    } else field += c;
    i++;
  }
  if (field !== "" || record.length > 0) endRecord();
  const [header = [], ...data] = records;
  const columns = header.map((h) => h.trim());
  const rows = data.map((fields) => new Map<string, unknown>(columns.map((c, j) => [c, fields[j] ?? ""])));
  return { columns, rows };
}

/** An image's bytes and the extension it is stored under. */
export interface LoadedImage {
  bytes: Uint8Array;
  ext: string;
}

/** The image could not be used; `reason` is short and counted, `detail` says more. */
export class ImageSkip extends Error {
  override name = "ImageSkip";
  constructor(readonly reason: string, readonly detail: string) {
    super(`${reason}: ${detail}`);
  }
}

export interface LoadImageOptions {
  /** Per-download time limit in milliseconds. Default 60 s. */
  timeoutMs?: number;
  fetch?: typeof fetch;
}

/**
 * Reads or downloads an image as it is (no re-encoding). Throws ImageSkip when it is missing, unreadable, empty, not
 * a JPEG/PNG/WebP, or its download failed. The extension comes from the name when it is one we know, else from the
 * bytes (URLs often have none).
 */
export async function loadImage(ref: ImageRef, opts: LoadImageOptions = {}): Promise<LoadedImage> {
  const name = ref.kind === "file" ? ref.path : ref.url;
  const bytes = ref.kind === "file" ? await readLocal(ref.path) : await download(ref.url, opts);
  if (bytes.length === 0) throw new ImageSkip("empty file", `${name} has no bytes`);
  const sniffed = sniffImageExtension(bytes);
  if (!sniffed) throw new ImageSkip("not a JPEG, PNG or WebP image", `${name} does not start like one`);
  return { bytes, ext: imageExtension(name) ?? sniffed };
}

async function readLocal(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new ImageSkip("missing file", `${path} does not exist`);
    throw new ImageSkip("unreadable file", `${path}: ${(e as Error).message}`);
  }
}

async function download(url: string, opts: LoadImageOptions): Promise<Uint8Array> {
  const fetchImpl = opts.fetch ?? fetch;
  try {
    const response = await fetchImpl(url, { signal: AbortSignal.timeout(opts.timeoutMs ?? 60_000) });
    if (!response.ok) {
      await response.body?.cancel();
      throw new ImageSkip(`HTTP ${response.status}`, `${url} answered ${response.status} ${response.statusText}`);
    }
    return new Uint8Array(await response.arrayBuffer());
  } catch (e) {
    if (e instanceof ImageSkip) throw e;
    throw new ImageSkip("download failed", `${url}: ${(e as Error).message}`);
  }
}
