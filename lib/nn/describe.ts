import {
  type ClipConfig,
  expectedShapes,
  isBufferKey,
  isResNetVision,
  numel,
  type PreprocessConfig,
  visionHeads,
} from "./config.ts";

export interface ModelDescription {
  source: string;
  architecture: string;
  vision: string;
  text: string;
  embedDim: number;
  activation: string;
  parameters: { total: number; vision: number; text: number };
  /** Bytes the weights take at each precision (parameters plus batch-norm statistics). */
  weightBytes: { f32: number; f16: number };
  preprocess: PreprocessConfig;
  hasWeights: boolean;
}

/** The architecture, parameter counts and weight memory of a model config, for `clip info --model`. */
export function describeModel(
  config: ClipConfig,
  preprocess: PreprocessConfig,
  source: string,
  hasWeights: boolean,
): ModelDescription {
  let vision = 0, text = 0, stored = 0;
  for (const [key, shape] of expectedShapes(config)) {
    const n = numel(shape);
    stored += n;
    if (isBufferKey(key)) continue;
    if (key.startsWith("visual.")) vision += n;
    else text += n;
  }
  const v = config.vision_cfg;
  const t = config.text_cfg;
  const visionText = isResNetVision(v)
    ? `ModifiedResNet, layers [${v.layers.join(", ")}], width ${v.width}, attention pool ${visionHeads(v)} heads, ` +
      `${v.image_size} px`
    : `ViT, ${v.layers} layers, width ${v.width}, ${visionHeads(v)} heads, patch ${v.patch_size}, ${v.image_size} px`;
  return {
    source,
    architecture: isResNetVision(v) ? "CLIP (ResNet image tower)" : "CLIP (ViT image tower)",
    vision: visionText,
    text: `Transformer, ${t.layers} layers, width ${t.width}, ${t.heads} heads, context ${t.context_length}, ` +
      `vocabulary ${t.vocab_size}`,
    embedDim: config.embed_dim,
    activation: config.quick_gelu ? "QuickGELU" : "GELU",
    parameters: { total: vision + text, vision, text },
    weightBytes: { f32: 4 * stored, f16: 2 * stored },
    preprocess,
    hasWeights,
  };
}
