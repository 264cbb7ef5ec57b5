/**
 * Training checkpoints in a run folder:
 *
 *   DIR/open_clip_config.json, DIR/open_clip_model.safetensors   latest weights, open_clip's hub layout
 *   DIR/checkpoints/step-0000120/                                 one complete checkpoint:
 *       open_clip_config.json, open_clip_model.safetensors         weights (loadable by open_clip)
 *       optimizer.safetensors                                      AdamW moments
 *       state.json                                                 step, epoch, data position, settings
 *   DIR/latest                                                    name of the newest complete checkpoint
 *
 * A checkpoint is assembled in a temporary folder and renamed into place, so a folder under checkpoints/ with a
 * step name is always complete. `latest` is replaced atomically just before that rename, so it never lags behind a
 * complete checkpoint: it names the newest complete one, or one about to appear, in which case findLatestCheckpoint
 * finds it missing and takes the newest complete folder instead. A kill at any moment therefore leaves the last
 * complete checkpoint as the latest, and leftover temporary folders are ignored and removed by the next save.
 */
import { ClipError } from "../errors.ts";
import { OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, saveHubLayout } from "../io/checkpoint_layout.ts";
import { SafetensorsFile, writeSafetensors } from "../io/safetensors.ts";
import type { ClipConfig, PreprocessConfig } from "../nn/config.ts";
import type { HostTensor } from "../nn/params.ts";

export interface TrainState {
  step: number;
  epoch: number;
  /** Loader position after the last batch consumed (opaque to this module). */
  data: unknown;
  optimizerStep: number;
  /** Settings that must match on resume (model, data, seed, batch size, ...). */
  settings: Record<string, unknown>;
}

const STEP_NAME = /^step-(\d+)$/;

function stepName(step: number): string {
  return `step-${String(step).padStart(7, "0")}`;
}

async function writeTextAtomic(path: string, text: string): Promise<void> {
  const tmp = `${path}.tmp-${Deno.pid}`;
  await Deno.writeTextFile(tmp, text);
  await Deno.rename(tmp, path);
}

export async function saveCheckpoint(
  dir: string,
  config: ClipConfig,
  preprocess: PreprocessConfig,
  weights: Map<string, HostTensor>,
  optimizer: Map<string, HostTensor>,
  state: TrainState,
  keep = 3,
): Promise<string> {
  const root = `${dir}/checkpoints`;
  await Deno.mkdir(root, { recursive: true });
  await removeLeftovers(root);
  const name = stepName(state.step);
  const tmp = `${root}/${name}.tmp-${Deno.pid}`;
  await Deno.mkdir(tmp, { recursive: true });
  await saveHubLayout(tmp, config, preprocess, weights);
  await writeSafetensors(
    `${tmp}/optimizer.safetensors`,
    new Map([...optimizer].map(([k, t]) => [k, { dtype: "F32" as const, shape: t.shape, data: t.data }])),
  );
  await Deno.writeTextFile(`${tmp}/state.json`, JSON.stringify(state));
  const final = `${root}/${name}`;
  // A folder of the same step (from a run resumed at an earlier checkpoint) is moved aside in one rename rather than
  // deleted in place, so no half-deleted folder ever carries a step name.
  await Deno.rename(final, `${root}/${name}.tmp-replaced-${Deno.pid}`).catch((e) => {
    if (!(e instanceof Deno.errors.NotFound)) throw e;
  });
  await writeTextAtomic(`${dir}/latest`, name + "\n");
  await Deno.rename(tmp, final);
  await removeLeftovers(root);
  // The run folder itself holds the newest weights in hub layout, so `--model DIR` works anywhere.
  await saveHubLayout(dir, config, preprocess, weights);
  await prune(root, keep);
  return final;
}

async function removeLeftovers(root: string): Promise<void> {
  for await (const e of Deno.readDir(root)) {
    if (e.isDirectory && e.name.includes(".tmp-")) await Deno.remove(`${root}/${e.name}`, { recursive: true });
  }
}

async function prune(root: string, keep: number): Promise<void> {
  const steps: string[] = [];
  for await (const e of Deno.readDir(root)) if (e.isDirectory && STEP_NAME.test(e.name)) steps.push(e.name);
  steps.sort();
  for (const name of steps.slice(0, Math.max(0, steps.length - keep))) {
    await Deno.remove(`${root}/${name}`, { recursive: true });
  }
}

/** The newest complete checkpoint folder of a run, or null when it has none. */
export async function findLatestCheckpoint(dir: string): Promise<string | null> {
  const root = `${dir}/checkpoints`;
  try {
    const name = (await Deno.readTextFile(`${dir}/latest`)).trim();
    if (STEP_NAME.test(name) && await isComplete(`${root}/${name}`)) return `${root}/${name}`;
  } catch {
    // No pointer (or a stale one): fall back to scanning.
  }
  const steps: string[] = [];
  try {
    for await (const e of Deno.readDir(root)) if (e.isDirectory && STEP_NAME.test(e.name)) steps.push(e.name);
  } catch {
    return null;
  }
  steps.sort().reverse();
  for (const name of steps) if (await isComplete(`${root}/${name}`)) return `${root}/${name}`;
  return null;
}

async function isComplete(path: string): Promise<boolean> {
  try {
    for (const f of ["state.json", OPEN_CLIP_WEIGHTS, OPEN_CLIP_CONFIG, "optimizer.safetensors"]) {
      await Deno.stat(`${path}/${f}`);
    }
    return true;
  } catch {
    return false;
  }
}

export interface LoadedCheckpoint {
  path: string;
  state: TrainState;
  optimizer: Map<string, HostTensor>;
}

/** Reads a checkpoint's training state and optimizer moments (the weights load through the model loader). */
export async function loadCheckpointState(path: string): Promise<LoadedCheckpoint> {
  let state: TrainState;
  try {
    state = JSON.parse(await Deno.readTextFile(`${path}/state.json`));
  } catch (e) {
    throw new ClipError(`cannot read the training state in ${path}: ${(e as Error).message}`);
  }
  const file = await SafetensorsFile.open(`${path}/optimizer.safetensors`);
  const optimizer = new Map<string, HostTensor>();
  try {
    for (const key of file.keys()) {
      optimizer.set(key, { shape: [...file.info(key).shape], data: await file.readF32(key) });
    }
  } finally {
    file.close();
  }
  return { path, state, optimizer };
}
