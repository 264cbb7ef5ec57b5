/**
 * A float64 CPU reference of the whole CLIP forward pass, the CLIP loss and PyTorch's AdamW, for tests. It is written
 * plainly with loops after open_clip's model code (VisionTransformer, ModifiedResNet, the text Transformer, ClipLoss)
 * and shares no code with the GPU model, so agreement between the two means something. Parameters are read by
 * open_clip state-dict name from any numeric array, so a state dict can be perturbed in float64 for finite differences.
 */
import {
  type ClipConfig,
  isResNetVision,
  type ResNetVisionConfig,
  type TextConfig,
  type ViTVisionConfig,
} from "../lib/nn/config.ts";
import { Rng } from "../lib/data/rng.ts";

/** One state-dict tensor: float32 as loaded, or float64 when a test perturbs it. */
export interface RefTensor {
  shape: readonly number[];
  data: ArrayLike<number>;
}

export type RefState = ReadonlyMap<string, RefTensor>;

/** A row-major float64 matrix: features are [batch, embed_dim]. */
export interface Matrix {
  rows: number;
  cols: number;
  data: Float64Array;
}

export interface RefImageOptions {
  /** Batch norm with batch statistics (PyTorch's training mode) instead of the running statistics. */
  batchNormTraining?: boolean;
}

/** PyTorch's default eps for LayerNorm and BatchNorm2d, which open_clip never changes. */
const NORM_EPS = 1e-5;

function tensor(state: RefState, name: string): ArrayLike<number> {
  const t = state.get(name);
  if (!t) throw new Error(`reference: state has no tensor '${name}'`);
  return t.data;
}

/** Copies a state dict into float64 arrays that a test may perturb in place. */
export function toFloat64State(state: RefState): Map<string, { shape: number[]; data: Float64Array }> {
  return new Map([...state].map(([k, t]) => [k, { shape: [...t.shape], data: Float64Array.from(t.data) }]));
}

// ---------------------------------------------------------------------------------------------------------------
// Elementwise functions

/**
 * erf to double precision: erf(x) = 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)). Every term is
 * positive, so the sum has no cancellation; beyond |x| = 6, erf is +-1 to double precision.
 */
export function erf(x: number): number {
  const ax = Math.abs(x);
  if (ax >= 6) return Math.sign(x);
  let term = ax;
  let sum = ax;
  const x2 = ax * ax;
  for (let n = 1; term > 1e-17 * sum; n++) {
    term *= (2 * x2) / (2 * n + 1);
    sum += term;
  }
  const value = (2 / Math.sqrt(Math.PI)) * Math.exp(-x2) * sum;
  return x < 0 ? -value : value;
}

export type Activation = (x: number) => number;

/** torch.nn.GELU(): x * Phi(x) with the exact normal CDF. */
export const gelu: Activation = (x) => 0.5 * x * (1 + erf(x / Math.SQRT2));

/** OpenAI's QuickGELU: x * sigmoid(1.702 x). */
export const quickGelu: Activation = (x) => x / (1 + Math.exp(-1.702 * x));

const relu: Activation = (x) => (x > 0 ? x : 0);

function activationOf(cfg: ClipConfig): Activation {
  return cfg.quick_gelu ? quickGelu : gelu;
}

// ---------------------------------------------------------------------------------------------------------------
// Layers over [n, features] row-major arrays

/** torch.nn.Linear: y = x W^T + b with W stored [out, in]. */
function linear(
  x: Float64Array,
  n: number,
  inF: number,
  w: ArrayLike<number>,
  b: ArrayLike<number> | null,
  outF: number,
): Float64Array {
  const y = new Float64Array(n * outF);
  for (let r = 0; r < n; r++) {
    for (let o = 0; o < outF; o++) {
      let s = b ? b[o] : 0;
      for (let i = 0; i < inF; i++) s += x[r * inF + i] * w[o * inF + i];
      y[r * outF + o] = s;
    }
  }
  return y;
}

/** y = x P for a projection stored [in, out] (open_clip's `proj` and `text_projection`). */
function project(x: Float64Array, n: number, inF: number, p: ArrayLike<number>, outF: number): Float64Array {
  const y = new Float64Array(n * outF);
  for (let r = 0; r < n; r++) {
    for (let o = 0; o < outF; o++) {
      let s = 0;
      for (let i = 0; i < inF; i++) s += x[r * inF + i] * p[i * outF + o];
      y[r * outF + o] = s;
    }
  }
  return y;
}

function layerNorm(state: RefState, prefix: string, x: Float64Array, n: number, width: number): Float64Array {
  const w = tensor(state, `${prefix}.weight`);
  const b = tensor(state, `${prefix}.bias`);
  const y = new Float64Array(n * width);
  for (let r = 0; r < n; r++) {
    let mean = 0;
    for (let i = 0; i < width; i++) mean += x[r * width + i];
    mean /= width;
    let variance = 0;
    for (let i = 0; i < width; i++) variance += (x[r * width + i] - mean) ** 2;
    variance /= width;
    const inv = 1 / Math.sqrt(variance + NORM_EPS);
    for (let i = 0; i < width; i++) y[r * width + i] = (x[r * width + i] - mean) * inv * w[i] + b[i];
  }
  return y;
}

function softmaxInPlace(row: Float64Array): void {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (let i = 0; i < row.length; i++) {
    row[i] = Math.exp(row[i] - max);
    sum += row[i];
  }
  for (let i = 0; i < row.length; i++) row[i] /= sum;
}

/**
 * Scaled dot-product attention of `queries` query rows against `t` key/value rows per sequence, with q, k and v
 * already projected ([batch * rows, width], heads side by side along the width as torch splits them). Causal masking
 * lets query i see keys 0..i.
 */
function attend(
  q: Float64Array,
  k: Float64Array,
  v: Float64Array,
  batch: number,
  queries: number,
  t: number,
  width: number,
  heads: number,
  causal: boolean,
): Float64Array {
  const dh = width / heads;
  const scale = 1 / Math.sqrt(dh);
  const out = new Float64Array(batch * queries * width);
  const scores = new Float64Array(t);
  for (let b = 0; b < batch; b++) {
    for (let h = 0; h < heads; h++) {
      for (let i = 0; i < queries; i++) {
        const visible = causal ? i + 1 : t;
        const row = scores.subarray(0, visible);
        for (let j = 0; j < visible; j++) {
          let s = 0;
          for (let d = 0; d < dh; d++) {
            s += q[(b * queries + i) * width + h * dh + d] * k[(b * t + j) * width + h * dh + d];
          }
          row[j] = s * scale;
        }
        softmaxInPlace(row);
        for (let d = 0; d < dh; d++) {
          let s = 0;
          for (let j = 0; j < visible; j++) s += row[j] * v[(b * t + j) * width + h * dh + d];
          out[(b * queries + i) * width + h * dh + d] = s;
        }
      }
    }
  }
  return out;
}

/** torch.nn.MultiheadAttention self-attention with the packed in_proj (rows q | k | v) and out_proj. */
function selfAttention(
  state: RefState,
  prefix: string,
  x: Float64Array,
  batch: number,
  t: number,
  width: number,
  heads: number,
  causal: boolean,
): Float64Array {
  const n = batch * t;
  const qkv = linear(
    x,
    n,
    width,
    tensor(state, `${prefix}.in_proj_weight`),
    tensor(state, `${prefix}.in_proj_bias`),
    3 * width,
  );
  const q = new Float64Array(n * width);
  const k = new Float64Array(n * width);
  const v = new Float64Array(n * width);
  for (let r = 0; r < n; r++) {
    for (let i = 0; i < width; i++) {
      q[r * width + i] = qkv[r * 3 * width + i];
      k[r * width + i] = qkv[r * 3 * width + width + i];
      v[r * width + i] = qkv[r * 3 * width + 2 * width + i];
    }
  }
  const merged = attend(q, k, v, batch, t, t, width, heads, causal);
  return linear(
    merged,
    n,
    width,
    tensor(state, `${prefix}.out_proj.weight`),
    tensor(state, `${prefix}.out_proj.bias`),
    width,
  );
}

/** open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then + c_proj(act(c_fc(ln_2(x)))). */
function residualBlock(
  state: RefState,
  prefix: string,
  x: Float64Array,
  batch: number,
  t: number,
  width: number,
  heads: number,
  mlpRatio: number,
  causal: boolean,
  act: Activation,
): Float64Array {
  const n = batch * t;
  const attn = selfAttention(
    state,
    `${prefix}.attn`,
    layerNorm(state, `${prefix}.ln_1`, x, n, width),
    batch,
    t,
    width,
    heads,
    causal,
  );
  const h = x.map((v, i) => v + attn[i]);
  const hidden = Math.trunc(width * mlpRatio);
  const fc = linear(
    layerNorm(state, `${prefix}.ln_2`, h, n, width),
    n,
    width,
    tensor(state, `${prefix}.mlp.c_fc.weight`),
    tensor(state, `${prefix}.mlp.c_fc.bias`),
    hidden,
  ).map(act);
  const mlp = linear(
    fc,
    n,
    hidden,
    tensor(state, `${prefix}.mlp.c_proj.weight`),
    tensor(state, `${prefix}.mlp.c_proj.bias`),
    width,
  );
  return h.map((v, i) => v + mlp[i]);
}

function transformer(
  state: RefState,
  prefix: string,
  x: Float64Array,
  batch: number,
  t: number,
  width: number,
  heads: number,
  layers: number,
  mlpRatio: number,
  causal: boolean,
  act: Activation,
): Float64Array {
  for (let l = 0; l < layers; l++) {
    x = residualBlock(state, `${prefix}.resblocks.${l}`, x, batch, t, width, heads, mlpRatio, causal, act);
  }
  return x;
}

// ---------------------------------------------------------------------------------------------------------------
// Convolutional pieces over NCHW arrays

interface Nchw {
  n: number;
  c: number;
  h: number;
  w: number;
  data: Float64Array;
}

/** torch.nn.Conv2d without bias: weight [out, in, k, k], zero padding. */
function conv2d(x: Nchw, weight: RefTensor, stride: number, padding: number): Nchw {
  const [outC, inC, kh, kw] = weight.shape;
  if (inC !== x.c) throw new Error(`reference conv: weight expects ${inC} channels, input has ${x.c}`);
  const w = weight.data;
  const oh = Math.floor((x.h + 2 * padding - kh) / stride) + 1;
  const ow = Math.floor((x.w + 2 * padding - kw) / stride) + 1;
  const out = new Float64Array(x.n * outC * oh * ow);
  const input = x.data;
  // Output positions whose tap k lands inside the input: ceil((padding - k) / stride) .. floor((size - 1 + padding - k) / stride).
  const first = (k: number) => Math.max(0, Math.ceil((padding - k) / stride));
  const last = (k: number, size: number, outSize: number) =>
    Math.min(outSize - 1, Math.floor((size - 1 + padding - k) / stride));
  for (let b = 0; b < x.n; b++) {
    for (let o = 0; o < outC; o++) {
      const dst = (b * outC + o) * oh * ow;
      for (let c = 0; c < inC; c++) {
        const src = (b * inC + c) * x.h * x.w;
        for (let ky = 0; ky < kh; ky++) {
          const y0 = first(ky), y1 = last(ky, x.h, oh);
          for (let kx = 0; kx < kw; kx++) {
            const wv = w[((o * inC + c) * kh + ky) * kw + kx];
            const x0 = first(kx), x1 = last(kx, x.w, ow);
            for (let y = y0; y <= y1; y++) {
              const row = src + (y * stride + ky - padding) * x.w + kx - padding;
              for (let xx = x0; xx <= x1; xx++) out[dst + y * ow + xx] += wv * input[row + xx * stride];
            }
          }
        }
      }
    }
  }
  return { n: x.n, c: outC, h: oh, w: ow, data: out };
}

/** torch.nn.BatchNorm2d: running statistics in eval mode, biased batch statistics in training mode. */
function batchNorm(state: RefState, prefix: string, x: Nchw, training: boolean): Nchw {
  const weight = tensor(state, `${prefix}.weight`);
  const bias = tensor(state, `${prefix}.bias`);
  const hw = x.h * x.w;
  const out = new Float64Array(x.data.length);
  for (let c = 0; c < x.c; c++) {
    let mean: number;
    let variance: number;
    if (training) {
      mean = 0;
      for (let b = 0; b < x.n; b++) for (let i = 0; i < hw; i++) mean += x.data[(b * x.c + c) * hw + i];
      mean /= x.n * hw;
      variance = 0;
      for (let b = 0; b < x.n; b++) {
        for (let i = 0; i < hw; i++) variance += (x.data[(b * x.c + c) * hw + i] - mean) ** 2;
      }
      variance /= x.n * hw;
    } else {
      mean = tensor(state, `${prefix}.running_mean`)[c];
      variance = tensor(state, `${prefix}.running_var`)[c];
    }
    const inv = 1 / Math.sqrt(variance + NORM_EPS);
    for (let b = 0; b < x.n; b++) {
      for (let i = 0; i < hw; i++) {
        const at = (b * x.c + c) * hw + i;
        out[at] = (x.data[at] - mean) * inv * weight[c] + bias[c];
      }
    }
  }
  return { ...x, data: out };
}

/** torch.nn.AvgPool2d(k): kernel k, stride k, no padding. */
function avgPool(x: Nchw, k: number): Nchw {
  const oh = Math.floor(x.h / k);
  const ow = Math.floor(x.w / k);
  const out = new Float64Array(x.n * x.c * oh * ow);
  for (let p = 0; p < x.n * x.c; p++) {
    for (let y = 0; y < oh; y++) {
      for (let xx = 0; xx < ow; xx++) {
        let s = 0;
        for (let dy = 0; dy < k; dy++) {
          for (let dx = 0; dx < k; dx++) s += x.data[(p * x.h + y * k + dy) * x.w + xx * k + dx];
        }
        out[(p * oh + y) * ow + xx] = s / (k * k);
      }
    }
  }
  return { n: x.n, c: x.c, h: oh, w: ow, data: out };
}

function mapNchw(x: Nchw, f: Activation): Nchw {
  return { ...x, data: x.data.map(f) };
}

// ---------------------------------------------------------------------------------------------------------------
// Image towers

function imageBatch(images: ArrayLike<number>, size: number): number {
  const batch = images.length / (3 * size * size);
  if (!Number.isInteger(batch)) {
    throw new Error(`reference: ${images.length} pixels are not a batch of 3x${size}x${size}`);
  }
  return batch;
}

/** open_clip's VisionTransformer. */
function encodeImageViT(
  state: RefState,
  v: ViTVisionConfig,
  act: Activation,
  images: ArrayLike<number>,
  embedDim: number,
): Matrix {
  const batch = imageBatch(images, v.image_size);
  const width = v.width;
  const p = v.patch_size;
  const grid = Math.floor(v.image_size / p);
  const t = grid * grid + 1;
  const patches = conv2d(
    { n: batch, c: 3, h: v.image_size, w: v.image_size, data: Float64Array.from(images) },
    state.get("visual.conv1.weight")!,
    p,
    0,
  );
  const cls = tensor(state, "visual.class_embedding");
  const pos = tensor(state, "visual.positional_embedding");
  let x: Float64Array = new Float64Array(batch * t * width);
  for (let b = 0; b < batch; b++) {
    for (let i = 0; i < width; i++) x[(b * t) * width + i] = cls[i] + pos[i];
    // Token 1 + (gy * grid + gx) is the patch at row gy, column gx: the conv output flattened row-major.
    for (let s = 0; s < grid * grid; s++) {
      for (let i = 0; i < width; i++) {
        x[(b * t + 1 + s) * width + i] = patches.data[(b * width + i) * grid * grid + s] + pos[(1 + s) * width + i];
      }
    }
  }
  x = layerNorm(state, "visual.ln_pre", x, batch * t, width);
  x = transformer(
    state,
    "visual.transformer",
    x,
    batch,
    t,
    width,
    width / v.head_width,
    v.layers,
    v.mlp_ratio,
    false,
    act,
  );
  const pooled = new Float64Array(batch * width);
  for (let b = 0; b < batch; b++) pooled.set(x.subarray(b * t * width, (b * t + 1) * width), b * width);
  const normed = layerNorm(state, "visual.ln_post", pooled, batch, width);
  return { rows: batch, cols: embedDim, data: project(normed, batch, width, tensor(state, "visual.proj"), embedDim) };
}

/** open_clip's Bottleneck: 1x1, 3x3, avgpool (when strided), 1x1; shortcut through avgpool + 1x1 conv + bn. */
function bottleneck(state: RefState, prefix: string, x: Nchw, stride: number, training: boolean): Nchw {
  let out = mapNchw(
    batchNorm(state, `${prefix}.bn1`, conv2d(x, state.get(`${prefix}.conv1.weight`)!, 1, 0), training),
    relu,
  );
  out = mapNchw(
    batchNorm(state, `${prefix}.bn2`, conv2d(out, state.get(`${prefix}.conv2.weight`)!, 1, 1), training),
    relu,
  );
  if (stride > 1) out = avgPool(out, stride);
  out = batchNorm(state, `${prefix}.bn3`, conv2d(out, state.get(`${prefix}.conv3.weight`)!, 1, 0), training);
  let identity = x;
  const down = state.get(`${prefix}.downsample.0.weight`);
  if (down) {
    identity = batchNorm(
      state,
      `${prefix}.downsample.1`,
      conv2d(stride > 1 ? avgPool(x, stride) : x, down, 1, 0),
      training,
    );
  }
  return { ...out, data: out.data.map((v, i) => relu(v + identity.data[i])) };
}

/**
 * open_clip's AttentionPool2d: tokens = [mean of the positions, positions] + positional embedding, attention with
 * separate q/k/v projections; only the first (mean) token's output is kept, then c_proj.
 */
function attentionPool(state: RefState, x: Nchw, heads: number, embedDim: number): Matrix {
  const c = x.c;
  const hw = x.h * x.w;
  const t = hw + 1;
  const pos = tensor(state, "visual.attnpool.positional_embedding");
  const tokens = new Float64Array(x.n * t * c);
  for (let b = 0; b < x.n; b++) {
    for (let ch = 0; ch < c; ch++) {
      let mean = 0;
      for (let i = 0; i < hw; i++) {
        const v = x.data[(b * c + ch) * hw + i];
        mean += v;
        tokens[(b * t + 1 + i) * c + ch] = v + pos[(1 + i) * c + ch];
      }
      tokens[(b * t) * c + ch] = mean / hw + pos[ch];
    }
  }
  const proj = (name: string, rows: Float64Array, n: number) =>
    linear(
      rows,
      n,
      c,
      tensor(state, `visual.attnpool.${name}.weight`),
      tensor(state, `visual.attnpool.${name}.bias`),
      c,
    );
  const first = new Float64Array(x.n * c);
  for (let b = 0; b < x.n; b++) first.set(tokens.subarray(b * t * c, (b * t + 1) * c), b * c);
  const q = proj("q_proj", first, x.n);
  const k = proj("k_proj", tokens, x.n * t);
  const v = proj("v_proj", tokens, x.n * t);
  const pooled = attend(q, k, v, x.n, 1, t, c, heads, false);
  const out = linear(
    pooled,
    x.n,
    c,
    tensor(state, "visual.attnpool.c_proj.weight"),
    tensor(state, "visual.attnpool.c_proj.bias"),
    embedDim,
  );
  return { rows: x.n, cols: embedDim, data: out };
}

/** open_clip's ModifiedResNet: 3-conv stem, avgpool 2, four bottleneck stages, attention pooling. */
function encodeImageResNet(
  state: RefState,
  v: ResNetVisionConfig,
  images: ArrayLike<number>,
  embedDim: number,
  training: boolean,
): Matrix {
  const batch = imageBatch(images, v.image_size);
  let x: Nchw = { n: batch, c: 3, h: v.image_size, w: v.image_size, data: Float64Array.from(images) };
  const stem = (i: number, stride: number) => {
    x = mapNchw(
      batchNorm(state, `visual.bn${i}`, conv2d(x, state.get(`visual.conv${i}.weight`)!, stride, 1), training),
      relu,
    );
  };
  stem(1, 2);
  stem(2, 1);
  stem(3, 1);
  x = avgPool(x, 2);
  for (let stage = 0; stage < 4; stage++) {
    for (let block = 0; block < v.layers[stage]; block++) {
      x = bottleneck(state, `visual.layer${stage + 1}.${block}`, x, stage > 0 && block === 0 ? 2 : 1, training);
    }
  }
  return attentionPool(state, x, (v.width * 32) / v.head_width, embedDim);
}

/** Image features before normalisation: images [B, 3, S, S] (NCHW) -> [B, embed_dim]. */
export function refEncodeImage(
  state: RefState,
  cfg: ClipConfig,
  images: ArrayLike<number>,
  opts: RefImageOptions = {},
): Matrix {
  const v = cfg.vision_cfg;
  return isResNetVision(v)
    ? encodeImageResNet(state, v, images, cfg.embed_dim, opts.batchNormTraining ?? false)
    : encodeImageViT(state, v, activationOf(cfg), images, cfg.embed_dim);
}

// ---------------------------------------------------------------------------------------------------------------
// Text tower

/** The first position of the largest id in each row (torch.argmax), which is where CLIP's EOT token sits. */
function argmaxRows(tokens: Int32Array, ctx: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < tokens.length / ctx; r++) {
    let best = 0;
    for (let i = 1; i < ctx; i++) if (tokens[r * ctx + i] > tokens[r * ctx + best]) best = i;
    out.push(best);
  }
  return out;
}

/** Text features before normalisation: token ids [B, context_length] -> [B, embed_dim]. */
export function refEncodeText(state: RefState, cfg: ClipConfig, tokens: Int32Array): Matrix {
  const t: TextConfig = cfg.text_cfg;
  const ctx = t.context_length;
  const width = t.width;
  const batch = tokens.length / ctx;
  if (!Number.isInteger(batch)) throw new Error(`reference: ${tokens.length} tokens are not rows of ${ctx}`);
  const emb = tensor(state, "token_embedding.weight");
  const pos = tensor(state, "positional_embedding");
  let x: Float64Array = new Float64Array(batch * ctx * width);
  for (let r = 0; r < batch * ctx; r++) {
    const id = tokens[r];
    if (id < 0 || id >= t.vocab_size) throw new Error(`reference: token id ${id} is outside the vocabulary`);
    const at = r % ctx;
    for (let i = 0; i < width; i++) x[r * width + i] = emb[id * width + i] + pos[at * width + i];
  }
  x = transformer(state, "transformer", x, batch, ctx, width, t.heads, t.layers, t.mlp_ratio, true, activationOf(cfg));
  x = layerNorm(state, "ln_final", x, batch * ctx, width);
  const pooled = new Float64Array(batch * width);
  argmaxRows(tokens, ctx).forEach((p, b) =>
    pooled.set(x.subarray((b * ctx + p) * width, (b * ctx + p + 1) * width), b * width)
  );
  return {
    rows: batch,
    cols: cfg.embed_dim,
    data: project(pooled, batch, width, tensor(state, "text_projection"), cfg.embed_dim),
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Loss

function l2NormalizeRows(m: Matrix): Matrix {
  const out = new Float64Array(m.data.length);
  for (let r = 0; r < m.rows; r++) {
    let s = 0;
    for (let i = 0; i < m.cols; i++) s += m.data[r * m.cols + i] ** 2;
    // F.normalize divides by max(norm, 1e-12).
    const inv = 1 / Math.max(Math.sqrt(s), 1e-12);
    for (let i = 0; i < m.cols; i++) out[r * m.cols + i] = m.data[r * m.cols + i] * inv;
  }
  return { ...m, data: out };
}

/** Mean over rows of -log softmax(row)[row index], for a square matrix read with the given strides. */
function meanDiagonalCrossEntropy(logits: Float64Array, n: number, rowStride: number, colStride: number): number {
  let total = 0;
  for (let i = 0; i < n; i++) {
    let max = -Infinity;
    for (let j = 0; j < n; j++) max = Math.max(max, logits[i * rowStride + j * colStride]);
    let sum = 0;
    for (let j = 0; j < n; j++) sum += Math.exp(logits[i * rowStride + j * colStride] - max);
    total += max + Math.log(sum) - logits[i * rowStride + i * colStride];
  }
  return total / n;
}

/** logits_per_image = exp(logitScale) * normalize(I) normalize(T)^T, [images, texts]. */
export function refLogitsPerImage(imageFeatures: Matrix, textFeatures: Matrix, logitScale: number): Matrix {
  if (imageFeatures.cols !== textFeatures.cols) {
    throw new Error(
      `reference logits: image features have ${imageFeatures.cols} columns, text features ${textFeatures.cols}`,
    );
  }
  const d = imageFeatures.cols;
  const img = l2NormalizeRows(imageFeatures).data;
  const txt = l2NormalizeRows(textFeatures).data;
  const s = Math.exp(logitScale);
  const logits = new Float64Array(imageFeatures.rows * textFeatures.rows);
  for (let i = 0; i < imageFeatures.rows; i++) {
    for (let j = 0; j < textFeatures.rows; j++) {
      let dot = 0;
      for (let k = 0; k < d; k++) dot += img[i * d + k] * txt[j * d + k];
      logits[i * textFeatures.rows + j] = s * dot;
    }
  }
  return { rows: imageFeatures.rows, cols: textFeatures.rows, data: logits };
}

/**
 * open_clip's ClipLoss on raw features: both are L2-normalised per row, logits = exp(logitScale) I T^T, and the loss is
 * the mean of the image->text and text->image cross-entropies with the matching pair as the target.
 */
export function refClipLoss(imageFeatures: Matrix, textFeatures: Matrix, logitScale: number): number {
  if (imageFeatures.rows !== textFeatures.rows) {
    throw new Error(`reference loss: ${imageFeatures.rows} images but ${textFeatures.rows} texts`);
  }
  const n = imageFeatures.rows;
  const logits = refLogitsPerImage(imageFeatures, textFeatures, logitScale).data;
  return (meanDiagonalCrossEntropy(logits, n, n, 1) + meanDiagonalCrossEntropy(logits, n, 1, n)) / 2;
}

/** The CLIP loss of a whole model on one batch. */
export function refModelLoss(
  state: RefState,
  cfg: ClipConfig,
  images: ArrayLike<number>,
  tokens: Int32Array,
  opts: RefImageOptions = {},
): number {
  return refClipLoss(
    refEncodeImage(state, cfg, images, opts),
    refEncodeText(state, cfg, tokens),
    tensor(state, "logit_scale")[0],
  );
}

// ---------------------------------------------------------------------------------------------------------------
// AdamW

export interface RefAdamWConfig {
  beta1: number;
  beta2: number;
  eps: number;
  weightDecay: number;
  /** clip_grad_norm_'s max_norm over all gradients together; 0 disables clipping. */
  gradClip: number;
}

/**
 * open_clip's parameter groups: no weight decay when `p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or
 * "logit_scale" in n`; everything else decays.
 */
export function refDecays(name: string, shape: readonly number[]): boolean {
  return !(shape.length < 2 || name.includes("bn") || name.includes("ln") || name.includes("bias") ||
    name.includes("logit_scale"));
}

export interface RefAdamWStepInfo {
  gradNorm: number;
  clipCoefficient: number;
  /** The logit scale after the update and before open_clip's clamp to [0, ln 100]. */
  logitScaleUnclamped: number | null;
}

/**
 * torch.optim.AdamW (amsgrad off) preceded by torch.nn.utils.clip_grad_norm_ (when gradClip > 0) and followed by
 * open_clip's `logit_scale.clamp_(0, math.log(100))`. Parameters are updated in place, in float64.
 */
export class RefAdamW {
  readonly m = new Map<string, Float64Array>();
  readonly v = new Map<string, Float64Array>();
  step = 0;

  constructor(readonly config: RefAdamWConfig) {}

  update(
    params: Map<string, { shape: readonly number[]; data: Float64Array }>,
    grads: ReadonlyMap<string, ArrayLike<number>>,
    lr: number,
  ): RefAdamWStepInfo {
    const { beta1, beta2, eps, weightDecay, gradClip } = this.config;
    this.step++;
    let squares = 0;
    for (const g of grads.values()) for (let i = 0; i < g.length; i++) squares += g[i] * g[i];
    const gradNorm = Math.sqrt(squares);
    const clipCoefficient = gradClip > 0 ? Math.min(1, gradClip / (gradNorm + 1e-6)) : 1;
    const bc1 = 1 - beta1 ** this.step;
    const bc2 = 1 - beta2 ** this.step;
    let logitScaleUnclamped: number | null = null;
    for (const [name, g] of grads) {
      const p = params.get(name);
      if (!p) throw new Error(`reference AdamW: gradient for unknown parameter '${name}'`);
      let m = this.m.get(name);
      let v = this.v.get(name);
      if (!m || !v) {
        this.m.set(name, m = new Float64Array(g.length));
        this.v.set(name, v = new Float64Array(g.length));
      }
      const decay = refDecays(name, p.shape) ? weightDecay : 0;
      for (let i = 0; i < g.length; i++) {
        const gi = g[i] * clipCoefficient;
        p.data[i] *= 1 - lr * decay;
        m[i] = beta1 * m[i] + (1 - beta1) * gi;
        v[i] = beta2 * v[i] + (1 - beta2) * gi * gi;
        p.data[i] -= (lr / bc1) * m[i] / (Math.sqrt(v[i]) / Math.sqrt(bc2) + eps);
      }
      if (name === "logit_scale") {
        logitScaleUnclamped = p.data[0];
        p.data[0] = Math.min(Math.max(p.data[0], 0), Math.log(100));
      }
    }
    return { gradNorm, clipCoefficient, logitScaleUnclamped };
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Finite differences

/** Which forward passes a parameter enters: the image tower, the text tower, or only the loss (the logit scale). */
function towerOf(name: string): "image" | "text" | "loss" {
  return name.startsWith("visual.") ? "image" : name === "logit_scale" ? "loss" : "text";
}

/**
 * Central finite differences of the float64 reference loss, (L(p + h) - L(p - h)) / 2h for one entry at a time.
 * Only the tower the parameter belongs to is re-run; the other tower's features are kept.
 */
export class RefLossDifferences {
  private readonly state: Map<string, { shape: number[]; data: Float64Array }>;
  private readonly imageFeatures: Matrix;
  private readonly textFeatures: Matrix;

  constructor(
    state: RefState,
    private readonly cfg: ClipConfig,
    private readonly images: ArrayLike<number>,
    private readonly tokens: Int32Array,
    private readonly opts: RefImageOptions & { step: number },
  ) {
    this.state = toFloat64State(state);
    this.imageFeatures = refEncodeImage(this.state, cfg, images, opts);
    this.textFeatures = refEncodeText(this.state, cfg, tokens);
  }

  loss(): number {
    return refClipLoss(this.imageFeatures, this.textFeatures, this.state.get("logit_scale")!.data[0]);
  }

  private lossAt(name: string): number {
    const tower = towerOf(name);
    const image = tower === "image" ? refEncodeImage(this.state, this.cfg, this.images, this.opts) : this.imageFeatures;
    const text = tower === "text" ? refEncodeText(this.state, this.cfg, this.tokens) : this.textFeatures;
    return refClipLoss(image, text, this.state.get("logit_scale")!.data[0]);
  }

  /** dLoss / d state[name][index]. */
  derivative(name: string, index: number): number {
    const t = this.state.get(name);
    if (!t || index < 0 || index >= t.data.length) {
      throw new Error(`finite differences: no entry ${index} of '${name}'`);
    }
    const h = this.opts.step;
    const saved = t.data[index];
    t.data[index] = saved + h;
    const up = this.lossAt(name);
    t.data[index] = saved - h;
    const down = this.lossAt(name);
    t.data[index] = saved;
    return (up - down) / (2 * h);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Inputs for micro models

function normals(rng: Rng, n: number): Float64Array {
  const out = new Float64Array(n);
  for (let i = 0; i < n; i++) {
    const u = Math.max(rng.next(), 1e-300);
    out[i] = Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * rng.next());
  }
  return out;
}

/**
 * A model's fresh initialisation perturbed the way the reference fixtures were, so that no parameter is zero or one and
 * symmetric mistakes cannot cancel: norm gains 1 + 0.1 N, biases and running means 0.05 N, running variances
 * 1 + 0.25 |N|, the logit scale + 0.1 N, every other tensor + 0.25 std N. Values are float32.
 */
export function perturbedParameters(
  initial: ReadonlyMap<string, { shape: number[]; data: Float32Array }>,
  seed: number,
): Map<string, { shape: number[]; data: Float32Array }> {
  const rng = new Rng(seed);
  const out = new Map<string, { shape: number[]; data: Float32Array }>();
  for (const [name, t] of initial) {
    const noise = normals(rng, t.data.length);
    let data: Float32Array;
    if (/(^|\.)(ln_\w+|bn\d|downsample\.1)\.weight$/.test(name)) data = Float32Array.from(noise, (z) => 1 + 0.1 * z);
    else if (name.endsWith("bias") || name.endsWith("running_mean")) data = Float32Array.from(noise, (z) => 0.05 * z);
    else if (name.endsWith("running_var")) data = Float32Array.from(noise, (z) => 1 + 0.25 * Math.abs(z));
    else if (name === "logit_scale") data = Float32Array.of(t.data[0] + 0.1 * noise[0]);
    else {
      let mean = 0;
      for (const v of t.data) mean += v / t.data.length;
      let variance = 0;
      for (const v of t.data) variance += (v - mean) ** 2 / t.data.length;
      data = Float32Array.from(t.data, (v, i) => v + 0.25 * Math.sqrt(variance) * noise[i]);
    }
    out.set(name, { shape: [...t.shape], data });
  }
  return out;
}

/** `batch` images of normalised pixels, uniform in [-2, 2], as float32. */
export function randomImages(batch: number, size: number, seed: number): Float32Array {
  const rng = new Rng(seed);
  return Float32Array.from({ length: batch * 3 * size * size }, () => rng.next() * 4 - 2);
}

/**
 * Token rows like the tokenizer's: SOT (vocab - 2), a body of ids in [1, vocab - 3], EOT (vocab - 1, the largest id,
 * so it is where features are taken), then padding 0. Lengths differ per row; the last row fills the context.
 */
export function randomTokens(batch: number, text: TextConfig, seed: number): Int32Array {
  const rng = new Rng(seed);
  const ctx = text.context_length;
  const out = new Int32Array(batch * ctx);
  for (let r = 0; r < batch; r++) {
    const body = r === batch - 1 ? ctx - 2 : 1 + Math.floor(rng.next() * (ctx - 2));
    out[r * ctx] = text.vocab_size - 2;
    for (let i = 1; i <= body; i++) out[r * ctx + i] = 1 + Math.floor(rng.next() * (text.vocab_size - 3));
    out[r * ctx + body + 1] = text.vocab_size - 1;
  }
  return out;
}
