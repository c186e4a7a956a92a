/* rayserver dashboard, the farm section: every render host of the hosts file.

   Kept apart from app.js (the job cards): it only reads the token app.js keeps
   in sessionStorage, asks GET /v1/farm every few seconds, and on request
   GET /v1/farm/<host>/jobs, which this server fetches from that host (the page
   talks to no other origin). Server texts go in with textContent only. */
"use strict";

(() => {
  const TOKEN_KEY = "rayserver.token";
  const FARM_INTERVAL_MS = 5000;
  const HIDDEN_INTERVAL_MS = 20000;
  const REQUEST_TIMEOUT_MS = 15000;
  const JOBS_SHOWN = 30;

  const $ = (id) => document.getElementById(id);
  const farm = { timer: null, open: null, busy: false, auth: null, picture: null, blobUrl: null };
  const PICTURE_RE = /\.(hdr|pic)$/i;

  async function get(path, as = "json") {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = { Accept: "application/json" };
    if (token) headers["Authorization"] = "Bearer " + token;
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
    try {
      const response = await fetch(path, { headers, cache: "no-store", signal: controller.signal });
      if (response.ok && as === "response") return response;
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON */ }
      if (!response.ok) {
        const error = new Error((body && body.error) || response.status + " " + response.statusText);
        error.status = response.status;
        throw error;
      }
      return body;
    } catch (err) {
      if (err.name === "AbortError") throw new Error("no answer within " + REQUEST_TIMEOUT_MS / 1000 + " s");
      throw err;
    } finally {
      clearTimeout(timer);
    }
  }

  function cell(text, cls) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    return td;
  }

  function hostRow(host) {
    const tr = document.createElement("tr");
    tr.dataset.host = host.name;
    tr.className = host.answering ? "farm-up" : "farm-down";
    const name = document.createElement("th");
    name.scope = "row";
    name.textContent = host.name + (host.self ? " (this server)" : "");
    tr.append(name);
    tr.append(cell(host.answering ? "answering" : "not answering: " + (host.error || "?"),
      "farm-state"));
    tr.append(cell(String(host.answering ? host.cpus : host.record_cpus)));
    tr.append(cell(Array.isArray(host.load) ? host.load.map((v) => Number(v).toFixed(2)).join(", ") : "–"));
    tr.append(cell(host.answering ? host.running + " / " + host.queued : "–"));
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "secondary";
    button.textContent = "Jobs";
    button.setAttribute("aria-label", "Jobs of " + host.name);
    button.disabled = !host.answering;
    button.addEventListener("click", () => openJobs(host));
    td.append(button);
    tr.append(td);
    return tr;
  }

  async function refresh() {
    clearTimeout(farm.timer);
    if (farm.busy) return;
    farm.busy = true;
    try {
      // Not signed in yet: ask nothing that needs a token (a 401 is an error in the console).
      if (farm.auth === null) farm.auth = (await get("/v1/info")).auth !== false;
      if (farm.auth && !sessionStorage.getItem(TOKEN_KEY)) {
        $("farm").hidden = true;
        return;
      }
      const body = await get("/v1/farm");
      const rows = (body.hosts || []).map(hostRow);
      $("farm-hosts").replaceChildren(...rows);
      $("farm").hidden = false;
      $("farm-message").textContent = rows.length ? "" : "The hosts file names no render host.";
      $("farm-checked").textContent = "checked " + new Date(body.checked_at * 1000).toLocaleTimeString();
      if (farm.open) showJobs(farm.open, false);
    } catch (err) {
      // 401: not signed in yet; app.js shows the sign-in form
      if (err.status === 401) $("farm").hidden = true;
      else $("farm-message").textContent = "Cannot list the render hosts: " + err.message;
    } finally {
      farm.busy = false;
      farm.timer = setTimeout(refresh, document.hidden ? HIDDEN_INTERVAL_MS : FARM_INTERVAL_MS);
    }
  }

  function openJobs(host) {
    farm.open = host;
    $("farm-jobs-heading").textContent = "Jobs on " + host.name;
    $("farm-jobs").hidden = false;
    showJobs(host, true);
  }

  function jobItem(job) {
    const li = document.createElement("li");
    li.className = "farm-job";
    const badge = document.createElement("span");
    badge.className = "state state-" + job.state;
    badge.textContent = job.state;
    const progress = job.state === "running" ? " · " + Math.round(Number(job.progress) || 0) + " %" : "";
    const programs = (job.steps || []).map((s) => s.program).join(", ");
    li.append("#" + job.id + (job.name ? " " + job.name : "") + " ", badge,
      " " + (job.user ? job.user + " · " : "") + programs + progress);
    const kind = pictureKind(job);
    if (kind && (job.state === "done" || (job.state === "running" && kind === "preview"))) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "secondary";
      button.textContent = "Picture";
      button.setAttribute("aria-label", "Picture of job " + job.id + " on " + farm.open.name);
      button.addEventListener("click", () => {
        farm.picture = { host: farm.open, job, kind };
        showPicture();
      });
      li.append(" ", button);
    }
    return li;
  }

  // preview: a rendering (finished or so far); grid: rtrace over a points file
  function pictureKind(job) {
    const steps = job.steps || [];
    if (steps.some((s) => s.program === "rpict" || s.program === "rad" ||
        PICTURE_RE.test(s.stdout || ""))) return "preview";
    if (steps.some((s) => s.program === "rtrace" && typeof s.stdin === "string")) return "grid";
    return null;
  }

  async function showPicture() {
    const { host, job, kind } = farm.picture;
    const base = host.self ? "/v1/jobs/" : "/v1/farm/" + encodeURIComponent(host.name) + "/jobs/";
    const caption = $("farm-picture-caption");
    $("farm-picture").hidden = false;
    try {
      const response = await get(base + job.id + "/" + kind + ".png", "response");
      if (response.status === 204) { caption.textContent = "No picture yet."; return; }
      const rows = response.headers.get("X-Preview-Rows");
      const blob = await response.blob();
      if (farm.blobUrl) URL.revokeObjectURL(farm.blobUrl);
      farm.blobUrl = URL.createObjectURL(blob);
      $("farm-picture-img").src = farm.blobUrl;
      $("farm-picture-img").alt = "Picture of job " + job.id + " on " + host.name;
      caption.textContent = "Job " + job.id + " on " + host.name +
        (rows ? ": picture so far, " + rows.replace("/", " of ") + " scanlines" : "");
    } catch (err) {
      caption.textContent = "No picture of job " + job.id + ": " + err.message;
    }
  }

  async function showJobs(host, announce) {
    const path = host.self ? "/v1/jobs?limit=" + JOBS_SHOWN
      : "/v1/farm/" + encodeURIComponent(host.name) + "/jobs?limit=" + JOBS_SHOWN;
    const list = $("farm-job-list");
    try {
      const body = await get(path);
      const jobs = body.jobs || [];
      list.replaceChildren(...jobs.map(jobItem));
      // a picture so far is looked at again with each refresh while its job runs
      const shown = farm.picture && farm.picture.host.name === host.name &&
        jobs.find((j) => j.id === farm.picture.job.id);
      if (shown && (shown.state === "running" || farm.picture.job.state === "running")) {
        farm.picture.job = shown;
        showPicture();
      }
      $("farm-jobs-empty").hidden = jobs.length > 0;
      $("farm-jobs-empty").textContent = "No job on " + host.name + ".";
    } catch (err) {
      list.replaceChildren();
      $("farm-jobs-empty").hidden = false;
      $("farm-jobs-empty").textContent = "The jobs of " + host.name + " cannot be read: " + err.message;
    }
    if (announce) $("farm-jobs-heading").focus();
  }

  function start() {
    $("farm-jobs-close").addEventListener("click", () => {
      farm.open = null;
      farm.picture = null;
      $("farm-jobs").hidden = true;
      $("farm-picture").hidden = true;
    });
    document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
    // sign-in happens in app.js: look again soon after it stores the token
    window.addEventListener("storage", refresh);
    document.addEventListener("submit", () => setTimeout(refresh, 500));
    refresh();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
