import OpenAI from "openai";
const sent = [];
const c = new OpenAI({ baseURL: "http://127.0.0.1:18902/v1", apiKey: "tg_x_design", maxRetries: 2, timeout: Number(process.env.T ?? 30000),
  fetch: async (url, init) => { sent.push({t: Date.now(), retry: new Headers(init.headers).get("x-stainless-retry-count")}); const r = await fetch(url, init); sent.at(-1).status = r.status; sent.at(-1).h = Object.fromEntries([...r.headers].filter(([n]) => n.startsWith("x-") || n.startsWith("retry"))); return r; } });
try { const r = await c.images.generate({ model: "gpt-image-2", quality: "low", size: "1024x1024", prompt: "slow " + process.pid }); console.log("ok", r.data.length); }
catch (e) { console.log(e.constructor.name, e.status, JSON.stringify(e.error)); }
console.log(JSON.stringify(sent, null, 0));
