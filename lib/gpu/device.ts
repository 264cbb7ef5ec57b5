import { ClipError } from "../errors.ts";

/** What we know about the adapter a device was created on. */
export interface AdapterSummary {
  description: string;
  vendor: string;
  architecture: string;
  /** DENO_WEBGPU_BACKEND when set; otherwise Deno's default order (Vulkan/Metal/DX12 before GL). */
  backend: string;
  /** A CPU implementation such as Mesa's llvmpipe/lavapipe. */
  isSoftware: boolean;
  /** SIMD lanes of f32 the CPU fallback packs along workgroup x (llvmpipe: 8 at 256 bits, 16 at 512); 0 on real GPUs. */
  cpuLanes: number;
  /** Invocations per subgroup when the device has subgroup operations and a fixed subgroup size; 0 otherwise. */
  subgroupSize: number;
  features: string[];
  limits: Record<string, number>;
}

const NO_ADAPTER_HELP =
  "no WebGPU adapter found. Install your GPU's Vulkan/Metal/DX12 driver, or for the CPU fallback " +
  "run 'apt-get install -y mesa-vulkan-drivers' (Debian/Ubuntu); DENO_WEBGPU_BACKEND=gl|vulkan picks a back end.";

/** Features we use when the adapter has them. */
const WANTED_FEATURES: GPUFeatureName[] = ["shader-f16", "timestamp-query"];

/**
 * llvmpipe vectorises along workgroup x with its native vector width; 512-bit lanes make register-tiled matmuls
 * 30-55% faster on CPUs with AVX-512. The variable must be set before the driver loads (the first requestAdapter),
 * and Mesa's on-disk shader cache does not key on it, so each width gets its own cache folder. It does nothing on
 * real GPUs. Users can opt out with CLIP_LLVMPIPE_WIDTH=256 or by setting LP_NATIVE_VECTOR_WIDTH themselves.
 */
function chooseSoftwareVectorWidth(): void {
  if (Deno.env.get("LP_NATIVE_VECTOR_WIDTH")) return;
  const wanted = Deno.env.get("CLIP_LLVMPIPE_WIDTH") ?? (cpuHasAvx512() ? "512" : "256");
  if (wanted !== "512" && wanted !== "256") return;
  Deno.env.set("LP_NATIVE_VECTOR_WIDTH", wanted);
  if (!Deno.env.get("MESA_SHADER_CACHE_DIR")) {
    const base = Deno.env.get("XDG_CACHE_HOME") ?? `${Deno.env.get("HOME") ?? "/tmp"}/.cache`;
    const dir = `${base}/clip/mesa-shader-cache-${wanted}`;
    try {
      Deno.mkdirSync(dir, { recursive: true });
      Deno.env.set("MESA_SHADER_CACHE_DIR", dir);
    } catch {
      // An unwritable cache folder only costs compile time: leave Mesa's default.
    }
  }
}

/** Mesa's EGL probe complains on stderr without a runtime folder (headless servers, CI); give it a private one. */
function quietHeadlessGl(): void {
  if (Deno.build.os !== "linux" || Deno.env.get("XDG_RUNTIME_DIR")) return;
  const dir = `/tmp/clip-runtime-${Deno.uid() ?? 0}`;
  try {
    Deno.mkdirSync(dir, { recursive: true, mode: 0o700 });
    Deno.env.set("XDG_RUNTIME_DIR", dir);
  } catch {
    // Only the warning is lost.
  }
}

function cpuHasAvx512(): boolean {
  try {
    return /\bavx512f\b/.test(Deno.readTextFileSync("/proc/cpuinfo"));
  } catch {
    return false;
  }
}

function limitsRecord(limits: GPUSupportedLimits): Record<string, number> {
  const out: Record<string, number> = {};
  // GPUSupportedLimits exposes its fields as prototype getters, so walk the prototype for the names.
  for (const key of Object.keys(Object.getPrototypeOf(limits))) {
    const value = (limits as unknown as Record<string, unknown>)[key];
    if (typeof value === "number") out[key] = value;
  }
  return out;
}

/**
 * Whether a workgroup of `lanes` invocations is exactly one subgroup, so that subgroup operations reach all of it:
 * the kernels that share fetches across their lanes need that.
 */
export function subgroupIsWorkgroup(adapter: AdapterSummary, lanes: number): boolean {
  return adapter.subgroupSize > 0 && adapter.subgroupSize === lanes;
}

export interface DeviceHandle {
  adapter: GPUAdapter;
  device: GPUDevice;
  summary: AdapterSummary;
}

/**
 * Subgroup operations when the device has them. Deno's adapter does not list "subgroups" for lavapipe, whose Vulkan
 * driver has every subgroup operation, so ask for it and fall back without it when the request is refused.
 */
async function requestWithSubgroups(
  adapter: GPUAdapter,
  requiredFeatures: GPUFeatureName[],
  requiredLimits: Record<string, number>,
): Promise<GPUDevice> {
  if (!requiredFeatures.includes("subgroups" as GPUFeatureName)) {
    try {
      return await adapter.requestDevice({
        requiredFeatures: [...requiredFeatures, "subgroups" as GPUFeatureName],
        requiredLimits,
      });
    } catch {
      // No subgroups on this adapter.
    }
  }
  return await adapter.requestDevice({ requiredFeatures, requiredLimits });
}

/** Requests the adapter and a device with the adapter's own limits and the features we can use. */
export async function createDevice(): Promise<DeviceHandle> {
  chooseSoftwareVectorWidth();
  quietHeadlessGl();
  if (!("gpu" in navigator) || !navigator.gpu) throw new ClipError(NO_ADAPTER_HELP);
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) throw new ClipError(NO_ADAPTER_HELP);
  const requiredFeatures = WANTED_FEATURES.filter((f) => adapter.features.has(f));
  const requiredLimits = limitsRecord(adapter.limits);
  const device = await requestWithSubgroups(adapter, requiredFeatures, requiredLimits);
  const info = adapter.info;
  const description = info.description || info.device || "unknown adapter";
  const isSoftware = info.isFallbackAdapter || /llvmpipe|lavapipe|swiftshader|software/i.test(description);
  const bits = /(\d+) bits/.exec(description);
  const summary: AdapterSummary = {
    description,
    vendor: info.vendor,
    architecture: info.architecture,
    backend: Deno.env.get("DENO_WEBGPU_BACKEND") ?? "default",
    isSoftware,
    cpuLanes: isSoftware ? (bits ? Number(bits[1]) / 32 : 8) : 0,
    subgroupSize: device.features.has("subgroups") && info.subgroupMinSize === info.subgroupMaxSize
      ? info.subgroupMinSize
      : 0,
    features: [...device.features].sort(),
    limits: limitsRecord(device.limits),
  };
  return { adapter, device, summary };
}
