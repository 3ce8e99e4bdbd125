// bnrhn serve: pick or drop a photo, caption it with every served model, show the captions side by side.
"use strict";
const $ = (id) => document.getElementById(id);
let models = [];

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  const r = await fetch("/api/models");
  const d = await r.json();
  models = d.models;
  $("served").textContent = models.length
    ? `${models.length} model${models.length > 1 ? "s" : ""}: ` + models.map((m) => `${m.name} (${m.cell})`).join(", ")
    : "no model is being served (see /health)";
  const e = await (await fetch("/api/examples")).json();
  if (e.examples.length) {
    $("examples-box").hidden = false;
    for (const ex of e.examples) {
      const img = document.createElement("img");
      img.src = ex.url; img.alt = ex.name; img.title = ex.name; img.tabIndex = 0; img.loading = "lazy";
      const pick = async () => captionBlob(await (await fetch(ex.url)).blob());
      img.addEventListener("click", pick);
      img.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); pick(); } });
      $("examples").appendChild(img);
    }
  }
}

function card(result) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.model = result.model;
  const h = document.createElement("h3");
  h.textContent = result.model;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = `${result.cell} · encoded and decoded in ${result.decode_ms} ms`;
  const ol = document.createElement("ol");
  for (const c of result.captions) {
    const li = document.createElement("li");
    li.className = "caption";
    li.textContent = c.caption + " ";
    const lp = document.createElement("span");
    lp.className = "lp";
    lp.textContent = `log p ${c.logprob.toFixed(2)}`;
    li.appendChild(lp);
    ol.appendChild(li);
  }
  div.append(h, meta, ol);
  return div;
}

let latest = 0;  // only the answer to the latest photo is shown

async function captionBlob(blob) {
  const ticket = ++latest;
  if ($("preview").src.startsWith("blob:")) URL.revokeObjectURL($("preview").src);
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
  $("drop-text").textContent = "Drop another photo, or choose one";
  const form = new FormData();
  form.append("image", blob, blob.name || "image");
  form.append("method", $("method").value);
  form.append("beam", $("beam").value);
  const beam = Math.max(1, parseInt($("beam").value, 10) || 1);
  const topk = Math.min(beam, Math.max(1, parseInt($("topk").value, 10) || 1));  // at most the beam size
  form.set("beam", String(beam));
  form.append("topk", $("method").value === "greedy" ? "1" : String(topk));
  setStatus("captioning…");
  $("results").replaceChildren();
  try {
    const r = await fetch("/api/caption", { method: "POST", body: form });
    const d = await r.json().catch(() => ({ error: `the server answered ${r.status} ${r.statusText}` }));
    if (ticket !== latest) return;  // a newer photo is being captioned
    if (!r.ok) { setStatus(d.error || `error ${r.status}`, true); return; }
    $("results").replaceChildren(...d.results.map(card));
    setStatus(`${d.results.length} model${d.results.length > 1 ? "s" : ""}, ${d.total_ms} ms in all`);
  } catch (err) {
    if (ticket === latest) setStatus(`the server did not answer: ${err}`, true);
  }
}

$("file").addEventListener("change", (ev) => { if (ev.target.files[0]) captionBlob(ev.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault(); drop.classList.remove("over");
  if (ev.dataTransfer.files[0]) captionBlob(ev.dataTransfer.files[0]);
});
drop.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") $("file").click(); });
loadModels().catch((err) => setStatus(`could not list the models: ${err}`, true));
