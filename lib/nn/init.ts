// Random initialisation of a fresh model, following open_clip's init_parameters and PyTorch's module defaults, so that
// training from scratch starts where open_clip's would.
import { Rng } from "../data/rng.ts";
import { type ClipConfig, expectedShapes, isResNetVision, numel } from "./config.ts";
import type { HostTensor } from "./params.ts";

function normal(rng: Rng, n: number, std: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i += 2) {
    // Box-Muller: two independent normals per pair of uniforms.
    const u = Math.max(rng.next(), 1e-300), v = rng.next();
    const r = Math.sqrt(-2 * Math.log(u));
    out[i] = r * Math.cos(2 * Math.PI * v) * std;
    if (i + 1 < n) out[i + 1] = r * Math.sin(2 * Math.PI * v) * std;
  }
  return out;
}

function uniform(rng: Rng, n: number, bound: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (rng.next() * 2 - 1) * bound;
  return out;
}

/** fan_in of a weight as PyTorch computes it: input features times kernel area. */
function fanIn(shape: number[]): number {
  return shape.slice(1).reduce((p, d) => p * d, 1);
}

/** Every parameter and buffer of `config`, randomly initialised from `seed`. */
export function initParameters(config: ClipConfig, seed: number): Map<string, HostTensor> {
  const rng = new Rng(seed);
  const text = config.text_cfg;
  const textProjStd = text.width ** -0.5 * (2 * text.layers) ** -0.5;
  const textAttnStd = text.width ** -0.5;
  const textFcStd = (2 * text.width) ** -0.5;
  const out = new Map<string, HostTensor>();
  for (const [name, shape] of expectedShapes(config)) {
    const n = numel(shape);
    const defaultLinear = () => uniform(rng, n, 1 / Math.sqrt(fanIn(shape)));
    let data: Float32Array;
    if (name === "logit_scale") data = Float32Array.of(Math.log(1 / 0.07));
    else if (/(^|\.)(ln_\w+|bn\d|downsample\.1)\.weight$/.test(name) || name.endsWith("running_var")) {
      // Bottlenecks zero-initialise their last batch norm so each residual branch starts as the identity.
      data = new Float32Array(n).fill(/layer\d\.\d+\.bn3\.weight$/.test(name) ? 0 : 1);
    } else if (/(ln_\w+|bn\d|downsample\.1)\.bias$/.test(name) || name.endsWith("running_mean")) {
      data = new Float32Array(n);
    } else if (name === "token_embedding.weight") data = normal(rng, n, 0.02);
    else if (name === "positional_embedding") data = normal(rng, n, 0.01);
    else if (name === "text_projection") data = normal(rng, n, text.width ** -0.5);
    else if (name.startsWith("transformer.")) {
      if (name.endsWith("attn.in_proj_weight")) data = normal(rng, n, textAttnStd);
      else if (name.endsWith("attn.out_proj.weight") || name.endsWith("mlp.c_proj.weight")) {
        data = normal(rng, n, textProjStd);
      } else if (name.endsWith("mlp.c_fc.weight")) data = normal(rng, n, textFcStd);
      else if (name.endsWith("in_proj_bias") || name.endsWith("out_proj.bias")) data = new Float32Array(n);
      else {data = uniform(
          rng,
          n,
          1 / Math.sqrt(name.endsWith("c_proj.bias") ? text.width * text.mlp_ratio : text.width),
        );}
    } else data = initVisual(name, shape, n, config, rng, defaultLinear);
    out.set(name, { shape, data });
  }
  return out;
}

function initVisual(
  name: string,
  shape: number[],
  n: number,
  config: ClipConfig,
  rng: Rng,
  defaultLinear: () => Float32Array,
): Float32Array {
  const v = config.vision_cfg;
  if (isResNetVision(v)) {
    if (name.startsWith("visual.attnpool.") && name.endsWith("_proj.weight")) return normal(rng, n, shape[1] ** -0.5);
    if (name === "visual.attnpool.positional_embedding") return normal(rng, n, (v.width * 32) ** -0.5);
    if (name.startsWith("visual.attnpool.") && name.endsWith(".bias")) {
      return uniform(rng, n, 1 / Math.sqrt(v.width * 32));
    }
    return defaultLinear();
  }
  const scale = v.width ** -0.5;
  if (name === "visual.class_embedding" || name === "visual.positional_embedding" || name === "visual.proj") {
    return normal(rng, n, scale);
  }
  if (name.endsWith("attn.in_proj_weight")) {
    // torch.nn.MultiheadAttention: xavier_uniform over the packed [3W, W] weight.
    return uniform(rng, n, Math.sqrt(6 / (shape[0] + shape[1])));
  }
  if (name.endsWith("in_proj_bias") || name.endsWith("out_proj.bias")) return new Float32Array(n);
  if (name.endsWith(".bias")) {
    // A Linear bias draws from U(±1/sqrt(fan_in)) of its own weight; fan_in is the width or the MLP hidden size.
    const fan = name.endsWith("c_proj.bias") ? v.width * v.mlp_ratio : v.width;
    return uniform(rng, n, 1 / Math.sqrt(fan));
  }
  return defaultLinear();
}
