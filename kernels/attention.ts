// Fused multi-head attention over a packed q/k/v projection: one kernel for the forward pass (scores, mask, online
// softmax, weighted sum) and two for the backward pass, which recompute the probabilities from the saved row
// log-sum-exps instead of storing the T x T matrix (as FlashAttention does).
//
// Layouts: qkv is [B, T, 3, H, Dh] (what the in-projection writes, so no head split is needed), the output and its
// gradient are [B, T, H, Dh] (what the out-projection reads, so no head merge is needed), lse and the row dots D are
// [B, H, T]. The backward kernels write disjoint parts of dqkv (q, and k with v), so it needs no zero fill.
//
// Each workgroup serves one (batch, head) pair and a chunk of WG rows (queries, or keys for the k/v gradient), one
// row per invocation, and loops over the other side's rows. The loop's loads then have the same address in every
// invocation of a workgroup: GPUs serve them from one cache line, and on CPU back ends with subgroups the lanes fetch
// each loop row once between them and broadcast its words (`shareRows`), since a texel fetch there costs as much for
// one address as for sixteen. Rows past T redo row T-1 and store nothing, so every invocation runs the
// whole loop (a masked lane would make the shared loads per-lane again), and masking is done with select.
import { type Kernel, LINEAR_WORKGROUP_WGSL } from "../lib/gpu/runtime.ts";
import { TEXTURE_SEGMENT_ROWS } from "./matmul_texture.ts";

const SEGMENT_SHIFT = Math.log2(TEXTURE_SEGMENT_ROWS);

export interface AttentionSpec {
  /** Head width (a multiple of 4): q, k, v rows live in Dh/4 vec4 registers. */
  headDim: number;
  causal: boolean;
  /** Invocations per workgroup: the SIMD width on CPU back ends. */
  rowsPerGroup: number;
  /**
   * Rows each invocation serves (strided by rowsPerGroup): every row loaded in the loop then feeds this many rows'
   * arithmetic, which is what keeps the loop from being bound by its loads.
   */
  rowsPerInvocation: number;
  /**
   * Read qkv and the output gradient through rgba32float textures (rows wrapped into segments of
   * TEXTURE_SEGMENT_ROWS, as the matmul operands are) instead of storage buffers: on CPU back ends texel fetches are
   * vectorised and buffer loads are not.
   */
  texture: boolean;
  /**
   * With texture reads, the lanes (one subgroup) fetch the loop's rows once between them, each lane a share of the
   * row's texels, and subgroup broadcasts hand every value to every lane: on CPU back ends a texel fetch costs as
   * much for one address as for sixteen, so the loop's fetches drop by the lane count. Needs subgroups as wide as
   * the workgroup.
   */
  shareRows: boolean;
}

export interface AttentionShape {
  batch: number;
  tokens: number;
  heads: number;
}

/** Stands in for -inf in masked scores: exp of it minus any real score is 0, and it stays finite in arithmetic. */
const MASKED = "-3.0e38";

const range = (n: number) => Array.from({ length: n }, (_, i) => i);

export function attentionUniforms(shape: AttentionShape, scale: number): Uint32Array {
  const u = Uint32Array.from([shape.tokens, shape.heads, shape.batch, 0]);
  new Float32Array(u.buffer, 12, 1)[0] = scale;
  return u;
}

export function attentionWorkgroups(spec: AttentionSpec, shape: AttentionShape): number {
  return shape.batch * shape.heads * Math.ceil(shape.tokens / chunkRows(spec));
}

/** A binding: a storage array, or (for "rows", the row-matrix inputs) a texture in texture mode. */
type AttentionBinding = [string, "read" | "read_write" | "rows", string];

function header(spec: AttentionSpec, bindings: AttentionBinding[]): string {
  const words = spec.headDim / 4;
  const declare = ([name, access, type]: AttentionBinding, i: number) =>
    access === "rows" && spec.texture
      ? `@group(0) @binding(${i}) var ${name}: texture_storage_2d<rgba32float, read>;`
      : `@group(0) @binding(${i}) var<storage, ${access === "rows" ? "read" : access}> ${name}: array<${type}>;`;
  // Word w of a row of q, k or v (part 0, 1, 2) of a token, and of the output gradient.
  const rowLoad = (name: string, texelsPerRow: string, row: string, texel: string) =>
    spec.texture
      ? `let r = ${row}; return textureLoad(${name}, vec2<u32>((r >> ${SEGMENT_SHIFT}u) * ${texelsPerRow} + ${texel}, r & ${
        TEXTURE_SEGMENT_ROWS - 1
      }u));`
      : `return ${name}[(${row}) * ${texelsPerRow} + ${texel}];`;
  const hasDout = bindings.some(([name]) => name === "dout");
  return `${LINEAR_WORKGROUP_WGSL}
struct Dims { tokens: u32, heads: u32, batch: u32, scale: f32 }
${bindings.map(declare).join("\n")}
@group(0) @binding(${bindings.length}) var<uniform> d: Dims;

fn load_qkv(p: Place, token: u32, part: u32, w: u32) -> vec4<f32> {
  ${
    rowLoad(
      "qkv",
      `3u * d.heads * ${words}u`,
      "p.batch * d.tokens + token",
      `(part * d.heads + p.head) * ${words}u + w`,
    )
  }
}
${
    hasDout
      ? `fn load_dout(p: Place, token: u32, w: u32) -> vec4<f32> {
  ${rowLoad("dout", `d.heads * ${words}u`, "p.batch * d.tokens + token", `p.head * ${words}u + w`)}
}`
      : ""
  }

// The workgroup's (batch, head) pair, the first row of its chunk and this invocation's lane; vec4 indices of a row of
// q, k or v (part 0, 1, 2), of the [B, T, H, Dh] output, and of the per-row statistics.
struct Place { batch: u32, head: u32, first: u32, lane: u32 }
fn place(wid: vec3<u32>, nwg: vec3<u32>, lane: u32) -> Place {
  let chunks = (d.tokens + ${chunkRows(spec) - 1}u) / ${chunkRows(spec)}u;
  let g = linear_workgroup(wid, nwg);
  let bh = g / chunks;
  return Place(bh / d.heads, bh % d.heads, (g - bh * chunks) * ${chunkRows(spec)}u, lane);
}
fn qkv_at(p: Place, token: u32, part: u32) -> u32 {
  return (((p.batch * d.tokens + token) * 3u + part) * d.heads + p.head) * ${spec.headDim / 4}u;
}
fn out_at(p: Place, token: u32) -> u32 {
  return ((p.batch * d.tokens + token) * d.heads + p.head) * ${spec.headDim / 4}u;
}
fn stat_at(p: Place, token: u32) -> u32 {
  return (p.batch * d.heads + p.head) * d.tokens + token;
}`;
}

/** Rows one workgroup covers: rowsPerInvocation rows per lane, strided by the workgroup size. */
function chunkRows(spec: AttentionSpec): number {
  return spec.rowsPerGroup * spec.rowsPerInvocation;
}

const ENTRY = `@compute @workgroup_size`;
const PARAMS = `(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid: vec3<u32>)`;

/**
 * The invocation's rows: `row${r}` (may pass the end: then only its stores are skipped) and `rc${r}`, the row clamped
 * into range for loads.
 */
function rowsOfInvocation(spec: AttentionSpec): string {
  return range(spec.rowsPerInvocation).map((r) =>
    `let row${r} = p.first + p.lane + ${r * spec.rowsPerGroup}u; let rc${r} = min(row${r}, d.tokens - 1u);`
  ).join("\n  ");
}

/** WGSL statements declaring `name0..` as the Dh/4 vec4 words of a row: `load(w)` is the expression of word w. */
function loadRow(name: string, load: (w: number) => string, words: number): string {
  return range(words).map((w) => `let ${name}${w} = ${load(w)};`).join(" ");
}
const qkvRow = (token: string, part: number) => (w: number) => `load_qkv(p, ${token}, ${part}u, ${w}u)`;
const doutRow = (token: string) => (w: number) => `load_dout(p, ${token}, ${w}u)`;

/** A WGSL expression: the dot product of two rows held in registers. */
function dot(a: string, b: string, words: number): string {
  const terms = range(words).map((w) => `${a}${w} * ${b}${w}`);
  // Pairwise sums keep the dependency chain short.
  let level = terms;
  while (level.length > 1) {
    const next: string[] = [];
    for (let i = 0; i < level.length; i += 2) {
      next.push(i + 1 < level.length ? `(${level[i]} + ${level[i + 1]})` : level[i]);
    }
    level = next;
  }
  return `dot(${level[0]}, vec4<f32>(1.0))`;
}

/**
 * The loop's rows: WGSL declaring `${name}0..` (Dh/4 vec4 words) for each name, where `load(n, word)` is the
 * expression of word `word` of row number n (an index into `names`), and the per-lane setup that goes before the
 * loop. Without sharing, every lane loads every word. With sharing, the rows' words are numbered one after another
 * and lane l fetches words l, l + lanes, ...; `tag` keeps the names of several such groups apart.
 */
function loopRows(
  spec: AttentionSpec,
  tag: string,
  names: string[],
  load: (n: string, word: string) => string,
): { setup: string; loads: string } {
  const words = spec.headDim / 4;
  if (!spec.shareRows) {
    return {
      setup: "",
      loads: names.map((name, n) => loadRow(name, (w) => load(`${n}u`, `${w}u`), words)).join("\n    "),
    };
  }
  const lanes = spec.rowsPerGroup;
  const total = names.length * words;
  const shares = Math.ceil(total / lanes);
  // Lanes past the last word fetch it again: every lane must take part in the broadcasts' subgroup.
  const setup = range(shares).map((q) =>
    `let ${tag}_t${q} = min(lid.x + ${q * lanes}u, ${total - 1}u); ` +
    `let ${tag}_row${q} = ${tag}_t${q} / ${words}u; let ${tag}_word${q} = ${tag}_t${q} % ${words}u;`
  ).join("\n  ");
  const fetches = range(shares).map((q) => `let ${tag}_share${q} = ${load(`${tag}_row${q}`, `${tag}_word${q}`)};`);
  const broadcasts = names.flatMap((name, n) =>
    range(words).map((w) => {
      const t = n * words + w;
      return `let ${name}${w} = subgroupBroadcast(${tag}_share${Math.floor(t / lanes)}, ${t % lanes}u);`;
    })
  );
  return { setup, loads: [...fetches, ...broadcasts].join(" ") };
}

function keyOf(family: string, spec: AttentionSpec): string {
  return `${family}/${spec.headDim}/${spec.causal ? "causal" : "full"}/${spec.rowsPerGroup}x${spec.rowsPerInvocation}/${
    spec.shareRows ? "shared" : spec.texture ? "texture" : "buffer"
  }`;
}

/** The forward and query-gradient loops read key and value rows j: parts 1 and 2 of qkv. */
function keyValueRows(spec: AttentionSpec): { setup: string; loads: string } {
  return loopRows(spec, "kv", ["k", "v"], (n, word) => `load_qkv(p, j, 1u + ${n}, ${word})`);
}

/** One past the last row of the workgroup's chunk: with a causal mask, no row of it sees a key past that. */
function chunkEnd(spec: AttentionSpec): string {
  return `min(d.tokens, p.first + ${chunkRows(spec)}u)`;
}

/**
 * Forward: out = softmax(scale q k^T + mask) v per (batch, head), and lse = the log-sum-exp of each scaled, masked
 * score row. Bindings: qkv, out, lse, uniforms.
 */
export function attentionForwardKernel(spec: AttentionSpec): Kernel {
  const words = spec.headDim / 4;
  const rows = range(spec.rowsPerInvocation);
  const perRow = (f: (r: number) => string, sep = "\n    ") => rows.map(f).join(sep);
  const kv = keyValueRows(spec);
  return {
    key: keyOf("attention_fwd", spec),
    wgsl: () =>
      `${header(spec, [["qkv", "rows", "vec4<f32>"], ["out", "read_write", "vec4<f32>"], ["lse", "read_write", "f32"]])}
${ENTRY}(${spec.rowsPerGroup})
fn main${PARAMS} {
  let p = place(wid, nwg, lid.x);
  // Workgroups past the last (batch, head) pair exist when a large count is folded into y: they store nothing.
  if (p.batch >= d.batch) { return; }
  ${rowsOfInvocation(spec)}
  ${perRow((r) => loadRow(`q${r}_`, qkvRow(`rc${r}`, 0), words), "\n  ")}
  ${perRow((r) => range(words).map((w) => `var acc${r}_${w} = vec4<f32>(0.0);`).join(" "), "\n  ")}
  ${perRow((r) => `var m${r} = ${MASKED}; var l${r} = 0.0;`, " ")}
  ${kv.setup}
  let end = ${spec.causal ? chunkEnd(spec) : "d.tokens"};
  for (var j = 0u; j < end; j++) {
    ${kv.loads}
    ${
        perRow((r) =>
          `{
      let raw = ${dot(`q${r}_`, "k", words)} * d.scale;
      let s = ${spec.causal ? `select(${MASKED}, raw, j <= rc${r})` : "raw"};
      let m_new = max(m${r}, s);
      let correction = exp(m${r} - m_new);
      let e = exp(s - m_new);
      l${r} = l${r} * correction + e;
      m${r} = m_new;
      ${range(words).map((w) => `acc${r}_${w} = fma(vec4<f32>(e), v${w}, acc${r}_${w} * correction);`).join(" ")}
    }`
        )
      }
  }
  ${
        perRow((r) =>
          `if (row${r} < d.tokens) {
    let inv = 1.0 / l${r};
    let oi = out_at(p, row${r});
    ${range(words).map((w) => `out[oi + ${w}u] = acc${r}_${w} * inv;`).join(" ")}
    lse[stat_at(p, row${r})] = m${r} + log(l${r});
  }`, "\n  ")
      }
}`,
  };
}

/**
 * Backward for the queries: with P recomputed from lse, D_i = dO_i . O_i and dS_ij = P_ij (dO_i . v_j - D_i),
 * dq_i = scale sum_j dS_ij k_j. Also stores D for the key/value kernel. Bindings: qkv, out, dout, lse, dqkv, dots,
 * uniforms.
 */
export function attentionBackwardQueryKernel(spec: AttentionSpec): Kernel {
  const words = spec.headDim / 4;
  const rows = range(spec.rowsPerInvocation);
  const perRow = (f: (r: number) => string, sep = "\n  ") => rows.map(f).join(sep);
  const kv = keyValueRows(spec);
  return {
    key: keyOf("attention_bwd_q", spec),
    wgsl: () =>
      `${
        header(spec, [
          ["qkv", "rows", "vec4<f32>"],
          ["out", "read", "vec4<f32>"],
          ["dout", "rows", "vec4<f32>"],
          ["lse", "read", "f32"],
          ["dqkv", "read_write", "vec4<f32>"],
          ["dots", "read_write", "f32"],
        ])
      }
${ENTRY}(${spec.rowsPerGroup})
fn main${PARAMS} {
  let p = place(wid, nwg, lid.x);
  // Workgroups past the last (batch, head) pair exist when a large count is folded into y: they store nothing.
  if (p.batch >= d.batch) { return; }
  ${rowsOfInvocation(spec)}
  ${
        perRow((r) =>
          `${loadRow(`q${r}_`, qkvRow(`rc${r}`, 0), words)}
  ${loadRow(`g${r}_`, doutRow(`rc${r}`), words)}
  let oi${r} = out_at(p, rc${r});
  ${loadRow(`o${r}_`, (w) => `out[oi${r} + ${w}u]`, words)}
  let row_dot${r} = ${dot(`g${r}_`, `o${r}_`, words)};
  let row_lse${r} = lse[stat_at(p, rc${r})];
  ${range(words).map((w) => `var dq${r}_${w} = vec4<f32>(0.0);`).join(" ")}`
        )
      }
  ${kv.setup}
  let end = ${spec.causal ? chunkEnd(spec) : "d.tokens"};
  for (var j = 0u; j < end; j++) {
    ${kv.loads}
    ${
        perRow((r) =>
          `{
      let prob = exp(${dot(`q${r}_`, "k", words)} * d.scale - row_lse${r});
      let ds = ${spec.causal ? `select(0.0, prob, j <= rc${r})` : "prob"} * (${
            dot(`g${r}_`, "v", words)
          } - row_dot${r});
      ${range(words).map((w) => `dq${r}_${w} = fma(vec4<f32>(ds), k${w}, dq${r}_${w});`).join(" ")}
    }`, "\n    ")
      }
  }
  ${
        perRow((r) =>
          `if (row${r} < d.tokens) {
    let qi = qkv_at(p, row${r}, 0u);
    ${
            range(words).map((w) => `dqkv[qi + ${w}u] = dq${r}_${w} * d.scale;`).join(" ")
          }
    dots[stat_at(p, row${r})] = row_dot${r};
  }`
        )
      }
}`,
  };
}

/**
 * Backward for the keys and values, one key row per invocation: dv_j = sum_i P_ij dO_i and
 * dk_j = scale sum_i dS_ij q_i over the queries that see key j. Bindings: qkv, dout, lse, dots, dqkv, uniforms.
 */
export function attentionBackwardKeyValueKernel(spec: AttentionSpec): Kernel {
  const words = spec.headDim / 4;
  const rows = range(spec.rowsPerInvocation);
  const perRow = (f: (r: number) => string, sep = "\n  ") => rows.map(f).join(sep);
  // The query rows i: part 0 of qkv, and the output gradient's rows.
  const q = loopRows(spec, "q", ["q"], (_, word) => `load_qkv(p, i, 0u, ${word})`);
  const g = loopRows(spec, "g", ["g"], (_, word) => `load_dout(p, i, ${word})`);
  return {
    key: keyOf("attention_bwd_kv", spec),
    wgsl: () =>
      `${
        header(spec, [
          ["qkv", "rows", "vec4<f32>"],
          ["dout", "rows", "vec4<f32>"],
          ["lse", "read", "f32"],
          ["dots", "read", "f32"],
          ["dqkv", "read_write", "vec4<f32>"],
        ])
      }
${ENTRY}(${spec.rowsPerGroup})
fn main${PARAMS} {
  let p = place(wid, nwg, lid.x);
  // Workgroups past the last (batch, head) pair exist when a large count is folded into y: they store nothing.
  if (p.batch >= d.batch) { return; }
  ${rowsOfInvocation(spec)}
  ${
        perRow((r) =>
          `${loadRow(`k${r}_`, qkvRow(`rc${r}`, 1), words)}
  ${loadRow(`v${r}_`, qkvRow(`rc${r}`, 2), words)}
  ${range(words).map((w) => `var dk${r}_${w} = vec4<f32>(0.0); var dv${r}_${w} = vec4<f32>(0.0);`).join(" ")}`
        )
      }
  ${q.setup}
  ${g.setup}
  // Causal: queries before this chunk's first key see none of its keys.
  for (var i = ${spec.causal ? "p.first" : "0u"}; i < d.tokens; i++) {
    ${q.loads}
    ${g.loads}
    let stat = stat_at(p, i);
    let row_lse = lse[stat];
    let row_dot = dots[stat];
    ${
        perRow((r) =>
          `{
      let raw = exp(${dot("q", `k${r}_`, words)} * d.scale - row_lse);
      let prob = ${spec.causal ? `select(0.0, raw, rc${r} <= i)` : "raw"};
      let ds = prob * (${dot("g", `v${r}_`, words)} - row_dot);
      ${
            range(words).map((w) =>
              `dv${r}_${w} = fma(vec4<f32>(prob), g${w}, dv${r}_${w}); dk${r}_${w} = fma(vec4<f32>(ds), q${w}, dk${r}_${w});`
            ).join(" ")
          }
    }`, "\n    ")
      }
  }
  ${
        perRow((r) =>
          `if (row${r} < d.tokens) {
    let kj = qkv_at(p, row${r}, 1u);
    let vj = qkv_at(p, row${r}, 2u);
    ${
            range(words).map((w) =>
              `dqkv[kj + ${w}u] = dk${r}_${w} * d.scale; dqkv[vj + ${w}u] = dv${r}_${w};`
            ).join(
              " ",
            )
          }
  }`
        )
      }
}`,
  };
}
