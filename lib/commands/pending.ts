import { ClipError } from "../errors.ts";
import type { Command } from "./command.ts";

/** A command whose implementation has not landed yet: it answers --help and says plainly that it cannot run. */
export function pendingCommand(name: string, summary: string, usage: string): Command {
  return {
    name,
    summary,
    help: `${usage}\n\n${summary}\n\nNot available in this version yet.`,
    run(argv) {
      if (argv.includes("--help") || argv.includes("-h")) {
        console.log(this.help);
        return Promise.resolve(0);
      }
      throw new ClipError(`'clip ${name}' is not available in this version yet; see 'clip --help' for what is.`);
    },
  };
}
