import { HIGH_BYTE_OF } from "./windows1252.ts";

/**
 * Repair of the most common mojibake: UTF-8 bytes that were decoded as Windows-1252 or Latin-1, so that each
 * non-ASCII character became 2-4 characters ("café" -> "cafÃ©", "it’s" -> "itâ€™s", "😀" -> "ðŸ˜€").
 *
 * Such a misreading leaves a recognisable trace: a lead character (Â-ô, bytes 0xC2-0xF4) followed by the right
 * number of continuation characters (the ones Windows-1252 gives bytes 0x80-0xBF), forming well-formed UTF-8.
 * Real text produces that pattern too ("Straß“" is German, not U+07D3), so a sequence is only decoded when it is
 * suspicious (see `isSuspicious`) or sits next to one that is:
 *
 * - when the whole text is the Windows-1252 reading of valid UTF-8 (every non-ASCII character belongs to such a
 *   sequence), one suspicious sequence decodes the whole text, as in "Ð¿Ñ€Ð¸Ð²ÐµÑ‚" -> "привет";
 * - in text mixed with characters that cannot come from Windows-1252, each run of adjacent sequences is decoded
 *   when one of its sequences is suspicious, and left alone otherwise.
 *
 * Decoding repeats until nothing changes elsewhere (the caller's loop), which undoes double encodings ("ÃƒÂ©").
 * Not covered: UTF-8 misread through other code pages (Windows-1251, Mac Roman, cp437) and sequences whose 0xA0
 * byte became a space.
 */

interface Sequence {
  start: number;
  length: number;
  codePoint: number;
  suspicious: boolean;
}

/** Characters a Windows-1252 reader makes of UTF-8 lead bytes 0xC2-0xF4. */
const LEAD_RE = /[\u00c2-\u00f4]/;

/**
 * Leads whose real letters (capital Â, Ã, Î, Ð) are almost never followed by a symbol, while their misread UTF-8
 * (U+0080-U+00FF, Greek, Cyrillic) is very common: any continuation after them is suspicious.
 */
const SUSPICIOUS_LEADS = new Set([0xc2, 0xc3, 0xce, 0xd0]);

/**
 * Continuation characters that do not follow letters in real text: C1 controls and most Windows-1252 and Latin-1
 * symbols (€, ƒ, ¤, §, ±, ¿, ...). Not in this set: what does follow words, such as quotes, dashes, ellipses,
 * guillemets, the no-break space and the middle dot, and the marks that follow brand names ("CAFÉ®", "É™", "É©").
 * "â€" (curly quotes, dashes) and "ðŸ" (emoji), the commonest mojibake of all, contain € and Ÿ.
 */
const SUSPICIOUS_CONTINUATIONS: ReadonlySet<number> = (() => {
  const set = new Set<number>();
  for (let c = 0x80; c <= 0x9f; c++) set.add(c);
  for (const c of "€ƒˆ†‡‰ŠŒŽ˜šœžŸ¡¢£¤¥¦§¨ª¬¯°±²³´µ¶¸¹º¼½¾¿") set.add(c.charCodeAt(0));
  return set;
})();

export function repairMojibake(text: string): string {
  if (!LEAD_RE.test(text)) return text;
  const sequences = findSequences(text);
  if (!sequences.some((s) => s.suspicious)) return text;
  const runs = isWholeTextMisread(text, sequences) ? [sequences] : adjacentRuns(sequences);
  let out = "";
  let copiedUpTo = 0;
  for (const run of runs) {
    if (!run.some((s) => s.suspicious)) continue;
    for (const s of run) {
      out += text.slice(copiedUpTo, s.start) + String.fromCodePoint(s.codePoint);
      copiedUpTo = s.start + s.length;
    }
  }
  return out + text.slice(copiedUpTo);
}

/** Every well-formed misread UTF-8 sequence, scanning left to right. */
function findSequences(text: string): Sequence[] {
  const found: Sequence[] = [];
  for (let i = 0; i < text.length; i++) {
    const lead = text.charCodeAt(i);
    if (lead < 0xc2 || lead > 0xf4) continue;
    const sequence = readSequence(text, i);
    if (sequence === undefined) continue;
    found.push(sequence);
    i += sequence.length - 1;
  }
  return found;
}

function readSequence(text: string, start: number): Sequence | undefined {
  const lead = text.charCodeAt(start);
  const continuations = lead < 0xe0 ? 1 : lead < 0xf0 ? 2 : 3;
  if (start + continuations >= text.length) return undefined;
  let codePoint = lead & (0x3f >> continuations);
  let suspicious = SUSPICIOUS_LEADS.has(lead);
  for (let k = 1; k <= continuations; k++) {
    const char = text.charCodeAt(start + k);
    const byte = HIGH_BYTE_OF.get(char);
    if (byte === undefined || byte > 0xbf) return undefined;
    if (SUSPICIOUS_CONTINUATIONS.has(char)) suspicious = true;
    codePoint = (codePoint << 6) | (byte & 0x3f);
  }
  const minimum = [0, 0x80, 0x800, 0x10000][continuations];
  const wellFormed = codePoint >= minimum && codePoint <= 0x10ffff && (codePoint < 0xd800 || codePoint > 0xdfff);
  return wellFormed ? { start, length: continuations + 1, codePoint, suspicious } : undefined;
}

/** True when the sequences cover every non-ASCII character, so the text is wholly one misread UTF-8 string. */
function isWholeTextMisread(text: string, sequences: Sequence[]): boolean {
  let covered = 0;
  for (const s of sequences) covered += s.length;
  let nonAscii = 0;
  for (let i = 0; i < text.length; i++) if (text.charCodeAt(i) > 0x7f) nonAscii++;
  return covered === nonAscii;
}

function adjacentRuns(sequences: Sequence[]): Sequence[][] {
  const runs: Sequence[][] = [];
  for (const s of sequences) {
    const last = runs.at(-1)?.at(-1);
    if (last !== undefined && last.start + last.length === s.start) runs.at(-1)!.push(s);
    else runs.push([s]);
  }
  return runs;
}
