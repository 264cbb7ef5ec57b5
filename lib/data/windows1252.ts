/**
 * Windows-1252 bytes 0x80-0x9F, the one range where it differs from Latin-1. The five bytes the code page leaves
 * undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) decode to the C1 control of the same number, as browsers and Python's
 * `html.unescape` do, so every byte has a character and the mapping is reversible.
 */
export const WINDOWS_1252_C1 =
  "\u20ac\x81\u201a\u0192\u201e\u2026\u2020\u2021\u02c6\u2030\u0160\u2039\u0152\x8d\u017d\x8f" +
  "\x90\u2018\u2019\u201c\u201d\u2022\u2013\u2014\u02dc\u2122\u0161\u203a\u0153\x9d\u017e\u0178";

/** The character byte `b` (0x80-0x9F) stands for in Windows-1252. */
export function windows1252Char(b: number): string {
  return WINDOWS_1252_C1[b - 0x80];
}

/**
 * Byte value of every character a Windows-1252 or Latin-1 reader can produce from a byte >= 0x80, keyed by code
 * point: both readings of 0x80-0x9F (the Windows-1252 symbol and the C1 control) map back to the same byte.
 */
export const HIGH_BYTE_OF: ReadonlyMap<number, number> = (() => {
  const map = new Map<number, number>();
  for (let b = 0x80; b <= 0xff; b++) map.set(b, b);
  for (let b = 0x80; b <= 0x9f; b++) map.set(WINDOWS_1252_C1.charCodeAt(b - 0x80), b);
  return map;
})();
