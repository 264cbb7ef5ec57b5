import { ClipTokenizer } from "../lib/data/tokenizer.ts";

/**
 * Tokenizer throughput on short captions like those of image-text datasets: mostly plain English of 3-15 words,
 * with some capitals, digits, punctuation, HTML references, accented and non-Latin words and emoji, generated
 * deterministically. The timed passes run after a warm-up pass over the same captions (JIT compiled, BPE cache
 * filled, as in a training run that revisits its vocabulary), in batches as a data loader calls it.
 */

const CAPTION_COUNT = 20_000;
const BATCH_SIZE = 256;
const TIMED_PASSES = 5;

const SUBJECTS = (
  "cat|dog|woman|man|child|car|house|mountain|beach|city street|bowl of soup|red bicycle|vintage camera|" +
  "wooden table|sunflower|old lighthouse|birthday cake|laptop|pair of sneakers|coffee mug|golden retriever|" +
  "snowy forest|skyscraper|sailboat|guitar"
).split("|");
const ADJECTIVES = "a|the|a small|a large|an old|a modern|a cute|a blurry|two|three".split("|");
const ACTIONS = "sitting on|standing next to|in front of|lying on|running along|near|under|on top of".split("|");
const PLACES = (
  "the beach|a sofa|the kitchen|a busy street|the park|a white background|the mountains|a rainy window|the desk|" +
  "a market in Tokyo"
).split("|");
/** Endings, one in six empty; the rest bring digits, punctuation, references, accents, CJK, Greek, emoji. */
const EXTRAS = (
  "|||| at sunset| in 4K|, stock photo| - HD wallpaper| (2019)| #travel|!|...| &amp; friends| — close-up| café|" +
  " in Zürich| 東京| 😀| Ελλάδα| résumé style|, 1,000 pcs| for $19.99| I'm loving it| we'll see"
).split("|");

/** Deterministic caption list: a linear congruential generator picks each part. */
export function makeCaptions(count = CAPTION_COUNT): string[] {
  let state = 12345;
  const pick = <T>(list: readonly T[]): T => {
    state = (Math.imul(state, 1103515245) + 12345) >>> 0;
    return list[(state >>> 8) % list.length];
  };
  const captions: string[] = [];
  for (let i = 0; i < count; i++) {
    let caption = `${pick(ADJECTIVES)} ${pick(SUBJECTS)} ${pick(ACTIONS)} ${pick(PLACES)}${pick(EXTRAS)}`;
    if (i % 7 === 0) caption = caption[0].toUpperCase() + caption.slice(1);
    if (i % 11 === 0) caption = caption.toUpperCase();
    captions.push(caption);
  }
  return captions;
}

function tokenizeAll(tokenizer: ClipTokenizer, captions: string[]): number {
  let checksum = 0;
  for (let start = 0; start < captions.length; start += BATCH_SIZE) {
    const rows = tokenizer.tokenize(captions.slice(start, start + BATCH_SIZE));
    checksum += rows[1];
  }
  return checksum;
}

export async function benchTokenizer(): Promise<{ name: "tokenizer"; unit: "captions/s"; value: number }> {
  const tokenizer = await ClipTokenizer.load();
  const captions = makeCaptions();
  tokenizeAll(tokenizer, captions);
  let best = Infinity;
  for (let pass = 0; pass < TIMED_PASSES; pass++) {
    const start = performance.now();
    tokenizeAll(tokenizer, captions);
    best = Math.min(best, performance.now() - start);
  }
  return { name: "tokenizer", unit: "captions/s", value: Math.round(captions.length / (best / 1000)) };
}

if (import.meta.main) {
  const result = await benchTokenizer();
  console.log(`${result.name}: ${result.value} ${result.unit}`);
}
