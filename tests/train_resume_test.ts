// `clip train` end to end: a run killed with SIGKILL and resumed with --resume latest gives the same per-step losses
// as an uninterrupted run; checkpoints are loadable weights; the run folder has its log and plot.
import assert from "node:assert/strict";
import sharp from "sharp";
import { TarWriter } from "../lib/data/tar_writer.ts";
import { findLatestCheckpoint } from "../lib/train/checkpoint.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;

async function makeShards(dir: string): Promise<string> {
  const enc = new TextEncoder();
  const colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"];
  const sizes: Record<string, number> = {};
  for (let s = 0; s < 3; s++) {
    const name = `train-${s}.tar`;
    const w = await TarWriter.create(`${dir}/${name}`);
    for (let i = 0; i < 12; i++) {
      const n = s * 12 + i;
      const png = await sharp({
        create: {
          width: 20,
          height: 20,
          channels: 3,
          background: { r: (n * 37) % 256, g: (n * 91) % 256, b: (n * 53) % 256 },
        },
      }).png().toBuffer();
      await w.add(`k${n}.png`, new Uint8Array(png));
      await w.add(`k${n}.txt`, enc.encode(`a ${colours[n % 8]} square number ${n}`));
    }
    await w.close();
    sizes[name] = 12;
  }
  await Deno.writeTextFile(`${dir}/sizes.json`, JSON.stringify(sizes));
  return `${dir}/train-{0..2}.tar`;
}

function trainArgs(data: string, out: string, extra: string[] = []): string[] {
  return [
    "run",
    "-A",
    CLI,
    "train",
    "--model",
    "test-vit-micro",
    "--train-data",
    data,
    "--out",
    out,
    "--batch-size",
    "6",
    "--epochs",
    "2",
    "--lr",
    "5e-3",
    "--warmup",
    "3",
    "--save-every",
    "2",
    "--workers",
    "2",
    "--shuffle-buffer",
    "8",
    ...extra,
  ];
}

async function losses(out: string): Promise<Map<number, number>> {
  const lines = (await Deno.readTextFile(`${out}/log.jsonl`)).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  return new Map(lines.filter((l) => typeof l.loss === "number").map((l) => [l.step, l.loss]));
}

Deno.test("train: a run killed with SIGKILL and resumed gives the uninterrupted run's per-step losses", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await makeShards(dir);
    const full = await new Deno.Command(Deno.execPath(), {
      args: trainArgs(data, `${dir}/full`),
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(full.code, 0, new TextDecoder().decode(full.stderr));
    const reference = await losses(`${dir}/full`);
    assert.equal(reference.size, 12, "36 samples / batch 6 = 6 steps x 2 epochs");

    // Kill -9 once the third checkpoint exists (step 6), while later steps are running.
    const out = `${dir}/killed`;
    const child = new Deno.Command(Deno.execPath(), { args: trainArgs(data, out), stdout: "null", stderr: "null" })
      .spawn();
    const deadline = Date.now() + 240_000;
    while (Date.now() < deadline) {
      const latest = await findLatestCheckpoint(out);
      if (latest?.endsWith("step-0000006")) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    child.kill("SIGKILL");
    await child.status;
    const latest = await findLatestCheckpoint(out);
    assert.ok(latest, "a checkpoint survived the kill");

    const resumed = await new Deno.Command(Deno.execPath(), {
      args: trainArgs(data, out, ["--resume", "latest"]),
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.equal(resumed.code, 0, new TextDecoder().decode(resumed.stderr));
    const after = await losses(out);
    assert.equal(after.size, 12);
    for (const [step, loss] of reference) assert.equal(after.get(step), loss, `loss at step ${step}`);
    // The run folder holds the newest weights in open_clip's layout, and the plot.
    for (const f of ["open_clip_model.safetensors", "open_clip_config.json", "loss.svg"]) {
      await Deno.stat(`${out}/${f}`);
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("train: SIGTERM saves a checkpoint at the current step and exits cleanly", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await makeShards(dir);
    const out = `${dir}/run`;
    const child = new Deno.Command(Deno.execPath(), {
      args: trainArgs(data, out, ["--save-every", "100"]),
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const deadline = Date.now() + 240_000;
    while (Date.now() < deadline) {
      const log = await Deno.readTextFile(`${out}/log.jsonl`).catch(() => "");
      if (log.split("\n").filter(Boolean).length >= 2) break;
      await new Promise((r) => setTimeout(r, 50));
    }
    child.kill("SIGTERM");
    const { code, stderr } = await child.output();
    const text = new TextDecoder().decode(stderr);
    assert.equal(code, 0, text);
    assert.match(text, /stopped at step \d+/);
    const stoppedAt = Number(/stopped at step (\d+)/.exec(text)![1]);
    assert.ok(stoppedAt < 12);
    assert.ok((await findLatestCheckpoint(out))?.endsWith(`step-${String(stoppedAt).padStart(7, "0")}`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("train: a corrupt image and a caption-less sample are skipped, counted and summarised; the run finishes", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const data = await makeShards(dir);
    // Append a bad shard: one undecodable image, one sample without a caption, one good sample.
    const enc = new TextEncoder();
    const w = await TarWriter.create(`${dir}/bad.tar`);
    await w.add("bad1.png", enc.encode("this is not a png"));
    await w.add("bad1.txt", enc.encode("a broken image"));
    await w.add(
      "bad2.png",
      new Uint8Array(await sharp({ create: { width: 8, height: 8, channels: 3, background: "red" } }).png().toBuffer()),
    );
    await w.close();
    const out = `${dir}/run`;
    const r = await new Deno.Command(Deno.execPath(), {
      args: trainArgs(`${data}::${dir}/bad.tar`, out, ["--epochs", "1", "--train-num-samples", "36"]),
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(r.stderr);
    assert.equal(r.code, 0, text);
    assert.match(text, /warning: .*bad1/);
    assert.match(text, /skipped 1 undecodable images, 1 samples without an image or caption/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("train: --precision f16 trains with the f32 run's losses to f16 rounding, or is refused by name", async () => {
  const { getGpu } = await import("../lib/gpu/runtime.ts");
  const hasF16 = (await getGpu()).hasF16;
  const dir = await Deno.makeTempDir();
  try {
    const data = await makeShards(dir);
    const run = (out: string, precision: string, extra: string[] = []) =>
      new Deno.Command(Deno.execPath(), {
        args: trainArgs(data, out, ["--precision", precision, "--epochs", "1", ...extra]),
        stdout: "piped",
        stderr: "piped",
      }).output();
    const half = await run(`${dir}/f16`, "f16");
    const halfErr = new TextDecoder().decode(half.stderr);
    if (!hasF16) {
      assert.equal(half.code, 2, halfErr);
      assert.match(halfErr, /shader-f16/);
      return;
    }
    assert.equal(half.code, 0, halfErr);
    const full = await run(`${dir}/f32`, "f32");
    assert.equal(full.code, 0, new TextDecoder().decode(full.stderr));
    const [l16, l32] = [await losses(`${dir}/f16`), await losses(`${dir}/f32`)];
    assert.equal(l16.size, 6);
    let differs = false;
    for (const [step, loss] of l32) {
      const other = l16.get(step)!;
      assert.ok(Math.abs(other - loss) <= 1e-2 * Math.abs(loss), `step ${step}: f16 loss ${other}, f32 ${loss}`);
      differs ||= other !== loss;
    }
    assert.ok(differs, "the f16 run's losses are the f32 run's bit for bit: no product took f16 operands");
    // A run is resumed at the precision it was made with.
    const mixed = await run(`${dir}/f16`, "f32", ["--resume", "latest", "--epochs", "2"]);
    assert.equal(mixed.code, 1);
    assert.match(new TextDecoder().decode(mixed.stderr), /precision: "f16" there, "f32" now/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
