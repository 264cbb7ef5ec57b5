import {
  bitonicStepKernel,
  bitonicTileKernel,
  bitonicTileThreads,
  embeddingBackwardInvocations,
  embeddingBackwardKernel,
  embeddingForwardKernel,
  gatherRowsBackwardKernel,
  gatherRowsForwardKernel,
  runBoundsKernel,
  sortKeysInitKernel,
  sortLength,
} from "../../../kernels/gather.ts";
import { elementGroups } from "../../../kernels/grid.ts";
import type { Gpu } from "../../gpu/runtime.ts";
import { record } from "../autograd.ts";
import { empty, zeros } from "../create.ts";
import type { Tensor } from "../tensor.ts";

function requireIndices(t: Tensor, op: string, what: string): void {
  if (t.dtype !== "i32") throw new Error(`${op}: ${what} must be an i32 tensor, got ${t}`);
}

/**
 * Looks up rows of a [vocab, dim] table: out[..., :] = weight[ids[...], :], shaped [...ids.shape, dim]. Ids must lie
 * in [0, vocab) (out-of-range ids are clamped on the GPU rather than reported). The gradient of the table sums the
 * upstream rows of repeated ids in position order, so it is the same on every run.
 */
export function embedding(weight: Tensor, ids: Tensor): Tensor {
  if (weight.rank !== 2 || weight.dtype !== "f32") {
    throw new Error(`embedding: the table must be an f32 [vocab, dim] tensor, got ${weight}`);
  }
  requireIndices(ids, "embedding", "ids");
  const [vocab, dim] = weight.shape;
  if (vocab === 0) throw new Error(`embedding: the table ${weight} has no rows`);
  const positions = ids.size;
  const gpu = weight.gpu;
  const out = empty(gpu, [...ids.shape, dim]);
  gpu.dispatch(
    embeddingForwardKernel(positions, vocab, dim),
    [weight.buffer, ids.buffer, out.buffer],
    elementGroups(positions * dim),
  );
  return record(out, "embedding", [weight], (g) => {
    if (positions === 0) return [zeros(gpu, weight.shape)];
    const keys = sortedPositions(gpu, ids, vocab);
    const runs = zeros(gpu, [vocab, 2], "i32");
    gpu.dispatch(runBoundsKernel(positions), [keys.buffer, runs.buffer], elementGroups(positions));
    const dweight = empty(gpu, weight.shape);
    gpu.dispatch(
      embeddingBackwardKernel(vocab, dim),
      [keys.buffer, runs.buffer, g.buffer, dweight.buffer],
      elementGroups(embeddingBackwardInvocations(vocab, dim)),
    );
    keys.dispose();
    runs.dispose();
    return [dweight];
  });
}

/** (id, position) pairs of all positions, sorted by id and then position (a [length, 2] i32 tensor of u32 bits). */
function sortedPositions(gpu: Gpu, ids: Tensor, vocab: number): Tensor {
  const length = sortLength(ids.size);
  const keys = empty(gpu, [length, 2], "i32");
  gpu.dispatch(sortKeysInitKernel(ids.size, vocab), [ids.buffer, keys.buffer], elementGroups(length));
  const tile = 2 * bitonicTileThreads(length);
  const tiles = length / tile;
  const tileKernel = bitonicTileKernel(length);
  const stepKernel = bitonicStepKernel(length);
  // Stages up to the tile size run entirely in workgroup memory; each later stage runs its long-distance steps over
  // the whole list and finishes its short ones inside the tiles.
  gpu.dispatch(tileKernel, [keys.buffer], tiles, new Uint32Array([2, tile]));
  for (let k = 2 * tile; k <= length; k *= 2) {
    for (let j = k / 2; j >= tile; j /= 2) {
      gpu.dispatch(stepKernel, [keys.buffer], elementGroups(length / 2), new Uint32Array([k, j]));
    }
    gpu.dispatch(tileKernel, [keys.buffer], tiles, new Uint32Array([k, k]));
  }
  return keys;
}

/**
 * Picks one row per batch entry: out[b, :] = x[b, index[b], :] for x [B, T, D] and an i32 index [B] (CLIP's text
 * features at each sequence's end-of-text token). Indices must lie in [0, T) (clamped on the GPU otherwise). The
 * gradient places each upstream row back at its position, zeros elsewhere.
 */
export function gatherRows(x: Tensor, index: Tensor): Tensor {
  if (x.rank !== 3 || x.dtype !== "f32") throw new Error(`gatherRows: x must be an f32 [B, T, D] tensor, got ${x}`);
  requireIndices(index, "gatherRows", "index");
  const [batch, rows, dim] = x.shape;
  if (rows === 0) throw new Error(`gatherRows: x ${x} has no rows to pick from`);
  if (index.size !== batch) throw new Error(`gatherRows: index ${index} needs one entry per batch entry of ${x}`);
  const gpu = x.gpu;
  const out = empty(gpu, [batch, dim]);
  gpu.dispatch(
    gatherRowsForwardKernel(batch, rows, dim),
    [x.buffer, index.buffer, out.buffer],
    elementGroups(batch * dim),
  );
  return record(out, "gatherRows", [x], (g) => {
    const dx = empty(gpu, x.shape);
    gpu.dispatch(
      gatherRowsBackwardKernel(batch, rows, dim),
      [g.buffer, index.buffer, dx.buffer],
      elementGroups(x.size),
    );
    return [dx];
  });
}
