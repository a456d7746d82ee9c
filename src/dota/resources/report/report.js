// Depth slider of the DoTA report: draws one depth slice of each map on small canvases.
// Data: the JSON block #dota-slices (uint8 maps, base64; colour tables from the report's figures).
"use strict";
(function () {
  const holder = document.getElementById("dota-slices");
  if (!holder) return;
  const data = JSON.parse(holder.textContent);
  const decode = (s) => {
    const bin = atob(s);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out;
  };
  const lut = {};
  for (const k of Object.keys(data.luts)) lut[k] = decode(data.luts[k]);
  const num = (x) => (x === null || x === undefined ? "-" : Math.abs(x) >= 0.01 || x === 0 ? x.toFixed(3) : x.toExponential(2));

  function setup(root) {
    const b = data.beamlets[root.dataset.key];
    if (!b) return;
    const [L, H, W] = b.shape;
    const vz = b.voxel_mm[0];
    const maps = {};
    for (const k of ["ct", "ref", "pred", "diff", "gamma"]) maps[k] = decode(b[k]);
    const slider = root.querySelector("input[type=range]");
    const label = root.querySelector(".slice-label");
    const panels = Array.from(root.querySelectorAll("canvas[data-panel]"));
    const plane = root.querySelector("canvas.plane");
    const threshold = Math.round(b.overlay_threshold * 255);

    const planeCtx = plane.getContext("2d");
    const planeImg = planeCtx.createImageData(L, W);
    for (let d = 0; d < L; d++) {
      for (let c = 0; c < W; c++) {
        const v = maps.ref[(d * H + b.plane_row) * W + c];
        const p = ((W - 1 - c) * L + d) * 4;
        planeImg.data.set([lut.dose[3 * v], lut.dose[3 * v + 1], lut.dose[3 * v + 2], 255], p);
      }
    }

    function drawPanel(canvas, d) {
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(W, H);
      const px = img.data;
      const off = d * H * W;
      const kind = canvas.dataset.panel;
      for (let i = 0; i < H * W; i++) {
        let r, g, bl;
        if (kind === "ctdose") {
          const c = maps.ct[off + i];
          const v = maps.ref[off + i];
          r = g = bl = c;
          if (v >= threshold) {
            r = 0.35 * c + 0.65 * lut.dose[3 * v];
            g = 0.35 * c + 0.65 * lut.dose[3 * v + 1];
            bl = 0.35 * c + 0.65 * lut.dose[3 * v + 2];
          }
        } else if (kind === "gamma") {
          const v = maps.gamma[off + i];
          if (v === 0) {
            r = g = bl = 140;
          } else {
            const k = Math.round(((v - 1) / 254) * 255);
            r = lut.gamma[3 * k]; g = lut.gamma[3 * k + 1]; bl = lut.gamma[3 * k + 2];
          }
        } else {
          const table = kind === "diff" ? lut.diff : lut.dose;
          const v = maps[kind][off + i];
          r = table[3 * v]; g = table[3 * v + 1]; bl = table[3 * v + 2];
        }
        px[4 * i] = r; px[4 * i + 1] = g; px[4 * i + 2] = bl; px[4 * i + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
    }

    function draw(d) {
      panels.forEach((c) => drawPanel(c, d));
      planeCtx.putImageData(planeImg, 0, 0);
      planeCtx.fillStyle = "rgba(0, 230, 255, 0.9)";
      planeCtx.fillRect(d, 0, 1, W);
      const pass = b.slice_pass[d];
      label.textContent =
        `depth ${(d * vz).toFixed(0)}-${((d + 1) * vz).toFixed(0)} mm (slice ${d + 1} of ${L}); ` +
        `max dose: reference ${num(b.slice_ref_max[d])}, prediction ${num(b.slice_pred_max[d])} Gy per 1e9; ` +
        `gamma pass rate in this slice: ${pass === null ? "nothing evaluated" : pass.toFixed(1) + " %"}`;
      root.dataset.slice = String(d);
    }

    slider.addEventListener("input", () => draw(parseInt(slider.value, 10)));
    draw(parseInt(slider.value, 10));
  }

  document.querySelectorAll(".slicer").forEach(setup);
})();
