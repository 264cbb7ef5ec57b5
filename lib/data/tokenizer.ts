import { ClipError } from "../errors.ts";
import { cleanText } from "./text_fix.ts";

/**
 * CLIP's byte-level BPE tokenizer, giving the same ids as open_clip's SimpleTokenizer: the text is cleaned, split
 * into words, numbers and punctuation runs, each piece's UTF-8 bytes are merged by the 48,894 ranked merges of
 * `bpe_simple_vocab_16e6.txt.gz`, and the last symbol of every piece carries an end-of-word marker.
 *
 * Vocabulary (49,408 ids): 0-255 the bytes (as printable stand-in characters), 256-511 the same with "</w>",
 * 512-49405 the merges in rank order, 49406 `<start_of_text>`, 49407 `<end_of_text>`.
 */

export const SOT_TOKEN = 49406;
export const EOT_TOKEN = 49407;
export const PAD_TOKEN = 0;
export const DEFAULT_CONTEXT_LENGTH = 77;

/** Ranked merges used, as in open_clip: the vocabulary's 49,152 entries less 256 bytes, 2 specials and 1. */
const MERGE_COUNT = 49152 - 256 - 2;
const VOCAB_SIZE = 512 + MERGE_COUNT + 2;

export const DEFAULT_VOCAB_URL = new URL("../../data/bpe_simple_vocab_16e6.txt.gz", import.meta.url);

/**
 * The printable character that stands for each byte in the vocabulary file: printable Latin-1 bytes stand for
 * themselves and the rest (controls, space, soft hyphen) are moved to U+0100 upwards, so no vocabulary entry
 * contains whitespace. The order of this list is the order of ids 0-255.
 */
function byteStandIns(): { bytes: number[]; chars: string[] } {
  const isPrintable = (b: number) => (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
  const bytes: number[] = [];
  for (let b = 0; b < 256; b++) if (isPrintable(b)) bytes.push(b);
  const chars = bytes.map((b) => String.fromCharCode(b));
  let shifted = 0;
  for (let b = 0; b < 256; b++) {
    if (isPrintable(b)) continue;
    bytes.push(b);
    chars.push(String.fromCharCode(256 + shifted++));
  }
  return { bytes, chars };
}

/**
 * What the text is split into before BPE, in open_clip's order of preference: the special tokens, English
 * contractions, letter runs, single digits, and runs of anything else that is not a space (after cleaning the
 * only whitespace left is the single space). Case-insensitive like the original.
 */
const PIECE_RE = /<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^ \p{L}\p{N}]+/giu;

/** Pieces seen before, with their ids; cleared when it reaches this size so memory stays bounded. */
const MAX_CACHED_PIECES = 200_000;
/** Longer pieces are not cached: real words are far shorter, and each entry's memory must stay small. */
const MAX_CACHED_PIECE_LENGTH = 256;

/** The shipped vocabulary, loaded at most once per process. */
let defaultLoad: Promise<ClipTokenizer> | undefined;

/**
 * Rank of each mergeable symbol pair: open addressing over typed arrays, because a Map keyed by a * 65536 + b
 * (beyond small-integer range) is several times slower, and this lookup is the inner loop of BPE.
 */
class PairRanks {
  private static readonly BITS = 17; // 131,072 slots for 48,894 pairs: short probe chains
  private readonly keys = new Int32Array(1 << PairRanks.BITS).fill(-1);
  private readonly ranks = new Int32Array(1 << PairRanks.BITS);

  private slot(key: number): number {
    return Math.imul(key, 0x9e3779b1) >>> (32 - PairRanks.BITS);
  }

  /** Later duplicates win, as when Python builds its dict of ranks. */
  set(a: number, b: number, rank: number): void {
    const key = (a << 16) | b;
    const mask = this.keys.length - 1;
    let i = this.slot(key);
    while (this.keys[i] !== -1 && this.keys[i] !== key) i = (i + 1) & mask;
    this.keys[i] = key;
    this.ranks[i] = rank;
  }

  /** The pair's rank, or -1 if the pair never merges. */
  get(a: number, b: number): number {
    const key = (a << 16) | b;
    const mask = this.keys.length - 1;
    for (let i = this.slot(key);; i = (i + 1) & mask) {
      const k = this.keys[i];
      if (k === key) return this.ranks[i];
      if (k === -1) return -1;
    }
  }
}

export class ClipTokenizer {
  readonly vocabSize = VOCAB_SIZE;
  readonly sotToken = SOT_TOKEN;
  readonly eotToken = EOT_TOKEN;

  /** Id of byte b alone (`byteId[b]`) and as the last symbol of a piece (`byteId[b] + 256`). */
  private readonly byteId = new Int32Array(256);
  private readonly pairRanks = new PairRanks();
  /** Id of the symbol each merge rank produces. */
  private readonly mergeResult = new Int32Array(MERGE_COUNT);
  /** The bytes id i stands for ("</w>" included) are `idBytes[byteStart[i] .. byteStart[i + 1]]`. */
  private readonly idBytes: Uint8Array;
  private readonly byteStart: Int32Array;
  private readonly pieceCache = new Map<string, readonly number[]>();
  /** Working memory of bpe(), reused across pieces and grown for the longest seen. */
  private scratch = bpeScratch(64);
  private readonly utf8 = new TextEncoder();

  private constructor(mergesText: string) {
    const lines = firstLines(mergesText, MERGE_COUNT + 1);
    if (lines.length < MERGE_COUNT + 1) {
      const found = lines.slice(1).filter((line) => line.trim() !== "").length;
      throw new ClipError(
        `BPE vocabulary has ${found} merges, expected at least ${MERGE_COUNT}: the file is truncated or is not bpe_simple_vocab_16e6.txt.gz.`,
      );
    }
    const { bytes, chars } = byteStandIns();
    bytes.forEach((b, id) => this.byteId[b] = id);

    // The vocabulary as strings, only to resolve the merge lines; later duplicates win, as in Python's dict.
    const idOf = new Map<string, number>();
    chars.forEach((c, id) => {
      idOf.set(c, id);
      idOf.set(c + "</w>", id + 256);
    });
    const parts = new Int32Array(2 * MERGE_COUNT);
    const merged: string[] = [];
    for (let rank = 0; rank < MERGE_COUNT; rank++) {
      const line = lines[rank + 1].trimEnd();
      const space = line.indexOf(" ");
      const first = line.slice(0, space), second = line.slice(space + 1);
      const a = idOf.get(first), b = idOf.get(second);
      if (space <= 0 || a === undefined || b === undefined) {
        throw new ClipError(
          `BPE vocabulary line ${
            rank + 2
          } ('${line}') is not two known symbols separated by a space: the file is not a CLIP vocabulary.`,
        );
      }
      this.pairRanks.set(a, b, rank);
      parts[2 * rank] = a;
      parts[2 * rank + 1] = b;
      merged.push(first + second);
      idOf.set(first + second, 512 + rank);
    }
    merged.forEach((token, rank) => this.mergeResult[rank] = idOf.get(token)!);

    // A merged symbol's bytes are its two parts' bytes: "</w>" is written with the stand-ins of its own ASCII
    // bytes, so the marker needs no special case. One flat buffer, as 49,408 small arrays take long to allocate.
    const specials = ["<start_of_text>", "<end_of_text>"].map((t) => this.utf8.encode(t));
    const lengths = new Int32Array(VOCAB_SIZE);
    lengths.fill(1, 0, 256);
    lengths.fill(5, 256, 512);
    for (let rank = 0; rank < MERGE_COUNT; rank++) {
      lengths[512 + rank] = lengths[parts[2 * rank]] + lengths[parts[2 * rank + 1]];
    }
    lengths[VOCAB_SIZE - 2] = specials[0].length;
    lengths[VOCAB_SIZE - 1] = specials[1].length;
    this.byteStart = new Int32Array(VOCAB_SIZE + 1);
    for (let id = 0; id < VOCAB_SIZE; id++) this.byteStart[id + 1] = this.byteStart[id] + lengths[id];
    const all = new Uint8Array(this.byteStart[VOCAB_SIZE]);
    const endOfWord = this.utf8.encode("</w>");
    bytes.forEach((b, id) => {
      all[this.byteStart[id]] = b;
      all[this.byteStart[id + 256]] = b;
      all.set(endOfWord, this.byteStart[id + 256] + 1);
    });
    for (let rank = 0; rank < MERGE_COUNT; rank++) {
      const a = parts[2 * rank], b = parts[2 * rank + 1], at = this.byteStart[512 + rank];
      all.copyWithin(at, this.byteStart[a], this.byteStart[a + 1]);
      all.copyWithin(at + lengths[a], this.byteStart[b], this.byteStart[b + 1]);
    }
    all.set(specials[0], this.byteStart[VOCAB_SIZE - 2]);
    all.set(specials[1], this.byteStart[VOCAB_SIZE - 1]);
    this.idBytes = all;
  }

  /** Builds a tokenizer from the text of the vocabulary file (header line, then one merge per line). */
  static fromMerges(mergesText: string): ClipTokenizer {
    return new ClipTokenizer(mergesText);
  }

  /**
   * Loads the gzipped vocabulary at `vocabPath` (a path or URL), or the one shipped with clip. The shipped one is
   * loaded once per process and shared.
   */
  static load(vocabPath?: string | URL): Promise<ClipTokenizer> {
    if (vocabPath !== undefined) return loadFrom(vocabPath);
    defaultLoad ??= loadFrom(DEFAULT_VOCAB_URL).catch((e) => {
      defaultLoad = undefined; // let a later call try again rather than repeat a stale failure
      throw e;
    });
    return defaultLoad;
  }

  /**
   * BPE ids of `text` after cleaning, without start and end tokens. With `maxIds`, encoding stops at the first piece
   * that reaches that many ids: each piece is encoded on its own, so the first `maxIds` ids are the same as the full
   * encoding's, and a megabyte caption costs no more BPE than its first words.
   */
  encode(text: string, maxIds = Infinity): number[] {
    const cleaned = cleanText(text);
    const ids: number[] = [];
    PIECE_RE.lastIndex = 0;
    for (let match = PIECE_RE.exec(cleaned); match !== null && ids.length < maxIds; match = PIECE_RE.exec(cleaned)) {
      const pieceIds = this.pieceIds(match[0]);
      for (let i = 0; i < pieceIds.length; i++) ids.push(pieceIds[i]);
    }
    return ids;
  }

  /**
   * Token rows for a batch, row-major [texts.length, contextLength]: start token, ids, end token, zero padding. A
   * text too long keeps its first contextLength - 2 ids and still ends with the end token, where CLIP reads the
   * text feature.
   */
  tokenize(texts: readonly string[], contextLength = DEFAULT_CONTEXT_LENGTH): Int32Array {
    if (!Number.isInteger(contextLength) || contextLength < 2) {
      throw new RangeError(
        `contextLength must be an integer >= 2 (room for the start and end tokens), got ${contextLength}.`,
      );
    }
    const out = new Int32Array(texts.length * contextLength);
    texts.forEach((text, row) => {
      const ids = this.encode(text, contextLength - 2);
      const kept = Math.min(ids.length, contextLength - 2);
      const base = row * contextLength;
      out[base] = SOT_TOKEN;
      for (let i = 0; i < kept; i++) out[base + 1 + i] = ids[i];
      out[base + 1 + kept] = EOT_TOKEN;
    });
    return out;
  }

  /**
   * Text of `ids`: each end-of-word marker becomes a space, so a decoded caption ends with one. Byte sequences that
   * are not valid UTF-8 (an id list cut inside a character) decode to U+FFFD.
   */
  decode(ids: Iterable<number>): string {
    const parts: Uint8Array[] = [];
    let length = 0;
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= VOCAB_SIZE) {
        throw new RangeError(`token id ${id} is outside the vocabulary (0-${VOCAB_SIZE - 1}).`);
      }
      const bytes = this.idBytes.subarray(this.byteStart[id], this.byteStart[id + 1]);
      parts.push(bytes);
      length += bytes.length;
    }
    const all = new Uint8Array(length);
    let at = 0;
    for (const part of parts) {
      all.set(part, at);
      at += part.length;
    }
    return new TextDecoder().decode(all).replaceAll("</w>", " ");
  }

  private pieceIds(piece: string): readonly number[] {
    const cached = this.pieceCache.get(piece);
    if (cached !== undefined) return cached;
    let ids: readonly number[];
    if (piece === "<start_of_text>") ids = [SOT_TOKEN];
    else if (piece === "<end_of_text>") ids = [EOT_TOKEN];
    else ids = this.bpe(this.utf8.encode(piece));
    if (piece.length > MAX_CACHED_PIECE_LENGTH) return ids; // a hostile caption's giant piece would pin its memory
    if (this.pieceCache.size >= MAX_CACHED_PIECES) this.pieceCache.clear();
    this.pieceCache.set(piece, ids);
    return ids;
  }

  /**
   * Merges the lowest-ranked adjacent pair, every occurrence left to right, until no pair has a rank: the standard
   * BPE loop, on ids instead of strings. The symbols form a linked list and candidate pairs wait in a heap ordered by
   * (rank, position), so a piece of n bytes takes O(n log n) instead of the textbook loop's O(n^2) (a 100 kB word
   * took 15 s). The order is the textbook one: a merge never creates another pair of its own rank (the merged symbol
   * differs from both parts), so popping by rank and then position merges every occurrence left to right, and an
   * entry whose symbols changed since it was pushed is stale and dropped.
   */
  private bpe(bytes: Uint8Array): number[] {
    const n = bytes.length;
    if (this.scratch.symbol.length < n) this.scratch = bpeScratch(n);
    const { symbol, next, prev, heap } = this.scratch;
    heap.clear();
    for (let i = 0; i < n; i++) {
      symbol[i] = this.byteId[bytes[i]];
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    symbol[n - 1] += 256;
    const offer = (i: number) => {
      const j = next[i];
      if (j < 0) return;
      const rank = this.pairRanks.get(symbol[i], symbol[j]);
      if (rank >= 0) heap.push(rank, i);
    };
    for (let i = 0; i + 1 < n; i++) offer(i);
    while (heap.size > 0) {
      const rank = heap.topRank(), i = heap.topPosition();
      heap.pop();
      const j = next[i];
      // Stale: the left symbol was absorbed (prev[i] === -2) or either symbol changed since the entry was pushed.
      if (prev[i] === -2 || j < 0 || this.pairRanks.get(symbol[i], symbol[j]) !== rank) continue;
      symbol[i] = this.mergeResult[rank];
      next[i] = next[j];
      if (next[j] >= 0) prev[next[j]] = i;
      prev[j] = -2;
      if (prev[i] >= 0) offer(prev[i]);
      offer(i);
    }
    const word: number[] = [];
    for (let i = 0; i >= 0; i = next[i]) word.push(symbol[i]);
    return word;
  }
}

function bpeScratch(n: number) {
  return { symbol: new Int32Array(n), next: new Int32Array(n), prev: new Int32Array(n), heap: new PairHeap(n) };
}

/** A binary min-heap of (rank, position) pairs, compared by rank and then position. */
class PairHeap {
  private ranks: Int32Array;
  private positions: Int32Array;
  size = 0;

  constructor(capacity: number) {
    this.ranks = new Int32Array(Math.max(16, capacity));
    this.positions = new Int32Array(Math.max(16, capacity));
  }

  clear(): void {
    this.size = 0;
  }

  topRank(): number {
    return this.ranks[0];
  }

  topPosition(): number {
    return this.positions[0];
  }

  private less(a: number, b: number): boolean {
    return this.ranks[a] < this.ranks[b] || (this.ranks[a] === this.ranks[b] && this.positions[a] < this.positions[b]);
  }

  private swap(a: number, b: number): void {
    const r = this.ranks[a], p = this.positions[a];
    this.ranks[a] = this.ranks[b];
    this.positions[a] = this.positions[b];
    this.ranks[b] = r;
    this.positions[b] = p;
  }

  push(rank: number, position: number): void {
    if (this.size === this.ranks.length) {
      const ranks = new Int32Array(this.size * 2), positions = new Int32Array(this.size * 2);
      ranks.set(this.ranks);
      positions.set(this.positions);
      this.ranks = ranks;
      this.positions = positions;
    }
    let i = this.size++;
    this.ranks[i] = rank;
    this.positions[i] = position;
    while (i > 0) {
      const parent = (i - 1) >> 1;
      if (!this.less(i, parent)) break;
      this.swap(i, parent);
      i = parent;
    }
  }

  pop(): void {
    this.size--;
    if (this.size === 0) return;
    this.ranks[0] = this.ranks[this.size];
    this.positions[0] = this.positions[this.size];
    let i = 0;
    for (;;) {
      const left = 2 * i + 1, right = left + 1;
      let smallest = i;
      if (left < this.size && this.less(left, smallest)) smallest = left;
      if (right < this.size && this.less(right, smallest)) smallest = right;
      if (smallest === i) return;
      this.swap(i, smallest);
      i = smallest;
    }
  }
}

/** The first `count` lines of `text` (fewer if it has fewer), without splitting the rest of a large file. */
function firstLines(text: string, count: number): string[] {
  const lines: string[] = [];
  let start = 0;
  while (lines.length < count && start <= text.length) {
    const newline = text.indexOf("\n", start);
    const end = newline < 0 ? text.length : newline;
    lines.push(text.slice(start, end));
    if (newline < 0) break;
    start = newline + 1;
  }
  return lines;
}

/**
 * Decodes the decompressed vocabulary only as far as the merges used: the file holds 262,145 lines and the
 * tokenizer needs the first 48,895, so stopping early saves most of the decompression.
 */
async function readMergeLines(stream: ReadableStream<Uint8Array>): Promise<string> {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  const chunks: string[] = [];
  let newlines = 0;
  while (newlines <= MERGE_COUNT) {
    const { done, value } = await reader.read();
    if (done) return chunks.join("");
    chunks.push(value);
    for (let i = value.indexOf("\n"); i >= 0; i = value.indexOf("\n", i + 1)) newlines++;
  }
  await reader.cancel();
  return chunks.join("");
}

async function loadFrom(vocabPath: string | URL): Promise<ClipTokenizer> {
  const shown = vocabPath instanceof URL && vocabPath.protocol === "file:"
    ? decodeURIComponent(vocabPath.pathname)
    : String(vocabPath);
  let file: Deno.FsFile;
  try {
    file = await Deno.open(vocabPath);
  } catch (e) {
    throw new ClipError(
      `cannot read the BPE vocabulary '${shown}': ${
        (e as Error).message
      }. Pass the path of bpe_simple_vocab_16e6.txt.gz.`,
    );
  }
  let text: string;
  try {
    text = await readMergeLines(file.readable.pipeThrough(new DecompressionStream("gzip")));
  } catch (e) {
    throw new ClipError(`BPE vocabulary '${shown}' is not a readable gzip file: ${(e as Error).message}.`);
  }
  try {
    return ClipTokenizer.fromMerges(text);
  } catch (e) {
    if (e instanceof ClipError) throw new ClipError(`'${shown}': ${e.message}`);
    throw e;
  }
}
