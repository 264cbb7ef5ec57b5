/**
 * Running `clip` as a child process, as a user would, for the kill and output-fault scenarios: spawn with the
 * arguments, collect stderr while it runs, kill it with SIGKILL at a chosen moment, and make small image-caption
 * shards for it to read.
 */
import sharp from "sharp";
import { TarWriter } from "../data/tar_writer.ts";

export const CLI_PATH = new URL("../../cli.ts", import.meta.url).pathname;

export interface RunResult {
  code: number;
  stderr: string;
}

export interface ClipProcessOptions {
  env?: Record<string, string>;
  /** A command (and its arguments) that runs deno, e.g. a shell setting a resource limit first. */
  prefix?: string[];
  /** Deno permission flags; default -A. */
  permissions?: string[];
}

/** A running `clip` process whose stderr is collected as it arrives. */
export class ClipProcess {
  readonly #child: Deno.ChildProcess;
  #stderr = "";
  readonly #collecting: Promise<void>;
  readonly status: Promise<Deno.CommandStatus>;

  constructor(args: string[], opts: ClipProcessOptions = {}) {
    const denoArgs = ["run", ...(opts.permissions ?? ["-A"]), CLI_PATH, ...args];
    const [program, ...rest] = opts.prefix
      ? [...opts.prefix, Deno.execPath(), ...denoArgs]
      : [Deno.execPath(), ...denoArgs];
    const child = new Deno.Command(program, {
      args: rest,
      env: opts.env,
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.#collecting = (async () => {
      for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) this.#stderr += text;
    })();
    this.status = this.#child.status;
  }

  get stderr(): string {
    return this.#stderr;
  }

  kill(): void {
    try {
      this.#child.kill("SIGKILL");
    } catch {
      // already exited
    }
  }

  async wait(): Promise<RunResult> {
    const status = await this.status;
    await this.#collecting;
    return { code: status.code, stderr: this.#stderr };
  }
}

export function runClip(args: string[], opts: ClipProcessOptions = {}): Promise<RunResult> {
  return new ClipProcess(args, opts).wait();
}

/** Polls `condition` every `intervalMs` until it holds, the process ends, or `timeoutMs` passes. */
export async function waitFor(
  condition: () => Promise<boolean> | boolean,
  process: ClipProcess,
  timeoutMs: number,
  intervalMs = 5,
): Promise<boolean> {
  let exited = false;
  process.status.then(() => exited = true);
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline && !exited) {
    if (await condition()) return true;
    await new Promise((r) => setTimeout(r, intervalMs));
  }
  return false;
}

/**
 * `shards` tar shards of `perShard` samples each (a 20x20 PNG of a distinct colour and a caption), with sizes.json.
 * Returns the brace pattern naming them.
 */
export async function makeImageShards(dir: string, shards: number, perShard: number): Promise<string> {
  const colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"];
  const sizes: Record<string, number> = {};
  for (let s = 0; s < shards; s++) {
    const name = `train-${s}.tar`;
    const w = await TarWriter.create(`${dir}/${name}`);
    for (let i = 0; i < perShard; i++) {
      const n = s * perShard + i;
      const background = { r: (n * 37) % 256, g: (n * 91) % 256, b: (n * 53) % 256 };
      const png = await sharp({ create: { width: 20, height: 20, channels: 3, background } }).png().toBuffer();
      await w.add(`k${n}.png`, new Uint8Array(png));
      await w.add(`k${n}.txt`, new TextEncoder().encode(`a ${colours[n % 8]} square number ${n}`));
    }
    await w.close();
    sizes[name] = perShard;
  }
  await Deno.writeTextFile(`${dir}/sizes.json`, JSON.stringify(sizes));
  return `${dir}/train-{0..${shards - 1}}.tar`;
}
