// Upload page of the VOSR service: show the chosen photo, POST it to ./upscale, show the PNG answer beside it.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const fileInput = $("file");
  const inputImg = $("input-img");
  const resultImg = $("result-img");
  const status = $("status");
  const again = $("again");
  let inputUrl = null;
  let resultUrl = null;
  let busy = false;

  // Routes are relative to the page, so the app works under any route prefix ("/", "/secure/", ...).
  function endpoint() {
    let base = window.location.pathname;
    if (!base.endsWith("/")) base += "/";
    const params = new URLSearchParams();
    params.set("seed", $("seed").value || "42");
    params.set("color_fix", $("color_fix").value);
    const tile = parseInt($("tile").value || "0", 10);
    if (tile > 0) params.set("tile", String(tile));
    return base + "upscale?" + params.toString();
  }

  function setStatus(text, isError) {
    status.textContent = text;
    status.className = isError ? "error" : "";
  }

  function showSize(img, spanId) {
    $(spanId).textContent = img.naturalWidth + "\u00d7" + img.naturalHeight;
  }

  inputImg.addEventListener("load", () => showSize(inputImg, "input-size"));
  resultImg.addEventListener("load", () => {
    showSize(resultImg, "result-size");
    resultImg.dataset.ready = "1";
  });

  async function upscale() {
    const file = fileInput.files && fileInput.files[0];
    if (!file || busy) return;
    busy = true;
    again.disabled = true;
    resultImg.dataset.ready = "";
    setStatus("Upscaling " + file.name + " \u2026", false);
    const headers = { "Content-Type": file.type || "application/octet-stream" };
    const key = $("api_key").value;
    if (key) headers["X-API-Key"] = key;
    const t0 = performance.now();
    try {
      const resp = await fetch(endpoint(), { method: "POST", headers: headers, body: file });
      if (!resp.ok) {
        let message = resp.status + " " + resp.statusText;
        try {
          const err = await resp.json();
          message = resp.status + ": " + (err.message || err.error || message);
        } catch (e) { /* not JSON */ }
        setStatus("Failed \u2014 " + message, true);
        return;
      }
      const blob = await resp.blob();
      if (resultUrl) URL.revokeObjectURL(resultUrl);
      resultUrl = URL.createObjectURL(blob);
      resultImg.src = resultUrl;
      const link = $("download");
      link.href = resultUrl;
      link.hidden = false;
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      setStatus("Done in " + secs + " s (" + (resp.headers.get("X-Output-Size") || "") + ").", false);
    } catch (e) {
      setStatus("Failed \u2014 " + e, true);
    } finally {
      busy = false;
      again.disabled = false;
    }
  }

  fileInput.addEventListener("change", () => {
    const file = fileInput.files && fileInput.files[0];
    if (!file) return;
    if (inputUrl) URL.revokeObjectURL(inputUrl);
    inputUrl = URL.createObjectURL(file);
    inputImg.src = inputUrl;
    upscale();
  });
  again.addEventListener("click", upscale);
})();
