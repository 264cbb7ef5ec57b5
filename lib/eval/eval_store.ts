/**
 * The folder a partitioned `clip eval` writes its parts to, and `clip eval --merge` reads:
 *
 *   DIR/plan.json                       the evaluation (task, model, shards, classes, prompts) and the partition count
 *   DIR/classifier.npy                  zero-shot only: the class embeddings [classes, dim], written by partition 0
 *   DIR/{data,train-data}/samples_PART.json    keys, labels or captions, and what the part left out
 *   DIR/{data,train-data}/text_emb_PART.npy    retrieval only: caption features [captions, dim] float32
 *   DIR/{data,train-data}/img_emb_PART.npy     image features [samples, dim] float32
 *
 * Every file goes to a temporary name and is renamed into place, the image features last: a part counts as done when
 * all its files exist, so a run stopped at any point redoes at most the part it was writing. Part names are the same
 * in every process, so folders written by different machines merge by copying them together.
 */
import { ClipError } from "../errors.ts";
import { decodeNpy, encodeNpy } from "../io/npy.ts";
import type { EvalPart, EvalPlan, EvalSet, LeftOut, PartFeatures } from "./eval_parts.ts";

const FORMAT = "clip-eval-parts/1";

interface StoredPlan {
  format: string;
  /** How many partitions share the parts (part p belongs to partition p % partitions). */
  partitions: number;
  plan: EvalPlan;
}

interface StoredSamples {
  shard: string;
  keys: string[];
  labels?: number[];
  captions?: string[][];
  left_out: LeftOut;
}

function paths(dir: string, set: EvalSet, part: string) {
  return {
    samples: `${dir}/${set}/samples_${part}.json`,
    texts: `${dir}/${set}/text_emb_${part}.npy`,
    images: `${dir}/${set}/img_emb_${part}.npy`,
  };
}

async function exists(path: string): Promise<boolean> {
  try {
    return (await Deno.stat(path)).isFile;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return false;
    throw new ClipError(`cannot read ${path}: ${(e as Error).message}`);
  }
}

/** Writes under a name of this process's own, then renames: safe when several processes write the same file. */
async function writeAtomically(path: string, bytes: Uint8Array): Promise<void> {
  const dir = path.slice(0, path.lastIndexOf("/"));
  const base = path.slice(path.lastIndexOf("/") + 1);
  const partial = await Deno.makeTempFile({ dir, prefix: `${base}.`, suffix: ".partial" });
  try {
    await Deno.writeFile(partial, bytes);
    await Deno.rename(partial, path);
  } catch (e) {
    await Deno.remove(partial).catch(() => {});
    throw e;
  }
}

async function readBytes(path: string): Promise<Uint8Array> {
  try {
    return await Deno.readFile(path);
  } catch (e) {
    throw new ClipError(`cannot read ${path}: ${(e as Error).message}`);
  }
}

/** A float32 matrix [rows, dim] from an .npy file, checked against the shape the part's samples call for. */
async function readMatrix(
  path: string,
  rows: number,
  dim: number | null,
): Promise<{ data: Float32Array; dim: number }> {
  const array = decodeNpy(await readBytes(path), path);
  const [r, d] = array.shape;
  if (array.dtype !== "f32" || array.shape.length !== 2 || r !== rows || (dim !== null && d !== dim)) {
    throw new ClipError(
      `${path} holds ${array.dtype} [${array.shape}], expected f32 [${rows}, ${dim ?? "dim"}]: ` +
        "the part is damaged; delete its files and run its partition again",
    );
  }
  return { data: array.data as Float32Array, dim: d };
}

function fieldsDiffering(a: EvalPlan, b: EvalPlan): (keyof EvalPlan)[] {
  return (Object.keys(a) as (keyof EvalPlan)[]).filter((k) => JSON.stringify(a[k]) !== JSON.stringify(b[k]));
}

/** A value for a one-line message: JSON, cut after 100 characters (shard lists can be long). */
function brief(value: unknown): string {
  const text = JSON.stringify(value);
  return text.length > 100 ? `${text.slice(0, 100)}...` : text;
}

export class EvalStore {
  constructor(readonly dir: string) {}

  get planPath(): string {
    return `${this.dir}/plan.json`;
  }

  get classifierPath(): string {
    return `${this.dir}/classifier.npy`;
  }

  /**
   * Creates the folders and records the plan, or checks that the plan already recorded (by another partition or an
   * earlier run) is this one: parts of different evaluations must never be merged.
   */
  async open(plan: EvalPlan, partitions: number): Promise<void> {
    for (const set of ["data", "train-data"] as const) {
      if (plan.shards[set].length > 0) await Deno.mkdir(`${this.dir}/${set}`, { recursive: true });
    }
    const recorded = await this.#readPlanIfAny();
    if (recorded) {
      const differing = fieldsDiffering(recorded.plan, plan);
      if (differing.length > 0) {
        const field = differing[0];
        throw new ClipError(
          `${this.planPath} records another evaluation (${field}: ${brief(recorded.plan[field])}, ` +
            `this run: ${brief(plan[field])}): write to another --out, or delete ${this.dir} to start over`,
        );
      }
      if (recorded.partitions !== partitions) {
        throw new ClipError(
          `${this.planPath} was written by a run of ${recorded.partitions} partition(s), this one is of ${partitions}: ` +
            "give every partition the same count (parts are assigned by it), or delete the folder to start over",
        );
      }
      return;
    }
    const stored: StoredPlan = { format: FORMAT, partitions, plan };
    await writeAtomically(this.planPath, new TextEncoder().encode(JSON.stringify(stored, null, 2) + "\n"));
  }

  /** The recorded plan and partition count; fails when the folder holds none. */
  async readPlan(): Promise<{ plan: EvalPlan; partitions: number }> {
    const recorded = await this.#readPlanIfAny();
    if (!recorded) {
      throw new ClipError(
        `${this.planPath} not found: --merge reads the folder that 'clip eval ... --out DIR' partitions wrote`,
      );
    }
    return recorded;
  }

  async #readPlanIfAny(): Promise<StoredPlan | null> {
    let text: string;
    try {
      text = await Deno.readTextFile(this.planPath);
    } catch (e) {
      if (e instanceof Deno.errors.NotFound) return null;
      throw new ClipError(`cannot read ${this.planPath}: ${(e as Error).message}`);
    }
    let stored: StoredPlan;
    try {
      stored = JSON.parse(text);
    } catch (e) {
      throw new ClipError(
        `${this.planPath} is not valid JSON (${(e as Error).message}): delete the folder to start over`,
      );
    }
    if (stored?.format !== FORMAT || !Number.isInteger(stored.partitions) || typeof stored.plan !== "object") {
      throw new ClipError(`${this.planPath} is not a plan of 'clip eval --out' (format ${FORMAT})`);
    }
    return stored;
  }

  async isDone(plan: EvalPlan, part: EvalPart): Promise<boolean> {
    const p = paths(this.dir, part.set, part.name);
    const files = plan.task === "retrieval" ? [p.samples, p.texts, p.images] : [p.samples, p.images];
    for (const f of files) if (!(await exists(f))) return false;
    return true;
  }

  async writePart(part: EvalPart, features: PartFeatures): Promise<void> {
    const rows = features.keys.length;
    if (features.images.length !== rows * features.dim) {
      throw new RangeError(`${part.set} part ${part.name}: ${features.images.length} values for ${rows} samples`);
    }
    const p = paths(this.dir, part.set, part.name);
    const samples: StoredSamples = {
      shard: part.shard,
      keys: features.keys,
      ...(features.labels ? { labels: features.labels } : {}),
      ...(features.captions ? { captions: features.captions } : {}),
      left_out: features.leftOut,
    };
    await writeAtomically(p.samples, new TextEncoder().encode(JSON.stringify(samples)));
    if (features.texts) {
      const captions = features.texts.length / features.dim;
      await writeAtomically(
        p.texts,
        encodeNpy({ dtype: "f32", shape: [captions, features.dim], data: features.texts }),
      );
    }
    await writeAtomically(p.images, encodeNpy({ dtype: "f32", shape: [rows, features.dim], data: features.images }));
  }

  async readPart(plan: EvalPlan, part: EvalPart): Promise<PartFeatures> {
    const p = paths(this.dir, part.set, part.name);
    let samples: StoredSamples;
    try {
      samples = JSON.parse(new TextDecoder().decode(await readBytes(p.samples)));
    } catch (e) {
      if (e instanceof ClipError) throw e;
      throw new ClipError(`${p.samples} is not valid JSON: delete the part's files and run its partition again`);
    }
    const rows = samples.keys?.length;
    const wanted = plan.task === "retrieval" ? samples.captions : samples.labels;
    if (!Array.isArray(samples.keys) || !Array.isArray(wanted) || wanted.length !== rows || !samples.left_out) {
      throw new ClipError(
        `${p.samples} lacks the keys, ${plan.task === "retrieval" ? "captions" : "labels"} or counts of the part: ` +
          "delete the part's files and run its partition again",
      );
    }
    const images = await readMatrix(p.images, rows, null);
    const features: PartFeatures = {
      dim: images.dim,
      images: images.data,
      keys: samples.keys,
      leftOut: samples.left_out,
    };
    if (plan.task === "retrieval") {
      features.captions = samples.captions;
      features.texts = (await readMatrix(p.texts, samples.captions!.flat().length, images.dim)).data;
    } else {
      features.labels = samples.labels;
    }
    return features;
  }

  async hasClassifier(): Promise<boolean> {
    return await exists(this.classifierPath);
  }

  async writeClassifier(classifier: Float32Array, dim: number): Promise<void> {
    const classes = classifier.length / dim;
    await writeAtomically(this.classifierPath, encodeNpy({ dtype: "f32", shape: [classes, dim], data: classifier }));
  }

  async readClassifier(classes: number, dim: number): Promise<Float32Array> {
    return (await readMatrix(this.classifierPath, classes, dim)).data;
  }
}
