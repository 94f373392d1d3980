import OpenAI from "openai";
const c = new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: "tg_x_design", maxRetries: 0 });
const image = { model: "gpt-image-2", quality: "low", size: "1024x1024" };
async function t(name, p) { try { const { data, response } = await p.withResponse(); return [name, response.status, response.headers.get("x-tollgate-cost-usd"), data.data?.map(d => d.url ? "url" : "b64")]; } catch (e) { return [name, e.status, e.code, e.param, e.message.slice(0, 120)]; } }
const out = [];
out.push(await t("rf-url", c.images.generate({ ...image, prompt: "x", response_format: "url" })));
out.push(await t("style", c.images.generate({ ...image, prompt: "x", style: "vivid" })));
out.push(await t("d3-n2", c.images.generate({ model: "dall-e-3", prompt: "x", n: 2 })));
out.push(await t("d3", c.images.generate({ model: "dall-e-3", prompt: "x", quality: "hd", size: "1792x1024" })));
out.push(await t("d2", c.images.generate({ model: "dall-e-2", prompt: "x", size: "256x256" })));
out.push(await t("partial-4", c.images.generate({ ...image, prompt: "x", stream: true, partial_images: 4 })));
out.push(await t("n0", c.images.generate({ ...image, prompt: "x", n: 0 })));
out.push(await t("auto", c.images.generate({ model: "gpt-image-1", prompt: "x", quality: "auto", size: "auto" })));
out.push(await t("mini-2048", c.images.generate({ model: "gpt-image-1-mini", prompt: "x", size: "2048x2048" })));
out.push(await t("chatgpt-image-latest", c.images.generate({ model: "chatgpt-image-latest", prompt: "x", quality: "low" })));
out.push(await t("snapshot", c.images.generate({ model: "gpt-image-2-2026-04-21", prompt: "x", quality: "low" })));
console.log(out.map(o => JSON.stringify(o)).join("\n"));
