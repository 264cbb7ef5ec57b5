/**
 * ViT-B/32 embedding throughput: a randomly initialised model encodes a batch of 32 noise images and a batch of 32
 * captions (context 77) without gradients, upload and read-back of the features included, as an embedding job runs
 * them. The first batch of each tower compiles its kernels: it is timed apart and reported in the note; the rows are
 * the best of the timed batches that follow. Also reports the process's peak resident memory and the device memory
 * held.
 *
 *   deno run -A bench/embed_bench.ts [--json] [--batches 3] [--export DIR]
 *
 * --export DIR writes, for the peer, the model's weights (vitb32_weights.safetensors) and the inputs
 * (vitb32_inputs.safetensors), after the measurements so that the peak memory is the embedding's own; the first
 * embeddings go into the report's checks.
 */
import { parseArgs } from "node:util";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { ClipModel } from "../lib/nn/clip.ts";
import { loadModelConfig } from "../lib/nn/config.ts";
import { noGrad } from "../lib/tensor/autograd.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { Scope, type Tensor } from "../lib/tensor/tensor.ts";
import { type ChildReport, printReport } from "./child.ts";
import { writeInputs, writeWeights } from "./export.ts";
import { gpuMiB, median, processMemoryMiB, row, timeCalls, uniformRandom } from "./shared.ts";
import { makeCaptions } from "./tokenizer_bench.ts";

export const EMBED = { model: "ViT-B-32", seed: 0, batch: 32, imageSeed: 11 };

/** Encodes inside a scope and reads the features back; returns the first row. */
async function encodeAndRead(encode: () => Tensor): Promise<Float32Array> {
  const scope = new Scope();
  try {
    const features = noGrad(encode);
    const data = await features.read();
    return data.slice(0, features.shape[1]);
  } finally {
    scope.end();
  }
}

function batchNote(first: number, times: number[]): string {
  return `batch ${EMBED.batch}; best of ${times.length} batches (median ${median(times).toFixed(2)} s); ` +
    `first batch ${first.toFixed(1)} s with kernel compiles`;
}

export async function measureEmbedding(batches: number, exportDir?: string): Promise<ChildReport> {
  const gpu = await getGpu();
  const config = await loadModelConfig(EMBED.model);
  // Embedding is forward only: the model is readied as `clip embed` readies it (`ClipModel.forInference`).
  const model = ClipModel.init(gpu, config, EMBED.seed).forInference();
  const side = config.vision_cfg.image_size;
  const ctx = config.text_cfg.context_length;
  const b = EMBED.batch;
  const images = uniformRandom(b * 3 * side * side, EMBED.imageSeed);
  const tokenizer = await ClipTokenizer.load();
  const tokens = tokenizer.tokenize(makeCaptions(b), ctx);

  let imageEmbedding: Float32Array = new Float32Array();
  const encodeImages = async () => {
    imageEmbedding = await encodeAndRead(() => model.encodeImage(fromArray(gpu, images, [b, 3, side, side])));
  };
  let textEmbedding: Float32Array = new Float32Array();
  const encodeTexts = async () => {
    textEmbedding = await encodeAndRead(() => model.encodeText(model.uploadTokens(tokens)));
  };
  const [imageFirst] = await timeCalls(encodeImages, 1);
  console.error(`image tower: first batch ${imageFirst.toFixed(1)} s`);
  const imageTimes = await timeCalls(encodeImages, batches);
  const [textFirst] = await timeCalls(encodeTexts, 1);
  console.error(`text tower: first batch ${textFirst.toFixed(1)} s`);
  const textTimes = await timeCalls(encodeTexts, batches);
  const memory = processMemoryMiB();
  const report: ChildReport = {
    rows: [
      row("vitb32_image_embed", "images/s", b / Math.min(...imageTimes), batchNote(imageFirst, imageTimes)),
      row("vitb32_text_embed", "texts/s", b / Math.min(...textTimes), batchNote(textFirst, textTimes)),
      row(
        "vitb32_embed_peak_rss",
        "MiB",
        memory.peak,
        "VmHWM of a process that initialised the model and ran both rows above (the driver's memory included)",
      ),
      row("vitb32_embed_gpu_bytes", "MiB", gpuMiB(gpu), "buffer pool (weights included) + textures after both rows"),
    ],
    checks: { imageEmbedding: [...imageEmbedding], textEmbedding: [...textEmbedding] },
  };
  if (exportDir) {
    await writeWeights(model, `${exportDir}/vitb32_weights.safetensors`);
    await writeInputs(`${exportDir}/vitb32_inputs.safetensors`, images, [b, 3, side, side], tokens, [b, ctx]);
  }
  return report;
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      json: { type: "boolean", default: false },
      batches: { type: "string", default: "3" },
      export: { type: "string" },
    },
  });
  printReport(await measureEmbedding(Number(values.batches), values.export), values.json);
  Deno.exit(0);
}
