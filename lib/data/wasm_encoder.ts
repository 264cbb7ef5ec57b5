/**
 * Just enough of the WebAssembly binary format to write small numeric kernels in TypeScript: one module with its own
 * exported memory and exported functions over i32 and v128 values. Code is written as nested expressions that
 * flatten to bytes in stack order, e.g. `set(x, add(get(x), i32(1)))`; the engine validates the result when it
 * compiles it, so a malformed kernel fails at startup rather than computing something wrong.
 */

export type Code = number | readonly Code[];

export const I32 = 0x7f;
export const V128 = 0x7b;
export type ValueType = typeof I32 | typeof V128;

export interface FunctionSpec {
  name: string;
  params: readonly ValueType[];
  /** Local variables after the parameters (indices continue from params.length). */
  locals: readonly ValueType[];
  body: Code;
}

function flatten(code: Code, out: number[] = []): number[] {
  if (typeof code === "number") out.push(code);
  else for (const c of code) flatten(c, out);
  return out;
}

/** Unsigned LEB128. */
export function u32(n: number): number[] {
  const out: number[] = [];
  do {
    let byte = n & 0x7f;
    n >>>= 7;
    if (n !== 0) byte |= 0x80;
    out.push(byte);
  } while (n !== 0);
  return out;
}

/** Signed LEB128 of a 32-bit integer. */
function s32(n: number): number[] {
  const out: number[] = [];
  n |= 0;
  while (true) {
    const byte = n & 0x7f;
    n >>= 7;
    const done = (n === 0 && (byte & 0x40) === 0) || (n === -1 && (byte & 0x40) !== 0);
    out.push(done ? byte : byte | 0x80);
    if (done) return out;
  }
}

function vector(items: readonly number[][]): number[] {
  return [...u32(items.length), ...items.flat()];
}

function section(id: number, body: number[]): number[] {
  return [id, ...u32(body.length), ...body];
}

function utf8(name: string): number[] {
  const bytes = [...new TextEncoder().encode(name)];
  return [...u32(bytes.length), ...bytes];
}

/** A module exporting `memory` (starting at `pages` of 64 KiB) and the given functions, none returning a value. */
export function encodeModule(functions: readonly FunctionSpec[], pages = 1): Uint8Array<ArrayBuffer> {
  const types = functions.map((f) => [0x60, ...vector(f.params.map((t) => [t])), 0]);
  const codes = functions.map((f) => {
    const locals = vector(f.locals.map((t) => [1, t]));
    const body = [...locals, ...flatten(f.body), 0x0b];
    return [...u32(body.length), ...body];
  });
  const exports = [
    [...utf8("memory"), 0x02, 0],
    ...functions.map((f, i) => [...utf8(f.name), 0x00, ...u32(i)]),
  ];
  return new Uint8Array([
    ...[0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00],
    ...section(1, vector(types)),
    ...section(3, vector(functions.map((_, i) => u32(i)))),
    ...section(5, vector([[0x00, ...u32(pages)]])),
    ...section(7, vector(exports)),
    ...section(10, vector(codes)),
  ]);
}

// Variables and constants.
export const get = (local: number): Code => [0x20, u32(local)];
export const set = (local: number, value: Code): Code => [value, 0x21, u32(local)];
export const i32 = (n: number): Code => [0x41, s32(n)];

// i32 arithmetic and comparisons (operands in order).
export const add = (a: Code, b: Code): Code => [a, b, 0x6a];
export const sub = (a: Code, b: Code): Code => [a, b, 0x6b];
export const mul = (a: Code, b: Code): Code => [a, b, 0x6c];
export const ltU = (a: Code, b: Code): Code => [a, b, 0x49];

/** Adds `n` to an i32 local. */
export const increment = (local: number, n: Code): Code => set(local, add(get(local), n));

// Memory, with alignment hints of 1 (the kernels read unaligned bytes).
const memarg = (offset = 0): Code => [0x00, u32(offset)];
export const load32 = (address: Code): Code => [address, 0x28, 0x02, u32(0)];

// Structured control flow. Labels count outwards from the innermost enclosing block or loop.
/** A loop that runs `body` once, then again while `condition` holds (a do-while). */
export const doWhile = (body: Code, condition: Code): Code => [0x03, 0x40, body, condition, 0x0d, 0x00, 0x0b];

// SIMD (prefix 0xfd).
const simd = (op: number): Code => [0xfd, u32(op)];
export const v128Load = (address: Code): Code => [address, simd(0x00), memarg()];
/** 8 bytes zero-extended to eight 16-bit lanes. */
export const load8x8U = (address: Code): Code => [address, simd(0x02), memarg()];
/** One 32-bit value in all four lanes. */
export const load32Splat = (address: Code): Code => [address, simd(0x09), memarg()];
/** Stores 16 bytes at `address + offset`. */
export const v128Store = (address: Code, value: Code, offset = 0): Code => [address, value, simd(0x0b), memarg(offset)];
/** Stores byte lane `lane` of `value`. */
export const store8Lane = (address: Code, value: Code, lane: number): Code => [
  address,
  value,
  simd(0x58),
  memarg(),
  lane,
];
export const i32x4Splat = (value: Code): Code => [value, simd(0x11)];
/** Saturating: signed 16-bit lanes to unsigned bytes, clamped to [0, 255]. */
export const narrowI16x8ToU8 = (low: Code, high: Code): Code => [low, high, simd(0x66)];
/** Saturating: 32-bit lanes to signed 16-bit lanes. */
export const narrowI32x4ToI16 = (low: Code, high: Code): Code => [low, high, simd(0x85)];
export const extendLowU8x16 = (v: Code): Code => [v, simd(0x89)];
export const extendHighU8x16 = (v: Code): Code => [v, simd(0x8a)];
export const extendLowU16x8 = (v: Code): Code => [v, simd(0xa9)];
export const extendHighU16x8 = (v: Code): Code => [v, simd(0xaa)];
export const i32x4ShrS = (v: Code, bits: Code): Code => [v, bits, simd(0xac)];
export const i32x4Add = (a: Code, b: Code): Code => [a, b, simd(0xae)];
export const i32x4Mul = (a: Code, b: Code): Code => [a, b, simd(0xb5)];
export const f32x4Sub = (a: Code, b: Code): Code => [a, b, simd(0xe5)];
export const f32x4Div = (a: Code, b: Code): Code => [a, b, simd(0xe7)];
/** Unsigned 32-bit lanes to float32 lanes. */
export const f32x4ConvertU = (v: Code): Code => [v, simd(0xfb)];
