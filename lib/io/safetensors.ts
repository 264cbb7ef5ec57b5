/**
 * The safetensors format: 8-byte little-endian header length N, N bytes of JSON header
 * (`{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`), then the tensor bytes,
 * little-endian, C order, offsets relative to the end of the header.
 *
 * Files are read tensor by tensor with seek + read so a multi-gigabyte checkpoint is never held twice in memory.
 * Headers are treated as hostile: every way an offset, shape or length can disagree is a SafetensorsError naming it.
 */
import { ClipError } from "../errors.ts";

export type SafetensorsDtype =
  | "F64"
  | "F32"
  | "F16"
  | "BF16"
  | "F8_E4M3"
  | "F8_E5M2"
  | "I64"
  | "I32"
  | "I16"
  | "I8"
  | "U64"
  | "U32"
  | "U16"
  | "U8"
  | "BOOL";

const DTYPE_BYTES: Record<SafetensorsDtype, number> = {
  F64: 8,
  F32: 4,
  F16: 2,
  BF16: 2,
  F8_E4M3: 1,
  F8_E5M2: 1,
  I64: 8,
  I32: 4,
  I16: 2,
  I8: 1,
  U64: 8,
  U32: 4,
  U16: 2,
  U8: 1,
  BOOL: 1,
};

export interface TensorInfo {
  dtype: SafetensorsDtype;
  shape: number[];
  byteLength: number;
  /** Offset of the first byte from the start of the data section (just after the header). */
  byteOffset: number;
}

export type SafetensorsErrorKind =
  | "truncated" // file shorter than its 8-byte length prefix
  | "header-length" // header length runs past the end of the file, or is absurdly large
  | "header-json" // header is not UTF-8 JSON, or not a JSON object
  | "duplicate-key" // the same tensor name appears twice in the header
  | "bad-entry" // a tensor entry is not {dtype, shape, data_offsets}
  | "unknown-dtype"
  | "bad-shape" // dimensions not non-negative integers, or too many elements
  | "bad-offsets" // offsets not integers, out of the data section, or leaving gaps
  | "overlap" // two tensors share bytes
  | "byte-length" // end - begin differs from dtype size x number of elements
  | "bad-metadata" // __metadata__ not a map of strings
  | "missing-key"
  | "unsupported-dtype"; // readF32 on an integer tensor

export class SafetensorsError extends ClipError {
  override name = "SafetensorsError";
  constructor(readonly kind: SafetensorsErrorKind, message: string) {
    super(message);
  }
}

/** The reference implementation refuses headers over 100 MB; no real checkpoint comes close. */
const MAX_HEADER_BYTES = 100_000_000;

/** True for the floating-point dtypes readF32 converts; integer tensors such as `num_batches_tracked` (I64) are not. */
export function isFloatTensor(infoOrDtype: TensorInfo | string): boolean {
  const dtype = typeof infoOrDtype === "string" ? infoOrDtype : infoOrDtype.dtype;
  return dtype === "F32" || dtype === "F16" || dtype === "BF16" || dtype === "F64";
}

// ---------------------------------------------------------------------------------------------------------------
// Float conversions (IEEE 754 binary16 and bfloat16, round to nearest even)

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** Rounds a number to float32 and returns its bits as binary16, round-to-nearest-even, with subnormals, inf and NaN. */
export function f32ToF16Bits(value: number): number {
  scratchF32[0] = value;
  const bits = scratchU32[0];
  const sign = (bits >>> 16) & 0x8000;
  const exp = (bits >>> 23) & 0xff;
  const mant = bits & 0x7fffff;
  if (exp === 0xff) return mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
  const halfExp = exp - 127 + 15;
  if (halfExp >= 0x1f) return sign | 0x7c00;
  if (halfExp <= 0) {
    // Result is subnormal in binary16 (or zero): shift the full significand down to units of 2^-24.
    if (halfExp < -10) return sign;
    const significand = mant | 0x800000;
    const shift = 14 - halfExp;
    let half = significand >>> shift;
    const rest = significand & ((1 << shift) - 1);
    const halfway = 1 << (shift - 1);
    if (rest > halfway || (rest === halfway && (half & 1) === 1)) half++;
    return sign | half;
  }
  let half = sign | (halfExp << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  // A carry out of the mantissa correctly bumps the exponent (and 65520 and up to infinity).
  if (rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1)) half++;
  return half;
}

let f16Table: Float32Array | null = null;

/** All 65,536 binary16 values as float32, built once: decoding is then one lookup per element. */
function f16ToF32Table(): Float32Array {
  if (f16Table) return f16Table;
  const bits = new Uint32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const sign = (h & 0x8000) << 16;
    const exp = (h >>> 10) & 0x1f;
    let mant = h & 0x3ff;
    if (exp === 0x1f) {
      bits[h] = sign | 0x7f800000 | (mant << 13);
    } else if (exp !== 0) {
      bits[h] = sign | ((exp - 15 + 127) << 23) | (mant << 13);
    } else if (mant === 0) {
      bits[h] = sign;
    } else {
      // Subnormal binary16 is a normal float32: normalise the mantissa.
      let e = -14;
      while ((mant & 0x400) === 0) {
        mant <<= 1;
        e--;
      }
      bits[h] = sign | ((e + 127) << 23) | ((mant & 0x3ff) << 13);
    }
  }
  f16Table = new Float32Array(bits.buffer);
  return f16Table;
}

export function f16BitsToF32(half: number): number {
  return f16ToF32Table()[half & 0xffff];
}

/** Rounds a number to float32 and returns its top 16 bits as bfloat16, round-to-nearest-even; NaN stays NaN. */
export function f32ToBf16Bits(value: number): number {
  scratchF32[0] = value;
  const bits = scratchU32[0];
  if ((bits & 0x7f800000) === 0x7f800000 && (bits & 0x7fffff) !== 0) return (bits >>> 16) | 0x0040;
  const lsb = (bits >>> 16) & 1;
  return ((bits + 0x7fff + lsb) >>> 16) & 0xffff;
}

export function bf16BitsToF32(bf: number): number {
  scratchU32[0] = (bf & 0xffff) << 16;
  return scratchF32[0];
}

const LITTLE_ENDIAN_HOST = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;

/** Converts the raw little-endian bytes of one tensor to float32. */
export function bytesToF32(dtype: SafetensorsDtype, bytes: Uint8Array, key = "tensor"): Float32Array {
  if (!isFloatTensor(dtype)) {
    throw new SafetensorsError(
      "unsupported-dtype",
      `tensor '${key}' has dtype ${dtype}, which is not a float type that can be read as f32.`,
    );
  }
  if (!LITTLE_ENDIAN_HOST) throw new ClipError("safetensors reading needs a little-endian host.");
  // Typed array views need element alignment; a copy realigns bytes that start at an odd offset.
  const size = DTYPE_BYTES[dtype];
  const aligned = bytes.byteOffset % size === 0 ? bytes : bytes.slice();
  const count = aligned.byteLength / size;
  if (dtype === "F32") return new Float32Array(aligned.buffer, aligned.byteOffset, count).slice();
  if (dtype === "F64") return Float32Array.from(new Float64Array(aligned.buffer, aligned.byteOffset, count));
  const halves = new Uint16Array(aligned.buffer, aligned.byteOffset, count);
  const out = new Float32Array(count);
  if (dtype === "F16") {
    const table = f16ToF32Table();
    for (let i = 0; i < count; i++) out[i] = table[halves[i]];
  } else {
    const outBits = new Uint32Array(out.buffer);
    for (let i = 0; i < count; i++) outBits[i] = halves[i] << 16;
  }
  return out;
}

/** Encodes float32 values as the little-endian bytes of one tensor of the given dtype. */
export function f32ToBytes(dtype: WritableDtype, data: Float32Array): Uint8Array {
  if (!LITTLE_ENDIAN_HOST) throw new ClipError("safetensors writing needs a little-endian host.");
  if (dtype === "F32") return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  const halves = new Uint16Array(data.length);
  if (dtype === "F16") {
    for (let i = 0; i < data.length; i++) halves[i] = f32ToF16Bits(data[i]);
  } else {
    for (let i = 0; i < data.length; i++) halves[i] = f32ToBf16Bits(data[i]);
  }
  return new Uint8Array(halves.buffer);
}

// ---------------------------------------------------------------------------------------------------------------
// Header parsing and validation

export interface SafetensorsHeader {
  tensors: Map<string, TensorInfo>;
  metadata: Record<string, string>;
}

/**
 * The keys of the top-level JSON object in document order. JSON.parse keeps the last of two equal keys without a
 * word, which would let a header point one name at two places; this scan, run on text JSON.parse has accepted,
 * sees every key.
 */
function topLevelKeys(text: string): string[] {
  const keys: string[] = [];
  let depth = 0;
  let i = 0;
  while (i < text.length) {
    const c = text.charCodeAt(i);
    if (c === 0x22 /* " */) {
      const start = i++;
      while (i < text.length && text.charCodeAt(i) !== 0x22) i += text.charCodeAt(i) === 0x5c /* \ */ ? 2 : 1;
      i++;
      if (depth === 1) {
        let j = i;
        while (j < text.length && " \t\r\n".includes(text[j])) j++;
        if (text[j] === ":") keys.push(JSON.parse(text.slice(start, i)));
      }
      continue;
    }
    if (c === 0x7b || c === 0x5b) depth++;
    else if (c === 0x7d || c === 0x5d) depth--;
    i++;
  }
  return keys;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Parses and validates a header against the size of the data section that follows it. */
export function parseHeader(headerBytes: Uint8Array, dataLength: number, source: string): SafetensorsHeader {
  let text: string;
  let json: unknown;
  try {
    text = new TextDecoder("utf-8", { fatal: true }).decode(headerBytes);
    json = JSON.parse(text);
  } catch (e) {
    throw new SafetensorsError(
      "header-json",
      `${source}: the safetensors header is not valid UTF-8 JSON (${(e as Error).message}).`,
    );
  }
  if (!isRecord(json)) {
    throw new SafetensorsError("header-json", `${source}: the safetensors header is not a JSON object.`);
  }
  const seen = new Set<string>();
  for (const key of topLevelKeys(text)) {
    if (seen.has(key)) {
      throw new SafetensorsError(
        "duplicate-key",
        `${source}: tensor '${key}' appears twice in the safetensors header.`,
      );
    }
    seen.add(key);
  }

  const metadata: Record<string, string> = {};
  const tensors = new Map<string, TensorInfo>();
  for (const [key, entry] of Object.entries(json)) {
    if (key === "__metadata__") {
      if (!isRecord(entry) || !Object.values(entry).every((v) => typeof v === "string")) {
        throw new SafetensorsError("bad-metadata", `${source}: __metadata__ must map strings to strings.`);
      }
      Object.assign(metadata, entry);
      continue;
    }
    tensors.set(key, parseEntry(key, entry, dataLength, source));
  }

  // Sorted by position, each tensor must start exactly where the previous one ended and the last must end at the
  // end of the file: what the reference implementation demands, so no byte belongs to two tensors or to none.
  const ordered = [...tensors.entries()].sort((a, b) =>
    a[1].byteOffset - b[1].byteOffset || a[1].byteLength - b[1].byteLength
  );
  let end = 0;
  let previous = "";
  for (const [key, info] of ordered) {
    if (info.byteOffset < end) {
      throw new SafetensorsError(
        "overlap",
        `${source}: tensors '${previous}' and '${key}' overlap (bytes from ${info.byteOffset} to ${end}).`,
      );
    }
    if (info.byteOffset > end) {
      throw new SafetensorsError(
        "bad-offsets",
        `${source}: bytes ${end} to ${info.byteOffset} before tensor '${key}' belong to no tensor.`,
      );
    }
    end = info.byteOffset + info.byteLength;
    previous = key;
  }
  if (end !== dataLength) {
    throw new SafetensorsError(
      "bad-offsets",
      `${source}: the tensors cover ${end} bytes but the data section has ${dataLength}.`,
    );
  }
  return { tensors, metadata };
}

function parseEntry(key: string, entry: unknown, dataLength: number, source: string): TensorInfo {
  const where = `${source}: tensor '${key}'`;
  if (!isRecord(entry)) {
    throw new SafetensorsError("bad-entry", `${where} is not an object with dtype, shape and data_offsets.`);
  }
  const { dtype, shape, data_offsets: offsets } = entry;
  if (typeof dtype !== "string" || !Object.hasOwn(DTYPE_BYTES, dtype)) {
    throw new SafetensorsError("unknown-dtype", `${where} has unknown dtype ${JSON.stringify(dtype)}.`);
  }
  if (!Array.isArray(shape)) throw new SafetensorsError("bad-shape", `${where}: shape must be an array of integers.`);
  let count = 1;
  for (const d of shape) {
    if (typeof d !== "number" || !Number.isSafeInteger(d) || d < 0) {
      throw new SafetensorsError(
        "bad-shape",
        `${where}: shape ${JSON.stringify(shape)} has a dimension that is not a non-negative integer.`,
      );
    }
    count *= d;
    // Past the data section's size it cannot be valid, and checking here keeps the product exact.
    if (count * DTYPE_BYTES[dtype as SafetensorsDtype] > dataLength) {
      throw new SafetensorsError(
        "bad-shape",
        `${where}: shape ${JSON.stringify(shape)} needs more bytes than the file holds.`,
      );
    }
  }
  if (
    !Array.isArray(offsets) || offsets.length !== 2 ||
    !offsets.every((o) => typeof o === "number" && Number.isSafeInteger(o) && o >= 0)
  ) {
    throw new SafetensorsError("bad-offsets", `${where}: data_offsets must be two non-negative integers [begin, end].`);
  }
  const [begin, end] = offsets as [number, number];
  if (begin > end || end > dataLength) {
    throw new SafetensorsError(
      "bad-offsets",
      `${where}: data_offsets [${begin}, ${end}] fall outside the ${dataLength}-byte data section.`,
    );
  }
  const expected = count * DTYPE_BYTES[dtype as SafetensorsDtype];
  if (end - begin !== expected) {
    throw new SafetensorsError(
      "byte-length",
      `${where}: ${end - begin} bytes stored but ${dtype} x ${JSON.stringify(shape)} needs ${expected}.`,
    );
  }
  return { dtype: dtype as SafetensorsDtype, shape: shape as number[], byteLength: expected, byteOffset: begin };
}

function headerLength(prefix: Uint8Array, fileLength: number, source: string): number {
  if (fileLength < 8) {
    throw new SafetensorsError("truncated", `${source}: ${fileLength} bytes is too short for a safetensors file.`);
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(Math.min(fileLength - 8, MAX_HEADER_BYTES))) {
    throw new SafetensorsError(
      "header-length",
      `${source}: the header claims ${n} bytes but the file has ${
        fileLength - 8
      } after the length prefix; the file is truncated or not safetensors.`,
    );
  }
  return Number(n);
}

// ---------------------------------------------------------------------------------------------------------------
// Readers

abstract class TensorIndex {
  constructor(readonly source: string, protected readonly header: SafetensorsHeader) {}

  get metadata(): Record<string, string> {
    return this.header.metadata;
  }

  keys(): string[] {
    return [...this.header.tensors.keys()];
  }

  has(key: string): boolean {
    return this.header.tensors.has(key);
  }

  info(key: string): TensorInfo {
    const info = this.header.tensors.get(key);
    if (!info) throw new SafetensorsError("missing-key", `${this.source} has no tensor '${key}'.`);
    return info;
  }
}

/** A safetensors file opened for reading tensors on demand. Call close() when done. */
export class SafetensorsFile extends TensorIndex {
  #file: Deno.FsFile;
  #dataStart: number;
  /** Reads seek then read on one handle, so they run one at a time. */
  #queue: Promise<unknown> = Promise.resolve();

  private constructor(source: string, file: Deno.FsFile, dataStart: number, header: SafetensorsHeader) {
    super(source, header);
    this.#file = file;
    this.#dataStart = dataStart;
  }

  static async open(path: string): Promise<SafetensorsFile> {
    let file: Deno.FsFile;
    try {
      file = await Deno.open(path, { read: true });
    } catch (e) {
      throw new ClipError(`cannot open safetensors file '${path}': ${(e as Error).message}.`);
    }
    try {
      const size = (await file.stat()).size;
      const prefix = new Uint8Array(8);
      if (size >= 8) await readExactly(file, 0, prefix);
      const n = headerLength(prefix, size, path);
      const headerBytes = new Uint8Array(n);
      await readExactly(file, 8, headerBytes);
      const header = parseHeader(headerBytes, size - 8 - n, path);
      return new SafetensorsFile(path, file, 8 + n, header);
    } catch (e) {
      file.close();
      throw e;
    }
  }

  /** The tensor's raw little-endian bytes. */
  readBytes(key: string): Promise<Uint8Array> {
    const info = this.info(key);
    const run = this.#queue.then(async () => {
      const out = new Uint8Array(info.byteLength);
      await readExactly(this.#file, this.#dataStart + info.byteOffset, out);
      return out;
    });
    this.#queue = run.catch(() => {});
    return run;
  }

  /** The tensor as float32 (F32 as stored; F16, BF16 and F64 converted). */
  async readF32(key: string): Promise<Float32Array> {
    const info = this.info(key);
    if (!isFloatTensor(info)) {
      throw new SafetensorsError(
        "unsupported-dtype",
        `tensor '${key}' has dtype ${info.dtype}, which is not a float type that can be read as f32.`,
      );
    }
    if (info.dtype === "F32") {
      // Read straight into the result's memory: no second copy of a large tensor.
      const out = new Float32Array(info.byteLength / 4);
      const run = this.#queue.then(() =>
        readExactly(this.#file, this.#dataStart + info.byteOffset, new Uint8Array(out.buffer))
      );
      this.#queue = run.catch(() => {});
      await run;
      return out;
    }
    return bytesToF32(info.dtype, await this.readBytes(key), key);
  }

  close(): void {
    this.#file.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

async function readExactly(file: Deno.FsFile, position: number, into: Uint8Array): Promise<void> {
  await file.seek(position, Deno.SeekMode.Start);
  let filled = 0;
  while (filled < into.length) {
    const n = await file.read(into.subarray(filled));
    if (n === null) {
      throw new SafetensorsError("truncated", `file ended ${into.length - filled} bytes early while reading a tensor.`);
    }
    filled += n;
  }
}

/** A safetensors file already in memory. */
export class SafetensorsBuffer extends TensorIndex {
  constructor(source: string, header: SafetensorsHeader, private readonly data: Uint8Array) {
    super(source, header);
  }

  readBytes(key: string): Uint8Array {
    const info = this.info(key);
    return this.data.subarray(info.byteOffset, info.byteOffset + info.byteLength);
  }

  readF32(key: string): Float32Array {
    const info = this.info(key);
    return bytesToF32(info.dtype, this.readBytes(key), key);
  }
}

export function parseSafetensors(bytes: Uint8Array, source = "safetensors buffer"): SafetensorsBuffer {
  const n = headerLength(bytes.subarray(0, 8), bytes.length, source);
  const header = parseHeader(bytes.subarray(8, 8 + n), bytes.length - 8 - n, source);
  return new SafetensorsBuffer(source, header, bytes.subarray(8 + n));
}

// ---------------------------------------------------------------------------------------------------------------
// Writer

export type WritableDtype = "F32" | "F16" | "BF16";

export interface TensorToWrite {
  dtype: WritableDtype;
  shape: number[];
  data: Float32Array;
}

type TensorSet = Record<string, TensorToWrite> | Map<string, TensorToWrite>;

interface Layout {
  header: Uint8Array;
  entries: [string, TensorToWrite][];
}

function layout(tensors: TensorSet, metadata?: Record<string, string>): Layout {
  const entries = (tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors)).sort((a, b) =>
    a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0
  );
  const header: Record<string, unknown> = {};
  if (metadata && Object.keys(metadata).length > 0) {
    for (const [k, v] of Object.entries(metadata)) {
      if (typeof v !== "string") throw new ClipError(`safetensors metadata '${k}' must be a string, got ${typeof v}.`);
    }
    header.__metadata__ = metadata;
  }
  let offset = 0;
  for (const [key, t] of entries) {
    if (key === "" || key === "__metadata__") {
      throw new ClipError(`'${key}' cannot be a tensor name in a safetensors file.`);
    }
    if (!["F32", "F16", "BF16"].includes(t.dtype)) {
      throw new ClipError(`tensor '${key}': dtype ${t.dtype} cannot be written; use F32, F16 or BF16.`);
    }
    if (!t.shape.every((d) => Number.isSafeInteger(d) && d >= 0)) {
      throw new ClipError(`tensor '${key}': shape ${JSON.stringify(t.shape)} must hold non-negative integers.`);
    }
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) {
      throw new ClipError(
        `tensor '${key}': shape ${JSON.stringify(t.shape)} has ${count} elements but the data has ${t.data.length}.`,
      );
    }
    const bytes = count * DTYPE_BYTES[t.dtype];
    header[key] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  const json = new TextEncoder().encode(JSON.stringify(header));
  // The format asks for the data to start 8-byte aligned; the padding is spaces, which JSON ignores.
  const padded = new Uint8Array(Math.ceil(json.length / 8) * 8).fill(0x20);
  padded.set(json);
  return { header: padded, entries };
}

function lengthPrefix(n: number): Uint8Array {
  const prefix = new Uint8Array(8);
  new DataView(prefix.buffer).setBigUint64(0, BigInt(n), true);
  return prefix;
}

/** The whole file in memory (for small tensors and tests). */
export function encodeSafetensors(tensors: TensorSet, metadata?: Record<string, string>): Uint8Array {
  const { header, entries } = layout(tensors, metadata);
  const parts = [lengthPrefix(header.length), header, ...entries.map(([, t]) => f32ToBytes(t.dtype, t.data))];
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  let written = 0;
  while (written < bytes.length) written += await file.write(bytes.subarray(written));
}

/** A sibling name for writing a file before renaming it into place. */
export function temporarySibling(path: string): string {
  return `${path}.tmp-${Deno.pid}-${crypto.randomUUID().slice(0, 8)}`;
}

/**
 * Writes tensors (converted from f32 to each one's dtype) to a temporary file beside `path`, flushes it and renames
 * it over `path`, so a crash leaves either the old file or the new one, never half of one.
 */
export async function writeSafetensors(
  path: string,
  tensors: TensorSet,
  metadata?: Record<string, string>,
): Promise<void> {
  const { header, entries } = layout(tensors, metadata);
  const temp = temporarySibling(path);
  const file = await Deno.open(temp, { write: true, createNew: true });
  try {
    await writeAll(file, lengthPrefix(header.length));
    await writeAll(file, header);
    for (const [, t] of entries) await writeAll(file, f32ToBytes(t.dtype, t.data));
    await file.sync();
    file.close();
    await Deno.rename(temp, path);
  } catch (e) {
    try {
      file.close();
    } catch { /* already closed */ }
    await Deno.remove(temp).catch(() => {});
    throw e;
  }
}
