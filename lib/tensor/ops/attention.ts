import {
  attentionBackwardKeyValueKernel,
  attentionBackwardQueryKernel,
  attentionForwardKernel,
  type AttentionShape,
  type AttentionSpec,
  attentionUniforms,
  attentionWorkgroups,
} from "../../../kernels/attention.ts";
import { operandLayout, TEXTURE_SEGMENT_ROWS } from "../../../kernels/matmul_texture.ts";
import { subgroupIsWorkgroup } from "../../gpu/device.ts";
import type { Gpu } from "../../gpu/runtime.ts";
import { fillOperandTexture, texturePool } from "./texture_operand.ts";
import { record } from "../autograd.ts";
import { empty } from "../create.ts";
import type { Tensor } from "../tensor.ts";

export interface AttentionOptions {
  heads: number;
  /** Token i attends to tokens 0..i only (the text tower). */
  causal?: boolean;
}

const MAX_ROWS_PER_INVOCATION = 8;

/** Rows per workgroup: the SIMD width on CPU back ends (lanes share the loop's loads), a warp's worth elsewhere. */
function rowsPerGroup(gpu: Gpu): number {
  return gpu.adapter.isSoftware ? gpu.adapter.cpuLanes || 8 : 32;
}

/**
 * How attention reads its row matrices: "auto" picks per adapter; the others force one (tests, benchmarks).
 * "shared": texture reads whose loop rows the lanes fetch once between them (`AttentionSpec.shareRows`).
 */
export type AttentionReads = "auto" | "buffer" | "texture" | "shared";

let readsOverride: AttentionReads = "auto";

/** Forces how every later attention reads its inputs; returns the previous setting. */
export function setAttentionReads(reads: AttentionReads): AttentionReads {
  const previous = readsOverride;
  readsOverride = reads;
  return previous;
}

/**
 * Texture reads on CPU back ends, as the matmul's: both row matrices (qkv, 3W wide, and the output gradient, W wide)
 * must fit the adapter's textures once wrapped into segments.
 */
function useTextures(gpu: Gpu, rows: number, width: number): boolean {
  if (readsOverride !== "auto") return readsOverride !== "buffer";
  if (!gpu.adapter.isSoftware) return false;
  const maxSide = gpu.adapter.limits.maxTextureDimension2D ?? 8192;
  const layout = rowLayout(rows, 3 * width);
  return maxSide >= TEXTURE_SEGMENT_ROWS && 2 ** Math.ceil(Math.log2(layout.width)) <= maxSide;
}

/** Whether the device's subgroups are as wide as an attention workgroup, which shared reads need. */
export function canShareRows(gpu: Gpu): boolean {
  return subgroupIsWorkgroup(gpu.adapter, rowsPerGroup(gpu));
}

/** Whether texture reads share the loop's rows across the lanes: wherever the device can. */
function shareRows(gpu: Gpu, texture: boolean): boolean {
  const can = canShareRows(gpu);
  if (readsOverride === "shared" && !can) {
    throw new Error(`attention: shared reads need subgroups of ${rowsPerGroup(gpu)} lanes, which this device lacks`);
  }
  return readsOverride === "auto" ? texture && can : readsOverride === "shared";
}

/** A [rows, cols] matrix as one texture row per matrix row (cols is a multiple of 4 here). */
function rowLayout(rows: number, cols: number) {
  return operandLayout(rows, cols, 1, "tile", 1, 4);
}

/** Puts a tensor's rows (its last axis) into a pooled texture; `release` returns the texture after the dispatches. */
function rowTexture(t: Tensor): { binding: GPUTextureView; release: () => void } {
  const cols = t.shape[t.rank - 1];
  const layout = rowLayout(t.size / cols, cols);
  const pool = texturePool(t.gpu);
  const tex = pool.acquire(layout.width, layout.height);
  fillOperandTexture(t, tex, layout);
  return { binding: tex.view, release: () => pool.release(tex) };
}

/**
 * Multi-head scaled dot-product attention, fused: qkv [B, T, 3W] as a packed in-projection writes it (q, k, v, each
 * H heads of W/H) -> [B, T, W] with the heads already merged, softmax(q k^T / sqrt(W/H)) v per head. The backward
 * pass recomputes the probabilities from saved row log-sum-exps and returns the gradient of qkv in its layout.
 */
export function attention(qkv: Tensor, opts: AttentionOptions): Tensor {
  if (qkv.rank !== 3 || qkv.dtype !== "f32" || qkv.shape[2] % 3 !== 0) {
    throw new Error(`attention: qkv must be an f32 [B, T, 3W] tensor, got ${qkv}`);
  }
  const [batch, tokens, width3] = qkv.shape;
  const width = width3 / 3;
  const heads = opts.heads;
  if (!Number.isInteger(heads) || heads < 1 || width % heads !== 0 || (width / heads) % 4 !== 0) {
    throw new Error(`attention: width ${width} must split into ${heads} heads of a multiple of 4`);
  }
  const gpu = qkv.gpu;
  const lanes = rowsPerGroup(gpu);
  const texture = useTextures(gpu, batch * tokens, width);
  const spec: AttentionSpec = {
    headDim: width / heads,
    causal: opts.causal ?? false,
    rowsPerGroup: lanes,
    // A whole head's rows in one workgroup, up to 8 per invocation (more would only add register spills).
    rowsPerInvocation: Math.min(MAX_ROWS_PER_INVOCATION, Math.ceil(tokens / lanes)),
    texture,
    shareRows: shareRows(gpu, texture),
  };
  const shape: AttentionShape = { batch, tokens, heads };
  const uniforms = attentionUniforms(shape, 1 / Math.sqrt(spec.headDim));
  const groups = attentionWorkgroups(spec, shape);
  const out = empty(gpu, [batch, tokens, width]);
  const lse = empty(gpu, [batch, heads, tokens]);
  const rows = (t: Tensor) => spec.texture ? rowTexture(t) : { binding: t.buffer, release: () => {} };
  const qkvRows = rows(qkv);
  gpu.dispatch(attentionForwardKernel(spec), [qkvRows.binding, out.buffer, lse.buffer], groups, uniforms);
  qkvRows.release();
  const result = record(out, "attention", [qkv], (g) => {
    const dqkv = empty(gpu, qkv.shape);
    const dots = empty(gpu, [batch, heads, tokens]);
    const [qkvRows, doutRows] = [rows(qkv), rows(g)];
    gpu.dispatch(
      attentionBackwardQueryKernel(spec),
      [qkvRows.binding, out.buffer, doutRows.binding, lse.buffer, dqkv.buffer, dots.buffer],
      groups,
      uniforms,
    );
    gpu.dispatch(
      attentionBackwardKeyValueKernel(spec),
      [qkvRows.binding, doutRows.binding, lse.buffer, dots.buffer, dqkv.buffer],
      groups,
      uniforms,
    );
    qkvRows.release();
    doutRows.release();
    dots.dispose();
    lse.dispose();
    return [dqkv];
  });
  if (!result.node) lse.dispose();
  return result;
}
