// atomstream view: draws the snapshots the server sends (see atomstream/view/snapshot.py for the byte layout).
// Loads /snapshot once at start (the page shows the latest maps at once), then follows /ws for updates.
"use strict";

// categorical colours for classes (matplotlib's tab10) and colour-map stops (viridis-like, magma, RdBu)
const TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf"];
const MAGMA = ["#000004", "#180f3d", "#440f76", "#721f81", "#9e2f7f", "#cd4071", "#f1605d", "#fd9668", "#feca8d",
               "#fcfdbf"];
const RDBU = ["#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d", "#b2182b"];

function hexRgb(h) { return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16)); }
const STOPS = { magma: MAGMA.map(hexRgb), rdbu: RDBU.map(hexRgb) };

function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1), i = Math.min(Math.floor(x), stops.length - 2), f = x - i;
  return [0, 1, 2].map((c) => Math.round(stops[i][c] + f * (stops[i + 1][c] - stops[i][c])));
}
function hsl(h, s, l) {  // cyclic colours for angles: hue follows the angle
  const k = (n) => (n + h / 30) % 12, a = s * Math.min(l, 1 - l);
  const f = (n) => l - a * Math.max(-1, Math.min(k(n) - 3, Math.min(9 - k(n), 1)));
  return [f(0), f(8), f(4)].map((v) => Math.round(v * 255));
}
function classColour(k) { return hexRgb(TAB10[k % TAB10.length]); }

const SCALES = {
  defect: { name: "score", unit: "(0 = typical, 1 = defect-like)", lo: 0, hi: 1, colour: (t) => ramp(STOPS.magma, t) },
  angle: { name: "angle", unit: "degrees", lo: -180, hi: 180, colour: (t) => hsl(t * 360, 0.75, 0.5) },
  z: { name: "z", unit: "latent units (posterior mean)", colour: (t) => ramp(STOPS.rdbu, t) },
};

function decode(buf) {
  const dv = new DataView(buf), n = dv.getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, n)));
  const start = Math.ceil((4 + n) / 8) * 8, arrays = {};
  for (const a of header.arrays) {
    const count = a.shape.reduce((p, q) => p * q, 1);
    const Type = a.dtype === "float32" ? Float32Array : Uint8Array;
    arrays[a.name] = { data: new Type(buf, start + a.offset, count), shape: a.shape };
  }
  return { header, arrays };
}

// Geometry in frame pixels (pixel k has its centre at k): grid cell (i, j) is centred on its patch's centre
// (y0 + i*sy + (ph-1)/2, x0 + j*sx + (pw-1)/2), as the defect centroids are.
function geometry(frame, arrays) {
  const [ph, pw] = frame.patch, [sy, sx] = frame.stride, [y0, x0] = frame.origin;
  let box;
  if (frame.layout === "grid" && frame.grid) {
    const [gh, gw] = frame.grid;
    box = { top: y0 + (ph - 1) / 2 - sy / 2, left: x0 + (pw - 1) / 2 - sx / 2, h: gh * sy, w: gw * sx };
  } else if (arrays.centers) {
    const c = arrays.centers.data; let ymin = Infinity, ymax = -Infinity, xmin = Infinity, xmax = -Infinity;
    for (let k = 0; k < c.length; k += 2) {
      ymin = Math.min(ymin, c[k]); ymax = Math.max(ymax, c[k]); xmin = Math.min(xmin, c[k + 1]); xmax = Math.max(xmax, c[k + 1]);
    }
    box = { top: ymin - ph / 2, left: xmin - pw / 2, h: ymax - ymin + ph, w: xmax - xmin + pw };
  }
  const under = frame.underlay;
  if (under) {
    const [H, W] = under.shape, bottom = Math.max(box ? box.top + box.h : 0, H - 0.5);
    const right = Math.max(box ? box.left + box.w : 0, W - 0.5);
    const top = Math.min(box ? box.top : 0, -0.5), left = Math.min(box ? box.left : 0, -0.5);
    box = { top, left, h: bottom - top, w: right - left };
  }
  return box;
}

function drawMap(canvas, snap, name, colourOf, opts = {}) {
  const ctx = canvas.getContext("2d"), { header, arrays } = snap, frame = header.frame;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#e9ebef"; ctx.fillRect(0, 0, canvas.width, canvas.height);
  const values = arrays[name];
  if (!frame || !values) {
    ctx.fillStyle = "#5a6275"; ctx.font = "14px sans-serif";
    ctx.fillText(frame ? `this model publishes no ${name} map` : "no maps yet", 16, 28);
    return;
  }
  const box = geometry(frame, arrays), s = Math.min(canvas.width / box.w, canvas.height / box.h);
  const ox = (canvas.width - box.w * s) / 2, oy = (canvas.height - box.h * s) / 2;
  const X = (x) => ox + (x - box.left) * s, Y = (y) => oy + (y - box.top) * s;
  ctx.imageSmoothingEnabled = false;
  if (opts.underlay && arrays.frame) {
    const f = arrays.frame, [h, w] = f.shape, step = frame.underlay.step, img = new ImageData(w, h);
    for (let k = 0; k < h * w; k++) { const v = f.data[k]; img.data.set([v, v, v, 255], 4 * k); }
    const off = new OffscreenCanvas(w, h); off.getContext("2d").putImageData(img, 0, 0);
    ctx.drawImage(off, X(-0.5), Y(-0.5), w * step * s, h * step * s);
  }
  ctx.globalAlpha = opts.underlay && arrays.frame ? 0.5 : 1.0;
  if (frame.layout === "grid") {
    const [gh, gw] = values.shape, img = new ImageData(gw, gh);
    for (let k = 0; k < gh * gw; k++) { img.data.set([...colourOf(values.data[k]), 255], 4 * k); }
    const off = new OffscreenCanvas(gw, gh); off.getContext("2d").putImageData(img, 0, 0);
    ctx.drawImage(off, X(box.left), Y(box.top), box.w * s, box.h * s);
  } else {
    const c = arrays.centers.data, r = Math.max(2, (Math.min(...frame.patch) / 4) * s);
    for (let k = 0; k < values.data.length; k++) {
      ctx.fillStyle = `rgb(${colourOf(values.data[k]).join(",")})`;
      ctx.beginPath(); ctx.arc(X(c[2 * k + 1]), Y(c[2 * k]), r, 0, 2 * Math.PI); ctx.fill();
    }
  }
  ctx.globalAlpha = 1.0;
  if (opts.scaleBar && frame.pixel_size) scaleBar(ctx, frame, box.w * s, s, X(box.left), Y(box.top + box.h));
  if (opts.defects) {
    ctx.strokeStyle = "#00e5ff"; ctx.lineWidth = 2;
    for (const d of header.defects) {
      const r = Math.max(6, Math.sqrt(d.area / Math.PI) * Math.min(...frame.stride) * s);  // the region's area
      ctx.beginPath(); ctx.arc(X(d.x), Y(d.y), r, 0, 2 * Math.PI); ctx.stroke();
    }
  }
}

// A scale bar in the frame's calibrated unit: the longest 1, 2 or 5 × 10^k that fits in a fifth of the map.
function scaleBar(ctx, frame, widthPx, pxPerPixel, left, bottom) {
  const target = (0.2 * widthPx) / pxPerPixel * frame.pixel_size, k = Math.pow(10, Math.floor(Math.log10(target)));
  const length = [5, 2, 1].map((m) => m * k).find((v) => v <= target) || k;
  const w = (length / frame.pixel_size) * pxPerPixel, x = left + 10, y = bottom - 14;
  ctx.fillStyle = "#000a"; ctx.fillRect(x - 4, y - 16, w + 8, 24);
  ctx.fillStyle = "#fff"; ctx.fillRect(x, y, w, 4);
  ctx.font = "11px sans-serif"; ctx.textAlign = "center"; ctx.textBaseline = "bottom";
  ctx.fillText(`${+length.toPrecision(3)} ${frame.pixel_unit || ""}`.trim(), x + w / 2, y - 1);
}

function drawBar(canvas, scale, lo, hi) {
  const ctx = canvas.getContext("2d"), w = canvas.width, pad = 8;
  ctx.clearRect(0, 0, w, canvas.height);
  for (let x = pad; x < w - pad; x++) {
    ctx.fillStyle = `rgb(${scale.colour((x - pad) / (w - 2 * pad - 1)).join(",")})`; ctx.fillRect(x, 0, 1, 12);
  }
  ctx.strokeStyle = "#0004"; ctx.strokeRect(pad - 0.5, -0.5, w - 2 * pad + 1, 13);
  ctx.fillStyle = "#1d2330"; ctx.font = "11px sans-serif"; ctx.textBaseline = "top";
  const fmt = (v) => (Math.abs(hi - lo) >= 20 ? v.toFixed(0) : v.toFixed(2));
  ctx.textAlign = "left"; ctx.fillText(fmt(lo), pad, 15);
  ctx.textAlign = "right"; ctx.fillText(fmt(hi), w - pad, 15);
  ctx.textAlign = "center"; ctx.fillText(`${fmt((lo + hi) / 2)}  ${scale.unit}`, w / 2, 15);
}

function legend(ul, names, fractions) {
  ul.replaceChildren(...names.map((n, k) => {
    const li = document.createElement("li"), sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = TAB10[k % TAB10.length];
    const pct = fractions ? ` ${(100 * fractions[k]).toFixed(1)}%` : "";
    li.append(sw, document.createTextNode(`${n}${pct}`)); return li;
  }));
}

function drawHistory(canvas, header) {
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, rows = header.history.fractions;
  const L = 40, B = 28, T = 8, R = 8, pw = W - L - R, ph = H - T - B;
  ctx.clearRect(0, 0, W, H);
  ctx.fillStyle = "#1d2330"; ctx.font = "11px sans-serif";
  if (!rows.length) { ctx.fillText("no maps yet", L, T + 20); return; }
  const K = rows[0].length, n = rows.length, xs = (i) => L + (n === 1 ? pw : (i / (n - 1)) * pw);
  let below = new Array(n).fill(0);
  for (let k = 0; k < K; k++) {
    const above = below.map((b, i) => b + rows[i][k]);
    ctx.beginPath(); ctx.moveTo(xs(0), T + ph * (1 - above[0]));
    for (let i = 1; i < n; i++) ctx.lineTo(xs(i), T + ph * (1 - above[i]));
    for (let i = n - 1; i >= 0; i--) ctx.lineTo(xs(i), T + ph * (1 - below[i]));
    ctx.closePath(); ctx.fillStyle = TAB10[k % TAB10.length]; ctx.fill();
    below = above;
  }
  ctx.strokeStyle = "#1d2330"; ctx.strokeRect(L, T, pw, ph); ctx.fillStyle = "#1d2330";
  ctx.textAlign = "right"; ctx.textBaseline = "middle";
  for (const v of [0, 0.5, 1]) ctx.fillText(`${v * 100}%`, L - 4, T + ph * (1 - v));
  ctx.textAlign = "center"; ctx.textBaseline = "top"; const ids = header.history.frame_id;
  ctx.fillText(`frame ${ids[0]}`, L + 30, T + ph + 4); ctx.fillText(`frame ${ids[n - 1]}`, L + pw - 30, T + ph + 4);
}

function shares(cls, k) {  // class shares in the drawn frame (the rates above are over a time window)
  if (!cls) return null;
  const counts = new Array(k).fill(0);
  for (const c of cls.data) counts[c] += 1;
  return counts.map((n) => n / Math.max(cls.data.length, 1));
}

function range(arr) {  // symmetric around 0 for latents, at the 99th percentile of |z| so one outlier does not wash out
  const a = Array.from(arr.data, Math.abs).filter(Number.isFinite).sort((p, q) => p - q);
  const m = a.length ? a[Math.floor(0.99 * (a.length - 1))] : 1;
  return Math.max(m, 1e-6);
}

const ms = (p) => (p ? `${p.p50.toFixed(1)} / ${p.p90.toFixed(1)} ms` : "–");
let drawn = 0;

function render(snap) {
  const { header, arrays } = snap, stats = header.stats, frame = header.frame;
  const conn = document.getElementById("connection");
  conn.className = `pill ${header.error ? "bad" : header.connected ? "ok" : "wait"}`;
  conn.textContent = header.error ? "subscriber failed" : header.connected ? `connected to ${header.endpoint}`
    : `waiting for the service at ${header.endpoint}…`;
  const err = document.getElementById("error");
  err.hidden = !header.error; err.textContent = header.error || "";
  document.getElementById("n-maps").textContent = header.n_maps;
  document.getElementById("fps").textContent = `${stats.fps.toFixed(1)} (last ${stats.window_s} s)`;
  document.getElementById("lat-service").textContent = ms(stats.service_ms);
  document.getElementById("lat-e2e").textContent = ms(stats.e2e_ms);
  document.getElementById("defect-rate").textContent = stats.defects_per_frame.toFixed(2);
  const st = stats.status, rejected = st ? st.frames_rejected : 0, dropped = st ? st.frames_dropped : 0;
  document.getElementById("losses").textContent = `${rejected} · ${dropped} · ${header.gaps}`;
  document.title = `atomstream view · ${header.n_maps} maps`;
  if (!frame) return;
  document.getElementById("model").textContent =
    `model ${frame.model.name} ${frame.model.version} (${frame.model.sha256})`;
  const pixel = frame.pixel_size ? ` · pixel ${+frame.pixel_size.toPrecision(3)} ${frame.pixel_unit || ""}` : "";
  document.getElementById("frame-id").textContent = `scan ${frame.scan_id} · frame ${frame.frame_id}${pixel}`;
  document.getElementById("cap-class").textContent = arrays.frame ? "frame with classes" : "classes";
  drawMap(document.getElementById("map-class"), snap, "class", (v) => classColour(v), { underlay: true, scaleBar: true });
  drawMap(document.getElementById("map-defect"), snap, "defect_score", (v) => SCALES.defect.colour(v),
    { defects: true });
  drawBar(document.getElementById("bar-defect"), SCALES.defect, 0, 1);
  drawMap(document.getElementById("map-angle"), snap, "angle", (v) => SCALES.angle.colour((v + 180) / 360));
  drawBar(document.getElementById("bar-angle"), SCALES.angle, -180, 180);
  for (const z of ["z0", "z1"]) {
    const m = arrays[z] ? range(arrays[z]) : 1;
    drawMap(document.getElementById(`map-${z}`), snap, z, (v) => SCALES.z.colour((v + m) / (2 * m)));
    drawBar(document.getElementById(`bar-${z}`), SCALES.z, -m, m);
  }
  legend(document.getElementById("legend-class"), frame.class_names, shares(arrays.class, frame.class_names.length));
  legend(document.getElementById("legend-history"), frame.class_names, null);
  drawHistory(document.getElementById("history"), header);
  drawn += 1;
  document.body.dataset.framesDrawn = drawn;
  document.body.dataset.frameId = frame.frame_id;
}

async function loadOnce() {
  const r = await fetch("/snapshot", { cache: "no-store" });
  render(decode(await r.arrayBuffer()));
}

function follow() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => render(decode(ev.data));
  ws.onclose = () => setTimeout(follow, 2000);  // the view server restarted: reconnect
}

loadOnce().catch((e) => console.error(e)).finally(follow);
