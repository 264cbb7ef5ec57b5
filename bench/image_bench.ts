/**
 * Loader throughput: decode + eval preprocessing at 224 px of synthetic 256-400 px JPEGs, a few in flight at once
 * as the data loader runs them.
 */
import sharp from "sharp";
import { decodeEvalImage, OPENAI_MEAN, OPENAI_STD, type Preprocess } from "../lib/data/image.ts";

const IMAGE_COUNT = 200;
const IN_FLIGHT = 3;

/** Photo-like content (smooth gradients plus mild noise) so the JPEGs decode at a realistic cost. */
async function syntheticJpegs(count: number): Promise<Uint8Array[]> {
  let state = 12345;
  const next = () => (state = (Math.imul(state, 1103515245) + 12345) >>> 0) / 4294967296;
  const images: Uint8Array[] = [];
  for (let n = 0; n < count; n++) {
    const width = 256 + Math.floor(next() * 145);
    const height = 256 + Math.floor(next() * 145);
    const phase = next() * 6;
    const pixels = new Uint8Array(width * height * 3);
    for (let y = 0; y < height; y++) {
      for (let x = 0; x < width; x++) {
        const i = (y * width + x) * 3;
        pixels[i] = 128 + 100 * Math.sin(x / 23 + phase) + 20 * next();
        pixels[i + 1] = 128 + 100 * Math.cos(y / 31 - phase) + 20 * next();
        pixels[i + 2] = (x + y + 40 * next()) & 255;
      }
    }
    const jpeg = await sharp(pixels, { raw: { width, height, channels: 3 } }).jpeg({ quality: 90 }).toBuffer();
    images.push(new Uint8Array(jpeg.buffer, jpeg.byteOffset, jpeg.length));
  }
  return images;
}

export async function benchDecode(): Promise<{ name: "loader_224"; unit: "images/s"; value: number }> {
  const images = await syntheticJpegs(IMAGE_COUNT);
  const p: Preprocess = { size: 224, mean: OPENAI_MEAN, std: OPENAI_STD };
  await decodeEvalImage(images[0], p); // warm up sharp's thread pool and the JIT
  let nextIndex = 0;
  const worker = async () => {
    while (nextIndex < images.length) await decodeEvalImage(images[nextIndex++], p);
  };
  const start = performance.now();
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
  const seconds = (performance.now() - start) / 1000;
  return { name: "loader_224", unit: "images/s", value: images.length / seconds };
}

if (import.meta.main) console.log(JSON.stringify(await benchDecode()));
