// omeflow job view: appends the job log's new bytes to the tail it shows. It asks the chunk
// route for the bytes from the next_offset it has (never the whole log again) every few
// seconds while the job runs, and once more after it ended.
"use strict";
(function () {
  const pre = document.getElementById("log");
  if (!pre) return;
  const range = document.getElementById("log-range");
  const POLL_MS = 2000;
  let next = Number(pre.dataset.nextOffset || 0);
  let live = pre.dataset.live === "true";

  async function poll() {
    const url = pre.dataset.chunkUrl + "&offset=" + next;
    try {
      const reply = await fetch(url, { credentials: "same-origin", cache: "no-store" });
      const body = await reply.json();
      if (!reply.ok) throw new Error(body.error || reply.statusText);
      if (body.text) {
        const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(document.createTextNode(body.text));
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      }
      next = body.next_offset;
      pre.dataset.nextOffset = String(next);
      if (range) range.textContent = "… " + next + " of " + body.size + " bytes";
      const more = body.next_offset < body.size;
      if (body.terminal && !more) { live = false; pre.dataset.live = "false"; }
      if (live || more) setTimeout(poll, more ? 50 : POLL_MS);
    } catch (err) {
      if (range) range.textContent = "log update failed: " + err.message + " (retrying)";
      setTimeout(poll, POLL_MS * 3);
    }
  }
  pre.scrollTop = pre.scrollHeight;
  if (live) setTimeout(poll, POLL_MS);
})();
