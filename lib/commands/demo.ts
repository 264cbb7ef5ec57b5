import { buildEmojiDataset } from "../data/emoji.ts";
import { readTar } from "../data/tar.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import { getGpu } from "../gpu/runtime.ts";
import { loadModel } from "../nn/load.ts";
import { meanRecall, validationMetrics } from "../eval/validate.ts";
import { OPEN_CLIP_ADAMW } from "../train/optimizer.ts";
import { train } from "../train/trainer.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";
import { embedCommand } from "./embed.ts";
import { zeroshotCommand } from "./zeroshot.ts";

const HELP = `usage: clip demo [--out DIR] [--minutes M] [--epochs E]

The whole tool on a real dataset, on any machine: builds the emoji image-caption dataset from npm packages
(cached), evaluates an untrained emoji-tiny model on the held-out split, trains it, evaluates it again, embeds the
held-out images and classifies one of them zero-shot, then prints where everything was written.

options:
  --out DIR      where everything goes (default clip-demo)
  --minutes M    training time budget; the number of epochs is chosen to fit it (default 4)
  --epochs E     train exactly E epochs instead (16 is the full quality recipe)`;

const pct = (x: number) => `${(100 * x).toFixed(1)}%`;

function scoreLine(name: string, m: Record<string, number>): string {
  return `${name.padEnd(10)} retrieval R@1 ${pct(meanRecall(m, 1))}  R@5 ${pct(meanRecall(m, 5))}  ` +
    `R@10 ${pct(meanRecall(m, 10))}  zero-shot category top-1 ${pct(m.acc1)}`;
}

export const demoCommand: Command = {
  name: "demo",
  summary: "Build the emoji dataset, train emoji-tiny, evaluate, embed and classify.",
  help: HELP,
  async run(argv) {
    const { values } = parseCommandArgs("demo", argv, {
      out: { type: "string" },
      minutes: { type: "string" },
      epochs: { type: "string" },
    });
    if (values.help) {
      console.log(HELP);
      return 0;
    }
    const out = values.out ?? "clip-demo";
    const started = performance.now();
    const say = (m: string) => console.error(`[demo ${((performance.now() - started) / 1000).toFixed(0)}s] ${m}`);

    say(`building the emoji dataset in ${out}/data (cached after the first run)`);
    const data = `${out}/data`;
    const built = await buildEmojiDataset({ vendor: "google", out: data });
    say(`${built.reused ? "reused" : "built"}: ${built.counts.train} train and ${built.counts.test} test pairs`);
    const trainShards: string[] = [];
    for await (const e of Deno.readDir(data)) {
      if (/^train-\d+\.tar$/.test(e.name)) trainShards.push(`${data}/${e.name}`);
    }
    trainShards.sort();
    const testShards = [`${data}/test-000000.tar`];
    // Category names make better prompts in the emoji's own caption style.
    await Deno.writeTextFile(`${data}/templates.txt`, "an emoji of {}.\n");

    const gpu = await getGpu();
    const tokenizer = await ClipTokenizer.load();
    const { model, preprocess } = await loadModel(gpu, "emoji-tiny", { seed: 0 });
    say("evaluating the untrained model on the held-out split");
    const before = await validationMetrics(model, preprocess, tokenizer, testShards);
    say(scoreLine("untrained", before));

    const batchSize = 128;
    const stepsPerEpoch = Math.floor(built.counts.train / batchSize);
    let epochs = values.epochs ? Math.max(1, intFlag("demo", "epochs", values.epochs, 16)) : 0;
    const run = `${out}/run`;
    await Deno.remove(run, { recursive: true }).catch(() => {});
    const trainOpts = {
      shards: trainShards,
      batchSize,
      stepsPerEpoch,
      epochs: 16,
      lr: 1e-3,
      warmup: 50,
      seed: 0,
      accumFreq: 1,
      precision: "f32" as const,
      adamw: OPEN_CLIP_ADAMW,
      out: run,
      saveEvery: 0,
      workers: 2,
      shuffleBuffer: 1000,
    };
    if (!epochs) {
      // Time two steps (the first compiles the kernels) on a scratch copy to size the run to the budget.
      const budget = 60 * Number(values.minutes ?? 4);
      const probe = await loadModel(gpu, "emoji-tiny", { seed: 0 });
      const t0 = performance.now();
      let t1 = t0;
      await train({ gpu, model: probe.model, preprocess, tokenizer }, {
        ...trainOpts,
        out: `${out}/probe`,
        maxSteps: 3,
      }, {
        onStep: (r) => {
          if (r.step === 1) t1 = performance.now();
        },
      });
      probe.model.params.dispose();
      await Deno.remove(`${out}/probe`, { recursive: true }).catch(() => {});
      const perStep = (performance.now() - t1) / 2000;
      epochs = Math.max(1, Math.min(16, Math.floor(budget / (perStep * stepsPerEpoch))));
      say(
        `about ${perStep.toFixed(2)} s per step of ${batchSize}: training ${epochs} epoch(s) to fit ${budget / 60} min`,
      );
    }
    const warmup = Math.min(50, Math.floor(stepsPerEpoch * epochs / 4));
    say(
      `training emoji-tiny: ${epochs} epochs x ${stepsPerEpoch} steps, batch ${batchSize}, lr 1e-3, warmup ${warmup}`,
    );
    let last = 0;
    await train({ gpu, model, preprocess, tokenizer }, { ...trainOpts, epochs, warmup }, {
      onStep: (r) => {
        if (performance.now() - last > 15_000 || r.step === r.totalSteps) {
          last = performance.now();
          say(
            `step ${r.step}/${r.totalSteps}  loss ${r.loss.toFixed(3)}  scale ${r.logitScale.toFixed(1)}  ` +
              `${r.samplesPerSecond.toFixed(0)} samples/s`,
          );
        }
      },
    });
    say("evaluating the trained model on the held-out split (names never seen in training)");
    const after = await validationMetrics(model, preprocess, tokenizer, testShards);

    say("embedding the held-out images");
    await embedCommand.run(["--model", run, "--images", testShards[0], "--out", `${out}/embeddings`]);
    const example = `${out}/example.png`;
    const caption = await writeExampleImage(testShards[0], example);
    say(`classifying ${example} zero-shot (its caption: "${caption}")`);
    const classes = (await Deno.readTextFile(`${data}/classes.txt`)).split("\n").filter(Boolean);
    await zeroshotCommand.run([
      "--model",
      run,
      "--classes",
      classes.join(","),
      "--templates",
      `${data}/templates.txt`,
      "--top",
      "3",
      example,
    ]);

    console.log([
      "",
      "clip demo: emoji-tiny on the Noto emoji dataset (612 held-out pairs)",
      scoreLine("untrained", before),
      scoreLine("trained", after),
      "",
      `dataset      ${data}`,
      `checkpoint   ${run} (open_clip layout; --model ${run} works with every command)`,
      `loss plot    ${run}/loss.svg, per-step log ${run}/log.jsonl`,
      `embeddings   ${out}/embeddings`,
      `total time   ${((performance.now() - started) / 60000).toFixed(1)} min`,
    ].join("\n"));
    return 0;
  },
};

/** Copies the first image of a shard to a file, for the zero-shot example, and returns its caption. */
async function writeExampleImage(shard: string, path: string): Promise<string> {
  const file = await Deno.open(shard);
  let key: string | null = null;
  for await (const entry of readTar(file.readable)) {
    const [name, ext] = [entry.name.slice(0, entry.name.indexOf(".")), entry.name.slice(entry.name.indexOf(".") + 1)];
    if (key === null && ext === "png") {
      key = name;
      await Deno.writeFile(path, entry.data);
    } else if (name === key && ext === "txt") return new TextDecoder().decode(entry.data).trim();
  }
  return "";
}
