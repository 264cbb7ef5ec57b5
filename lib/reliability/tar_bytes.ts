/**
 * Tar archives built in memory, field by field, for fuzzing the reader: ustar members, pax and GNU long-name
 * headers, base-256 sizes and raw byte names, plus the offsets of every header and data region so that mutators can
 * aim at a class of offset (inside a header, at a block boundary, inside data, inside padding, in the end blocks).
 */

const BLOCK = 512;
const encoder = new TextEncoder();

export interface MemberSpec {
  /** Stored as given: a string is UTF-8 encoded, bytes are stored raw (non-UTF-8 names). */
  name: string | Uint8Array;
  data: Uint8Array;
  /** Type flag character; default "0" (regular file). */
  type?: string;
  /** Header magic: POSIX ustar (default) or the GNU one. */
  magic?: "posix" | "gnu";
  /** Write the size field in GNU base-256 rather than octal. */
  base256Size?: boolean;
}

/** Where each part of a built archive lies, for offset-class mutations. */
export interface TarLayout {
  /** Byte offsets of header blocks. */
  headers: number[];
  /** [start, end) of member data, padding excluded. */
  data: [number, number][];
  /** [start, end) of the padding after each member's data. */
  padding: [number, number][];
  /** Offset of the two end-of-archive blocks. */
  end: number;
}

export interface BuiltTar {
  bytes: Uint8Array;
  layout: TarLayout;
}

/** Sets the checksum field of a header block from its other bytes, as POSIX specifies. */
export function setChecksum(block: Uint8Array): void {
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (let i = 0; i < BLOCK; i++) sum += block[i];
  block.set(encoder.encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
}

function octal(block: Uint8Array, offset: number, width: number, value: number): void {
  block.set(encoder.encode(value.toString(8).padStart(width - 1, "0") + "\0"), offset);
}

/** Writes `value` into the 12-byte size field at 124 as GNU base-256 (high bit set, big-endian). */
export function setBase256Size(block: Uint8Array, value: bigint): void {
  let v = value;
  for (let i = 135; i > 124; i--) {
    block[i] = Number(v & 0xffn);
    v >>= 8n;
  }
  block[124] = 0x80 | Number(v & 0x3fn);
}

/** One header block. */
export function headerBlock(spec: Omit<MemberSpec, "data"> & { size: number }): Uint8Array {
  const block = new Uint8Array(BLOCK);
  const name = typeof spec.name === "string" ? encoder.encode(spec.name) : spec.name;
  block.set(name.subarray(0, 100), 0);
  octal(block, 100, 8, 0o644);
  octal(block, 108, 8, 0);
  octal(block, 116, 8, 0);
  if (spec.base256Size) setBase256Size(block, BigInt(spec.size));
  else octal(block, 124, 12, spec.size);
  octal(block, 136, 12, 0);
  block[156] = (spec.type ?? "0").charCodeAt(0);
  block.set(encoder.encode(spec.magic === "gnu" ? "ustar  \0" : "ustar\u000000"), 257);
  setChecksum(block);
  return block;
}

/** A pax record `LENGTH key=value\n`, LENGTH counting the whole record. */
export function paxRecord(key: string, value: string): string {
  const rest = encoder.encode(` ${key}=${value}\n`).length;
  let length = rest + 1;
  while (String(length).length + rest !== length) length = String(length).length + rest;
  return `${length} ${key}=${value}\n`;
}

/** A pax extended header member carrying `records` for the member that follows it. */
export function paxMember(records: Record<string, string>): MemberSpec {
  const body = Object.entries(records).map(([k, v]) => paxRecord(k, v)).join("");
  return { name: "PaxHeaders/x", data: encoder.encode(body), type: "x" };
}

/** A GNU long-name ('L') member naming the member that follows it. */
export function gnuLongNameMember(name: string | Uint8Array): MemberSpec {
  const bytes = typeof name === "string" ? encoder.encode(name) : name;
  const data = new Uint8Array(bytes.length + 1); // NUL-terminated, as GNU tar writes it
  data.set(bytes);
  return { name: "././@LongLink", data, type: "L", magic: "gnu" };
}

/** Concatenates headers, data and padding, then the two zero blocks that end an archive. */
export function buildTar(members: readonly MemberSpec[]): BuiltTar {
  const size = members.reduce((n, m) => n + BLOCK + Math.ceil(m.data.length / BLOCK) * BLOCK, 0) + 2 * BLOCK;
  const bytes = new Uint8Array(size);
  const layout: TarLayout = { headers: [], data: [], padding: [], end: 0 };
  let at = 0;
  for (const m of members) {
    layout.headers.push(at);
    bytes.set(headerBlock({ ...m, size: m.data.length }), at);
    at += BLOCK;
    bytes.set(m.data, at);
    layout.data.push([at, at + m.data.length]);
    at += m.data.length;
    const padded = Math.ceil(at / BLOCK) * BLOCK;
    layout.padding.push([at, padded]);
    at = padded;
  }
  layout.end = at;
  return { bytes, layout };
}
