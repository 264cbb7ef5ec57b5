// Batched matmul from storage buffers: C[b] = act(op(A[b]) op(B[b]) + bias). Each invocation computes a TM x TN
// register tile; operands are addressed through baked strides, so transposed operands and a batch-shared B need no
// copies. This is the portable kernel; faster specialisations (texture operands on the CPU fallback) sit beside it.
import { type Kernel } from "../lib/gpu/runtime.ts";
import { UNARY_HELPERS_WGSL, unaryExpression, type UnaryOp } from "./elementwise.ts";
import { ENABLE_F16 } from "./grid.ts";

/** Element type of a matmul operand: f16 operands are widened on load, so products always accumulate in f32. */
export type OperandType = "f32" | "f16";

/** The sizes of a batched product C[b] = op(A[b]) op(B[b]), C being M x N and the inner size K. */
export interface MatmulShape {
  batch: number;
  m: number;
  n: number;
  k: number;
  /** Elements between consecutive batch entries of A and B (0: shared across the batch). */
  aBatchStride: number;
  bBatchStride: number;
}

export interface MatmulSpec extends MatmulShape, FusedEpilogue {
  transA: boolean;
  transB: boolean;
  aType: OperandType;
  bType: OperandType;
}

/** The fused epilogue's switches, shared by the storage-buffer kernels. */
export interface FusedEpilogue {
  bias: boolean;
  activation: UnaryOp | null;
  savePreActivation: boolean;
  residual: boolean;
}

/**
 * WGSL of a fused epilogue: the bias, residual and pre-activation bindings (from index `first` on) and
 * `emit(idx, col, v)`, which stores output element idx (column col) from the raw product v.
 */
export function epilogueWgsl(spec: FusedEpilogue, first: number): { declarations: string; emit: string; next: number } {
  let binding = first;
  const declarations: string[] = [];
  if (spec.bias) declarations.push(`@group(0) @binding(${binding++}) var<storage, read> bias: array<f32>;`);
  if (spec.residual) declarations.push(`@group(0) @binding(${binding++}) var<storage, read> residual: array<f32>;`);
  if (spec.savePreActivation) {
    declarations.push(`@group(0) @binding(${binding++}) var<storage, read_write> pre: array<f32>;`);
  }
  const body = [
    `var z = v;`,
    spec.bias ? `z += bias[col];` : "",
    spec.savePreActivation ? `pre[idx] = z;` : "",
    `var y = ${spec.activation ? unaryExpression(spec.activation, "z") : "z"};`,
    spec.residual ? `y += residual[idx];` : "",
    `c[idx] = y;`,
  ].filter(Boolean).join("\n  ");
  return {
    declarations: declarations.join("\n"),
    emit: `fn emit(idx: u32, col: u32, v: f32) {\n  ${body}\n}`,
    next: binding,
  };
}

/**
 * WGSL that emits the 4 x 4 block held in accumulators acc0..acc3 (rows row0.., columns col0..) of a C with `m`
 * rows and `n` columns starting at element `base`, skipping elements past the edges.
 */
export function emitBlockWgsl(m: string, n: string, base: string): string {
  const component = ["x", "y", "z", "w"];
  return [0, 1, 2, 3].map((i) =>
    `if (row0 + ${i}u < ${m}) { ${
      [0, 1, 2, 3].map((j) =>
        `if (col0 + ${j}u < ${n}) { emit(${base} + (row0 + ${i}u) * ${n} + col0 + ${j}u, col0 + ${j}u, acc${i}.${
          component[j]
        }); }`
      ).join(" ")
    } }`
  ).join("\n  ");
}

const TM = 4;
const TN = 4;
const WG_X = 8;
const WG_Y = 8;

export function matmulWorkgroups(spec: MatmulSpec): [number, number, number] {
  return [Math.ceil(spec.n / (TN * WG_X)), Math.ceil(spec.m / (TM * WG_Y)), spec.batch];
}

export function matmulKernel(spec: MatmulSpec): Kernel {
  const { m, n, k, transA, transB, aBatchStride, bBatchStride } = spec;
  const key = `matmul_buf/${JSON.stringify(spec)}`;
  // Element (row, col) of op(A) and op(B).
  const widen = (type: OperandType, load: string) => type === "f16" ? `f32(${load})` : load;
  const aAt = (r: string, c: string) =>
    widen(spec.aType, transA ? `a[aBase + (${c}) * ${m}u + (${r})]` : `a[aBase + (${r}) * ${k}u + (${c})]`);
  const bAt = (r: string, c: string) =>
    widen(spec.bType, transB ? `b[bBase + (${c}) * ${k}u + (${r})]` : `b[bBase + (${r}) * ${n}u + (${c})]`);
  const usesF16 = spec.aType === "f16" || spec.bType === "f16";
  const { declarations, emit } = epilogueWgsl(spec, 3);
  const rows = Array.from({ length: TM }, (_, i) => i);
  const cols = Array.from({ length: TN }, (_, j) => j);
  // The tile lives in named vec4 registers (one per row) with every loop over it unrolled here: private arrays
  // indexed in loops cost a lot on CPU back ends, which lower dynamic indices into branch ladders.
  return {
    key,
    wgsl: () =>
      `${usesF16 ? ENABLE_F16 : ""}${UNARY_HELPERS_WGSL}
@group(0) @binding(0) var<storage, read> a: array<${spec.aType}>;
@group(0) @binding(1) var<storage, read> b: array<${spec.bType}>;
@group(0) @binding(2) var<storage, read_write> c: array<f32>;
${declarations}
${emit}
@compute @workgroup_size(${WG_X}, ${WG_Y})
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
  let batch = gid.z;
  let aBase = batch * ${aBatchStride}u;
  let bBase = batch * ${bBatchStride}u;
  let cBase = batch * ${m * n}u;
  let row0 = gid.y * ${TM}u;
  let col0 = gid.x * ${TN}u;
  ${rows.map((i) => `let r${i} = min(row0 + ${i}u, ${m - 1}u);`).join(" ")}
  ${cols.map((j) => `let k${j} = min(col0 + ${j}u, ${n - 1}u);`).join(" ")}
  ${rows.map((i) => `var acc${i} = vec4<f32>(0.0);`).join(" ")}
  for (var kk = 0u; kk < ${k}u; kk++) {
    let bv = vec4<f32>(${cols.map((j) => bAt("kk", `k${j}`)).join(", ")});
    ${rows.map((i) => `acc${i} = fma(vec4<f32>(${aAt(`r${i}`, "kk")}), bv, acc${i});`).join("\n    ")}
  }
  ${emitBlockWgsl(`${m}u`, `${n}u`, "cBase")}
}`,
  };
}
