/**
 * Fuzz target: model and preprocessing configs, open_clip's (model_cfg, preprocess_cfg) and transformers'
 * (config.json, preprocessor_config.json). Inputs are valid configs with a field removed, given a value of another
 * type, an unknown field added, a sub-config replaced, or the JSON text edited and read through loadModelConfig.
 * Each ends in a config whose numbers are all positive, or in a ClipError naming the field.
 */
import type { Rng } from "../data/rng.ts";
import { hfConfigToClipConfig, hfPreprocessToPreprocess } from "../io/hf_keys.ts";
import {
  type ClipConfig,
  countParameters,
  loadModelConfig,
  parseClipConfig,
  parsePreprocessConfig,
} from "../nn/config.ts";
import { type Accepted, type FuzzInput, type FuzzTarget, InvariantError } from "./fuzz_target.ts";
import { mutateBytes, pick } from "./mutate.ts";

type Flavour = "open_clip" | "open_clip_preprocess" | "hf" | "hf_preprocess" | "file";

interface Case {
  flavour: Flavour;
  json?: unknown;
  text?: string;
}

interface State {
  bases: Record<Exclude<Flavour, "file">, unknown[]>;
  base: ClipConfig;
  tmpDir: string;
}

async function prepare(): Promise<State> {
  const names = ["test-vit-micro", "test-rn-micro", "ViT-B-32", "RN50"];
  const configs = await Promise.all(names.map((n) => loadModelConfig(n)));
  const hfVision = {
    hidden_size: 64,
    intermediate_size: 256,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    num_channels: 3,
    image_size: 32,
    patch_size: 8,
    hidden_act: "quick_gelu",
    layer_norm_eps: 1e-5,
  };
  const hfText = {
    vocab_size: 49408,
    hidden_size: 64,
    intermediate_size: 256,
    num_hidden_layers: 2,
    num_attention_heads: 2,
    max_position_embeddings: 77,
    hidden_act: "quick_gelu",
    layer_norm_eps: 1e-5,
  };
  return {
    bases: {
      open_clip: configs,
      open_clip_preprocess: [{
        size: 224,
        mean: [0.48, 0.45, 0.4],
        std: [0.26, 0.26, 0.27],
        interpolation: "bicubic",
        resize_mode: "shortest",
      }, { size: [32, 32] }],
      hf: [{ model_type: "clip", projection_dim: 32, text_config: hfText, vision_config: hfVision }],
      hf_preprocess: [{
        crop_size: { height: 32, width: 32 },
        do_center_crop: true,
        image_mean: [0.48, 0.45, 0.4],
        image_std: [0.26, 0.26, 0.27],
        resample: 3,
        size: { shortest_edge: 32 },
      }],
    },
    base: configs[0],
    tmpDir: await Deno.makeTempDir({ prefix: "clip-fuzz-config-" }),
  };
}

const WRONG_VALUES: unknown[] = ["12", "", -1, 0, 1.5, true, null, [], [1, 2], {}, { a: 1 }, 1e300, -0, "bicubic"];

/** Paths to every value in a JSON tree, objects and arrays included. */
function paths(value: unknown, prefix: (string | number)[] = []): (string | number)[][] {
  const out: (string | number)[][] = [prefix];
  if (Array.isArray(value)) value.forEach((v, i) => out.push(...paths(v, [...prefix, i])));
  else if (typeof value === "object" && value !== null) {
    for (const [k, v] of Object.entries(value)) out.push(...paths(v, [...prefix, k]));
  }
  return out;
}

/** Replaces (or with `remove`, deletes) the value at `path`; the root is replaced by returning the new value. */
function edit(root: unknown, path: (string | number)[], value: unknown, remove = false): unknown {
  if (path.length === 0) return value;
  let node = root as Record<string | number, unknown>;
  for (const key of path.slice(0, -1)) node = node[key] as Record<string | number, unknown>;
  const last = path[path.length - 1];
  if (remove) {
    if (Array.isArray(node)) node.splice(last as number, 1);
    else delete node[last];
  } else node[last] = value;
  return root;
}

function generate(s: State, rng: Rng): FuzzInput<Case> {
  const flavour = pick(rng, ["open_clip", "open_clip_preprocess", "hf", "hf_preprocess", "file"] as const);
  if (flavour === "file") {
    const json = { model_cfg: structuredClone(pick(rng, s.bases.open_clip)) };
    const text = new TextDecoder().decode(mutateBytes(rng, new TextEncoder().encode(JSON.stringify(json)), 6));
    return { kind: "file:edited-text", value: { flavour, text }, bytes: text.length };
  }
  let json = structuredClone(pick(rng, s.bases[flavour]));
  const all = paths(json);
  const path = pick(rng, all);
  let kind: string;
  switch (rng.int(4)) {
    case 0:
      json = path.length > 0 ? edit(json, path, undefined, true) : {};
      kind = "missing-field";
      break;
    case 1:
      json = edit(json, path, structuredClone(pick(rng, WRONG_VALUES)));
      kind = "wrong-type";
      break;
    case 2: {
      const parent = pick(
        rng,
        all.filter((p) => {
          const v = p.reduce<unknown>((n, k) => (n as Record<string | number, unknown>)[k], json);
          return typeof v === "object" && v !== null && !Array.isArray(v);
        }),
      );
      json = edit(json, [...parent, pick(rng, ["extra", "patch_dropout", "pool_type", "__proto__"])], 1);
      kind = "extra-field";
      break;
    }
    default:
      for (let k = 0; k < 3; k++) json = edit(json, pick(rng, paths(json)), structuredClone(pick(rng, WRONG_VALUES)));
      kind = "several-wrong";
  }
  return { kind: `${flavour}:${kind}`, value: { flavour, json }, bytes: JSON.stringify(json ?? null)?.length ?? 4 };
}

function checkConfig(c: ClipConfig): void {
  const numbers = [
    c.embed_dim,
    c.vision_cfg.image_size,
    c.vision_cfg.width,
    c.vision_cfg.head_width,
    c.text_cfg.context_length,
    c.text_cfg.vocab_size,
    c.text_cfg.width,
    c.text_cfg.heads,
    c.text_cfg.layers,
  ];
  if (!numbers.every((n) => Number.isSafeInteger(n) && n > 0)) {
    throw new InvariantError(`accepted a config with a non-positive size: ${JSON.stringify(c)}`);
  }
  if (!Number.isFinite(countParameters(c))) throw new InvariantError("accepted a config whose size is not finite");
}

async function run(s: State, input: Case): Promise<Accepted> {
  switch (input.flavour) {
    case "open_clip":
      checkConfig(parseClipConfig(input.json, "fuzz config"));
      break;
    case "open_clip_preprocess": {
      const p = parsePreprocessConfig(input.json, s.base, "fuzz preprocess_cfg");
      if (!Number.isSafeInteger(p.size) || p.size <= 0 || !p.std.every((x) => x > 0)) {
        throw new InvariantError(`accepted a preprocess config with size ${p.size}, std ${p.std}`);
      }
      break;
    }
    case "hf":
      checkConfig(hfConfigToClipConfig(input.json, "fuzz config.json"));
      break;
    case "hf_preprocess":
      hfPreprocessToPreprocess(input.json, s.base, "fuzz preprocessor_config.json");
      break;
    case "file": {
      const path = `${s.tmpDir}/config.json`;
      await Deno.writeTextFile(path, input.text!);
      checkConfig(await loadModelConfig(path));
    }
  }
  return "accepted";
}

export const configTarget: FuzzTarget<State, Case> = {
  name: "config",
  refusals: ["ClipError"],
  prepare,
  generate,
  run,
};
