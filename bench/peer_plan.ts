/**
 * The plan the peer runs: the shapes and sizes of every row ours ran, taken from the benchmarks' own constants so the
 * two cannot drift apart, and the inputs the peer reads (model weights and inputs written by the child benchmarks,
 * the decode row's JPEGs, the loader row's shards).
 */
import { defaultDecodeWorkers } from "../lib/data/decode_pool.ts";
import { ATTENTION, attentionFlop } from "./attention_bench.ts";
import { EMBED } from "./embed_bench.ts";
import { decodeBenchImages } from "./image_bench.ts";
import { LAYER_NORM, layerNormBytes } from "./layer_norm_bench.ts";
import { BATCH_SIZE, PREPROCESS, writeSyntheticShards } from "./loader_bench.ts";
import { ELEMENTWISE_SIZE, MATMUL_CASES } from "./matmul_bench.ts";
import { TRAIN } from "./train_bench.ts";

export interface PlanRequest {
  dir: string;
  /** Whether a row was run by ours (the peer runs only those). */
  ran: (name: string) => boolean;
  /** Files written by the embedding and training children, when they ran with --export. */
  exported: { embed: boolean; train: boolean };
  embedBatches: number;
  trainSteps: number;
}

const configPath = (name: string) => new URL(`../lib/nn/configs/${name}.json`, import.meta.url).pathname;

function opsPlan(ran: (name: string) => boolean): Record<string, unknown> | null {
  const ops: Record<string, unknown> = {};
  const matmuls = MATMUL_CASES.filter((c) => ran(c.name)).map((c) => ({
    name: c.name,
    batch: c.batch,
    m: c.m,
    k: c.k,
    n: c.n,
    transB: c.opts?.transB ?? false,
    bias: c.bias ?? false,
    activation: c.opts?.activation ?? null,
  }));
  if (matmuls.length) ops.matmuls = matmuls;
  if (ran("elementwise_add_16M")) ops.elementwise = { name: "elementwise_add_16M", size: ELEMENTWISE_SIZE };
  if (ran("attention_fwd_bwd")) ops.attention = { ...ATTENTION, flop: attentionFlop() };
  if (ran("layer_norm")) ops.layerNorm = { ...LAYER_NORM, bytes: layerNormBytes() };
  return Object.keys(ops).length ? ops : null;
}

/** Writes the plan (and the image inputs it needs) under `dir`; returns the plan's path. */
export async function writePeerPlan(req: PlanRequest): Promise<string> {
  const cores = navigator.hardwareConcurrency;
  const plan: Record<string, unknown> = { threads: cores > 1 ? [1, cores] : [1] };
  const ops = opsPlan(req.ran);
  if (ops) plan.ops = ops;
  if (req.exported.embed) {
    plan.embed = {
      config: configPath(EMBED.model),
      weights: `${req.dir}/vitb32_weights.safetensors`,
      inputs: `${req.dir}/vitb32_inputs.safetensors`,
      batches: req.embedBatches,
    };
  }
  if (req.exported.train) {
    plan.train = {
      config: configPath(TRAIN.model),
      weights: `${req.dir}/emoji_tiny_weights.safetensors`,
      inputs: `${req.dir}/emoji_tiny_inputs.safetensors`,
      lr: TRAIN.lr,
      warmup: TRAIN.warmup,
      steps: req.trainSteps,
    };
  }
  const transform = { size: PREPROCESS.size, mean: PREPROCESS.mean, std: PREPROCESS.std };
  if (req.ran("decode_224")) {
    const dir = `${req.dir}/decode`;
    await Deno.mkdir(dir);
    const images = await decodeBenchImages();
    for (const [i, bytes] of images.entries()) await Deno.writeFile(`${dir}/${String(i).padStart(4, "0")}.jpg`, bytes);
    plan.decode = { dir, ...transform };
  }
  if (req.ran("loader_224")) {
    const dir = `${req.dir}/loader`;
    await Deno.mkdir(dir);
    plan.loader = {
      shards: await writeSyntheticShards(dir),
      workers: defaultDecodeWorkers(),
      batch: BATCH_SIZE,
      ...transform,
    };
  }
  const path = `${req.dir}/plan.json`;
  await Deno.writeTextFile(path, JSON.stringify(plan, null, 2));
  return path;
}
