import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { join } from "node:path";
import sharp from "sharp";
import { readTar } from "../lib/data/tar.ts";
import {
  buildEmojiDataset,
  completeEmojiBuild,
  type DatasourceEmoji,
  EMOJI_CATEGORIES,
  type EmojibaseEntry,
  type EmojiBuildMarker,
  emojiCaption,
  type EmojiMeta,
  emojiSplit,
  locateEmojiPackages,
  normaliseSequence,
  planEmojiSamples,
} from "../lib/data/emoji.ts";

const utf8 = new TextDecoder();

Deno.test("captions from CLDR labels: plain, flags, and 'A: B' qualifiers", () => {
  assert.equal(emojiCaption("grinning face"), "an emoji of grinning face");
  assert.equal(emojiCaption("flag: Japan"), "an emoji of the flag of Japan");
  assert.equal(emojiCaption("flag in hole"), "an emoji of flag in hole");
  assert.equal(emojiCaption("OK hand: medium skin tone"), "an emoji of OK hand, medium skin tone");
  assert.equal(
    emojiCaption("person running: light skin tone, facing right"),
    "an emoji of person running, light skin tone, facing right",
  );
  assert.equal(normaliseSequence("1f3c3-200d-27a1-fe0f"), "1F3C3-200D-27A1");
  assert.equal(normaliseSequence("00A9-FE0F"), "00A9");
});

Deno.test("split rule, checked against sha1 digests computed with sha1sum", async () => {
  // printf 'emoji-split-v1:1F600' | sha1sum -> b11f996c...: 0xb11f996c = 2971638124, mod 100 = 24 -> train
  assert.equal(await emojiSplit("1F600"), "train");
  // printf 'emoji-split-v1:00A9' | sha1sum -> 0525f6d5...: 86374101 mod 100 = 1 -> test (FE0F dropped first)
  assert.equal(await emojiSplit("00A9-FE0F"), "test");
  // printf 'emoji-split-v1:1F44C' | sha1sum -> e90d16b6...: 3909949110 mod 100 = 10 -> test
  assert.equal(await emojiSplit("1F44C"), "test");
  // printf 'emoji-split-v1:1F1EF-1F1F5' | sha1sum -> b3e431b3...: 3018076595 mod 100 = 95 -> train
  assert.equal(await emojiSplit("1F1EF-1F1F5"), "train");
  // printf 'emoji-split-v1:1F3C3-200D-27A1' | sha1sum -> 9a80861b...: 2592114203 mod 100 = 3 -> test; with the
  // FE0F left in, 'emoji-split-v1:1F3C3-200D-27A1-FE0F' -> 4870c194...: 1215349140 mod 100 = 40 -> train.
  assert.equal(await emojiSplit("1F3C3-200D-27A1-FE0F"), "test");
  assert.equal(0xb11f996c % 100, 24);
  assert.equal(0x0525f6d5 % 100, 1);
  assert.equal(0xe90d16b6 % 100, 10);
  assert.equal(0xb3e431b3 % 100, 95);
  assert.equal(0x9a80861b % 100, 3);
  assert.equal(0x4870c194 % 100, 40);
});

Deno.test("recipe on a hand-made extract: filtering, order, stable keys, FE0F matching, skin tones", async () => {
  const img = (unified: string, has = true) => ({
    unified,
    image: `${unified.toLowerCase()}.png`,
    has_img_google: has,
  });
  const emojis: DatasourceEmoji[] = [
    { ...img("00A9-FE0F"), name: "COPYRIGHT SIGN", category: "Symbols", subcategory: "other-symbol", sort_order: 5 },
    {
      ...img("1F44C"),
      name: "OK HAND SIGN",
      category: "People & Body",
      subcategory: "hand-fingers-partial",
      sort_order: 2,
      skin_variations: { "1F3FC": img("1F44C-1F3FC"), "1F3FB": img("1F44C-1F3FB"), "1F3FD": img("1F44C-1F3FD", false) },
    },
    { ...img("1F3FB"), name: "LIGHT SKIN TONE", category: "Component", subcategory: "skin-tone", sort_order: 1 },
    { ...img("1F1EF-1F1F5"), name: "JP", category: "Flags", subcategory: "country-flag", sort_order: 9 },
    { ...img("1F9FF", false), name: "NAZAR AMULET", category: "Objects", subcategory: "other-object", sort_order: 7 },
    {
      ...img("1FAE8"),
      name: "SHAKING FACE",
      category: "Smileys & Emotion",
      subcategory: "face-neutral",
      sort_order: 8,
    },
  ];
  const labels: EmojibaseEntry[] = [
    { label: "copyright", hexcode: "00A9", emoji: "©️", tags: ["c"] },
    {
      label: "OK hand",
      hexcode: "1F44C",
      emoji: "👌",
      tags: ["hand", "ok"],
      skins: [
        { label: "OK hand: light skin tone", hexcode: "1F44C-1F3FB", emoji: "👌🏻" },
        { label: "OK hand: medium-light skin tone", hexcode: "1F44C-1F3FC", emoji: "👌🏼" },
        { label: "OK hand: medium skin tone", hexcode: "1F44C-1F3FD", emoji: "👌🏽" },
      ],
    },
    { label: "flag: Japan", hexcode: "1F1EF-1F1F5", emoji: "🇯🇵", tags: ["JP", "flag"] },
    { label: "nazar amulet", hexcode: "1F9FF", emoji: "🧿" },
    { label: "light skin tone", hexcode: "1F3FB", emoji: "🏻" },
  ];
  const { samples, unlabelled } = await planEmojiSamples(emojis, labels, "google", { p: "1" });
  // Candidates in sort order: OK hand (key 0) with tones 1F3FB (1), 1F3FC (2), 1F3FD (3, no image); copyright (4);
  // nazar amulet (5, no image); shaking face (6, no label); flag of Japan (7). Component is not a candidate.
  assert.deepEqual(samples.map((s) => s.key), [
    "emoji-000000",
    "emoji-000001",
    "emoji-000002",
    "emoji-000004",
    "emoji-000007",
  ]);
  assert.deepEqual(samples.map((s) => s.meta.caption), [
    "an emoji of OK hand",
    "an emoji of OK hand, light skin tone",
    "an emoji of OK hand, medium-light skin tone",
    "an emoji of copyright",
    "an emoji of the flag of Japan",
  ]);
  assert.deepEqual(samples.map((s) => s.classIndex), [1, 1, 1, 7, 8]);
  assert.deepEqual(samples.map((s) => s.split), ["test", "test", "test", "test", "train"]);
  assert.deepEqual(samples.map((s) => s.meta.skin_tone), [null, [1], [2], null, null]);
  assert.deepEqual(samples[1].meta.keywords, ["hand", "ok"]); // a skin tone shares its emoji's keywords
  assert.equal(samples[1].meta.base_code_points, "1F44C");
  assert.equal(samples[1].image, "1f44c-1f3fb.png");
  assert.deepEqual(unlabelled, ["1FAE8"]);
});

/** Reads every shard of a build: key -> files by extension, and the shard each key came from. */
async function readBuild(out: string, sizes: Record<string, number>) {
  const samples = new Map<string, { shard: string; files: Map<string, Uint8Array> }>();
  for (const shard of Object.keys(sizes)) {
    const file = await Deno.open(join(out, shard));
    for await (const entry of readTar(file.readable)) {
      const dot = entry.name.indexOf(".");
      const key = entry.name.slice(0, dot);
      if (!samples.has(key)) samples.set(key, { shard, files: new Map() });
      samples.get(key)!.files.set(entry.name.slice(dot + 1), entry.data);
    }
  }
  return samples;
}

/** Independent of the library: node's sha1 on the sequence without FE0F. */
function referenceSplit(sequence: string): string {
  const base = sequence.toUpperCase().split("-").filter((cp) => cp !== "FE0F").join("-");
  const hex = createHash("sha1").update(`emoji-split-v1:${base}`).digest("hex");
  return parseInt(hex.slice(0, 8), 16) % 100 < 20 ? "test" : "train";
}

Deno.test({
  name: "google emoji build: 3169/612, classes, known samples, shared splits, RGB PNGs on white, reuse",
  // The first run downloads the npm packages (about 110 MB); later runs build in about 15 s on 2 cores.
  async fn() {
    const out = await Deno.makeTempDir({ prefix: "clip_emoji_test_" });
    try {
      const result = await buildEmojiDataset({ vendor: "google", out });
      assert.equal(result.reused, false);
      assert.deepEqual(result.counts, { train: 3169, test: 612 });

      const sizes = JSON.parse(await Deno.readTextFile(join(out, "sizes.json"))) as Record<string, number>;
      assert.deepEqual(sizes, {
        "train-000000.tar": 1000,
        "train-000001.tar": 1000,
        "train-000002.tar": 1000,
        "train-000003.tar": 169,
        "test-000000.tar": 612,
      });
      assert.equal(
        await Deno.readTextFile(join(out, "classes.txt")),
        "Smileys & Emotion\nPeople & Body\nAnimals & Nature\nFood & Drink\nTravel & Places\nActivities\nObjects\n" +
          "Symbols\nFlags\n",
      );
      const stats = JSON.parse(await Deno.readTextFile(join(out, "stats.json")));
      assert.deepEqual(stats.splits, { train: 3169, test: 612 });
      assert.equal(stats.skin_tone_variations, 1875);
      assert.deepEqual(stats.unlabelled, []);
      const licence = await Deno.readTextFile(join(out, "LICENSE-images.txt"));
      assert.match(licence, /Noto Emoji/);
      assert.match(licence, /Apache License, Version 2\.0/);

      const samples = await readBuild(out, sizes);
      assert.equal(samples.size, 3781);
      const metaOf = (files: Map<string, Uint8Array>) => JSON.parse(utf8.decode(files.get("json")!)) as EmojiMeta;
      const byCode = new Map<string, { key: string; shard: string; files: Map<string, Uint8Array> }>();
      const splitsOfBase = new Map<string, Set<string>>();
      let previousKey = "";
      const perCategory = new Map<string, number>();
      for (const [key, sample] of samples) {
        assert.deepEqual([...sample.files.keys()], ["png", "txt", "json", "cls"], key);
        const meta = metaOf(sample.files);
        const split = sample.shard.startsWith("test-") ? "test" : "train";
        assert.equal(meta.split, split, key);
        assert.equal(utf8.decode(sample.files.get("txt")!), meta.caption, key);
        assert.equal(Number(utf8.decode(sample.files.get("cls")!)), EMOJI_CATEGORIES.indexOf(meta.category), key);
        // Every sample's split is the sha1 rule on its emoji's own sequence, so skin tones follow their emoji.
        assert.equal(split, referenceSplit(meta.base_code_points), key);
        if (!splitsOfBase.has(meta.base_code_points)) splitsOfBase.set(meta.base_code_points, new Set());
        splitsOfBase.get(meta.base_code_points)!.add(split);
        if (split === "train") {
          assert.ok(key > previousKey, `train keys in order: ${previousKey} then ${key}`);
          previousKey = key;
        }
        perCategory.set(meta.category, (perCategory.get(meta.category) ?? 0) + 1);
        byCode.set(meta.code_points, { key, ...sample });
      }
      assert.equal(splitsOfBase.size, 1906);
      for (const [base, splits] of splitsOfBase) assert.equal(splits.size, 1, `${base} is in both splits`);
      assert.equal(perCategory.get("Flags"), 270);
      assert.equal(perCategory.get("People & Body"), 2261);

      const expectSample = (code: string, caption: string, cls: number, split: string) => {
        const sample = byCode.get(code);
        assert.ok(sample, `${code} is missing`);
        assert.equal(utf8.decode(sample.files.get("txt")!), caption, code);
        assert.equal(utf8.decode(sample.files.get("cls")!), String(cls), code);
        assert.equal(metaOf(sample.files).split, split, code);
        return sample;
      };
      // Splits from the sha1sum digests in the split-rule test above.
      const grinning = expectSample("1F600", "an emoji of grinning face", 0, "train");
      assert.equal(grinning.key, "emoji-000000");
      expectSample("00A9-FE0F", "an emoji of copyright", 7, "test");
      expectSample("1F1EF-1F1F5", "an emoji of the flag of Japan", 8, "train");
      expectSample("1F44C", "an emoji of OK hand", 1, "test");
      const tones = ["light", "medium-light", "medium", "medium-dark", "dark"];
      for (const [i, tone] of tones.entries()) {
        const sample = expectSample(`1F44C-1F3F${"BCDEF"[i]}`, `an emoji of OK hand, ${tone} skin tone`, 1, "test");
        assert.deepEqual(metaOf(sample.files).skin_tone, [i + 1]);
      }
      const handshake = metaOf(byCode.get("1FAF1-1F3FB-200D-1FAF2-1F3FC")!.files);
      assert.equal(handshake.caption, "an emoji of handshake, light skin tone, medium-light skin tone");
      assert.deepEqual(handshake.skin_tone, [1, 2]);
      assert.equal(handshake.base_code_points, "1F91D");
      assert.deepEqual(metaOf(grinning.files).packages, {
        "emoji-datasource": "16.0.0",
        "emoji-datasource-google": "16.0.0",
        "emojibase-data": "17.0.0",
      });

      // The image: a 64x64 8-bit RGB PNG (IHDR colour type 2), the package's RGBA image composited on white.
      const png = grinning.files.get("png")!;
      const ihdr = new DataView(png.buffer, png.byteOffset + 16, 10);
      assert.deepEqual([ihdr.getUint32(0), ihdr.getUint32(4), ihdr.getUint8(8), ihdr.getUint8(9)], [64, 64, 8, 2]);
      const packages = await locateEmojiPackages("google");
      const original = await sharp(join(packages.vendorDir, "img/google/64/1f600.png")).ensureAlpha().raw()
        .toBuffer();
      const packed = await sharp(png).raw().toBuffer();
      assert.equal(packed.length, 64 * 64 * 3);
      let worst = 0;
      let transparent = 0;
      for (let p = 0; p < 64 * 64; p++) {
        const alpha = original[4 * p + 3] / 255;
        if (alpha === 0) transparent++;
        for (let c = 0; c < 3; c++) {
          const expected = original[4 * p + c] * alpha + 255 * (1 - alpha);
          worst = Math.max(worst, Math.abs(packed[3 * p + c] - expected));
        }
      }
      assert.ok(transparent > 100, `the source image has transparent pixels (${transparent})`);
      assert.ok(worst <= 1, `composited on white within 1 level, worst ${worst}`);

      // A second build of the same recipe reuses the folder; a changed identity or a missing shard does not.
      const again = await buildEmojiDataset({ vendor: "google", out });
      assert.equal(again.reused, true);
      assert.deepEqual(again.counts, { train: 3169, test: 612 });
      const marker = JSON.parse(await Deno.readTextFile(join(out, "done.json"))) as EmojiBuildMarker;
      const { counts: _, ...identity } = marker;
      assert.ok(await completeEmojiBuild(out, identity));
      assert.equal(await completeEmojiBuild(out, { ...identity, shard_size: 500 }), undefined);
      assert.equal(await completeEmojiBuild(out, { ...identity, vendor: "twitter" }), undefined);
      await Deno.rename(join(out, "test-000000.tar"), join(out, "moved.tar"));
      assert.equal(await completeEmojiBuild(out, identity), undefined);
    } finally {
      await Deno.remove(out, { recursive: true });
    }
  },
});
