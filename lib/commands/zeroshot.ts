import { ClipError, UsageError } from "../errors.ts";
import { ClipTokenizer } from "../data/tokenizer.ts";
import { zeroShotClassifier } from "../eval/embed_data.ts";
import { embedImageStream, logitScaleOf } from "../eval/encode.ts";
import { zeroShotProbabilities } from "../eval/zeroshot.ts";
import { loadTemplates } from "../eval/templates.ts";
import { resolveImageSource } from "../io/embed_inputs.ts";
import { ImageDecodeError } from "../data/image.ts";
import { getGpu } from "../gpu/runtime.ts";
import { loadModel } from "../nn/load.ts";
import { type Command, intFlag, parseCommandArgs } from "./command.ts";

const HELP = `usage: clip zeroshot --model M (--classes "a,b,c" | --classes-file F) [options] IMAGE...
       clip classify ...   (the same command)

Zero-shot classification: every class name is put into prompt templates, the prompts are embedded, normalised,
averaged and normalised again (CLIP's prompt ensemble); each image's probabilities are the softmax of
exp(logit_scale) x cosine similarity, as the model was trained.

  --model M             config name or JSON, checkpoint folder, hf-hub:ORG/NAME, or pretrained tag
  --classes "a,b,c"     class names, comma-separated
  --classes-file F      class names, one per line
  --templates T         'simple' (open_clip's 7 ImageNet prompts, default), 'openai' (CLIP's 80 ImageNet prompts,
                        slower to build, usually a little more accurate) or a file with one template per line
                        ({} or {c} marks the class name)
  --top K               classes shown per image (default 5)
  --json                print JSON: [{"image", "predictions": [{"label", "probability"}]}]
  --batch-size B        images per forward pass (default 32)

IMAGE may be an image file, a folder of images or a list file (one path per line). Images that cannot be decoded are
reported and skipped (exit code 1).`;

const FLAGS = {
  model: { type: "string" },
  classes: { type: "string" },
  "classes-file": { type: "string" },
  templates: { type: "string" },
  top: { type: "string" },
  json: { type: "boolean" },
  "batch-size": { type: "string" },
} as const;

async function classNames(inline: string | undefined, file: string | undefined): Promise<string[]> {
  if ((inline === undefined) === (file === undefined)) {
    throw new UsageError("zeroshot: give exactly one of --classes and --classes-file.");
  }
  let names: string[];
  if (inline !== undefined) names = inline.split(",");
  else {
    try {
      names = (await Deno.readTextFile(file!)).split(/\r?\n/);
    } catch (e) {
      throw new ClipError(`zeroshot: cannot read the classes file ${file}: ${(e as Error).message}`);
    }
  }
  names = names.map((n) => n.trim()).filter((n) => n !== "");
  if (names.length < 2) throw new UsageError(`zeroshot: need at least 2 classes, got ${names.length}.`);
  return names;
}

export const zeroshotCommand: Command = {
  name: "zeroshot",
  summary: "Classify images zero-shot from class names and prompt templates (alias: classify).",
  help: HELP,
  async run(argv) {
    const { values: v, positionals } = parseCommandArgs("zeroshot", argv, FLAGS, true);
    if (v.help) {
      console.log(HELP);
      return 0;
    }
    if (!v.model) throw new UsageError("zeroshot: --model is required. Run 'clip zeroshot --help' for usage.");
    if (positionals.length === 0) throw new UsageError("zeroshot: give one or more images to classify.");
    const names = await classNames(v.classes, v["classes-file"]);
    const top = Math.min(names.length, intFlag("zeroshot", "top", v.top, 5));
    const batchSize = Math.max(1, intFlag("zeroshot", "batch-size", v["batch-size"], 32));
    const templates = await loadTemplates(v.templates ?? "simple");
    const source = resolveImageSource(positionals);
    if (source.kind !== "files") {
      throw new UsageError("zeroshot: classifies image files; for shards use 'clip eval --task zeroshot'.");
    }

    const gpu = await getGpu();
    const { model, preprocess } = await loadModel(gpu, v.model, { inference: true });
    const tokenizer = await ClipTokenizer.load();
    const classifier = await zeroShotClassifier(model, tokenizer, names, templates);
    const scale = await logitScaleOf(model);
    const results: { image: string; predictions: { label: string; probability: number }[] }[] = [];
    let failed = 0;
    const inputs = source.files.map((f) => ({
      item: f.path,
      load: async () => {
        try {
          return await Deno.readFile(f.path);
        } catch (e) {
          throw new ImageDecodeError(`cannot read ${f.path}: ${(e as Error).message}`);
        }
      },
    }));
    const stream = embedImageStream(model, preprocess, inputs, {
      batchSize,
      onSkip: (path, error) => {
        failed++;
        console.error(`clip: skipped ${path}: ${error.message}`);
      },
    });
    for await (const batch of stream) {
      const probs = zeroShotProbabilities(batch.embeddings, classifier, model.config.embed_dim, scale);
      batch.items.forEach((image, i) => {
        const row = probs.subarray(i * names.length, (i + 1) * names.length);
        const order = Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, top);
        const predictions = order.map((c) => ({ label: names[c], probability: row[c] }));
        if (v.json) results.push({ image, predictions });
        else {
          console.log(image);
          for (const p of predictions) console.log(`  ${(100 * p.probability).toFixed(1).padStart(5)}%  ${p.label}`);
        }
      });
    }
    if (v.json) console.log(JSON.stringify(results, null, 2));
    return failed > 0 ? 1 : 0;
  },
};
