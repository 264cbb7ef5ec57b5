// Partitioned `clip eval`: 3 partitions over 7 shards (by flags, by a Kubernetes Indexed Job's environment in a child
// process, by a Slurm array's environment), each writing its parts; --merge of their folders gives exactly the JSON of
// a single run, every sample is in exactly one part, and a missing partition is named. The single run's numbers are
// checked against independent references in eval_test.ts.
import assert from "node:assert/strict";
import { evalCommand } from "../lib/commands/eval.ts";
import { ClipTokenizer } from "../lib/data/tokenizer.ts";
import { getGpu } from "../lib/gpu/runtime.ts";
import { readNpy } from "../lib/io/npy.ts";
import { loadModel } from "../lib/nn/load.ts";
import {
  captured,
  colourImage,
  maxAbsDiff,
  referenceClassifier,
  referenceFeaturesOfFiles,
  type SampleSpec,
  VIT_TINY,
  writeShards,
} from "./eval_helpers.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;
const SHARDS = 7;
const CLASSES = ["red", "green", "blue"];
const RGB: [number, number, number][] = [[200, 30, 40], [40, 180, 60], [30, 50, 210]];

interface Sample {
  key: string;
  shard: number;
  label: number | null;
  captions: string[];
  image: Uint8Array;
}

/**
 * `count` samples dealt round-robin over `shards` shards (so shard sizes differ by one), classes interleaved, one or
 * two captions each. Sample `noLabel` has no .cls (zero-shot leaves it out, retrieval keeps it); sample `jsonCaptions`
 * carries its captions as a .json list.
 */
async function writeSet(
  dir: string,
  prefix: string,
  count: number,
  shards: number,
): Promise<{ spec: string; samples: Sample[] }> {
  await Deno.mkdir(dir, { recursive: true });
  const specs: SampleSpec[][] = Array.from({ length: shards }, () => []);
  const samples: Sample[] = [];
  const noLabel = 10, jsonCaptions = 5;
  for (let i = 0; i < count; i++) {
    const label = i % 3;
    const captions = i % 2 === 0
      ? [`a ${CLASSES[label]} square ${i}`]
      : [`${CLASSES[label]} ${i}`, `colour number ${i}`];
    const image = await colourImage(...RGB[label], i % 7);
    const files: Record<string, Uint8Array | string> = { png: image };
    if (i !== noLabel) files.cls = String(label);
    if (i === jsonCaptions) files.json = JSON.stringify({ captions });
    else files.txt = captions.join("\n") + "\n";
    const key = `${prefix}${String(i).padStart(3, "0")}`;
    specs[i % shards].push({ key, files });
    samples.push({ key, shard: i % shards, label: i === noLabel ? null : label, captions, image });
  }
  await writeShards(dir, specs);
  await Deno.writeTextFile(`${dir}/classes.txt`, CLASSES.join("\n") + "\n");
  await Deno.writeTextFile(`${dir}/templates.txt`, "a {} image.\na photo that is {}.\n");
  return { spec: `${dir}/shard-{000000..${String(shards - 1).padStart(6, "0")}}.tar`, samples };
}

async function evalJson(args: string[]) {
  const { result, stdout } = await captured(() => evalCommand.run([...args, "--json"]));
  assert.equal(result, 0);
  return JSON.parse(stdout);
}

async function partition(args: string[], out: string, index: number, count = 3) {
  const run = await captured(() =>
    evalCommand.run([...args, "--out", out, "--shard-index", String(index), "--shard-count", String(count)])
  );
  assert.equal(run.result, 0, run.stderr);
  return run.stderr;
}

async function listNames(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const e of Deno.readDir(dir)) names.push(e.name);
  return names.sort();
}

interface StoredSamples {
  shard: string;
  keys: string[];
}

async function storedParts(dir: string, set = "data"): Promise<Map<string, StoredSamples>> {
  const parts = new Map<string, StoredSamples>();
  for (const name of await listNames(`${dir}/${set}`)) {
    const m = /^samples_(\d+)\.json$/.exec(name);
    if (m) parts.set(m[1], JSON.parse(await Deno.readTextFile(`${dir}/${set}/${name}`)));
  }
  return parts;
}

/** Copies the files of one partition's folder into another, as merging by part name does; no name may collide. */
async function copyInto(from: string, to: string): Promise<void> {
  for (const e of await listNames(from)) {
    const info = await Deno.stat(`${from}/${e}`);
    if (info.isDirectory) {
      await Deno.mkdir(`${to}/${e}`, { recursive: true });
      await copyInto(`${from}/${e}`, `${to}/${e}`);
    } else if (e === "plan.json") {
      assert.equal(await Deno.readTextFile(`${from}/${e}`), await Deno.readTextFile(`${to}/${e}`), "same evaluation");
    } else {
      await assert.rejects(Deno.stat(`${to}/${e}`), Deno.errors.NotFound, `${e} written by two partitions`);
      await Deno.copyFile(`${from}/${e}`, `${to}/${e}`);
    }
  }
}

Deno.test("clip eval zeroshot: 3 partitions (flags, and JOB_COMPLETION_INDEX in a child process) merge into the single run", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spec, samples } = await writeSet(`${dir}/data`, "s", 17, SHARDS);
    const args = ["--model", VIT_TINY, "--data", spec, "--task", "zeroshot", "--batch-size", "2"];
    const single = await evalJson(args);
    assert.equal(single.samples, 16, "the sample without a class is left out");

    const out = `${dir}/parts`, out2 = `${dir}/parts-2`;
    assert.match(await partition(args, out, 1), /partition 1 of 3 \(--shard-index\/--shard-count\): 2 of 7 parts/);
    await assert.rejects(
      captured(() => evalCommand.run(["--merge", out])),
      /lacks 5 of 7 parts and the zero-shot classifier: partition 0 \(data parts 0, 3, 6; the zero-shot classifier\), partition 2 \(data parts 2, 5\) of 3 have not finished/,
    );
    await partition(args, out, 0);
    await assert.rejects(
      captured(() => evalCommand.run(["--merge", out])),
      /lacks 2 of 7 parts: partition 2 \(data parts 2, 5\) of 3 has not finished; run it again \(e\.g\. --shard-index 2 --shard-count 3, JOB_COMPLETION_INDEX=2/,
    );

    // The third partition is a pod of an Indexed Job: no partition flags, its own output folder.
    const child = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", CLI, "eval", ...args, "--out", out2],
      env: { JOB_COMPLETION_INDEX: "2", JOB_COMPLETIONS: "3" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    const childErr = new TextDecoder().decode(child.stderr);
    assert.equal(child.code, 0, childErr);
    assert.match(childErr, /partition 2 of 3 \(JOB_COMPLETION_INDEX of JOB_COMPLETIONS\): 2 of 7 parts/);
    assert.match(childErr, /clip eval --merge /);

    // Each partition holds exactly its parts (part p = shard p, in partition p % 3), each part exactly its shard's
    // samples in shard order; together every sample with a class appears once.
    const shared = await storedParts(out), own = await storedParts(out2);
    assert.deepEqual([...shared.keys()].sort(), ["0", "1", "3", "4", "6"]);
    assert.deepEqual([...own.keys()].sort(), ["2", "5"]);
    for (const [name, part] of [...shared, ...own]) {
      const shard = Number(name);
      assert.ok(part.shard.endsWith(`shard-${String(shard).padStart(6, "0")}.tar`), part.shard);
      assert.deepEqual(part.keys, samples.filter((s) => s.shard === shard && s.label !== null).map((s) => s.key));
    }
    const allKeys = [...shared.values(), ...own.values()].flatMap((p) => p.keys);
    assert.equal(new Set(allKeys).size, allKeys.length, "no sample in two parts");
    assert.deepEqual(allKeys.sort(), samples.filter((s) => s.label !== null).map((s) => s.key).sort());

    // What the merge reads: the model's features of each part's images, and the classifier of the class prompts.
    const { model, preprocess } = await loadModel(await getGpu(), VIT_TINY);
    for (const [name, part] of shared) {
      const stored = await readNpy(`${out}/data/img_emb_${name}.npy`);
      assert.deepEqual(stored.shape, [part.keys.length, 32]);
      const images = part.keys.map((k) => samples.find((s) => s.key === k)!.image);
      assert.ok(maxAbsDiff(stored.data, await referenceFeaturesOfFiles(model, preprocess, images)) < 1e-5);
    }
    const classifier = await readNpy(`${out}/classifier.npy`);
    const templates = ["a {} image.", "a photo that is {}."];
    const expected = await referenceClassifier(model, await ClipTokenizer.load(), CLASSES, templates);
    assert.ok(maxAbsDiff(classifier.data, expected) < 1e-5);

    await copyInto(out2, out);
    const merged = await evalJson(["--merge", out]);
    assert.deepEqual(merged, single);

    // A rerun finds its parts done and embeds nothing.
    const before = (await Deno.stat(`${out}/data/img_emb_0.npy`)).mtime;
    assert.match(await partition(args, out, 0), /3 of 7 parts, 3 already done, 0 to embed/);
    assert.deepEqual((await Deno.stat(`${out}/data/img_emb_0.npy`)).mtime, before);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip eval retrieval and linear-probe: partitions (flags and a Slurm array's environment) merge into the single run", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spec } = await writeSet(`${dir}/data`, "s", 17, SHARDS);

    const retrieval = ["--model", VIT_TINY, "--data", spec, "--task", "retrieval", "--batch-size", "3"];
    const single = await evalJson(retrieval);
    assert.equal(single.samples, 17);
    assert.equal(single.captions, 9 * 1 + 8 * 2);
    const out = `${dir}/retrieval`;
    await partition(retrieval, out, 0);
    await partition(retrieval, out, 1);
    // A Slurm array task, in a child process: test modules share one process, so the variables must not be set here.
    const slurm = async (args: string[]) => {
      const r = await new Deno.Command(Deno.execPath(), {
        args: ["run", "-A", CLI, "eval", ...args],
        env: { SLURM_ARRAY_TASK_ID: "2", SLURM_ARRAY_TASK_COUNT: "3" },
        stdout: "null",
        stderr: "piped",
      }).output();
      return { code: r.code, stderr: new TextDecoder().decode(r.stderr) };
    };
    const run = await slurm([...retrieval, "--out", out]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /partition 2 of 3 \(SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT\)/);
    // Without --out, a partitioned process refuses to report the metrics of its share alone.
    const refused = await slurm(retrieval);
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /partition 2 of 3 .*give --out DIR/);
    assert.deepEqual(await evalJson(["--merge", out]), single);

    // The probe: 3 training shards after the 7 test shards make 10 parts, partition p taking parts p, p+3, ...
    const { spec: trainSpec } = await writeSet(`${dir}/train`, "t", 15, 3);
    const probe = ["--model", VIT_TINY, "--data", spec, "--train-data", trainSpec, "--task", "linear-probe"];
    const probeSingle = await evalJson(probe);
    assert.equal(probeSingle.train_samples, 14);
    const probeOut = `${dir}/probe`;
    for (const index of [0, 1, 2]) await partition(probe, probeOut, index);
    assert.deepEqual([...(await storedParts(probeOut, "train-data")).keys()].sort(), ["0", "1", "2"]);
    assert.deepEqual(await evalJson(["--merge", probeOut]), probeSingle);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("clip eval partitions refuse mixing evaluations in one folder and merge flags that conflict with it", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const { spec } = await writeSet(`${dir}/data`, "s", 4, 2);
    const out = `${dir}/parts`;
    await partition(["--model", VIT_TINY, "--data", spec, "--task", "retrieval"], out, 1, 2);
    await assert.rejects(
      captured(() => evalCommand.run(["--model", VIT_TINY, "--data", spec, "--task", "zeroshot", "--out", out])),
      /records another evaluation \(task: "retrieval", this run: "zeroshot"\)/,
    );
    await assert.rejects(
      captured(() =>
        evalCommand.run([
          "--model",
          VIT_TINY,
          "--data",
          spec,
          "--task",
          "retrieval",
          "--out",
          out,
          "--shard-index",
          "0",
          "--shard-count",
          "3",
        ])
      ),
      /written by a run of 2 partition\(s\), this one is of 3/,
    );
    await assert.rejects(captured(() => evalCommand.run(["--merge", out, "--task", "zeroshot"])), /drop --task/);
    await assert.rejects(captured(() => evalCommand.run(["--merge", `${dir}/nothing`])), /plan\.json not found/);
    await assert.rejects(
      captured(() => evalCommand.run(["--merge", out])),
      /lacks 1 of 2 parts: partition 0 \(data part 0\) of 2 has not finished/,
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
