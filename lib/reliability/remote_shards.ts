/**
 * Remote shards through a fault-injecting server on 127.0.0.1: each shard gets a queue of faults (HTTP 500, a
 * connection closed mid-tar, a stalled body, no response). A shard with at most `retries` faults must be read
 * whole, each sample byte for byte; one with more is skipped with a warning and counted, and the shards after it
 * are still read.
 */
import { Rng } from "../data/rng.ts";
import { openShard, type ShardRetry } from "../data/shards.ts";
import { IMAGE_TEXT_REQUIREMENTS, type RawSample, WebDatasetReader } from "../data/webdataset.ts";
import { FAULT_KINDS, type FaultKind, FaultServer } from "./fault_server.ts";
import { pick } from "./mutate.ts";
import { buildTar, type MemberSpec } from "./tar_bytes.ts";

export interface RemoteShardOptions {
  seed: number;
  /** Shards served; each gets a random fault queue. */
  shards: number;
  samplesPerShard?: number;
  retries?: number;
  backoffMs?: number;
  timeoutMs?: number;
  stallMs?: number;
}

export interface RemoteShardReport {
  shards: number;
  injected: Record<FaultKind, number>;
  retries: number;
  /** Shards given more faults than retries: expected to be skipped and counted. */
  shardsGivenUp: number;
  /** Samples of the shards given up that were not read: expected, and counted through failedShards. */
  samplesSkippedCounted: number;
  /** Samples missing or different from a shard that should have been read whole: must be 0. */
  samplesLost: number;
  samplesRead: number;
  warnings: string[];
  /** Everything that went against the rules above, in words. */
  problems: string[];
  seconds: number;
}

const encoder = new TextEncoder();

function shardMembers(rng: Rng, shard: number, samples: number): MemberSpec[] {
  const members: MemberSpec[] = [];
  for (let i = 0; i < samples; i++) {
    const image = new Uint8Array(2000 + rng.int(20000));
    for (let k = 0; k < image.length; k++) image[k] = rng.int(256);
    members.push({ name: `s${shard}_${i}.jpg`, data: image });
    members.push({ name: `s${shard}_${i}.txt`, data: encoder.encode(`caption ${shard} ${i}`) });
  }
  return members;
}

function equalBytes(a: Uint8Array | undefined, b: Uint8Array): boolean {
  return a !== undefined && a.length === b.length && a.every((x, i) => x === b[i]);
}

export async function runRemoteShardFaults(opts: RemoteShardOptions): Promise<RemoteShardReport> {
  const rng = new Rng(opts.seed);
  const retries = opts.retries ?? 2;
  const samples = opts.samplesPerShard ?? 6;
  const files = new Map<string, Uint8Array>();
  const faults = new Map<string, FaultKind[]>();
  const expected = new Map<string, Map<string, Uint8Array>>(); // path -> key -> image bytes
  for (let s = 0; s < opts.shards; s++) {
    const path = `/shard-${s}.tar`;
    const members = shardMembers(rng, s, samples);
    files.set(path, buildTar(members).bytes);
    expected.set(
      path,
      new Map(members.filter((m) => String(m.name).endsWith(".jpg")).map((m) => [String(m.name).slice(0, -4), m.data])),
    );
    // The first shards cover each kind once within the retries, then one over them; the rest are random.
    const queue: FaultKind[] = s < FAULT_KINDS.length
      ? [FAULT_KINDS[s]]
      : s === FAULT_KINDS.length
      ? new Array(retries + 1).fill("reset")
      : Array.from({ length: rng.int(retries + 2) }, () => pick(rng, FAULT_KINDS));
    faults.set(path, queue);
  }
  const givenUp = new Set([...faults].filter(([, q]) => q.length > retries).map(([p]) => p));
  const server = FaultServer.start({ files, faults });
  const urls = [...files.keys()].map((p) => server.url(p));
  const warnings: string[] = [];
  let retriesMade = 0;
  const started = performance.now();
  const read = new Map<string, RawSample[]>();
  try {
    const reader = new WebDatasetReader({
      shards: urls,
      required: IMAGE_TEXT_REQUIREMENTS,
      onWarning: (m) => warnings.push(m),
      openShard: (url) =>
        openShard(url, {
          retries,
          backoffMs: opts.backoffMs ?? 20,
          timeoutMs: opts.timeoutMs ?? 400,
          stallTimeoutMs: opts.stallMs ?? 400,
          onRetry: (_r: ShardRetry) => retriesMade++,
        }),
    });
    for await (const sample of reader.samples()) {
      const path = new URL(sample.shard).pathname;
      if (!read.has(path)) read.set(path, []);
      read.get(path)!.push(sample);
    }
    const problems: string[] = [];
    let lost = 0, skippedCounted = 0, samplesRead = 0;
    for (const [path, keys] of expected) {
      const got = read.get(path) ?? [];
      samplesRead += got.length;
      for (const sample of got) {
        if (!equalBytes(sample.files.get("jpg"), keys.get(sample.key) ?? new Uint8Array(0))) {
          problems.push(`${path}: sample ${sample.key} differs from what the server holds`);
        }
      }
      if (givenUp.has(path)) {
        skippedCounted += keys.size - got.length;
        if (!warnings.some((w) => w.includes(path))) problems.push(`${path} was given up without a warning`);
      } else if (got.length !== keys.size) {
        lost += keys.size - got.length;
        problems.push(`${path}: ${got.length} of ${keys.size} samples read after ${faults.get(path)!.length} faults`);
      }
    }
    if (reader.counters.failedShards !== givenUp.size) {
      problems.push(`${reader.counters.failedShards} shards counted as failed, expected ${givenUp.size}`);
    }
    return {
      shards: opts.shards,
      injected: { ...server.injected },
      retries: retriesMade,
      shardsGivenUp: givenUp.size,
      samplesSkippedCounted: skippedCounted,
      samplesLost: lost,
      samplesRead,
      warnings,
      problems,
      seconds: (performance.now() - started) / 1000,
    };
  } finally {
    await server.close();
  }
}
