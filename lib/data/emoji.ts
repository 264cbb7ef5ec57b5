/**
 * The built-in emoji image-caption dataset, built from three npm packages:
 *  - emoji-datasource (the emoji list: code points, category, sort order, skin-tone variations, which vendor has an
 *    image of each) with emoji-datasource-<vendor> (a 64x64 PNG per emoji in `img/<vendor>/64/`);
 *  - emojibase-data (`en/data.json`: CLDR labels and keywords, skin-tone entries under `skins`), for the captions.
 * The packages are pinned here and fetched from the npm registry on first use (see npmPackageDir).
 *
 * Recipe "emoji-v1":
 *  - the nine categories of EMOJI_CATEGORIES (Component, the bare modifier swatches, is left out); every emoji and
 *    every skin-tone variation the vendor has an image for (`has_img_<vendor>`, `skin_variations`);
 *  - name = the emojibase label of the same code point sequence. The two packages disagree on FE0F (variation
 *    selector 16): emoji-datasource writes the fully-qualified form (`00A9-FE0F`), emojibase often not (`00A9`), in
 *    207 of the sequences used, so sequences are compared upper-case with every FE0F removed. Skin variations are
 *    looked up the same way among emojibase's `skins` entries, which carry their own full sequence, so multi-person
 *    variations (emoji-datasource's `1F91D` with tones `1F3FB-1F3FC` -> `1FAF1-1F3FB-200D-1FAF2-1F3FC`) match too.
 *    With the pinned versions every candidate has a label: 1906 emojis and 1875 skin variations, 3781 samples for
 *    google (and for twitter); a candidate without a label would be left out and listed in stats.json;
 *  - caption: `an emoji of <name>`; a flag `flag: X` -> `an emoji of the flag of X`; any other `A: B` (skin tones,
 *    `woman: red hair`, `keycap: 1`) -> `an emoji of A, B`;
 *  - split: test iff int(first 8 hex digits of sha1("emoji-split-v1:" + base)) mod 100 < 20, where base is the emoji's
 *    own sequence (never a skin variation's) upper-case without FE0F, so every skin tone of an emoji and every
 *    vendor's drawing of it fall on the same side. For google: 3169 train, 612 test;
 *  - order: emoji-datasource `sort_order`, the emoji before its skin variations, those by tone code; key
 *    `emoji-NNNNNN` numbers every candidate of the nine categories in that order whether or not the vendor drew it,
 *    so a key names the same emoji in every vendor's build;
 *  - sample: `png` (the image composited on white, RGB PNG), `txt` (caption), `json` (EmojiMeta), `cls` (category
 *    index); shards `train-NNNNNN.tar`, `test-NNNNNN.tar`.
 */

import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { ClipError } from "../errors.ts";
import { imageToRgbPng } from "./image.ts";
import {
  isShardName,
  mapOrdered,
  removeFiles,
  ShardSequenceWriter,
  type ShardSizes,
  writeJsonFile,
  writeTextFileAtomic,
} from "./pack.ts";

export const EMOJI_RECIPE = "emoji-v1";

export const EMOJI_CATEGORIES = [
  "Smileys & Emotion",
  "People & Body",
  "Animals & Nature",
  "Food & Drink",
  "Travel & Places",
  "Activities",
  "Objects",
  "Symbols",
  "Flags",
] as const;

export type EmojiCategory = typeof EMOJI_CATEGORIES[number];
export const EMOJI_VENDORS = ["google", "twitter"] as const;
export type EmojiVendor = typeof EMOJI_VENDORS[number];
export type Split = "train" | "test";

/** The package versions the recipe is defined on. */
export const EMOJI_DATASOURCE_VERSION = "16.0.0";
export const EMOJIBASE_DATA_VERSION = "17.0.0";

export const DEFAULT_EMOJI_SHARD_SAMPLES = 1000;

/** One image entry of emoji-datasource's emoji.json (an emoji or one of its skin variations). */
export interface DatasourceImage {
  unified: string;
  image: string;
  has_img_google?: boolean;
  has_img_twitter?: boolean;
}

export interface DatasourceEmoji extends DatasourceImage {
  name: string | null;
  category: string;
  subcategory: string;
  sort_order: number;
  /** Keyed by tone modifiers: `1F3FB`, or `1F3FB-1F3FC` for two people. */
  skin_variations?: Record<string, DatasourceImage>;
}

/** One entry of emojibase-data's en/data.json (skin entries have the same shape, without `skins`). */
export interface EmojibaseEntry {
  label: string;
  hexcode: string;
  emoji: string;
  tags?: string[];
  skins?: EmojibaseEntry[];
}

/** What each sample's `.json` holds. */
export interface EmojiMeta {
  name: string;
  caption: string;
  emoji: string;
  keywords: string[];
  category: EmojiCategory;
  subcategory: string;
  /** As emoji-datasource writes it, e.g. `1F44D-1F3FD`. */
  code_points: string;
  /** The emoji's own sequence (`1F44D`), shared by all its skin tones: the split is computed from it. */
  base_code_points: string;
  /** Tones 1 (light) to 5 (dark), one per person; null for an emoji without a skin tone. */
  skin_tone: number[] | null;
  split: Split;
  vendor: EmojiVendor;
  packages: Record<string, string>;
}

export interface EmojiSample {
  key: string;
  /** File name in the vendor's `img/<vendor>/64/` folder. */
  image: string;
  classIndex: number;
  split: Split;
  meta: EmojiMeta;
}

/** Upper-case, without FE0F: the form both packages agree on. */
export function normaliseSequence(hex: string): string {
  return hex.toUpperCase().split("-").filter((cp) => cp !== "FE0F").join("-");
}

export function emojiCaption(label: string): string {
  const flag = /^flag: (.+)$/.exec(label);
  if (flag) return `an emoji of the flag of ${flag[1]}`;
  return `an emoji of ${label.replace(": ", ", ")}`;
}

/** The split of an emoji, from its own (base) sequence: see the recipe above. */
export async function emojiSplit(baseSequence: string): Promise<Split> {
  const data = new TextEncoder().encode(`emoji-split-v1:${normaliseSequence(baseSequence)}`);
  const digest = await crypto.subtle.digest("SHA-1", data);
  // The first 8 hex digits are the first 4 bytes read big-endian.
  return new DataView(digest).getUint32(0) % 100 < 20 ? "test" : "train";
}

const TONE_MODIFIERS = ["1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"];

function skinTones(variationKey: string): number[] {
  return variationKey.split("-").map((cp) => {
    const tone = TONE_MODIFIERS.indexOf(cp.toUpperCase());
    if (tone < 0) {
      throw new ClipError(`emoji-datasource skin variation '${variationKey}' is not made of tone modifiers`);
    }
    return tone + 1;
  });
}

function byCode(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

export interface EmojiPlan {
  samples: EmojiSample[];
  /** Sequences the vendor has an image for but emojibase has no label for (left out). */
  unlabelled: string[];
}

/** Applies the recipe to the two packages' data: which samples, in which order, with which captions and splits. */
export async function planEmojiSamples(
  emojis: readonly DatasourceEmoji[],
  labels: readonly EmojibaseEntry[],
  vendor: EmojiVendor,
  packages: Record<string, string>,
): Promise<EmojiPlan> {
  const bySequence = new Map<string, { entry: EmojibaseEntry; parent: EmojibaseEntry }>();
  for (const entry of labels) {
    bySequence.set(normaliseSequence(entry.hexcode), { entry, parent: entry });
    for (const skin of entry.skins ?? []) {
      bySequence.set(normaliseSequence(skin.hexcode), { entry: skin, parent: entry });
    }
  }
  const hasImage = (image: DatasourceImage) => image[`has_img_${vendor}`] === true;
  const ordered = emojis
    .filter((e) => (EMOJI_CATEGORIES as readonly string[]).includes(e.category))
    .toSorted((a, b) => a.sort_order - b.sort_order);

  const samples: EmojiSample[] = [];
  const unlabelled: string[] = [];
  let candidate = 0;
  for (const emoji of ordered) {
    const split = await emojiSplit(emoji.unified);
    const classIndex = (EMOJI_CATEGORIES as readonly string[]).indexOf(emoji.category);
    const variations: [string | null, DatasourceImage][] = [
      [null, emoji],
      ...Object.entries(emoji.skin_variations ?? {}).sort(([a], [b]) => byCode(a, b)),
    ];
    for (const [toneKey, image] of variations) {
      const key = `emoji-${String(candidate++).padStart(6, "0")}`;
      if (!hasImage(image)) continue;
      const found = bySequence.get(normaliseSequence(image.unified));
      if (!found) {
        unlabelled.push(image.unified);
        continue;
      }
      const caption = emojiCaption(found.entry.label);
      samples.push({
        key,
        image: image.image,
        classIndex,
        split,
        meta: {
          name: found.entry.label,
          caption,
          emoji: found.entry.emoji,
          // emojibase keeps keywords on the emoji only; a skin variation shares its emoji's.
          keywords: found.entry.tags ?? found.parent.tags ?? [],
          category: emoji.category as EmojiCategory,
          subcategory: emoji.subcategory,
          code_points: image.unified,
          base_code_points: emoji.unified,
          skin_tone: toneKey === null ? null : skinTones(toneKey),
          split,
          vendor,
          packages,
        },
      });
    }
  }
  return { samples, unlabelled };
}

/** An npm package's folder, downloading the package on first use. */
async function npmPackageDir(name: string, version: string): Promise<{ dir: string; version: string }> {
  // The specifier is built at run time on purpose: a literal one would make Deno fetch all the vendors' image
  // packages (~80 MB each) for every program that imports this module, instead of just the one asked for.
  const specifier = ["npm:", name, "@", version, "/package.json"].join("");
  let manifest: { version?: string };
  try {
    manifest = (await import(specifier, { with: { type: "json" } })).default;
  } catch (e) {
    throw new ClipError(
      `cannot load the npm package ${name}@${version}: ${(e as Error).message.split("\n")[0]}; ` +
        `the first build downloads it from the npm registry, so check the network connection`,
    );
  }
  const url = import.meta.resolve(specifier);
  if (!url.startsWith("file:")) {
    throw new ClipError(`the npm package ${name}@${version} resolved to ${url}, not a local folder; run with Deno`);
  }
  return { dir: dirname(fileURLToPath(url)), version: manifest.version ?? version };
}

export interface EmojiPackages {
  datasourceDir: string;
  vendorDir: string;
  emojibaseDir: string;
  /** Package name -> installed version, recorded in every sample and in done.json. */
  versions: Record<string, string>;
}

export async function locateEmojiPackages(vendor: EmojiVendor): Promise<EmojiPackages> {
  const vendorPackage = `emoji-datasource-${vendor}`;
  const [datasource, vendorImages, emojibase] = await Promise.all([
    npmPackageDir("emoji-datasource", EMOJI_DATASOURCE_VERSION),
    npmPackageDir(vendorPackage, EMOJI_DATASOURCE_VERSION),
    npmPackageDir("emojibase-data", EMOJIBASE_DATA_VERSION),
  ]);
  return {
    datasourceDir: datasource.dir,
    vendorDir: vendorImages.dir,
    emojibaseDir: emojibase.dir,
    versions: {
      "emoji-datasource": datasource.version,
      [vendorPackage]: vendorImages.version,
      "emojibase-data": emojibase.version,
    },
  };
}

async function readJson<T>(path: string): Promise<T> {
  try {
    return JSON.parse(await Deno.readTextFile(path)) as T;
  } catch (e) {
    throw new ClipError(`cannot read ${path}: ${(e as Error).message}; reinstall the package (delete node_modules/)`);
  }
}

const LICENCES: Record<EmojiVendor, string> = {
  google: `The emoji images in these shards are Noto Emoji images (https://github.com/googlefonts/noto-emoji)
as distributed in the npm package emoji-datasource-google@VERSION (img/google/64/).

Noto Emoji is a Google project. The images are licensed under the Apache License, Version 2.0 (the "License");
you may not use them except in compliance with the License. You may obtain a copy of the License at
http://www.apache.org/licenses/LICENSE-2.0 . Unless required by applicable law or agreed to in writing, they are
distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See
the License for the specific language governing permissions and limitations under the License.
The Noto project states that its flag images (from the region-flags collection) are in the public domain or
otherwise exempt from copyright.
`,
  twitter: `The emoji images in these shards are Twemoji graphics (https://github.com/jdecked/twemoji)
as distributed in the npm package emoji-datasource-twitter@VERSION (img/twitter/64/).

Copyright 2019 Twitter, Inc and other contributors; copyright 2024 jdecked and other contributors.
The graphics are licensed under the Creative Commons Attribution 4.0 International licence (CC-BY 4.0):
https://creativecommons.org/licenses/by/4.0/ . Attribution: "Twemoji by Twitter, Inc and other contributors
(jdecked/twemoji), CC-BY 4.0".
`,
};

function licenceNotice(vendor: EmojiVendor, versions: Record<string, string>): string {
  const text = LICENCES[vendor].replace("VERSION", versions[`emoji-datasource-${vendor}`]);
  return `${text}
Changes: each image was composited on a white background and re-encoded as an RGB PNG.

Captions and metadata come from emoji-datasource@${versions["emoji-datasource"]} (MIT, Cal Henderson) and
emojibase-data@${versions["emojibase-data"]} (MIT, Miles Johnson; labels and keywords from Unicode CLDR).
`;
}

/** What makes two builds the same: a later build with an equal identity reuses the folder. */
export interface EmojiBuildIdentity {
  recipe: string;
  vendor: EmojiVendor;
  packages: Record<string, string>;
  shard_size: number;
}

/** done.json: written last, so its presence means the build finished. */
export interface EmojiBuildMarker extends EmojiBuildIdentity {
  counts: Record<Split, number>;
}

export interface EmojiStats {
  recipe: string;
  vendor: EmojiVendor;
  packages: Record<string, string>;
  samples: number;
  splits: Record<Split, number>;
  /** Samples per category and split, in class order. */
  categories: Record<string, Record<Split, number>>;
  skin_tone_variations: number;
  unlabelled: string[];
}

export type EmojiProgress =
  | { stage: "packages"; vendor: EmojiVendor }
  | { stage: "images"; done: number; total: number };

export interface BuildEmojiOptions {
  vendor: EmojiVendor;
  out: string;
  /** Samples per shard. Default 1000. */
  shardSize?: number;
  /** Rebuild even when `out` holds a complete build of the same recipe. */
  force?: boolean;
  /** Images converted at once. Default 4. */
  concurrency?: number;
  onProgress?: (progress: EmojiProgress) => void;
}

export interface EmojiBuildResult {
  /** True when `out` already held this build and nothing was written. */
  reused: boolean;
  out: string;
  counts: Record<Split, number>;
  packages: Record<string, string>;
}

const OUTPUT_FILES = ["done.json", "classes.txt", "sizes.json", "stats.json", "LICENSE-images.txt"];

function sameIdentity(a: EmojiBuildIdentity, b: Partial<EmojiBuildIdentity>): boolean {
  return a.recipe === b.recipe && a.vendor === b.vendor && a.shard_size === b.shard_size &&
    JSON.stringify(a.packages) === JSON.stringify(b.packages);
}

/** The marker of a complete build in `out` (done.json present and matching, every shard there), or undefined. */
export async function completeEmojiBuild(
  out: string,
  expected: EmojiBuildIdentity,
): Promise<EmojiBuildMarker | undefined> {
  try {
    const marker = JSON.parse(await Deno.readTextFile(join(out, "done.json"))) as EmojiBuildMarker;
    if (!sameIdentity(expected, marker)) return undefined;
    const sizes = JSON.parse(await Deno.readTextFile(join(out, "sizes.json"))) as ShardSizes;
    for (const shard of Object.keys(sizes)) await Deno.stat(join(out, shard));
    return marker;
  } catch {
    return undefined;
  }
}

/** Builds (or reuses) the emoji dataset in `out`; done.json is written last, so its presence means complete. */
export async function buildEmojiDataset(opts: BuildEmojiOptions): Promise<EmojiBuildResult> {
  const { vendor, out } = opts;
  const shardSize = opts.shardSize ?? DEFAULT_EMOJI_SHARD_SAMPLES;
  opts.onProgress?.({ stage: "packages", vendor });
  const packages = await locateEmojiPackages(vendor);
  const expected: EmojiBuildIdentity = {
    recipe: EMOJI_RECIPE,
    vendor,
    packages: packages.versions,
    shard_size: shardSize,
  };
  if (!opts.force) {
    const marker = await completeEmojiBuild(out, expected);
    if (marker) return { reused: true, out, counts: marker.counts, packages: packages.versions };
  }

  const emojis = await readJson<DatasourceEmoji[]>(join(packages.datasourceDir, "emoji.json"));
  const labels = await readJson<EmojibaseEntry[]>(join(packages.emojibaseDir, "en", "data.json"));
  const plan = await planEmojiSamples(emojis, labels, vendor, packages.versions);

  try {
    await Deno.mkdir(out, { recursive: true });
  } catch (e) {
    throw new ClipError(`cannot create output folder ${out}: ${(e as Error).message}`);
  }
  // An earlier, different or unfinished build: its marker goes first, so a crash from here on never looks complete.
  await removeFiles(out, (name) => name === "done.json");
  await removeFiles(out, (name) => isShardName("train", name) || isShardName("test", name));
  await removeFiles(out, (name) => OUTPUT_FILES.includes(name));

  const writers: Record<Split, ShardSequenceWriter> = {
    train: new ShardSequenceWriter(out, "train", { maxSamples: shardSize, maxBytes: Infinity }),
    test: new ShardSequenceWriter(out, "test", { maxSamples: shardSize, maxBytes: Infinity }),
  };
  const imageDir = join(packages.vendorDir, "img", vendor, "64");
  const encoder = new TextEncoder();
  const convert = async (sample: EmojiSample) => {
    const path = join(imageDir, sample.image);
    let bytes: Uint8Array;
    try {
      bytes = await Deno.readFile(path);
    } catch (e) {
      throw new ClipError(
        `cannot read ${path}, which emoji-datasource lists for ${sample.meta.code_points}: ${(e as Error).message}; ` +
          `reinstall the package (delete node_modules/)`,
      );
    }
    return { sample, png: await imageToRgbPng(bytes) };
  };
  const total = plan.samples.length;
  let done = 0;
  try {
    for await (const { sample, png } of mapOrdered(plan.samples, opts.concurrency ?? 4, convert)) {
      await writers[sample.split].add(sample.key, [
        { ext: "png", data: png },
        { ext: "txt", data: encoder.encode(sample.meta.caption) },
        { ext: "json", data: encoder.encode(JSON.stringify(sample.meta)) },
        { ext: "cls", data: encoder.encode(String(sample.classIndex)) },
      ]);
      if (++done % 250 === 0 || done === total) opts.onProgress?.({ stage: "images", done, total });
    }
  } catch (e) {
    await writers.train.abort();
    await writers.test.abort();
    throw e;
  }
  const sizes = { ...await writers.train.close(), ...await writers.test.close() };
  const stats = emojiStats(plan, vendor, packages.versions);

  await writeTextFileAtomic(join(out, "classes.txt"), EMOJI_CATEGORIES.join("\n") + "\n");
  await writeJsonFile(join(out, "sizes.json"), sizes);
  await writeJsonFile(join(out, "stats.json"), stats);
  await writeTextFileAtomic(join(out, "LICENSE-images.txt"), licenceNotice(vendor, packages.versions));
  const marker: EmojiBuildMarker = { ...expected, counts: stats.splits };
  await writeJsonFile(join(out, "done.json"), marker);
  return { reused: false, out, counts: stats.splits, packages: packages.versions };
}

function emojiStats(plan: EmojiPlan, vendor: EmojiVendor, packages: Record<string, string>): EmojiStats {
  const splits: Record<Split, number> = { train: 0, test: 0 };
  const categories: Record<string, Record<Split, number>> = {};
  for (const category of EMOJI_CATEGORIES) categories[category] = { train: 0, test: 0 };
  let skinTone = 0;
  for (const s of plan.samples) {
    splits[s.split]++;
    categories[s.meta.category][s.split]++;
    if (s.meta.skin_tone) skinTone++;
  }
  return {
    recipe: EMOJI_RECIPE,
    vendor,
    packages,
    samples: plan.samples.length,
    splits,
    categories,
    skin_tone_variations: skinTone,
    unlabelled: plan.unlabelled,
  };
}
