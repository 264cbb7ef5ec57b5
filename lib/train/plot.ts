// A dependency-free SVG chart of the training loss (and validation metrics) over steps.

export interface Series {
  name: string;
  points: [number, number][];
  /** Which y axis: the loss on the left, metrics in [0, 1] on the right. */
  axis: "left" | "right";
}

const COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

function escapeXml(s: string): string {
  return s.replace(/[<>&"]/g, (c) => ({ "<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;" })[c]!);
}

export function lineChartSvg(series: Series[], title: string): string {
  const width = 720, height = 360, left = 60, right = 60, top = 40, bottom = 40;
  const all = series.flatMap((s) => s.points);
  const maxX = Math.max(1, ...all.map((p) => p[0]));
  const leftValues = series.filter((s) => s.axis === "left").flatMap((s) => s.points.map((p) => p[1]));
  const maxLeft = Math.max(1e-9, ...leftValues.filter(Number.isFinite));
  const x = (v: number) => left + (v / maxX) * (width - left - right);
  const y = (v: number, axis: "left" | "right") =>
    height - bottom - (axis === "left" ? v / maxLeft : v) * (height - top - bottom);
  const parts: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" font-family="sans-serif" font-size="11">`,
    `<rect width="100%" height="100%" fill="white"/>`,
    `<text x="${width / 2}" y="20" text-anchor="middle" font-size="14">${escapeXml(title)}</text>`,
    `<line x1="${left}" y1="${height - bottom}" x2="${width - right}" y2="${height - bottom}" stroke="#444"/>`,
    `<line x1="${left}" y1="${top}" x2="${left}" y2="${height - bottom}" stroke="#444"/>`,
    `<line x1="${width - right}" y1="${top}" x2="${width - right}" y2="${height - bottom}" stroke="#bbb"/>`,
  ];
  for (let i = 0; i <= 4; i++) {
    const v = (maxLeft * i) / 4;
    parts.push(`<text x="${left - 6}" y="${y(v, "left") + 4}" text-anchor="end">${v.toPrecision(3)}</text>`);
    parts.push(`<text x="${width - right + 6}" y="${y(i / 4, "right") + 4}">${(i * 25).toFixed(0)}%</text>`);
    const s = Math.round((maxX * i) / 4);
    parts.push(`<text x="${x(s)}" y="${height - bottom + 16}" text-anchor="middle">${s}</text>`);
  }
  parts.push(`<text x="${width / 2}" y="${height - 6}" text-anchor="middle">step</text>`);
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (pts.length) {
      const d = pts.map((p, j) => `${j ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1], s.axis).toFixed(1)}`).join("");
      parts.push(`<path d="${d}" fill="none" stroke="${colour}" stroke-width="1.5"/>`);
      if (pts.length < 40) {
        for (const p of pts) {
          parts.push(
            `<circle cx="${x(p[0]).toFixed(1)}" cy="${y(p[1], s.axis).toFixed(1)}" r="2.5" fill="${colour}"/>`,
          );
        }
      }
    }
    parts.push(`<rect x="${left + 10}" y="${top + 4 + i * 14}" width="10" height="3" fill="${colour}"/>`);
    parts.push(`<text x="${left + 24}" y="${top + 9 + i * 14}">${escapeXml(s.name)}</text>`);
  });
  parts.push("</svg>");
  return parts.join("\n");
}
