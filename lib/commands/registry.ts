import type { Command } from "./command.ts";
import { demoCommand } from "./demo.ts";
import { embedCommand } from "./embed.ts";
import { evalCommand } from "./eval.ts";
import { infoCommand } from "./info.ts";
import { zeroshotCommand } from "./zeroshot.ts";
import { packCommand } from "./pack.ts";
import { tokenizeCommand } from "./tokenize.ts";
import { trainCommand } from "./train.ts";

/** Every command by name, in the order `clip --help` lists them. */
export const commands: Command[] = [
  trainCommand,
  embedCommand,
  zeroshotCommand,
  evalCommand,
  packCommand,
  tokenizeCommand,
  infoCommand,
  demoCommand,
];

/** Other names users may type for a command. */
export const aliases: Record<string, string> = { classify: "zeroshot" };
