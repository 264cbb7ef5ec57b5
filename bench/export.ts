/** Files the peer reads: a model's weights under open_clip's names and the inputs it was run on, as f32 safetensors. */
import { writeSafetensors } from "../lib/io/safetensors.ts";
import type { ClipModel } from "../lib/nn/clip.ts";
import type { HostTensor } from "../lib/nn/params.ts";

export async function writeTensors(path: string, tensors: Map<string, HostTensor>): Promise<void> {
  await writeSafetensors(
    path,
    new Map([...tensors].map(([name, t]) => [name, { dtype: "F32" as const, shape: t.shape, data: t.data }])),
  );
}

/** The model's current parameters, read back from the device. */
export async function writeWeights(model: ClipModel, path: string): Promise<void> {
  await writeTensors(path, await model.params.download());
}

/** Images and token ids (ids below 2^24 are exact in f32, and CLIP's vocabulary has 49,408). */
export async function writeInputs(
  path: string,
  images: Float32Array,
  imageShape: number[],
  tokens: Int32Array,
  tokenShape: number[],
): Promise<void> {
  await writeTensors(
    path,
    new Map([
      ["images", { shape: imageShape, data: images }],
      ["tokens", { shape: tokenShape, data: Float32Array.from(tokens) }],
    ]),
  );
}
