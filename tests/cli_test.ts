import assert from "node:assert/strict";
import { commands } from "../lib/commands/registry.ts";

const CLI = new URL("../cli.ts", import.meta.url).pathname;

async function clip(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-A", CLI, ...args],
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const text = new TextDecoder();
  return { code: out.code, stdout: text.decode(out.stdout), stderr: text.decode(out.stderr) };
}

Deno.test("cli: every command answers --help with exit 0; the main help lists them all", async () => {
  const main = await clip("--help");
  assert.equal(main.code, 0);
  for (const c of commands) {
    assert.match(main.stdout, new RegExp(`\\b${c.name}\\b`));
    const r = await clip(c.name, "--help");
    assert.equal(r.code, 0, `${c.name} --help: ${r.stderr}`);
    assert.match(r.stdout, new RegExp(`usage: clip ${c.name}`));
  }
  assert.equal((await clip("classify", "--help")).code, 0, "classify is zeroshot's other name");
});

Deno.test("cli: usage errors exit 2 and runtime errors exit 1, each with a one-line message", async () => {
  const unknown = await clip("frobnicate");
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /unknown command 'frobnicate'.*clip --help/);
  const badFlag = await clip("info", "--bogus");
  assert.equal(badFlag.code, 2);
  assert.match(badFlag.stderr, /clip info --help/);
  const missing = await clip("tokenize", "--file", "/nonexistent/captions.txt");
  assert.equal(missing.code, 1);
  assert.equal(missing.stderr.trim().split("\n").length, 1, missing.stderr);
});

Deno.test("cli: info describes the adapter as JSON, and a model's parameters and weight memory", async () => {
  const info = await clip("info", "--json");
  assert.equal(info.code, 0, info.stderr);
  const adapter = JSON.parse(info.stdout);
  assert.equal(typeof adapter.description, "string");
  assert.equal(typeof adapter.isSoftware, "boolean");
  assert.ok(adapter.limits.maxStorageBufferBindingSize >= 128 * 2 ** 20);
  const model = await clip("info", "--model", "ViT-B-32", "--json");
  assert.equal(model.code, 0, model.stderr);
  const d = JSON.parse(model.stdout);
  // open_clip's count for ViT-B-32 (sum of model.parameters()).
  assert.equal(d.parameters.total, 151_277_313);
  assert.equal(d.weightBytes.f32, 4 * 151_277_313);
});
