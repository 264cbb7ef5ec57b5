// Operand textures of the texture-read kernels (matmul and attention on CPU back ends): a pool that reuses them
// across calls, and the fill of one from a tensor (a buffer-to-texture copy where the layout allows, else the pack
// kernel, which also pads and widens f16).
import {
  operandCopies,
  type OperandLayout,
  packKernel,
  packUniforms,
  packVec4,
  packWorkgroups,
} from "../../../kernels/matmul_texture.ts";
import type { Gpu } from "../../gpu/runtime.ts";
import type { Tensor } from "../tensor.ts";

export interface PooledTexture {
  texture: GPUTexture;
  view: GPUTextureView;
  sizeKey: string;
}

/**
 * Reuses operand textures across calls, so a training step of fixed shapes creates its textures once. Extents are
 * rounded up to powers of two: llvmpipe compiles a separate variant of a shader for each combination of
 * power-of-two and other texture extents it is run with (25 s each for the 32x32 kernel), and the kernels address
 * textures through uniforms, so a bigger texture serves as well.
 */
export class TexturePool {
  private free = new Map<string, PooledTexture[]>();

  constructor(private gpu: Gpu) {}

  private extent(n: number): number {
    return 2 ** Math.ceil(Math.log2(Math.max(n, 1)));
  }

  acquire(width: number, height: number): PooledTexture {
    const w = this.extent(width);
    const h = this.extent(height);
    const sizeKey = `${w}x${h}`;
    const reused = this.free.get(sizeKey)?.pop();
    if (reused) return reused;
    const usage = GPUTextureUsage.STORAGE_BINDING | GPUTextureUsage.COPY_DST;
    const texture = this.gpu.createTexture(w, h, usage, `operand ${sizeKey}`);
    return { texture, view: texture.createView(), sizeKey };
  }

  release(t: PooledTexture): void {
    let list = this.free.get(t.sizeKey);
    if (!list) this.free.set(t.sizeKey, list = []);
    list.push(t);
  }
}

const pools = new WeakMap<Gpu, TexturePool>();

export function texturePool(gpu: Gpu): TexturePool {
  let pool = pools.get(gpu);
  if (!pool) {
    pool = new TexturePool(gpu);
    pools.set(gpu, pool);
  }
  return pool;
}

/** Writes a tensor's stored matrices into `tex` as `layout` places them. */
export function fillOperandTexture(t: Tensor, tex: PooledTexture, layout: OperandLayout): void {
  const gpu = t.gpu;
  if (layout.copied) {
    gpu.withEncoder((encoder) => {
      for (const c of operandCopies(layout)) {
        encoder.copyBufferToTexture(
          { buffer: t.buffer, offset: c.bufferOffset, bytesPerRow: c.bytesPerRow },
          { texture: tex.texture, origin: [c.x, 0] },
          [c.width, c.height],
        );
      }
    });
    return;
  }
  const stride = layout.batches > 1 ? layout.rows * layout.cols : 0;
  gpu.dispatch(
    packKernel(packVec4(layout), t.dtype === "f16" ? "f16" : "f32"),
    [t.buffer, tex.view],
    packWorkgroups(layout),
    packUniforms(layout, stride),
    `${layout.batches}x${layout.rows}x${layout.cols}`,
  );
}
