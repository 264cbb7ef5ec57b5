import { UsageError } from "../errors.ts";
import {
  buildEmojiDataset,
  DEFAULT_EMOJI_SHARD_SAMPLES,
  EMOJI_VENDORS,
  type EmojiProgress,
  type EmojiVendor,
} from "../data/emoji.ts";
import { DEFAULT_SHARD_BYTES, DEFAULT_SHARD_SAMPLES, describeSkip, packFrom, type PackProgress } from "../data/pack.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";

const HELP = `usage: clip pack emoji [--vendor google|twitter] --out DIR [--shard-size N] [--force]
       clip pack --from SRC --out DIR [--shard-size N] [--shard-bytes B] [--prefix NAME]
                 [--image-col NAME] [--caption-col NAME] [--force]

Builds WebDataset shards (tar files of samples sharing a key: image, .txt caption, .json) with sizes.json
({shard: samples}) and stats.json beside them.

clip pack emoji
  The built-in emoji dataset: every emoji and skin tone the vendor has drawn (64x64, composited on white),
  captioned from its CLDR name ("an emoji of grinning face"), with its category as .cls (classes.txt) and a
  fixed train/test split (google: 3169 train, 612 test). Shards train-NNNNNN.tar and test-NNNNNN.tar, plus
  classes.txt and the images' licence in LICENSE-images.txt. The npm packages it is built from are downloaded
  on first use. A folder already holding the same complete build is reused.

clip pack --from SRC
  SRC is a folder of images (.jpg, .jpeg, .png, .webp) with same-named .txt captions, taken in name order, or a
  CSV, TSV or JSONL file with an image column (path relative to the file, or an http(s) URL) and a caption
  column. Images are stored as they are. Keys are PREFIX-NNNNNN, numbered by the entry's place in SRC.
  Missing or unreadable images are skipped, counted and listed (all of them in stats.json).

options:
  --out DIR            output folder (created if needed)
  --vendor NAME        emoji images: google (Noto, Apache-2.0) or twitter (Twemoji, CC-BY-4.0); default google
  --shard-size N       samples per shard (default ${DEFAULT_EMOJI_SHARD_SAMPLES} for emoji, ${DEFAULT_SHARD_SAMPLES} for --from)
  --shard-bytes B      --from: largest shard size in bytes, with an optional K, M or G suffix (default 1G)
  --prefix NAME        --from: shard and key prefix (default data)
  --image-col NAME     --from tables: image column (default: image, url, filepath, image_path or path)
  --caption-col NAME   --from tables: caption column (default: caption, text or title)
  --force              emoji: rebuild even if DIR holds this build; --from: replace an earlier pack in DIR
  -h, --help           show this help`;

const PROGRESS_INTERVAL_MS = 2000;

/** Parses `1000`, `64K`, `512M`, `1G` (binary multiples). */
export function parseByteSize(text: string): number {
  const match = /^(\d+)\s*([kmg]i?b?|b)?$/i.exec(text.trim());
  if (!match) {
    throw new UsageError(`pack: --shard-bytes must be a number of bytes such as 500000000, 512M or 1G, got '${text}'.`);
  }
  const unit = (match[2] ?? "b")[0].toLowerCase();
  const scale = unit === "k" ? 1024 : unit === "m" ? 1024 ** 2 : unit === "g" ? 1024 ** 3 : 1;
  const bytes = Number(match[1]) * scale;
  if (bytes < 1) throw new UsageError(`pack: --shard-bytes must be positive, got '${text}'.`);
  return bytes;
}

/** Prints at most one progress line per interval, and always the last one. */
function throttled(print: (line: string) => void): (line: string, last: boolean) => void {
  let next = 0;
  return (line, last) => {
    const now = Date.now();
    if (!last && now < next) return;
    next = now + PROGRESS_INTERVAL_MS;
    print(line);
  };
}

function positiveShardSize(value: string | undefined, fallback: number): number {
  const n = intFlag("pack", "shard-size", value, fallback);
  if (n < 1) throw new UsageError("pack: --shard-size must be at least 1.");
  return n;
}

export const packCommand: Command = {
  name: "pack",
  summary: "Build WebDataset shards from folders, caption lists, or the emoji dataset.",
  help: HELP,
  async run(argv) {
    const { values, positionals } = parseCommandArgs("pack", argv, {
      from: { type: "string" },
      out: { type: "string" },
      vendor: { type: "string" },
      "shard-size": { type: "string" },
      "shard-bytes": { type: "string" },
      prefix: { type: "string" },
      "image-col": { type: "string" },
      "caption-col": { type: "string" },
      force: { type: "boolean" },
    }, true);
    if (values.help) {
      console.log(HELP);
      return 0;
    }
    if (positionals.length > 1 || (positionals.length === 1 && positionals[0] !== "emoji")) {
      throw new UsageError(
        `pack: unexpected argument '${positionals.at(-1)}'; use 'clip pack emoji ...' or 'clip pack --from SRC ...'.`,
      );
    }
    const emoji = positionals[0] === "emoji";
    if (emoji && values.from !== undefined) {
      throw new UsageError("pack: give either 'emoji' or --from SRC, not both.");
    }
    if (!emoji && values.from === undefined) {
      throw new UsageError("pack: say what to pack: 'clip pack emoji --out DIR' or 'clip pack --from SRC --out DIR'.");
    }
    if (values.out === undefined) throw new UsageError("pack: --out DIR is required.");
    const log = (line: string) => console.error(`clip pack: ${line}`);
    const progress = throttled(log);

    if (emoji) {
      for (const flag of ["shard-bytes", "prefix", "image-col", "caption-col"] as const) {
        if (values[flag] !== undefined) throw new UsageError(`pack: --${flag} applies to --from only, not to emoji.`);
      }
      const vendor = (values.vendor ?? "google") as EmojiVendor;
      if (!EMOJI_VENDORS.includes(vendor)) {
        throw new UsageError(`pack: --vendor must be ${EMOJI_VENDORS.join(" or ")}, got '${values.vendor}'.`);
      }
      const onProgress = (p: EmojiProgress) => {
        if (p.stage === "packages") log(`locating the npm packages for ${p.vendor} (downloaded on first use)`);
        else progress(`images ${p.done}/${p.total}`, p.done === p.total);
      };
      const started = performance.now();
      const result = await buildEmojiDataset({
        vendor,
        out: values.out,
        shardSize: positiveShardSize(values["shard-size"], DEFAULT_EMOJI_SHARD_SAMPLES),
        force: values.force,
        onProgress,
      });
      const counts = `${result.counts.train} train and ${result.counts.test} test samples`;
      if (result.reused) {
        console.log(
          `${values.out} already holds the ${vendor} emoji dataset (${counts}): reused; --force rebuilds it.`,
        );
      } else {
        const seconds = ((performance.now() - started) / 1000).toFixed(1);
        console.log(`wrote the ${vendor} emoji dataset to ${values.out}: ${counts} in ${seconds} s.`);
      }
      return 0;
    }

    if (values.vendor !== undefined) throw new UsageError("pack: --vendor applies to 'clip pack emoji' only.");
    const maxBytes = values["shard-bytes"] === undefined ? DEFAULT_SHARD_BYTES : parseByteSize(values["shard-bytes"]);
    const onProgress = (p: PackProgress) =>
      progress(`${p.done}/${p.total} entries (${p.packed} packed, ${p.skipped} skipped)`, p.done === p.total);
    const { sizes, stats } = await packFrom({
      src: values.from!,
      out: values.out,
      prefix: values.prefix,
      maxSamples: positiveShardSize(values["shard-size"], DEFAULT_SHARD_SAMPLES),
      maxBytes,
      imageColumn: values["image-col"],
      captionColumn: values["caption-col"],
      force: values.force,
      onProgress,
    });
    const shown = 20;
    if (stats.skipped > 0) {
      const reasons = Object.entries(stats.skip_reasons).map(([reason, n]) => `${n} ${reason}`).join(", ");
      log(`skipped ${stats.skipped} (${reasons}):`);
      for (const item of stats.skipped_items.slice(0, shown)) console.error(`  ${describeSkip(item)}`);
      if (stats.skipped > shown) console.error(`  ... and ${stats.skipped - shown} more, listed in stats.json`);
    }
    const shards = Object.keys(sizes).length;
    console.log(
      `packed ${stats.samples} samples into ${shards} shard${shards === 1 ? "" : "s"} in ${values.out}` +
        (stats.skipped > 0 ? `; skipped ${stats.skipped}` : "") + ".",
    );
    return 0;
  },
};
