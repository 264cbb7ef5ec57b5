import { createDevice } from "../gpu/device.ts";
import { type Command, parseCommandArgs } from "./command.ts";

const HELP = `usage: clip info [--json]

Describes the WebGPU adapter clip runs on: its name, back end, whether it is a software (CPU) fallback, the
features enabled and the limits the device was created with.

options:
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
    const { values } = parseCommandArgs("info", argv, { json: { type: "boolean" } });
    if (values.help) {
      console.log(HELP);
      return 0;
    }
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
