/**
 * CLIP model configurations as data, with open_clip's field names, so a config file written for open_clip (or found
 * in an open_clip hub repository as `open_clip_config.json` -> `model_cfg`) loads here unchanged.
 *
 * Two image towers are supported, told apart the way open_clip tells them apart: `vision_cfg.layers` is a number for
 * a ViT and a 4-array for the modified ResNet.
 */
import { ClipError } from "../errors.ts";
import vitB32 from "./configs/ViT-B-32.json" with { type: "json" };
import vitB16 from "./configs/ViT-B-16.json" with { type: "json" };
import vitL14 from "./configs/ViT-L-14.json" with { type: "json" };
import vitL14_336 from "./configs/ViT-L-14-336.json" with { type: "json" };
import rn50 from "./configs/RN50.json" with { type: "json" };
import rn101 from "./configs/RN101.json" with { type: "json" };
import rn50x4 from "./configs/RN50x4.json" with { type: "json" };
import emojiTiny from "./configs/emoji-tiny.json" with { type: "json" };
import testVitMicro from "./configs/test-vit-micro.json" with { type: "json" };
import testRnMicro from "./configs/test-rn-micro.json" with { type: "json" };

export interface ViTVisionConfig {
  image_size: number;
  layers: number;
  width: number;
  patch_size: number;
  /** heads = width / head_width. */
  head_width: number;
  mlp_ratio: number;
}

export interface ResNetVisionConfig {
  image_size: number;
  /** Bottleneck blocks in each of the four stages. */
  layers: [number, number, number, number];
  /** Stem width; the attention pool works on width * 32 channels with (width * 32) / head_width heads. */
  width: number;
  patch_size: null;
  head_width: number;
}

export type VisionConfig = ViTVisionConfig | ResNetVisionConfig;

export interface TextConfig {
  context_length: number;
  vocab_size: number;
  width: number;
  heads: number;
  layers: number;
  mlp_ratio: number;
}

export interface ClipConfig {
  embed_dim: number;
  /** QuickGELU (x * sigmoid(1.702 x)) instead of exact GELU in both towers' MLPs: what OpenAI's weights were trained with. */
  quick_gelu?: boolean;
  vision_cfg: VisionConfig;
  text_cfg: TextConfig;
}

/** How images are turned into model input, with open_clip's `preprocess_cfg` field names. */
export interface PreprocessConfig {
  size: number;
  mean: [number, number, number];
  std: [number, number, number];
  interpolation: "bicubic" | "bilinear";
  resize_mode: "shortest" | "squash" | "longest";
}

export const OPENAI_MEAN: [number, number, number] = [0.48145466, 0.4578275, 0.40821073];
export const OPENAI_STD: [number, number, number] = [0.26862954, 0.26130258, 0.27577711];
/** open_clip's LayerNorm uses PyTorch's default eps everywhere; it is not a config field there either. */
export const LAYER_NORM_EPS = 1e-5;

export const VISION_DEFAULTS = {
  head_width: 64,
  mlp_ratio: 4.0,
  patch_size: 16,
  image_size: 224,
  layers: 12,
  width: 768,
};
export const TEXT_DEFAULTS = {
  context_length: 77,
  vocab_size: 49408,
  width: 512,
  heads: 8,
  layers: 12,
  mlp_ratio: 4.0,
};

export function isResNetVision(vision: VisionConfig): vision is ResNetVisionConfig {
  return Array.isArray(vision.layers);
}

export function isViTVision(vision: VisionConfig): vision is ViTVisionConfig {
  return !Array.isArray(vision.layers);
}

/** Attention heads of the image tower (the ViT's blocks, or the ResNet's attention pool). */
export function visionHeads(vision: VisionConfig): number {
  return isResNetVision(vision)
    ? Math.floor((vision.width * 32) / vision.head_width)
    : Math.floor(vision.width / vision.head_width);
}

/** open_clip computes the MLP width as int(width * mlp_ratio). */
export function mlpWidth(width: number, mlpRatio: number): number {
  return Math.trunc(width * mlpRatio);
}

/** Patches along one side of the ViT grid. */
export function vitGridSize(vision: ViTVisionConfig): number {
  return Math.floor(vision.image_size / vision.patch_size);
}

export function defaultPreprocess(config: ClipConfig): PreprocessConfig {
  return {
    size: config.vision_cfg.image_size,
    mean: [...OPENAI_MEAN],
    std: [...OPENAI_STD],
    interpolation: "bicubic",
    resize_mode: "shortest",
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Built-in configs

const BUILTIN: Record<string, unknown> = {
  "ViT-B-32": vitB32,
  "ViT-B-16": vitB16,
  "ViT-L-14": vitL14,
  "ViT-L-14-336": vitL14_336,
  "RN50": rn50,
  "RN101": rn101,
  "RN50x4": rn50x4,
  "emoji-tiny": emojiTiny,
  "test-vit-micro": testVitMicro,
  "test-rn-micro": testRnMicro,
};

export function listModelConfigs(): string[] {
  return Object.keys(BUILTIN);
}

export function isBuiltinModelConfig(name: string): boolean {
  return Object.hasOwn(BUILTIN, name);
}

/**
 * A built-in config by name (see listModelConfigs) or a JSON file by path. The file may hold the config itself or an
 * open_clip hub config (`{model_cfg, preprocess_cfg}`), whose `model_cfg` is used. Defaults are filled in.
 */
export async function loadModelConfig(nameOrPath: string): Promise<ClipConfig> {
  if (isBuiltinModelConfig(nameOrPath)) return parseClipConfig(structuredClone(BUILTIN[nameOrPath]), nameOrPath);
  let text: string;
  try {
    text = await Deno.readTextFile(nameOrPath);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new ClipError(
        `model config '${nameOrPath}' is neither a built-in config (${
          listModelConfigs().join(", ")
        }) nor an existing file.`,
      );
    }
    throw new ClipError(`cannot read model config '${nameOrPath}': ${(e as Error).message}.`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    throw new ClipError(`model config '${nameOrPath}' is not valid JSON: ${(e as Error).message}.`);
  }
  if (isRecord(json) && "model_cfg" in json) json = json.model_cfg;
  return parseClipConfig(json, nameOrPath);
}

// ---------------------------------------------------------------------------------------------------------------
// Validation

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/**
 * Fields open_clip knows that change the architecture. Each is accepted only at the value open_clip defaults to
 * (the architecture implemented here); any other value is refused by name rather than silently ignored.
 */
const VISION_FIXED: Record<string, unknown[]> = {
  ls_init_value: [null],
  patch_dropout: [0],
  attentional_pool: [false],
  attn_pooler_queries: [256],
  attn_pooler_heads: [8],
  no_ln_pre: [false],
  pos_embed_type: ["learnable"],
  final_ln_after_pool: [false],
  pool_type: ["tok"],
  output_tokens: [false, true],
  act_kwargs: [null],
  norm_kwargs: [null],
  block_type: [null, "default"],
  qk_norm: [false],
  scaled_cosine_attn: [false],
  scale_heads: [false],
  scale_attn_inner: [false],
  scale_attn: [false],
  scale_fc: [false],
  timm_model_name: [null],
  timm_model_pretrained: [false],
  global_average_pool: [false],
  image_seq_len: [null],
};

const TEXT_FIXED: Record<string, unknown[]> = {
  text_arch: ["clip"],
  variable_text: [false],
  hf_tokenizer_name: [null],
  tokenizer_mode: [null],
  tokenizer_kwargs: [null],
  ls_init_value: [null],
  embed_cls: [false],
  pad_id: [0],
  bos_id: [null],
  eos_id: [null],
  no_causal_mask: [false],
  final_ln_after_pool: [false],
  pool_type: ["argmax"],
  proj_bias: [false],
  proj_type: ["linear"],
  output_tokens: [false, true],
  act_kwargs: [null],
  norm_kwargs: [null],
  block_type: [null, "default"],
  qk_norm: [false],
  scaled_cosine_attn: [false],
  scale_heads: [false],
  scale_attn_inner: [false],
  scale_attn: [false],
  scale_fc: [false],
  hf_model_name: [null],
};

const TOP_FIXED: Record<string, unknown[]> = {
  custom_text: [false],
  init_logit_bias: [null],
  nonscalar_logit_scale: [false],
  multimodal_cfg: [null],
};

/** Fields that only matter to open_clip's training or casting and do not change the weights' meaning. */
const TOP_IGNORED = new Set(["cast_dtype", "init_logit_scale", "output_dict"]);

class ConfigReader {
  constructor(readonly source: string) {}

  fail(field: string, expected: string, got: unknown): never {
    const shown = got === undefined ? "nothing" : JSON.stringify(got);
    throw new ClipError(`model config '${this.source}': ${field} must be ${expected}, got ${shown}.`);
  }

  positiveInt(obj: Record<string, unknown>, field: string, prefix: string, fallback?: number): number {
    const v = obj[field] === undefined ? fallback : obj[field];
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v <= 0) this.fail(prefix + field, "a positive integer", v);
    return v;
  }

  positiveNumber(obj: Record<string, unknown>, field: string, prefix: string, fallback?: number): number {
    const v = obj[field] === undefined ? fallback : obj[field];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) this.fail(prefix + field, "a positive number", v);
    return v;
  }

  /** Checks the fields that must keep their default and refuses anything not known at all. */
  restrict(
    obj: Record<string, unknown>,
    prefix: string,
    known: Set<string>,
    fixed: Record<string, unknown[]>,
    ignored = new Set<string>(),
  ) {
    for (const [key, value] of Object.entries(obj)) {
      if (known.has(key) || ignored.has(key)) continue;
      if (Object.hasOwn(fixed, key)) {
        const allowed = fixed[key];
        // Strict equality is enough: JSON's 0.0 parses to 0, and open_clip writes absent options as null.
        if (!allowed.includes(value)) {
          this.fail(
            prefix + key,
            `${allowed.map((a) => JSON.stringify(a)).join(" or ")} (other values are not supported)`,
            value,
          );
        }
        continue;
      }
      throw new ClipError(
        `model config '${this.source}': unknown field ${prefix}${key}; remove it or check its spelling.`,
      );
    }
  }
}

/** Validates a parsed JSON config and returns it with every default filled in. */
export function parseClipConfig(json: unknown, source = "config"): ClipConfig {
  const r: ConfigReader = new ConfigReader(source);
  if (!isRecord(json)) r.fail("the config", "a JSON object", json);
  r.restrict(json, "", new Set(["embed_dim", "quick_gelu", "vision_cfg", "text_cfg"]), TOP_FIXED, TOP_IGNORED);
  const embed_dim = r.positiveInt(json, "embed_dim", "");
  const quick = json.quick_gelu === undefined ? false : json.quick_gelu;
  if (typeof quick !== "boolean") r.fail("quick_gelu", "a boolean", quick);
  if (!isRecord(json.vision_cfg)) r.fail("vision_cfg", "an object", json.vision_cfg);
  if (!isRecord(json.text_cfg)) r.fail("text_cfg", "an object", json.text_cfg);
  return {
    embed_dim,
    quick_gelu: quick,
    vision_cfg: parseVision(r, json.vision_cfg),
    text_cfg: parseText(r, json.text_cfg),
  };
}

function parseImageSize(r: ConfigReader, v: Record<string, unknown>): number {
  const size = v.image_size === undefined ? VISION_DEFAULTS.image_size : v.image_size;
  if (Array.isArray(size)) {
    if (size.length === 2 && size[0] === size[1]) {
      return r.positiveInt({ image_size: size[0] }, "image_size", "vision_cfg.");
    }
    r.fail("vision_cfg.image_size", "an integer or a square [size, size] pair", size);
  }
  return r.positiveInt(v, "image_size", "vision_cfg.", VISION_DEFAULTS.image_size);
}

function parseVision(r: ConfigReader, v: Record<string, unknown>): VisionConfig {
  const p = "vision_cfg.";
  const known = new Set(["image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"]);
  r.restrict(v, p, known, VISION_FIXED);
  const image_size = parseImageSize(r, v);
  const width = r.positiveInt(v, "width", p, VISION_DEFAULTS.width);
  const head_width = r.positiveInt(v, "head_width", p, VISION_DEFAULTS.head_width);
  const layers = v.layers === undefined ? VISION_DEFAULTS.layers : v.layers;
  if (Array.isArray(layers)) {
    if (layers.length !== 4 || !layers.every((n) => Number.isSafeInteger(n) && n > 0)) {
      r.fail(p + "layers", "a positive integer (ViT) or an array of 4 positive integers (ResNet)", layers);
    }
    if (v.patch_size !== undefined && v.patch_size !== null) {
      r.fail(p + "patch_size", "null for a ResNet image tower", v.patch_size);
    }
    if (image_size % 32 !== 0) r.fail(p + "image_size", "a multiple of 32 for a ResNet image tower", image_size);
    if ((width * 32) % head_width !== 0) {
      r.fail(p + "head_width", `a divisor of width * 32 = ${width * 32}`, head_width);
    }
    if (width % 2 !== 0) r.fail(p + "width", "an even integer for a ResNet image tower (the stem halves it)", width);
    return { image_size, layers: layers as [number, number, number, number], width, patch_size: null, head_width };
  }
  if (typeof layers !== "number" || !Number.isSafeInteger(layers) || layers <= 0) {
    r.fail(p + "layers", "a positive integer (ViT) or an array of 4 positive integers (ResNet)", layers);
  }
  const patch_size = r.positiveInt(v, "patch_size", p, VISION_DEFAULTS.patch_size);
  const mlp_ratio = r.positiveNumber(v, "mlp_ratio", p, VISION_DEFAULTS.mlp_ratio);
  if (width % head_width !== 0) r.fail(p + "head_width", `a divisor of width = ${width}`, head_width);
  if (image_size % patch_size !== 0) r.fail(p + "patch_size", `a divisor of image_size = ${image_size}`, patch_size);
  return { image_size, layers, width, patch_size, head_width, mlp_ratio };
}

function parseText(r: ConfigReader, t: Record<string, unknown>): TextConfig {
  const p = "text_cfg.";
  const known = new Set(["context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"]);
  r.restrict(t, p, known, TEXT_FIXED);
  const context_length = r.positiveInt(t, "context_length", p, TEXT_DEFAULTS.context_length);
  const vocab_size = r.positiveInt(t, "vocab_size", p, TEXT_DEFAULTS.vocab_size);
  const width = r.positiveInt(t, "width", p, TEXT_DEFAULTS.width);
  const heads = r.positiveInt(t, "heads", p, TEXT_DEFAULTS.heads);
  const layers = r.positiveInt(t, "layers", p, TEXT_DEFAULTS.layers);
  const mlp_ratio = r.positiveNumber(t, "mlp_ratio", p, TEXT_DEFAULTS.mlp_ratio);
  if (width % heads !== 0) r.fail(p + "heads", `a divisor of width = ${width}`, heads);
  return { context_length, vocab_size, width, heads, layers, mlp_ratio };
}

/** Validates a parsed `preprocess_cfg`, filling what it leaves out from the model config as open_clip does. */
export function parsePreprocessConfig(json: unknown, config: ClipConfig, source = "preprocess_cfg"): PreprocessConfig {
  const out = defaultPreprocess(config);
  if (json === undefined || json === null) return out;
  const fail = (field: string, expected: string, got: unknown): never => {
    throw new ClipError(`${source}: ${field} must be ${expected}, got ${JSON.stringify(got)}.`);
  };
  if (!isRecord(json)) fail("preprocess_cfg", "an object", json);
  const j = json as Record<string, unknown>;
  if (j.size !== undefined) {
    const size = Array.isArray(j.size) && j.size.length === 2 && j.size[0] === j.size[1] ? j.size[0] : j.size;
    if (typeof size !== "number" || !Number.isSafeInteger(size) || size <= 0) {
      fail("size", "a positive integer", j.size);
    }
    out.size = size;
  }
  for (const field of ["mean", "std"] as const) {
    const v = j[field];
    if (v === undefined) continue;
    if (!Array.isArray(v) || v.length !== 3 || !v.every((x) => typeof x === "number" && Number.isFinite(x))) {
      fail(field, "an array of 3 numbers", v);
    }
    if (field === "std" && (v as number[]).some((x) => x <= 0)) fail(field, "3 positive numbers", v);
    out[field] = [...(v as number[])] as [number, number, number];
  }
  if (j.interpolation !== undefined) {
    if (j.interpolation !== "bicubic" && j.interpolation !== "bilinear") {
      fail("interpolation", `"bicubic" or "bilinear"`, j.interpolation);
    }
    out.interpolation = j.interpolation as PreprocessConfig["interpolation"];
  }
  if (j.resize_mode !== undefined) {
    const modes = ["shortest", "squash", "longest"];
    if (typeof j.resize_mode !== "string" || !modes.includes(j.resize_mode)) {
      fail("resize_mode", `one of ${modes.join(", ")}`, j.resize_mode);
    }
    out.resize_mode = j.resize_mode as PreprocessConfig["resize_mode"];
  }
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// State dict shapes

function addLayerNorm(shapes: Map<string, number[]>, prefix: string, width: number) {
  shapes.set(`${prefix}.weight`, [width]);
  shapes.set(`${prefix}.bias`, [width]);
}

function addLinear(shapes: Map<string, number[]>, prefix: string, inFeatures: number, outFeatures: number) {
  shapes.set(`${prefix}.weight`, [outFeatures, inFeatures]);
  shapes.set(`${prefix}.bias`, [outFeatures]);
}

/** open_clip's `Transformer` of `ResidualAttentionBlock`s (pre-LN, nn.MultiheadAttention with packed q|k|v rows). */
function addTransformer(
  shapes: Map<string, number[]>,
  prefix: string,
  width: number,
  layers: number,
  mlpRatio: number,
) {
  const mlp = mlpWidth(width, mlpRatio);
  for (let i = 0; i < layers; i++) {
    const b = `${prefix}.resblocks.${i}`;
    addLayerNorm(shapes, `${b}.ln_1`, width);
    shapes.set(`${b}.attn.in_proj_weight`, [3 * width, width]);
    shapes.set(`${b}.attn.in_proj_bias`, [3 * width]);
    addLinear(shapes, `${b}.attn.out_proj`, width, width);
    addLayerNorm(shapes, `${b}.ln_2`, width);
    addLinear(shapes, `${b}.mlp.c_fc`, width, mlp);
    addLinear(shapes, `${b}.mlp.c_proj`, mlp, width);
  }
}

/** BatchNorm2d: affine parameters plus the running statistics (buffers; num_batches_tracked is an integer and left out). */
function addBatchNorm(shapes: Map<string, number[]>, prefix: string, channels: number) {
  for (const name of ["weight", "bias", "running_mean", "running_var"]) shapes.set(`${prefix}.${name}`, [channels]);
}

function addConv(shapes: Map<string, number[]>, key: string, inCh: number, outCh: number, kernel: number) {
  shapes.set(key, [outCh, inCh, kernel, kernel]);
}

function addVisionViT(shapes: Map<string, number[]>, v: ViTVisionConfig, embedDim: number) {
  const grid = vitGridSize(v);
  addConv(shapes, "visual.conv1.weight", 3, v.width, v.patch_size);
  shapes.set("visual.class_embedding", [v.width]);
  shapes.set("visual.positional_embedding", [grid * grid + 1, v.width]);
  addLayerNorm(shapes, "visual.ln_pre", v.width);
  addTransformer(shapes, "visual.transformer", v.width, v.layers, v.mlp_ratio);
  addLayerNorm(shapes, "visual.ln_post", v.width);
  shapes.set("visual.proj", [v.width, embedDim]);
}

const BOTTLENECK_EXPANSION = 4;

function addVisionResNet(shapes: Map<string, number[]>, v: ResNetVisionConfig, embedDim: number) {
  const half = v.width / 2;
  addConv(shapes, "visual.conv1.weight", 3, half, 3);
  addBatchNorm(shapes, "visual.bn1", half);
  addConv(shapes, "visual.conv2.weight", half, half, 3);
  addBatchNorm(shapes, "visual.bn2", half);
  addConv(shapes, "visual.conv3.weight", half, v.width, 3);
  addBatchNorm(shapes, "visual.bn3", v.width);
  let inplanes = v.width;
  for (let stage = 0; stage < 4; stage++) {
    const planes = v.width * 2 ** stage;
    const stride = stage === 0 ? 1 : 2;
    for (let block = 0; block < v.layers[stage]; block++) {
      const b = `visual.layer${stage + 1}.${block}`;
      const out = planes * BOTTLENECK_EXPANSION;
      addConv(shapes, `${b}.conv1.weight`, inplanes, planes, 1);
      addBatchNorm(shapes, `${b}.bn1`, planes);
      addConv(shapes, `${b}.conv2.weight`, planes, planes, 3);
      addBatchNorm(shapes, `${b}.bn2`, planes);
      addConv(shapes, `${b}.conv3.weight`, planes, out, 1);
      addBatchNorm(shapes, `${b}.bn3`, out);
      // Only the first block of a stage changes resolution or channel count, so only it has a projection shortcut.
      if (block === 0 && (stride > 1 || inplanes !== out)) {
        addConv(shapes, `${b}.downsample.0.weight`, inplanes, out, 1);
        addBatchNorm(shapes, `${b}.downsample.1`, out);
      }
      inplanes = out;
    }
  }
  const poolDim = v.width * 32;
  const spatial = v.image_size / 32;
  shapes.set("visual.attnpool.positional_embedding", [spatial * spatial + 1, poolDim]);
  addLinear(shapes, "visual.attnpool.k_proj", poolDim, poolDim);
  addLinear(shapes, "visual.attnpool.q_proj", poolDim, poolDim);
  addLinear(shapes, "visual.attnpool.v_proj", poolDim, poolDim);
  addLinear(shapes, "visual.attnpool.c_proj", poolDim, embedDim);
}

/**
 * Every floating-point tensor of open_clip's `CLIP.state_dict()` for this config, by key, with its shape. This is what
 * a checkpoint is validated against. BatchNorm running statistics are included (they are in the state dict);
 * the integer `num_batches_tracked` counters are not.
 */
export function expectedShapes(cfg: ClipConfig): Map<string, number[]> {
  const shapes = new Map<string, number[]>();
  const t = cfg.text_cfg;
  shapes.set("positional_embedding", [t.context_length, t.width]);
  addTransformer(shapes, "transformer", t.width, t.layers, t.mlp_ratio);
  shapes.set("token_embedding.weight", [t.vocab_size, t.width]);
  addLayerNorm(shapes, "ln_final", t.width);
  shapes.set("text_projection", [t.width, cfg.embed_dim]);
  shapes.set("logit_scale", []);
  if (isResNetVision(cfg.vision_cfg)) addVisionResNet(shapes, cfg.vision_cfg, cfg.embed_dim);
  else addVisionViT(shapes, cfg.vision_cfg, cfg.embed_dim);
  return shapes;
}

/** True for state-dict tensors that are buffers rather than trainable parameters (BatchNorm running statistics). */
export function isBufferKey(key: string): boolean {
  return key.endsWith(".running_mean") || key.endsWith(".running_var");
}

export function numel(shape: readonly number[]): number {
  let n = 1;
  for (const d of shape) n *= d;
  return n;
}

/** The number of trainable parameters, as open_clip counts them: sum(p.numel() for p in model.parameters()). */
export function countParameters(cfg: ClipConfig): number {
  let total = 0;
  for (const [key, shape] of expectedShapes(cfg)) if (!isBufferKey(key)) total += numel(shape);
  return total;
}
