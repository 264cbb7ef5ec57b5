/**
 * Writes ustar archives that any tar reader accepts, byte-for-byte deterministic for the same input: mtime 0,
 * uid/gid 0, empty owner names, mode 0644. Names longer than the 100-byte ustar field get a pax `path` record.
 * The archive is written to `path + ".tmp"` and renamed into place by `close()`, so a crash never leaves a
 * half-written shard under the final name.
 */

import { ClipError } from "../errors.ts";

const BLOCK = 512;
const NAME_FIELD = 100;
const MAX_OCTAL_SIZE = 8 ** 11 - 1; // what 11 octal digits hold; beyond it the size is written in base-256
const FLUSH_BYTES = 1 << 20;
const encoder = new TextEncoder();
const ZERO_BLOCK = new Uint8Array(BLOCK);

/** Writes `value` as zero-padded octal of `width` digits followed by a NUL, as ustar numeric fields are. */
function writeOctal(block: Uint8Array, start: number, width: number, value: number): void {
  block.set(encoder.encode(value.toString(8).padStart(width, "0") + "\0"), start);
}

/** GNU base-256: high bit of the first byte set, then the value big-endian. */
function writeBase256(block: Uint8Array, start: number, length: number, value: number): void {
  let v = value;
  for (let i = start + length - 1; i > start; i--) {
    block[i] = v % 256;
    v = Math.floor(v / 256);
  }
  block[start] = 0x80;
}

/** Longest prefix of `bytes` that fits in `limit` bytes without splitting a UTF-8 sequence. */
function truncateUtf8(bytes: Uint8Array, limit: number): Uint8Array {
  if (bytes.length <= limit) return bytes;
  let end = limit;
  while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--;
  return bytes.subarray(0, end);
}

function header(name: Uint8Array, size: number, type: string): Uint8Array {
  const block = new Uint8Array(BLOCK);
  block.set(name, 0);
  writeOctal(block, 100, 7, 0o644);
  writeOctal(block, 108, 7, 0);
  writeOctal(block, 116, 7, 0);
  if (size <= MAX_OCTAL_SIZE) writeOctal(block, 124, 11, size);
  else writeBase256(block, 124, 12, size);
  writeOctal(block, 136, 11, 0);
  block[156] = type.charCodeAt(0);
  block.set(encoder.encode("ustar\u000000"), 257);
  // The checksum is computed with its own field read as spaces, then stored as 6 octal digits, NUL, space.
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += block[i];
  block.set(encoder.encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
  return block;
}

/** One pax record: `LENGTH key=value\n`, where LENGTH counts the whole record including its own digits. */
function paxRecord(key: string, value: string): string {
  const rest = encoder.encode(` ${key}=${value}\n`).length;
  let length = rest + 1;
  while (String(length).length + rest !== length) length = String(length).length + rest;
  return `${length} ${key}=${value}\n`;
}

function padding(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

export class TarWriter {
  readonly #file: Deno.FsFile;
  readonly #tmpPath: string;
  readonly #staging = new Uint8Array(FLUSH_BYTES);
  #used = 0;
  #closed = false;

  private constructor(readonly path: string, file: Deno.FsFile, tmpPath: string) {
    this.#file = file;
    this.#tmpPath = tmpPath;
  }

  /** Starts an archive that will appear at `path` when `close()` succeeds. */
  static async create(path: string): Promise<TarWriter> {
    const tmpPath = `${path}.tmp`;
    try {
      const file = await Deno.open(tmpPath, { write: true, create: true, truncate: true });
      return new TarWriter(path, file, tmpPath);
    } catch (e) {
      throw new ClipError(
        `cannot create ${tmpPath}: ${(e as Error).message}; check that the directory exists and is writable`,
      );
    }
  }

  /** Appends a regular file. Names are stored as UTF-8; a name over 100 bytes is carried by a pax header. */
  async add(name: string, data: Uint8Array): Promise<void> {
    if (this.#closed) throw new Error(`TarWriter for ${this.path} is already closed`);
    if (name.length === 0 || name.includes("\0")) {
      throw new ClipError(
        `invalid tar member name ${JSON.stringify(name)} for ${this.path}: names must be non-empty without NUL`,
      );
    }
    const nameBytes = encoder.encode(name);
    const fallbackName = truncateUtf8(nameBytes, NAME_FIELD);
    if (nameBytes.length > NAME_FIELD || data.length > MAX_OCTAL_SIZE) {
      let records = "";
      if (nameBytes.length > NAME_FIELD) records += paxRecord("path", name);
      if (data.length > MAX_OCTAL_SIZE) records += paxRecord("size", String(data.length));
      const body = encoder.encode(records);
      const paxName = truncateUtf8(encoder.encode(`PaxHeaders/${new TextDecoder().decode(fallbackName)}`), NAME_FIELD);
      await this.#write(header(paxName, body.length, "x"));
      await this.#write(body);
      await this.#write(ZERO_BLOCK.subarray(0, padding(body.length)));
    }
    await this.#write(header(fallbackName, data.length, "0"));
    await this.#write(data);
    await this.#write(ZERO_BLOCK.subarray(0, padding(data.length)));
  }

  /** Writes the end-of-archive marker, flushes and renames the temporary file to `path`. */
  async close(): Promise<void> {
    if (this.#closed) return;
    await this.#write(ZERO_BLOCK);
    await this.#write(ZERO_BLOCK);
    await this.#flush();
    this.#closed = true;
    this.#file.close();
    await Deno.rename(this.#tmpPath, this.path);
  }

  /** Discards the archive: closes and deletes the temporary file; `path` is left untouched. */
  async abort(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#used = 0;
    this.#file.close();
    await Deno.remove(this.#tmpPath).catch(() => {});
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.abort();
  }

  async #write(bytes: Uint8Array): Promise<void> {
    if (bytes.length >= FLUSH_BYTES) {
      await this.#flush();
      await this.#writeAll(bytes);
      return;
    }
    // Small pieces (headers, captions) are copied into a staging buffer so the file sees few large writes; the copy
    // also means the caller may reuse its array as soon as add() returns.
    if (this.#used + bytes.length > FLUSH_BYTES) await this.#flush();
    this.#staging.set(bytes, this.#used);
    this.#used += bytes.length;
  }

  async #flush(): Promise<void> {
    if (this.#used === 0) return;
    await this.#writeAll(this.#staging.subarray(0, this.#used));
    this.#used = 0;
  }

  async #writeAll(bytes: Uint8Array): Promise<void> {
    let written = 0;
    while (written < bytes.length) written += await this.#file.write(bytes.subarray(written));
  }
}
