/**
 * Checkpoint folders as they are published, and loading their weights under open_clip's names.
 *
 * Two layouts are read:
 * - open_clip's hub layout: `open_clip_config.json` (`{model_cfg, preprocess_cfg}`) + `open_clip_model.safetensors`;
 * - transformers' layout: `config.json` + `model.safetensors` (+ `preprocessor_config.json`), CLIPModel key names.
 * Whatever the layout, loadStateDict returns open_clip names checked against the shapes the config implies.
 */
import { ClipError } from "../errors.ts";
import {
  type ClipConfig,
  defaultPreprocess,
  expectedShapes,
  isResNetVision,
  parseClipConfig,
  parsePreprocessConfig,
  type PreprocessConfig,
} from "../nn/config.ts";
import {
  applyMappingStep,
  detectNaming,
  hfConfigToClipConfig,
  hfPreprocessToPreprocess,
  hfShapesToOpenClip,
  type NamedTensor,
  type Naming,
  planHfToOpenClip,
} from "./hf_keys.ts";
import {
  isFloatTensor,
  SafetensorsFile,
  temporarySibling,
  type WritableDtype,
  writeSafetensors,
} from "./safetensors.ts";

export const OPEN_CLIP_CONFIG = "open_clip_config.json";
export const OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors";
export const HF_CONFIG = "config.json";
export const HF_WEIGHTS = "model.safetensors";
export const HF_PREPROCESSOR = "preprocessor_config.json";

export interface ResolvedCheckpoint {
  config: ClipConfig;
  preprocess: PreprocessConfig;
  /** The safetensors file holding the weights, or null for a config alone (weights to be initialised). */
  weightsPath: string | null;
  naming: Naming;
  /** Where the checkpoint came from, for messages. */
  source: string;
}

export type StateDict = Map<string, NamedTensor>;

function join(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function dirname(path: string): string {
  const i = path.lastIndexOf("/");
  return i < 0 ? "." : i === 0 ? "/" : path.slice(0, i);
}

async function exists(path: string): Promise<boolean> {
  try {
    await Deno.stat(path);
    return true;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw e;
  }
}

async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await Deno.readTextFile(path);
  } catch (e) {
    throw new ClipError(`cannot read '${path}': ${(e as Error).message}.`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ClipError(`'${path}' is not valid JSON: ${(e as Error).message}.`);
  }
}

/** Float tensor names and shapes of an open file, with a `module.` prefix (left by data-parallel training) noted. */
function floatKeyShapes(file: SafetensorsFile): { shapes: Map<string, number[]>; prefix: string } {
  const keys = file.keys().filter((k) => isFloatTensor(file.info(k)));
  const prefix = keys.length > 0 && keys.every((k) => k.startsWith("module.")) ? "module." : "";
  return { shapes: new Map(keys.map((k) => [k.slice(prefix.length), file.info(k).shape])), prefix };
}

async function readKeyShapes(weightsPath: string): Promise<{ shapes: Map<string, number[]>; prefix: string }> {
  const file = await SafetensorsFile.open(weightsPath);
  try {
    return floatKeyShapes(file);
  } finally {
    file.close();
  }
}

/** Which naming a safetensors file's tensor names follow; a ClipError when neither. */
export async function detectCheckpointNaming(weightsPath: string): Promise<Naming> {
  const { shapes } = await readKeyShapes(weightsPath);
  const naming = detectNaming(shapes.keys());
  if (!naming) {
    throw new ClipError(
      `'${weightsPath}': its tensor names are neither open_clip's (visual.*, transformer.*) nor transformers' CLIPModel's (vision_model.*, text_model.*).`,
    );
  }
  return naming;
}

async function refusePickle(dir: string, names: string[]): Promise<void> {
  for (const name of names) {
    if (await exists(join(dir, name))) {
      throw new ClipError(
        `'${dir}' holds '${name}', a PyTorch pickle, and no safetensors weights; convert it to safetensors (safetensors.torch.save_file) first.`,
      );
    }
  }
}

async function resolveOpenClipDir(dir: string): Promise<ResolvedCheckpoint> {
  const configPath = join(dir, OPEN_CLIP_CONFIG);
  const json = await readJson(configPath);
  const hubConfig = (json ?? {}) as Record<string, unknown>;
  const config = parseClipConfig(hubConfig.model_cfg, `${configPath} model_cfg`);
  const preprocess = parsePreprocessConfig(hubConfig.preprocess_cfg, config, `${configPath} preprocess_cfg`);
  const weightsPath = join(dir, OPEN_CLIP_WEIGHTS);
  if (!await exists(weightsPath)) {
    await refusePickle(dir, ["open_clip_pytorch_model.bin"]);
    throw new ClipError(`'${dir}' has ${OPEN_CLIP_CONFIG} but no ${OPEN_CLIP_WEIGHTS}.`);
  }
  return { config, preprocess, weightsPath, naming: await detectCheckpointNaming(weightsPath), source: dir };
}

async function resolveHfDir(dir: string): Promise<ResolvedCheckpoint> {
  const configPath = join(dir, HF_CONFIG);
  const config = hfConfigToClipConfig(await readJson(configPath), configPath);
  const preprocessPath = join(dir, HF_PREPROCESSOR);
  const preprocess = await exists(preprocessPath)
    ? hfPreprocessToPreprocess(await readJson(preprocessPath), config, preprocessPath)
    : defaultPreprocess(config);
  const weightsPath = join(dir, HF_WEIGHTS);
  if (!await exists(weightsPath)) {
    if (await exists(join(dir, `${HF_WEIGHTS}.index.json`))) {
      throw new ClipError(
        `'${dir}' holds sharded weights (${HF_WEIGHTS}.index.json), which are not supported; merge them into one ${HF_WEIGHTS}.`,
      );
    }
    await refusePickle(dir, ["pytorch_model.bin"]);
    throw new ClipError(`'${dir}' has ${HF_CONFIG} but no ${HF_WEIGHTS}.`);
  }
  return { config, preprocess, weightsPath, naming: await detectCheckpointNaming(weightsPath), source: dir };
}

/**
 * What a checkpoint path holds: a folder in open_clip's or transformers' layout, a `.safetensors` file with either
 * config file beside it, or a JSON config alone (weightsPath null).
 */
export async function resolveCheckpoint(path: string): Promise<ResolvedCheckpoint> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.stat(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) throw new ClipError(`checkpoint '${path}' does not exist.`);
    throw new ClipError(`cannot read checkpoint '${path}': ${(e as Error).message}.`);
  }
  if (info.isDirectory) {
    if (await exists(join(path, OPEN_CLIP_CONFIG))) return resolveOpenClipDir(path);
    if (await exists(join(path, HF_CONFIG))) return resolveHfDir(path);
    throw new ClipError(
      `'${path}' is not a checkpoint folder: it has neither ${OPEN_CLIP_CONFIG} + ${OPEN_CLIP_WEIGHTS} nor ${HF_CONFIG} + ${HF_WEIGHTS}.`,
    );
  }
  if (path.endsWith(".safetensors")) {
    const dir = dirname(path);
    let base: ResolvedCheckpoint;
    if (await exists(join(dir, OPEN_CLIP_CONFIG))) {
      const json = (await readJson(join(dir, OPEN_CLIP_CONFIG)) ?? {}) as Record<string, unknown>;
      const config = parseClipConfig(json.model_cfg, join(dir, OPEN_CLIP_CONFIG));
      base = {
        config,
        preprocess: parsePreprocessConfig(json.preprocess_cfg, config),
        weightsPath: path,
        naming: "open_clip",
        source: path,
      };
    } else if (await exists(join(dir, HF_CONFIG))) {
      base = { ...await resolveHfDir(dir), weightsPath: path, source: path };
    } else {
      throw new ClipError(`'${path}' has no ${OPEN_CLIP_CONFIG} or ${HF_CONFIG} beside it to say what model it is.`);
    }
    return { ...base, naming: await detectCheckpointNaming(path) };
  }
  if (path.endsWith(".json")) {
    const json = await readJson(path);
    const wrapped = typeof json === "object" && json !== null && "model_cfg" in json;
    const record = json as Record<string, unknown>;
    const config = parseClipConfig(wrapped ? record.model_cfg : json, path);
    const preprocess = parsePreprocessConfig(wrapped ? record.preprocess_cfg : undefined, config, path);
    return { config, preprocess, weightsPath: null, naming: "open_clip", source: path };
  }
  throw new ClipError(`'${path}' is not a checkpoint: expected a folder, a .safetensors file or a .json config.`);
}

function describeArch(config: ClipConfig): string {
  return isResNetVision(config.vision_cfg) ? "ResNet CLIP" : "ViT CLIP";
}

const shapeText = (shape: readonly number[]) => `[${shape.join(", ")}]`;

/**
 * Checks a set of open_clip tensor shapes against what the config needs. The first problem found is reported with
 * the key and both shapes, plus how many more there are.
 */
export function validateShapes(shapes: Map<string, readonly number[]>, config: ClipConfig, source: string): void {
  const expected = expectedShapes(config);
  const problems: string[] = [];
  for (const [key, want] of expected) {
    const got = shapes.get(key);
    if (!got) problems.push(`tensor '${key}' (shape ${shapeText(want)}) is missing`);
    else if (got.length !== want.length || got.some((d, i) => d !== want[i])) {
      problems.push(`tensor '${key}' has shape ${shapeText(got)} but the config needs ${shapeText(want)}`);
    }
  }
  for (const [key, got] of shapes) {
    if (!expected.has(key)) {
      problems.push(`tensor '${key}' (shape ${shapeText(got)}) is not part of a ${describeArch(config)}`);
    }
  }
  if (problems.length === 0) return;
  const more = problems.length > 1 ? ` (and ${problems.length - 1} more problem${problems.length > 2 ? "s" : ""})` : "";
  throw new ClipError(
    `checkpoint '${source}' does not match its config: ${
      problems[0]
    }${more}; check that the config is the one these weights were trained with.`,
  );
}

/**
 * Reads every weight as float32 under open_clip's names, in expectedShapes order. Shapes are checked from the
 * header before any data is read. Integer tensors (BatchNorm's num_batches_tracked, position_ids) are skipped.
 */
export async function loadStateDict(resolved: ResolvedCheckpoint): Promise<StateDict> {
  if (!resolved.weightsPath) {
    throw new ClipError(`'${resolved.source}' is a config without weights; there is no state dict to load.`);
  }
  const path = resolved.weightsPath;
  const file = await SafetensorsFile.open(path);
  try {
    const { shapes, prefix } = floatKeyShapes(file);
    const read = async (key: string): Promise<NamedTensor> => ({
      shape: [...shapes.get(key)!],
      data: await file.readF32(prefix + key),
    });
    const loaded = new Map<string, NamedTensor>();
    if (resolved.naming === "hf") {
      validateShapes(hfShapesToOpenClip(shapes, path), resolved.config, path);
      for (const step of planHfToOpenClip(shapes.keys(), path)) {
        const sources: NamedTensor[] = [];
        for (const key of step.sources) sources.push(await read(key));
        loaded.set(step.target, applyMappingStep(step, sources, path));
      }
    } else {
      validateShapes(shapes, resolved.config, path);
      for (const key of shapes.keys()) loaded.set(key, await read(key));
    }
    const ordered: StateDict = new Map();
    for (const key of expectedShapes(resolved.config).keys()) ordered.set(key, loaded.get(key)!);
    return ordered;
  } finally {
    file.close();
  }
}

/**
 * Writes a checkpoint folder in open_clip's hub layout, which open_clip itself (and this tool) can load. A new
 * folder is assembled under a temporary name and renamed into place; an existing one has each file replaced
 * atomically, weights first.
 */
export async function saveHubLayout(
  dir: string,
  config: ClipConfig,
  preprocess: PreprocessConfig,
  tensors: StateDict | Record<string, NamedTensor>,
  options: { dtype?: WritableDtype; metadata?: Record<string, string> } = {},
): Promise<void> {
  const entries = tensors instanceof Map ? [...tensors.entries()] : Object.entries(tensors);
  validateShapes(new Map(entries.map(([k, t]) => [k, t.shape])), config, dir);
  for (const [key, t] of entries) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) {
      throw new ClipError(`tensor '${key}': shape ${shapeText(t.shape)} needs ${count} values, got ${t.data.length}.`);
    }
  }
  const dtype = options.dtype ?? "F32";
  const toWrite = new Map(entries.map(([k, t]) => [k, { dtype, shape: t.shape, data: t.data }]));
  const hubConfig = JSON.stringify({ model_cfg: config, preprocess_cfg: preprocess }, null, 2) + "\n";
  const metadata = { format: "pt", ...options.metadata };

  const fresh = !await exists(dir);
  const target = fresh ? temporarySibling(dir.replace(/\/+$/, "")) : dir;
  await Deno.mkdir(target, { recursive: true });
  try {
    await writeSafetensors(join(target, OPEN_CLIP_WEIGHTS), toWrite, metadata);
    const configTemp = temporarySibling(join(target, OPEN_CLIP_CONFIG));
    await Deno.writeTextFile(configTemp, hubConfig);
    await Deno.rename(configTemp, join(target, OPEN_CLIP_CONFIG));
    if (fresh) await Deno.rename(target, dir);
  } catch (e) {
    if (fresh) await Deno.remove(target, { recursive: true }).catch(() => {});
    throw e;
  }
}
