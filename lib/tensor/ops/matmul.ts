import {
  matmulKernel,
  type MatmulShape,
  type MatmulSpec,
  matmulWorkgroups,
  type OperandType,
} from "../../../kernels/matmul.ts";
import {
  K_STEP,
  kRowSumKernel,
  kRowSumUniforms,
  kRowSumWorkgroups,
  matmulDestination,
  matmulEpilogueKernel,
  type MatmulEpilogueSpec,
  matmulEpilogueUniforms,
  matmulEpilogueWorkgroups,
  type MatmulTile,
  type OperandLayout,
  operandLayout,
  TEXTURE_SEGMENT_ROWS,
  type TextureMatmulGeometry,
  textureMatmulKernel,
  type TextureMatmulSpec,
  textureMatmulUniforms,
  textureMatmulWorkgroups,
} from "../../../kernels/matmul_texture.ts";
import { type AdapterSummary, subgroupIsWorkgroup } from "../../gpu/device.ts";
import { elementGroups, unaryBackwardKernel, type UnaryOp } from "../../../kernels/elementwise.ts";
import { isGradEnabled, record } from "../autograd.ts";
import { empty, emptyLike } from "../create.ts";
import { shapeString, type Tensor } from "../tensor.ts";
import { matmulOperandType } from "../precision.ts";
import { cast } from "./cast.ts";
import { sumAxesForward } from "./elementwise.ts";
import { fillOperandTexture, texturePool } from "./texture_operand.ts";
import { tiledMatmulKernel, tiledMatmulUniforms, tiledMatmulWorkgroups } from "../../../kernels/matmul_tiled.ts";

export interface MatmulOptions {
  /** Use A's last two axes transposed (A stored as [..., K, M]). */
  transA?: boolean;
  /** Use B's last two axes transposed (B stored as [..., N, K], as a PyTorch Linear weight is). */
  transB?: boolean;
  /** Added to every row: [N]. */
  bias?: Tensor;
  /** Applied after the bias. */
  activation?: UnaryOp | null;
  /** Added after the activation: C's shape. */
  residual?: Tensor;
}

// Activations whose derivative is written in terms of the input alone, so a fused residual cannot spoil it.
const INPUT_DERIVATIVE: ReadonlySet<UnaryOp> = new Set(["gelu", "quick_gelu", "relu", "neg", "square", "log"]);

export interface Geometry extends MatmulShape {
  batchShape: number[];
}

function geometry(a: Tensor, b: Tensor, transA: boolean, transB: boolean): Geometry {
  if (a.rank < 2 || b.rank < 2) throw new Error(`matmul needs rank >= 2 operands, got ${a} and ${b}`);
  const [ar, ac] = a.shape.slice(-2);
  const [br, bc] = b.shape.slice(-2);
  const [m, ka] = transA ? [ac, ar] : [ar, ac];
  const [kb, n] = transB ? [bc, br] : [br, bc];
  if (ka !== kb) {
    throw new Error(
      `matmul: inner sizes differ: ${shapeString(a.shape)}${transA ? "^T" : ""} x ${shapeString(b.shape)}${
        transB ? "^T" : ""
      }`,
    );
  }
  const aBatch = a.shape.slice(0, -2);
  const bBatch = b.shape.slice(0, -2);
  const aCount = aBatch.reduce((p, d) => p * d, 1);
  const bCount = bBatch.reduce((p, d) => p * d, 1);
  if (aCount > 1 && bCount > 1 && shapeString(aBatch) !== shapeString(bBatch)) {
    throw new Error(`matmul: batch shapes ${shapeString(aBatch)} and ${shapeString(bBatch)} differ`);
  }
  const batchShape = aCount >= bCount ? aBatch : bBatch;
  return {
    batchShape,
    batch: Math.max(aCount, bCount),
    m,
    n,
    k: ka,
    aBatchStride: aCount > 1 ? m * ka : 0,
    bBatchStride: bCount > 1 ? ka * n : 0,
  };
}

/**
 * Which kernel runs a matmul: "auto" picks per adapter and size; the others force a path (tests, benchmarks).
 * "texture": register tiles over texture operands (CPU back ends); "tiled": workgroup-memory tiles (GPUs);
 * "buffer": the plain register-tile kernel (small products on CPU back ends, whose compile is cheapest).
 */
export type MatmulPath = "auto" | "buffer" | "tiled" | "texture";

let pathOverride: MatmulPath = "auto";

/** Forces a matmul path for every later call (tests and benchmarks); returns the previous setting. */
export function setMatmulPath(path: MatmulPath): MatmulPath {
  const previous = pathOverride;
  pathOverride = path;
  return previous;
}

/**
 * The CPU back end takes the texture path from this many multiply-adds. Measured on llvmpipe (2 cores, 16 lanes),
 * per product, buffer kernel / texture path: 32^3 0.10 / 0.25 ms, 64^3 0.42 / 0.17, 128^3 5.9 / 0.51,
 * 50x768x768 76 / 2.8 (bench/README.md). Break-even lies between 32^3 and 64^3; the bar sits at 64^3, which also
 * keeps tiny products (unit tests, toy models) from paying the texture kernel's first compile (about 10 s per
 * orientation until Mesa's disk cache holds it).
 */
export const TEXTURE_MATMUL_MIN_MACS = 1 << 18;

/** A texture-kernel choice: its tile, and whether the lanes of a workgroup share A's rows (`TextureMatmulSpec`). */
export interface TextureKernelChoice {
  tile: MatmulTile;
  shareA: boolean;
}

/**
 * Without subgroups: 32x32 outputs per invocation, with 64x16 the fastest tile measured on llvmpipe (within 2-3% of
 * each other in interleaved runs, `bench/matmul_variants.ts`; 32x16 was 6-11% slower). Invocations run over
 * (batch, row block, column block), so lanes never idle, and only N's padding to 32 is lost.
 */
export const FLAT_KERNEL: TextureKernelChoice = { tile: { tm: 32, tn: 32 }, shareA: false };

/**
 * With subgroups: lanes share A's rows, which leaves B's fetches as the cost that grows with the tile's width, so
 * the tile is tall and narrow. A workgroup of 16 lanes covers 128 rows by 128 columns.
 */
export const SHARED_KERNEL: TextureKernelChoice = { tile: { tm: 128, tn: 8 }, shareA: true };

/**
 * How much faster the shared kernel runs per multiply-add, padding included: it is taken when the padded work of
 * the flat kernel exceeds its own by less than this factor (a product of 32 rows, for one, goes to the flat kernel).
 */
const SHARED_SPEEDUP = 1.25;

let kernelOverride: TextureKernelChoice | null = null;

/**
 * Forces the texture kernel's tile and sharing for every later call (tests and benchmarks compare them), or gives
 * the choice back to the planner with null; returns the previous override.
 */
export function setTextureKernel(choice: TextureKernelChoice | null): TextureKernelChoice | null {
  const previous = kernelOverride;
  kernelOverride = choice;
  return previous;
}

/** Whether the adapter's subgroups are as wide as the texture kernel's workgroups, which sharing A needs. */
export function canShareA(adapter: AdapterSummary): boolean {
  return subgroupIsWorkgroup(adapter, textureLanes(adapter));
}

/**
 * Whether this adapter's large products read a right operand stored [K, N] faster than one stored [N, K], as Linear
 * weights are. Measured on lavapipe at ViT-B/32's shapes, interleaved (`bench/matmul_variants.ts`): the flat kernel
 * reads [K, N] about 10% faster (1600x768x2304: 82 against 74 GFLOP/s), the kernel sharing A reads [N, K] 10-20%
 * faster (1600x768x2304: 100 against 89; 1600x3072x768: 105 against 87). GPUs: not measured, so no preference.
 */
export function readsKNFaster(adapter: AdapterSummary): boolean {
  return adapter.isSoftware && !canShareA(adapter);
}

function textureLanes(adapter: AdapterSummary): number {
  return adapter.cpuLanes || 8;
}

function chooseTextureKernel(adapter: AdapterSummary, m: number, n: number): TextureKernelChoice {
  if (kernelOverride) {
    if (kernelOverride.shareA && !canShareA(adapter)) {
      throw new Error(`matmul: sharing A needs subgroups of ${textureLanes(adapter)} lanes, which this device lacks`);
    }
    return kernelOverride;
  }
  if (!canShareA(adapter)) return FLAT_KERNEL;
  const pad = (x: number, to: number) => Math.ceil(x / to) * to;
  const flat = pad(m, FLAT_KERNEL.tile.tm) * pad(n, FLAT_KERNEL.tile.tn);
  const { tm, tn } = SHARED_KERNEL.tile;
  const shared = pad(m, tm) * pad(n, tn * textureLanes(adapter));
  return shared <= flat * SHARED_SPEEDUP ? SHARED_KERNEL : FLAT_KERNEL;
}

/** How `matmulForward` will run a product: the kernel path and, for the texture path, its tile and layouts. */
export interface MatmulPlan {
  path: Exclude<MatmulPath, "auto">;
  geometry: Geometry;
  texture?: { spec: TextureMatmulSpec; geometry: TextureMatmulGeometry };
}

/** Decides the path for op(A) op(B) with these options (exported so benchmarks and tests can report it). */
export function planMatmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): MatmulPlan {
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const g = geometry(a, b, transA, transB);
  const adapter = a.gpu.adapter;
  if (pathOverride === "auto" && !adapter.isSoftware) return { path: "tiled", geometry: g };
  const storagePath = pathOverride === "tiled" ? "tiled" : "buffer";
  const wanted = pathOverride === "auto"
    ? g.batch * g.m * g.n * g.k >= TEXTURE_MATMUL_MIN_MACS
    : pathOverride === "texture";
  if (!wanted) return { path: storagePath, geometry: g };
  const kernel = chooseTextureKernel(adapter, g.m, g.n);
  const { tm, tn } = kernel.tile;
  const aBatches = g.aBatchStride ? g.batch : 1;
  const bBatches = g.bBatchStride ? g.batch : 1;
  // Textures hold the stored rows: A [M,K] has tile rows, A^T [K,M] k rows; B [K,N] k rows, B^T [N,K] tile rows.
  const aType = operandType(a);
  const bType = operandType(b);
  const aLayout = transA
    ? operandLayout(g.k, g.m, aBatches, "k", K_STEP, tm, aType)
    : operandLayout(g.m, g.k, aBatches, "tile", tm, K_STEP, aType);
  const bLayout = transB
    ? operandLayout(g.n, g.k, bBatches, "tile", tn, K_STEP, bType)
    : operandLayout(g.k, g.n, bBatches, "k", K_STEP, tn, bType);
  const maxSide = adapter.limits.maxTextureDimension2D ?? 8192;
  // The layouts wrap rows into segments of TEXTURE_SEGMENT_ROWS; an adapter with smaller textures, or operands
  // too wide even then (the pool rounds widths up to a power of two), use a storage-buffer kernel.
  const fits = (l: OperandLayout) => maxSide >= TEXTURE_SEGMENT_ROWS && 2 ** Math.ceil(Math.log2(l.width)) <= maxSide;
  if (!fits(aLayout) || !fits(bLayout)) return { path: storagePath, geometry: g };
  return {
    path: "texture",
    geometry: g,
    texture: {
      spec: { ...kernel, lanes: textureLanes(adapter), transA, transB, ...fusedStores(g.n, opts) },
      geometry: { batch: g.batch, m: g.m, n: g.n, k: g.k, a: aLayout, b: bLayout },
    },
  };
}

function operandType(t: Tensor): OperandType {
  if (t.dtype === "i32") throw new Error(`matmul: ${t} is not a float tensor`);
  return t.dtype;
}

/**
 * What the texture kernel adds as it stores, when C is stored directly (N % 4 == 0): the bias, and the residual
 * unless an activation has to come before it (the epilogue pass then adds it).
 */
function fusedStores(n: number, opts: MatmulOptions): { bias: boolean; residual: boolean } {
  const direct = n % 4 === 0;
  return { bias: direct && !!opts.bias, residual: direct && !opts.activation && !!opts.residual };
}

/** Records one matmul without autograd; returns the output and, if asked, the pre-activation values. */
export function matmulForward(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions = {},
  savePreActivation = false,
): { out: Tensor; pre: Tensor | null } {
  const { out, pre } = matmulForwardSummingK(a, b, opts, savePreActivation, null);
  return { out, pre };
}

/**
 * `matmulForward` that also returns the sums over K of one operand's stored k rows (A stored [K,M], B stored
 * [K,N]) when the texture path runs it on one matrix: it then reads the texture the product has just filled. `sums`
 * is null otherwise, and the caller adds the rows itself.
 */
function matmulForwardSummingK(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions,
  savePreActivation: boolean,
  summed: "a" | "b" | null,
): { out: Tensor; pre: Tensor | null; sums: Tensor | null } {
  const plan = planMatmul(a, b, opts);
  const g = plan.geometry;
  const outShape = [...g.batchShape, g.m, g.n];
  if (opts.bias && (opts.bias.size !== g.n)) throw new Error(`matmul: bias ${opts.bias} does not match N=${g.n}`);
  if (opts.residual && opts.residual.size !== g.batch * g.m * g.n) {
    throw new Error(`matmul: residual ${opts.residual} does not match the output ${shapeString(outShape)}`);
  }
  if (g.k === 0) throw new Error("matmul with K = 0 is not supported");
  const keepPre = savePreActivation && !!opts.activation;
  const out = empty(a.gpu, outShape);
  const pre = keepPre ? empty(a.gpu, outShape) : null;
  if (plan.texture) {
    const { spec, geometry } = plan.texture;
    const kRows = summed === "a" ? spec.transA : summed === "b" ? !spec.transB : false;
    const sums = kRows && geometry.batch === 1 ? empty(a.gpu, [summed === "a" ? g.m : g.n]) : null;
    dispatchTextureMatmul(a, b, opts, spec, geometry, out, pre, sums && { operand: summed!, out: sums });
    return { out, pre, sums };
  }
  const epilogue = {
    bias: !!opts.bias,
    activation: opts.activation ?? null,
    savePreActivation: keepPre,
    residual: !!opts.residual,
  };
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const [aType, bType] = [operandType(a), operandType(b)];
  const bindings = [a.buffer, b.buffer, out.buffer];
  if (opts.bias) bindings.push(opts.bias.buffer);
  if (opts.residual) bindings.push(opts.residual.buffer);
  if (pre) bindings.push(pre.buffer);
  const shape: MatmulShape = {
    batch: g.batch,
    m: g.m,
    n: g.n,
    k: g.k,
    aBatchStride: g.aBatchStride,
    bBatchStride: g.bBatchStride,
  };
  if (plan.path === "tiled") {
    a.gpu.dispatch(
      tiledMatmulKernel({ ...epilogue, transA, transB, aType, bType }),
      bindings,
      tiledMatmulWorkgroups(shape),
      tiledMatmulUniforms(shape),
      `${g.batch}x${g.m}x${g.n}x${g.k}`,
    );
    return { out, pre, sums: null };
  }
  const spec: MatmulSpec = { ...shape, ...epilogue, transA, transB, aType, bType };
  a.gpu.dispatch(matmulKernel(spec), bindings, matmulWorkgroups(spec));
  return { out, pre, sums: null };
}

/** Packs both operands into pooled textures, records the tiled product and, when needed, the epilogue pass. */
function dispatchTextureMatmul(
  a: Tensor,
  b: Tensor,
  opts: MatmulOptions,
  spec: TextureMatmulSpec,
  g: TextureMatmulGeometry,
  out: Tensor,
  pre: Tensor | null,
  kSums: { operand: "a" | "b"; out: Tensor } | null,
): void {
  const gpu = a.gpu;
  const pool = texturePool(gpu);
  const ta = pool.acquire(g.a.width, g.a.height);
  const tb = pool.acquire(g.b.width, g.b.height);
  fillOperandTexture(a, ta, g.a);
  fillOperandTexture(b, tb, g.b);
  const direct = g.n % 4 === 0;
  const dest = matmulDestination(spec, g, direct);
  const scratch = direct ? null : gpu.pool.acquire(g.batch * dest.rows * dest.rowStride * 4);
  // With an activation to apply and its input to keep, the product (plus its fused bias) goes straight to `pre`.
  const toPre = direct && pre !== null;
  gpu.dispatch(
    textureMatmulKernel(spec),
    [
      ta.view,
      tb.view,
      scratch ?? (toPre ? pre : out).buffer,
      ...(spec.bias ? [opts.bias!.buffer] : []),
      ...(spec.residual ? [opts.residual!.buffer] : []),
    ],
    textureMatmulWorkgroups(spec, g),
    textureMatmulUniforms(spec, g, dest),
    `${g.batch}x${g.m}x${g.n}x${g.k}`,
  );
  if (kSums) {
    const [texture, layout] = kSums.operand === "a" ? [ta, g.a] : [tb, g.b];
    gpu.dispatch(kRowSumKernel(), [texture.view, kSums.out.buffer], kRowSumWorkgroups(layout), kRowSumUniforms(layout));
  }
  // Commands run in recording order, so a later user of these textures or buffers cannot overtake this product.
  pool.release(ta);
  pool.release(tb);
  const epilogue: MatmulEpilogueSpec = {
    source: scratch ? "scratch" : toPre ? "pre" : "c",
    bias: !!opts.bias && !spec.bias,
    activation: opts.activation ?? null,
    savePreActivation: pre !== null && !toPre,
    residual: !!opts.residual && !spec.residual,
  };
  if (direct && !epilogue.bias && !epilogue.activation && !epilogue.residual) return;
  const bindings = [
    ...(scratch ? [scratch] : toPre ? [pre.buffer] : []),
    out.buffer,
    ...(epilogue.bias ? [opts.bias!.buffer] : []),
    ...(epilogue.residual ? [opts.residual!.buffer] : []),
    ...(epilogue.savePreActivation ? [pre!.buffer] : []),
  ];
  gpu.dispatch(
    matmulEpilogueKernel(epilogue),
    bindings,
    matmulEpilogueWorkgroups(g.batch, g.m),
    matmulEpilogueUniforms(g.batch, g.m, g.n, dest),
  );
  if (scratch) gpu.pool.release(scratch);
}

/** Sums a batched gradient over its leading batch axes when the operand was shared by the whole batch. */
function reduceBatch(grad: Tensor, operand: Tensor): Tensor {
  if (grad.size === operand.size) {
    const v = grad.view(operand.shape);
    grad.dispose();
    return v;
  }
  const lead = grad.rank - 2;
  const reduced = grad.shape.map((_, d) => d < lead);
  const summed = sumAxesForward(grad, reduced);
  grad.dispose();
  const v = summed.view(operand.shape);
  summed.dispose();
  return v;
}

/**
 * C = act(op(A) op(B) + bias) + residual, batched over leading axes (one operand may have none: it is shared).
 * Backward: dA = dZ op(B)^T, dB = op(A)^T dZ (summed over the batch when shared), dbias = column sums of dZ.
 * Under `withPrecision("f16")` A and B enter as f16 copies; the product, its output and every gradient stay f32.
 */
export function matmul(a: Tensor, b: Tensor, opts: MatmulOptions = {}): Tensor {
  if (matmulOperandType() === "f16") {
    a = cast(a, "f16");
    b = cast(b, "f16");
  }
  const act = opts.activation ?? null;
  const needGrad = isGradEnabled() && [a, b, opts.bias, opts.residual].some((t) => t?.requiresGrad);
  if (needGrad && act && opts.residual && !INPUT_DERIVATIVE.has(act)) {
    throw new Error(`matmul: a fused residual cannot be combined with '${act}' when gradients are needed`);
  }
  const { out, pre } = matmulForward(a, b, opts, needGrad);
  const transA = opts.transA ?? false;
  const transB = opts.transB ?? false;
  const inputs = [a, b, ...(opts.bias ? [opts.bias] : []), ...(opts.residual ? [opts.residual] : [])];
  return record(out, "matmul", inputs, (g) => {
    let dz = g;
    if (act && pre) {
      dz = emptyLike(g);
      g.gpu.dispatch(
        unaryBackwardKernel(act, g.size),
        [pre.buffer, out.buffer, g.buffer, dz.buffer],
        elementGroups(g.size),
      );
    }
    let da: Tensor | null = null;
    let db: Tensor | null = null;
    // The weight-gradient product reads dZ as its k rows, so its texture also yields the bias gradient.
    let dbias: Tensor | null = null;
    const wantBias = !!opts.bias?.requiresGrad;
    if (a.requiresGrad) {
      const r = transA
        ? matmulForward(b, dz, { transA: transB, transB: true }).out // stored [K,M] = op(B) dZ^T
        : matmulForward(dz, b, { transB: !transB }).out; // [M,K] = dZ op(B)^T
      da = reduceBatch(r, a);
    }
    if (b.requiresGrad) {
      const { out: r, sums } = transB
        ? matmulForwardSummingK(dz, a, { transA: true, transB: transA }, false, wantBias ? "a" : null) // [N,K] = dZ^T op(A)
        : matmulForwardSummingK(a, dz, { transA: !transA }, false, wantBias ? "b" : null); // [K,N] = op(A)^T dZ
      db = reduceBatch(r, b);
      dbias = sums;
    }
    const grads: (Tensor | null)[] = [da, db];
    if (opts.bias) {
      if (wantBias && !dbias) dbias = sumAxesForward(dz, dz.shape.map((_, d) => d < dz.rank - 1));
      grads.push(dbias && viewAs(dbias, opts.bias.shape));
    }
    if (opts.residual) grads.push(opts.residual.requiresGrad ? (dz === g ? g : viewOf(g)) : null);
    if (dz !== g) dz.dispose();
    pre?.dispose();
    return grads;
  });
}

/** `t` under another shape of the same size; `t` itself is given up. */
function viewAs(t: Tensor, shape: readonly number[]): Tensor {
  const v = t.view(shape);
  t.dispose();
  return v;
}

function viewOf(t: Tensor): Tensor {
  return t.view(t.shape);
}
