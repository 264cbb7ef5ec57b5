import assert from "node:assert/strict";
import { ClipTokenizer, DEFAULT_CONTEXT_LENGTH, EOT_TOKEN, SOT_TOKEN } from "../lib/data/tokenizer.ts";
import { cleanText, fixText } from "../lib/data/text_fix.ts";
import { unescapeHtml, unescapeHtmlStrict } from "../lib/data/html_entities.ts";
import { tokenizeCommand } from "../lib/commands/tokenize.ts";
import { ClipError, UsageError } from "../lib/errors.ts";

/** Reference cases made with open_clip v2.32.0 (ftfy 6.3.1); see the fixture's `source` field. */
interface ReferenceCase {
  text: string;
  ids: number[];
  bpe_ids_untruncated: number[];
  length_untruncated: number;
  truncated: boolean;
  decoded: string;
  cleaned_text: string;
  ftfy_changes_text: boolean;
}
const reference: { sot: number; eot: number; context_length: number; cases: ReferenceCase[] } = JSON.parse(
  await Deno.readTextFile(new URL("./fixtures/tokenizer/tokenizer_cases.json", import.meta.url)),
);
const cases = reference.cases;
const tokenizer = await ClipTokenizer.load();

/** A row as open_clip builds it from untruncated ids: SOT, ids (cut to context - 2 if too long), EOT, zeros. */
function expectedRow(bpeIds: number[], context: number): number[] {
  const kept = bpeIds.slice(0, context - 2);
  const row = [SOT_TOKEN, ...kept, EOT_TOKEN];
  return [...row, ...new Array(context - row.length).fill(0)];
}

Deno.test("the reference fixture is the one expected", () => {
  assert.equal(cases.length, 40);
  assert.equal(reference.sot, SOT_TOKEN);
  assert.equal(reference.eot, EOT_TOKEN);
  assert.equal(reference.context_length, DEFAULT_CONTEXT_LENGTH);
  assert.equal(tokenizer.vocabSize, 49408);
});

Deno.test("tokenize gives open_clip's ids for every reference case", () => {
  const rows = tokenizer.tokenize(cases.map((c) => c.text));
  assert.equal(rows.length, cases.length * 77);
  cases.forEach((c, i) => {
    assert.deepEqual(Array.from(rows.subarray(i * 77, (i + 1) * 77)), c.ids, `case ${i}: ${JSON.stringify(c.text)}`);
  });
});

Deno.test("encode gives the untruncated BPE ids of every reference case", () => {
  for (const c of cases) {
    const ids = tokenizer.encode(c.text);
    assert.deepEqual(ids, c.bpe_ids_untruncated, JSON.stringify(c.text));
    assert.equal(ids.length + 2, c.length_untruncated);
  }
});

Deno.test("cleanText matches open_clip's cleaning, including the ftfy repairs", () => {
  for (const c of cases) assert.equal(cleanText(c.text), c.cleaned_text, JSON.stringify(c.text));
  // The fixture must exercise the repairs (fullwidth, curly quotes, mojibake, double escaping).
  assert.ok(cases.filter((c) => c.ftfy_changes_text).length >= 4);
});

Deno.test("a text over the context keeps SOT and the first context-2 ids and ends with EOT", () => {
  const long = cases.filter((c) => c.truncated);
  assert.ok(long.length >= 1);
  for (const c of long) {
    assert.ok(c.bpe_ids_untruncated.length > 75);
    const row = Array.from(tokenizer.tokenize([c.text]));
    assert.equal(row[0], SOT_TOKEN);
    assert.deepEqual(row.slice(1, 76), c.bpe_ids_untruncated.slice(0, 75));
    assert.equal(row[76], EOT_TOKEN);
    assert.deepEqual(row, c.ids);
  }
});

Deno.test("a custom context length of 32 pads or truncates every case the same way", () => {
  const rows = tokenizer.tokenize(cases.map((c) => c.text), 32);
  assert.equal(rows.length, cases.length * 32);
  let truncated = 0;
  cases.forEach((c, i) => {
    const row = Array.from(rows.subarray(i * 32, (i + 1) * 32));
    assert.deepEqual(row, expectedRow(c.bpe_ids_untruncated, 32), JSON.stringify(c.text));
    if (c.bpe_ids_untruncated.length > 30) {
      truncated++;
      assert.equal(row[31], EOT_TOKEN);
    }
  });
  assert.ok(truncated >= 1);
  assert.throws(() => tokenizer.tokenize(["x"], 1), RangeError);
});

Deno.test("decode matches open_clip's decode and round-trips the cleaned text", () => {
  for (const c of cases) {
    assert.equal(tokenizer.decode(c.bpe_ids_untruncated), c.decoded, JSON.stringify(c.text));
    // Decoding puts a space after every word piece, so compare without spaces.
    const roundTrip = tokenizer.decode(tokenizer.encode(c.text));
    assert.equal(roundTrip.replaceAll(" ", ""), c.cleaned_text.replaceAll(" ", ""), JSON.stringify(c.text));
  }
  assert.equal(tokenizer.decode(tokenizer.encode("A Photo of a CAT")), "a photo of a cat ");
  // Ids cut inside a multi-byte character decode to U+FFFD, like Python's errors="replace".
  const rune = tokenizer.encode("ᚠ"); // three bytes, no merge joins them all
  assert.equal(rune.length, 3);
  assert.equal(tokenizer.decode(rune), "ᚠ ");
  assert.equal(tokenizer.decode(rune.slice(0, 2)), "\ufffd");
  assert.throws(() => tokenizer.decode([49408]), RangeError);
});

Deno.test("open_clip's special-token literals map to SOT and EOT inside text", () => {
  const hi = tokenizer.encode("hi");
  assert.equal(hi.length, 1);
  assert.deepEqual(tokenizer.encode("<start_of_text>hi<end_of_text>"), [SOT_TOKEN, ...hi, EOT_TOKEN]);
  // Lower-casing comes first, so the upper-case spelling is special too.
  assert.deepEqual(tokenizer.encode("<START_OF_TEXT>"), [SOT_TOKEN]);
});

Deno.test("unescapeHtml follows Python's html.unescape", () => {
  const expected: [string, string][] = [
    ["&amp;amp;", "&amp;"],
    ["&eacute", "é"],
    ["&notit;", "¬it;"],
    ["&ampx", "&x"],
    ["&lt", "<"],
    ["&AMP;", "&"],
    ["&#65", "A"],
    ["&#x41;", "A"],
    ["&#128;", "€"],
    ["&#0;", "\ufffd"],
    ["&#xD800;", "\ufffd"],
    ["&#1114112;", "\ufffd"],
    ["&#11;", ""],
    ["&#13;", "\r"],
    ["&bogus;", "&bogus;"],
    ["&hellip; &mdash; &rsquo;", "… — ’"],
  ];
  for (const [input, output] of expected) assert.equal(unescapeHtml(input), output, input);
});

Deno.test("unescapeHtmlStrict decodes only unambiguous references, as ftfy does", () => {
  const expected: [string, string][] = [
    ["&EACUTE;", "É"],
    ["&SZLIG;", "SS"],
    ["&nTILDE;", "&nTILDE;"],
    ["&eacute", "&eacute"],
    ["&#12ab;", "&#12ab;"],
    ["&amp;amp;", "&amp;"],
    ["&#x2019;", "’"],
    ["this&not that", "this&not that"],
  ];
  for (const [input, output] of expected) assert.equal(unescapeHtmlStrict(input), output, input);
});

Deno.test("fixText repairs what ftfy 6.3.1 repairs and leaves real text alone", () => {
  // Expected values are ftfy.fix_text's output for the same inputs.
  const expected: [string, string][] = [
    ["itâ€™s", "it's"],
    ["ÃƒÂ©", "é"],
    ["Ð¿Ñ€Ð¸Ð²ÐµÑ‚", "привет"],
    ["ðŸ˜€", "😀"],
    ["café 😀 cafÃ©", "café 😀 café"],
    ["Straß“", 'Straß"'],
    ["NESCAFÉ®", "NESCAFÉ®"],
    ["naïve résumé", "naïve résumé"],
    ["ﬁsh", "fish"],
    ["ｶﾞ", "ガ"],
    ["ＡＢＣ１２３", "ABC123"],
    ["a\r\nb", "a\nb"],
    ["\x1b[31mred\x1b[0m", "red"],
    ["\ufeffbom", "bom"],
    ["x\x85y", "x…y"],
    ["&amp;amp;amp;", "&"],
    ["&lt;b&gt; <i>", "&lt;b&gt; <i>"],
    ["e\u0301", "é"],
  ];
  for (const [input, output] of expected) assert.equal(fixText(input), output, JSON.stringify(input));
});

Deno.test("cleanText collapses Python whitespace but keeps what Python does not call whitespace", () => {
  assert.equal(cleanText("  a\u00a0\u3000b\x1c\tc\u2028 "), "a b c");
  assert.equal(cleanText("a\u200bb"), "a\u200bb");
  // With "<" in the text the fixer leaves references alone; html.unescape then makes U+FEFF, which Python's
  // strip() keeps (JavaScript's trim() would not). Without "<", the fixer decodes it first and drops it.
  assert.equal(cleanText("&#65279;x <"), "\ufeffx <");
  assert.equal(cleanText("&#65279;x"), "x");
});

Deno.test("load from an explicit path gives the same tokenizer as the shipped default", async () => {
  const path = decodeURIComponent(new URL("../data/bpe_simple_vocab_16e6.txt.gz", import.meta.url).pathname);
  const fromPath = await ClipTokenizer.load(path);
  assert.notEqual(fromPath, tokenizer);
  assert.equal(await ClipTokenizer.load(), tokenizer);
  const texts = cases.map((c) => c.text);
  assert.deepEqual(fromPath.tokenize(texts), tokenizer.tokenize(texts));
});

Deno.test("load reports a missing or unreadable vocabulary by name", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const missing = `${dir}/nope.txt.gz`;
    await assert.rejects(
      ClipTokenizer.load(missing),
      (e: Error) => e instanceof ClipError && e.message.includes(missing),
    );
    const notGzip = `${dir}/plain.txt.gz`;
    await Deno.writeTextFile(notGzip, "not gzip at all");
    await assert.rejects(
      ClipTokenizer.load(notGzip),
      (e: Error) => e instanceof ClipError && e.message.includes(notGzip),
    );
    const truncated = `${dir}/short.txt.gz`;
    const gzipped = new Blob(["#version: 0.2\ni n\nt h\n"]).stream().pipeThrough(new CompressionStream("gzip"));
    await Deno.writeFile(truncated, gzipped);
    await assert.rejects(
      ClipTokenizer.load(truncated),
      (e: Error) => e instanceof ClipError && e.message.includes(truncated) && e.message.includes("2 merges"),
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

/** Runs the command with console.log captured; returns the exit code and everything printed. */
async function runTokenize(argv: string[]): Promise<{ code: number; out: string }> {
  const printed: string[] = [];
  const original = console.log;
  console.log = (...args: unknown[]) => printed.push(args.map(String).join(" "));
  try {
    const code = await tokenizeCommand.run(argv);
    return { code, out: printed.join("\n") };
  } finally {
    console.log = original;
  }
}

Deno.test("clip tokenize prints each text's ids up to EOT", async () => {
  const picked = [cases[2], cases[18], cases[36]];
  const { code, out } = await runTokenize(picked.map((c) => c.text));
  assert.equal(code, 0);
  const lines = out.split("\n");
  assert.equal(lines.length, picked.length);
  picked.forEach((c, i) => {
    const untilEot = c.ids.slice(0, c.ids.indexOf(EOT_TOKEN) + 1);
    assert.deepEqual(lines[i].split(" ").map(Number), untilEot);
  });
});

Deno.test("clip tokenize --json --context prints padded rows", async () => {
  const long = cases.find((c) => c.truncated)!;
  const { code, out } = await runTokenize(["--json", "--context", "16", "a photo of a cat", long.text]);
  assert.equal(code, 0);
  const rows: number[][] = JSON.parse(out);
  assert.deepEqual(rows, [
    expectedRow(tokenizer.encode("a photo of a cat"), 16),
    expectedRow(long.bpe_ids_untruncated, 16),
  ]);
  assert.equal(rows[1][15], EOT_TOKEN);
});

Deno.test("clip tokenize --file reads one text per line", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const file = `${dir}/captions.txt`;
    const picked = cases.slice(2, 12).filter((c) => !/[\r\n]/.test(c.text));
    await Deno.writeTextFile(file, picked.map((c) => c.text).join("\r\n") + "\n");
    const { code, out } = await runTokenize(["--json", "--file", file]);
    assert.equal(code, 0);
    assert.deepEqual(JSON.parse(out), picked.map((c) => c.ids));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip tokenize reports usage errors and missing files", async () => {
  await assert.rejects(runTokenize([]), UsageError);
  await assert.rejects(runTokenize(["--context", "1", "x"]), UsageError);
  await assert.rejects(runTokenize(["--context", "abc", "x"]), UsageError);
  await assert.rejects(runTokenize(["--file", "a.txt", "x"]), UsageError);
  await assert.rejects(runTokenize(["--bogus", "x"]), UsageError);
  await assert.rejects(
    runTokenize(["--file", "/nonexistent/captions.txt"]),
    (e: Error) => e instanceof ClipError && e.message.includes("/nonexistent/captions.txt"),
  );
  const { code, out } = await runTokenize(["--help"]);
  assert.equal(code, 0);
  assert.match(out, /usage: clip tokenize/);
});
