// Elementwise kernels: fill, copy, unary maps and their derivatives, broadcasting binary ops (as vec4 words where the
// sizes allow), and the chunked passes that sum over any set of axes. Sizes and strides are baked into the code; one
// key per specialisation.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { elementGroups, ELEMENTWISE_WG, ENABLE_F16, gridKernel } from "./grid.ts";

export { elementGroups, ELEMENTWISE_WG };

function elementwise(key: string, n: number, bindings: string, body: string, helpers = ""): Kernel {
  return gridKernel(key, n, bindings, body, helpers);
}

/**
 * Elements per invocation of the vector kernels: one vec4 word. Their workgroups have ELEMENTWISE_WG / 4 invocations,
 * so a workgroup still covers ELEMENTWISE_WG elements and `elementGroups(n)` sizes the dispatch of either form.
 * On the CPU fallback every storage-buffer load runs a loop over the SIMD lanes; a vec4 load costs about what a
 * scalar one does, so moving words of 4 floats nearly halves the time of the memory-bound kernels (measured 1.3-1.8x
 * on lavapipe). Every GPU gains from the wider loads too.
 */
const VECTOR_WG = ELEMENTWISE_WG / 4;

/** True when n elements can be moved as whole vec4 words (tensor buffers come from the pool in 16-byte multiples). */
export function isVectorisable(n: number): boolean {
  return n % 4 === 0;
}

/** A kernel whose `body` runs once for each vec4 word `i` in [0, n / 4). */
function elementwiseVec4(key: string, n: number, bindings: string, body: string, helpers = ""): Kernel {
  if (!isVectorisable(n)) throw new Error(`${key}: ${n} elements are not whole vec4 words`);
  return gridKernel(key, n / 4, bindings, body, helpers, VECTOR_WG);
}

const f32lit = (v: number) =>
  Number.isFinite(v)
    ? `f32(${v.toExponential()})`
    : (v > 0 ? "bitcast<f32>(0x7f800000u)" : v < 0 ? "bitcast<f32>(0xff800000u)" : "bitcast<f32>(0x7fc00000u)");

export function fillKernel(n: number, value: number, type: "f32" | "f16" | "i32" = "f32"): Kernel {
  const lit = type === "i32" ? `${Math.trunc(value)}i` : type === "f16" ? `f16(${f32lit(value)})` : f32lit(value);
  const kernel = isVectorisable(n)
    ? elementwiseVec4(
      `fill4/${type}/${n}/${value}`,
      n,
      `@group(0) @binding(0) var<storage, read_write> out: array<vec4<${type}>>;`,
      `out[i] = vec4<${type}>(${lit});`,
    )
    : elementwise(
      `fill/${type}/${n}/${value}`,
      n,
      `@group(0) @binding(0) var<storage, read_write> out: array<${type}>;`,
      `out[i] = ${lit};`,
    );
  return type === "f16" ? { key: kernel.key, wgsl: () => ENABLE_F16 + kernel.wgsl() } : kernel;
}

/** out = T(src) between f32 and f16 (round to nearest even when narrowing, exact when widening). */
export function castKernel(n: number, from: "f32" | "f16", to: "f32" | "f16"): Kernel {
  const vector = isVectorisable(n);
  const word = (t: string) => vector ? `vec4<${t}>` : t;
  const bindings = `@group(0) @binding(0) var<storage, read> src: array<${word(from)}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word(to)}>;`;
  const body = `out[i] = ${word(to)}(src[i]);`;
  const kernel = vector
    ? elementwiseVec4(`cast4/${from}/${to}/${n}`, n, bindings, body)
    : elementwise(`cast/${from}/${to}/${n}`, n, bindings, body);
  return { key: kernel.key, wgsl: () => ENABLE_F16 + kernel.wgsl() };
}

/** out = a * alpha + b * beta, elementwise over equal sizes (covers copy, accumulate, axpy). */
export function linearCombinationKernel(n: number, alpha: number, beta: number | null): Kernel {
  const word = isVectorisable(n) ? "vec4<f32>" : "f32";
  const rhs = beta === null ? `a[i] * ${f32lit(alpha)}` : `a[i] * ${f32lit(alpha)} + b[i] * ${f32lit(beta)}`;
  const bindings = beta === null
    ? `@group(0) @binding(0) var<storage, read> a: array<${word}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word}>;`
    : `@group(0) @binding(0) var<storage, read> a: array<${word}>;
@group(0) @binding(1) var<storage, read> b: array<${word}>;
@group(0) @binding(2) var<storage, read_write> out: array<${word}>;`;
  return isVectorisable(n)
    ? elementwiseVec4(`lincomb4/${n}/${alpha}/${beta}`, n, bindings, `out[i] = ${rhs};`)
    : elementwise(`lincomb/${n}/${alpha}/${beta}`, n, bindings, `out[i] = ${rhs};`);
}

/** dst += src, in place. */
export function accumulateKernel(n: number): Kernel {
  const vector = isVectorisable(n);
  const word = vector ? "vec4<f32>" : "f32";
  return (vector ? elementwiseVec4 : elementwise)(
    `accumulate${vector ? "4" : ""}/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read_write> dst: array<${word}>;
@group(0) @binding(1) var<storage, read> src: array<${word}>;`,
    `dst[i] = dst[i] + src[i];`,
  );
}

/** dst[first + i] += src[first + i] for i in [0, count): `accumulateKernel` over one range of both tensors. */
export function accumulateRangeKernel(first: number, count: number): Kernel {
  const vector = first % 4 === 0 && isVectorisable(count);
  const word = vector ? "vec4<f32>" : "f32";
  const offset = vector ? first / 4 : first;
  return (vector ? elementwiseVec4 : elementwise)(
    `accumulate_range${vector ? "4" : ""}/${first}/${count}`,
    count,
    `@group(0) @binding(0) var<storage, read_write> dst: array<${word}>;
@group(0) @binding(1) var<storage, read> src: array<${word}>;`,
    `dst[${offset}u + i] = dst[${offset}u + i] + src[${offset}u + i];`,
  );
}

export type UnaryOp = "exp" | "gelu" | "quick_gelu" | "relu" | "neg" | "sigmoid" | "tanh" | "square" | "sqrt" | "log";

// erf with |error| < 1.2e-7 (Numerical Recipes' erfc Chebyshev fit); WGSL has no erf.
const ERF_WGSL = `
fn erf_approx(x: f32) -> f32 {
  let z = abs(x);
  let t = 1.0 / (1.0 + 0.5 * z);
  let r = t * exp(-z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 +
    t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))));
  return select(r - 1.0, 1.0 - r, x >= 0.0);
}
fn sigmoid_f(x: f32) -> f32 { return 1.0 / (1.0 + exp(-x)); }`;

/** WGSL helper functions every unary op may use. */
export const UNARY_HELPERS_WGSL = ERF_WGSL;

/** f(x) for each unary op, as a WGSL expression in `x`. */
export function unaryExpression(op: UnaryOp, x: string): string {
  switch (op) {
    case "exp":
      return `exp(${x})`;
    case "gelu":
      return `0.5 * ${x} * (1.0 + erf_approx(${x} * 0.70710678118654752))`;
    case "quick_gelu":
      return `${x} * sigmoid_f(1.702 * ${x})`;
    case "relu":
      return `max(${x}, 0.0)`;
    case "neg":
      return `-${x}`;
    case "sigmoid":
      return `sigmoid_f(${x})`;
    case "tanh":
      return `tanh(${x})`;
    case "square":
      return `${x} * ${x}`;
    case "sqrt":
      return `sqrt(${x})`;
    case "log":
      return `log(${x})`;
  }
}

/** f'(x) as a WGSL expression in `x` (input) and `y` (output). */
export function unaryDerivative(op: UnaryOp, x: string, y: string): string {
  switch (op) {
    case "exp":
      return y;
    case "gelu":
      return `(0.5 * (1.0 + erf_approx(${x} * 0.70710678118654752)) + ${x} * 0.3989422804014327 * exp(-0.5 * ${x} * ${x}))`;
    case "quick_gelu":
      return `(sigmoid_f(1.702 * ${x}) * (1.0 + 1.702 * ${x} * (1.0 - sigmoid_f(1.702 * ${x}))))`;
    case "relu":
      return `select(0.0, 1.0, ${x} > 0.0)`;
    case "neg":
      return `-1.0`;
    case "sigmoid":
      return `(${y} * (1.0 - ${y}))`;
    case "tanh":
      return `(1.0 - ${y} * ${y})`;
    case "square":
      return `(2.0 * ${x})`;
    case "sqrt":
      return `(0.5 / ${y})`;
    case "log":
      return `(1.0 / ${x})`;
  }
}

/** WGSL functions `unary_f(x)` and `unary_df(x, y)` (f and its derivative) of one op, for the kernels below. */
function unaryFunctions(op: UnaryOp): string {
  return `${UNARY_HELPERS_WGSL}
fn unary_f(x: f32) -> f32 { return ${unaryExpression(op, "x")}; }
fn unary_df(x: f32, y: f32) -> f32 { return ${unaryDerivative(op, "x", "y")}; }`;
}

/** `fn(v.x, ...), fn(v.y, ...), ...` as a vec4, applying a scalar function to each component of vec4 arguments. */
function perComponent(fn: string, args: string[]): string {
  return `vec4<f32>(${
    ["x", "y", "z", "w"].map((c) => `${fn}(${args.map((a) => `${a}.${c}`).join(", ")})`).join(", ")
  })`;
}

export function unaryKernel(op: UnaryOp, n: number): Kernel {
  const vector = isVectorisable(n);
  const word = vector ? "vec4<f32>" : "f32";
  return (vector ? elementwiseVec4 : elementwise)(
    `unary${vector ? "4" : ""}/${op}/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read> a: array<${word}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word}>;`,
    `let x = a[i]; out[i] = ${vector ? perComponent("unary_f", ["x"]) : "unary_f(x)"};`,
    unaryFunctions(op),
  );
}

/**
 * grad_in = grad_out * f'(x), given the forward input x and output y. Bindings are always (x, y, grad_out, grad_in),
 * but only the values the derivative uses are loaded: loads dominate this kernel on the CPU fallback. The unused
 * ones stay bound through `arrayLength`, which reads no element.
 */
export function unaryBackwardKernel(op: UnaryOp, n: number): Kernel {
  const vector = isVectorisable(n);
  const word = vector ? "vec4<f32>" : "f32";
  const derivative = unaryDerivative(op, "x_value", "y_value");
  const zero = vector ? "vec4<f32>(0.0)" : "0.0";
  const x = derivative.includes("x_value") ? "a[i]" : zero;
  const y = derivative.includes("y_value") ? "y_out[i]" : zero;
  return (vector ? elementwiseVec4 : elementwise)(
    `unary_bwd${vector ? "4" : ""}/${op}/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read> a: array<${word}>;
@group(0) @binding(1) var<storage, read> y_out: array<${word}>;
@group(0) @binding(2) var<storage, read> g: array<${word}>;
@group(0) @binding(3) var<storage, read_write> out: array<${word}>;`,
    `_ = arrayLength(&a) + arrayLength(&y_out);
  let x = ${x}; let y = ${y};
  out[i] = g[i] * ${vector ? perComponent("unary_df", ["x", "y"]) : "unary_df(x, y)"};`,
    unaryFunctions(op),
  );
}

export type BinaryOp = "add" | "sub" | "mul" | "div";
const BINARY_EXPR: Record<BinaryOp, string> = { add: "x + y", sub: "x - y", mul: "x * y", div: "x / y" };

/** WGSL statements that compute `${name}` (flat index into an operand) from the output element index `index`. */
function stridedIndex(name: string, outShape: readonly number[], strides: readonly number[], index = "i"): string {
  if (strides.every((s, d) => s === contiguousStrides(outShape)[d])) return `let ${name} = ${index};`;
  const lines = [`var ${name} = 0u;`, `var rem_${name} = ${index};`];
  for (let d = outShape.length - 1; d >= 0; d--) {
    const dim = outShape[d];
    if (strides[d] !== 0) lines.push(`${name} += (rem_${name} % ${dim}u) * ${strides[d]}u;`);
    lines.push(`rem_${name} = rem_${name} / ${dim}u;`);
  }
  return lines.join(" ");
}

export function contiguousStrides(shape: readonly number[]): number[] {
  const strides = new Array<number>(shape.length);
  let s = 1;
  for (let d = shape.length - 1; d >= 0; d--) {
    strides[d] = s;
    s *= shape[d];
  }
  return strides;
}

/** Strides of `shape` right-aligned against `outShape`, 0 where the operand is broadcast. */
export function broadcastStrides(shape: readonly number[], outShape: readonly number[]): number[] {
  const own = contiguousStrides(shape);
  const offset = outShape.length - shape.length;
  return outShape.map((_, d) => (d < offset || shape[d - offset] === 1) ? 0 : own[d - offset]);
}

export function binaryKernel(
  op: BinaryOp,
  outShape: readonly number[],
  aStrides: readonly number[],
  bStrides: readonly number[],
): Kernel {
  const n = outShape.reduce((x, y) => x * y, 1);
  const last = outShape.length - 1;
  // Four outputs that are neighbours along the last axis read either four neighbours of an operand (its last stride
  // is 1) or one value of it four times (stride 0, broadcast along the last axis).
  if (last >= 0 && outShape[last] % 4 === 0 && [aStrides, bStrides].every((s) => s[last] <= 1)) {
    return binaryKernelVec4(op, outShape, aStrides, bStrides);
  }
  return elementwise(
    `binary/${op}/${outShape}/${aStrides}/${bStrides}`,
    n,
    `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;`,
    `${stridedIndex("ia", outShape, aStrides)}
  ${stridedIndex("ib", outShape, bStrides)}
  let x = a[ia]; let y = b[ib]; out[i] = ${BINARY_EXPR[op]};`,
  );
}

function binaryKernelVec4(
  op: BinaryOp,
  outShape: readonly number[],
  aStrides: readonly number[],
  bStrides: readonly number[],
): Kernel {
  const n = outShape.reduce((x, y) => x * y, 1);
  const last = outShape.length - 1;
  const operand = (name: string, binding: number, strides: readonly number[]) => {
    const words = strides[last] === 1;
    return {
      decl: `@group(0) @binding(${binding}) var<storage, read> ${name}: array<${words ? "vec4<f32>" : "f32"}>;`,
      index: stridedIndex(`i${name}`, outShape, strides, "e"),
      value: words ? `${name}[i${name} / 4u]` : `vec4<f32>(${name}[i${name}])`,
    };
  };
  const a = operand("a", 0, aStrides);
  const b = operand("b", 1, bStrides);
  return elementwiseVec4(
    `binary4/${op}/${outShape}/${aStrides}/${bStrides}`,
    n,
    `${a.decl}
${b.decl}
@group(0) @binding(2) var<storage, read_write> out: array<vec4<f32>>;`,
    `let e = i * 4u;
  ${a.index}
  ${b.index}
  let x = ${a.value}; let y = ${b.value}; out[i] = ${BINARY_EXPR[op]};`,
  );
}

/**
 * One pass of a sum over the middle axis of [outer, rows, cols]: the rows are cut into chunks of `rowsPerChunk` and
 * out[o, chunk, c] = scale * (sum of the chunk's rows). Any reduction over axes is a few of these passes (see
 * `sumAxesForward`); several chunks keep every core busy where one loop over all rows per output would not.
 */
export interface ChunkSum {
  outer: number;
  rows: number;
  cols: number;
  rowsPerChunk: number;
  scale: number;
}

export function chunkCount(p: ChunkSum): number {
  return Math.ceil(p.rows / p.rowsPerChunk);
}

/**
 * How a pass walks memory: `columns4` gives each invocation a vec4 of neighbouring columns (neighbouring invocations
 * read neighbouring words), `rows4` (one column, rows of whole words) a run of 4 rows per load, `scalar` one float.
 */
function chunkSumMode(p: ChunkSum): "columns4" | "rows4" | "scalar" {
  if (p.cols % 4 === 0) return "columns4";
  if (p.cols === 1 && p.rows % 4 === 0 && p.rowsPerChunk % 4 === 0) return "rows4";
  return "scalar";
}

/** Workgroups of a `chunkSumKernel` dispatch (one invocation per output word). */
export function chunkSumWorkgroups(p: ChunkSum): number {
  return elementGroups(p.outer * chunkCount(p) * p.cols);
}

export function chunkSumKernel(p: ChunkSum): Kernel {
  const mode = chunkSumMode(p);
  const chunks = chunkCount(p);
  const { outer, rows, cols, rowsPerChunk } = p;
  const key = `sum_chunks/${outer}/${rows}/${cols}/${rowsPerChunk}/${p.scale}`;
  const outputs = outer * chunks * cols;
  const scale = f32lit(p.scale);
  if (mode === "rows4") {
    return elementwise(
      key,
      outputs,
      `@group(0) @binding(0) var<storage, read> a: array<vec4<f32>>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;`,
      `let chunk = i % ${chunks}u;
  let base = (i / ${chunks}u) * ${rows / 4}u;
  let first = chunk * ${rowsPerChunk / 4}u;
  let last = min(first + ${rowsPerChunk / 4}u, ${rows / 4}u);
  var acc = vec4<f32>(0.0);
  for (var r = first; r < last; r++) { acc += a[base + r]; }
  out[i] = ((acc.x + acc.y) + (acc.z + acc.w)) * ${scale};`,
    );
  }
  const words = mode === "columns4" ? cols / 4 : cols;
  const word = mode === "columns4" ? "vec4<f32>" : "f32";
  return (mode === "columns4" ? elementwiseVec4 : elementwise)(
    key,
    outputs,
    `@group(0) @binding(0) var<storage, read> a: array<${word}>;
@group(0) @binding(1) var<storage, read_write> out: array<${word}>;`,
    `let col = i % ${words}u;
  let chunk = (i / ${words}u) % ${chunks}u;
  let base = (i / ${words * chunks}u) * ${rows * words}u + col;
  let first = chunk * ${rowsPerChunk}u;
  let last = min(first + ${rowsPerChunk}u, ${rows}u);
  var acc = ${word}(0.0);
  for (var r = first; r < last; r++) { acc += a[base + r * ${words}u]; }
  out[i] = acc * ${scale};`,
  );
}
