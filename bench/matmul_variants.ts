/**
 * Texture-matmul tiles side by side: each tile runs every shape once per round, rounds alternate between the tiles,
 * and the table gives each pair's median over the rounds. On a shared machine whose speed drifts by 10-30% within
 * minutes, only comparisons made this way, in one process and interleaved, separate differences of a few percent.
 *
 *   deno run -A bench/matmul_variants.ts [--tiles 32x32,128x8s,64x16s] [--shapes 3200x768x3072,1600x768x2304t]
 *                                        [--rounds 5]
 *
 * A shape is MxKxN; `a` after it stores A transposed ([K,M], as in weight gradients), a trailing `t` B ([N,K], as
 * Linear weights are). Tiles must be powers of two
 * (texture segments are whole tiles); a trailing `s` makes the lanes share A's rows (needs subgroups). A tile's first round includes its compile (seconds to a minute when Mesa's disk
 * cache is cold), so that round is left out of the medians.
 */
import { parseArgs } from "node:util";
import { getGpu } from "../lib/gpu/runtime.ts";
import { fromArray } from "../lib/tensor/create.ts";
import { matmulForward, setMatmulPath, setTextureKernel, type TextureKernelChoice } from "../lib/tensor/ops/matmul.ts";
import { withScope } from "../lib/tensor/tensor.ts";
import { median, timePerOp, uniformRandom } from "./shared.ts";

interface Shape {
  name: string;
  m: number;
  k: number;
  n: number;
  transA: boolean;
  transB: boolean;
}

function parseShape(s: string): Shape {
  const match = /^(\d+)x(\d+)x(\d+)(a?)(t?)$/.exec(s);
  const [m, k, n] = (match?.slice(1, 4) ?? []).map(Number);
  if (!match || ![m, k, n].every((d) => d > 0)) throw new Error(`--shapes: '${s}' is not MxKxN[a][t]`);
  return { name: s, m, k, n, transA: match[4] === "a", transB: match[5] === "t" };
}

function parseTile(s: string): TextureKernelChoice {
  const shareA = s.endsWith("s");
  const [tm, tn] = s.replace(/s$/, "").split("x").map(Number);
  const pow2 = (d: number) => Number.isInteger(d) && d >= 4 && (d & (d - 1)) === 0;
  if (!pow2(tm) || !pow2(tn)) throw new Error(`--tiles: '${s}' is not TMxTN[s] with powers of two from 4`);
  return { tile: { tm, tn }, shareA };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      tiles: { type: "string", default: "32x32,128x8s,64x16s" },
      shapes: { type: "string", default: "3200x768x3072,1600x768x2304t,8320x128x512t" },
      rounds: { type: "string", default: "5" },
    },
  });
  const tiles = values.tiles.split(",").map(parseTile);
  const shapes = values.shapes.split(",").map(parseShape);
  const rounds = Math.max(2, Number(values.rounds));
  const gpu = await getGpu();
  console.log(`adapter: ${gpu.adapter.description} | ${rounds} rounds, the first left out`);
  setMatmulPath("texture");
  const speeds = new Map<string, number[]>();
  await withScope(async () => {
    const ops = shapes.map((s) => {
      const a = fromArray(gpu, uniformRandom(s.m * s.k, 1), s.transA ? [s.k, s.m] : [s.m, s.k]);
      const b = fromArray(gpu, uniformRandom(s.k * s.n, 2), s.transB ? [s.n, s.k] : [s.k, s.n]);
      const opts = { transA: s.transA, transB: s.transB };
      return { s, run: () => matmulForward(a, b, opts).out.dispose() };
    });
    for (let round = 0; round < rounds; round++) {
      for (const tile of tiles) {
        setTextureKernel(tile);
        for (const { s, run } of ops) {
          const { ms } = await timePerOp(gpu, run, 1);
          const key = `${tile.tile.tm}x${tile.tile.tn}${tile.shareA ? "s" : ""} ${s.name}`;
          if (round > 0) speeds.set(key, [...(speeds.get(key) ?? []), 2 * s.m * s.n * s.k / (ms * 1e6)]);
        }
      }
    }
  });
  console.log(`${"tile".padEnd(6)} ${"shape".padEnd(16)} median GFLOP/s (min-max)`);
  for (const [key, xs] of speeds) {
    const [tile, shape] = key.split(" ");
    console.log(
      `${tile.padEnd(6)} ${shape.padEnd(16)} ${median(xs).toFixed(1)} (${Math.min(...xs).toFixed(1)}-${
        Math.max(...xs).toFixed(1)
      })`,
    );
  }
}

if (import.meta.main) await main();
