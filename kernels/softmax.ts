// Softmax over the last axis, optionally scaled and causally masked. Row count, width, scale and the mask are baked in.
import type { Kernel } from "../lib/gpu/runtime.ts";
import { f32Literal } from "./grid.ts";
import type { RowShape } from "./norm.ts";
import {
  F32_LOWEST,
  groupElement,
  keepsRowInRegisters,
  loadsRowGroups,
  perWord,
  registerRowKernelWgsl,
  rowGroup,
  rowKernelWgsl,
  type RowLayout,
  rowLayoutKey,
  rowWords,
  tree,
  wordColumnBelow,
  wordMax,
  wordSum,
  wordTree,
} from "./rows.ts";

export interface SoftmaxSpec extends RowShape {
  /** Multiplies the logits before the softmax (attention's 1/sqrt(d)). */
  scale: number;
  /** Row i of every cols x cols block keeps columns 0..i only (row index taken modulo cols). */
  causal: boolean;
}

function specKey(s: SoftmaxSpec): string {
  return `${s.rows}/${s.cols}/${s.scale}/${s.causal ? "causal" : "full"}`;
}

/** WGSL for `limit`: the number of leading columns of this row that take part (the rest are masked to 0). */
function rowLimit(s: SoftmaxSpec): string {
  return s.causal ? `let limit = row % ${s.cols}u + 1u;` : `let limit = ${s.cols}u;`;
}

/**
 * The register kernels for row groups (see RowGroup): `perRow(q)` emits the statements for row q of the group, which
 * define `o${q}_${j}` for every column j from the elements `x${q}_${j}` (and `y`, `g` likewise where loaded). The
 * loads and stores move whole words.
 */
function groupedSoftmaxWgsl(
  spec: SoftmaxSpec,
  layout: RowLayout,
  inputs: string[],
  perRow: (q: number) => string,
): string {
  const { rows, cols } = spec;
  const group = rowGroup(cols);
  const words = Array.from({ length: group.words }, (_, k) => k);
  const elements = Array.from({ length: group.count * cols }, (_, e) => e);
  const bindings = [...inputs, "out"].map((name, b) =>
    `@group(0) @binding(${b}) var<storage, ${name === "out" ? "read_write" : "read"}> ${name}: array<vec4<f32>>;`
  ).join("\n");
  const body = [
    `let base = row * ${group.words}u;`,
    ...inputs.flatMap((name) => words.map((k) => `let ${name}w${k} = ${name}[base + ${k}u];`)),
    ...inputs.flatMap((name) =>
      elements.map((e) => `let ${name}${Math.floor(e / cols)}_${e % cols} = ${groupElement(`${name}w`, e)};`)
    ),
    ...Array.from({ length: group.count }, (_, q) => perRow(q)),
    ...words.map((k) => {
      const parts = [0, 1, 2, 3].map((c) => `o${Math.floor((4 * k + c) / cols)}_${(4 * k + c) % cols}`);
      return `out[base + ${k}u] = vec4<f32>(${parts.join(", ")});`;
    }),
  ].join("\n  ");
  return registerRowKernelWgsl(rows / group.count, layout, bindings, body);
}

/** y = exp(s*x - max) / sum(exp(s*x - max)) over the unmasked columns; masked columns get 0. */
export function softmaxForwardKernel(spec: SoftmaxSpec, layout: RowLayout): Kernel {
  const { rows, cols } = spec;
  const scale = f32Literal(spec.scale);
  if (loadsRowGroups(layout, rows, cols)) {
    const columns = Array.from({ length: cols }, (_, j) => j);
    const count = rowGroup(cols).count;
    return {
      key: `softmax_fwd/${specKey(spec)}/${rowLayoutKey(layout)}/groups`,
      wgsl: () =>
        groupedSoftmaxWgsl(spec, layout, ["x"], (q) => {
          const limit = spec.causal ? `(row * ${count}u + ${q}u) % ${cols}u + 1u` : null;
          const inside = (j: number, v: string, outside: string) =>
            limit ? `select(${outside}, ${v}, ${j}u < limit${q})` : v;
          return [
            limit ? `let limit${q} = ${limit};` : "",
            ...columns.map((j) => `let s${q}_${j} = x${q}_${j} * ${scale};`),
            `let max${q} = ${tree(cols, (a, b) => `max(${a}, ${b})`, (j) => inside(j, `s${q}_${j}`, F32_LOWEST))};`,
            ...columns.map((j) => `let e${q}_${j} = ${inside(j, `exp(s${q}_${j} - max${q})`, "0.0")};`),
            `let inv${q} = 1.0 / ${tree(cols, (a, b) => `(${a} + ${b})`, (j) => `e${q}_${j}`)};`,
            ...columns.map((j) => `let o${q}_${j} = e${q}_${j} * inv${q};`),
          ].join("\n  ");
        }),
    };
  }
  if (keepsRowInRegisters(layout, cols)) {
    const words = rowWords(cols);
    const t = words.type;
    // Masked columns take no part in the maximum and come out 0 (only causal rows have any).
    const masked = (k: number, inside: string, outside: string) =>
      spec.causal ? `select(${t}(${outside}), ${inside}, ${wordColumnBelow(words, k, "limit")})` : inside;
    return {
      key: `softmax_fwd/${specKey(spec)}/${rowLayoutKey(layout)}/registers`,
      wgsl: () =>
        registerRowKernelWgsl(
          rows,
          layout,
          `@group(0) @binding(0) var<storage, read> x: array<${t}>;
@group(0) @binding(1) var<storage, read_write> y: array<${t}>;`,
          `let base = row * ${words.count}u;
  ${rowLimit(spec)}
  ${perWord(words, (k) => `let s${k} = x[base + ${k}u] * ${scale};`)}
  ${perWord(words, (k) => `let m${k} = ${masked(k, `s${k}`, F32_LOWEST)};`)}
  let row_max_value = ${wordMax(words, wordTree(words, (a, b) => `max(${a}, ${b})`, (k) => `m${k}`))};
  ${perWord(words, (k) => `let e${k} = ${masked(k, `exp(s${k} - row_max_value)`, "0.0")};`)}
  let inv_sum = 1.0 / ${wordSum(words, wordTree(words, (a, b) => `(${a} + ${b})`, (k) => `e${k}`))};
  ${perWord(words, (k) => `y[base + ${k}u] = e${k} * inv_sum;`)}`,
        ),
    };
  }
  return {
    key: `softmax_fwd/${specKey(spec)}/${rowLayoutKey(layout)}`,
    wgsl: () =>
      rowKernelWgsl(
        rows,
        layout,
        `@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read_write> y: array<f32>;`,
        `let base = row * ${cols}u;
  ${rowLimit(spec)}
  var m = ${F32_LOWEST};
  for (var j = lane; j < limit; j += LANES) { m = max(m, x[base + j] * ${scale}); }
  let row_max_value = row_max(m);
  var s = 0.0;
  for (var j = lane; j < limit; j += LANES) { s += exp(x[base + j] * ${scale} - row_max_value); }
  let inv_sum = 1.0 / row_sum(s);
  if (valid) {
    for (var j = lane; j < ${cols}u; j += LANES) {
      y[base + j] = select(0.0, exp(x[base + j] * ${scale} - row_max_value) * inv_sum, j < limit);
    }
  }`,
      ),
  };
}

/** dx = scale * y * (g - sum(g * y)); masked columns have y = 0 and so get 0. */
export function softmaxBackwardKernel(spec: SoftmaxSpec, layout: RowLayout): Kernel {
  const { rows, cols } = spec;
  if (loadsRowGroups(layout, rows, cols)) {
    const columns = Array.from({ length: cols }, (_, j) => j);
    return {
      key: `softmax_bwd/${specKey(spec)}/${rowLayoutKey(layout)}/groups`,
      wgsl: () =>
        groupedSoftmaxWgsl(spec, layout, ["y", "g"], (q) =>
          [
            `let gy${q} = ${tree(cols, (a, b) => `(${a} + ${b})`, (j) => `g${q}_${j} * y${q}_${j}`)};`,
            ...columns.map((j) => `let o${q}_${j} = ${f32Literal(spec.scale)} * y${q}_${j} * (g${q}_${j} - gy${q});`),
          ].join("\n  ")),
    };
  }
  if (keepsRowInRegisters(layout, cols)) {
    const words = rowWords(cols);
    const t = words.type;
    return {
      key: `softmax_bwd/${specKey(spec)}/${rowLayoutKey(layout)}/registers`,
      wgsl: () =>
        registerRowKernelWgsl(
          rows,
          layout,
          `@group(0) @binding(0) var<storage, read> y: array<${t}>;
@group(0) @binding(1) var<storage, read> g: array<${t}>;
@group(0) @binding(2) var<storage, read_write> dx: array<${t}>;`,
          // Masked columns have y = 0: they add nothing to sum(g * y) and get 0.
          `let base = row * ${words.count}u;
  ${perWord(words, (k) => `let y${k} = y[base + ${k}u];`)}
  ${perWord(words, (k) => `let g${k} = g[base + ${k}u];`)}
  let gy = ${wordSum(words, wordTree(words, (a, b) => `(${a} + ${b})`, (k) => `g${k} * y${k}`))};
  ${perWord(words, (k) => `dx[base + ${k}u] = ${f32Literal(spec.scale)} * y${k} * (g${k} - gy);`)}`,
        ),
    };
  }
  return {
    key: `softmax_bwd/${specKey(spec)}/${rowLayoutKey(layout)}`,
    wgsl: () =>
      rowKernelWgsl(
        rows,
        layout,
        `@group(0) @binding(0) var<storage, read> y: array<f32>;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;`,
        `let base = row * ${cols}u;
  ${rowLimit(spec)}
  var s = 0.0;
  for (var j = lane; j < limit; j += LANES) { s += g[base + j] * y[base + j]; }
  let gy = row_sum(s);
  if (valid) {
    for (var j = lane; j < ${cols}u; j += LANES) {
      dx[base + j] = ${f32Literal(spec.scale)} * y[base + j] * (g[base + j] - gy);
    }
  }`,
      ),
  };
}
