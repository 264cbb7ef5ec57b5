/**
 * Decode throughput of one thread: decodeEvalImage at 224 px (sharp decode, SIMD Pillow resize, normalisation) of
 * synthetic 300-500 px JPEGs, a few in flight on the calling thread, with no decode workers. The loader's throughput,
 * with its workers, is bench/loader_bench.ts.
 */
import { decodeEvalImage, OPENAI_MEAN, OPENAI_STD, type Preprocess } from "../lib/data/image.ts";
import { lcg, syntheticJpeg } from "./loader_bench.ts";

const IMAGE_COUNT = 200;
const IN_FLIGHT = 3;

/** The JPEGs this row decodes (the peer decodes the same ones). */
export async function decodeBenchImages(): Promise<Uint8Array[]> {
  const random = lcg(7);
  const images: Uint8Array[] = [];
  for (let i = 0; i < IMAGE_COUNT; i++) images.push(await syntheticJpeg(random));
  return images;
}

export async function benchDecode(): Promise<{ name: "decode_224"; unit: "images/s"; value: number }> {
  const images = await decodeBenchImages();
  const p: Preprocess = { size: 224, mean: OPENAI_MEAN, std: OPENAI_STD };
  const out = Array.from({ length: IN_FLIGHT }, () => new Float32Array(3 * 224 * 224));
  for (const bytes of images.slice(0, 10)) await decodeEvalImage(bytes, p, {}, out[0]); // warm up sharp and the JIT
  let nextIndex = 0;
  const decodeLoop = async (slot: number) => {
    while (nextIndex < images.length) await decodeEvalImage(images[nextIndex++], p, {}, out[slot]);
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: IN_FLIGHT }, (_, slot) => decodeLoop(slot)));
  const seconds = (performance.now() - start) / 1000;
  return { name: "decode_224", unit: "images/s", value: images.length / seconds };
}

if (import.meta.main) console.log(JSON.stringify(await benchDecode()));
