// Loads UI-format workflows into a running ComfyUI's real frontend (headless Chromium via playwright-core) and
// prints, per file, the node types the frontend does not know, the API-format prompt the UI would queue
// (app.graphToPrompt) and the graph as the frontend saves it again. Used by tests/integration/test_comfyui_headless.py.
//   node frontend_roundtrip.js http://127.0.0.1:PORT/ a.json b.json ...
const { chromium } = require('playwright-core');
const fs = require('fs');

const [url, ...files] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-background-networking'],
  });
  try {
    const page = await browser.newPage();
    await page.goto(url, { waitUntil: 'networkidle' });
    await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, null, { timeout: 60000 });
    await page.keyboard.press('Escape'); // a template gallery opens over the graph on a first visit
    const results = {};
    for (const file of files) {
      const workflow = JSON.parse(fs.readFileSync(file, 'utf8'));
      results[file] = await page.evaluate(async (wf) => {
        const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in LiteGraph.registered_node_types));
        await app.loadGraphData(wf);
        const prompt = await app.graphToPrompt();
        return { missing, output: prompt.output, saved: app.graph.serialize() };
      }, workflow);
    }
    process.stdout.write(JSON.stringify(results));
  } finally {
    await browser.close();
  }
})().catch((error) => { console.error(error); process.exit(1); });
