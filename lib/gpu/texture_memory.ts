/**
 * Bytes held by textures. Kernels create their textures straight on the device (operand textures of the matmul
 * kernels, pooled by their op), so the count is kept where every texture is made: the device's createTexture is wrapped
 * once, and each texture's destroy gives its bytes back.
 */

/** Bytes per texel; a format not listed counts as 16 bytes, the widest, so that a total never understates. */
const TEXEL_BYTES: Record<string, number> = {
  rgba32float: 16,
  rgba32uint: 16,
  rgba32sint: 16,
  rgba16float: 8,
  rg32float: 8,
  r32float: 4,
  r32uint: 4,
  r32sint: 4,
  rgba8unorm: 4,
  bgra8unorm: 4,
  r8unorm: 1,
};

function extent(size: GPUExtent3D): [number, number, number] {
  if (Array.isArray(size) || Symbol.iterator in Object(size)) {
    const [w, h = 1, d = 1] = [...(size as Iterable<number>)];
    return [w, h, d];
  }
  const s = size as GPUExtent3DDict;
  return [s.width, s.height ?? 1, s.depthOrArrayLayers ?? 1];
}

/** Bytes of a texture's base level times its sample count (every texture made here has one level). */
export function textureBytes(d: GPUTextureDescriptor): number {
  const [w, h, layers] = extent(d.size);
  let bytes = 0;
  for (let level = 0; level < (d.mipLevelCount ?? 1); level++) {
    bytes += Math.max(1, w >> level) * Math.max(1, h >> level) * layers;
  }
  return bytes * (TEXEL_BYTES[d.format] ?? 16) * (d.sampleCount ?? 1);
}

export class TextureMemory {
  /** Bytes of the textures created on the device and not destroyed. */
  bytes = 0;
  peakBytes = 0;

  constructor(device: GPUDevice) {
    const create = device.createTexture.bind(device);
    device.createTexture = (descriptor: GPUTextureDescriptor): GPUTexture => {
      const texture = create(descriptor);
      const size = textureBytes(descriptor);
      this.bytes += size;
      this.peakBytes = Math.max(this.peakBytes, this.bytes);
      const destroy = texture.destroy.bind(texture);
      let live = true;
      texture.destroy = () => {
        if (live) this.bytes -= size;
        live = false;
        destroy();
      };
      return texture;
    };
  }
}
