// .npy writing and reading against files written by numpy.save (NumPy 2.4): the bytes must match exactly.
import assert from "node:assert/strict";
import { decodeNpy, encodeNpy, type NpyArray, npyHeader, readNpy, toFloat16, writeNpy } from "../lib/io/npy.ts";
import { ClipError } from "../lib/errors.ts";
import { randomArray } from "./helpers.ts";

const FIXTURES = new URL("./fixtures/npy/", import.meta.url);
const fixture = (name: string) => Deno.readFileSync(new URL(name, FIXTURES));

/** The arrays the fixture files were made from (see the values in each case). */
const CASES: { file: string; array: NpyArray }[] = [
  {
    file: "f32_2x3.npy",
    array: { dtype: "f32", shape: [2, 3], data: Float32Array.of(0, 1.5, -2.25, 3.0e-8, 65504, -0) },
  },
  {
    file: "f16_5.npy",
    array: { dtype: "f16", shape: [5], data: toFloat16(Float32Array.of(0.1, -2.5, 65504, 1e-7, 0.333251953125)) },
  },
  { file: "i32_2x2x2.npy", array: { dtype: "i32", shape: [2, 2, 2], data: Int32Array.of(-4, -3, -2, -1, 0, 1, 2, 3) } },
  { file: "f32_scalar.npy", array: { dtype: "f32", shape: [], data: Float32Array.of(7) } },
  { file: "f32_empty_0x4.npy", array: { dtype: "f32", shape: [0, 4], data: new Float32Array(0) } },
  {
    // A header that is already 64-aligned: NumPy still pads a full 64 bytes.
    file: "f32_aligned_14d.npy",
    array: {
      dtype: "f32",
      shape: [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 100],
      data: Float32Array.from({ length: 100 }, (_, i) => i),
    },
  },
];

Deno.test("encodeNpy writes exactly the bytes numpy.save writes", () => {
  for (const { file, array } of CASES) {
    assert.deepEqual(encodeNpy(array), fixture(file), file);
  }
});

Deno.test("npyHeader: the known header of a float32 (2, 3) array", () => {
  const header = npyHeader("f32", [2, 3]);
  const text = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }" + " ".repeat(58) + "\n";
  assert.equal(header.length, 128);
  assert.deepEqual([...header.subarray(0, 10)], [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0, 118, 0]);
  assert.equal(new TextDecoder().decode(header.subarray(10)), text);
});

Deno.test("decodeNpy reads numpy's files back to the same values", () => {
  for (const { file, array } of CASES) {
    const got = decodeNpy(fixture(file), file);
    assert.equal(got.dtype, array.dtype, file);
    assert.deepEqual(got.shape, array.shape, file);
    assert.deepEqual([...got.data], [...array.data], file);
  }
});

Deno.test("toFloat16 rounds to nearest even like numpy's astype(float16)", () => {
  const half = toFloat16(Float32Array.of(0.1, 65504, 65520, 1e-7, 2049, 2051, -0));
  const bits = new Uint16Array(half.buffer);
  // numpy: float16(0.1).view(uint16) = 11878; 65520 overflows to inf; 1e-7 is the subnormal 2; 2049 -> 2048, 2051 -> 2052.
  assert.deepEqual([...bits], [11878, 0x7bff, 0x7c00, 2, 0x6800, 0x6802, 0x8000]);
});

Deno.test("write/read round trip of random arrays in every dtype and several shapes", async () => {
  const dir = await Deno.makeTempDir();
  try {
    for (const shape of [[7], [3, 5], [2, 3, 4], [1, 1]]) {
      const size = shape.reduce((a, b) => a * b, 1);
      const values = Float32Array.from(randomArray(size, size, -100, 100));
      const arrays: NpyArray[] = [
        { dtype: "f32", shape, data: values },
        { dtype: "f16", shape, data: toFloat16(values) },
        { dtype: "i32", shape, data: Int32Array.from(values, Math.round) },
      ];
      for (const array of arrays) {
        const path = `${dir}/${array.dtype}.npy`;
        await writeNpy(path, array);
        const back = await readNpy(path);
        assert.equal(back.dtype, array.dtype);
        assert.deepEqual(back.shape, shape);
        assert.deepEqual([...back.data], [...array.data]);
        const bytesPerValue = array.dtype === "f16" ? 2 : 4;
        assert.equal((await Deno.stat(path)).size, npyHeader(array.dtype, shape).length + size * bytesPerValue);
      }
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("decodeNpy reads version 2.0 headers and refuses what it cannot represent", () => {
  // Version 2.0: the same dict with a uint32 length.
  const dict = "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }";
  const text = dict + " ".repeat(64 - ((12 + dict.length + 1) % 64)) + "\n";
  const v2 = new Uint8Array(12 + text.length + 8);
  v2.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 2, 0]);
  new DataView(v2.buffer).setUint32(8, text.length, true);
  v2.set(new TextEncoder().encode(text), 12);
  new DataView(v2.buffer).setInt32(12 + text.length, -7, true);
  new DataView(v2.buffer).setInt32(12 + text.length + 4, 9, true);
  assert.deepEqual([...decodeNpy(v2).data], [-7, 9]);

  const withHeader = (dictText: string, dataBytes: number) => {
    const header = npyHeader("f32", [2]);
    const t = (dictText + " ".repeat(header.length - 11)).slice(0, header.length - 11) + "\n";
    const out = new Uint8Array(header.length + dataBytes);
    out.set(header.subarray(0, 10));
    out.set(new TextEncoder().encode(t), 10);
    return out;
  };
  assert.throws(() => decodeNpy(new Uint8Array(20)), ClipError);
  assert.throws(
    () => decodeNpy(withHeader("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8)),
    /Fortran/,
  );
  assert.throws(() => decodeNpy(withHeader("{'descr': '<f8', 'fortran_order': False, 'shape': (2,), }", 16)), /<f8/);
  assert.throws(() => decodeNpy(withHeader("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8)), />f4/);
  assert.throws(
    () => decodeNpy(withHeader("{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }", 4)),
    /truncated/,
  );
  assert.throws(() => encodeNpy({ dtype: "f32", shape: [2, 2], data: new Float32Array(3) }), RangeError);
});
