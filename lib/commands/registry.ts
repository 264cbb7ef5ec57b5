import type { Command } from "./command.ts";
import { pendingCommand } from "./pending.ts";
import { infoCommand } from "./info.ts";

const train = pendingCommand(
  "train",
  "Train a CLIP model contrastively on image-caption shards.",
  "usage: clip train --model CONFIG|PATH --train-data SHARDS --out DIR [options]",
);
const embed = pendingCommand(
  "embed",
  "Embed images or texts to .npy files with metadata.",
  "usage: clip embed --model M (--images SRC | --texts SRC) --out DIR [options]",
);
const zeroshot = pendingCommand(
  "zeroshot",
  "Classify images zero-shot from class names and prompt templates.",
  "usage: clip zeroshot --model M (--classes a,b,c | --classes-file F) IMAGE...",
);
const evaluate = pendingCommand(
  "eval",
  "Evaluate a model: zero-shot accuracy, retrieval recall@K, linear probe.",
  "usage: clip eval --model M --data SHARDS --task zeroshot|retrieval|linear-probe",
);
const pack = pendingCommand(
  "pack",
  "Build WebDataset shards from folders, caption lists, or the emoji dataset.",
  "usage: clip pack (emoji --vendor google|twitter | --from SRC) --out DIR",
);
const tokenize = pendingCommand(
  "tokenize",
  "Print CLIP token ids for texts.",
  "usage: clip tokenize [--context N] [--json] (TEXT... | --file FILE)",
);
const demo = pendingCommand(
  "demo",
  "Build the emoji dataset, train emoji-tiny, evaluate, embed and classify.",
  "usage: clip demo [--out DIR]",
);

/** Every command by name, in the order `clip --help` lists them. */
export const commands: Command[] = [train, embed, zeroshot, evaluate, pack, tokenize, infoCommand, demo];

/** Other names users may type for a command. */
export const aliases: Record<string, string> = { classify: "zeroshot" };
