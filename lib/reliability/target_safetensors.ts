/**
 * Fuzz target: the safetensors reader, in memory and from a file. Inputs are valid files with one thing wrong: a
 * header length past the end of the file, offsets out of range, reversed, overlapping or leaving gaps, a byte length
 * that does not match dtype x shape, huge or malformed shapes, unknown dtypes, a header that is not JSON (or not an
 * object), duplicate keys, bad metadata, and random edits or truncation of the whole file.
 */
import type { Rng } from "../data/rng.ts";
import {
  encodeSafetensors,
  isFloatTensor,
  parseSafetensors,
  SafetensorsError,
  SafetensorsFile,
} from "../io/safetensors.ts";
import { type Accepted, type FuzzInput, type FuzzTarget, InvariantError } from "./fuzz_target.ts";
import { mutateBytes, pick } from "./mutate.ts";

interface State {
  /** A valid file of three tensors (F32, F16, BF16) with metadata, and its header entries. */
  file: Uint8Array;
  entries: [string, { dtype: string; shape: number[]; data_offsets: [number, number] }][];
  data: Uint8Array;
  tmpDir: string;
}

interface Case {
  bytes: Uint8Array;
  /** Also read it back through SafetensorsFile (seek + read), not only from memory. */
  fromFile: boolean;
}

const encoder = new TextEncoder();

function withHeader(headerText: string, data: Uint8Array, claimedLength?: bigint): Uint8Array {
  const header = encoder.encode(headerText);
  const out = new Uint8Array(8 + header.length + data.length);
  new DataView(out.buffer).setBigUint64(0, claimedLength ?? BigInt(header.length), true);
  out.set(header, 8);
  out.set(data, 8 + header.length);
  return out;
}

async function prepare(): Promise<State> {
  const file = encodeSafetensors({
    a: { dtype: "F32", shape: [2, 3], data: new Float32Array([1, 2, 3, 4, 5, 6]) },
    b: { dtype: "F16", shape: [4], data: new Float32Array([0.5, -1, 65504, 1e-7]) },
    c: { dtype: "BF16", shape: [3, 1], data: new Float32Array([3.5, -0, 1e30]) },
  }, { format: "pt" });
  const n = Number(new DataView(file.buffer).getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(file.subarray(8, 8 + n)));
  delete header.__metadata__;
  return {
    file,
    entries: Object.entries(header),
    data: file.slice(8 + n),
    tmpDir: await Deno.makeTempDir({ prefix: "clip-fuzz-st-" }),
  };
}

const HUGE_SHAPES: unknown[] = [
  [2 ** 40, 2 ** 40],
  [1e15],
  [2 ** 53],
  [9007199254740993],
  new Array(64).fill(1024),
  [-1, 3],
  [1.5],
  ["2", 3],
  [null],
  {},
  "2x3",
];
const BAD_OFFSETS = (len: number): unknown[] => [
  [0, len + 1],
  [len, 0],
  [-4, 4],
  [1.5, 4],
  ["0", "4"],
  [0],
  [0, 4, 8],
  [2 ** 53, 2 ** 53 + 8],
  null,
];
const BAD_DTYPES: unknown[] = ["F31", "", "f32", 7, null, "I8", "BOOL", "U64", "__proto__", ["F32"]];
const NOT_JSON = ["", "[]", "null", "1", '"x"', "{", '{"a":', "{'a': 1}", "\u0000{}", "{}}"];

function generate(s: State, rng: Rng): FuzzInput<Case> {
  const fileLength = s.file.length;
  const entries = s.entries.map(([k, v]) => [k, structuredClone(v)] as [string, Record<string, unknown>]);
  const objectText = (list: [string, unknown][]) =>
    `{${list.map(([k, v]) => `${JSON.stringify(k)}:${JSON.stringify(v)}`).join(",")}}`;
  let bytes: Uint8Array;
  let kind: string;
  const target = entries[rng.int(entries.length)][1];
  switch (rng.int(10)) {
    case 0: {
      const claims = [fileLength - 7, fileLength, 2n ** 32n, 2n ** 53n, 2n ** 63n, 2n ** 64n - 1n, 0n, 1n];
      const claim = pick(rng, claims);
      bytes = withHeader(objectText(entries), s.data, BigInt(claim));
      kind = "header-length";
      break;
    }
    case 1: {
      const second = entries[(entries.indexOf(entries.find(([, v]) => v === target)!) + 1) % entries.length][1];
      const [a, b] = target.data_offsets as [number, number];
      // Besides malformed pairs: shifted by one, one byte short, and moved onto the next tensor's bytes with its own
      // length kept (so only the overlap check can refuse it).
      const other = (second.data_offsets as [number, number])[0];
      const options = [...BAD_OFFSETS(s.data.length), [a + 1, b + 1], [a, b - 1], [other, other + b - a]];
      target.data_offsets = rng.int(3) === 0 ? [other, other + b - a] : pick(rng, options);
      bytes = withHeader(objectText(entries), s.data);
      kind = "offsets";
      break;
    }
    case 2: {
      const shape = target.shape as number[];
      target.shape = rng.int(2) === 0 ? [...shape, 2] : shape.map((d) => d + 1);
      if (rng.int(3) === 0) target.dtype = pick(rng, ["F64", "I64", "U8", "F8_E4M3"]);
      bytes = withHeader(objectText(entries), s.data);
      kind = "byte-length";
      break;
    }
    case 3:
      target.shape = pick(rng, HUGE_SHAPES);
      bytes = withHeader(objectText(entries), s.data);
      kind = "huge-shape";
      break;
    case 4:
      target.dtype = pick(rng, BAD_DTYPES);
      bytes = withHeader(objectText(entries), s.data);
      kind = "dtype";
      break;
    case 5: {
      const text = rng.int(2) === 0
        ? pick(rng, NOT_JSON)
        : new TextDecoder("latin1").decode(mutateBytes(rng, encoder.encode(objectText(entries)), 6));
      bytes = withHeader(text, s.data);
      if (rng.int(4) === 0) bytes[8 + rng.int(Math.max(1, bytes.length - 8))] = 0xff; // invalid UTF-8
      kind = "not-json";
      break;
    }
    case 6: {
      const dup = entries[rng.int(entries.length)];
      const list: [string, unknown][] = [...entries, [dup[0], dup[1]]];
      if (rng.int(2) === 0) list.push(["__proto__", dup[1]]);
      bytes = withHeader(objectText(list), s.data);
      kind = "duplicate-key";
      break;
    }
    case 7: {
      const metadata = pick(rng, [{ a: 1 }, ["x"], "meta", null, { a: { b: "c" } }, { ok: "yes" }]);
      bytes = withHeader(objectText([["__metadata__", metadata], ...entries]), s.data);
      kind = "metadata";
      break;
    }
    case 8:
      bytes = s.file.slice(0, rng.int(fileLength));
      kind = "truncate";
      break;
    default:
      bytes = mutateBytes(rng, s.file, 8);
      kind = "random-edits";
  }
  return { kind, value: { bytes, fromFile: rng.int(8) === 0 }, bytes: bytes.length };
}

function product(shape: readonly number[]): number {
  return shape.reduce((a, b) => a * b, 1);
}

async function run(s: State, input: Case): Promise<Accepted> {
  const memory = parseSafetensors(input.bytes, "fuzz.safetensors");
  for (const key of memory.keys()) {
    const info = memory.info(key);
    if (memory.readBytes(key).length !== info.byteLength) throw new InvariantError(`${key}: byte length changed`);
    if (isFloatTensor(info) && memory.readF32(key).length !== product(info.shape)) {
      throw new InvariantError(`${key}: element count differs from the shape`);
    }
  }
  if (input.fromFile) {
    const path = `${s.tmpDir}/fuzz.safetensors`;
    await Deno.writeFile(path, input.bytes);
    const file = await SafetensorsFile.open(path);
    try {
      for (const key of file.keys()) if (isFloatTensor(file.info(key))) await file.readF32(key);
    } finally {
      file.close();
    }
  }
  return "accepted";
}

export const safetensorsTarget: FuzzTarget<State, Case> = {
  name: "safetensors",
  refusals: ["SafetensorsError"],
  prepare,
  generate,
  run,
};

/** The error kind of a SafetensorsError, to report which check refused an input. */
export function safetensorsKind(e: unknown): string | undefined {
  return e instanceof SafetensorsError ? e.kind : undefined;
}
