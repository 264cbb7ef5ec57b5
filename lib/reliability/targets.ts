/** The fuzz targets by name. */
import type { FuzzTarget } from "./fuzz_target.ts";
import { configTarget } from "./target_config.ts";
import { imageTarget } from "./target_image.ts";
import { safetensorsTarget } from "./target_safetensors.ts";
import { tarTarget } from "./target_tar.ts";
import { tokenizerTarget } from "./target_tokenizer.ts";

export const FUZZ_TARGETS = {
  tar: tarTarget,
  safetensors: safetensorsTarget,
  tokenizer: tokenizerTarget,
  image: imageTarget,
  config: configTarget,
} as const;

export type FuzzTargetName = keyof typeof FUZZ_TARGETS;

export const FUZZ_TARGET_NAMES = Object.keys(FUZZ_TARGETS) as FuzzTargetName[];

// deno-lint-ignore no-explicit-any
export function fuzzTarget(name: FuzzTargetName): FuzzTarget<any, any> {
  return FUZZ_TARGETS[name];
}
