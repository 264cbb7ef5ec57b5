import { add, concat, conv2d, layerNorm, matmul, permute, reshape, slice, zeros } from "../tensor/ops.ts";
import type { Tensor } from "../tensor/tensor.ts";
import type { UnaryOp } from "../../kernels/elementwise.ts";
import { LAYER_NORM_EPS, visionHeads, vitGridSize, type ViTVisionConfig } from "./config.ts";
import { layerNormP, transformer } from "./layers.ts";
import type { Params } from "./params.ts";

/**
 * open_clip's VisionTransformer: patch convolution, class token, positional embedding, ln_pre, pre-norm blocks,
 * ln_post on the class token, projection. images: [B, 3, S, S] -> [B, embed_dim].
 */
export function encodeImageViT(p: Params, v: ViTVisionConfig, activation: UnaryOp, images: Tensor): Tensor {
  const b = images.shape[0];
  const grid = vitGridSize(v);
  const patches = conv2d(images, p.get("visual.conv1.weight"), { stride: v.patch_size }); // [B, W, g, g]
  const tokens = permute(reshape(patches, [b, v.width, grid * grid]), [0, 2, 1]); // [B, g*g, W]
  // The class token is the same learned vector for every image: broadcast it over the batch.
  const cls = add(zeros(images.gpu, [b, 1, v.width]), p.get("visual.class_embedding"));
  let x = add(concat([cls, tokens], 1), p.get("visual.positional_embedding"));
  x = layerNormP(p, "visual.ln_pre", x);
  const classToken = (t: Tensor) => reshape(slice(t, 1, 0, 1), [b, v.width]);
  const pooled = transformer(p, "visual.transformer", x, v.layers, visionHeads(v), false, activation, classToken);
  const normed = layerNorm(pooled, p.get("visual.ln_post.weight"), p.get("visual.ln_post.bias"), LAYER_NORM_EPS);
  return matmul(normed, p.get("visual.proj"));
}
