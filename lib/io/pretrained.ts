/**
 * Turning what a user types after `--model` into a checkpoint:
 *
 *   ViT-B-32                   a built-in config, weights to be initialised
 *   ViT-B-32:openai            a pretrained tag: the built-in config plus published weights (open_clip's names)
 *   hf-hub:ORG/NAME[@REV]      a hub repository in open_clip's layout, else in transformers' layout
 *   path/to/dir, x.safetensors, x.json    a local checkpoint or config
 */
import { ClipError, UsageError } from "../errors.ts";
import {
  type ClipConfig,
  defaultPreprocess,
  isBuiltinModelConfig,
  listModelConfigs,
  loadModelConfig,
  type PreprocessConfig,
} from "../nn/config.ts";
import {
  detectCheckpointNaming,
  HF_CONFIG,
  HF_PREPROCESSOR,
  HF_WEIGHTS,
  OPEN_CLIP_CONFIG,
  OPEN_CLIP_WEIGHTS,
  resolveCheckpoint,
  type ResolvedCheckpoint,
} from "./checkpoint_layout.ts";
import { hubDownload, HubNotCachedError, HubNotFoundError, type HubOptions } from "./hub.ts";

export interface PretrainedEntry {
  /** Hub repository holding open_clip_config.json + open_clip_model.safetensors. */
  hub: string;
  /** OpenAI's weights (and some others) were trained with QuickGELU; open_clip's base configs say GELU. */
  quick_gelu?: boolean;
  mean?: [number, number, number];
  std?: [number, number, number];
}

const INCEPTION: [number, number, number] = [0.5, 0.5, 0.5];

/** Published weights by architecture and tag, as open_clip's pretrained table names them. */
export const PRETRAINED: Record<string, Record<string, PretrainedEntry>> = {
  "RN50": {
    openai: { hub: "timm/resnet50_clip.openai", quick_gelu: true },
    yfcc15m: { hub: "timm/resnet50_clip.yfcc15m", quick_gelu: true },
    cc12m: { hub: "timm/resnet50_clip.cc12m", quick_gelu: true },
  },
  "RN101": {
    openai: { hub: "timm/resnet101_clip.openai", quick_gelu: true },
    yfcc15m: { hub: "timm/resnet101_clip.yfcc15m", quick_gelu: true },
  },
  "RN50x4": {
    openai: { hub: "timm/resnet50x4_clip.openai", quick_gelu: true },
  },
  "ViT-B-32": {
    openai: { hub: "timm/vit_base_patch32_clip_224.openai", quick_gelu: true },
    laion400m_e31: { hub: "timm/vit_base_patch32_clip_224.laion400m_e31", quick_gelu: true },
    laion400m_e32: { hub: "timm/vit_base_patch32_clip_224.laion400m_e32", quick_gelu: true },
    laion2b_e16: { hub: "timm/vit_base_patch32_clip_224.laion2b_e16" },
    laion2b_s34b_b79k: { hub: "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" },
    datacomp_xl_s13b_b90k: { hub: "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K" },
    metaclip_400m: { hub: "timm/vit_base_patch32_clip_224.metaclip_400m", quick_gelu: true },
    metaclip_fullcc: { hub: "timm/vit_base_patch32_clip_224.metaclip_2pt5b", quick_gelu: true },
  },
  "ViT-B-16": {
    openai: { hub: "timm/vit_base_patch16_clip_224.openai", quick_gelu: true },
    laion400m_e31: { hub: "timm/vit_base_patch16_clip_224.laion400m_e31" },
    laion400m_e32: { hub: "timm/vit_base_patch16_clip_224.laion400m_e32" },
    laion2b_s34b_b88k: { hub: "laion/CLIP-ViT-B-16-laion2B-s34B-b88K" },
    datacomp_xl_s13b_b90k: { hub: "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K" },
    dfn2b: { hub: "apple/DFN2B-CLIP-ViT-B-16", quick_gelu: true },
    metaclip_400m: { hub: "timm/vit_base_patch16_clip_224.metaclip_400m", quick_gelu: true },
    metaclip_fullcc: { hub: "timm/vit_base_patch16_clip_224.metaclip_2pt5b", quick_gelu: true },
  },
  "ViT-L-14": {
    openai: { hub: "timm/vit_large_patch14_clip_224.openai", quick_gelu: true },
    laion400m_e31: { hub: "timm/vit_large_patch14_clip_224.laion400m_e31" },
    laion400m_e32: { hub: "timm/vit_large_patch14_clip_224.laion400m_e32" },
    laion2b_s32b_b82k: { hub: "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", mean: INCEPTION, std: INCEPTION },
    datacomp_xl_s13b_b90k: { hub: "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K" },
    dfn2b: { hub: "apple/DFN2B-CLIP-ViT-L-14", quick_gelu: true },
    metaclip_400m: { hub: "timm/vit_large_patch14_clip_224.metaclip_400m", quick_gelu: true },
    metaclip_fullcc: { hub: "timm/vit_large_patch14_clip_224.metaclip_2pt5b", quick_gelu: true },
  },
  "ViT-L-14-336": {
    openai: { hub: "timm/vit_large_patch14_clip_336.openai", quick_gelu: true },
  },
};

export function listPretrained(): string[] {
  return Object.entries(PRETRAINED).flatMap(([arch, tags]) => Object.keys(tags).map((tag) => `${arch}:${tag}`));
}

export interface PretrainedTag extends PretrainedEntry {
  arch: string;
  tag: string;
}

/** The entry for `ARCH:TAG`, null when the text is not of that form with a known architecture, UsageError for an unknown tag. */
export function lookupPretrained(spec: string): PretrainedTag | null {
  const colon = spec.indexOf(":");
  if (colon <= 0) return null;
  const arch = spec.slice(0, colon);
  const tag = spec.slice(colon + 1);
  const tags = PRETRAINED[arch];
  if (!tags) return null;
  const entry = tags[tag];
  if (!entry) {
    throw new UsageError(`unknown pretrained tag '${tag}' for ${arch}; available: ${Object.keys(tags).join(", ")}.`);
  }
  return { arch, tag, ...entry };
}

/** Config and preprocessing for a pretrained tag: the architecture's built-in config with the tag's activation and normalisation. */
export async function pretrainedConfig(
  entry: PretrainedTag,
): Promise<{ config: ClipConfig; preprocess: PreprocessConfig }> {
  const config = await loadModelConfig(entry.arch);
  config.quick_gelu = entry.quick_gelu ?? false;
  const preprocess = defaultPreprocess(config);
  if (entry.mean) preprocess.mean = [...entry.mean];
  if (entry.std) preprocess.std = [...entry.std];
  return { config, preprocess };
}

function parentDir(path: string): string {
  return path.slice(0, path.lastIndexOf("/"));
}

/** Fetches `file`, or returns null when the hub (or, offline, the cache) does not have it. */
async function tryDownload(repo: string, file: string, options: HubOptions): Promise<string | null> {
  try {
    return await hubDownload(repo, file, options);
  } catch (e) {
    if (e instanceof HubNotFoundError && e.what === "file") return null;
    if (e instanceof HubNotCachedError) return null;
    throw e;
  }
}

/**
 * Downloads a hub repository's checkpoint into the cache: open_clip's layout if the repository has it, else
 * transformers' layout. Returns it resolved from the cached snapshot folder.
 */
export async function downloadHubCheckpoint(repo: string, options: HubOptions = {}): Promise<ResolvedCheckpoint> {
  const openClipConfig = await tryDownload(repo, OPEN_CLIP_CONFIG, options);
  if (openClipConfig) {
    const weights = await tryDownload(repo, OPEN_CLIP_WEIGHTS, options);
    if (!weights) {
      throw new ClipError(
        `hub repository ${repo} has ${OPEN_CLIP_CONFIG} but no ${OPEN_CLIP_WEIGHTS} (pickled .bin weights are not read)${
          options.offline ? "; it is not in the cache and offline mode is on" : ""
        }.`,
      );
    }
    return { ...await resolveCheckpoint(parentDir(openClipConfig)), source: `hf-hub:${repo}` };
  }
  const hfConfig = await tryDownload(repo, HF_CONFIG, options);
  if (!hfConfig) {
    // Say why: re-run the first lookup to surface the hub's or the cache's own error.
    await hubDownload(repo, OPEN_CLIP_CONFIG, options);
    throw new ClipError(
      `hub repository ${repo} has neither ${OPEN_CLIP_CONFIG} nor ${HF_CONFIG}; it is not a CLIP checkpoint.`,
    );
  }
  const weights = await tryDownload(repo, HF_WEIGHTS, options);
  if (!weights) {
    throw new ClipError(
      `hub repository ${repo} has ${HF_CONFIG} but no ${HF_WEIGHTS} (pickled .bin weights are not read).`,
    );
  }
  await tryDownload(repo, HF_PREPROCESSOR, options);
  return { ...await resolveCheckpoint(parentDir(hfConfig)), source: `hf-hub:${repo}` };
}

const HF_HUB_PREFIX = "hf-hub:";

/**
 * Resolves a `--model` value. Built-in names and pretrained tags come first; anything else must be an existing
 * path. Pretrained tags and hf-hub repositories are downloaded into the cache (see hub.ts).
 */
export async function resolveModel(spec: string, options: HubOptions = {}): Promise<ResolvedCheckpoint> {
  if (spec.startsWith(HF_HUB_PREFIX)) {
    const rest = spec.slice(HF_HUB_PREFIX.length);
    const at = rest.indexOf("@");
    const repo = at < 0 ? rest : rest.slice(0, at);
    const revision = at < 0 ? options.revision : rest.slice(at + 1);
    if (!/^[^/]+\/[^/]+$/.test(repo)) {
      throw new UsageError(`'${spec}': expected hf-hub:ORG/NAME (optionally @REVISION).`);
    }
    return downloadHubCheckpoint(repo, { ...options, revision });
  }

  const tag = lookupPretrained(spec);
  if (tag) {
    const { config, preprocess } = await pretrainedConfig(tag);
    const weightsPath = await hubDownload(tag.hub, OPEN_CLIP_WEIGHTS, options);
    return {
      config,
      preprocess,
      weightsPath,
      naming: await detectCheckpointNaming(weightsPath),
      source: `${spec} (${tag.hub})`,
    };
  }

  if (isBuiltinModelConfig(spec)) {
    const config = await loadModelConfig(spec);
    return { config, preprocess: defaultPreprocess(config), weightsPath: null, naming: "open_clip", source: spec };
  }

  try {
    await Deno.stat(spec);
  } catch (e) {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
    throw new UsageError(
      `unknown model '${spec}': not a built-in config (${listModelConfigs().join(", ")}), a pretrained tag such as ` +
        `ViT-B-32:openai (see the list of tags), hf-hub:ORG/NAME, or an existing path.`,
    );
  }
  return resolveCheckpoint(spec);
}
