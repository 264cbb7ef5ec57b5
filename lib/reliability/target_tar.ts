/**
 * Fuzz target: the tar reader, and the WebDataset reader on top of it. Inputs are archives from a few seeds (ustar,
 * pax path and size, GNU long names, non-UTF-8 names, base-256 sizes, links and folders), truncated at every class
 * of offset, with corrupted headers (checksum left wrong, or recomputed so parsing goes deeper), absurd size fields,
 * edited pax records and random edits, delivered in chunks from 1 byte to 1 MiB.
 */
import { Rng } from "../data/rng.ts";
import { readTar, TarError } from "../data/tar.ts";
import { IMAGE_TEXT_REQUIREMENTS, WebDatasetReader } from "../data/webdataset.ts";
import { type Accepted, type FuzzInput, type FuzzTarget, InvariantError, streamOf } from "./fuzz_target.ts";
import { mutateBytes, pick } from "./mutate.ts";
import {
  buildTar,
  type BuiltTar,
  gnuLongNameMember,
  type MemberSpec,
  paxMember,
  setBase256Size,
  setChecksum,
} from "./tar_bytes.ts";

const encoder = new TextEncoder();

interface TarCase {
  bytes: Uint8Array;
  chunk: number;
}

function filler(rng: Rng, n: number): Uint8Array {
  const out = new Uint8Array(n);
  for (let i = 0; i < n; i++) out[i] = rng.int(256);
  return out;
}

function sample(rng: Rng, key: string): MemberSpec[] {
  return [
    { name: `${key}.jpg`, data: filler(rng, 1 + rng.int(1500)) },
    { name: `${key}.txt`, data: encoder.encode(`caption of ${key}`) },
  ];
}

function seeds(): BuiltTar[] {
  const rng = new Rng(0x7a5);
  const longKey = `folder/${"long-".repeat(30)}key`;
  return [
    buildTar([...sample(rng, "s0"), ...sample(rng, "s1"), ...sample(rng, "s2")]),
    buildTar([
      paxMember({ path: `${longKey}.jpg` }),
      { name: "trunc.jpg", data: filler(rng, 700) },
      paxMember({ path: `${longKey}.txt`, size: "9" }),
      { name: "trunc.txt", data: encoder.encode("a caption") },
    ]),
    buildTar([
      gnuLongNameMember(`${longKey}2.jpg`),
      { name: "x.jpg", data: filler(rng, 900), magic: "gnu" },
      gnuLongNameMember(`${longKey}2.txt`),
      { name: "x.txt", data: encoder.encode("gnu caption"), magic: "gnu" },
    ]),
    buildTar([
      { name: new Uint8Array([0xff, 0xfe, 0xc3, 0x28, 0x2e, 0x6a, 0x70, 0x67]), data: filler(rng, 64) },
      { name: new Uint8Array([0xff, 0xfe, 0xc3, 0x28, 0x2e, 0x74, 0x78, 0x74]), data: encoder.encode("latin-1 name") },
    ]),
    buildTar([
      { name: "b.jpg", data: filler(rng, 1200), base256Size: true },
      { name: "b.txt", data: encoder.encode("base-256 size"), base256Size: true },
    ]),
    buildTar([
      { name: "dir/", data: new Uint8Array(0), type: "5" },
      { name: "link.jpg", data: new Uint8Array(0), type: "2" },
      { name: "hard.jpg", data: new Uint8Array(0), type: "1" },
      ...sample(rng, "dir/s3"),
    ]),
  ];
}

const OFFSET_CLASSES = ["in-header", "block-boundary", "in-data", "in-padding", "in-end"] as const;

function truncationPoint(rng: Rng, tar: BuiltTar, kind: typeof OFFSET_CLASSES[number]): number {
  const { layout } = tar;
  switch (kind) {
    case "in-header":
      return pick(rng, layout.headers) + 1 + rng.int(511);
    case "block-boundary":
      return 512 * rng.int(tar.bytes.length / 512);
    case "in-data": {
      const [start, end] = pick(rng, layout.data);
      return end > start ? start + rng.int(end - start) : start;
    }
    case "in-padding": {
      const [start, end] = pick(rng, layout.padding);
      return end > start ? start + rng.int(end - start) : start;
    }
    default:
      return layout.end + rng.int(1024);
  }
}

/** Size fields a corrupt or hostile header might carry: past the end, past the member limit, past 2^53. */
function absurdSize(rng: Rng, block: Uint8Array): string {
  switch (rng.int(4)) {
    case 0:
      block.set(encoder.encode("77777777777\0"), 124); // 8 GiB - 1 in octal
      return "octal-8GiB";
    case 1:
      setBase256Size(block, 1n << BigInt(40 + rng.int(22)));
      return "base256-huge";
    case 2:
      block.set(encoder.encode((200_000_000 + rng.int(1000)).toString(8).padStart(11, "0") + "\0"), 124);
      return "octal-200MB"; // under the member limit: must not be allocated before the data arrives
    default:
      block.set(encoder.encode(" 9 9\0\0\0\0\0\0\0\0"), 124);
      return "octal-garbage";
  }
}

function generate(state: BuiltTar[], rng: Rng): FuzzInput<TarCase> {
  const tar = pick(rng, state);
  const chunk = pick(rng, [1, 7, 100, 512, 4096, 1 << 20]);
  let bytes: Uint8Array;
  let kind: string;
  switch (rng.int(6)) {
    case 0: {
      const where = pick(rng, OFFSET_CLASSES);
      bytes = tar.bytes.slice(0, Math.min(tar.bytes.length, truncationPoint(rng, tar, where)));
      kind = `truncate:${where}`;
      break;
    }
    case 1:
    case 2: {
      const fixChecksum = rng.int(2) === 1;
      bytes = tar.bytes.slice();
      const at = pick(rng, tar.layout.headers);
      const block = bytes.subarray(at, at + 512);
      for (let k = 1 + rng.int(6); k > 0; k--) block[rng.int(512)] = rng.int(256);
      if (fixChecksum) setChecksum(block);
      kind = fixChecksum ? "header:checksum-fixed" : "header:checksum-wrong";
      break;
    }
    case 3: {
      bytes = tar.bytes.slice();
      const at = pick(rng, tar.layout.headers);
      const block = bytes.subarray(at, at + 512);
      kind = `size:${absurdSize(rng, block)}`;
      setChecksum(block);
      if (rng.int(2) === 0) bytes = bytes.slice(0, at + 512 + rng.int(4096)); // and the data is not there
      break;
    }
    case 4: {
      // Edits inside metadata payloads (pax records, GNU long names) with a valid header in front.
      const i = rng.int(tar.layout.data.length);
      const [start, end] = tar.layout.data[i];
      bytes = tar.bytes.slice();
      const region = mutateBytes(rng, bytes.subarray(start, end), 4).subarray(0, end - start);
      bytes.set(region, start);
      kind = "payload-edit";
      break;
    }
    default:
      bytes = mutateBytes(rng, tar.bytes, 12);
      kind = "random-edits";
  }
  return { kind, value: { bytes, chunk }, bytes: bytes.length };
}

async function run(_state: BuiltTar[], input: TarCase): Promise<Accepted> {
  let refusal: TarError | undefined;
  let total = 0;
  try {
    for await (const entry of readTar(streamOf(input.bytes, input.chunk))) {
      total += entry.data.length;
      if (entry.data.length !== entry.size) throw new InvariantError(`member ${entry.name}: size and data disagree`);
      if (total > input.bytes.length) throw new InvariantError("the reader returned more data than the archive holds");
    }
  } catch (e) {
    if (!(e instanceof TarError)) throw e;
    refusal = e;
  }
  // The same bytes as a shard: the reader must never throw, and must count what it skipped.
  const reader = new WebDatasetReader({
    shards: ["fuzz.tar"],
    required: IMAGE_TEXT_REQUIREMENTS,
    openShard: () => Promise.resolve(streamOf(input.bytes, input.chunk)),
  });
  for await (const _ of reader.samples()) { /* drain */ }
  const c = reader.counters;
  if (refusal && c.skippedCorrupt !== 1) {
    throw new InvariantError(`the tar reader refused the archive but the shard reader counted ${c.skippedCorrupt}`);
  }
  if (refusal) throw refusal;
  return c.skippedMissingKeys > 0 ? "skipped" : "accepted";
}

export const tarTarget: FuzzTarget<BuiltTar[], TarCase> = {
  name: "tar",
  refusals: ["TarError"],
  prepare: () => Promise.resolve(seeds()),
  generate,
  run,
};
