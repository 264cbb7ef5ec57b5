import { ClipError, UsageError } from "./lib/errors.ts";
import { aliases, commands } from "./lib/commands/registry.ts";

const VERSION = "0.1.0";

function mainHelp(): string {
  const width = Math.max(...commands.map((c) => c.name.length));
  const lines = commands.map((c) => `  ${c.name.padEnd(width)}  ${c.summary}`);
  return [
    `clip ${VERSION}: train and run CLIP image-text models on any GPU through WebGPU`,
    "",
    "usage: clip COMMAND [options]",
    "",
    "commands:",
    ...lines,
    "",
    "'clip COMMAND --help' describes a command. 'classify' is another name for 'zeroshot'.",
  ].join("\n");
}

async function main(argv: string[]): Promise<number> {
  const [first, ...rest] = argv;
  if (first === undefined || first === "--help" || first === "-h" || first === "help") {
    console.log(mainHelp());
    return first === undefined ? 2 : 0;
  }
  if (first === "--version" || first === "-V") {
    console.log(VERSION);
    return 0;
  }
  const name = aliases[first] ?? first;
  const command = commands.find((c) => c.name === name);
  if (!command) throw new UsageError(`unknown command '${first}'. Run 'clip --help' for the list of commands.`);
  return await command.run(rest);
}

if (import.meta.main) {
  let code: number;
  try {
    code = await main(Deno.args);
  } catch (e) {
    if (e instanceof UsageError) {
      console.error(`clip: ${e.message}`);
      code = 2;
    } else if (e instanceof ClipError) {
      console.error(`clip: ${e.message}`);
      code = 1;
    } else {
      console.error(`clip: unexpected error: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}`);
      code = 1;
    }
  }
  Deno.exit(code);
}
