/**
 * Fuzz target: the CLIP tokenizer. Inputs are random code points from every plane (unassigned ones included), lone
 * surrogates, control, format and bidi characters, HTML entities (valid, huge and NUL), mojibake, open_clip's
 * special-token literals, and now and then a 1 MB string of one of these. Nothing may be refused: every text gives a
 * row that starts with SOT, holds one EOT, is zero-padded and has only ids of the vocabulary.
 */
import type { Rng } from "../data/rng.ts";
import { ClipTokenizer, EOT_TOKEN, SOT_TOKEN } from "../data/tokenizer.ts";
import { type Accepted, type FuzzInput, type FuzzTarget, InvariantError } from "./fuzz_target.ts";
import { codePointFrom, pick, textOfLength } from "./mutate.ts";

const CONTEXT = 77;

const PLANES: [number, number][] = [
  [0x20, 0x7e],
  [0xa0, 0x24f],
  [0x370, 0x3ff],
  [0x600, 0x6ff],
  [0x900, 0x97f],
  [
    0x3040,
    0x30ff,
  ],
  [0x4e00, 0x9fff],
  [0xac00, 0xd7a3],
  [0xe000, 0xf8ff],
  [0xfff0, 0xffff],
  [0x1f300, 0x1faff],
  [0x10000, 0x10ffff],
];
const SURROGATES: [number, number][] = [[0xd800, 0xdfff]];
const CONTROLS: [number, number][] = [[0, 0x1f], [0x7f, 0x9f], [0x200b, 0x200f], [0x202a, 0x202e], [0x2060, 0x206f], [
  0xfeff,
  0xfeff,
]];
const ENTITIES = ["&amp;", "&lt;", "&#x1F600;", "&#99999999;", "&#0;", "&#xD800;", "&nbsp;", "&amp;amp;", "&", "&#"];
const LITERALS = ["<start_of_text>", "<end_of_text>", "<|endoftext|>", "</w>", " ", "'s", "'LL"];
const MOJIBAKE = ["Ã©", "â€™", "Ã¼ber", "Ð¿Ñ€Ð¸", "ðŸ˜€", "Â "];

type Generator = (rng: Rng) => string;

const CLASSES: Record<string, Generator> = {
  unicode: (rng) => codePointFrom(rng, PLANES),
  surrogates: (rng) => codePointFrom(rng, SURROGATES) + (rng.int(3) === 0 ? "a" : ""),
  controls: (rng) => codePointFrom(rng, CONTROLS) + (rng.int(2) === 0 ? "x" : ""),
  entities: (rng) => pick(rng, ENTITIES) + (rng.int(2) === 0 ? " " : ""),
  literals: (rng) => pick(rng, LITERALS),
  mojibake: (rng) => pick(rng, MOJIBAKE),
  mixed: (rng) => CLASSES[pick(rng, ["unicode", "surrogates", "controls", "entities", "literals", "mojibake"])](rng),
};

function generate(_state: ClipTokenizer, rng: Rng): FuzzInput<string> {
  const name = pick(rng, Object.keys(CLASSES));
  const huge = rng.int(25) === 0;
  const length = huge ? 1_000_000 : rng.int(300);
  const text = textOfLength(length, () => CLASSES[name](rng));
  return { kind: huge ? `1MB:${name}` : name, value: text, bytes: 2 * text.length };
}

function run(tokenizer: ClipTokenizer, text: string): Promise<Accepted> {
  const row = tokenizer.tokenize([text], CONTEXT);
  // The row is SOT, the first ids of the text (an <end_of_text> literal in the text is an EOT id too), EOT, zeros.
  const ids = tokenizer.encode(text, CONTEXT - 2);
  const kept = Math.min(ids.length, CONTEXT - 2);
  if (row.length !== CONTEXT || row[0] !== SOT_TOKEN) throw new InvariantError("the row does not start with SOT");
  for (let i = 0; i < kept; i++) {
    const id = row[1 + i];
    if (id !== ids[i]) throw new InvariantError(`id ${id} at ${1 + i} differs from the encoding's ${ids[i]}`);
    if (!Number.isInteger(id) || id < 0 || id >= tokenizer.vocabSize) throw new InvariantError(`id ${id} at ${i}`);
  }
  if (row[1 + kept] !== EOT_TOKEN) throw new InvariantError(`no EOT after the ${kept} ids`);
  if (row.subarray(2 + kept).some((id) => id !== 0)) throw new InvariantError("the padding is not zeros");
  tokenizer.decode(row.subarray(1, 1 + kept));
  return Promise.resolve("accepted");
}

export const tokenizerTarget: FuzzTarget<ClipTokenizer, string> = {
  name: "tokenizer",
  refusals: [],
  prepare: () => ClipTokenizer.load(),
  generate,
  run,
};
