// Register-tiled matmul with texture operands, for CPU back ends (Mesa llvmpipe/lavapipe). There, texel fetches take
// the vectorised sampler path while storage-buffer loads at computed addresses do not, so each operand is first put
// into an rgba32float texture (a texel = 4 consecutive floats of a stored row), and each invocation then computes a
// TM x TN block of C held in named vec4 accumulators, with k innermost: per loop pass it loads the texels of 8 k and
// gives every accumulator one chain of 8 fmas, so an accumulator that spilled is loaded and stored once per 8 fmas.
// Where the device has subgroups as wide as the workgroup, the lanes (which compute neighbouring column blocks of the
// same rows) fetch A's texels of a pass once between them and broadcast the values (`shareA`): a texel fetch costs
// the same whether the lanes ask for one address or sixteen, so A's fetches drop sixteenfold and a tall, narrow tile
// (128x8) then fetches least per multiply-add. Shapes travel as uniforms and the epilogue is a separate light pass,
// so there is one specialisation per tile, lane count, sharing and operand orientation: each takes seconds to
// compile.
//
// Operands keep their stored orientation: a transposed operand is read transposed by the kernel (llvmpipe keeps
// vec4 components in separate SIMD registers, so regrouping components costs nothing), so most operands reach their
// texture by a plain buffer-to-texture copy, which runs at memory speed, and the pack kernel (about 20 ns a texel)
// only handles rows that are not 256-byte aligned or need zero padding.
//
// Texture layout: operand X (stored rows x cols per batch entry) becomes a tall logical matrix of batch * H rows and
// W texels (H = rows, padded when packed; W = cols / 4, padded when packed). Rows wrap into segments of
// TEXTURE_SEGMENT_ROWS placed side by side; segment s holds logical rows from s * step, where step is the segment
// height for aligned layouts and the height minus one tile for copied layouts whose tiles may start anywhere, so
// consecutive segments overlap and every tile lies wholly inside one.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { UNARY_HELPERS_WGSL, unaryExpression, type UnaryOp } from "./elementwise.ts";
import { ENABLE_F16 } from "./grid.ts";
import type { OperandType } from "./matmul.ts";

/** Rows per texture segment: lavapipe's maxTextureDimension2D (WebGPU's default limit is only 8192). */
export const TEXTURE_SEGMENT_ROWS = 16384;
/** k values consumed per loop pass (the fma chain length): K is zero-padded to a multiple of it. */
export const K_STEP = 8;

export interface MatmulTile {
  /** Rows of C per invocation (a multiple of 4). */
  tm: number;
  /** Columns of C per invocation (a multiple of 4). */
  tn: number;
}

export interface TextureMatmulSpec {
  tile: MatmulTile;
  /** Workgroup size along x: llvmpipe packs its SIMD lanes along x only. */
  lanes: number;
  /** A is stored [K, M] / B is stored [N, K]; the textures hold the stored rows. */
  transA: boolean;
  transB: boolean;
  /**
   * Add a bias row / a residual of C's shape as the blocks are stored (direct stores only; N % 4 == 0). These cost a
   * few loads per block, while a separate epilogue pass rereads and rewrites all of C; activations stay in that pass,
   * since their code repeated for every accumulator would make the kernel's compile many times longer.
   */
  bias: boolean;
  residual: boolean;
  /**
   * The lanes of a workgroup (one subgroup) share one block of A's rows: each lane fetches a different share of the
   * block's texels for the pass and subgroup broadcasts hand every value to all lanes. On llvmpipe a texel fetch is
   * a gather of about 70 instructions whichever addresses the lanes ask for, while a broadcast from a fixed lane is
   * two, so A's loads per pass drop from 2 * TM fetches to 2 * TM / lanes. Needs the subgroups feature with a
   * subgroup as wide as the workgroup; workgroups then run over (batch, row block, group of `lanes` column blocks).
   */
  shareA: boolean;
}

/**
 * How one operand's stored rows run through a loop pass: "tile" rows are one block of C's rows (A) or columns (B^T)
 * and are read TM/TN at a time; "k" rows are read K_STEP at a time, and their padding must be zero.
 */
export type RowRole = "tile" | "k";

/** Where one operand sits in its texture. */
export interface OperandLayout {
  /** Stored rows and columns per batch entry. */
  rows: number;
  cols: number;
  /** Batch entries stored (1 for an operand shared by the whole batch). */
  batches: number;
  /** Rows per batch entry and texels per row in the texture (padded when packed). */
  rowsPerBatch: number;
  texelsPerRow: number;
  /** Logical rows between the starts of consecutive texture segments. */
  segmentStep: number;
  /** Filled by buffer-to-texture copies (true) or by the pack kernel. */
  copied: boolean;
  /** Texture extent the layout needs. */
  width: number;
  height: number;
}

/**
 * Chooses how `batches` stored matrices of rows x cols go into a texture. A copy needs 256-byte rows
 * (copyBufferToTexture) and, for k rows, no padding; rows past a tile's end may then hold the next batch entry or
 * stale values: they only reach outputs that are never stored. Otherwise (and always for f16 operands, which the
 * pack kernel widens) the pack kernel pads rows to `rowAlign` and columns to `colAlign` floats with zeros.
 */
export function operandLayout(
  rows: number,
  cols: number,
  batches: number,
  role: RowRole,
  rowAlign: number,
  colAlign: number,
  type: OperandType = "f32",
): OperandLayout {
  if (TEXTURE_SEGMENT_ROWS % rowAlign !== 0 || colAlign % 4 !== 0) {
    throw new Error(`operandLayout: row alignment ${rowAlign} must divide ${TEXTURE_SEGMENT_ROWS}, ${colAlign} be 4k`);
  }
  const copied = type === "f32" && (cols * 4) % 256 === 0 && (role === "tile" || rows % rowAlign === 0);
  const rowsPerBatch = copied ? rows : Math.ceil(rows / rowAlign) * rowAlign;
  const texelsPerRow = copied ? cols / 4 : Math.ceil(cols / colAlign) * colAlign / 4;
  const aligned = rowsPerBatch % rowAlign === 0;
  if (role === "k" && !aligned) throw new Error("operandLayout: k rows must be padded to whole k passes");
  const segmentStep = aligned ? TEXTURE_SEGMENT_ROWS : TEXTURE_SEGMENT_ROWS - rowAlign;
  const totalRows = rowsPerBatch * batches;
  // The kernel finds a tile in segment floor(first row / step): every row can start a tile.
  const segments = Math.floor((totalRows - 1) / segmentStep) + 1;
  return {
    rows,
    cols,
    batches,
    rowsPerBatch,
    texelsPerRow,
    segmentStep,
    copied,
    width: segments * texelsPerRow,
    height: Math.min(totalRows, TEXTURE_SEGMENT_ROWS),
  };
}

/** The copyBufferToTexture regions that fill a copied layout, one per segment. */
export function operandCopies(
  layout: OperandLayout,
): { bufferOffset: number; bytesPerRow: number; x: number; width: number; height: number }[] {
  if (!layout.copied) throw new Error("operandCopies: this layout is filled by the pack kernel");
  const bytesPerRow = layout.cols * 4;
  const rows = layout.batches * layout.rows;
  const copies = [];
  for (let segment = 0; segment * layout.texelsPerRow < layout.width; segment++) {
    const first = segment * layout.segmentStep;
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

// WGSL that maps a logical row and texel of an operand to texture coordinates.
const SEGMENT_WGSL = `
fn segment_coord(row: u32, texel: u32, texels_per_row: u32, step: u32) -> vec2<u32> {
  let segment = row / step;
  return vec2<u32>(segment * texels_per_row + texel, row - segment * step);
}`;

// Pack and epilogue kernels give each invocation a whole row and loop along it. Lanes are rows, so the only
// per-lane integer divisions (which have no SIMD instruction on x86 and so cost 16 scalar divisions each) happen
// once per row instead of once per element.
const ROW_WG = 64;

/** Whether the pack kernel can read whole vec4s (the stored rows are a multiple of 4 floats long). */
export function packVec4(layout: OperandLayout): boolean {
  return layout.cols % 4 === 0;
}

/** Uniforms of the pack kernel: the layout and the source's batch stride in floats (0: one shared matrix). */
export function packUniforms(layout: OperandLayout, batchStride: number): Uint32Array {
  return Uint32Array.from([
    layout.rows,
    layout.cols,
    layout.rowsPerBatch,
    layout.texelsPerRow,
    batchStride,
    layout.batches * layout.rowsPerBatch,
    layout.segmentStep,
    0,
  ]);
}

export function packWorkgroups(layout: OperandLayout): number {
  return Math.ceil(layout.batches * layout.rowsPerBatch / ROW_WG);
}

/**
 * Copies stored matrices from a storage buffer into an operand texture, zero-filling the padding (and widening f16
 * sources to f32).
 */
export function packKernel(vec4: boolean, type: OperandType = "f32"): Kernel {
  const texel = vec4
    ? `if (x < p.cols / 4u) { v = vec4<f32>(src[(base + y * p.cols) / 4u + x]); }`
    : `v = vec4<f32>(${
      [0, 1, 2, 3].map((j) => `select(0.0, f32(src[base + y * p.cols + x * 4u + ${j}u]), x * 4u + ${j}u < p.cols)`)
        .join(", ")
    });`;
  return {
    key: `matmul_pack/${vec4}/${type}`,
    wgsl: () =>
      `${type === "f16" ? ENABLE_F16 : ""}${LINEAR_WORKGROUP_WGSL}
${SEGMENT_WGSL}
struct Pack {
  rows: u32, cols: u32, rows_per_batch: u32, texels: u32, batch_stride: u32, total: u32, step: u32, p0: u32,
}
@group(0) @binding(0) var<storage, read> src: array<${vec4 ? `vec4<${type}>` : type}>;
@group(0) @binding(1) var dst: texture_storage_2d<rgba32float, write>;
@group(0) @binding(2) var<uniform> p: Pack;

@compute @workgroup_size(${ROW_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${ROW_WG}u + lid.x;
  if (i >= p.total) { return; }
  let b = i / p.rows_per_batch;
  let y = i - b * p.rows_per_batch;
  let base = b * p.batch_stride;
  let origin = segment_coord(i, 0u, p.texels, p.step);
  for (var x = 0u; x < p.texels; x++) {
    var v = vec4<f32>(0.0);
    if (y < p.rows) { ${texel} }
    textureStore(dst, vec2<u32>(origin.x + x, origin.y), v);
  }
}`,
  };
}

// Lanes run along a row's texels; a workgroup as wide as llvmpipe's widest SIMD keeps narrow operands on both cores.
const K_SUM_WG = 16;
// Rows added into a partial sum before it joins the total: the rounding error grows with 64 + rows / 64 rather than
// with the row count.
const K_SUM_CHUNK = 64;

/** Uniforms of the k-row sum kernel: the rows and columns to sum and the texels per row. */
export function kRowSumUniforms(layout: OperandLayout): Uint32Array {
  if (layout.batches !== 1 || layout.segmentStep !== TEXTURE_SEGMENT_ROWS || layout.rowsPerBatch % K_STEP !== 0) {
    throw new Error("kRowSumUniforms: needs one aligned matrix of whole k passes");
  }
  return Uint32Array.from([layout.rowsPerBatch, layout.cols, layout.texelsPerRow, 0]);
}

export function kRowSumWorkgroups(layout: OperandLayout): number {
  return Math.ceil(layout.texelsPerRow / K_SUM_WG);
}

/**
 * The sum over its k rows of an operand texture holding one matrix of k rows: for the product's k-row operand dZ,
 * the column sums that a bias gradient needs. Reading the texture the product has just filled costs a small part of
 * a pass over dZ from its storage buffer, whose per-lane loads are slow on CPU back ends. Padding rows are zero, and
 * k-row layouts hold whole k passes, so the loop takes K_STEP rows at a time (a loop pass costs several loads).
 * Bindings: the texture, the output (one float per column), uniforms.
 */
export function kRowSumKernel(): Kernel {
  const shift = Math.log2(TEXTURE_SEGMENT_ROWS);
  const loads = Array.from({ length: K_STEP }, (_, i) => {
    const row = `row + ${i}u`;
    return `part += textureLoad(src, vec2<u32>(((${row}) >> ${shift}u) * p.texels + x, (${row}) & ${
      TEXTURE_SEGMENT_ROWS - 1
    }u));`;
  }).join("\n      ");
  return {
    key: "matmul_k_row_sum",
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
struct KRowSum { rows: u32, cols: u32, texels: u32, p0: u32 }
@group(0) @binding(0) var src: texture_storage_2d<rgba32float, read>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> p: KRowSum;

@compute @workgroup_size(${K_SUM_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let x = linear_workgroup(wid, nwg) * ${K_SUM_WG}u + lid.x;
  if (x >= p.texels) { return; }
  var total = vec4<f32>(0.0);
  for (var first = 0u; first < p.rows; first += ${K_SUM_CHUNK}u) {
    var part = vec4<f32>(0.0);
    let end = min(first + ${K_SUM_CHUNK}u, p.rows);
    for (var row = first; row < end; row += ${K_STEP}u) {
      ${loads}
    }
    total += part;
  }
  for (var c = 0u; c < 4u; c++) {
    if (x * 4u + c < p.cols) { out[x * 4u + c] = total[c]; }
  }
}`,
  };
}

/** The sizes a texture matmul dispatch runs with. */
export interface TextureMatmulGeometry {
  batch: number;
  m: number;
  n: number;
  k: number;
  a: OperandLayout;
  b: OperandLayout;
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
  const { rowBlocks, colBlocks } = invocationCounts(spec, g);
  const cols = colBlocks * spec.tile.tn;
  return { rows: rowBlocks * spec.tile.tm, cols, rowStride: cols };
}

function invocationCounts(spec: TextureMatmulSpec, g: TextureMatmulGeometry) {
  const rowBlocks = Math.ceil(g.m / spec.tile.tm);
  const colBlocks = Math.ceil(g.n / spec.tile.tn);
  const colGroups = Math.ceil(colBlocks / spec.lanes);
  return {
    rowBlocks,
    colBlocks,
    total: g.batch * rowBlocks * colBlocks,
    colGroups,
    groups: g.batch * rowBlocks * colGroups,
  };
}

export function textureMatmulUniforms(
  spec: TextureMatmulSpec,
  g: TextureMatmulGeometry,
  dest: MatmulDestination,
): Uint32Array {
  const { rowBlocks, colBlocks, total, colGroups, groups } = invocationCounts(spec, g);
  return Uint32Array.from([
    total,
    rowBlocks,
    colBlocks,
    Math.ceil(g.k / K_STEP) * K_STEP,
    g.a.batches > 1 ? g.a.rowsPerBatch : 0,
    g.a.texelsPerRow,
    g.a.segmentStep,
    g.b.batches > 1 ? g.b.rowsPerBatch : 0,
    g.b.texelsPerRow,
    g.b.segmentStep,
    dest.rows,
    dest.cols / 4,
    dest.rowStride / 4,
    dest.rows * dest.rowStride / 4,
    colGroups,
    groups,
  ]);
}

export function textureMatmulWorkgroups(spec: TextureMatmulSpec, g: TextureMatmulGeometry): number {
  const counts = invocationCounts(spec, g);
  return spec.shareA ? counts.groups : Math.ceil(counts.total / spec.lanes);
}

/**
 * The raw product op(A[b]) op(B[b]) from operand textures, stored as vec4 rows into the destination.
 * Invocations enumerate (batch, row block, column block) with the column block fastest, so the lanes of a
 * workgroup share A's rows and read neighbouring columns of B, and narrow or small batched products still fill
 * every lane. Bias, activation and residual are applied by `matmulEpilogueKernel`, which keeps this kernel to one
 * specialisation per tile and orientation: its many stores make it compile for seconds. Bindings: A texture,
 * B texture, output, uniforms.
 */
export function textureMatmulKernel(spec: TextureMatmulSpec): Kernel {
  const { tm, tn } = spec.tile;
  if (tn % 4 !== 0 || tm % 4 !== 0) throw new Error(`unsupported matmul tile ${tm}x${tn}`);
  return {
    key: `matmul_tex/${tm}x${tn}/${spec.lanes}/${spec.transA}/${spec.transB}${spec.bias ? "/bias" : ""}${
      spec.residual ? "/residual" : ""
    }${spec.shareA ? "/share_a" : ""}`,
    wgsl: () => textureMatmulWgsl(spec),
  };
}

function textureMatmulWgsl(spec: TextureMatmulSpec): string {
  const { tm, tn } = spec.tile;
  const tn4 = tn / 4;
  const range = (n: number) => Array.from({ length: n }, (_, i) => i);
  const c4 = ["x", "y", "z", "w"];
  // Read-only storage textures measured about 20% faster than sampled ones on llvmpipe.
  const textureType = "texture_storage_2d<rgba32float, read>";
  const load = (tex: string, x: string, y: string) => `textureLoad(${tex}, vec2<u32>(${x}, ${y}))`;

  // Per pass: `aAt(r, i)` is A's scalar for row r and k i, `bAt(i, j)` B's vec4 for k i and columns 4j..4j+3.
  const loads: string[] = [];
  // A's texels of a pass form a block of `aRows` texture rows by `aWidth` texels from a0: the tile's rows by 2
  // texels (8 k) for A, or 8 k rows by tm / 4 texels (the tile's rows) for A^T. Texel `a${y}_${x}` is at (x, y).
  const [aRows, aWidth] = spec.transA ? [K_STEP, tm / 4] : [tm, K_STEP / 4];
  const aAt = spec.transA
    ? (r: number, i: number) => `a${i}_${r >> 2}.${c4[r & 3]}`
    : (r: number, i: number) => `a${r}_${i >> 2}.${c4[i & 3]}`;
  if (!spec.shareA) {
    for (const y of range(aRows)) {
      loads.push(range(aWidth).map((x) => `let a${y}_${x} = ${load("ta", `a0.x + ${x}u`, `a0.y + ${y}u`)};`).join(" "));
    }
  } else {
    // Texel number t (row-major in the block) is fetched by lane t % lanes as its share number t / lanes.
    const texels = aRows * aWidth;
    if (texels % spec.lanes !== 0) throw new Error(`shareA: ${texels} texels per pass do not split over the lanes`);
    const shift = Math.log2(aWidth);
    for (const q of range(texels / spec.lanes)) {
      const t = `(lid.x + ${q * spec.lanes}u)`;
      loads.push(`let share${q} = ${load("ta", `a0.x + (${t} & ${aWidth - 1}u)`, `a0.y + (${t} >> ${shift}u)`)};`);
    }
    for (const y of range(aRows)) {
      loads.push(
        range(aWidth).map((x) => {
          const t = y * aWidth + x;
          return `let a${y}_${x} = subgroupBroadcast(share${Math.floor(t / spec.lanes)}, ${t % spec.lanes}u);`;
        }).join(" "),
      );
    }
  }
  let bAt: (i: number, j: number) => string;
  if (!spec.transB) {
    // 8 k rows of B, tn / 4 texels (the tile's columns) each.
    for (const i of range(K_STEP)) {
      loads.push(range(tn4).map((j) => `let b${i}_${j} = ${load("tb", `b0.x + ${j}u`, `b0.y + ${i}u`)};`).join(" "));
    }
    bAt = (i, j) => `b${i}_${j}`;
  } else {
    // Rows of B^T (the tile's columns), 2 texels (8 k) each, regrouped into vec4s along the columns.
    for (const n of range(tn)) {
      loads.push(
        `let bt${n}_0 = ${load("tb", "b0.x", `b0.y + ${n}u`)}; let bt${n}_1 = ${
          load("tb", "b0.x + 1u", `b0.y + ${n}u`)
        };`,
      );
    }
    for (const i of range(K_STEP)) {
      loads.push(
        range(tn4).map((j) =>
          `let b${i}_${j} = vec4<f32>(${range(4).map((e) => `bt${4 * j + e}_${i >> 2}.${c4[i & 3]}`).join(", ")});`
        ).join(" "),
      );
    }
    bAt = (i, j) => `b${i}_${j}`;
  }
  const fmas: string[] = [];
  for (const r of range(tm)) {
    for (const j of range(tn4)) {
      let chain = `c${r}_${j}`;
      for (const i of range(K_STEP)) chain = `fma(vec4<f32>(${aAt(r, i)}), ${bAt(i, j)}, ${chain})`;
      fmas.push(`c${r}_${j} = ${chain};`);
    }
  }
  const declarations = range(tm).map((r) => range(tn4).map((j) => `var c${r}_${j} = vec4<f32>(0.0);`).join(" "));
  // One vec4 store per accumulator: scalar stores or a store loop (which keeps every accumulator live across its
  // branches) multiply the compile time several times over.
  const stored = (r: number, j: number) => {
    const at = `o + ${r}u * d.out_stride4 + ${j}u`;
    return [`c${r}_${j}`, spec.bias ? `bias${j}` : "", spec.residual ? `residual[${at}]` : ""].filter(Boolean)
      .join(" + ");
  };
  const stores = range(tm).map((r) =>
    `if (row0 + ${r}u < d.out_rows) { ` +
    range(tn4).map((j) => `if (col4 + ${j}u < d.out_cols4) { c[o + ${r}u * d.out_stride4 + ${j}u] = ${stored(r, j)}; }`)
      .join(" ") +
    ` }`
  );
  // Columns past N read the last bias word: their sums are never stored.
  const biasLoads = spec.bias
    ? range(tn4).map((j) => `let bias${j} = bias[min(col4 + ${j}u, d.out_cols4 - 1u)];`).join(" ")
    : "";
  let binding = 3;
  const fused = [
    spec.bias ? `@group(0) @binding(${binding++}) var<storage, read> bias: array<vec4<f32>>;` : "",
    spec.residual ? `@group(0) @binding(${binding++}) var<storage, read> residual: array<vec4<f32>>;` : "",
  ].filter(Boolean).join("\n");
  // Texture origin of this pass: tile rows are fixed per invocation, k rows advance with the pass. k-row layouts
  // are always aligned (their step is the segment height), so their segment is a shift, not a per-lane division.
  const kRows = (row: string, texel: string, texels: string) =>
    `vec2<u32>((${row} >> ${Math.log2(TEXTURE_SEGMENT_ROWS)}u) * ${texels} + ${texel}, ${row} & ${
      TEXTURE_SEGMENT_ROWS - 1
    }u)`;
  const aOrigin = spec.transA
    ? kRows("(a_row0 + kk)", `rb * ${tm / 4}u`, "d.a_texels")
    : `vec2<u32>(a_tile.x + (kk >> 2u), a_tile.y)`;
  const bOrigin = spec.transB
    ? `vec2<u32>(b_tile.x + (kk >> 2u), b_tile.y)`
    : kRows("(b_row0 + kk)", `cb * ${tn4}u`, "d.b_texels");

  return `${LINEAR_WORKGROUP_WGSL}
${SEGMENT_WGSL}
struct Dims {
  total: u32, row_blocks: u32, col_blocks: u32, k_padded: u32,
  a_rows_per_batch: u32, a_texels: u32, a_step: u32, b_rows_per_batch: u32,
  b_texels: u32, b_step: u32, out_rows: u32, out_cols4: u32,
  out_stride4: u32, out_batch_stride4: u32, col_groups: u32, groups: u32,
}
@group(0) @binding(0) var ta: ${textureType};
@group(0) @binding(1) var tb: ${textureType};
@group(0) @binding(2) var<storage, read_write> c: array<vec4<f32>>;
${fused}
@group(0) @binding(${binding}) var<uniform> d: Dims;

@compute @workgroup_size(${spec.lanes}, 1, 1)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  ${spec.shareA ? enumerateSharingA(spec.lanes) : enumerateFlat(spec.lanes)}
  let a_row0 = batch * d.a_rows_per_batch;
  let b_row0 = batch * d.b_rows_per_batch;
  let a_tile = segment_coord(a_row0 + rb * ${tm}u, 0u, d.a_texels, d.a_step);
  let b_tile = segment_coord(b_row0 + cb * ${tn}u, 0u, d.b_texels, d.b_step);
  ${declarations.join("\n  ")}
  for (var kk = 0u; kk < d.k_padded; kk += ${K_STEP}u) {
    let a0 = ${aOrigin};
    let b0 = ${bOrigin};
    ${loads.join("\n    ")}
    ${fmas.join("\n    ")}
  }
  if (skip) { return; }
  let row0 = rb * ${tm}u;
  let col4 = cb * ${tn4}u;
  let o = batch * d.out_batch_stride4 + row0 * d.out_stride4 + col4;
  ${biasLoads}
  ${stores.join("\n  ")}
}`;
}

// Invocations past the end redo the last block (their loads stay in bounds) and store nothing.
function enumerateFlat(lanes: number): string {
  return `let flat = linear_workgroup(wid, nwg) * ${lanes}u + lid.x;
  let inv = min(flat, d.total - 1u);
  let skip = flat >= d.total;
  let cb = inv % d.col_blocks;
  let rest = inv / d.col_blocks;
  let rb = rest % d.row_blocks;
  let batch = rest / d.row_blocks;`;
}

// A workgroup takes `lanes` column blocks of one row block, so the row block (and A's texels) is the same in every
// lane. Lanes past the last column block, and workgroups past the end, redo the last block and store nothing.
function enumerateSharingA(lanes: number): string {
  return `let group_flat = linear_workgroup(wid, nwg);
  let group = min(group_flat, d.groups - 1u);
  let cg = group % d.col_groups;
  let rest = group / d.col_groups;
  let rb = rest % d.row_blocks;
  let batch = rest / d.row_blocks;
  let cb_flat = cg * ${lanes}u + lid.x;
  let cb = min(cb_flat, d.col_blocks - 1u);
  let skip = group_flat >= d.groups || cb_flat >= d.col_blocks;`;
}

/**
 * Where the epilogue pass finds the raw product: a scratch buffer of whole tiles (N not a multiple of 4), C itself,
 * or the pre-activation buffer, which the product kernel then fills with the product plus bias.
 */
export type EpilogueSource = "scratch" | "c" | "pre";

/** What the epilogue pass does besides copying (bias, activation, pre-activation save, residual). */
export interface MatmulEpilogueSpec {
  source: EpilogueSource;
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
 * C = act(P + bias) + residual elementwise over the raw product P (in a scratch buffer, in C itself, or in the
 * pre-activation buffer), also saving act's input when asked. Outside the scratch route N is a multiple of 4 and
 * every access is a whole vec4, which halves the cost of this pass on CPU back ends. Bindings: P from scratch or
 * pre, C, then bias, residual, pre-activation when enabled, then the uniforms.
 */
export function matmulEpilogueKernel(spec: MatmulEpilogueSpec): Kernel {
  const key = `matmul_epilogue/${spec.source}/${spec.bias}/${spec.activation}/${spec.savePreActivation}/` +
    `${spec.residual}`;
  const vector = spec.source !== "scratch";
  const type = vector ? "vec4<f32>" : "f32";
  let binding = 0;
  const declarations: string[] = [];
  const declare = (name: string, access: "read" | "read_write", t: string) =>
    declarations.push(`@group(0) @binding(${binding++}) var<storage, ${access}> ${name}: array<${t}>;`);
  if (spec.source === "scratch") declare("src", "read", "f32");
  if (spec.source === "pre") declare("src", "read", type);
  declare("c", "read_write", type);
  if (spec.bias) declare("bias", "read", type);
  if (spec.residual) declare("residual", "read", type);
  if (spec.savePreActivation) declare("pre", "read_write", type);
  declarations.push(`@group(0) @binding(${binding++}) var<uniform> e: Epilogue;`);
  let activation = "z";
  if (spec.activation && vector) {
    activation = `vec4<f32>(${
      ["x", "y", "z", "w"].map((c) => unaryExpression(spec.activation!, `z.${c}`)).join(", ")
    })`;
  } else if (spec.activation) {
    activation = unaryExpression(spec.activation, "z");
  }
  const read = { scratch: `var z = src[src_row + col];`, c: `var z = c[i];`, pre: `var z = src[i];` }[spec.source];
  const body = [
    read,
    spec.bias ? `z += bias[col];` : "",
    spec.savePreActivation ? `pre[i] = z;` : "",
    `var y = ${activation};`,
    spec.residual ? `y += residual[i];` : "",
    `c[i] = y;`,
  ].filter(Boolean).join("\n    ");
  // On the vec4 routes the loop runs over vec4 columns: `col` and `i` then count vec4s.
  const cols = vector ? "e.n / 4u" : "e.n";
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
