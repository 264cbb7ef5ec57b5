import { parseArgs, type ParseArgsConfig } from "node:util";
import { UsageError } from "../errors.ts";

/** One `clip` sub-command. `run` returns the process exit code; it throws UsageError or ClipError on failure. */
export interface Command {
  name: string;
  /** One line for `clip --help`. */
  summary: string;
  /** The full `clip NAME --help` text. */
  help: string;
  run(argv: string[]): Promise<number>;
}

type Options = NonNullable<ParseArgsConfig["options"]>;

/** parseArgs with errors turned into UsageError naming the command, so every command reports bad flags the same way. */
export function parseCommandArgs<O extends Options>(
  command: string,
  argv: string[],
  options: O,
  allowPositionals = false,
) {
  try {
    return parseArgs({
      args: argv,
      options: { ...options, help: { type: "boolean", short: "h" } },
      allowPositionals,
      strict: true,
    });
  } catch (e) {
    throw new UsageError(`${command}: ${(e as Error).message}. Run 'clip ${command} --help' for usage.`);
  }
}

/** Parses a flag that must be a non-negative integer. */
export function intFlag(command: string, name: string, value: string | undefined, fallback: number): number {
  if (value === undefined) return fallback;
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) {
    throw new UsageError(`${command}: --${name} must be a non-negative integer, got '${value}'.`);
  }
  return n;
}
