// Building blocks shared by the towers, written over open_clip parameter names so that weights load without renaming.
import type { UnaryOp } from "../../kernels/elementwise.ts";
import { add, attention, layerNorm, matmul, reshape } from "../tensor/ops.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { LAYER_NORM_EPS } from "./config.ts";
import type { Params } from "./params.ts";

/**
 * y = x W^T + b (+ activation, + residual) over the last axis, as torch.nn.Linear stores W [out, in] (or x W when the
 * parameters hold W transposed for inference).
 */
export function linear(
  p: Params,
  prefix: string,
  x: Tensor,
  opts: { activation?: UnaryOp | null; residual?: Tensor; bias?: boolean } = {},
): Tensor {
  const { w, transB, out } = linearWeight(p, `${prefix}.weight`);
  const lead = x.shape.slice(0, -1);
  const x2 = reshape(x, [-1, x.shape[x.rank - 1]]);
  const residual = opts.residual ? reshape(opts.residual, [-1, out]) : undefined;
  const bias = opts.bias === false ? undefined : p.get(`${prefix}.bias`);
  const y = matmul(x2, w, { transB, bias, activation: opts.activation ?? null, residual });
  return reshape(y, [...lead, out]);
}

/** A Linear weight as the product takes it: [out, in] read transposed, or [in, out] as held for inference. */
function linearWeight(p: Params, name: string): { w: Tensor; transB: boolean; out: number } {
  const w = p.get(name);
  const transB = !p.isTransposed(name);
  return { w, transB, out: w.shape[transB ? 0 : 1] };
}

/** The parameters that `linear` and `selfAttention` use as Linear weights. */
export function isLinearWeight(name: string): boolean {
  return /(\.in_proj_weight|\.(out_proj|c_fc|c_proj|q_proj|k_proj|v_proj)\.weight)$/.test(name);
}

export function layerNormP(p: Params, prefix: string, x: Tensor): Tensor {
  return layerNorm(x, p.get(`${prefix}.weight`), p.get(`${prefix}.bias`), LAYER_NORM_EPS);
}

/** The rows a tower's output is read from: [B, T, W] -> [B, W] (the class token, or each caption's EOT). */
export type PoolRows = (tokens: Tensor) => Tensor;

/**
 * Multi-head scaled dot-product attention on [B, T, W] inputs with packed q/k/v projections
 * (`in_proj_weight` [3W, W], `in_proj_bias` [3W]) as torch.nn.MultiheadAttention stores them; adds `residual`
 * to the output projection. With `pool`, only the pooled rows go on through the output projection.
 */
export function selfAttention(
  p: Params,
  prefix: string,
  x: Tensor,
  heads: number,
  causal: boolean,
  residual: Tensor,
  pool?: PoolRows,
): Tensor {
  const [b, t, w] = x.shape;
  const inProj = linearWeight(p, `${prefix}.in_proj_weight`);
  const qkv = matmul(reshape(x, [b * t, w]), inProj.w, {
    transB: inProj.transB,
    bias: p.get(`${prefix}.in_proj_bias`),
  });
  // The fused kernel reads q, k and v per head straight from the packed projection and writes heads merged.
  const merged = attention(reshape(qkv, [b, t, 3 * w]), { heads, causal });
  return pool
    ? linear(p, `${prefix}.out_proj`, pool(merged), { residual: pool(residual) })
    : linear(p, `${prefix}.out_proj`, merged, { residual });
}

/**
 * open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then + mlp(ln_2(x)). With `pool`, the block returns only
 * the pooled rows: every op after attention works row by row, so those rows come out exactly as from the whole
 * block.
 */
export function residualAttentionBlock(
  p: Params,
  prefix: string,
  x: Tensor,
  heads: number,
  causal: boolean,
  activation: UnaryOp,
  pool?: PoolRows,
): Tensor {
  const h = selfAttention(p, `${prefix}.attn`, layerNormP(p, `${prefix}.ln_1`, x), heads, causal, x, pool);
  const hidden = linear(p, `${prefix}.mlp.c_fc`, layerNormP(p, `${prefix}.ln_2`, h), { activation });
  return linear(p, `${prefix}.mlp.c_proj`, hidden, { residual: h });
}

/**
 * The residual blocks, returning the pooled rows [B, W] of the last one. Only attention mixes rows, so the last
 * block carries just the pooled rows past its attention: for a tower that reads one row per sequence, that skips
 * the output projection and the MLP of every other row (a sixth of ViT-B/32's work in its last block's tokens,
 * forward and backward), with the same result.
 */
export function transformer(
  p: Params,
  prefix: string,
  x: Tensor,
  layers: number,
  heads: number,
  causal: boolean,
  activation: UnaryOp,
  pool: PoolRows,
): Tensor {
  if (layers === 0) return pool(x);
  for (let i = 0; i < layers; i++) {
    x = residualAttentionBlock(
      p,
      `${prefix}.resblocks.${i}`,
      x,
      heads,
      causal,
      activation,
      i === layers - 1 ? pool : undefined,
    );
  }
  return x;
}

/** x + y, named for readability at residual connections. */
export const residualAdd = add;
