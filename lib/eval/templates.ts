/**
 * Prompt templates for zero-shot classification. `{}` marks where the class name goes.
 *
 * OPENAI_IMAGENET_TEMPLATES are the 80 prompts of CLIP's ImageNet prompt ensemble (the CLIP paper's appendix and its
 * prompt-engineering notebook), in their original order; SIMPLE_IMAGENET_TEMPLATES the 7-prompt subset that open_clip
 * offers as a cheaper ensemble. Accuracy depends on the exact wording, so these are kept verbatim, grammar included.
 */
import { ClipError } from "../errors.ts";

export const OPENAI_IMAGENET_TEMPLATES: readonly string[] = [
  "a bad photo of a {}.",
  "a photo of many {}.",
  "a sculpture of a {}.",
  "a photo of the hard to see {}.",
  "a low resolution photo of the {}.",
  "a rendering of a {}.",
  "graffiti of a {}.",
  "a bad photo of the {}.",
  "a cropped photo of the {}.",
  "a tattoo of a {}.",
  "the embroidered {}.",
  "a photo of a hard to see {}.",
  "a bright photo of a {}.",
  "a photo of a clean {}.",
  "a photo of a dirty {}.",
  "a dark photo of the {}.",
  "a drawing of a {}.",
  "a photo of my {}.",
  "the plastic {}.",
  "a photo of the cool {}.",
  "a close-up photo of a {}.",
  "a black and white photo of the {}.",
  "a painting of the {}.",
  "a painting of a {}.",
  "a pixelated photo of the {}.",
  "a sculpture of the {}.",
  "a bright photo of the {}.",
  "a cropped photo of a {}.",
  "a plastic {}.",
  "a photo of the dirty {}.",
  "a jpeg corrupted photo of a {}.",
  "a blurry photo of the {}.",
  "a photo of the {}.",
  "a good photo of the {}.",
  "a rendering of the {}.",
  "a {} in a video game.",
  "a photo of one {}.",
  "a doodle of a {}.",
  "a close-up photo of the {}.",
  "a photo of a {}.",
  "the origami {}.",
  "the {} in a video game.",
  "a sketch of a {}.",
  "a doodle of the {}.",
  "a origami {}.",
  "a low resolution photo of a {}.",
  "the toy {}.",
  "a rendition of the {}.",
  "a photo of the clean {}.",
  "a photo of a large {}.",
  "a rendition of a {}.",
  "a photo of a nice {}.",
  "a photo of a weird {}.",
  "a blurry photo of a {}.",
  "a cartoon {}.",
  "art of a {}.",
  "a sketch of the {}.",
  "a embroidered {}.",
  "a pixelated photo of a {}.",
  "itap of the {}.",
  "a jpeg corrupted photo of the {}.",
  "a good photo of a {}.",
  "a plushie {}.",
  "a photo of the nice {}.",
  "a photo of the small {}.",
  "a photo of the weird {}.",
  "the cartoon {}.",
  "art of the {}.",
  "a drawing of the {}.",
  "a photo of the large {}.",
  "a black and white photo of a {}.",
  "the plushie {}.",
  "a dark photo of a {}.",
  "itap of a {}.",
  "graffiti of the {}.",
  "a toy {}.",
  "itap of my {}.",
  "a photo of a cool {}.",
  "a photo of a small {}.",
  "a tattoo of the {}.",
];

export const SIMPLE_IMAGENET_TEMPLATES: readonly string[] = [
  "itap of a {}.",
  "a bad photo of the {}.",
  "a origami {}.",
  "a photo of the large {}.",
  "a {} in a video game.",
  "art of the {}.",
  "a photo of the small {}.",
];

/** The built-in template sets by the names the command line accepts. */
export const TEMPLATE_SETS: Readonly<Record<string, readonly string[]>> = {
  openai: OPENAI_IMAGENET_TEMPLATES,
  simple: SIMPLE_IMAGENET_TEMPLATES,
};

/**
 * Templates from a text file, one per line (blank lines and lines starting with '#' ignored). `{c}` (CLIP_benchmark's
 * placeholder) is accepted as well as `{}`; a line without a placeholder is refused, since every class would get the
 * same prompt.
 */
export function parseTemplates(text: string, source: string): string[] {
  const templates = text.split(/\r?\n/).map((l) => l.trim()).filter((l) => l !== "" && !l.startsWith("#"))
    .map((l) => l.replaceAll("{c}", "{}"));
  if (templates.length === 0) {
    throw new ClipError(`${source} holds no templates; write one prompt per line with {} for the class`);
  }
  const bad = templates.find((t) => !t.includes("{}"));
  if (bad !== undefined) {
    throw new ClipError(`${source}: template "${bad}" has no {} where the class name goes`);
  }
  return templates;
}

/** A built-in set (`openai`, `simple`) or a file of templates. */
export async function loadTemplates(spec: string): Promise<string[]> {
  const builtIn = TEMPLATE_SETS[spec];
  if (builtIn) return [...builtIn];
  let text: string;
  try {
    text = await Deno.readTextFile(spec);
  } catch (e) {
    throw new ClipError(
      `templates '${spec}' is neither a built-in set (${Object.keys(TEMPLATE_SETS).join(", ")}) nor a readable file: ${
        (e as Error).message
      }`,
    );
  }
  return parseTemplates(text, spec);
}

/** The prompt for one class: every `{}` replaced by the class name. */
export function fillTemplate(template: string, className: string): string {
  return template.replaceAll("{}", className);
}
