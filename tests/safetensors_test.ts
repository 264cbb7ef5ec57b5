import assert from "node:assert/strict";
import {
  bf16BitsToF32,
  encodeSafetensors,
  f16BitsToF32,
  f32ToBf16Bits,
  f32ToF16Bits,
  isFloatTensor,
  parseSafetensors,
  SafetensorsError,
  type SafetensorsErrorKind,
  SafetensorsFile,
  writeSafetensors,
} from "../lib/io/safetensors.ts";
import { loadStateDict, resolveCheckpoint, saveHubLayout, type StateDict } from "../lib/io/checkpoint_layout.ts";
import { hfToOpenClip } from "../lib/io/hf_keys.ts";
import { expectedShapes } from "../lib/nn/config.ts";
import { ClipError } from "../lib/errors.ts";

const MODELS = new URL("./fixtures/models/", import.meta.url).pathname;

// ---------------------------------------------------------------------------------------------------------------
// Float conversions against hand-computed bit patterns

Deno.test("f32 -> f16 rounds to nearest even, with subnormals, overflow, inf and NaN", () => {
  const cases: [number, number][] = [
    [1, 0x3c00],
    [-2, 0xc000],
    [0.5, 0x3800],
    [-0, 0x8000],
    [1 / 3, 0x3555], // 0.333251953125
    [0.1, 0x2e66], // 0.0999755859375
    [65504, 0x7bff], // largest finite
    [65519, 0x7bff], // below the halfway point to 65536
    [65520, 0x7c00], // halfway, odd mantissa: rounds up, overflowing to infinity
    [1e6, 0x7c00],
    [Infinity, 0x7c00],
    [-Infinity, 0xfc00],
    [2 ** -14, 0x0400], // smallest normal
    [1023 * 2 ** -24, 0x03ff], // largest subnormal
    [2 ** -24, 0x0001], // smallest subnormal
    [2 ** -25, 0x0000], // exactly half the smallest subnormal: ties to even (zero)
    [3 * 2 ** -26, 0x0001], // above half: rounds up
    [3 * 2 ** -25, 0x0002], // 1.5 ulp: ties to even (2)
    [2 ** -30, 0x0000],
    [1 + 2 ** -11, 0x3c00], // tie between 0x3c00 and 0x3c01: even
    [1 + 3 * 2 ** -11, 0x3c02], // tie between 0x3c01 and 0x3c02: even
    [1 + 2 ** -11 + 2 ** -20, 0x3c01], // just above the tie
    [(2 - 2 ** -11) * 2 ** -15, 0x0400], // subnormal rounding carries into the smallest normal
  ];
  for (const [value, bits] of cases) {
    assert.equal(
      f32ToF16Bits(value),
      bits,
      `f16(${value}) = 0x${f32ToF16Bits(value).toString(16)}, want 0x${bits.toString(16)}`,
    );
  }
  const nan = f32ToF16Bits(NaN);
  assert.equal(nan & 0x7c00, 0x7c00);
  assert.notEqual(nan & 0x03ff, 0);
});

Deno.test("f16 -> f32 decodes every class exactly", () => {
  assert.equal(f16BitsToF32(0x3c00), 1);
  assert.equal(f16BitsToF32(0x3555), 0.333251953125);
  assert.equal(f16BitsToF32(0x0001), 2 ** -24);
  assert.equal(f16BitsToF32(0x03ff), 1023 * 2 ** -24);
  assert.equal(f16BitsToF32(0x0400), 2 ** -14);
  assert.equal(f16BitsToF32(0x7bff), 65504);
  assert.equal(f16BitsToF32(0x7c00), Infinity);
  assert.equal(f16BitsToF32(0xfc00), -Infinity);
  assert.ok(Number.isNaN(f16BitsToF32(0x7e00)));
  assert.ok(Object.is(f16BitsToF32(0x8000), -0));
  // Every finite half survives a round trip through f32.
  for (let h = 0; h < 0x10000; h++) {
    if ((h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0) continue;
    assert.equal(f32ToF16Bits(f16BitsToF32(h)), h);
  }
});

Deno.test("f32 <-> bf16 rounds to nearest even and keeps NaN a NaN", () => {
  const cases: [number, number][] = [
    [1, 0x3f80],
    [-2, 0xc000],
    [1 / 3, 0x3eab], // f32 0x3eaaaaab: low half 0xaaab is above the tie
    [0.1, 0x3dcd], // f32 0x3dcccccd
    [1 + 2 ** -8, 0x3f80], // f32 0x3f808000: tie, even
    [1 + 3 * 2 ** -8, 0x3f82], // f32 0x3f818000: tie, even
    [3.4028234663852886e38, 0x7f80], // largest f32 rounds up to infinity
    [Infinity, 0x7f80],
    [-Infinity, 0xff80],
    [2 ** -149, 0x0000], // f32 subnormal 0x00000001
    [2 ** -133 + 2 ** -134, 0x0002], // f32 0x00018000: tie, even
  ];
  for (const [value, bits] of cases) {
    assert.equal(
      f32ToBf16Bits(value),
      bits,
      `bf16(${value}) = 0x${f32ToBf16Bits(value).toString(16)}, want 0x${bits.toString(16)}`,
    );
  }
  assert.equal(f32ToBf16Bits(NaN) & 0x7fc0, 0x7fc0);
  assert.equal(bf16BitsToF32(0x3eab), 0.333984375);
  assert.equal(bf16BitsToF32(0x7f80), Infinity);
  assert.ok(Number.isNaN(bf16BitsToF32(0x7fc0)));
});

// ---------------------------------------------------------------------------------------------------------------
// Round trips

const values = new Float32Array([1, -2, 1 / 3, 0.1, 65520, 2 ** -25, 3 * 2 ** -25, Infinity]);

Deno.test("encode/parse round trip for F32, F16 and BF16 with the exact stored bits", () => {
  const bytes = encodeSafetensors({
    "f32": { dtype: "F32", shape: [2, 4], data: values },
    "f16": { dtype: "F16", shape: [8], data: values },
    "bf16": { dtype: "BF16", shape: [4, 2], data: values },
    "scalar": { dtype: "F32", shape: [], data: new Float32Array([4.5]) },
  }, { format: "pt", note: "hi" });
  const headerLength = Number(new DataView(bytes.buffer).getBigUint64(0, true));
  assert.equal((8 + headerLength) % 8, 0);
  const header = new TextDecoder().decode(bytes.subarray(8, 8 + headerLength));
  assert.match(header, /^\{.*\} *$/);

  const st = parseSafetensors(bytes);
  assert.deepEqual(st.keys().sort(), ["bf16", "f16", "f32", "scalar"]);
  assert.deepEqual(st.metadata, { format: "pt", note: "hi" });
  assert.deepEqual(st.info("f16"), { dtype: "F16", shape: [8], byteLength: 16, byteOffset: st.info("f16").byteOffset });
  assert.deepEqual([...st.readF32("f32")], [...values]);
  assert.deepEqual([...st.readF32("scalar")], [4.5]);

  const f16Raw = st.readBytes("f16");
  const f16Bits = [...new Uint16Array(f16Raw.slice().buffer)];
  assert.deepEqual(f16Bits, [0x3c00, 0xc000, 0x3555, 0x2e66, 0x7c00, 0x0000, 0x0002, 0x7c00]);
  assert.deepEqual([...st.readF32("f16")], [1, -2, 0.333251953125, 0.0999755859375, Infinity, 0, 2 ** -23, Infinity]);

  const bf16Bits = [...new Uint16Array(st.readBytes("bf16").slice().buffer)];
  assert.deepEqual(bf16Bits, [0x3f80, 0xc000, 0x3eab, 0x3dcd, 0x4780, 0x3300, 0x33c0, 0x7f80]);
  assert.equal(st.readF32("bf16")[4], 65536); // f32 0x477ff000: the low half 0xf000 rounds up to 0x4780
});

Deno.test("writeSafetensors writes atomically and SafetensorsFile reads the same tensors back", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/w.safetensors`;
    await Deno.writeTextFile(path, "old contents");
    const big = new Float32Array(100_000).map((_, i) => Math.sin(i) * 1000);
    await writeSafetensors(
      path,
      new Map([
        ["big", { dtype: "F32" as const, shape: [100, 1000], data: big }],
        ["half", { dtype: "F16" as const, shape: [8], data: values }],
      ]),
      { format: "pt" },
    );
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["w.safetensors"]);
    const file = await SafetensorsFile.open(path);
    try {
      assert.deepEqual(file.info("big").shape, [100, 1000]);
      assert.deepEqual(await file.readF32("big"), big);
      const [a, b] = await Promise.all([file.readF32("half"), file.readF32("big")]); // concurrent reads share one handle
      assert.deepEqual([...a], [1, -2, 0.333251953125, 0.0999755859375, Infinity, 0, 2 ** -23, Infinity]);
      assert.deepEqual(b, big);
      assert.deepEqual(file.metadata, { format: "pt" });
    } finally {
      file.close();
    }
    await assert.rejects(
      writeSafetensors(`${dir}/bad.safetensors`, { x: { dtype: "F32", shape: [3], data: new Float32Array(2) } }),
      /shape \[3\] has 3 elements but the data has 2/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["w.safetensors"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Hostile headers

function withHeader(header: string, dataBytes: number, claimedLength?: number): Uint8Array {
  const json = new TextEncoder().encode(header);
  const out = new Uint8Array(8 + json.length + dataBytes);
  new DataView(out.buffer).setBigUint64(0, BigInt(claimedLength ?? json.length), true);
  out.set(json, 8);
  return out;
}

function expectKind(bytes: Uint8Array, kind: SafetensorsErrorKind, pattern: RegExp) {
  assert.throws(() => parseSafetensors(bytes, "evil.safetensors"), (e: unknown) => {
    assert.ok(e instanceof SafetensorsError, `expected SafetensorsError, got ${e}`);
    assert.ok(e instanceof ClipError);
    assert.equal(e.kind, kind, e.message);
    assert.match(e.message, pattern);
    assert.match(e.message, /evil\.safetensors/);
    return true;
  });
}

Deno.test("hostile headers are refused, each with its own error kind", () => {
  const t = (offsets: number[], shape = [2], dtype = "F32") => JSON.stringify({ dtype, shape, data_offsets: offsets });
  expectKind(new Uint8Array(5), "truncated", /too short/);
  expectKind(withHeader("{}", 0, 1_000_000), "header-length", /header claims 1000000 bytes/);
  expectKind(withHeader("{}", 0, 2 ** 40), "header-length", /header claims/);
  expectKind(withHeader("{not json", 0), "header-json", /not valid UTF-8 JSON/);
  expectKind(withHeader("[1,2]", 0), "header-json", /not a JSON object/);
  expectKind(withHeader(`{"a":${t([0, 8])},"a":${t([8, 16])}}`, 16), "duplicate-key", /'a' appears twice/);
  expectKind(withHeader(`{"a":${t([0, 8], [2], "F42")}}`, 8), "unknown-dtype", /unknown dtype "F42"/);
  expectKind(withHeader(`{"a":${t([0, 8], [2, -1])}}`, 8), "bad-shape", /not a non-negative integer/);
  expectKind(
    withHeader(`{"a":${t([0, 8], [2 ** 40, 2 ** 40])}}`, 8),
    "bad-shape",
    /needs more bytes than the file holds/,
  );
  expectKind(withHeader(`{"a":${t([0, 16])}}`, 8), "bad-offsets", /\[0, 16\] fall outside the 8-byte data section/);
  expectKind(withHeader(`{"a":${t([8, 0])}}`, 8), "bad-offsets", /fall outside/);
  expectKind(withHeader(`{"a":${t([0, 12])}}`, 12), "byte-length", /12 bytes stored but F32 x \[2\] needs 8/);
  expectKind(withHeader(`{"a":${t([0, 8])},"b":${t([4, 12])}}`, 12), "overlap", /'a' and 'b' overlap/);
  expectKind(
    withHeader(`{"a":${t([0, 8])},"b":${t([12, 20])}}`, 20),
    "bad-offsets",
    /bytes 8 to 12 before tensor 'b' belong to no tensor/,
  );
  expectKind(withHeader(`{"a":${t([0, 8])}}`, 12), "bad-offsets", /cover 8 bytes but the data section has 12/);
  expectKind(withHeader(`{"__metadata__":{"x":1},"a":${t([0, 8])}}`, 8), "bad-metadata", /__metadata__/);
  expectKind(withHeader(`{"a":[1]}`, 0), "bad-entry", /not an object/);
  // The same names are legal inside nested objects: only top-level duplicates matter.
  const nested = parseSafetensors(withHeader(`{"__metadata__":{"a":"1"},"a":${t([0, 8])}}`, 8));
  assert.deepEqual(nested.keys(), ["a"]);
});

Deno.test("SafetensorsFile.open validates like parseSafetensors, and integer tensors are not read as floats", async () => {
  const dir = await Deno.makeTempDir();
  try {
    await Deno.writeFile(`${dir}/long.safetensors`, withHeader("{}", 0, 64));
    await assert.rejects(
      SafetensorsFile.open(`${dir}/long.safetensors`),
      (e: unknown) => e instanceof SafetensorsError && e.kind === "header-length",
    );
    await Deno.writeFile(
      `${dir}/int.safetensors`,
      withHeader(JSON.stringify({ n: { dtype: "I64", shape: [], data_offsets: [0, 8] } }), 8),
    );
    const file = await SafetensorsFile.open(`${dir}/int.safetensors`);
    try {
      assert.equal(isFloatTensor(file.info("n")), false);
      await assert.rejects(
        file.readF32("n"),
        (e: unknown) => e instanceof SafetensorsError && e.kind === "unsupported-dtype",
      );
      assert.throws(
        () => file.info("missing"),
        (e: unknown) => e instanceof SafetensorsError && e.kind === "missing-key",
      );
    } finally {
      file.close();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

// ---------------------------------------------------------------------------------------------------------------
// Reference checkpoints

Deno.test("vit_tiny: every key and shape equals expectedShapes; logit_scale is ln 100", async () => {
  const resolved = await resolveCheckpoint(`${MODELS}vit_tiny`);
  assert.equal(resolved.naming, "open_clip");
  assert.equal(resolved.config.quick_gelu, true);
  const file = await SafetensorsFile.open(resolved.weightsPath!);
  try {
    const fromFile = new Map(file.keys().map((k) => [k, file.info(k).shape]));
    assert.deepEqual(fromFile, new Map([...expectedShapes(resolved.config)].sort()));
  } finally {
    file.close();
  }
  const sd = await loadStateDict(resolved);
  assert.deepEqual([...sd.keys()], [...expectedShapes(resolved.config).keys()]);
  assert.equal(sd.get("logit_scale")!.data[0], Math.fround(Math.log(100)));
});

Deno.test("rn_tiny: F16 weights read as f32, the 19 I64 counters skipped", async () => {
  const resolved = await resolveCheckpoint(`${MODELS}rn_tiny`);
  const file = await SafetensorsFile.open(resolved.weightsPath!);
  let rawConv: Uint8Array;
  try {
    const ints = file.keys().filter((k) => !isFloatTensor(file.info(k)));
    assert.equal(ints.length, 19);
    assert.ok(ints.every((k) => k.endsWith("num_batches_tracked") && file.info(k).dtype === "I64"));
    assert.equal(file.info("visual.conv1.weight").dtype, "F16");
    rawConv = await file.readBytes("visual.conv1.weight");
  } finally {
    file.close();
  }
  const sd = await loadStateDict(resolved);
  assert.deepEqual(new Set(sd.keys()), new Set(expectedShapes(resolved.config).keys()));
  assert.equal(sd.get("logit_scale")!.data[0], 3.16015625);
  // The converted values are exactly the stored halves.
  const halves = new Uint16Array(rawConv.slice().buffer);
  assert.deepEqual(sd.get("visual.conv1.weight")!.data, Float32Array.from(halves, f16BitsToF32));
  assert.deepEqual(sd.get("visual.conv1.weight")!.shape, [8, 3, 3, 3]);
});

Deno.test("vit_tiny_hf maps onto exactly vit_tiny's open_clip tensors", async () => {
  const hf = await resolveCheckpoint(`${MODELS}vit_tiny_hf`);
  const oc = await resolveCheckpoint(`${MODELS}vit_tiny`);
  assert.equal(hf.naming, "hf");
  assert.deepEqual(hf.config, oc.config);
  assert.deepEqual(hf.preprocess, oc.preprocess);
  const [a, b] = await Promise.all([loadStateDict(hf), loadStateDict(oc)]);
  assert.deepEqual([...a.keys()], [...b.keys()]);
  for (const [key, t] of b) {
    assert.deepEqual(a.get(key)!.shape, t.shape, key);
    assert.deepEqual(a.get(key)!.data, t.data, key);
  }
});

Deno.test("hfToOpenClip packs q|k|v rows and transposes projections", () => {
  const m = (shape: number[], start: number) => ({
    shape,
    data: Float32Array.from({ length: shape.reduce((x, y) => x * y, 1) }, (_, i) => start + i),
  });
  const out = hfToOpenClip(
    new Map([
      ["text_model.encoder.layers.0.self_attn.q_proj.weight", m([2, 2], 0)],
      ["text_model.encoder.layers.0.self_attn.k_proj.weight", m([2, 2], 10)],
      ["text_model.encoder.layers.0.self_attn.v_proj.weight", m([2, 2], 20)],
      ["visual_projection.weight", m([2, 3], 0)],
    ]),
  );
  assert.deepEqual(out.get("transformer.resblocks.0.attn.in_proj_weight"), {
    shape: [6, 2],
    data: new Float32Array([0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]),
  });
  assert.deepEqual(out.get("visual.proj"), { shape: [3, 2], data: new Float32Array([0, 3, 1, 4, 2, 5]) });
  assert.throws(
    () => hfToOpenClip(new Map([["text_model.encoder.layers.0.self_attn.q_proj.bias", m([2], 0)]])),
    /no matching k_proj/,
  );
  assert.throws(
    () => hfToOpenClip(new Map([["text_model.pooler.dense.weight", m([2], 0)]])),
    /'text_model\.pooler\.dense\.weight' is not a key/,
  );
});

async function copyDir(from: string, to: string) {
  await Deno.mkdir(to, { recursive: true });
  for (const e of Deno.readDirSync(from)) if (e.isFile) await Deno.copyFile(`${from}/${e.name}`, `${to}/${e.name}`);
}

Deno.test("loadStateDict names the key and both shapes when a checkpoint does not fit its config", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const base = await resolveCheckpoint(`${MODELS}vit_tiny`);
    const sd = await loadStateDict(base);
    const write = async (
      name: string,
      edit: (m: Map<string, { dtype: "F32"; shape: number[]; data: Float32Array }>) => void,
    ) => {
      await copyDir(`${MODELS}vit_tiny`, `${dir}/${name}`);
      const tensors = new Map([...sd].map(([k, t]) => [k, { dtype: "F32" as const, shape: t.shape, data: t.data }]));
      edit(tensors);
      await writeSafetensors(`${dir}/${name}/open_clip_model.safetensors`, tensors);
      return loadStateDict(await resolveCheckpoint(`${dir}/${name}`));
    };
    await assert.rejects(
      write("missing", (m) => m.delete("visual.ln_post.bias")),
      /tensor 'visual\.ln_post\.bias' \(shape \[64\]\) is missing/,
    );
    await assert.rejects(
      write("extra", (m) => m.set("visual.extra", { dtype: "F32", shape: [3], data: new Float32Array(3) })),
      /tensor 'visual\.extra' \(shape \[3\]\) is not part of a ViT CLIP/,
    );
    await assert.rejects(
      write("shape", (m) => m.set("visual.proj", { dtype: "F32", shape: [32, 64], data: sd.get("visual.proj")!.data })),
      /tensor 'visual\.proj' has shape \[32, 64\] but the config needs \[64, 32\]/,
    );
    await assert.rejects(resolveCheckpoint(`${dir}/nothing-here`), /does not exist/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("saveHubLayout writes a folder that loads back (F16 rounding exact) and refuses incomplete state dicts", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const src = await resolveCheckpoint(`${MODELS}vit_tiny`);
    const sd = await loadStateDict(src);
    await saveHubLayout(`${dir}/out`, src.config, src.preprocess, sd, { dtype: "F16" });
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["out"]);
    const back = await resolveCheckpoint(`${dir}/out`);
    assert.deepEqual(back.config, src.config);
    assert.deepEqual(back.preprocess, src.preprocess);
    const loaded = await loadStateDict(back);
    for (const [key, t] of sd) {
      assert.deepEqual(loaded.get(key)!.data, t.data.map((v) => f16BitsToF32(f32ToF16Bits(v))), key);
    }
    // Overwriting an existing folder in F32 gives the original values back exactly.
    await saveHubLayout(`${dir}/out`, src.config, src.preprocess, sd);
    const exact: StateDict = await loadStateDict(await resolveCheckpoint(`${dir}/out`));
    for (const [key, t] of sd) assert.deepEqual(exact.get(key)!.data, t.data, key);

    const partial = new Map(sd);
    partial.delete("logit_scale");
    await assert.rejects(
      saveHubLayout(`${dir}/bad`, src.config, src.preprocess, partial),
      /'logit_scale' \(shape \[\]\) is missing/,
    );
    assert.deepEqual([...Deno.readDirSync(dir)].map((e) => e.name), ["out"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
