import { unescapeHtml, unescapeHtmlStrict } from "./html_entities.ts";
import { repairMojibake } from "./mojibake.ts";
import { windows1252Char } from "./windows1252.ts";

/**
 * Repairs of common text damage, applied before tokenizing so that captions scraped from the web map to the same
 * tokens as their intended text. The steps and their order follow ftfy's `fix_text` (which open_clip runs), with
 * the same decisions on the cases ftfy handles most often:
 *
 * - HTML character references (only unambiguous ones, and not in text that looks like HTML markup);
 * - mojibake: UTF-8 that was decoded as Windows-1252 or Latin-1 ("cafÃ©", "itâ€™s");
 * - stray C1 controls read as the Windows-1252 characters they stand for;
 * - Latin ligatures split into letters, halfwidth and fullwidth forms made standard width;
 * - curly quotes straightened; line breaks unified; lone surrogates, terminal colour codes and invisible control
 *   characters removed; NFC normalisation.
 *
 * Not covered (ftfy has heuristics for them): UTF-8 misread through other code pages (Windows-1251, Mac Roman,
 * cp437) and mojibake whose 0xA0 byte was turned into a plain space.
 */

/**
 * Fixes `text` line by line (a line keeps its newline). From the first line that contains "<" on, the text looks
 * like markup, so references are left for the HTML decoding that comes after (as ftfy does).
 */
export function fixText(text: string): string {
  if (isPlainAsciiWithoutReferences(text)) return text;
  if (!MAY_NEED_FIX_RE.test(text)) {
    // Only NFC can change such text, and NFC is idempotent, so one application reaches the fixed point unless
    // composing created something fixable (a composed "Â" before a symbol, say).
    const normalized = text.normalize("NFC");
    if (!MAY_NEED_FIX_RE.test(normalized)) return normalized;
  }
  let out = "";
  let decodeReferences = true;
  let start = 0;
  while (start < text.length) {
    const newline = text.indexOf("\n", start);
    const end = newline < 0 ? text.length : newline + 1;
    const line = text.slice(start, end);
    if (line.includes("<")) decodeReferences = false;
    out += fixSegment(line, decodeReferences);
    start = end;
  }
  return out;
}

/** Printable ASCII, tab and newline without "&": nothing to fix and nothing to unescape. */
const PLAIN_ASCII_RE = /^[\x20-\x25\x27-\x7e\t\n]*$/;

function isPlainAsciiWithoutReferences(text: string): boolean {
  return PLAIN_ASCII_RE.test(text);
}

/**
 * Everything some fix below acts on: "&", controls, a mojibake lead followed by a continuation character,
 * ligatures, curly quotes, line and paragraph separators, lone surrogates, width forms, invisible format
 * characters. Text without any of them (most captions, in any script) only needs NFC.
 */
const MAY_NEED_FIX_RE = new RegExp(
  "[&\\x00-\\x08\\x0b\\x0d-\\x1f\\x7f-\\x9f\\u0132\\u0133\\u0149\\u01c4-\\u01cc\\u01f1-\\u01f3\\u02bc\\u2018-\\u201f" +
    "\\u2028\\u2029\\u206a-\\u206f\\u3000\\ud800-\\udfff\\ufb00-\\ufb06\\ufeff\\ufff9-\\ufffc\\uff01-\\uffef]" +
    "|[\\u00c2-\\u00f4][\\u0080-\\u00bf\\u0152\\u0153\\u0160\\u0161\\u0178\\u017d\\u017e\\u0192\\u02c6\\u02dc\\u2013\\u2014" +
    "\\u2018-\\u201a\\u201c-\\u201e\\u2020-\\u2022\\u2026\\u2030\\u2039\\u203a\\u20ac\\u2122]",
  "u", // so that the surrogate range matches only unpaired surrogates, not emoji
);

/** Repeats the fixes until nothing changes: one repair can reveal another ("&amp;amp;", doubly encoded UTF-8). */
function fixSegment(text: string, decodeReferences: boolean): string {
  for (let round = 0; round < MAX_ROUNDS; round++) {
    const before = text;
    if (decodeReferences) text = unescapeHtmlStrict(text);
    text = repairMojibake(text);
    text = fixC1Controls(text);
    text = splitLatinLigatures(text);
    text = standardWidth(text);
    text = uncurlQuotes(text);
    text = unifyLineBreaks(text);
    text = text.toWellFormed();
    text = text.replace(TERMINAL_ESCAPE_RE, "");
    text = text.replace(CONTROL_CHARS_RE, "");
    text = text.normalize("NFC");
    if (text === before) break;
  }
  return text;
}

/** Enough for every realistic nesting (each round removes one layer); stops pathological inputs from looping. */
const MAX_ROUNDS = 16;

// ---------------------------------------------------------------------------------------------------------------
// Character-level fixes

/** C1 controls have no use in text; they are what a Latin-1 reader makes of Windows-1252 punctuation. */
function fixC1Controls(text: string): string {
  return text.replace(/[\x80-\x9f]/g, (c) => windows1252Char(c.charCodeAt(0)));
}

/**
 * Latin ligatures and digraphs mapped to their letters (their compatibility decompositions, one level deep, so
 * "ﬅ" keeps its long s). Ligatures of other scripts and "æ"/"œ", which are letters in their own right, stay.
 */
const LATIN_LIGATURES: Record<string, string> = {
  "\u0132": "IJ",
  "\u0133": "ij",
  "\u0149": "\u02bcn",
  "\u01c4": "D\u017d",
  "\u01c5": "D\u017e",
  "\u01c6": "d\u017e",
  "\u01c7": "LJ",
  "\u01c8": "Lj",
  "\u01c9": "lj",
  "\u01ca": "NJ",
  "\u01cb": "Nj",
  "\u01cc": "nj",
  "\u01f1": "DZ",
  "\u01f2": "Dz",
  "\u01f3": "dz",
  "\ufb00": "ff",
  "\ufb01": "fi",
  "\ufb02": "fl",
  "\ufb03": "ffi",
  "\ufb04": "ffl",
  "\ufb05": "\u017ft",
  "\ufb06": "st",
};
const LATIN_LIGATURE_RE = /[\u0132\u0133\u0149\u01c4-\u01cc\u01f1-\u01f3\ufb00-\ufb06]/g;

function splitLatinLigatures(text: string): string {
  return text.replace(LATIN_LIGATURE_RE, (c) => LATIN_LIGATURES[c]);
}

/**
 * Halfwidth and fullwidth forms (U+FF01-U+FFEF: "ＡＢＣ１２３", halfwidth katakana) replaced by their compatibility
 * equivalents, and the ideographic space by a space; NFC afterwards joins halfwidth voiced marks to their kana.
 */
const WIDTH_RE = /[\u3000\uff01-\uffef]/g;
const STANDARD_WIDTH: ReadonlyMap<string, string> = (() => {
  const map = new Map<string, string>([["\u3000", " "]]);
  for (let code = 0xff01; code <= 0xffef; code++) {
    const char = String.fromCharCode(code);
    const standard = char.normalize("NFKC");
    if (standard !== char) map.set(char, standard);
  }
  return map;
})();

function standardWidth(text: string): string {
  return text.replace(WIDTH_RE, (c) => STANDARD_WIDTH.get(c) ?? c);
}

function uncurlQuotes(text: string): string {
  return text.replace(/[\u02bc\u2018-\u201b]/g, "'").replace(/[\u201c-\u201f]/g, '"');
}

function unifyLineBreaks(text: string): string {
  return text.replace(/\r\n?|[\u2028\u2029\u0085]/g, "\n");
}

/** ANSI colour and cursor codes ("ESC [ 1;31 m") left over from terminal output. */
// deno-lint-ignore no-control-regex -- matching control characters is the point
const TERMINAL_ESCAPE_RE = /\x1b\[[0-9;]*[a-zA-Z]/g;

/**
 * Invisible controls nobody means to keep: ASCII controls except tab, newlines and form feed; deprecated Arabic
 * format controls; the byte-order mark; interlinear annotation marks and the object replacement character.
 * Joiners, direction marks and emoji tag characters carry meaning and stay.
 */
// deno-lint-ignore no-control-regex -- matching control characters is the point
const CONTROL_CHARS_RE = /[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]/g;

// ---------------------------------------------------------------------------------------------------------------
// open_clip's full cleaning

/**
 * Python's `str.isspace` characters, which open_clip's `split()` and `strip()` use. JavaScript's `\s` differs
 * (it has U+FEFF and lacks U+001C-U+001F and U+0085), so the set is spelled out.
 */
const PY_SPACE = "\\t\\n\\v\\f\\r\\x1c-\\x1f \\x85\\xa0\\u1680\\u2000-\\u200a\\u2028\\u2029\\u202f\\u205f\\u3000";
const PY_SPACE_RUN_RE = new RegExp(`[${PY_SPACE}]+`, "g");
/** Anything but single spaces between words: the common case needs no rewriting. */
const NEEDS_SPACE_CLEANUP_RE = new RegExp(`[${PY_SPACE.replace(" ", "")}]| {2}|^ | $`);
const EDGE_SPACE_RE = /^ | $/g;

/**
 * The text CLIP's BPE sees: fix the text, decode HTML references twice (captions are often escaped twice),
 * collapse whitespace runs to one space, trim, lower-case.
 */
export function cleanText(text: string): string {
  let cleaned = isPlainAsciiWithoutReferences(text) ? text : unescapeHtml(unescapeHtml(fixText(text)));
  if (NEEDS_SPACE_CLEANUP_RE.test(cleaned)) {
    // Only spaces are left to trim, and String.prototype.trim would also remove U+FEFF, which Python keeps.
    cleaned = cleaned.replace(PY_SPACE_RUN_RE, " ").replace(EDGE_SPACE_RE, "");
  }
  return cleaned.toLowerCase();
}
