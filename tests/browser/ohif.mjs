// OHIF showing a study from Orthanc, as a radiologist opens it: the study browser, the key
// images, the CT, then the SR. Usage: node ohif.mjs VIEWER_URL STUDY_UID CT_IMAGES SCREENSHOT_DIR;
// prints a JSON report (texts the browser shows; screenshots are judged by the caller).
import { chromium } from "playwright-core";

const [base, study, ctImages, shots] = process.argv.slice(2);
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
  await page.goto(`${base}/viewer?StudyInstanceUIDs=${study}`);
  await page.getByText("Skip all").click({ timeout: 90000 }).catch(() => {});
  await settle(page);
  report.studyBrowser = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-opened.png` });
  // The CT's thumbnail, found by its image count (the study's header counts every object).
  await page.getByText(ctImages, { exact: true }).dblclick();
  await settle(page);
  report.ctViewport = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-ct.png` });
  await page.getByText("Res-MTNet nodules", { exact: false }).dblclick();
  await settle(page);
  await page.getByText("SR", { exact: true }).last().hover().catch(() => {});
  await page.waitForTimeout(1500);
  report.srViewport = await page.locator("body").innerText();
  await page.screenshot({ path: `${shots}/ohif-sr.png` });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
