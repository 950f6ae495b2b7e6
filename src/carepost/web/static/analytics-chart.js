// The analytics page's chart (issue 13 item 6): reads the figures from the page's
// <script type="application/json" id="analytics-data"> block and draws them with the vendored
// uPlot. A suppressed cell ("<11", "suppressed") is drawn as a gap, never as a number.
(function () {
  "use strict";
  var COLORS = ["#1f6feb", "#1a7f37", "#8250df", "#bf3989", "#9a6700", "#cf222e"];

  function draw() {
    var holder = document.getElementById("analytics-chart");
    var source = document.getElementById("analytics-data");
    if (!holder || !source || typeof uPlot === "undefined") return;
    var data = JSON.parse(source.textContent);
    var columns = [data.x];
    var series = [{}];
    data.series.forEach(function (s, i) {
      columns.push(s.values.map(function (v) { return typeof v === "number" ? v : null; }));
      series.push({ label: s.label, stroke: COLORS[i % COLORS.length], width: 2, spanGaps: false,
                    value: function (u, v) { return v == null ? "–" : v.toLocaleString(); } });
    });
    var width = Math.max(320, holder.clientWidth || 800);
    var opts = {
      width: width, height: 280, series: series,
      scales: { x: { time: true } },
      axes: [{}, { values: function (u, vals) { return vals.map(function (v) { return v.toLocaleString(); }); } }],
      legend: { live: true }
    };
    holder.textContent = "";
    var plot = new uPlot(opts, columns, holder);
    holder.setAttribute("data-drawn", "true");
    window.addEventListener("resize", function () {
      plot.setSize({ width: Math.max(320, holder.clientWidth || 800), height: 280 });
    });
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
