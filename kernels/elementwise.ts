// Elementwise kernels: fill, copy, unary maps and their derivatives, broadcasting binary ops, and sum-reductions over
// any set of axes. Sizes and strides are baked into the code; one key per specialisation.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";

export const ELEMENTWISE_WG = 256;

/** Number of workgroups for one invocation per element. */
export function elementGroups(n: number): number {
  return Math.ceil(n / ELEMENTWISE_WG);
}

function elementwise(key: string, n: number, bindings: string, body: string, helpers = ""): Kernel {
  return {
    key,
    wgsl: () =>
      `${LINEAR_WORKGROUP_WGSL}
${helpers}
${bindings}
@compute @workgroup_size(${ELEMENTWISE_WG})
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>) {
  let i = linear_workgroup(wid, nwg) * ${ELEMENTWISE_WG}u + lid.x;
  if (i >= ${n}u) { return; }
  ${body}
}`,
  };
}

const f32lit = (v: number) =>
  Number.isFinite(v)
    ? `f32(${v.toExponential()})`
    : (v > 0 ? "bitcast<f32>(0x7f800000u)" : v < 0 ? "bitcast<f32>(0xff800000u)" : "bitcast<f32>(0x7fc00000u)");

export function fillKernel(n: number, value: number, type: "f32" | "i32" = "f32"): Kernel {
  const lit = type === "f32" ? f32lit(value) : `${Math.trunc(value)}i`;
  return elementwise(
    `fill/${type}/${n}/${value}`,
    n,
    `@group(0) @binding(0) var<storage, read_write> out: array<${type}>;`,
    `out[i] = ${lit};`,
  );
}

/** out = a * alpha + b * beta, elementwise over equal sizes (covers copy, accumulate, axpy). */
export function linearCombinationKernel(n: number, alpha: number, beta: number | null): Kernel {
  const rhs = beta === null ? `a[i] * ${f32lit(alpha)}` : `a[i] * ${f32lit(alpha)} + b[i] * ${f32lit(beta)}`;
  const bindings = beta === null
    ? `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;`
    : `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;`;
  return elementwise(`lincomb/${n}/${alpha}/${beta}`, n, bindings, `out[i] = ${rhs};`);
}

/** dst += src, in place. */
export function accumulateKernel(n: number): Kernel {
  return elementwise(
    `accumulate/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read_write> dst: array<f32>;
@group(0) @binding(1) var<storage, read> src: array<f32>;`,
    `dst[i] = dst[i] + src[i];`,
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

export function unaryKernel(op: UnaryOp, n: number): Kernel {
  return elementwise(
    `unary/${op}/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;`,
    `let x = a[i]; out[i] = ${unaryExpression(op, "x")};`,
    UNARY_HELPERS_WGSL,
  );
}

/** grad_in = grad_out * f'(x), given the forward input x and output y. */
export function unaryBackwardKernel(op: UnaryOp, n: number): Kernel {
  return elementwise(
    `unary_bwd/${op}/${n}`,
    n,
    `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> y_out: array<f32>;
@group(0) @binding(2) var<storage, read> g: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;`,
    `let x = a[i]; let y = y_out[i]; out[i] = g[i] * ${unaryDerivative(op, "x", "y")};`,
    UNARY_HELPERS_WGSL,
  );
}

export type BinaryOp = "add" | "sub" | "mul" | "div";
const BINARY_EXPR: Record<BinaryOp, string> = { add: "x + y", sub: "x - y", mul: "x * y", div: "x / y" };

/** WGSL statements that compute `${name}` (flat index into an operand) from the output index `i`. */
function stridedIndex(name: string, outShape: readonly number[], strides: readonly number[]): string {
  if (strides.every((s, d) => s === contiguousStrides(outShape)[d])) return `let ${name} = i;`;
  const lines = [`var ${name} = 0u;`, `var rem_${name} = i;`];
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

/**
 * out[j] = sum of `input` over the axes marked in `reduced` (out has those axes removed). One invocation per output
 * element walks the reduced elements; the reduced axes are enumerated by a flattened counter.
 */
export function sumAxesKernel(inShape: readonly number[], reduced: readonly boolean[], scale = 1): Kernel {
  const strides = contiguousStrides(inShape);
  const keptAxes = inShape.map((_, d) => d).filter((d) => !reduced[d]);
  const redAxes = inShape.map((_, d) => d).filter((d) => reduced[d]);
  const nOut = keptAxes.reduce((p, d) => p * inShape[d], 1);
  const nRed = redAxes.reduce((p, d) => p * inShape[d], 1);
  const base = ["var base = 0u;", "var rem = i;"];
  for (let k = keptAxes.length - 1; k >= 0; k--) {
    const d = keptAxes[k];
    base.push(`base += (rem % ${inShape[d]}u) * ${strides[d]}u; rem = rem / ${inShape[d]}u;`);
  }
  const inner = ["var off = 0u;", "var r = j;"];
  for (let k = redAxes.length - 1; k >= 0; k--) {
    const d = redAxes[k];
    inner.push(`off += (r % ${inShape[d]}u) * ${strides[d]}u; r = r / ${inShape[d]}u;`);
  }
  return elementwise(
    `sum_axes/${inShape}/${reduced.map(Number).join("")}/${scale}`,
    nOut,
    `@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read_write> out: array<f32>;`,
    `${base.join("\n  ")}
  var acc = 0.0;
  for (var j = 0u; j < ${nRed}u; j++) {
    ${inner.join("\n    ")}
    acc += a[base + off];
  }
  out[i] = acc * ${f32lit(scale)};`,
  );
}
