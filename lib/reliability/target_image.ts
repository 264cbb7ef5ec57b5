/**
 * Fuzz target: image decoding and preprocessing (sharp behind lib/data/image.ts). Inputs are small JPEG, PNG (RGB,
 * RGBA, grey) and WebP images, truncated, with edited headers or bodies, images whose header declares up to
 * 65535 x 65535 pixels over a few bytes of data (refused from the header, before any pixel is allocated), and bytes
 * that are no image at all. Decoding ends in the image or in ImageDecodeError / ImageTooLargeError.
 */
import sharp from "sharp";
import { decodeEvalImage, decodeTrainImage, OPENAI_MEAN, OPENAI_STD, type Preprocess } from "../data/image.ts";
import { Rng } from "../data/rng.ts";
import type { Accepted, FuzzInput, FuzzTarget } from "./fuzz_target.ts";
import { mutateBytes, pick } from "./mutate.ts";

const PREPROCESS: Preprocess = { size: 16, mean: OPENAI_MEAN, std: OPENAI_STD };

interface Seed {
  format: "jpeg" | "png" | "webp";
  bytes: Uint8Array;
}

function crc32(bytes: Uint8Array): number {
  let crc = 0xffffffff;
  for (const byte of bytes) {
    crc ^= byte;
    for (let k = 0; k < 8; k++) crc = (crc >>> 1) ^ (0xedb88320 & -(crc & 1));
  }
  return (crc ^ 0xffffffff) >>> 0;
}

/** The PNG with its IHDR declaring width x height (CRC recomputed, so only the size is a lie). */
function pngDeclaring(png: Uint8Array, width: number, height: number): Uint8Array {
  const out = png.slice();
  const view = new DataView(out.buffer);
  view.setUint32(16, width);
  view.setUint32(20, height);
  view.setUint32(29, crc32(out.subarray(12, 29)));
  return out;
}

/** The JPEG with its frame header (SOF0/1/2) declaring width x height; libjpeg reads the size from there. */
function jpegDeclaring(jpeg: Uint8Array, width: number, height: number): Uint8Array {
  const out = jpeg.slice();
  for (let i = 2; i + 9 < out.length;) {
    if (out[i] !== 0xff) break;
    const marker = out[i + 1];
    const length = (out[i + 2] << 8) | out[i + 3];
    if (marker >= 0xc0 && marker <= 0xc2) {
      new DataView(out.buffer).setUint16(i + 5, height);
      new DataView(out.buffer).setUint16(i + 7, width);
      return out;
    }
    i += 2 + length;
  }
  return out;
}

/** A WebP in the extended format whose canvas (VP8X) declares width x height around the original frame. */
function webpDeclaring(webp: Uint8Array, width: number, height: number): Uint8Array {
  const frame = webp.subarray(12); // the chunks after "RIFF" size "WEBP"
  const vp8x = new Uint8Array(18);
  vp8x.set(new TextEncoder().encode("VP8X"), 0);
  new DataView(vp8x.buffer).setUint32(4, 10, true);
  const w = width - 1, h = height - 1;
  vp8x.set([w & 0xff, (w >> 8) & 0xff, (w >> 16) & 0xff, h & 0xff, (h >> 8) & 0xff, (h >> 16) & 0xff], 12);
  const out = new Uint8Array(12 + vp8x.length + frame.length);
  out.set(new TextEncoder().encode("RIFF"), 0);
  new DataView(out.buffer).setUint32(4, out.length - 8, true);
  out.set(new TextEncoder().encode("WEBP"), 8);
  out.set(vp8x, 12);
  out.set(frame, 12 + vp8x.length);
  return out;
}

async function prepare(): Promise<Seed[]> {
  sharp.cache(false); // no cached decodes between inputs: memory per input is then what the input costs
  const rng = new Rng(0x1a6e);
  const noise = (w: number, h: number, channels: 1 | 3 | 4) => {
    const data = new Uint8Array(w * h * channels);
    for (let i = 0; i < data.length; i++) data[i] = rng.int(256);
    return sharp(data, { raw: { width: w, height: h, channels } });
  };
  const bytes = async (p: Promise<Uint8Array>) => new Uint8Array(await p);
  return [
    { format: "jpeg", bytes: await bytes(noise(24, 18, 3).jpeg().toBuffer()) },
    { format: "jpeg", bytes: await bytes(noise(20, 30, 3).jpeg({ progressive: true }).toBuffer()) },
    { format: "png", bytes: await bytes(noise(19, 23, 3).png().toBuffer()) },
    { format: "png", bytes: await bytes(noise(17, 17, 4).png().toBuffer()) },
    { format: "png", bytes: await bytes(noise(21, 16, 1).png().toBuffer()) },
    { format: "webp", bytes: await bytes(noise(22, 20, 3).webp().toBuffer()) },
  ];
}

function declaring(seed: Seed, width: number, height: number): Uint8Array {
  if (seed.format === "png") return pngDeclaring(seed.bytes, width, height);
  if (seed.format === "jpeg") return jpegDeclaring(seed.bytes, width, height);
  return webpDeclaring(seed.bytes, width, height);
}

function generate(seeds: Seed[], rng: Rng): FuzzInput<Uint8Array> {
  const seed = pick(rng, seeds);
  let bytes: Uint8Array;
  let kind: string;
  switch (rng.int(6)) {
    case 0:
      bytes = seed.bytes.slice(0, rng.int(seed.bytes.length));
      kind = `truncated:${seed.format}`;
      break;
    case 1: {
      const head = Math.min(64, seed.bytes.length);
      bytes = seed.bytes.slice();
      bytes.set(mutateBytes(rng, bytes.subarray(0, head), 3).subarray(0, head));
      kind = `header:${seed.format}`;
      break;
    }
    case 2:
      bytes = mutateBytes(rng, seed.bytes, 8);
      kind = `corrupt:${seed.format}`;
      break;
    case 3: {
      const side = () => pick(rng, [30000, 16384 + rng.int(49152), 65535]);
      bytes = declaring(seed, side(), side());
      kind = `declared-huge:${seed.format}`;
      break;
    }
    case 4:
      bytes = rng.int(2) === 0 ? new TextEncoder().encode("a photo of a cat") : mutateBytes(rng, new Uint8Array(0), 4);
      kind = "not-an-image";
      break;
    default:
      bytes = seed.bytes;
      kind = `valid:${seed.format}`;
  }
  return { kind, value: bytes, bytes: bytes.length };
}

async function run(_seeds: Seed[], bytes: Uint8Array, rng: Rng): Promise<Accepted> {
  await decodeEvalImage(bytes, PREPROCESS);
  await decodeTrainImage(bytes, PREPROCESS, () => rng.next());
  return "accepted";
}

export const imageTarget: FuzzTarget<Seed[], Uint8Array> = {
  name: "image",
  refusals: ["ImageDecodeError", "ImageTooLargeError"],
  prepare,
  generate,
  run,
};
