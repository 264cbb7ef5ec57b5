/**
 * Shard sources: turning a user's spec into a list of shard locations, opening one as a byte stream, and splitting the
 * list across machines (explicit index/count, Kubernetes Indexed Jobs or Slurm arrays).
 *
 * Spec syntax, as WebDataset users write it: `a.tar::b.tar` joins sources, `shard-{000000..000099}.tar` is a numeric
 * range keeping the zero padding, `{train,val}` is a list, a directory means its `.tar` files in name order, and
 * http(s) URLs are streamed with fetch.
 */

import { ClipError, UsageError } from "../errors.ts";

/** Expanding a typo like `{0..99999999}` must fail fast instead of building a huge array. */
const MAX_SHARDS = 1_000_000;

function isUrl(s: string): boolean {
  return /^https?:\/\//i.test(s);
}

/** Splits on `::` except inside `[...]`, so an IPv6 URL such as `http://[::1]:8000/a.tar` stays whole. */
function splitSources(spec: string): string[] {
  const parts: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < spec.length; i++) {
    const c = spec[i];
    if (c === "[") depth++;
    else if (c === "]") depth = Math.max(0, depth - 1);
    else if (c === ":" && spec[i + 1] === ":" && depth === 0) {
      parts.push(spec.slice(start, i));
      start = i + 2;
      i++;
    }
  }
  parts.push(spec.slice(start));
  return parts.map((p) => p.trim()).filter((p) => p.length > 0);
}

/** Index of the `}` closing the `{` at `open`, or -1. */
function matchingBrace(s: string, open: number): number {
  let depth = 0;
  for (let i = open; i < s.length; i++) {
    if (s[i] === "{") depth++;
    else if (s[i] === "}" && --depth === 0) return i;
  }
  return -1;
}

/** Splits a brace body on its top-level commas. */
function splitTopLevel(body: string): string[] {
  const items: string[] = [];
  let depth = 0;
  let start = 0;
  for (let i = 0; i < body.length; i++) {
    if (body[i] === "{") depth++;
    else if (body[i] === "}") depth--;
    else if (body[i] === "," && depth === 0) {
      items.push(body.slice(start, i));
      start = i + 1;
    }
  }
  items.push(body.slice(start));
  return items;
}

function checkCount(n: number, pattern: string): void {
  if (n > MAX_SHARDS) {
    throw new ClipError(`the shard pattern "${pattern}" expands to more than ${MAX_SHARDS} names; check its braces`);
  }
}

/** The values of `{a..b}`, or undefined when the body is not a range. */
function rangeValues(body: string, pattern: string): string[] | undefined {
  const numeric = /^(-?\d+)\.\.(-?\d+)$/.exec(body);
  if (numeric) {
    const [, from, to] = numeric;
    const a = Number(from), b = Number(to);
    checkCount(Math.abs(b - a) + 1, pattern);
    // As in bash and Python's braceexpand: a leading zero on either end pads every value to the wider end.
    const padded = /^-?0\d/.test(from) || /^-?0\d/.test(to);
    const width = padded ? Math.max(from.length, to.length) : 0;
    const step = a <= b ? 1 : -1;
    const out: string[] = [];
    for (let v = a; step > 0 ? v <= b : v >= b; v += step) {
      const digits = String(Math.abs(v)).padStart(width - (v < 0 ? 1 : 0), "0");
      out.push(v < 0 ? `-${digits}` : digits);
    }
    return out;
  }
  const letters = /^([a-zA-Z])\.\.([a-zA-Z])$/.exec(body);
  if (letters) {
    const a = letters[1].charCodeAt(0), b = letters[2].charCodeAt(0);
    const step = a <= b ? 1 : -1;
    const out: string[] = [];
    for (let v = a; step > 0 ? v <= b : v >= b; v += step) out.push(String.fromCharCode(v));
    return out;
  }
  return undefined;
}

/**
 * Brace expansion of one pattern: `{000..012}` numeric ranges (zero padding kept), `{a..e}` letter ranges and
 * `{x,y,z}` lists, nested and repeated, expanded left to right. Braces that form neither stay literal.
 */
export function expandBraces(pattern: string): string[] {
  for (let open = pattern.indexOf("{"); open >= 0; open = pattern.indexOf("{", open + 1)) {
    const close = matchingBrace(pattern, open);
    if (close < 0) break;
    const body = pattern.slice(open + 1, close);
    const range = rangeValues(body, pattern);
    const items = splitTopLevel(body);
    let alternatives: string[];
    if (range) alternatives = range;
    else if (items.length > 1) alternatives = items.flatMap((item) => expandBraces(item));
    else continue; // `{x}` is literal text
    const prefix = pattern.slice(0, open);
    const suffixes = expandBraces(pattern.slice(close + 1));
    checkCount(alternatives.length * suffixes.length, pattern);
    const out: string[] = [];
    for (const alternative of alternatives) for (const suffix of suffixes) out.push(prefix + alternative + suffix);
    return out;
  }
  return [pattern];
}

function compareNames(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

function joinPath(dir: string, name: string): string {
  return dir.endsWith("/") ? dir + name : `${dir}/${name}`;
}

function localPath(location: string): string {
  return location.startsWith("file://") ? decodeURIComponent(new URL(location).pathname) : location;
}

function statOrUndefined(path: string): Deno.FileInfo | undefined {
  try {
    return Deno.statSync(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return undefined;
    throw new ClipError(`cannot read shard path "${path}": ${(e as Error).message}`);
  }
}

/**
 * Expands a shard spec into shard locations (local paths or http(s) URLs), checking before any work starts that the
 * list is not empty and that every local shard exists. Throws ClipError naming what is wrong.
 */
export function expandShards(spec: string): string[] {
  const sources = splitSources(spec);
  if (sources.length === 0) {
    throw new ClipError(`no shards given (spec "${spec}"); pass tar files, a directory or URLs`);
  }
  const shards: string[] = [];
  const missing: string[] = [];
  let missingPattern = "";
  for (const source of sources) {
    if (/^pipe:/i.test(source)) {
      throw new ClipError(`"${source}": pipe: shard sources are not supported; use a local path or an http(s) URL`);
    }
    for (const location of expandBraces(source)) {
      if (isUrl(location)) {
        shards.push(location);
        continue;
      }
      const path = localPath(location);
      const info = statOrUndefined(path);
      if (!info) {
        if (missing.length === 0) missingPattern = source;
        missing.push(path);
      } else if (info.isDirectory) {
        const tars = [...Deno.readDirSync(path)]
          .filter((e) => !e.isDirectory && e.name.toLowerCase().endsWith(".tar"))
          .map((e) => e.name)
          .sort(compareNames);
        if (tars.length === 0) throw new ClipError(`shard directory "${path}" contains no .tar files`);
        for (const name of tars) shards.push(joinPath(path, name));
      } else {
        shards.push(path);
      }
      checkCount(shards.length + missing.length, spec);
    }
  }
  if (missing.length > 0) {
    const others = missing.length > 1 ? ` (and ${missing.length - 1} more of ${missing.length + shards.length})` : "";
    throw new ClipError(
      `shard not found: "${
        missing[0]
      }"${others}, from "${missingPattern}"; check the path and the brace pattern's range`,
    );
  }
  if (shards.length === 0) throw new ClipError(`the shard spec "${spec}" matched no shards`);
  return shards;
}

export interface OpenShardOptions {
  /** Milliseconds to wait for an HTTP response's headers. Default 30 s. */
  timeoutMs?: number;
  /** Milliseconds an HTTP body may go without delivering a chunk before the download is abandoned. Default 60 s. */
  stallTimeoutMs?: number;
  /**
   * Further attempts after a transient failure of an HTTP shard: a connection error, a timeout, a stall, HTTP 5xx,
   * 408 or 429, or a body cut off mid-way (resumed with a Range request where the server allows it). Default 3.
   */
  retries?: number;
  /** Wait before the first retry, doubled before each further one (plus up to 20% jitter). Default 500 ms. */
  backoffMs?: number;
  /** Told about each retry before its wait, for logs. */
  onRetry?: (retry: ShardRetry) => void;
}

export interface ShardRetry {
  url: string;
  /** 1 for the first retry. */
  attempt: number;
  delayMs: number;
  /** What failed. */
  reason: string;
}

/** Opens a shard as a byte stream. Throws ClipError if the file is missing or the server cannot be reached or errs. */
export async function openShard(location: string, opts: OpenShardOptions = {}): Promise<ReadableStream<Uint8Array>> {
  if (isUrl(location)) return await new ShardDownload(location, opts).open();
  const path = localPath(location);
  try {
    const file = await Deno.open(path, { read: true });
    return file.readable; // closes the file when read to the end or cancelled
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new ClipError(`shard not found: "${path}"; check the path and the brace pattern's range`);
    }
    throw new ClipError(`cannot open shard "${path}": ${(e as Error).message}`);
  }
}

/** A failure worth another attempt (the server or the network may recover), as opposed to a definite answer. */
class TransientError extends Error {}

/** Redirects must not downgrade an https shard to plain http: http is used only when the user wrote an http URL. */
export function redirectAllowed(from: string, to: string): boolean {
  return !(from.toLowerCase().startsWith("https:") && to.toLowerCase().startsWith("http:"));
}

/**
 * One HTTP shard download: retries transient failures with exponential backoff, and when the body breaks off after
 * some bytes were handed on, continues from that byte (Range request; a server that answers 200 instead is read
 * again from the start, skipping what was already delivered), so the tar reader sees one uninterrupted stream.
 */
class ShardDownload {
  readonly #url: string;
  readonly #timeoutMs: number;
  readonly #stallMs: number;
  readonly #retries: number;
  readonly #backoffMs: number;
  readonly #onRetry?: (retry: ShardRetry) => void;
  #retriesUsed = 0;
  #delivered = 0;
  #body: ReadableStreamDefaultReader<Uint8Array> | null = null;
  #controller: AbortController | null = null;
  /** Bytes of a restarted (200) response still to drop because they were delivered before the break. */
  #toSkip = 0;

  constructor(url: string, opts: OpenShardOptions) {
    this.#url = url;
    this.#timeoutMs = opts.timeoutMs ?? 30_000;
    this.#stallMs = opts.stallTimeoutMs ?? 60_000;
    this.#retries = Math.max(0, opts.retries ?? 3);
    this.#backoffMs = Math.max(0, opts.backoffMs ?? 500);
    this.#onRetry = opts.onRetry;
  }

  async open(): Promise<ReadableStream<Uint8Array>> {
    await this.#connectWithRetries();
    return new ReadableStream<Uint8Array>({
      pull: (out) => this.#pull(out),
      cancel: (reason) => this.#body?.cancel(reason),
    }, { highWaterMark: 0 });
  }

  async #pull(out: ReadableStreamDefaultController<Uint8Array>): Promise<void> {
    for (;;) {
      let chunk: Uint8Array | undefined;
      try {
        chunk = await this.#read();
      } catch (e) {
        const reason = (e as Error).message;
        try {
          await this.#retryAfter(reason);
          await this.#connectWithRetries();
        } catch (final) {
          out.error(final);
          return;
        }
        continue;
      }
      if (chunk === undefined) return out.close();
      if (this.#toSkip > 0) {
        const drop = Math.min(this.#toSkip, chunk.length);
        this.#toSkip -= drop;
        chunk = chunk.subarray(drop);
        if (chunk.length === 0) continue;
      }
      this.#delivered += chunk.length;
      out.enqueue(chunk);
      return;
    }
  }

  /** The next body chunk, or undefined at the end; throws TransientError when the body breaks or stalls. */
  async #read(): Promise<Uint8Array | undefined> {
    const controller = this.#controller!;
    let stalled = false;
    const timer = setTimeout(() => {
      stalled = true;
      controller.abort();
    }, this.#stallMs);
    try {
      const { value, done } = await this.#body!.read();
      return done ? undefined : value;
    } catch (e) {
      throw new TransientError(
        stalled ? `stalled: no data for ${this.#stallMs} ms` : `failed: ${(e as Error).message}`,
      );
    } finally {
      clearTimeout(timer);
    }
  }

  /** Waits out the backoff before the next attempt, or throws the final ClipError when the retries are spent. */
  async #retryAfter(reason: string): Promise<void> {
    if (this.#retriesUsed >= this.#retries) {
      const attempts = this.#retriesUsed + 1;
      throw new ClipError(
        `download of shard ${this.#url} ${reason} (gave up after ${attempts} attempt${attempts > 1 ? "s" : ""})`,
      );
    }
    this.#retriesUsed++;
    const delayMs = Math.round(this.#backoffMs * 2 ** (this.#retriesUsed - 1) * (1 + 0.2 * Math.random()));
    this.#onRetry?.({ url: this.#url, attempt: this.#retriesUsed, delayMs, reason });
    await new Promise((resolve) => setTimeout(resolve, delayMs));
  }

  async #connectWithRetries(): Promise<void> {
    for (;;) {
      try {
        await this.#connect();
        return;
      } catch (e) {
        if (!(e instanceof TransientError)) throw e;
        await this.#retryAfter(e.message);
      }
    }
  }

  /** One request, from the first byte not yet delivered. Throws TransientError or, for a definite answer, ClipError. */
  async #connect(): Promise<void> {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
    const headers: HeadersInit = this.#delivered > 0 ? { Range: `bytes=${this.#delivered}-` } : {};
    let response: Response;
    try {
      response = await fetch(this.#url, { signal: controller.signal, headers });
    } catch (e) {
      const reason = controller.signal.aborted ? `no response within ${this.#timeoutMs} ms` : (e as Error).message;
      throw new TransientError(`failed: ${reason}`);
    } finally {
      clearTimeout(timer);
    }
    if (response.redirected && !redirectAllowed(this.#url, response.url)) {
      await response.body?.cancel();
      throw new ClipError(
        `shard ${this.#url} redirected to plain http (${response.url}); refused: give an http:// URL to allow http`,
      );
    }
    const status = `HTTP ${response.status} ${response.statusText}`.trimEnd();
    if (!response.ok || !response.body) {
      await response.body?.cancel();
      const transient = response.status >= 500 || response.status === 408 || response.status === 429;
      if (transient) throw new TransientError(`failed: ${status}`);
      throw new ClipError(`cannot fetch shard ${this.#url}: ${status}`);
    }
    this.#toSkip = 0;
    if (this.#delivered > 0) {
      const resumedAt = response.status === 206 ? contentRangeStart(response.headers.get("content-range")) : 0;
      if (resumedAt !== 0 && resumedAt !== this.#delivered) {
        await response.body.cancel();
        throw new TransientError(`failed: the server resumed at byte ${resumedAt} instead of ${this.#delivered}`);
      }
      if (resumedAt === 0) this.#toSkip = this.#delivered;
    }
    this.#body = response.body.getReader();
    this.#controller = controller;
  }
}

function contentRangeStart(header: string | null): number {
  const match = header ? /^bytes (\d+)-/.exec(header) : null;
  return match ? Number(match[1]) : -1;
}

/** Shard i goes to partition i % count: deterministic, balanced to within one shard, and independent of timing. */
export function partitionShards<T>(shards: readonly T[], index: number, count: number): T[] {
  if (!Number.isInteger(count) || count < 1) {
    throw new UsageError(`shard count must be a positive integer, got ${count}`);
  }
  if (!Number.isInteger(index) || index < 0 || index >= count) {
    throw new UsageError(`shard index must be an integer in 0..${count - 1} for shard count ${count}, got ${index}`);
  }
  return shards.filter((_, i) => i % count === index);
}

export interface Partition {
  index: number;
  count: number;
  /** Which environment variables the partition came from, for logs. */
  source: string;
}

function envInt(env: Record<string, string | undefined>, name: string): number | undefined {
  const raw = env[name];
  if (raw === undefined || raw.trim() === "") return undefined;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 0) throw new UsageError(`${name} must be a non-negative integer, got "${raw}"`);
  return n;
}

/**
 * This process's partition as set by a batch scheduler, or undefined when none is set:
 * Kubernetes Indexed Jobs (`JOB_COMPLETION_INDEX`, with the count from `CLIP_SHARD_COUNT` or `JOB_COMPLETIONS`)
 * or Slurm job arrays (`SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN` of `SLURM_ARRAY_TASK_COUNT`).
 * Pass `Deno.env.toObject()`.
 */
export function partitionFromEnv(env: Record<string, string | undefined>): Partition | undefined {
  const completionIndex = envInt(env, "JOB_COMPLETION_INDEX");
  if (completionIndex !== undefined) {
    const fromClip = envInt(env, "CLIP_SHARD_COUNT");
    const count = fromClip ?? envInt(env, "JOB_COMPLETIONS");
    if (count === undefined) {
      throw new UsageError(
        "JOB_COMPLETION_INDEX is set but the number of partitions is not: set CLIP_SHARD_COUNT (or JOB_COMPLETIONS) " +
          "to the Job's completions",
      );
    }
    const source = `JOB_COMPLETION_INDEX of ${fromClip !== undefined ? "CLIP_SHARD_COUNT" : "JOB_COMPLETIONS"}`;
    return checked({ index: completionIndex, count, source });
  }
  const taskId = envInt(env, "SLURM_ARRAY_TASK_ID");
  if (taskId !== undefined) {
    const count = envInt(env, "SLURM_ARRAY_TASK_COUNT");
    if (count === undefined) throw new UsageError("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not");
    const min = envInt(env, "SLURM_ARRAY_TASK_MIN") ?? 0;
    const partition = { index: taskId - min, count, source: "SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT" };
    if (partition.index < 0 || partition.index >= count) {
      throw new UsageError(
        `SLURM_ARRAY_TASK_ID ${taskId} minus SLURM_ARRAY_TASK_MIN ${min} is outside 0..${count - 1}: ` +
          "use a contiguous array without a step (e.g. --array=0-" + (count - 1) + ")",
      );
    }
    return partition;
  }
  return undefined;
}

function checked(p: Partition): Partition {
  if (p.count < 1) throw new UsageError(`${p.source}: the partition count must be at least 1, got ${p.count}`);
  if (p.index >= p.count) {
    throw new UsageError(`${p.source}: index ${p.index} is outside 0..${p.count - 1}; check the Job's completions`);
  }
  return p;
}
