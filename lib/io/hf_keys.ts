/**
 * Hugging Face transformers' `CLIPModel` checkpoints, turned into open_clip's names and config.
 *
 * The two hold the same numbers arranged differently: transformers splits each attention in_proj into q/k/v
 * projections and stores both final projections as nn.Linear weights ([out, in]), where open_clip keeps a packed
 * [3W, W] in_proj and [in, out] projection matrices.
 */
import { ClipError } from "../errors.ts";
import {
  type ClipConfig,
  LAYER_NORM_EPS,
  OPENAI_MEAN,
  OPENAI_STD,
  parseClipConfig,
  parsePreprocessConfig,
  type PreprocessConfig,
} from "../nn/config.ts";

export type Naming = "open_clip" | "hf";

export interface NamedTensor {
  shape: number[];
  data: Float32Array;
}

/** Which naming a checkpoint's keys follow, or null when they follow neither. */
export function detectNaming(keys: Iterable<string>): Naming | null {
  let openClip = 0;
  let hf = 0;
  for (const key of keys) {
    if (key.startsWith("text_model.") || key.startsWith("vision_model.") || key === "visual_projection.weight") hf++;
    else if (
      key.startsWith("visual.") || key === "token_embedding.weight" || key.startsWith("transformer.resblocks.")
    ) openClip++;
  }
  if (hf > 0 && openClip === 0) return "hf";
  if (openClip > 0 && hf === 0) return "open_clip";
  return null;
}

/** How one open_clip tensor is made from transformers tensors. */
export interface MappingStep {
  target: string;
  /** For "concat", the q, k and v sources in that order (open_clip packs in_proj rows as q|k|v). */
  sources: string[];
  op: "copy" | "concat" | "transpose";
}

/** Integer buffers transformers sometimes saves; they carry no weights. */
const IGNORED_HF_KEYS = new Set(["text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"]);

const TOP_LEVEL: Record<string, { target: string; op: "copy" | "transpose" }> = {
  "text_model.embeddings.token_embedding.weight": { target: "token_embedding.weight", op: "copy" },
  "text_model.embeddings.position_embedding.weight": { target: "positional_embedding", op: "copy" },
  "text_model.final_layer_norm.weight": { target: "ln_final.weight", op: "copy" },
  "text_model.final_layer_norm.bias": { target: "ln_final.bias", op: "copy" },
  "text_projection.weight": { target: "text_projection", op: "transpose" },
  "vision_model.embeddings.class_embedding": { target: "visual.class_embedding", op: "copy" },
  "vision_model.embeddings.patch_embedding.weight": { target: "visual.conv1.weight", op: "copy" },
  "vision_model.embeddings.position_embedding.weight": { target: "visual.positional_embedding", op: "copy" },
  // "layrnorm" is transformers' own spelling of this key.
  "vision_model.pre_layrnorm.weight": { target: "visual.ln_pre.weight", op: "copy" },
  "vision_model.pre_layrnorm.bias": { target: "visual.ln_pre.bias", op: "copy" },
  "vision_model.post_layernorm.weight": { target: "visual.ln_post.weight", op: "copy" },
  "vision_model.post_layernorm.bias": { target: "visual.ln_post.bias", op: "copy" },
  "visual_projection.weight": { target: "visual.proj", op: "transpose" },
  "logit_scale": { target: "logit_scale", op: "copy" },
};

const LAYER_PARTS: Record<string, string> = {
  "layer_norm1": "ln_1",
  "layer_norm2": "ln_2",
  "mlp.fc1": "mlp.c_fc",
  "mlp.fc2": "mlp.c_proj",
  "self_attn.out_proj": "attn.out_proj",
};

const LAYER_KEY = /^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$/;
const QKV = /^self_attn\.([qkv])_proj$/;

/** The plan that turns these transformers keys into open_clip's; unknown keys are refused by name. */
export function planHfToOpenClip(keys: Iterable<string>, source = "checkpoint"): MappingStep[] {
  const steps: MappingStep[] = [];
  const qkv = new Map<string, { q?: string; k?: string; v?: string }>();
  for (const key of keys) {
    if (IGNORED_HF_KEYS.has(key)) continue;
    const top = TOP_LEVEL[key];
    if (top) {
      steps.push({ target: top.target, sources: [key], op: top.op });
      continue;
    }
    const m = LAYER_KEY.exec(key);
    if (m) {
      const [, tower, layer, part, param] = m;
      const prefix = `${tower === "vision_model" ? "visual." : ""}transformer.resblocks.${layer}`;
      const renamed = LAYER_PARTS[part];
      if (renamed) {
        steps.push({ target: `${prefix}.${renamed}.${param}`, sources: [key], op: "copy" });
        continue;
      }
      const q = QKV.exec(part);
      if (q) {
        const target = `${prefix}.attn.in_proj_${param}`;
        const group = qkv.get(target) ?? {};
        group[q[1] as "q" | "k" | "v"] = key;
        qkv.set(target, group);
        continue;
      }
    }
    throw new ClipError(
      `${source}: '${key}' is not a key of a transformers CLIPModel checkpoint this tool can map to open_clip.`,
    );
  }
  for (const [target, group] of qkv) {
    for (const part of ["q", "k", "v"] as const) {
      if (!group[part]) {
        const present = group.q ?? group.k ?? group.v;
        throw new ClipError(`${source}: '${present}' has no matching ${part}_proj; the checkpoint is incomplete.`);
      }
    }
    steps.push({ target, sources: [group.q!, group.k!, group.v!], op: "concat" });
  }
  return steps;
}

function stepShape(step: MappingStep, shapes: (key: string) => number[], source: string): number[] {
  const first = shapes(step.sources[0]);
  if (step.op === "copy") return [...first];
  if (step.op === "transpose") {
    if (first.length !== 2) {
      throw new ClipError(`${source}: '${step.sources[0]}' should be a matrix, got shape [${first}].`);
    }
    return [first[1], first[0]];
  }
  const parts = step.sources.map(shapes);
  for (const [i, s] of parts.entries()) {
    if (s.length !== first.length || s.some((d, j) => d !== first[j])) {
      throw new ClipError(
        `${source}: '${step.sources[i]}' has shape [${s}] but '${step.sources[0]}' has [${first}]; q, k, v must match.`,
      );
    }
  }
  return [first[0] * 3, ...first.slice(1)];
}

/** open_clip names and shapes for transformers shapes, without touching any data (to validate before reading). */
export function hfShapesToOpenClip(shapes: Map<string, number[]>, source = "checkpoint"): Map<string, number[]> {
  const out = new Map<string, number[]>();
  for (const step of planHfToOpenClip(shapes.keys(), source)) {
    out.set(
      step.target,
      stepShape(step, (k) => shapes.get(k)!, source),
    );
  }
  return out;
}

/** The data of a row-major [rows, cols] matrix as [cols, rows]. */
export function transpose2d(t: NamedTensor): Float32Array {
  const [rows, cols] = t.shape;
  const out = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) out[c * rows + r] = t.data[r * cols + c];
  return out;
}

/** Applies one step of a plan to its source tensors. */
export function applyMappingStep(step: MappingStep, sources: NamedTensor[], source = "checkpoint"): NamedTensor {
  const shape = stepShape(step, (k) => sources[step.sources.indexOf(k)].shape, source);
  if (step.op === "copy") return { shape, data: sources[0].data };
  if (step.op === "transpose") return { shape, data: transpose2d(sources[0]) };
  const data = new Float32Array(sources.reduce((a, s) => a + s.data.length, 0));
  let at = 0;
  for (const s of sources) {
    data.set(s.data, at);
    at += s.data.length;
  }
  return { shape, data };
}

/** Re-keys a transformers CLIPModel state dict to open_clip's names and layouts. */
export function hfToOpenClip(tensors: Map<string, NamedTensor>, source = "checkpoint"): Map<string, NamedTensor> {
  const out = new Map<string, NamedTensor>();
  for (const step of planHfToOpenClip(tensors.keys(), source)) {
    out.set(step.target, applyMappingStep(step, step.sources.map((k) => tensors.get(k)!), source));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// config.json and preprocessor_config.json

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** transformers' defaults for fields a CLIPConfig may leave out. */
const HF_TEXT_DEFAULTS = {
  vocab_size: 49408,
  hidden_size: 512,
  intermediate_size: 2048,
  num_hidden_layers: 12,
  num_attention_heads: 8,
  max_position_embeddings: 77,
  hidden_act: "quick_gelu",
  layer_norm_eps: 1e-5,
};
const HF_VISION_DEFAULTS = {
  hidden_size: 768,
  intermediate_size: 3072,
  num_hidden_layers: 12,
  num_attention_heads: 12,
  num_channels: 3,
  image_size: 224,
  patch_size: 32,
  hidden_act: "quick_gelu",
  layer_norm_eps: 1e-5,
};

/** Translates a transformers `CLIPModel` config.json into open_clip's config. */
export function hfConfigToClipConfig(json: unknown, source = "config.json"): ClipConfig {
  if (!isRecord(json)) throw new ClipError(`${source}: expected a JSON object.`);
  if (json.model_type !== undefined && json.model_type !== "clip") {
    throw new ClipError(
      `${source}: model_type is ${JSON.stringify(json.model_type)}; only "clip" (CLIPModel) checkpoints are supported.`,
    );
  }
  // Older transformers releases wrote the sub-configs under *_config_dict.
  const rawText = json.text_config ?? json.text_config_dict ?? {};
  const rawVision = json.vision_config ?? json.vision_config_dict ?? {};
  if (!isRecord(rawText)) throw new ClipError(`${source}: text_config must be an object.`);
  if (!isRecord(rawVision)) throw new ClipError(`${source}: vision_config must be an object.`);
  const text = { ...HF_TEXT_DEFAULTS, ...rawText } as Record<string, unknown>;
  const vision = { ...HF_VISION_DEFAULTS, ...rawVision } as Record<string, unknown>;

  const num = (obj: Record<string, unknown>, field: string, where: string): number => {
    const v = obj[field];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) {
      throw new ClipError(`${source}: ${where}.${field} must be a positive number, got ${JSON.stringify(v)}.`);
    }
    return v;
  };
  const activation = (obj: Record<string, unknown>, where: string): boolean => {
    const act = obj.hidden_act;
    if (act === "quick_gelu") return true;
    if (act === "gelu") return false;
    throw new ClipError(
      `${source}: ${where}.hidden_act is ${JSON.stringify(act)}; only "quick_gelu" and "gelu" are supported.`,
    );
  };
  for (const [obj, where] of [[text, "text_config"], [vision, "vision_config"]] as const) {
    if (obj.layer_norm_eps !== LAYER_NORM_EPS) {
      throw new ClipError(
        `${source}: ${where}.layer_norm_eps is ${obj.layer_norm_eps}; this tool's LayerNorm uses ${LAYER_NORM_EPS}.`,
      );
    }
  }
  if (vision.num_channels !== 3) {
    throw new ClipError(`${source}: vision_config.num_channels must be 3, got ${vision.num_channels}.`);
  }
  const textQuick = activation(text, "text_config");
  const visionQuick = activation(vision, "vision_config");
  if (textQuick !== visionQuick) {
    throw new ClipError(
      `${source}: text and vision towers use different activations (${text.hidden_act} vs ${vision.hidden_act}); not supported.`,
    );
  }

  const vWidth = num(vision, "hidden_size", "vision_config");
  const tWidth = num(text, "hidden_size", "text_config");
  const vHeads = num(vision, "num_attention_heads", "vision_config");
  const projection = json.projection_dim ?? 512;
  return parseClipConfig({
    embed_dim: projection,
    quick_gelu: textQuick,
    vision_cfg: {
      image_size: num(vision, "image_size", "vision_config"),
      layers: num(vision, "num_hidden_layers", "vision_config"),
      width: vWidth,
      patch_size: num(vision, "patch_size", "vision_config"),
      head_width: vWidth / vHeads,
      mlp_ratio: num(vision, "intermediate_size", "vision_config") / vWidth,
    },
    text_cfg: {
      context_length: num(text, "max_position_embeddings", "text_config"),
      vocab_size: num(text, "vocab_size", "text_config"),
      width: tWidth,
      heads: num(text, "num_attention_heads", "text_config"),
      layers: num(text, "num_hidden_layers", "text_config"),
      mlp_ratio: num(text, "intermediate_size", "text_config") / tWidth,
    },
  }, source);
}

/** Translates a transformers `CLIPImageProcessor` preprocessor_config.json into open_clip's preprocess settings. */
export function hfPreprocessToPreprocess(
  json: unknown,
  config: ClipConfig,
  source = "preprocessor_config.json",
): PreprocessConfig {
  if (!isRecord(json)) throw new ClipError(`${source}: expected a JSON object.`);
  // The model sees the centre crop; `size` is only the resize target before it (the same number for CLIP).
  const side = (v: unknown): unknown => {
    if (isRecord(v)) return v.height !== undefined && v.height === v.width ? v.height : v.shortest_edge ?? v.height;
    return v;
  };
  const size = json.do_center_crop === false ? side(json.size) : side(json.crop_size ?? json.size);
  const resample = json.resample ?? 3;
  // PIL's resample codes: 2 bilinear, 3 bicubic.
  const interpolation = resample === 3 ? "bicubic" : resample === 2 ? "bilinear" : undefined;
  if (!interpolation) {
    throw new ClipError(`${source}: resample ${JSON.stringify(resample)} is not supported (2 bilinear or 3 bicubic).`);
  }
  return parsePreprocessConfig(
    {
      size: size ?? config.vision_cfg.image_size,
      mean: json.image_mean ?? OPENAI_MEAN,
      std: json.image_std ?? OPENAI_STD,
      interpolation,
      resize_mode: "shortest",
    },
    config,
    source,
  );
}
