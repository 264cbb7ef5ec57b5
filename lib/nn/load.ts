import type { Gpu } from "../gpu/runtime.ts";
import { loadStateDict } from "../io/checkpoint_layout.ts";
import { resolveModel } from "../io/pretrained.ts";
import type { HubOptions } from "../io/hub.ts";
import { ClipModel } from "./clip.ts";
import type { PreprocessConfig } from "./config.ts";

export interface LoadedModel {
  model: ClipModel;
  preprocess: PreprocessConfig;
  /** Where the weights came from, or `init(seed)` for a fresh model. */
  source: string;
}

/**
 * A model from anything users name: a built-in config or config JSON (freshly initialised from `seed`), a checkpoint
 * folder (open_clip or Hugging Face layout, or a training run's folder), `hf-hub:ORG/NAME` or a pretrained tag.
 */
export async function loadModel(
  gpu: Gpu,
  spec: string,
  opts: { seed?: number; hub?: HubOptions } = {},
): Promise<LoadedModel> {
  const resolved = await resolveModel(spec, opts.hub);
  if (!resolved.weightsPath) {
    const seed = opts.seed ?? 0;
    return {
      model: ClipModel.init(gpu, resolved.config, seed),
      preprocess: resolved.preprocess,
      source: `init(${seed})`,
    };
  }
  const state = await loadStateDict(resolved);
  return {
    model: ClipModel.fromStateDict(gpu, resolved.config, state),
    preprocess: resolved.preprocess,
    source: resolved.source,
  };
}
