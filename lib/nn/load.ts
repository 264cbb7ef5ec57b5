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
 * `inference` readies it for forward passes only (`ClipModel.forInference`).
 */
export async function loadModel(
  gpu: Gpu,
  spec: string,
  opts: { seed?: number; hub?: HubOptions; inference?: boolean } = {},
): Promise<LoadedModel> {
  const resolved = await resolveModel(spec, opts.hub);
  const seed = opts.seed ?? 0;
  const model = resolved.weightsPath
    ? ClipModel.fromStateDict(gpu, resolved.config, await loadStateDict(resolved))
    : ClipModel.init(gpu, resolved.config, seed);
  if (opts.inference) model.forInference();
  return {
    model,
    preprocess: resolved.preprocess,
    source: resolved.weightsPath ? resolved.source : `init(${seed})`,
  };
}
