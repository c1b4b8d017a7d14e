// seesay search page: plain JavaScript, no build step, nothing fetched but this server's API.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("text-form"), q: $("q"), textTarget: $("text-target"),
    drop: $("drop"), file: $("file"), imageTarget: $("image-target"),
    error: $("error"), query: $("query"), queryThumb: $("query-thumb"),
    queryLabel: $("query-label"), status: $("status"), results: $("results"),
    empty: $("empty"), info: $("info"), template: $("hit-template"),
  };
  const K = 24;
  let uploadUrl = null; // object URL of the last uploaded query image
  let seq = 0; // only the latest request may draw results

  // ----- talking to the API -----

  async function api(url, options) {
    const response = await fetch(url, options);
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    if (!response.ok) {
      let detail = body && body.detail;
      if (Array.isArray(detail)) detail = detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
      throw new Error(detail || `${response.status} ${response.statusText}`);
    }
    return body;
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  async function run(describe, request) {
    const mine = ++seq;
    showError("");
    document.body.classList.add("busy");
    els.query.hidden = false;
    describe();
    els.status.textContent = "searching…";
    try {
      const result = await request();
      if (mine !== seq) return;
      render(result);
    } catch (err) {
      if (mine !== seq) return;
      els.status.textContent = "";
      els.results.replaceChildren();
      showError(err.message);
    } finally {
      if (mine === seq) document.body.classList.remove("busy");
    }
  }

  // ----- the three kinds of query -----

  function searchText(q, target) {
    run(() => describeQuery(`“${q}”`, null), () =>
      api(`/api/search/text?${new URLSearchParams({ q, target, k: K })}`));
  }

  function searchItem(id, target, label, thumb) {
    run(() => describeQuery(label || `item ${id}`, thumb), () =>
      api(`/api/items/${encodeURIComponent(id)}/similar?${new URLSearchParams({ target, k: K })}`));
  }

  function searchImage(file) {
    const target = els.imageTarget.value;
    if (uploadUrl) URL.revokeObjectURL(uploadUrl);
    uploadUrl = URL.createObjectURL(file);
    const body = new FormData();
    body.append("file", file, file.name || "pasted-image.png");
    body.append("target", target);
    body.append("k", String(K));
    history.replaceState(null, "", location.pathname);
    run(() => describeQuery(file.name || "pasted image", uploadUrl), () =>
      api("/api/search/image", { method: "POST", body }));
  }

  function describeQuery(label, thumb) {
    els.queryLabel.textContent = label;
    els.queryThumb.hidden = !thumb;
    if (thumb) els.queryThumb.src = thumb;
    else els.queryThumb.removeAttribute("src");
  }

  // ----- results -----

  function render(result) {
    const what = result.target === "image" ? "image" : "caption";
    const n = result.hits.length;
    els.status.textContent = `${n} ${what}${n === 1 ? "" : "s"} · ${result.took_ms.toFixed(0)} ms`;
    els.empty.hidden = true;
    els.results.dataset.target = result.target;
    const top = n ? Math.max(...result.hits.map((h) => h.score)) : 1;
    const bottom = n ? Math.min(...result.hits.map((h) => h.score)) : 0;
    els.results.replaceChildren(...result.hits.map((hit) => card(hit, top, bottom)));
    if (!n) {
      const none = document.createElement("p");
      none.className = "none";
      none.textContent = "Nothing found: the index may be empty.";
      els.results.append(none);
    }
  }

  function card(hit, top, bottom) {
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.dataset.id = hit.id;
    node.dataset.kind = hit.kind;
    node.classList.add(hit.kind);
    const img = node.querySelector(".thumb");
    if (hit.thumbnail) {
      img.src = `${hit.thumbnail}?size=256`;
      img.alt = hit.kind === "image" ? (hit.captions[0] || hit.source_id) : `image of: ${hit.text}`;
      img.addEventListener("error", () => node.classList.add("no-thumb"), { once: true });
    } else {
      node.classList.add("no-thumb");
    }
    node.querySelector(".rank").textContent = `#${hit.rank}`;
    node.querySelector(".score").textContent = hit.score.toFixed(3);
    const span = top - bottom;
    const fraction = span > 1e-9 ? 0.15 + 0.85 * (hit.score - bottom) / span : 1;
    node.querySelector(".fill").style.width = `${Math.round(fraction * 100)}%`;
    const text = node.querySelector(".hit-text");
    const list = node.querySelector(".hit-captions");
    if (hit.kind === "caption") {
      text.textContent = hit.text;
      node.title = "Find images this caption describes";
    } else {
      text.remove();
      for (const caption of hit.captions.slice(0, 3)) {
        const li = document.createElement("li");
        li.textContent = caption;
        li.title = "Find images matching this caption";
        li.addEventListener("click", (event) => {
          event.stopPropagation();
          go({ q: caption, target: "image" });
        });
        list.append(li);
      }
      if (hit.captions.length > 3) {
        const more = document.createElement("li");
        more.className = "more";
        more.textContent = `+${hit.captions.length - 3} more`;
        list.append(more);
      }
      node.title = "Find similar images";
    }
    node.querySelector(".meta").textContent = hit.source_id;
    const open = () => go({ item: hit.id, target: "image" }, hit);
    node.addEventListener("click", open);
    node.addEventListener("keydown", (event) => { if (event.key === "Enter") open(); });
    return node;
  }

  // ----- navigation: text and item searches live in the URL hash, so Back works -----

  let pending = null; // label/thumbnail of the clicked hit, for the next hash change

  function go(state, hit) {
    pending = hit || null;
    const hash = "#" + new URLSearchParams(state).toString();
    if (location.hash === hash) route(); else location.hash = hash;
  }

  function route() {
    const params = new URLSearchParams(location.hash.slice(1));
    const target = params.get("target") === "caption" ? "caption" : "image";
    if (params.has("q")) {
      els.q.value = params.get("q");
      els.textTarget.value = target;
      searchText(params.get("q"), target);
    } else if (params.has("item")) {
      const id = params.get("item");
      const hit = pending && String(pending.id) === id ? pending : null;
      const label = hit
        ? (hit.kind === "image" ? `more like image ${hit.source_id}` : `images for the caption “${hit.text}”`)
        : `more like item ${id}`;
      searchItem(id, target, label, hit && hit.thumbnail ? `${hit.thumbnail}?size=128` : null);
    }
    pending = null;
  }

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    const q = els.q.value.trim();
    if (q) go({ q, target: els.textTarget.value });
  });

  // ----- image input: drop, pick or paste -----

  function takeFiles(files) {
    const file = files && files[0];
    if (file) searchImage(file);
  }
  els.file.addEventListener("change", () => { takeFiles(els.file.files); els.file.value = ""; });
  els.drop.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); els.file.click(); }
  });
  for (const name of ["dragenter", "dragover"]) {
    els.drop.addEventListener(name, (event) => { event.preventDefault(); els.drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    els.drop.addEventListener(name, () => els.drop.classList.remove("over"));
  }
  els.drop.addEventListener("drop", (event) => { event.preventDefault(); takeFiles(event.dataTransfer.files); });
  document.addEventListener("paste", (event) => {
    const items = [...(event.clipboardData ? event.clipboardData.items : [])];
    const image = items.find((item) => item.kind === "file" && item.type.startsWith("image/"));
    if (image) { event.preventDefault(); searchImage(image.getAsFile()); }
  });
  window.addEventListener("hashchange", route);

  // ----- what is being served -----

  api("/api/info").then((info) => {
    els.info.textContent = `${info.n_images.toLocaleString()} images · ${info.n_captions.toLocaleString()} captions · ${info.encoder.spec}`;
    els.info.title = `encoder ${info.encoder.kind} v${info.encoder.version}, ${info.dim} dimensions, generation ${info.generation}`;
  }).catch((err) => { els.info.textContent = `index unavailable: ${err.message}`; });

  // A link or a browser's site-search entry may carry the query as ?q=… (or ?item=…): move it
  // into the hash, where searches live, so it runs now and Back works as for any other search.
  const linked = new URLSearchParams(location.search);
  if (linked.has("q") || linked.has("item")) history.replaceState(null, "", `${location.pathname}#${linked}`);

  if (location.hash.length > 1) route();
  else els.q.focus();
})();
