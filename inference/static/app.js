// Upload page of the VOSR service: show the chosen photo, POST it to ./upscale, show the PNG answer beside it and
// in a before/after slider. Mode and steps are offered within what GET ./options says the server accepts.
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
  let options = null;   // GET ./options: {modes: {onestep: bool, multistep: bool}, mode, default_steps, max_steps}

  // Routes are relative to the page, so the app works under any route prefix ("/", "/secure/", ...).
  function base() {
    let path = window.location.pathname;
    if (!path.endsWith("/")) path += "/";
    return path;
  }

  function clampSteps() {
    const input = $("steps");
    const max = options ? options.max_steps : 50;
    let n = parseInt(input.value || "1", 10);
    if (!(n >= 1)) n = 1;
    if (n > max) n = max;
    input.value = String(n);
    return n;
  }

  async function loadOptions() {
    try {
      const resp = await fetch(base() + "options");
      if (!resp.ok) return;
      options = await resp.json();
    } catch (e) { return; }
    const mode = $("mode");
    for (const opt of mode.options) {
      const ok = !!options.modes[opt.value];
      opt.disabled = !ok;
      if (!ok) opt.textContent += " \u2014 not served by this model";
    }
    mode.value = options.mode;
    const steps = $("steps");
    steps.max = String(options.max_steps);
    steps.value = String(options.default_steps);
    $("seed").value = String(options.seed);
    $("color_fix").value = options.color_fix;
    $("limits").textContent = "This server runs " + options.mode + " with " + options.default_steps +
      " step(s) by default; at most " + options.max_steps + " steps; tiles of " + options.min_tile + "\u2013" +
      options.max_tile + " px.";
    document.body.dataset.options = "1";
  }

  function endpoint() {
    const params = new URLSearchParams();
    params.set("mode", $("mode").value);
    params.set("steps", String(clampSteps()));
    params.set("seed", $("seed").value || "42");
    params.set("color_fix", $("color_fix").value);
    const tile = parseInt($("tile").value || "0", 10);
    if (tile > 0) params.set("tile", String(tile));
    return base() + "upscale?" + params.toString();
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
      $("compare-after").src = resultUrl;
      $("compare-before").src = inputUrl;
      $("compare-section").hidden = false;
      const link = $("download");
      link.href = resultUrl;
      link.hidden = false;
      const secs = ((performance.now() - t0) / 1000).toFixed(2);
      setStatus("Done in " + secs + " s (" + (resp.headers.get("X-Output-Size") || "") + ", " +
        (resp.headers.get("X-Mode") || "") + ", " + (resp.headers.get("X-Steps") || "?") + " step(s)).", false);
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

  // before/after: the input (enlarged by the browser) covers the result left of the slider position
  function setCompare(value) {
    const v = Math.max(0, Math.min(100, Number(value)));
    $("compare-before").style.clipPath = "inset(0 " + (100 - v) + "% 0 0)";
    $("compare-line").style.left = v + "%";
  }
  $("compare-range").addEventListener("input", (e) => setCompare(e.target.value));
  const compare = $("compare");
  function dragTo(ev) {
    const r = compare.getBoundingClientRect();
    const v = ((ev.clientX - r.left) / r.width) * 100;
    $("compare-range").value = String(Math.round(v));
    setCompare(v);
  }
  compare.addEventListener("pointerdown", (ev) => { compare.setPointerCapture(ev.pointerId); dragTo(ev); });
  compare.addEventListener("pointermove", (ev) => { if (ev.buttons) dragTo(ev); });
  setCompare($("compare-range").value);
  $("steps").addEventListener("change", clampSteps);
  loadOptions();
})();
