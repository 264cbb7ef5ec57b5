import { createDevice } from "../gpu/device.ts";
import { resolveModel } from "../io/pretrained.ts";
import { describeModel } from "../nn/describe.ts";
import { type Command, parseCommandArgs } from "./command.ts";

const HELP = `usage: clip info [--json] [--model M]

Describes the WebGPU adapter clip runs on: its name, back end, whether it is a software (CPU) fallback, the
features enabled and the limits the device was created with. With --model, describes a model instead: its
architecture, parameter count and the memory its weights need.

options:
  --model M  config name or JSON, checkpoint folder, hf-hub:ORG/NAME or pretrained tag
  --json     print one JSON object instead of text
  -h, --help show this help

environment:
  DENO_WEBGPU_BACKEND=vulkan|gl|metal|dx12   choose the back end
  CLIP_LLVMPIPE_WIDTH=256|512                SIMD width of the CPU fallback (default: 512 when the CPU has AVX-512)`;

export const infoCommand: Command = {
  name: "info",
  summary: "Describe the GPU adapter, back end, features and limits.",
  help: HELP,
  async run(argv) {
    const { values } = parseCommandArgs("info", argv, { json: { type: "boolean" }, model: { type: "string" } });
    if (values.help) {
      console.log(HELP);
      return 0;
    }
    if (values.model) return await describe(values.model, !!values.json);
    const { device, summary } = await createDevice();
    device.destroy();
    if (values.json) {
      console.log(JSON.stringify(summary, null, 2));
      return 0;
    }
    const lines = [
      `adapter:   ${summary.description}`,
      `vendor:    ${summary.vendor || "-"}${summary.architecture ? ` (${summary.architecture})` : ""}`,
      `back end:  ${summary.backend}`,
      `software:  ${summary.isSoftware ? `yes (CPU fallback, ${summary.cpuLanes} f32 lanes)` : "no"}`,
      `features:  ${summary.features.join(", ") || "-"}`,
      "limits:",
      ...Object.entries(summary.limits).map(([k, v]) => `  ${k.padEnd(42)} ${v}`),
    ];
    console.log(lines.join("\n"));
    return 0;
  },
};

const mib = (bytes: number) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;

async function describe(spec: string, json: boolean): Promise<number> {
  const resolved = await resolveModel(spec);
  const d = describeModel(resolved.config, resolved.preprocess, resolved.source, resolved.weightsPath !== null);
  if (json) {
    console.log(JSON.stringify(d, null, 2));
    return 0;
  }
  const p = d.preprocess;
  console.log([
    `model:       ${spec}${d.hasWeights ? ` (weights: ${d.source})` : " (config only: weights are initialised)"}`,
    `image tower: ${d.vision}`,
    `text tower:  ${d.text}`,
    `embedding:   ${d.embedDim}, activation ${d.activation}`,
    `parameters:  ${d.parameters.total.toLocaleString("en")} (image ${d.parameters.vision.toLocaleString("en")}, text ${
      d.parameters.text.toLocaleString("en")
    })`,
    `weights:     ${mib(d.weightBytes.f32)} in f32, ${mib(d.weightBytes.f16)} in f16`,
    `preprocess:  ${p.size} px, mean [${p.mean.join(", ")}], std [${p.std.join(", ")}]`,
  ].join("\n"));
  return 0;
}
