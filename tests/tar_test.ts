import assert from "node:assert/strict";
import { readTar, type SkippedMember, type TarEntry, TarError } from "../lib/data/tar.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";

const encoder = new TextEncoder();

/** A header block built field by field, independently of TarWriter, so the reader is checked against the format. */
function rawHeader(
  fields: { name: string | Uint8Array; size: number; type?: string; prefix?: string; magic?: "posix" | "gnu" },
): Uint8Array {
  const block = new Uint8Array(512);
  block.set(typeof fields.name === "string" ? encoder.encode(fields.name) : fields.name, 0);
  const octal = (offset: number, width: number, value: number) =>
    block.set(encoder.encode(value.toString(8).padStart(width - 1, "0") + "\0"), offset);
  octal(100, 8, 0o644);
  octal(108, 8, 0);
  octal(116, 8, 0);
  octal(124, 12, fields.size);
  octal(136, 12, 0);
  block[156] = (fields.type ?? "0").charCodeAt(0);
  block.set(encoder.encode(fields.magic === "gnu" ? "ustar  \0" : "ustar\u000000"), 257);
  if (fields.prefix) block.set(encoder.encode(fields.prefix), 345);
  setChecksum(block);
  return block;
}

function setChecksum(block: Uint8Array): void {
  block.fill(0x20, 148, 156);
  let sum = 0;
  for (const b of block) sum += b;
  block.set(encoder.encode(sum.toString(8).padStart(6, "0") + "\0 "), 148);
}

function padded(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(Math.ceil(data.length / 512) * 512);
  out.set(data);
  return out;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let offset = 0;
  for (const p of parts) {
    out.set(p, offset);
    offset += p.length;
  }
  return out;
}

const END = new Uint8Array(1024);

/** A stream delivering `bytes` in chunks of `chunkSize`, recording whether it was cancelled. */
function streamOf(bytes: Uint8Array, chunkSize = 65536): ReadableStream<Uint8Array> & { cancelled: boolean } {
  let pos = 0;
  const state = { cancelled: false };
  const stream = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (pos >= bytes.length) return controller.close();
      controller.enqueue(bytes.slice(pos, pos + chunkSize));
      pos += chunkSize;
    },
    cancel() {
      state.cancelled = true;
    },
  });
  return Object.defineProperty(stream, "cancelled", { get: () => state.cancelled }) as ReadableStream<Uint8Array> & {
    cancelled: boolean;
  };
}

async function readAll(bytes: Uint8Array, chunkSize?: number, opts = {}): Promise<TarEntry[]> {
  const out: TarEntry[] = [];
  for await (const entry of readTar(streamOf(bytes, chunkSize), opts)) out.push(entry);
  return out;
}

async function rejectsWithTarError(bytes: Uint8Array, chunkSize?: number, opts = {}): Promise<TarError> {
  try {
    await readAll(bytes, chunkSize, opts);
  } catch (e) {
    assert.ok(e instanceof TarError, `expected TarError, got ${e}`);
    return e;
  }
  assert.fail("expected a TarError");
}

function pseudoRandomBytes(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out[i] = x & 0xff;
  }
  return out;
}

async function writeArchive(members: [string, Uint8Array][]): Promise<Uint8Array> {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/a.tar`;
    const writer = await TarWriter.create(path);
    for (const [name, data] of members) await writer.add(name, data);
    await writer.close();
    return await Deno.readFile(path);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

const MEMBERS: [string, Uint8Array][] = [
  ["empty.txt", new Uint8Array(0)],
  ["a/b/one.bin", pseudoRandomBytes(1, 1)],
  ["a/b/511.bin", pseudoRandomBytes(511, 2)],
  ["a/b/512.bin", pseudoRandomBytes(512, 3)],
  ["a/b/513.bin", pseudoRandomBytes(513, 4)],
  ["caption.txt", encoder.encode("a photo of a cat")],
  ["ünïcödé/猫.txt", encoder.encode("名前")],
  ["big.bin", pseudoRandomBytes(3 * 65536 + 17, 5)],
];

Deno.test("tar: writer output reads back identically, whatever the stream chunking", async () => {
  const bytes = await writeArchive(MEMBERS);
  // 512-byte header + data padded to 512 per member, then two zero blocks.
  const expectedLength = MEMBERS.reduce((n, [, d]) => n + 512 + Math.ceil(d.length / 512) * 512, 0) + 1024;
  assert.equal(bytes.length, expectedLength);
  for (const chunkSize of [1, 7, 512, 4096, 1 << 20]) {
    const entries = await readAll(bytes, chunkSize);
    assert.deepEqual(entries.map((e) => e.name), MEMBERS.map(([n]) => n), `chunk size ${chunkSize}`);
    entries.forEach((e, i) => {
      assert.equal(e.size, MEMBERS[i][1].length);
      assert.deepEqual(e.data, MEMBERS[i][1]);
    });
  }
});

Deno.test("tar: writer is deterministic and writes ustar fields as specified", async () => {
  const first = await writeArchive(MEMBERS);
  const second = await writeArchive(MEMBERS);
  assert.deepEqual(first, second);
  const header = first.subarray(0, 512);
  const text = (a: number, b: number) => new TextDecoder().decode(header.subarray(a, b));
  assert.equal(text(100, 108), "0000644\0");
  assert.equal(text(108, 116), "0000000\0");
  assert.equal(text(136, 148), "00000000000\0");
  assert.equal(text(257, 265), "ustar\u000000");
  // The checksum field must match the sum recomputed here with the field read as spaces.
  const copy = header.slice();
  copy.fill(0x20, 148, 156);
  assert.equal(parseInt(text(148, 154), 8), copy.reduce((s, b) => s + b, 0));
});

Deno.test("tar: writer leaves only the final file after close, nothing after abort", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const writer = await TarWriter.create(`${dir}/x.tar`);
    await writer.add("k.txt", encoder.encode("v"));
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["x.tar.tmp"]);
    await writer.close();
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["x.tar"]);
    const aborted = await TarWriter.create(`${dir}/y.tar`);
    await aborted.add("k.txt", encoder.encode("v"));
    await aborted.abort();
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["x.tar"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("tar: names over 100 bytes round-trip through a pax header", async () => {
  const long = "d/".repeat(60) + "sample.jpg"; // 130 bytes
  const unicode = "長い名前/".repeat(12) + "x.txt"; // 13 bytes per repeat: 161 bytes, with multi-byte characters
  const exactly100 = "n".repeat(96) + ".txt";
  const bytes = await writeArchive([[long, encoder.encode("1")], [unicode, encoder.encode("2")], [
    exactly100,
    encoder.encode("3"),
  ]]);
  assert.equal(bytes[156], "x".charCodeAt(0), "the first member is preceded by a pax header");
  const entries = await readAll(bytes, 100);
  assert.deepEqual(entries.map((e) => e.name), [long, unicode, exactly100]);
  assert.deepEqual(entries.map((e) => new TextDecoder().decode(e.data)), ["1", "2", "3"]);
  // A 100-byte name fits the ustar field: no pax header for it (pax+data for 2 members, header+data for 3).
  assert.equal(bytes.length, (2 * 2 + 3 * 2) * 512 + 1024);
});

Deno.test("tar: pax size overrides the header size field", async () => {
  const data = pseudoRandomBytes(700, 9);
  const pax = encoder.encode("12 size=700\n");
  const bytes = concat(
    rawHeader({ name: "PaxHeaders/x", size: pax.length, type: "x" }),
    padded(pax),
    rawHeader({ name: "x.bin", size: 0 }),
    padded(data),
    END,
  );
  const [entry] = await readAll(bytes);
  assert.equal(entry.size, 700);
  assert.deepEqual(entry.data, data);
});

Deno.test("tar: GNU long name ('L') built by hand", async () => {
  const longName = "shard-000123/" + "k".repeat(150) + ".caption.txt";
  const nameData = encoder.encode(longName + "\0");
  const bytes = concat(
    rawHeader({ name: "././@LongLink", size: nameData.length, type: "L", magic: "gnu" }),
    padded(nameData),
    rawHeader({ name: longName.slice(0, 100), size: 5, magic: "gnu" }),
    padded(encoder.encode("hello")),
    rawHeader({ name: "short.txt", size: 2, magic: "gnu" }),
    padded(encoder.encode("ok")),
    END,
  );
  const entries = await readAll(bytes, 64);
  assert.deepEqual(entries.map((e) => e.name), [longName, "short.txt"]);
  assert.equal(new TextDecoder().decode(entries[0].data), "hello");
});

Deno.test("tar: ustar prefix is joined for POSIX magic and ignored for GNU magic", async () => {
  const bytes = concat(
    rawHeader({ name: "file.txt", size: 1, prefix: "dir/sub", magic: "posix" }),
    padded(encoder.encode("a")),
    rawHeader({ name: "gnu.txt", size: 1, prefix: "not-a-prefix", magic: "gnu" }),
    padded(encoder.encode("b")),
    END,
  );
  assert.deepEqual((await readAll(bytes)).map((e) => e.name), ["dir/sub/file.txt", "gnu.txt"]);
});

Deno.test("tar: directories, symlinks and hard links are skipped; base-256 sizes are read", async () => {
  const base256 = rawHeader({ name: "b256.txt", size: 0 });
  base256.fill(0, 124, 136);
  base256[124] = 0x80;
  base256[135] = 3; // size 3 in GNU binary form
  setChecksum(base256);
  const bytes = concat(
    rawHeader({ name: "dir/", size: 0, type: "5" }),
    rawHeader({ name: "link", size: 0, type: "2" }),
    rawHeader({ name: "hard", size: 0, type: "1" }),
    base256,
    padded(encoder.encode("abc")),
    END,
  );
  const entries = await readAll(bytes);
  assert.deepEqual(entries.map((e) => [e.name, new TextDecoder().decode(e.data)]), [["b256.txt", "abc"]]);
});

Deno.test("tar: non-UTF-8 names decode with replacement characters", async () => {
  const name = new Uint8Array([0x66, 0xff, 0xfe, 0x2e, 0x74, 0x78, 0x74]); // f\xff\xfe.txt
  const bytes = concat(rawHeader({ name, size: 1 }), padded(encoder.encode("z")), END);
  const [entry] = await readAll(bytes);
  assert.equal(entry.name, "f\uFFFD\uFFFD.txt");
});

Deno.test("tar: reading stops at the first zero block and ignores what follows", async () => {
  const bytes = concat(await writeArchive([["a.txt", encoder.encode("a")]]), pseudoRandomBytes(3000, 7));
  assert.deepEqual((await readAll(bytes)).map((e) => e.name), ["a.txt"]);
  // A stream ending right after a member, without end blocks, is accepted too.
  const noEnd = bytes.subarray(0, 1024);
  assert.deepEqual((await readAll(noEnd)).map((e) => e.name), ["a.txt"]);
});

Deno.test("tar: a corrupted header fails its checksum with a TarError naming the offset", async () => {
  const bytes = await writeArchive([["a.txt", encoder.encode("a")], ["b.txt", encoder.encode("b")]]);
  const corruptFirst = bytes.slice();
  corruptFirst[3] ^= 0x01;
  const e1 = await rejectsWithTarError(corruptFirst);
  assert.equal(e1.offset, 0);
  assert.match(e1.message, /checksum at offset 0\b/);
  const corruptSecond = bytes.slice();
  corruptSecond[1024 + 140] ^= 0x10; // inside the mtime field of the second header
  const e2 = await rejectsWithTarError(corruptSecond);
  assert.equal(e2.offset, 1024);
  assert.match(e2.message, /offset 1024/);
});

Deno.test("tar: truncation anywhere throws TarError at the cut, never hangs", async () => {
  const bytes = await writeArchive([["a.bin", pseudoRandomBytes(1000, 1)], ["b.bin", pseudoRandomBytes(600, 2)]]);
  // Inside the first header, the first data, its padding, the second header, the second data's last block.
  const cuts = [1, 100, 511, 513, 1000, 1500, 1535, 1536 + 200, 2048 + 100, 2048 + 600, 2048 + 1000];
  for (const cut of cuts) {
    for (const chunkSize of [13, 65536]) {
      const error = await rejectsWithTarError(bytes.subarray(0, cut), chunkSize);
      assert.equal(error.offset, cut, `cut at ${cut}, chunk size ${chunkSize}: ${error.message}`);
      assert.match(error.message, /truncated/);
    }
  }
});

Deno.test("tar: an absurd size field throws TarError for truncation without allocating it", async () => {
  const header = rawHeader({ name: "huge.bin", size: 0 });
  header.set(encoder.encode("77777777777\0"), 124); // 8 GiB - 1
  setChecksum(header);
  const skipped: SkippedMember[] = [];
  const error = await rejectsWithTarError(concat(header, new Uint8Array(4096), END), 65536, {
    onSkippedMember: (m: SkippedMember) => skipped.push(m),
  });
  assert.match(error.message, /truncated/);
  assert.equal(error.offset, 512 + 4096 + 1024);
  assert.equal(skipped.length, 0);
  // Same for a pax header claiming gigabytes: refused before any allocation.
  const pax = rawHeader({ name: "PaxHeaders/x", size: 0, type: "x" });
  pax.set(encoder.encode("77777777777\0"), 124);
  setChecksum(pax);
  assert.match((await rejectsWithTarError(concat(pax, END))).message, /claims 8589934591 bytes/);
});

Deno.test("tar: members over maxMemberBytes are streamed past and reported", async () => {
  const bytes = await writeArchive([
    ["small.txt", encoder.encode("s")],
    ["large.bin", pseudoRandomBytes(5000, 3)],
    ["after.txt", encoder.encode("t")],
  ]);
  const skipped: SkippedMember[] = [];
  const entries = await readAll(bytes, 100, {
    maxMemberBytes: 4096,
    onSkippedMember: (m: SkippedMember) => skipped.push(m),
  });
  assert.deepEqual(entries.map((e) => e.name), ["small.txt", "after.txt"]);
  assert.deepEqual(skipped, [{ name: "large.bin", size: 5000, offset: 1024 }]);
});

Deno.test("tar: stopping early cancels the underlying stream", async () => {
  const bytes = await writeArchive([["a.txt", encoder.encode("a")], ["b.txt", encoder.encode("b")]]);
  const stream = streamOf(bytes, 512);
  for await (const entry of readTar(stream)) {
    assert.equal(entry.name, "a.txt");
    break;
  }
  assert.equal(stream.cancelled, true);
});
