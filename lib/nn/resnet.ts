import {
  add,
  avgPool2d,
  batchNorm2d,
  concat,
  conv2d,
  matmul,
  mean,
  permute,
  relu,
  reshape,
  slice,
  softmax,
} from "../tensor/ops.ts";
import type { Tensor } from "../tensor/tensor.ts";
import { type ResNetVisionConfig, visionHeads } from "./config.ts";
import { linear } from "./layers.ts";
import type { Params } from "./params.ts";

function bn(p: Params, prefix: string, x: Tensor, training: boolean): Tensor {
  return batchNorm2d(
    x,
    p.get(`${prefix}.weight`),
    p.get(`${prefix}.bias`),
    p.get(`${prefix}.running_mean`),
    p.get(`${prefix}.running_var`),
    { training },
  );
}

function convBnRelu(p: Params, conv: string, norm: string, x: Tensor, padding: number, training: boolean, stride = 1) {
  return relu(bn(p, norm, conv2d(x, p.get(`${conv}.weight`), { stride, padding }), training));
}

/** A bottleneck block; strided blocks downsample by average pooling (anti-aliasing) instead of a strided conv. */
function bottleneck(p: Params, prefix: string, x: Tensor, stride: number, training: boolean): Tensor {
  let out = convBnRelu(p, `${prefix}.conv1`, `${prefix}.bn1`, x, 0, training);
  out = convBnRelu(p, `${prefix}.conv2`, `${prefix}.bn2`, out, 1, training);
  if (stride > 1) out = avgPool2d(out, stride);
  out = bn(p, `${prefix}.bn3`, conv2d(out, p.get(`${prefix}.conv3.weight`)), training);
  let identity = x;
  if (p.has(`${prefix}.downsample.0.weight`)) {
    const pooled = stride > 1 ? avgPool2d(x, stride) : x;
    identity = bn(p, `${prefix}.downsample.1`, conv2d(pooled, p.get(`${prefix}.downsample.0.weight`)), training);
  }
  return relu(add(out, identity));
}

/** AttentionPool2d: the mean token attends over all spatial positions (plus itself) with a learned position embedding. */
function attentionPool(p: Params, x: Tensor, heads: number): Tensor {
  const [n, c, h, w] = x.shape;
  const seq = permute(reshape(x, [n, c, h * w]), [0, 2, 1]); // [N, HW, C]
  const meanToken = reshape(mean(seq, 1), [n, 1, c]);
  const tokens = add(concat([meanToken, seq], 1), p.get("visual.attnpool.positional_embedding")); // [N, L, C]
  const length = h * w + 1;
  const dh = c / heads;
  const q = linear(p, "visual.attnpool.q_proj", slice(tokens, 1, 0, 1)); // [N, 1, C]
  const k = linear(p, "visual.attnpool.k_proj", tokens);
  const v = linear(p, "visual.attnpool.v_proj", tokens);
  const qh = permute(reshape(q, [n, 1, heads, dh]), [0, 2, 1, 3]); // [N, H, 1, dh]
  const kh = permute(reshape(k, [n, length, heads, dh]), [0, 2, 1, 3]); // [N, H, L, dh]
  const vh = permute(reshape(v, [n, length, heads, dh]), [0, 2, 1, 3]);
  const weights = softmax(matmul(qh, kh, { transB: true }), { scale: 1 / Math.sqrt(dh) });
  const pooled = reshape(permute(matmul(weights, vh), [0, 2, 1, 3]), [n, c]);
  return linear(p, "visual.attnpool.c_proj", pooled);
}

/** open_clip's ModifiedResNet. images: [B, 3, S, S] -> [B, embed_dim]. `training` selects batch statistics. */
export function encodeImageResNet(p: Params, v: ResNetVisionConfig, images: Tensor, training: boolean): Tensor {
  let x = convBnRelu(p, "visual.conv1", "visual.bn1", images, 1, training, 2);
  x = convBnRelu(p, "visual.conv2", "visual.bn2", x, 1, training);
  x = convBnRelu(p, "visual.conv3", "visual.bn3", x, 1, training);
  x = avgPool2d(x, 2);
  for (let stage = 0; stage < 4; stage++) {
    for (let block = 0; block < v.layers[stage]; block++) {
      const stride = stage > 0 && block === 0 ? 2 : 1;
      x = bottleneck(p, `visual.layer${stage + 1}.${block}`, x, stride, training);
    }
  }
  return attentionPool(p, x, visionHeads(v));
}
