import { ClipError, UsageError } from "../errors.ts";
import { ClipTokenizer, DEFAULT_CONTEXT_LENGTH, EOT_TOKEN } from "../data/tokenizer.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";

const HELP = `usage: clip tokenize [--context N] [--json] (TEXT... | --file FILE)

Prints the CLIP token ids of each text, the ids open_clip's tokenizer gives: the text is cleaned (broken
encodings and HTML references repaired, whitespace collapsed, lower-cased), split into byte-level BPE tokens
and framed by the start token (49406) and the end token (49407). A text longer than the context keeps its first
N-2 tokens and still ends with the end token, where the text encoder reads its feature.

output:
  by default   one line per text: its ids from the start token to the end token, space-separated, no padding
  --json       one JSON array holding, per text, the row of exactly N ids a model receives (padded with 0)

options:
  --context N  context length, at least 2 (default ${DEFAULT_CONTEXT_LENGTH}, what CLIP models use)
  --json       print the padded rows as JSON
  --file FILE  read the texts from FILE, one per line ('-' reads standard input)
  -h, --help   show this help

examples:
  clip tokenize "a photo of a cat"
  clip tokenize --json --context 16 "a dog" "two dogs on a beach"
  clip tokenize --file captions.txt > ids.txt`;

/** Rows tokenized and printed at a time, so that a file of millions of captions never sits in memory as ids. */
const BATCH = 4096;

export const tokenizeCommand: Command = {
  name: "tokenize",
  summary: "Print CLIP token ids for texts.",
  help: HELP,
  async run(argv) {
    const { values, positionals } = parseCommandArgs("tokenize", argv, {
      context: { type: "string" },
      json: { type: "boolean" },
      file: { type: "string" },
    }, true);
    if (values.help) {
      console.log(HELP);
      return 0;
    }
    const context = intFlag("tokenize", "context", values.context, DEFAULT_CONTEXT_LENGTH);
    if (context < 2) {
      throw new UsageError(
        `tokenize: --context must be at least 2 (room for the start and end tokens), got ${context}.`,
      );
    }
    if (values.file !== undefined && positionals.length > 0) {
      throw new UsageError("tokenize: give the texts as arguments or with --file, not both.");
    }
    if (values.file === undefined && positionals.length === 0) {
      throw new UsageError("tokenize: no text given. Pass TEXT arguments or --file FILE; see 'clip tokenize --help'.");
    }
    const texts = values.file === undefined ? positionals : await readLines(values.file);
    const tokenizer = await ClipTokenizer.load();

    if (values.json) console.log("[");
    for (let start = 0; start < texts.length; start += BATCH) {
      const batch = texts.slice(start, start + BATCH);
      const rows = tokenizer.tokenize(batch, context);
      const lines = batch.map((_, i) => {
        const row = rows.subarray(i * context, (i + 1) * context);
        return values.json ? `[${row.join(",")}]` : row.subarray(0, row.indexOf(EOT_TOKEN) + 1).join(" ");
      });
      const last = start + BATCH >= texts.length;
      if (lines.length > 0) console.log(values.json ? lines.join(",\n") + (last ? "" : ",") : lines.join("\n"));
    }
    if (values.json) console.log("]");
    return 0;
  },
};

/** One text per line; a final newline does not start another text, and Windows line ends are accepted. */
async function readLines(path: string): Promise<string[]> {
  let content: string;
  try {
    content = path === "-" ? await new Response(Deno.stdin.readable).text() : await Deno.readTextFile(path);
  } catch (e) {
    const reason = e instanceof Deno.errors.NotFound ? "no such file" : (e as Error).message;
    throw new ClipError(`tokenize: cannot read --file '${path}': ${reason}. Give a text file with one text per line.`);
  }
  if (content === "") return [];
  const lines = content.split(/\r?\n/);
  if (lines.at(-1) === "") lines.pop();
  return lines;
}
