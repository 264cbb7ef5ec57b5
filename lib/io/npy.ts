/**
 * NumPy's .npy format, version 1.0, for the dtypes embeddings need: little-endian float32, float16 and int32 in C order.
 *
 * The header is written byte for byte as `numpy.save` (NumPy 1.24 and later) writes it: the dict literal with sorted
 * keys and a trailing ", ", then spaces reserved so the first axis can grow to 21 digits in place, then space padding
 * and a newline so that the data starts at a multiple of 64 bytes. NumPy pads even when the header is already aligned,
 * adding a full 64 bytes; this does the same, so files compare equal to NumPy's. Reading accepts versions 1.0, 2.0 and
 * 3.0 and any header spacing, as NumPy does.
 */
import { ClipError } from "../errors.ts";

export type NpyDType = "f32" | "f16" | "i32";

/** NumPy's `descr` for each dtype. */
const DESCR: Record<NpyDType, string> = { f32: "<f4", f16: "<f2", i32: "<i4" };
const BYTES: Record<NpyDType, number> = { f32: 4, f16: 2, i32: 4 };

/** An array in memory: `data` holds the values in C order (float16 values as a Float16Array). */
export type NpyArray =
  | { dtype: "f32"; shape: number[]; data: Float32Array }
  | { dtype: "f16"; shape: number[]; data: Float16Array }
  | { dtype: "i32"; shape: number[]; data: Int32Array };

const MAGIC = [0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59]; // "\x93NUMPY"
/** Where the v1.0 header text starts: magic, two version bytes and a uint16 length. */
const PREAMBLE_V1 = 10;
const ALIGN = 64;
/** NumPy reserves room in the header for a first axis of up to this many digits (numpy.lib.format). */
const GROWTH_AXIS_MAX_DIGITS = 21;

function checkShape(shape: readonly number[]): number {
  let size = 1;
  for (const d of shape) {
    if (!Number.isSafeInteger(d) || d < 0) throw new RangeError(`npy: bad dimension ${d} in shape [${shape}]`);
    size *= d;
  }
  return size;
}

/** Python's repr of a tuple of ints: `()`, `(3,)`, `(3, 4)`. */
function pythonTuple(shape: readonly number[]): string {
  if (shape.length === 1) return `(${shape[0]},)`;
  return `(${shape.join(", ")})`;
}

/** The complete v1.0 header (magic to newline) for an array of this dtype and shape. */
export function npyHeader(dtype: NpyDType, shape: readonly number[]): Uint8Array {
  checkShape(shape);
  let dict = `{'descr': '${DESCR[dtype]}', 'fortran_order': False, 'shape': ${pythonTuple(shape)}, }`;
  if (shape.length > 0) dict += " ".repeat(GROWTH_AXIS_MAX_DIGITS - String(shape[0]).length);
  const textLength = dict.length + 1; // the newline
  const padding = ALIGN - ((PREAMBLE_V1 + textLength) % ALIGN);
  const headerLength = textLength + padding;
  if (headerLength > 0xffff) throw new RangeError(`npy: shape [${shape}] needs a header too long for version 1.0`);
  const out = new Uint8Array(PREAMBLE_V1 + headerLength);
  out.set(MAGIC, 0);
  out[6] = 1;
  out[7] = 0;
  new DataView(out.buffer).setUint16(8, headerLength, true);
  const text = dict + " ".repeat(padding) + "\n";
  for (let i = 0; i < text.length; i++) out[PREAMBLE_V1 + i] = text.charCodeAt(i); // ASCII only
  return out;
}

/** Rounds float32 values to float16 (round to nearest even, as NumPy's astype does). */
export function toFloat16(values: Float32Array): Float16Array {
  return Float16Array.from(values);
}

/** The .npy file bytes of an array. */
export function encodeNpy(array: NpyArray): Uint8Array {
  const size = checkShape(array.shape);
  if (array.data.length !== size) {
    throw new RangeError(`npy: shape [${array.shape}] holds ${size} values but the data has ${array.data.length}`);
  }
  const header = npyHeader(array.dtype, array.shape);
  const out = new Uint8Array(header.length + size * BYTES[array.dtype]);
  out.set(header, 0);
  // Typed arrays are in the platform's byte order; write through a DataView so the file is little-endian everywhere.
  const view = new DataView(out.buffer, header.length);
  const data = array.data;
  if (array.dtype === "f32") { for (let i = 0; i < size; i++) view.setFloat32(4 * i, data[i], true); }
  else if (array.dtype === "i32") { for (let i = 0; i < size; i++) view.setInt32(4 * i, data[i], true); }
  else for (let i = 0; i < size; i++) view.setFloat16(2 * i, data[i], true);
  return out;
}

function parseHeaderDict(text: string, source: string): { descr: string; fortran: boolean; shape: number[] } {
  const bad = (what: string): never => {
    throw new ClipError(`${source}: not a readable .npy header (${what}): ${text.trim()}`);
  };
  const descr = /'descr'\s*:\s*'([^']*)'/.exec(text)?.[1] ?? bad("no descr");
  const fortranText = /'fortran_order'\s*:\s*(True|False)/.exec(text)?.[1] ?? bad("no fortran_order");
  const shapeText = /'shape'\s*:\s*\(([^)]*)\)/.exec(text)?.[1] ?? bad("no shape");
  const shape = shapeText.split(",").map((s) => s.trim()).filter((s) => s !== "").map((s) => {
    const n = Number(s.replace(/L$/, ""));
    return Number.isSafeInteger(n) && n >= 0 ? n : bad(`dimension '${s}'`);
  });
  return { descr, fortran: fortranText === "True", shape };
}

/** Parses .npy bytes. Throws ClipError for other dtypes, Fortran order, or truncated data. */
export function decodeNpy(bytes: Uint8Array, source = "npy"): NpyArray {
  if (bytes.length < PREAMBLE_V1 || MAGIC.some((b, i) => bytes[i] !== b)) {
    throw new ClipError(`${source}: not a .npy file (no \\x93NUMPY magic)`);
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const major = bytes[6];
  let headerStart: number, headerLength: number;
  if (major === 1) {
    headerStart = 10;
    headerLength = view.getUint16(8, true);
  } else if (major === 2 || major === 3) {
    headerStart = 12;
    headerLength = view.getUint32(8, true);
  } else {
    throw new ClipError(`${source}: .npy version ${major}.${bytes[7]} is not supported (1.0, 2.0 and 3.0 are)`);
  }
  const dataStart = headerStart + headerLength;
  if (dataStart > bytes.length) throw new ClipError(`${source}: .npy header runs past the end of the file`);
  const text = new TextDecoder(major === 3 ? "utf-8" : "latin1").decode(bytes.subarray(headerStart, dataStart));
  const { descr, fortran, shape } = parseHeaderDict(text, source);
  if (fortran) throw new ClipError(`${source}: Fortran-order arrays are not supported; save with C order`);
  const dtype = (Object.keys(DESCR) as NpyDType[]).find((d) => DESCR[d] === descr || DESCR[d] === `|${descr}`);
  if (!dtype) throw new ClipError(`${source}: dtype '${descr}' is not supported (float32, float16, int32 only)`);
  const size = checkShape(shape);
  const need = size * BYTES[dtype];
  if (bytes.length - dataStart < need) {
    throw new ClipError(
      `${source}: truncated: shape [${shape}] needs ${need} data bytes, the file has ${bytes.length - dataStart}`,
    );
  }
  const data = new DataView(bytes.buffer, bytes.byteOffset + dataStart, need);
  if (dtype === "f32") {
    const out = new Float32Array(size);
    for (let i = 0; i < size; i++) out[i] = data.getFloat32(4 * i, true);
    return { dtype, shape, data: out };
  }
  if (dtype === "i32") {
    const out = new Int32Array(size);
    for (let i = 0; i < size; i++) out[i] = data.getInt32(4 * i, true);
    return { dtype, shape, data: out };
  }
  const out = new Float16Array(size);
  for (let i = 0; i < size; i++) out[i] = data.getFloat16(2 * i, true);
  return { dtype, shape, data: out };
}

export async function readNpy(path: string): Promise<NpyArray> {
  return decodeNpy(await Deno.readFile(path), path);
}

export async function writeNpy(path: string, array: NpyArray): Promise<void> {
  await Deno.writeFile(path, encodeNpy(array));
}
