/**
 * Seeded byte and text mutators for fuzzing. Every function draws only from the Rng it is given, so an input is
 * reproduced exactly from (seed, index).
 */
import type { Rng } from "../data/rng.ts";

export function pick<T>(rng: Rng, items: readonly T[]): T {
  return items[rng.int(items.length)];
}

/** Bytes that make parsers take unusual paths: boundaries of signed and unsigned ranges, digits, space, NUL. */
const INTERESTING_BYTES = [0x00, 0x01, 0x7f, 0x80, 0xff, 0x20, 0x30, 0x37, 0x38, 0x39, 0x0a, 0x22, 0x7b, 0x7d];

function randomBytes(rng: Rng, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.int(256);
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/**
 * Applies 1 to `maxOps` random edits: bit flips, random or interesting bytes, deleted, duplicated or inserted ranges.
 * Returns a new array; `input` is not modified.
 */
export function mutateBytes(rng: Rng, input: Uint8Array, maxOps = 8): Uint8Array {
  let out: Uint8Array = input.slice();
  const ops = 1 + rng.int(maxOps);
  for (let k = 0; k < ops; k++) {
    if (out.length === 0) {
      out = randomBytes(rng, 1 + rng.int(16));
      continue;
    }
    const at = rng.int(out.length);
    switch (rng.int(6)) {
      case 0:
        out[at] ^= 1 << rng.int(8);
        break;
      case 1:
        out[at] = rng.int(256);
        break;
      case 2:
        out[at] = pick(rng, INTERESTING_BYTES);
        break;
      case 3: {
        const end = Math.min(out.length, at + 1 + rng.int(64));
        out = concat(out.subarray(0, at), out.subarray(end));
        break;
      }
      case 4: {
        const end = Math.min(out.length, at + 1 + rng.int(64));
        out = concat(out.subarray(0, end), out.subarray(at, end), out.subarray(end));
        break;
      }
      default:
        out = concat(out.subarray(0, at), randomBytes(rng, 1 + rng.int(32)), out.subarray(at));
    }
  }
  return out;
}

/** A random code point from `ranges` ([first, last] inclusive), as a string (surrogates stay lone). */
export function codePointFrom(rng: Rng, ranges: readonly [number, number][]): string {
  const [first, last] = pick(rng, ranges);
  const cp = first + rng.int(last - first + 1);
  return cp <= 0xffff ? String.fromCharCode(cp) : String.fromCodePoint(cp);
}

/** A string of about `length` UTF-16 units made by repeating `piece`. */
export function textOfLength(length: number, piece: () => string): string {
  const parts: string[] = [];
  let n = 0;
  while (n < length) {
    const p = piece();
    parts.push(p);
    n += p.length;
  }
  return parts.join("");
}
