// Register-tiled matmul with texture operands, for CPU back ends (Mesa llvmpipe/lavapipe). There, texel fetches take
// the vectorised sampler path while storage-buffer loads at computed addresses do not, so each operand is first
// packed into an rgba32float texture (a texel = 4 consecutive floats of a row of op(X), zero-padded to whole tiles),
// and each invocation then computes a TM x TN block of C held in named vec4 accumulators, with k innermost: per loop
// pass it loads the texels of 8 k and gives every accumulator one chain of 8 fmas, so an accumulator that spilled is
// loaded and stored once per 8 fmas. Shapes travel as uniforms and the epilogue is a separate light pass, so there is
// one specialisation per tile, lane count and binding kind: a 32x32 kernel takes seconds to compile.
//
// Packed layout: operand X (op(X) is rows x cols per batch entry) becomes a tall logical matrix of batch * H rows and
// W texels, H = rows rounded up to the row alignment, W = cols / 4 rounded up. Rows past TEXTURE_SEGMENT_ROWS wrap
// into further segments to the right (row r lives at x = (r / SEG) * W + texel, y = r % SEG). SEG is a multiple of
// every alignment, so a tile or an 8-row k pass never straddles two segments.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { UNARY_HELPERS_WGSL, unaryExpression, type UnaryOp } from "./elementwise.ts";

/** Rows per texture segment: maxTextureDimension2D guaranteed by WebGPU's defaults is 8192, lavapipe offers 16384. */
export const TEXTURE_SEGMENT_SHIFT = 14;
export const TEXTURE_SEGMENT_ROWS = 1 << TEXTURE_SEGMENT_SHIFT;
/** k values consumed per loop pass (the fma chain length): K is zero-padded to a multiple of it. */
export const K_STEP = 8;

/** How the kernel reads its operand textures: read-only storage textures are faster, sampled textures more portable. */
export type TextureOperandBinding = "storage" | "sampled";

export interface MatmulTile {
  /** Rows of C per invocation. */
  tm: number;
  /** Columns of C per invocation (a multiple of 4). */
  tn: number;
}

export interface TextureMatmulSpec {
  tile: MatmulTile;
  /** Workgroup size along x: llvmpipe packs its SIMD lanes along x only. */
  lanes: number;
  binding: TextureOperandBinding;
}

/** Where one operand sits in its texture. */
export interface PackedLayout {
  /** Real rows and columns of op(X) per batch entry. */
  rows: number;
  cols: number;
  /** Batch entries stored (1 for an operand shared by the whole batch). */
  batches: number;
  /** Rows per batch entry, padded. */
  rowsPerBatch: number;
  /** Texels per row, padded. */
  texelsPerRow: number;
  /** Texture extent the layout needs. */
  width: number;
  height: number;
}

/** Lays out `batches` matrices of rows x cols, padding rows to `rowAlign` and columns to `colAlign` floats. */
export function packedLayout(
  rows: number,
  cols: number,
  batches: number,
  rowAlign: number,
  colAlign: number,
): PackedLayout {
  if (TEXTURE_SEGMENT_ROWS % rowAlign !== 0 || colAlign % 4 !== 0) {
    throw new Error(`packedLayout: row alignment ${rowAlign} must divide ${TEXTURE_SEGMENT_ROWS}, ${colAlign} be 4k`);
  }
  const rowsPerBatch = Math.ceil(rows / rowAlign) * rowAlign;
  const texelsPerRow = Math.ceil(cols / colAlign) * colAlign / 4;
  const totalRows = rowsPerBatch * batches;
  const segments = Math.ceil(totalRows / TEXTURE_SEGMENT_ROWS);
  return {
    rows,
    cols,
    batches,
    rowsPerBatch,
    texelsPerRow,
    width: segments * texelsPerRow,
    height: Math.min(totalRows, TEXTURE_SEGMENT_ROWS),
  };
}

// WGSL that maps a logical row and texel of a packed operand to texture coordinates.
const SEGMENT_WGSL = `
fn segment_coord(row: u32, texel: u32, texels_per_row: u32) -> vec2<u32> {
  return vec2<u32>((row >> ${TEXTURE_SEGMENT_SHIFT}u) * texels_per_row + texel, row & ${TEXTURE_SEGMENT_ROWS - 1}u);
}`;

// Pack and epilogue kernels give each invocation a whole row (or 4 rows) and loop along it. Lanes are rows, so the
// only per-lane integer divisions (which have no SIMD instruction on x86 and so cost 16 scalar divisions each) happen
// once per row instead of once per element: that made these passes 3-10x faster.
const ROW_WG = 64;

/**
 * How a pack dispatch reads its source. `transposed`: X is stored cols x rows (op(X) = X^T). The vec4 modes read
 * whole vec4s; they need the source's contiguous axis to be a multiple of 4.
 */
export interface PackMode {
  transposed: boolean;
  vec4: boolean;
}

export function packMode(layout: PackedLayout, transposed: boolean): PackMode {
  return { transposed, vec4: (transposed ? layout.rows : layout.cols) % 4 === 0 };
}

// Invocations of a pack dispatch: one per padded row, or per 4 padded rows in the transposed vec4 mode.
function packInvocations(layout: PackedLayout, mode: PackMode): number {
  const rowsPerInvocation = mode.transposed && mode.vec4 ? 4 : 1;
  return layout.batches * layout.rowsPerBatch / rowsPerInvocation;
}

/** Uniforms of the pack kernel: the layout, the source's batch stride in floats (0: one shared matrix). */
export function packUniforms(layout: PackedLayout, mode: PackMode, batchStride: number): Uint32Array {
  return Uint32Array.from([
    layout.rows,
    layout.cols,
    layout.rowsPerBatch,
    layout.texelsPerRow,
    batchStride,
    packInvocations(layout, mode),
    0,
    0,
  ]);
}

export function packWorkgroups(layout: PackedLayout, mode: PackMode): number {
  return Math.ceil(packInvocations(layout, mode) / ROW_WG);
}

/**
 * The buffer-to-texture copies that replace the pack kernel when X is already laid out as its texture (not
 * transposed, rows 256-byte aligned as copyBufferToTexture needs, no zero padding that matters): a copy runs at
 * memory speed, while the pack kernel's per-lane texel stores cost about a sixth of a 1024^3 product. Padding rows of
 * A's last tile may then hold stale values: they only reach output rows that are never stored. Returns null when
 * the kernel is needed.
 */
export function packCopies(
  layout: PackedLayout,
  transposed: boolean,
  staleRowsAllowed: boolean,
): { bufferOffset: number; bytesPerRow: number; x: number; width: number; height: number }[] | null {
  const bytesPerRow = layout.cols * 4;
  if (transposed || bytesPerRow % 256 !== 0 || layout.texelsPerRow * 4 !== layout.cols) return null;
  const padded = layout.rowsPerBatch !== layout.rows;
  if (padded && (layout.batches > 1 || !staleRowsAllowed)) return null;
  const rows = layout.batches * layout.rows;
  const copies = [];
  for (let first = 0, segment = 0; first < rows; first += TEXTURE_SEGMENT_ROWS, segment++) {
    copies.push({
      bufferOffset: first * bytesPerRow,
      bytesPerRow,
      x: segment * layout.texelsPerRow,
      width: layout.texelsPerRow,
      height: Math.min(TEXTURE_SEGMENT_ROWS, rows - first),
    });
  }
  return copies;
}

/** Copies op(X) from a storage buffer into a packed texture, zero-filling the padding. */
export function packKernel(mode: PackMode): Kernel {
  const component = ["x", "y", "z", "w"];
  let body: string;
  if (mode.transposed && mode.vec4) {
    // Rows y0..y0+3 of op(X) are 4 consecutive floats of each source row: load a 4x4 block as four vec4s (source
    // rows 4x..4x+3) and transpose it in registers into four texels.
    const load = (j: number) =>
      `var s${j} = vec4<f32>(0.0); if (in_rows && x * 4u + ${j}u < p.cols) { ` +
      `s${j} = src[(base + (x * 4u + ${j}u) * p.rows + y0) / 4u]; }`;
    const store = (i: number) =>
      `textureStore(dst, segment_coord(row + ${i}u, x, p.texels), ` +
      `vec4<f32>(s0.${component[i]}, s1.${component[i]}, s2.${component[i]}, s3.${component[i]}));`;
    body = `let b = i / (p.rows_per_batch / 4u);
  let y0 = (i - b * (p.rows_per_batch / 4u)) * 4u;
  let row = b * p.rows_per_batch + y0;
  let base = b * p.batch_stride;
  let in_rows = y0 < p.rows;
  for (var x = 0u; x < p.texels; x++) {
    ${[0, 1, 2, 3].map(load).join("\n    ")}
    ${[0, 1, 2, 3].map(store).join("\n    ")}
  }`;
  } else {
    let texel: string;
    if (!mode.transposed && mode.vec4) {
      texel = `if (x < p.cols / 4u) { v = src[(base + y * p.cols) / 4u + x]; }`;
    } else {
      const at = (j: number) =>
        mode.transposed ? `src[base + (x * 4u + ${j}u) * p.rows + y]` : `src[base + y * p.cols + x * 4u + ${j}u]`;
      texel = `v = vec4<f32>(${[0, 1, 2, 3].map((j) => `select(0.0, ${at(j)}, x * 4u + ${j}u < p.cols)`).join(", ")});`;
    }
    body = `let b = i / p.rows_per_batch;
  let y = i - b * p.rows_per_batch;
  let row = b * p.rows_per_batch + y;
  let base = b * p.batch_stride;
  for (var x = 0u; x < p.texels; x++) {
    var v = vec4<f32>(0.0);
    if (y < p.rows) { ${texel} }
    textureStore(dst, segment_coord(row, x, p.texels), v);
  }`;
  }
  return {
    key: `matmul_pack/${mode.transposed}/${mode.vec4}`,
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
${SEGMENT_WGSL}
struct Pack { rows: u32, cols: u32, rows_per_batch: u32, texels: u32, batch_stride: u32, total: u32, p0: u32, p1: u32 }
@group(0) @binding(0) var<storage, read> src: array<${mode.vec4 ? "vec4<f32>" : "f32"}>;
@group(0) @binding(1) var dst: texture_storage_2d<rgba32float, write>;
@group(0) @binding(2) var<uniform> p: Pack;

@compute @workgroup_size(${ROW_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${ROW_WG}u + lid.x;
  if (i >= p.total) { return; }
  ${body}
}`,
  };
}

/** The sizes a texture matmul dispatch runs with. */
export interface TextureMatmulGeometry {
  batch: number;
  m: number;
  n: number;
  a: PackedLayout;
  b: PackedLayout;
}

/**
 * Where the product's blocks are stored: C itself when N is a multiple of 4 (rows and columns past the end are
 * skipped), otherwise a scratch buffer of whole tiles that the epilogue kernel then copies from.
 */
export interface MatmulDestination {
  rows: number;
  /** Columns stored per row (a multiple of 4) and the row stride, in floats. */
  cols: number;
  rowStride: number;
}

/** The destination layout for writing straight into C (needs N % 4 == 0) or into a scratch buffer of whole tiles. */
export function matmulDestination(
  spec: TextureMatmulSpec,
  g: TextureMatmulGeometry,
  direct: boolean,
): MatmulDestination {
  if (direct) {
    if (g.n % 4 !== 0) throw new Error(`matmulDestination: N=${g.n} is not a multiple of 4`);
    return { rows: g.m, cols: g.n, rowStride: g.n };
  }
  const cols = invocationCounts(spec, g).colBlocks * spec.tile.tn;
  return { rows: g.a.rowsPerBatch, cols, rowStride: cols };
}

function invocationCounts(spec: TextureMatmulSpec, g: TextureMatmulGeometry) {
  const rowBlocks = g.a.rowsPerBatch / spec.tile.tm;
  const colBlocks = g.b.texelsPerRow * 4 / spec.tile.tn;
  return { rowBlocks, colBlocks, total: g.batch * rowBlocks * colBlocks };
}

export function textureMatmulUniforms(
  spec: TextureMatmulSpec,
  g: TextureMatmulGeometry,
  dest: MatmulDestination,
): Uint32Array {
  const { rowBlocks, colBlocks, total } = invocationCounts(spec, g);
  return Uint32Array.from([
    total,
    rowBlocks,
    colBlocks,
    g.a.texelsPerRow * 4, // K padded to whole k passes
    g.a.batches > 1 ? g.a.rowsPerBatch : 0,
    g.a.texelsPerRow,
    g.b.batches > 1 ? g.b.rowsPerBatch : 0,
    g.b.texelsPerRow,
    dest.rows,
    dest.cols / 4,
    dest.rowStride / 4,
    dest.rows * dest.rowStride / 4,
  ]);
}

export function textureMatmulWorkgroups(spec: TextureMatmulSpec, g: TextureMatmulGeometry): number {
  return Math.ceil(invocationCounts(spec, g).total / spec.lanes);
}

/**
 * The raw product op(A[b]) op(B[b]) from packed operand textures, stored as vec4 rows into the destination.
 * Invocations enumerate (batch, row block, column block) with the column block fastest, so the lanes of a
 * workgroup share A's rows and read neighbouring columns of B, and narrow or small batched products still fill
 * every lane. Bias, activation and residual are applied by `matmulEpilogueKernel`, which keeps this kernel to one
 * specialisation per tile: its many stores make it compile for seconds. Bindings: A texture, B texture, output,
 * uniforms.
 */
export function textureMatmulKernel(spec: TextureMatmulSpec): Kernel {
  const { tm, tn } = spec.tile;
  if (tn % 4 !== 0 || TEXTURE_SEGMENT_ROWS % tm !== 0) throw new Error(`unsupported matmul tile ${tm}x${tn}`);
  return { key: `matmul_tex/${tm}x${tn}/${spec.lanes}/${spec.binding}`, wgsl: () => textureMatmulWgsl(spec) };
}

function textureMatmulWgsl(spec: TextureMatmulSpec): string {
  const { tm, tn } = spec.tile;
  const tn4 = tn / 4;
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const textureType = spec.binding === "storage" ? "texture_storage_2d<rgba32float, read>" : "texture_2d<f32>";
  const load = (tex: string, coord: string) =>
    spec.binding === "storage" ? `textureLoad(${tex}, ${coord})` : `textureLoad(${tex}, ${coord}, 0)`;

  const declarations = range(tm).map((r) => range(tn4).map((j) => `var c${r}_${j} = vec4<f32>(0.0);`).join(" "));
  const body: string[] = [];
  for (const r of range(tm)) {
    body.push(
      `let a${r}_0 = ${load("ta", `vec2<u32>(ax, ay + ${r}u)`)}; ` +
        `let a${r}_1 = ${load("ta", `vec2<u32>(ax + 1u, ay + ${r}u)`)};`,
    );
  }
  for (const i of range(K_STEP)) {
    body.push(
      range(tn4).map((j) => `let b${i}_${j} = ${load("tb", `vec2<u32>(bc.x + ${j}u, bc.y + ${i}u)`)};`).join(" "),
    );
  }
  const component = ["x", "y", "z", "w"];
  for (const r of range(tm)) {
    for (const j of range(tn4)) {
      let chain = `c${r}_${j}`;
      for (const i of range(K_STEP)) {
        chain = `fma(vec4<f32>(a${r}_${i >> 2}.${component[i & 3]}), b${i}_${j}, ${chain})`;
      }
      body.push(`c${r}_${j} = ${chain};`);
    }
  }
  // One vec4 store per accumulator: scalar stores or a store loop (which keeps every accumulator live across its
  // branches) multiply the compile time several times over.
  const stores = range(tm).map((r) =>
    `if (row0 + ${r}u < d.out_rows) { ` +
    range(tn4).map((j) => `if (col4 + ${j}u < d.out_cols4) { c[o + ${r}u * d.out_stride4 + ${j}u] = c${r}_${j}; }`)
      .join(" ") +
    ` }`
  );

  return `${LINEAR_WORKGROUP_WGSL}
${SEGMENT_WGSL}
struct Dims {
  total: u32, row_blocks: u32, col_blocks: u32, k_padded: u32,
  a_rows_per_batch: u32, a_texels: u32, b_rows_per_batch: u32, b_texels: u32,
  out_rows: u32, out_cols4: u32, out_stride4: u32, out_batch_stride4: u32,
}
@group(0) @binding(0) var ta: ${textureType};
@group(0) @binding(1) var tb: ${textureType};
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
@group(0) @binding(3) var<uniform> d: Dims;

@compute @workgroup_size(${spec.lanes}, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let flat = linear_workgroup(wid, nwg) * ${spec.lanes}u + lid.x;
  // Invocations past the end redo the last block (their loads stay in bounds) and store nothing.
  let inv = min(flat, d.total - 1u);
  let cb = inv % d.col_blocks;
  let rest = inv / d.col_blocks;
  let rb = rest % d.row_blocks;
  let batch = rest / d.row_blocks;
  let a_origin = segment_coord(batch * d.a_rows_per_batch + rb * ${tm}u, 0u, d.a_texels);
  let ay = a_origin.y;
  let b_row0 = batch * d.b_rows_per_batch;
  let b_texel0 = cb * ${tn4}u;
  ${declarations.join("\n  ")}
  for (var kk = 0u; kk < d.k_padded; kk += ${K_STEP}u) {
    let ax = a_origin.x + (kk >> 2u);
    let bc = segment_coord(b_row0 + kk, b_texel0, d.b_texels);
    ${body.join("\n    ")}
  }
  if (flat >= d.total) { return; }
  let row0 = rb * ${tm}u;
  let col4 = cb * ${tn4}u;
  let o = batch * d.out_batch_stride4 + row0 * d.out_stride4 + col4;
  ${stores.join("\n  ")}
}`;
}

/** What the epilogue pass does besides copying (bias, activation, pre-activation save, residual). */
export interface MatmulEpilogueSpec {
  /** The raw product is already in C (written directly) rather than in a scratch buffer. */
  inPlace: boolean;
  bias: boolean;
  activation: UnaryOp | null;
  savePreActivation: boolean;
  residual: boolean;
}

export function matmulEpilogueUniforms(batch: number, m: number, n: number, src: MatmulDestination): Uint32Array {
  return Uint32Array.from([batch * m, m, n, src.rowStride, src.rows * src.rowStride, 0, 0, 0]);
}

export function matmulEpilogueWorkgroups(batch: number, m: number): number {
  return Math.ceil(batch * m / ROW_WG);
}

/**
 * C = act(P + bias) + residual elementwise over the raw product P (in a scratch buffer, or in C itself), also
 * saving act's input when asked. In place, N is a multiple of 4 and every access is a whole vec4, which halves the
 * cost of this pass on CPU back ends. Bindings: P unless in place, C, then bias, residual, pre-activation when
 * enabled, then the uniforms.
 */
export function matmulEpilogueKernel(spec: MatmulEpilogueSpec): Kernel {
  const key = `matmul_epilogue/${spec.inPlace}/${spec.bias}/${spec.activation}/${spec.savePreActivation}/` +
    `${spec.residual}`;
  const type = spec.inPlace ? "vec4<f32>" : "f32";
  let binding = 0;
  const declarations: string[] = [];
  const declare = (name: string, access: "read" | "read_write", t: string) =>
    declarations.push(`@group(0) @binding(${binding++}) var<storage, ${access}> ${name}: array<${t}>;`);
  if (!spec.inPlace) declare("src", "read", "f32");
  declare("c", "read_write", type);
  if (spec.bias) declare("bias", "read", type);
  if (spec.residual) declare("residual", "read", type);
  if (spec.savePreActivation) declare("pre", "read_write", type);
  declarations.push(`@group(0) @binding(${binding++}) var<uniform> e: Epilogue;`);
  let activation = "z";
  if (spec.activation && spec.inPlace) {
    activation = `vec4<f32>(${
      ["x", "y", "z", "w"].map((c) => unaryExpression(spec.activation!, `z.${c}`)).join(", ")
    })`;
  } else if (spec.activation) {
    activation = unaryExpression(spec.activation, "z");
  }
  const body = [
    spec.inPlace ? `var z = c[i];` : `var z = src[src_row + col];`,
    spec.bias ? `z += bias[col];` : "",
    spec.savePreActivation ? `pre[i] = z;` : "",
    `var y = ${activation};`,
    spec.residual ? `y += residual[i];` : "",
    `c[i] = y;`,
  ].filter(Boolean).join("\n    ");
  // In place the loop runs over vec4 columns: `col` and `i` then count vec4s.
  const cols = spec.inPlace ? "e.n / 4u" : "e.n";
  return {
    key,
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
${UNARY_HELPERS_WGSL}
struct Epilogue { rows: u32, m: u32, n: u32, src_stride: u32, src_batch_stride: u32, p0: u32, p1: u32, p2: u32 }
${declarations.join("\n")}

@compute @workgroup_size(${ROW_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let r = linear_workgroup(wid, nwg) * ${ROW_WG}u + lid.x;
  if (r >= e.rows) { return; }
  let batch = r / e.m;
  let src_row = batch * e.src_batch_stride + (r - batch * e.m) * e.src_stride;
  let cols = ${cols};
  for (var col = 0u; col < cols; col++) {
    let i = r * cols + col;
    ${body}
  }
}`,
  };
}
