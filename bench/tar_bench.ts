// Tar reading speed from a file: a WebDataset-like mix of 4 KiB captions, 60 KiB images and a few MiB-sized members.
import { readTar } from "../lib/data/tar.ts";
import { TarWriter } from "../lib/data/tar_writer.ts";

function fill(n: number, seed: number): Uint8Array {
  const out = new Uint8Array(n);
  let s = seed >>> 0;
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    out[i] = s >>> 24;
  }
  return out;
}

export async function benchTar(): Promise<{ name: "tar_read"; unit: "MB/s"; value: number; note: string }> {
  const dir = await Deno.makeTempDir();
  try {
    const path = `${dir}/bench.tar`;
    const writer = await TarWriter.create(path);
    const image = fill(60 * 1024, 11), caption = fill(4 * 1024, 12), big = fill(4 << 20, 13);
    let total = 0;
    for (let i = 0; total < 48 << 20; i++) {
      await writer.add(`${String(i).padStart(6, "0")}.jpg`, image);
      await writer.add(`${String(i).padStart(6, "0")}.txt`, caption);
      total += image.length + caption.length;
    }
    for (let i = 0; i < 4; i++) await writer.add(`big${i}.bin`, big);
    await writer.close();
    const size = (await Deno.stat(path)).size;
    // Plain streaming and tar reading alternate so that both see the same machine load; the best of each is kept.
    let bestRaw = 0, bestTar = 0;
    for (let round = 0; round < 3; round++) {
      let start = performance.now();
      for await (const _ of (await Deno.open(path)).readable);
      bestRaw = Math.max(bestRaw, size / (performance.now() - start) / 1e3);
      start = performance.now();
      for await (const _ of readTar((await Deno.open(path)).readable));
      bestTar = Math.max(bestTar, size / (performance.now() - start) / 1e3);
    }
    return { name: "tar_read", unit: "MB/s", value: bestTar, note: `plain file stream ${bestRaw.toFixed(0)} MB/s` };
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

if (import.meta.main) console.log(await benchTar());
