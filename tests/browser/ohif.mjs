// OHIF showing a study from Orthanc, as a radiologist opens it: the study browser, the key
// images, the CT, the SR's measurements one by one, then the SEG.
// Usage: node ohif.mjs VIEWER_URL STUDY_UID CT_IMAGES SEGMENT_LABELS_JSON SCREENSHOT_DIR
// (one label per finding, "Nodule 1", "Mass 2", ..., in the SR's order);
// prints a JSON report (texts the browser shows; screenshots are judged by the caller).
import { chromium } from "playwright-core";

const [base, study, ctImages, labelsJson, shots] = process.argv.slice(2);
const segmentLabels = JSON.parse(labelsJson);
const measurements = segmentLabels.length;
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // WebGL2 through SwiftShader: headless Chromium has no GPU.
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--enable-unsafe-swiftshader", "--use-angle=swiftshader"],
});
const report = {};
const settle = (page) => page.waitForTimeout(6000);
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  report.console = [];
  page.on("console", (m) => {
    if (m.type() === "error") report.console.push(`${m.type()}: ${m.text().slice(0, 300)}`);
  });
  await page.goto(`${base}/viewer?StudyInstanceUIDs=${study}`);
  await page.getByText("Skip all").click({ timeout: 90000 }).catch(() => {});
  await settle(page);
  report.studyBrowser = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-opened.png` });
  // The CT's thumbnail, found by its image count (the study's header counts every object).
  // .first(): a prior study of the patient may show the same count in its header, below.
  await page.getByText(ctImages, { exact: true }).first().dblclick();
  await settle(page);
  report.ctViewport = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-ct.png` });
  await page.getByText("Res-MTNet lung findings", { exact: false }).dblclick();
  // The SR display tool draws each measurement's outline with a text box of its labels (SVG),
  // once the slice is rendered; moving the pointer over the image makes it render again.
  const labelled = page.locator("svg text", { hasText: "Diameter" });
  await settle(page);
  // The arrows beside the SR badge step through its measurements; stepping there and back
  // shows the first one again, drawn once its slice has rendered.
  const badge = await page.getByText("SR", { exact: true }).last().boundingBox();
  for (let tries = 0; tries < 10 && (await labelled.count()) === 0; tries++) {
    if (badge) {
      await page.mouse.click(badge.x + badge.width + 50, badge.y + badge.height / 2);
      await page.waitForTimeout(2000);
      await page.mouse.click(badge.x + badge.width + 25, badge.y + badge.height / 2);
    }
    await page.waitForTimeout(3000);
  }
  if ((await labelled.count()) === 0) report.console.push("no SR text box drawn");
  report.srViewport = await page.locator("body").innerText();
  // What the SR display tool drew over the image: its shapes and its text boxes (SVG).
  report.srLabels = [await page.locator("svg text").allTextContents()];
  await page.screenshot({ path: `${shots}/ohif-sr.png` });
  // Each further measurement: the next arrow jumps to its slice, where it is drawn.
  for (let step = 1; step < measurements && badge; step++) {
    const before = report.srLabels[step - 1].join(" ");
    await page.mouse.click(badge.x + badge.width + 50, badge.y + badge.height / 2);
    let labels = [];
    for (let tries = 0; tries < 20; tries++) {
      await page.waitForTimeout(1500);
      labels = await page.locator("svg text").allTextContents();
      if (labels.length && labels.join(" ") !== before) break;
    }
    report.srLabels.push(labels);
    await page.screenshot({ path: `${shots}/ohif-sr-${step + 1}.png` });
  }
  // The SEG: OHIF asks before loading it into the segmentation panel, then jumps to it.
  await page.getByText("Res-MTNet nodule segmentation", { exact: false }).dblclick();
  await page.waitForTimeout(3000);
  report.segPrompt = await page.locator("body").innerText();
  await page.getByRole("button", { name: /^(Yes|Load)$/ }).first().click({ timeout: 15000 })
    .catch(() => report.console.push("no SEG prompt button"));
  await settle(page);
  report.segViewport = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-seg.png` });
  // Each segment from the segmentation panel (right edge): OHIF jumps to it and overlays it.
  await page.mouse.click(1582, 100);
  await page.waitForTimeout(2000);
  report.segSlices = [];
  for (let segment = 1; segment < measurements + 1; segment++) {
    await page.getByText(segmentLabels[segment - 1], { exact: true }).last().click();
    // Off the panel: the pointer left on a segment's row opens OHIF's statistics popover,
    // which would cover the viewport (and the overlay) in the screenshot.
    await page.mouse.move(800, 990);
    await page.waitForTimeout(4000);
    const text = await page.locator("body").innerText();
    report.segSlices.push((text.match(/I:\s*(\d+) \(/) || [])[1] || "");
    await page.screenshot({ path: `${shots}/ohif-seg-${segment}.png` });
  }
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
