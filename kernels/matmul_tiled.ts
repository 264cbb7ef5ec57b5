// Batched matmul for GPUs: each workgroup stages a BK-deep slab of A's and B's tiles in workgroup memory, and each
// invocation accumulates a TM x TN block of C from it in registers. Loads from global memory are shared by the
// workgroup (each element is read once per tile instead of once per output), which is what discrete GPUs need; CPU
// back ends read their operands through textures instead (matmul_texture.ts). Sizes and strides travel as uniforms,
// so one specialisation serves every shape: the key holds only orientation, operand types and the fused epilogue.
import { type Kernel } from "../lib/gpu/runtime.ts";
import { UNARY_HELPERS_WGSL } from "./elementwise.ts";
import { ENABLE_F16 } from "./grid.ts";
import { emitBlockWgsl, epilogueWgsl, type FusedEpilogue, type MatmulShape, type OperandType } from "./matmul.ts";

export interface TiledMatmulSpec extends FusedEpilogue {
  transA: boolean;
  transB: boolean;
  aType: OperandType;
  bType: OperandType;
}

/** Outputs per invocation along rows and columns, invocations per workgroup side, and the k depth of a slab. */
const TM = 4;
const TN = 4;
const WG = 16;
const BK = 16;
const TILE = WG * TM; // 64 rows and 64 columns of C per workgroup

export function tiledMatmulWorkgroups(s: MatmulShape): [number, number, number] {
  return [Math.ceil(s.n / TILE), Math.ceil(s.m / TILE), s.batch];
}

export function tiledMatmulUniforms(s: MatmulShape): Uint32Array {
  return Uint32Array.from([s.m, s.n, s.k, s.aBatchStride, s.bBatchStride, 0, 0, 0]);
}

export function tiledMatmulKernel(spec: TiledMatmulSpec): Kernel {
  const key =
    `matmul_tiled/${spec.transA}/${spec.transB}/${spec.aType}/${spec.bType}/${spec.bias}/${spec.activation}/` +
    `${spec.savePreActivation}/${spec.residual}`;
  const widen = (type: OperandType, load: string) => type === "f16" ? `f32(${load})` : load;
  // Element (row, col) of op(A) and op(B) for this batch entry; callers keep row and col in range.
  const aAt = spec.transA ? "a[a_base + col * u.m + row]" : "a[a_base + row * u.k + col]";
  const bAt = spec.transB ? "b[b_base + col * u.k + row]" : "b[b_base + row * u.n + col]";
  const { declarations, emit, next } = epilogueWgsl(spec, 3);
  const rows = Array.from({ length: TM }, (_, i) => i);
  const cols = Array.from({ length: TN }, (_, j) => j);
  const usesF16 = spec.aType === "f16" || spec.bType === "f16";
  // Each of the WG*WG invocations stages TILE*BK/(WG*WG) elements of each slab.
  const perInvocation = TILE * BK / (WG * WG);
  return {
    key,
    wgsl: () =>
      `${usesF16 ? ENABLE_F16 : ""}${UNARY_HELPERS_WGSL}
struct Dims { m: u32, n: u32, k: u32, a_batch_stride: u32, b_batch_stride: u32, p0: u32, p1: u32, p2: u32 }
@group(0) @binding(0) var<storage, read> a: array<${spec.aType}>;
@group(0) @binding(1) var<storage, read> b: array<${spec.bType}>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
${declarations}
@group(0) @binding(${next}) var<uniform> u: Dims;

// Slabs: a_tile[kk][r] is op(A)[tile row r][k0 + kk], b_tile[kk][j] is op(B)[k0 + kk][tile column j].
var<workgroup> a_tile: array<array<f32, ${TILE}>, ${BK}>;
var<workgroup> b_tile: array<array<f32, ${TILE}>, ${BK}>;

${emit}

@compute @workgroup_size(${WG}, ${WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
  let batch = wid.z;
  let a_base = batch * u.a_batch_stride;
  let b_base = batch * u.b_batch_stride;
  let tile_row = wid.y * ${TILE}u;
  let tile_col = wid.x * ${TILE}u;
  let flat = lid.y * ${WG}u + lid.x;
  ${rows.map((i) => `var acc${i} = vec4<f32>(0.0);`).join(" ")}
  for (var k0 = 0u; k0 < u.k; k0 += ${BK}u) {
    for (var e = 0u; e < ${perInvocation}u; e++) {
      let slot = e * ${WG * WG}u + flat;
      // A's slab: consecutive invocations take consecutive k (row-major A) for contiguous reads.
      let ar = slot / ${BK}u;
      let ak = slot % ${BK}u;
      var av = 0.0;
      if (tile_row + ar < u.m && k0 + ak < u.k) {
        let row = tile_row + ar;
        let col = k0 + ak;
        av = ${widen(spec.aType, aAt)};
      }
      a_tile[ak][ar] = av;
      let bk = slot / ${TILE}u;
      let bc = slot % ${TILE}u;
      var bv = 0.0;
      if (k0 + bk < u.k && tile_col + bc < u.n) {
        let row = k0 + bk;
        let col = tile_col + bc;
        bv = ${widen(spec.bType, bAt)};
      }
      b_tile[bk][bc] = bv;
    }
    workgroupBarrier();
    for (var kk = 0u; kk < ${BK}u; kk++) {
      let bv = vec4<f32>(${cols.map((j) => `b_tile[kk][lid.x * ${TN}u + ${j}u]`).join(", ")});
      ${rows.map((i) => `acc${i} = fma(vec4<f32>(a_tile[kk][lid.y * ${TM}u + ${i}u]), bv, acc${i});`).join("\n      ")}
    }
    workgroupBarrier();
  }
  let row0 = tile_row + lid.y * ${TM}u;
  let col0 = tile_col + lid.x * ${TN}u;
  let c_base = batch * u.m * u.n;
  ${emitBlockWgsl("u.m", "u.n", "c_base")}
}`,
  };
}
