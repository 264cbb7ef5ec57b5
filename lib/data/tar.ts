/**
 * Streaming tar reader: ustar, pax extended headers (path, size) and GNU long names, one pass, bounded memory.
 *
 * The stream is consumed chunk by chunk: headers are parsed in place from the chunk they arrive in, and each member's
 * data is copied once into an array of its exact size (members over 1 MiB twice: gathered as they arrive, then
 * joined), so reading is linear in the archive size whatever the chunking. A member larger than `maxMemberBytes` is
 * streamed past without being allocated and reported through `onSkippedMember`, and no member is allocated beyond
 * 1 MiB before its bytes arrive, so a corrupt or hostile size field cannot make the reader allocate more than the
 * data it actually holds.
 */

/** A regular file read from the archive. `data` owns its memory (it is not a view into a stream chunk). */
export interface TarEntry {
  name: string;
  size: number;
  data: Uint8Array;
}

/** A member that was not returned because it exceeded `maxMemberBytes`. */
export interface SkippedMember {
  name: string;
  size: number;
  /** Byte offset of the member's header in the archive. */
  offset: number;
}

export interface ReadTarOptions {
  /** Members larger than this are skipped (streamed past, never allocated). Default 256 MiB. */
  maxMemberBytes?: number;
  /** Called for each member skipped because of its size. */
  onSkippedMember?: (member: SkippedMember) => void;
}

/** The archive is malformed: truncated, a bad header checksum or an unparsable header. `offset` is in bytes. */
export class TarError extends Error {
  override name = "TarError";
  constructor(message: string, readonly offset: number) {
    super(message);
  }
}

export const DEFAULT_MAX_MEMBER_BYTES = 256 * 1024 * 1024;
/** pax and GNU long-name headers hold a few names; anything bigger means a corrupt size field. */
const MAX_META_BYTES = 1024 * 1024;
const BLOCK = 512;
/** Members up to this size are allocated whole before their data arrives; larger ones grow with the data read. */
const EAGER_MEMBER_BYTES = 1024 * 1024;

const utf8 = new TextDecoder("utf-8"); // non-fatal: invalid bytes become U+FFFD instead of throwing

/** Pulls bytes from a stream reader with as few copies as possible, tracking the absolute offset. */
class ByteSource {
  offset = 0;
  #chunk: Uint8Array = new Uint8Array(0);
  #pos = 0;
  #ended = false;
  readonly #scratch = new Uint8Array(BLOCK);

  constructor(private readonly reader: ReadableStreamDefaultReader<Uint8Array>) {}

  get ended(): boolean {
    return this.#ended;
  }

  /** Bytes available in the current chunk, pulling the next non-empty chunk when it is used up; 0 at end of stream. */
  async #available(): Promise<number> {
    while (this.#pos >= this.#chunk.length) {
      if (this.#ended) return 0;
      const { value, done } = await this.reader.read();
      if (done) {
        this.#ended = true;
        return 0;
      }
      this.#chunk = value;
      this.#pos = 0;
    }
    return this.#chunk.length - this.#pos;
  }

  /**
   * The next 512-byte block, or null at a clean end of stream. The returned view is only valid until the next read:
   * it usually points into the stream's chunk, which saves a copy per header.
   */
  async readBlock(what: string): Promise<Uint8Array | null> {
    const start = this.offset;
    const avail = await this.#available();
    if (avail === 0) return null;
    if (avail >= BLOCK) {
      const view = this.#chunk.subarray(this.#pos, this.#pos + BLOCK);
      this.#pos += BLOCK;
      this.offset += BLOCK;
      return view;
    }
    await this.#fill(this.#scratch, what, start);
    return this.#scratch;
  }

  /** Fills `dest` completely or throws a TarError naming where the stream ended. */
  readInto(dest: Uint8Array, what: string): Promise<void> {
    return this.#fill(dest, what, this.offset);
  }

  async #fill(dest: Uint8Array, what: string, start: number): Promise<void> {
    let filled = 0;
    while (filled < dest.length) {
      const avail = await this.#available();
      if (avail === 0) throw truncated(what, start, dest.length, filled);
      const n = Math.min(avail, dest.length - filled);
      dest.set(this.#chunk.subarray(this.#pos, this.#pos + n), filled);
      this.#pos += n;
      this.offset += n;
      filled += n;
    }
  }

  /**
   * The next `size` bytes as an array that owns its memory. Small members are read straight into an array of their
   * exact size; larger ones are gathered piece by piece as they arrive and joined at the end, so memory follows the
   * bytes actually present and a size field claiming far more than the stream holds allocates nothing up front.
   */
  async readMember(size: number, what: string): Promise<Uint8Array> {
    if (size <= EAGER_MEMBER_BYTES) {
      const data = new Uint8Array(size);
      await this.readInto(data, what);
      return data;
    }
    const start = this.offset;
    const pieces: Uint8Array[] = [];
    let got = 0;
    while (got < size) {
      const avail = await this.#available();
      if (avail === 0) throw truncated(what, start, size, got);
      const n = Math.min(avail, size - got);
      pieces.push(this.#chunk.slice(this.#pos, this.#pos + n));
      this.#pos += n;
      this.offset += n;
      got += n;
    }
    if (pieces.length === 1) return pieces[0];
    const data = new Uint8Array(size);
    let at = 0;
    for (const piece of pieces) {
      data.set(piece, at);
      at += piece.length;
    }
    return data;
  }

  /** Advances `count` bytes without keeping them. */
  async skip(count: number, what: string): Promise<void> {
    const start = this.offset;
    let left = count;
    while (left > 0) {
      const avail = await this.#available();
      if (avail === 0) throw truncated(what, start, count, count - left);
      const n = Math.min(avail, left);
      this.#pos += n;
      this.offset += n;
      left -= n;
    }
  }
}

function truncated(what: string, start: number, wanted: number, got: number): TarError {
  return new TarError(
    `truncated tar archive: the stream ended at offset ${start + got} inside ${what} starting at offset ${start} ` +
      `(${got} of ${wanted} bytes present); the file is incomplete or was cut during download`,
    start + got,
  );
}

/** Reads a NUL-terminated field. */
function cString(bytes: Uint8Array, start: number, length: number): Uint8Array {
  const field = bytes.subarray(start, start + length);
  const end = field.indexOf(0);
  return end < 0 ? field : field.subarray(0, end);
}

/** Numeric header field: octal text (space/NUL padded) or GNU base-256 when the high bit of the first byte is set. */
function parseNumber(block: Uint8Array, start: number, length: number, field: string, offset: number): number {
  const bytes = block.subarray(start, start + length);
  if (bytes[0] & 0x80) {
    if (bytes[0] & 0x40) throw new TarError(`tar header at offset ${offset} has a negative ${field} field`, offset);
    let value = bytes[0] & 0x3f;
    for (let i = 1; i < bytes.length; i++) value = value * 256 + bytes[i];
    return value;
  }
  let i = 0;
  while (i < bytes.length && (bytes[i] === 0x20 || bytes[i] === 0)) i++;
  let value = 0;
  let digits = 0;
  for (; i < bytes.length && bytes[i] >= 0x30 && bytes[i] <= 0x37; i++, digits++) value = value * 8 + (bytes[i] - 0x30);
  for (; i < bytes.length; i++) {
    if (bytes[i] !== 0x20 && bytes[i] !== 0) {
      throw new TarError(`tar header at offset ${offset} has an invalid ${field} field`, offset);
    }
  }
  return digits === 0 ? 0 : value;
}

function isZeroBlock(block: Uint8Array): boolean {
  for (let i = 0; i < BLOCK; i++) if (block[i] !== 0) return false;
  return true;
}

/** Accepts the POSIX unsigned sum and the signed sum some historic writers used. */
function verifyChecksum(block: Uint8Array, offset: number): void {
  const stored = parseNumber(block, 148, 8, "checksum", offset);
  let unsigned = 0;
  let signed = 0;
  for (let i = 0; i < BLOCK; i++) {
    const b = i >= 148 && i < 156 ? 0x20 : block[i];
    unsigned += b;
    signed += b < 128 ? b : b - 256;
  }
  if (stored !== unsigned && stored !== signed) {
    throw new TarError(
      `bad tar header checksum at offset ${offset} (stored ${stored}, computed ${unsigned}): the archive is corrupt`,
      offset,
    );
  }
}

interface PaxOverrides {
  path?: string;
  size?: number;
}

/** pax records are `LENGTH key=value\n` where LENGTH counts the whole record, itself included. */
function parsePax(data: Uint8Array, offset: number): PaxOverrides {
  const out: PaxOverrides = {};
  const malformed = () => new TarError(`malformed pax extended header at offset ${offset}`, offset);
  let pos = 0;
  while (pos < data.length) {
    if (data[pos] === 0) break; // some writers pad the record area with NULs
    let length = 0;
    let p = pos;
    while (p < data.length && data[p] >= 0x30 && data[p] <= 0x39) length = length * 10 + (data[p++] - 0x30);
    if (p === pos || data[p] !== 0x20 || length <= p - pos + 1 || pos + length > data.length) throw malformed();
    const record = data.subarray(p + 1, pos + length);
    if (record[record.length - 1] !== 0x0a) throw malformed();
    const eq = record.indexOf(0x3d);
    if (eq < 0) throw malformed();
    const key = utf8.decode(record.subarray(0, eq));
    const value = record.subarray(eq + 1, record.length - 1);
    if (key === "path") out.path = utf8.decode(value);
    else if (key === "size") {
      const text = utf8.decode(value);
      if (!/^\d+$/.test(text)) {
        throw new TarError(`pax header at offset ${offset} has an invalid size "${text}"`, offset);
      }
      out.size = Number(text);
    }
    pos += length;
  }
  return out;
}

// Type flags. A NUL flag is a regular file in pre-POSIX archives; '7' (contiguous) is read as a regular file too.
const REGULAR = new Set([0x30, 0x00, 0x37]);
const PAX_LOCAL = 0x78; // 'x'
const PAX_GLOBAL = 0x67; // 'g'
const GNU_LONG_NAME = 0x4c; // 'L'
const GNU_LONG_LINK = 0x4b; // 'K'
// Links, devices and FIFOs carry no data whatever their size field says.
const NO_DATA = new Set([0x31, 0x32, 0x33, 0x34, 0x36]);

function padding(size: number): number {
  return (BLOCK - (size % BLOCK)) % BLOCK;
}

/**
 * Yields the regular files of a tar stream in archive order, skipping directories, links and special files.
 * Throws TarError for a truncated archive, a bad header checksum or a malformed header; the caller decides whether
 * to skip the rest of the archive. The stream is cancelled when iteration stops early or fails.
 */
export async function* readTar(
  stream: ReadableStream<Uint8Array>,
  opts: ReadTarOptions = {},
): AsyncGenerator<TarEntry> {
  const maxMemberBytes = opts.maxMemberBytes ?? DEFAULT_MAX_MEMBER_BYTES;
  const reader = stream.getReader();
  const source = new ByteSource(reader);
  try {
    let pax: PaxOverrides = {};
    let longName: string | undefined;
    for (;;) {
      const offset = source.offset;
      const block = await source.readBlock("a header block");
      if (block === null || isZeroBlock(block)) return; // end of archive (the second zero block is not required)
      verifyChecksum(block, offset);

      const type = block[156];
      const headerSize = parseNumber(block, 124, 12, "size", offset);
      const what = `the data of the member whose header is at offset ${offset}`;

      // Metadata headers describe the next member; their own size is always the header's.
      if (type === PAX_LOCAL || type === GNU_LONG_NAME) {
        if (headerSize > MAX_META_BYTES) {
          throw new TarError(
            `tar metadata header at offset ${offset} claims ${headerSize} bytes: the archive is corrupt`,
            offset,
          );
        }
        const data = new Uint8Array(headerSize);
        await source.readInto(data, what);
        await source.skip(padding(headerSize), what);
        if (type === PAX_LOCAL) pax = { ...pax, ...parsePax(data, offset) };
        else longName = utf8.decode(cString(data, 0, data.length));
        continue;
      }
      if (type === PAX_GLOBAL || type === GNU_LONG_LINK) { // archive-wide defaults and link targets: not needed here
        await source.skip(headerSize + padding(headerSize), what);
        continue;
      }

      const name = pax.path ?? longName ?? headerName(block);
      const size = NO_DATA.has(type) ? 0 : pax.size ?? headerSize;
      pax = {};
      longName = undefined;
      const isDirectory = type === 0x35 || (type === 0 && name.endsWith("/"));
      if (!REGULAR.has(type) || isDirectory) {
        await source.skip(size + padding(size), what);
        continue;
      }
      if (size > maxMemberBytes) {
        await source.skip(size + padding(size), what);
        opts.onSkippedMember?.({ name, size, offset });
        continue;
      }
      const data = await source.readMember(size, what);
      await source.skip(padding(size), what);
      yield { name, size, data };
    }
  } finally {
    // Stopping early (break, error, truncation) must still release the underlying file or connection.
    if (!source.ended) await reader.cancel().catch(() => {});
    reader.releaseLock();
  }
}

/** The ustar prefix field only exists with the POSIX magic; GNU archives use those bytes for other data. */
function headerName(block: Uint8Array): string {
  const name = utf8.decode(cString(block, 0, 100));
  const isPosixUstar = block[257] === 0x75 && block[258] === 0x73 && block[259] === 0x74 && block[260] === 0x61 &&
    block[261] === 0x72 && block[262] === 0;
  if (!isPosixUstar) return name;
  const prefix = utf8.decode(cString(block, 345, 155));
  return prefix ? `${prefix}/${name}` : name;
}
