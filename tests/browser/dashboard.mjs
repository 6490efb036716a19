// The operators' dashboard as an operator uses it, in headless Chromium: log in, find the
// processed series with its key image, press "Resend results", see the delivery counted.
// Usage: node dashboard.mjs BASE_URL TOKEN SERIES_UID SCREENSHOT_DIR; prints a JSON report.
import { chromium } from "playwright-core";

const [base, token, seriesUid, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"],
});
const report = {};
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  await page.goto(`${base}/`);
  report.loginShown = (await page.locator('input[name="token"]').count()) === 1;
  await page.fill('input[name="token"]', token);
  await page.click('button[type="submit"]');
  const row = page.locator("#series tr", { hasText: seriesUid });
  await row.waitFor({ timeout: 30000 });
  report.row = await row.innerText();
  const thumbnail = row.locator("img.key").first();
  await thumbnail.waitFor();
  await page.waitForFunction((img) => img.complete, await thumbnail.elementHandle());
  report.thumbnailWidth = await thumbnail.evaluate((img) => img.naturalWidth);
  report.destinationsBefore = await page.locator("#destinations").innerText();
  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
  await row.locator("button", { hasText: "Resend results" }).click();
  report.message = await page.locator("#message").innerText();
  for (let tries = 0; tries < 90; tries++) {
    report.destinationsAfter = await page.locator("#destinations").innerText();
    if (report.destinationsAfter.includes("2 done")) break;
    await page.waitForTimeout(1000);
    await page.goto(`${base}/`);
  }
  await page.screenshot({ path: `${shots}/dashboard-after-resend.png`, fullPage: true });
} finally {
  await browser.close();
}
console.log(JSON.stringify(report));
