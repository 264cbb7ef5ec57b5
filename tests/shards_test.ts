import assert from "node:assert/strict";
import { ClipError, UsageError } from "../lib/errors.ts";
import { expandBraces, expandShards, openShard, partitionFromEnv, partitionShards } from "../lib/data/shards.ts";

async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir();
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

async function readStream(stream: ReadableStream<Uint8Array>): Promise<Uint8Array> {
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

Deno.test("shards: brace ranges keep zero padding, lists and nesting expand left to right", () => {
  assert.deepEqual(expandBraces("s-{000000..000003}.tar"), [
    "s-000000.tar",
    "s-000001.tar",
    "s-000002.tar",
    "s-000003.tar",
  ]);
  assert.deepEqual(expandBraces("{8..010}"), ["008", "009", "010"]); // the padded end sets the width
  assert.deepEqual(expandBraces("{8..10}"), ["8", "9", "10"]);
  assert.deepEqual(expandBraces("{3..1}"), ["3", "2", "1"]);
  assert.deepEqual(expandBraces("{-1..1}"), ["-1", "0", "1"]);
  assert.deepEqual(expandBraces("{a..c}"), ["a", "b", "c"]);
  assert.deepEqual(expandBraces("{train,val}/{a,b}.tar"), ["train/a.tar", "train/b.tar", "val/a.tar", "val/b.tar"]);
  assert.deepEqual(expandBraces("x{a,b{1..2}}y"), ["xay", "xb1y", "xb2y"]);
  assert.deepEqual(expandBraces("{x}-{0..1}"), ["{x}-0", "{x}-1"]); // a one-item brace is literal
  assert.deepEqual(expandBraces("a{b"), ["a{b"]);
  assert.deepEqual(expandBraces("plain.tar"), ["plain.tar"]);
  assert.throws(() => expandBraces("{0..99999999}"), ClipError);
  assert.throws(() => expandBraces("{0..9999}{0..9999}"), ClipError);
});

Deno.test("shards: expandShards resolves patterns, '::' joins, directories and URLs", async () => {
  await withTempDir(async (dir) => {
    for (const i of [0, 1, 2, 3]) await Deno.writeFile(`${dir}/s-00000${i}.tar`, new Uint8Array([i]));
    await Deno.mkdir(`${dir}/d`);
    for (const name of ["b.tar", "a.tar", "c.TAR", "notes.txt"]) {
      await Deno.writeFile(`${dir}/d/${name}`, new Uint8Array(1));
    }
    await Deno.mkdir(`${dir}/d/sub.tar`); // a directory named like a shard is not a shard

    assert.deepEqual(expandShards(`${dir}/s-{000000..000002}.tar`), [0, 1, 2].map((i) => `${dir}/s-00000${i}.tar`));
    assert.deepEqual(
      expandShards(`${dir}/s-000003.tar :: ${dir}/d :: https://host/x-{00..01}.tar`),
      [
        `${dir}/s-000003.tar`,
        `${dir}/d/a.tar`,
        `${dir}/d/b.tar`,
        `${dir}/d/c.TAR`,
        "https://host/x-00.tar",
        "https://host/x-01.tar",
      ],
    );
    assert.deepEqual(expandShards(`file://${dir}/s-000001.tar`), [`${dir}/s-000001.tar`]);
    assert.deepEqual(expandShards("http://[::1]:8080/a.tar::http://h/b.tar"), [
      "http://[::1]:8080/a.tar",
      "http://h/b.tar",
    ]);
  });
});

Deno.test("shards: a missing shard is a ClipError naming it and the pattern", async () => {
  await withTempDir(async (dir) => {
    for (const i of [0, 1]) await Deno.writeFile(`${dir}/s-00000${i}.tar`, new Uint8Array(1));
    const spec = `${dir}/s-{000000..000003}.tar`;
    assert.throws(() => expandShards(spec), (e: Error) => {
      assert.ok(e instanceof ClipError);
      assert.match(e.message, /s-000002\.tar/);
      assert.match(e.message, /and 1 more of 4/);
      assert.match(e.message, /brace pattern/);
      return true;
    });
    await Deno.mkdir(`${dir}/empty`);
    assert.throws(() => expandShards(`${dir}/empty`), /contains no \.tar files/);
    assert.throws(() => expandShards(""), ClipError);
    assert.throws(() => expandShards(" :: "), ClipError);
    assert.throws(() => expandShards("pipe:curl -s http://x/a.tar"), /not supported/);
    await assert.rejects(
      openShard(`${dir}/nope.tar`),
      (e: Error) => e instanceof ClipError && /nope\.tar/.test(e.message),
    );
  });
});

Deno.test("shards: openShard streams local files and http(s) URLs, with clear errors", async () => {
  const payload = new Uint8Array(200_000).map((_, i) => (i * 31) & 0xff);
  const stall = new AbortController();
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {}, signal: stall.signal }, (request) => {
    const path = new URL(request.url).pathname;
    if (path === "/shard.tar") return new Response(payload);
    if (path === "/stall.tar") {
      // Sends one chunk, then nothing: the client must give up on its own.
      return new Response(
        new ReadableStream({
          start(c) {
            c.enqueue(payload.subarray(0, 1000));
          },
        }),
      );
    }
    return new Response("no such shard", { status: 404, statusText: "Not Found" });
  });
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    assert.deepEqual(await readStream(await openShard(`${base}/shard.tar`)), payload);
    await assert.rejects(
      openShard(`${base}/missing.tar`),
      (e: Error) => e instanceof ClipError && /HTTP 404/.test(e.message),
    );
    const stalled = await openShard(`${base}/stall.tar`, { stallTimeoutMs: 200 });
    await assert.rejects(readStream(stalled), /stalled: no data for 200 ms/);
    await assert.rejects(
      openShard("http://127.0.0.1:1/unreachable.tar"),
      (e: Error) => e instanceof ClipError && /127\.0\.0\.1:1/.test(e.message),
    );
    await withTempDir(async (dir) => {
      await Deno.writeFile(`${dir}/a.tar`, payload);
      assert.deepEqual(await readStream(await openShard(`${dir}/a.tar`)), payload);
    });
  } finally {
    stall.abort();
    await server.finished;
  }
});

Deno.test("shards: partitionShards sends shard i to partition i % count", () => {
  const shards = Array.from({ length: 10 }, (_, i) => `s${i}`);
  assert.deepEqual(partitionShards(shards, 0, 3), ["s0", "s3", "s6", "s9"]);
  assert.deepEqual(partitionShards(shards, 2, 3), ["s2", "s5", "s8"]);
  const union = [0, 1, 2, 3].flatMap((i) => partitionShards(shards, i, 4)).sort();
  assert.deepEqual(union, [...shards].sort());
  assert.deepEqual(partitionShards(shards, 11, 12), []);
  assert.throws(() => partitionShards(shards, 3, 3), UsageError);
  assert.throws(() => partitionShards(shards, 0, 0), UsageError);
  assert.throws(() => partitionShards(shards, 0.5, 2), UsageError);
});

Deno.test("shards: partitionFromEnv reads Kubernetes Indexed Jobs and Slurm arrays", () => {
  assert.equal(partitionFromEnv({}), undefined);
  assert.deepEqual(partitionFromEnv({ JOB_COMPLETION_INDEX: "3", CLIP_SHARD_COUNT: "8", JOB_COMPLETIONS: "99" }), {
    index: 3,
    count: 8,
    source: "JOB_COMPLETION_INDEX of CLIP_SHARD_COUNT",
  });
  assert.deepEqual(partitionFromEnv({ JOB_COMPLETION_INDEX: "0", JOB_COMPLETIONS: "4" })?.count, 4);
  assert.throws(() => partitionFromEnv({ JOB_COMPLETION_INDEX: "2" }), /CLIP_SHARD_COUNT/);
  assert.throws(() => partitionFromEnv({ JOB_COMPLETION_INDEX: "4", CLIP_SHARD_COUNT: "4" }), UsageError);
  assert.throws(() => partitionFromEnv({ JOB_COMPLETION_INDEX: "x", CLIP_SHARD_COUNT: "4" }), /non-negative integer/);

  const slurm = partitionFromEnv({ SLURM_ARRAY_TASK_ID: "7", SLURM_ARRAY_TASK_MIN: "5", SLURM_ARRAY_TASK_COUNT: "4" });
  assert.deepEqual([slurm?.index, slurm?.count], [2, 4]);
  assert.deepEqual(partitionFromEnv({ SLURM_ARRAY_TASK_ID: "1", SLURM_ARRAY_TASK_COUNT: "2" })?.index, 1);
  // --array=0-6:2 gives ids 0,2,4,6 and count 4: id 6 does not map to a contiguous index.
  assert.throws(
    () => partitionFromEnv({ SLURM_ARRAY_TASK_ID: "6", SLURM_ARRAY_TASK_MIN: "0", SLURM_ARRAY_TASK_COUNT: "4" }),
    /contiguous/,
  );
  assert.throws(() => partitionFromEnv({ SLURM_ARRAY_TASK_ID: "1" }), /SLURM_ARRAY_TASK_COUNT/);
});
