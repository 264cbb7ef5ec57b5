import assert from "node:assert/strict";
import { join } from "node:path";
import { readTar } from "../lib/data/tar.ts";
import { isShardName, mapOrdered, packFrom, type PackFromOptions, ShardSequenceWriter } from "../lib/data/pack.ts";
import { parseDelimited, sniffImageExtension } from "../lib/data/pack_sources.ts";
import { packCommand, parseByteSize } from "../lib/commands/pack.ts";
import { ClipError, UsageError } from "../lib/errors.ts";

const FIXTURES = new URL("./fixtures/pack/", import.meta.url).pathname;
const IMAGES = join(FIXTURES, "images");
const utf8 = new TextDecoder();

interface Member {
  name: string;
  data: Uint8Array;
}

async function readShard(path: string): Promise<Member[]> {
  const members: Member[] = [];
  const file = await Deno.open(path);
  for await (const entry of readTar(file.readable)) members.push({ name: entry.name, data: entry.data });
  return members;
}

/** Every shard listed in sizes.json, read back: shard name -> members. */
async function readPack(out: string): Promise<Map<string, Member[]>> {
  const sizes = JSON.parse(await Deno.readTextFile(join(out, "sizes.json"))) as Record<string, number>;
  const shards = new Map<string, Member[]>();
  for (const name of Object.keys(sizes)) shards.set(name, await readShard(join(out, name)));
  return shards;
}

function keysOf(members: Member[]): string[] {
  return [...new Set(members.map((m) => m.name.slice(0, m.name.indexOf("."))))];
}

function member(members: Member[], name: string): Uint8Array {
  const found = members.find((m) => m.name === name);
  assert.ok(found, `member ${name} is missing; have ${members.map((m) => m.name).join(", ")}`);
  return found.data;
}

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "clip_pack_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function pack(opts: Omit<PackFromOptions, "out">, out: string) {
  return packFrom({ ...opts, out });
}

Deno.test("folder source: round trip with captions, image bytes, key numbering and shard sizes", async () => {
  await withTempDir(async (out) => {
    const { sizes, stats } = await pack({ src: IMAGES, maxSamples: 2 }, out);
    // Folder entries in name order: a_red.png, b_blue.JPEG, c_green.webp, d_yellow.png (no caption),
    // e_fake.png (text, not an image); orphan.txt has no image.
    assert.deepEqual(sizes, { "data-000000.tar": 2, "data-000001.tar": 1 });
    assert.deepEqual(JSON.parse(await Deno.readTextFile(join(out, "sizes.json"))), sizes);

    const shards = await readPack(out);
    const first = shards.get("data-000000.tar")!;
    const second = shards.get("data-000001.tar")!;
    assert.deepEqual(first.map((m) => m.name), [
      "data-000000.png",
      "data-000000.txt",
      "data-000000.json",
      "data-000001.jpg",
      "data-000001.txt",
      "data-000001.json",
    ]);
    assert.deepEqual(keysOf(second), ["data-000002"]);
    // The sample counts sizes.json reports are the key groups actually in each shard.
    assert.deepEqual(Object.fromEntries([...shards].map(([name, members]) => [name, keysOf(members).length])), sizes);

    assert.equal(utf8.decode(member(first, "data-000000.txt")), "a red square");
    assert.equal(utf8.decode(member(first, "data-000001.txt")), "a blue rectangle");
    assert.equal(utf8.decode(member(second, "data-000002.txt")), "a green rectangle, tall");
    // Images are stored byte for byte.
    assert.deepEqual(member(first, "data-000000.png"), await Deno.readFile(join(IMAGES, "a_red.png")));
    assert.deepEqual(member(first, "data-000001.jpg"), await Deno.readFile(join(IMAGES, "b_blue.JPEG")));
    assert.deepEqual(member(second, "data-000002.webp"), await Deno.readFile(join(IMAGES, "c_green.webp")));
    assert.deepEqual(JSON.parse(utf8.decode(member(first, "data-000001.json"))), {
      source: "b_blue.JPEG",
      caption: "a blue rectangle",
    });

    assert.equal(stats.samples, 3);
    assert.equal(stats.skipped, 3);
    assert.deepEqual(stats.skip_reasons, {
      "no caption file": 1,
      "not a JPEG, PNG or WebP image": 1,
      "no image file": 1,
    });
    assert.deepEqual(stats.skipped_items.map((s) => s.source).sort(), ["d_yellow.png", "e_fake.png", "orphan.txt"]);
    assert.deepEqual(stats.formats, { png: 1, jpg: 1, webp: 1 });
    assert.deepEqual(JSON.parse(await Deno.readTextFile(join(out, "stats.json"))), stats);
  });
});

Deno.test("shard byte limit: shards cut at whole samples, sizes exactly as ustar lays them out", async () => {
  await withTempDir(async (out) => {
    // Every file of these samples is under 512 bytes: each takes a header block and one data block, so a sample of
    // image + txt + json is 3 * 1024 bytes, and a shard adds two zero blocks at the end.
    const sample = 3 * 1024;
    const { sizes } = await pack({ src: IMAGES, maxBytes: 2 * sample + 1024 }, out);
    assert.deepEqual(sizes, { "data-000000.tar": 2, "data-000001.tar": 1 });
    assert.equal((await Deno.stat(join(out, "data-000000.tar"))).size, 2 * sample + 1024);
    assert.equal((await Deno.stat(join(out, "data-000001.tar"))).size, sample + 1024);
  });
  await withTempDir(async (out) => {
    // A limit below one sample still gives each sample a shard rather than failing or looping.
    const { sizes } = await pack({ src: IMAGES, maxBytes: 1000, prefix: "tiny" }, out);
    assert.deepEqual(sizes, { "tiny-000000.tar": 1, "tiny-000001.tar": 1, "tiny-000002.tar": 1 });
    assert.deepEqual(keysOf(await readShard(join(out, "tiny-000002.tar"))), ["tiny-000002"]);
  });
});

Deno.test("CSV source: quoted fields, relative paths, and missing image, empty image and empty caption skipped", async () => {
  await withTempDir(async (out) => {
    const { sizes, stats } = await pack({ src: join(FIXTURES, "captions.csv") }, out);
    assert.deepEqual(sizes, { "data-000000.tar": 2 });
    assert.equal(stats.image_column, "image");
    assert.equal(stats.caption_column, "caption");
    const members = await readShard(join(out, "data-000000.tar"));
    // Keys follow the data rows: rows 1 and 3 are packed.
    assert.deepEqual(keysOf(members), ["data-000000", "data-000002"]);
    assert.equal(utf8.decode(member(members, "data-000000.txt")), "a red square, drawn small");
    assert.equal(utf8.decode(member(members, "data-000002.txt")), 'a blue "box"\non two lines');
    assert.deepEqual(member(members, "data-000002.jpg"), await Deno.readFile(join(IMAGES, "b_blue.JPEG")));
    assert.equal(stats.samples, 2);
    assert.equal(stats.skipped, 3);
    assert.deepEqual(stats.skip_reasons, { "no image": 1, "empty caption": 1, "missing file": 1 });
    // Listed in row order, though the missing file is only found after the others.
    assert.deepEqual(stats.skipped_items.map((s) => [s.row, s.reason]), [
      [2, "missing file"],
      [4, "no image"],
      [5, "empty caption"],
    ]);
    assert.equal(stats.skipped_items[0].source, "images/missing.png");
  });
});

Deno.test("TSV source: open_clip's filepath/title columns detected, unquoted quotes kept", async () => {
  await withTempDir(async (out) => {
    const { stats } = await pack({ src: join(FIXTURES, "captions.tsv") }, out);
    assert.equal(stats.image_column, "filepath");
    assert.equal(stats.caption_column, "title");
    const members = await readShard(join(out, "data-000000.tar"));
    assert.equal(utf8.decode(member(members, "data-000000.txt")), 'a "green" rectangle');
    assert.equal(utf8.decode(member(members, "data-000001.txt")), "a yellow square");
    assert.equal(stats.skipped, 0);
  });
});

Deno.test("JSONL source: url/text columns detected, missing image skipped and counted", async () => {
  await withTempDir(async (out) => {
    const { sizes, stats } = await pack({ src: join(FIXTURES, "captions.jsonl"), prefix: "emb" }, out);
    assert.deepEqual(sizes, { "emb-000000.tar": 2 });
    assert.equal(stats.image_column, "url");
    assert.equal(stats.caption_column, "text");
    const members = await readShard(join(out, "emb-000000.tar"));
    assert.deepEqual(members.map((m) => m.name), [
      "emb-000000.png",
      "emb-000000.txt",
      "emb-000000.json",
      "emb-000002.webp",
      "emb-000002.txt",
      "emb-000002.json",
    ]);
    assert.equal(utf8.decode(member(members, "emb-000002.txt")), "a green rectangle");
    assert.deepEqual(stats.skip_reasons, { "missing file": 1 });
    assert.equal(stats.skipped_items[0].source, "images/nowhere.webp");
  });
});

Deno.test("URL images: downloaded, extension from the URL or the bytes, HTTP errors and non-images skipped", async () => {
  const red = await Deno.readFile(join(IMAGES, "a_red.png"));
  const jpeg = await Deno.readFile(join(IMAGES, "b_blue.JPEG"));
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (request) => {
    const path = new URL(request.url).pathname;
    if (path === "/red.png") return new Response(red);
    if (path === "/image") return new Response(jpeg); // no extension: the bytes say JPEG
    if (path === "/page.jpg") return new Response("<html>sign in</html>");
    return new Response("not found", { status: 404 });
  });
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    await withTempDir(async (dir) => {
      const rows = [
        { url: `${base}/red.png`, caption: "red" },
        { url: `${base}/gone.png`, caption: "gone" },
        { url: `${base}/image`, caption: "blue" },
        { url: `${base}/page.jpg`, caption: "page" },
      ];
      const src = join(dir, "urls.jsonl");
      await Deno.writeTextFile(src, rows.map((r) => JSON.stringify(r)).join("\n") + "\n");
      const out = join(dir, "out");
      const { stats } = await pack({ src }, out);
      const members = await readShard(join(out, "data-000000.tar"));
      assert.deepEqual(members.filter((m) => !/\.(txt|json)$/.test(m.name)).map((m) => m.name), [
        "data-000000.png",
        "data-000002.jpg",
      ]);
      assert.deepEqual(member(members, "data-000000.png"), red);
      assert.deepEqual(member(members, "data-000002.jpg"), jpeg);
      assert.deepEqual(stats.skip_reasons, { "HTTP 404": 1, "not a JPEG, PNG or WebP image": 1 });
    });
  } finally {
    await server.shutdown();
  }
});

Deno.test("errors before any work: missing, empty or unknown source, no caption column, earlier pack", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "out");
    await assert.rejects(pack({ src: join(dir, "nope") }, out), (e: Error) => {
      assert.ok(e instanceof ClipError);
      assert.match(e.message, /nope does not exist/);
      return true;
    });
    await Deno.mkdir(join(dir, "empty"));
    await assert.rejects(pack({ src: join(dir, "empty") }, out), /empty: it has no image .* with a same-named \.txt/);
    await Deno.writeTextFile(join(dir, "header_only.csv"), "image,caption\n");
    await assert.rejects(
      pack({ src: join(dir, "header_only.csv") }, out),
      /header_only\.csv is empty: it has no data rows/,
    );
    await Deno.writeTextFile(join(dir, "blank.jsonl"), "\n\n");
    await assert.rejects(pack({ src: join(dir, "blank.jsonl") }, out), /blank\.jsonl is empty/);
    await Deno.writeTextFile(join(dir, "labels.csv"), "image,label\na.png,cat\n");
    await assert.rejects(
      pack({ src: join(dir, "labels.csv") }, out),
      /labels\.csv has no caption column \(looked for 'caption', 'text', 'title'\); its columns are 'image', 'label': name the right one with --caption-col/,
    );
    await assert.rejects(
      pack({ src: join(dir, "labels.csv"), captionColumn: "name" }, out),
      /labels\.csv has no caption column 'name'; its columns are 'image', 'label'/,
    );
    await Deno.writeTextFile(join(dir, "list.txt"), "a.png\n");
    await assert.rejects(pack({ src: join(dir, "list.txt") }, out), /unknown source type '\.txt'/);
    await Deno.writeTextFile(join(dir, "bad.jsonl"), '{"image": "a.png", "caption": "x"}\n{"image": \n');
    await assert.rejects(pack({ src: join(dir, "bad.jsonl") }, out), /bad\.jsonl line 2 is not valid JSON/);
    await assert.rejects(pack({ src: IMAGES, prefix: "a.b" }, out), /shard prefix 'a\.b' is not allowed/);
    // None of these wrote anything.
    await assert.rejects(Deno.stat(out), Deno.errors.NotFound);

    await pack({ src: IMAGES }, out);
    await assert.rejects(pack({ src: IMAGES }, out), /already holds .* use --force/);
    const { sizes } = await pack({ src: IMAGES, maxSamples: 1, force: true }, out);
    assert.equal(Object.keys(sizes).length, 3);
    const left = [...Deno.readDirSync(out)].map((e) => e.name).filter((n) => n.endsWith(".tar")).sort();
    assert.deepEqual(left, ["data-000000.tar", "data-000001.tar", "data-000002.tar"]);
  });
});

Deno.test("every image of a table missing: a clear error instead of an empty pack", async () => {
  await withTempDir(async (dir) => {
    await Deno.writeTextFile(join(dir, "gone.csv"), "image,caption\nx.png,one\ny.png,two\n");
    await assert.rejects(
      pack({ src: join(dir, "gone.csv") }, join(dir, "out")),
      /none of the 2 images in .*gone\.csv could be read \(first problem: x\.png \(row 1\): missing file/,
    );
  });
});

Deno.test("CSV parsing: quotes, doubled quotes, CRLF, embedded newlines, ragged rows", () => {
  const { columns, rows } = parseDelimited('a,"b ""x""",c\r\n1,"2,\n3",\r\n"",only\n\n4\n', ",");
  assert.deepEqual(columns, ["a", 'b "x"', "c"]);
  assert.deepEqual(rows.map((r) => [...r.values()]), [["1", "2,\n3", ""], ["", "only", ""], ["4", "", ""]]);
});

Deno.test("image sniffing by magic numbers", () => {
  assert.equal(sniffImageExtension(new Uint8Array([0xff, 0xd8, 0xff, 0xe0])), "jpg");
  assert.equal(sniffImageExtension(new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])), "png");
  assert.equal(sniffImageExtension(new TextEncoder().encode("RIFF\0\0\0\0WEBPVP8 ")), "webp");
  assert.equal(sniffImageExtension(new TextEncoder().encode("GIF89a")), undefined);
  assert.equal(sniffImageExtension(new Uint8Array([0xff, 0xd8])), undefined);
});

Deno.test("mapOrdered keeps input order when later items finish first, and propagates errors", async () => {
  const delays = [30, 5, 20, 1, 10];
  const seen: number[] = [];
  for await (
    const v of mapOrdered(delays.keys(), 3, async (i) => {
      await new Promise((r) => setTimeout(r, delays[i]));
      return i;
    })
  ) seen.push(v);
  assert.deepEqual(seen, [0, 1, 2, 3, 4]);
  const failing = mapOrdered([0, 1, 2], 3, (i) => i === 1 ? Promise.reject(new Error("boom 1")) : Promise.resolve(i));
  const got: number[] = [];
  await assert.rejects(async () => {
    for await (const v of failing) got.push(v);
  }, /boom 1/);
  assert.deepEqual(got, [0]);
});

Deno.test("ShardSequenceWriter: count limit, shard names, abort leaves finished shards only", async () => {
  await withTempDir(async (dir) => {
    const writer = new ShardSequenceWriter(dir, "part", { maxSamples: 2, maxBytes: Infinity });
    const one = [{ ext: "txt", data: new TextEncoder().encode("x") }];
    for (const key of ["k0", "k1", "k2"]) await writer.add(key, one);
    await writer.abort();
    const names = [...Deno.readDirSync(dir)].map((e) => e.name).sort();
    assert.deepEqual(names, ["part-000000.tar"]);
    assert.deepEqual(keysOf(await readShard(join(dir, "part-000000.tar"))), ["k0", "k1"]);
  });
  assert.ok(isShardName("train", "train-000012.tar"));
  assert.ok(isShardName("train", "train-000012.tar.tmp"));
  assert.ok(!isShardName("train", "train-12.tar"));
  assert.ok(!isShardName("train", "trains-000012.tar"));
});

Deno.test("clip pack command: --from end to end, and invocation errors", async () => {
  await withTempDir(async (dir) => {
    const out = join(dir, "out");
    const log = console.log, error = console.error;
    const printed: string[] = [];
    console.log = (...args: unknown[]) => printed.push(args.join(" "));
    console.error = (...args: unknown[]) => printed.push(args.join(" "));
    try {
      const code = await packCommand.run(["--from", join(FIXTURES, "captions.csv"), "--out", out, "--shard-size", "1"]);
      assert.equal(code, 0);
    } finally {
      console.log = log;
      console.error = error;
    }
    assert.deepEqual(JSON.parse(await Deno.readTextFile(join(out, "sizes.json"))), {
      "data-000000.tar": 1,
      "data-000001.tar": 1,
    });
    const text = printed.join("\n");
    assert.match(text, /skipped 3 \(/);
    assert.match(text, /images\/missing\.png \(row 2\): missing file/);
    assert.match(text, /packed 2 samples into 2 shards in /);
  });
  const usage = async (argv: string[], pattern: RegExp) =>
    await assert.rejects(packCommand.run(argv), (e: Error) => {
      assert.ok(e instanceof UsageError, `${argv.join(" ")}: ${e}`);
      assert.match(e.message, pattern);
      return true;
    });
  await usage(["--out", "x"], /say what to pack/);
  await usage(["emoji", "--from", "a", "--out", "x"], /either 'emoji' or --from/);
  await usage(["--from", "a"], /--out DIR is required/);
  await usage(["emoji", "--out", "x", "--vendor", "apple"], /--vendor must be google or twitter/);
  await usage(["emoji", "--out", "x", "--prefix", "p"], /--prefix applies to --from only/);
  await usage(["--from", "a", "--out", "x", "--shard-size", "0"], /--shard-size must be at least 1/);
  await usage(["--from", "a", "--out", "x", "--shard-bytes", "lots"], /--shard-bytes must be a number of bytes/);
  await usage(["stuff", "--out", "x"], /unexpected argument 'stuff'/);
  assert.equal(parseByteSize("1G"), 1024 ** 3);
  assert.equal(parseByteSize("512k"), 512 * 1024);
  assert.equal(parseByteSize("3MB"), 3 * 1024 ** 2);
  assert.equal(parseByteSize("1000"), 1000);
});
