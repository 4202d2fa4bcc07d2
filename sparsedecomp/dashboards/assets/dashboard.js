/* sparsedecomp feature dashboards: draws an SAE's feature table (from window.SD_INDEX, set by features.js) and a
 * feature page (from its inline record, <script id="sd-feature" type="application/json">). Vanilla JS, no network;
 * plotly comes from assets/plotly.min.js beside this file.
 *
 * Safety: record strings (tokens above all) are untrusted text. They reach the DOM only through textContent and
 * attribute values; never innerHTML. Hrefs with a URL scheme (javascript, http, ...) or a leading "//" are not
 * made links.
 */
(function () {
  "use strict";

  var PAGE_SIZE = 100;

  // ---- small helpers -------------------------------------------------------------------------------------------

  /** An element with attributes (strings) and children (elements or text). */
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, String(attrs[k]));
    });
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    });
    return node;
  }

  /** A number for display: "–" for null, 3 significant digits, integers as they are. */
  function fmt(x, digits) {
    if (x === null || x === undefined || (typeof x === "number" && isNaN(x))) return "–";
    if (typeof x !== "number") return String(x);
    if (Number.isInteger(x)) return String(x);
    var d = digits || 3, a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(d - 1);
    return String(Number(x.toPrecision(d)));
  }

  /** A relative href, or null for anything with a scheme or a host (those would leave the site or run code). */
  function safeHref(href) {
    if (typeof href !== "string" || href === "") return null;
    if (/^\s*[a-z][a-z0-9+.\-]*:/i.test(href) || /^\s*[\/\\]{2}/.test(href)) return null;
    return href;
  }

  /** A link when the href is safe, else the plain text. */
  function link(href, text) {
    var h = safeHref(href);
    return h === null ? el("span", {"class": "nolink"}, [text]) : el("a", {href: h}, [text]);
  }

  /** A token as a reader should see it: newlines and tabs made visible (spaces kept, the CSS keeps them). */
  function showToken(s) {
    return String(s).replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5").replace(/\r/g, "\u240d");
  }

  function note(parent, text) {
    parent.appendChild(el("p", {"class": "muted empty"}, [text]));
  }

  /** A table: header cells (text, or [text, class]) and body rows (arrays of cell contents, or [contents, class]
   * pairs built with cell()). */
  function dataTable(headers, rows) {
    function th(h) { return Array.isArray(h) ? el("th", {"class": h[1]}, [h[0]]) : el("th", {}, [h]); }
    return el("table", {"class": "sd-table"}, [
      el("thead", {}, [el("tr", {}, headers.map(th))]),
      el("tbody", {}, rows.map(function (r) {
        return el("tr", {}, r.map(function (c) {
          return c && c.cell ? el("td", {"class": c.cls}, c.content) : el("td", {}, [c]);
        }));
      }))
    ]);
  }

  function cell(content, cls) {
    return {cell: true, content: Array.isArray(content) ? content : [content], cls: cls || null};
  }

  function panel(id) {
    return document.getElementById(id);
  }

  // ---- feature table (DIR/<sae>/index.html) --------------------------------------------------------------------

  function readHash() {
    return new URLSearchParams(location.hash.replace(/^#/, ""));
  }

  function writeHash(params) {
    var text = params.toString();
    if (text !== location.hash.replace(/^#/, "")) location.hash = text;  // fires hashchange, which redraws
  }

  function cellText(value) {
    if (Array.isArray(value)) return value.map(showToken).join(" \u00b7 ");
    return value === null || value === undefined ? "" : String(value);
  }

  function indexPage() {
    var table = panel("sd-index"), status = panel("sd-status");
    var data = window.SD_INDEX;
    if (!data || !Array.isArray(data.columns) || !Array.isArray(data.rows)) {
      status.textContent = "The feature table's data file did not load (features.js beside this page).";
      return;
    }
    var columns = data.columns, rows = data.rows;
    var numeric = columns.map(function (_, j) {
      return rows.every(function (r) { return r[j] === null || typeof r[j] === "number"; });
    });
    var searchable = [];  // text columns: strings or lists of strings (top tokens)
    columns.forEach(function (_, j) { if (!numeric[j]) searchable.push(j); });
    // lower-cased search text per row, built once (16,384 rows: a few ms)
    var haystack = rows.map(function (r) {
      return searchable.map(function (j) { return cellText(r[j]); }).join("\n").toLowerCase();
    });
    var headColumns = [];  // integer columns naming a head ("top_head:weight"): offered as selects
    columns.forEach(function (name, j) {
      if (j > 0 && numeric[j] && /head/i.test(name) &&
          rows.every(function (r) { return r[j] === null || Number.isInteger(r[j]); })) headColumns.push(j);
    });

    // controls
    var search = panel("sd-search"), filterColumn = panel("sd-filter-column");
    var filterMin = panel("sd-filter-min"), filterMax = panel("sd-filter-max");
    columns.forEach(function (name, j) {
      if (numeric[j] && j > 0) filterColumn.appendChild(el("option", {value: name}, [name]));
    });
    var headSelects = headColumns.map(function (j) {
      var values = Array.from(new Set(rows.map(function (r) { return r[j]; }).filter(function (v) {
        return v !== null;
      }))).sort(function (a, b) { return a - b; });
      var select = el("select", {"data-column": columns[j]}, [el("option", {value: ""}, ["any"])]
        .concat(values.map(function (v) { return el("option", {value: String(v)}, [String(v)]); })));
      panel("sd-head-filter").appendChild(el("label", {}, [columns[j] + " ", select]));
      select.addEventListener("change", function () {
        var p = readHash();
        if (select.value === "") p.delete("eq." + columns[j]); else p.set("eq." + columns[j], select.value);
        p.delete("page");
        writeHash(p);
      });
      return select;
    });
    search.addEventListener("input", function () {
      var p = readHash();
      if (search.value) p.set("q", search.value); else p.delete("q");
      p.delete("page");
      writeHash(p);
    });
    function rangeChanged() {
      var p = readHash(), name = filterColumn.value;
      Array.from(p.keys()).filter(function (k) { return /^(min|max)\./.test(k); }).forEach(function (k) {
        p.delete(k);
      });
      if (filterMin.value !== "") p.set("min." + name, filterMin.value);
      if (filterMax.value !== "") p.set("max." + name, filterMax.value);
      p.delete("page");
      writeHash(p);
    }
    [filterColumn, filterMin, filterMax].forEach(function (c) { c.addEventListener("change", rangeChanged); });
    panel("sd-reset").addEventListener("click", function () { writeHash(new URLSearchParams()); });

    // header: click to sort, again to reverse
    var head = el("tr", {}, columns.map(function (name, j) {
      var th = el("th", {"data-column": name, "class": numeric[j] ? "sortable" : "sortable l", title: "sort"}, [name]);
      th.addEventListener("click", function () {
        var p = readHash();
        var dir = p.get("sort") === name && p.get("dir") !== "desc" ? "desc" : "asc";
        if (p.get("sort") !== name && numeric[j] && j > 0) dir = "desc";  // largest first for values
        p.set("sort", name);
        p.set("dir", dir);
        p.delete("page");
        writeHash(p);
      });
      return th;
    }));
    table.tHead.appendChild(head);

    function draw() {
      var p = readHash();
      var q = (p.get("q") || "").trim().toLowerCase();
      search.value = p.get("q") || "";
      var tests = [];
      p.forEach(function (value, key) {
        var m = /^(min|max|eq)\.(.+)$/.exec(key), j = m ? columns.indexOf(m[2]) : -1, x = Number(value);
        if (j < 0 || value === "" || isNaN(x)) return;
        if (m[1] !== "eq") { filterColumn.value = m[2]; (m[1] === "min" ? filterMin : filterMax).value = value; }
        tests.push(function (r) {
          var v = r[j];
          if (v === null || typeof v !== "number") return false;
          return m[1] === "min" ? v >= x : m[1] === "max" ? v <= x : v === x;
        });
      });
      headSelects.forEach(function (s) { s.value = p.get("eq." + s.getAttribute("data-column")) || ""; });
      var qNumber = /^\d+$/.test(q) ? Number(q) : null;
      var shown = [];
      for (var i = 0; i < rows.length; i++) {
        var r = rows[i];
        if (q && r[0] !== qNumber && haystack[i].indexOf(q) < 0) continue;
        if (!tests.every(function (t) { return t(r); })) continue;
        shown.push(i);
      }
      var sortName = p.get("sort"), sj = sortName === null ? -1 : columns.indexOf(sortName);
      var desc = p.get("dir") === "desc";
      if (sj >= 0) {
        shown.sort(function (a, b) {
          var x = rows[a][sj], y = rows[b][sj];
          if (x === null || x === undefined) return y === null || y === undefined ? a - b : 1;  // missing last
          if (y === null || y === undefined) return -1;
          var c = numeric[sj] ? x - y : cellText(x).localeCompare(cellText(y));
          return (desc ? -c : c) || a - b;
        });
      }
      var nPages = Math.max(1, Math.ceil(shown.length / PAGE_SIZE));
      var page = Math.min(Math.max(1, parseInt(p.get("page") || "1", 10) || 1), nPages);
      var body = document.createDocumentFragment();
      shown.slice((page - 1) * PAGE_SIZE, page * PAGE_SIZE).forEach(function (i) {
        var r = rows[i];
        body.appendChild(el("tr", {}, r.map(function (v, j) {
          if (j === 0) return el("td", {}, [el("a", {href: "f/" + Number(v) + ".html"}, [String(v)])]);
          return el("td", {"class": numeric[j] ? null : "l"}, [numeric[j] ? fmt(v) : cellText(v)]);
        })));
      });
      var tbody = table.tBodies[0];
      tbody.textContent = "";
      tbody.appendChild(body);
      Array.from(head.children).forEach(function (th) {
        var on = th.getAttribute("data-column") === sortName;
        th.setAttribute("aria-sort", on ? (desc ? "descending" : "ascending") : "none");
      });
      table.setAttribute("data-matching", String(shown.length));
      table.setAttribute("data-page", String(page));
      status.textContent = shown.length
        ? "rows " + ((page - 1) * PAGE_SIZE + 1) + "\u2013" + Math.min(page * PAGE_SIZE, shown.length) + " of " +
          shown.length + " matching (" + rows.length + " features)"
        : "no feature matches (" + rows.length + " features)";
      drawPager(page, nPages);
    }

    function drawPager(page, nPages) {
      var pager = panel("sd-pager");
      pager.textContent = "";
      function go(target, label) {
        var b = el("button", {type: "button", "data-page": target}, [label]);
        if (target < 1 || target > nPages || target === page) b.disabled = true;
        b.addEventListener("click", function () { var p = readHash(); p.set("page", String(target)); writeHash(p); });
        pager.appendChild(b);
      }
      go(1, "\u00ab first");
      go(page - 1, "\u2039 previous");
      pager.appendChild(el("span", {}, [" page " + page + " of " + nPages + " "]));
      go(page + 1, "next \u203a");
      go(nPages, "last \u00bb");
    }

    window.addEventListener("hashchange", draw);
    draw();
  }

  // ---- feature page (DIR/<sae>/f/<feature>.html) ---------------------------------------------------------------

  var PLOT_CONFIG = {displayModeBar: false, responsive: true};

  /** An axis range that plotly can tick sensibly: [lo, hi], or a fixed small span around a degenerate value (the
   * anchors emit a tick per 1e-? step there, megabytes of ticks). */
  function guardedRange(lo, hi) {
    if (!isFinite(lo) || !isFinite(hi)) return [0, 1];
    var scale = Math.max(Math.abs(lo), Math.abs(hi), 1);
    if (hi - lo > 1e-6 * scale) return [lo, hi];
    var c = (lo + hi) / 2, half = Math.max(Math.abs(c) * 0.05, 0.05);
    return [c - half, c + half];
  }

  function histogram(target, hist, xTitle, signed, yTitle) {
    var box = el("div", {"class": "plot"});
    target.appendChild(box);
    if (!hist || !hist.counts || !hist.counts.length) { note(target, "No values to show."); return; }
    var edges = hist.edges, counts = hist.counts;
    var centers = counts.map(function (_, i) { return (edges[i] + edges[i + 1]) / 2; });
    var widths = counts.map(function (_, i) { return edges[i + 1] - edges[i]; });
    var range = guardedRange(edges[0], edges[edges.length - 1]);
    var colors = centers.map(function (c) { return signed && c < 0 ? "#d1574a" : "#4a7bd1"; });
    if (!window.Plotly) { note(target, "plotly.min.js is missing from the assets folder: no figure."); return; }
    window.Plotly.newPlot(box, [{
      type: "bar", x: centers, y: counts, width: widths.map(function (w) { return Math.max(w, (range[1] - range[0]) / 50); }),
      marker: {color: colors}, hovertemplate: "%{x:.4g}: %{y} <extra></extra>"
    }], {
      height: 220, margin: {l: 45, r: 10, t: 10, b: 40}, bargap: 0.02,
      xaxis: {title: {text: xTitle}, range: range, tickmode: "auto", nticks: 8},
      yaxis: {title: {text: yTitle || "count"}, tickmode: "auto", nticks: 6, rangemode: "tozero"}
    }, PLOT_CONFIG);
  }

  /** The SAE's features by log10 density (rec.density_histogram), with this feature's density marked. */
  function densityPanel(rec) {
    var target = panel("sd-density"), hist = rec.density_histogram;
    if (!hist || !hist.counts || !hist.counts.length) { note(target, "No density histogram."); return; }
    var edges = hist.log10_edges, counts = hist.counts, n = counts.reduce(function (a, b) { return a + b; }, 0);
    var centers = counts.map(function (_, i) { return (edges[i] + edges[i + 1]) / 2; });
    var here = rec.density > 0 ? Math.log10(rec.density) : null;
    target.appendChild(el("p", {"class": "muted"}, [
      (here === null ? "This feature never fired. " : "This feature: log10 density " + fmt(here) + ". ") +
      n + " features fired, " + hist.n_dead + " never did."]));
    var box = el("div", {"class": "plot"});
    target.appendChild(box);
    if (!window.Plotly) { note(target, "plotly.min.js is missing from the assets folder: no figure."); return; }
    var shapes = here === null ? [] : [{type: "line", x0: here, x1: here, yref: "paper", y0: 0, y1: 1,
                                        line: {color: "#d1574a", width: 2}}];
    window.Plotly.newPlot(box, [{
      type: "bar", x: centers, y: counts, width: edges[1] - edges[0], marker: {color: "#9aa9c7"},
      hovertemplate: "log10 density %{x:.2f}: %{y} features<extra></extra>"
    }], {
      height: 220, margin: {l: 45, r: 10, t: 10, b: 40}, bargap: 0.02, shapes: shapes,
      xaxis: {title: {text: "log10 density (this feature in red)"}, range: guardedRange(edges[0], edges[edges.length - 1]),
              tickmode: "auto", nticks: 8},
      yaxis: {title: {text: "features"}, tickmode: "auto", nticks: 6, rangemode: "tozero"}
    }, PLOT_CONFIG);
  }

  function headerPanel(rec) {
    var target = panel("sd-header");
    var norm = rec.decoder_norm || {};
    var pct = rec.density * 100;
    // density on a log scale from 1e-6 to 1, as a bar (a dead feature shows an empty bar)
    var logWidth = rec.density > 0 ? Math.max(0, Math.min(1, (Math.log10(rec.density) + 6) / 6)) : 0;
    var rows = [
      ["density", [fmt(pct) + " % (" + fmt(rec.n_firing) + " of " + fmt(rec.n_tokens) + " tokens) ",
                   el("span", {"class": "densitybar", title: "log scale, 1e-6 to 1"},
                      [el("span", {style: "width:" + (100 * logWidth).toFixed(1) + "%"})])]],
      ["max activation", [fmt(rec.max_activation)]],
      ["mean when firing", [fmt(rec.mean_firing_activation)]],
      ["decoder norm (SAE units)", [fmt(norm.sae_units)]],
      ["decoder norm (training units: before the input scale was folded in)", [fmt(norm.training_units)]]
    ];
    if (rec.firing_rule) rows.push(["firing rule", [rec.firing_rule]]);
    target.appendChild(el("table", {"class": "sd-table kv"}, [el("tbody", {}, rows.map(function (r) {
      return el("tr", {}, [el("th", {"class": "l"}, [r[0]]), el("td", {"class": "l"}, r[1])]);
    }))]));
  }

  function logitList(title, pairs, cls) {
    var max = Math.max.apply(null, [1e-12].concat(pairs.map(function (p) { return Math.abs(p[1]); })));
    return el("div", {"class": "logitlist " + cls}, [el("h3", {}, [title]), el("ol", {}, pairs.map(function (p) {
      var alpha = (Math.abs(p[1]) / max).toFixed(3);
      return el("li", {}, [
        el("span", {"class": "tok", style: "--a:" + alpha}, [showToken(p[0])]),
        el("span", {"class": "val"}, [fmt(p[1])])
      ]);
    }))]);
  }

  function logitsPanel(rec) {
    var target = panel("sd-logits"), logits = rec.logits;
    if (!logits) { note(target, "No logits (no unembedding given)."); return; }
    target.appendChild(el("div", {"class": "row"}, [
      logitList("top (promoted)", logits.top || [], "pos"),
      logitList("bottom (suppressed)", logits.bottom || [], "neg")
    ]));
  }

  /** The head labels of a DFA / attribution array: "h0".. for concat features, the SAE's head for a per-head one. */
  function headLabels(rec, n) {
    var m = /^head_(\d+)$/.exec(rec.sae);
    if (m && n === 1) return ["h" + m[1]];
    var out = [];
    for (var h = 0; h < n; h++) out.push("h" + h);
    return out;
  }

  function dfaTable(rec, ex) {
    // Stored as integers q per term, value = q * unit (docs/dashboards.md, EXAMPLE); before_window is each head's
    // DFA from the sources before the window, so window + before + biases = the pre-activation.
    var dfa = ex.dfa, unit = dfa.unit || 0, labels = headLabels(rec, dfa.heads.length);
    var heads = dfa.heads.map(function (row) { return row.map(function (q) { return q * unit; }); });
    var before = dfa.before_window || heads.map(function () { return 0; });
    var max = 1e-12;
    heads.forEach(function (row) { row.forEach(function (v) { max = Math.max(max, Math.abs(v)); }); });
    var header = el("tr", {}, [el("th", {}, ["head"]), el("th", {title: "the sources before the window"},
                                                           ["earlier"])].concat(ex.tokens.map(function (t, i) {
      return el("th", {"class": i === ex.focus ? "tok focus" : "tok"}, [showToken(t)]);
    })).concat([el("th", {}, ["sum"])]));
    var total = 0;
    var body = heads.map(function (row, h) {
      var sum = row.reduce(function (a, b) { return a + b; }, 0) + (before[h] || 0);
      total += sum;
      return el("tr", {}, [el("th", {}, [labels[h]]), el("td", {"class": "earlier"}, [fmt(before[h])])]
        .concat(row.map(function (v, i) {
          var a = (Math.abs(v) / max).toFixed(3);
          return el("td", {"class": v < 0 ? "neg" : "pos", style: "--a:" + a,
                           title: labels[h] + " \u2190 " + showToken(ex.tokens[i]) + ": " + fmt(v, 4)}, [""]);
        })).concat([el("td", {}, [fmt(sum)])]));
    });
    var bias = dfa.bias || {};
    var pre = total + (bias.encoder || 0) + (bias.decoder || 0);
    return el("details", {"class": "dfa"}, [
      el("summary", {}, ["DFA by source position, split by head"]),
      el("table", {"class": "sd-table dfa"}, [el("thead", {}, [header]), el("tbody", {}, body)]),
      el("p", {"class": "muted bias"}, [
        "bias terms, apart: encoder " + fmt(bias.encoder) + ", decoder bias through the encoder " +
        fmt(bias.decoder) + "; heads (window and earlier sources) " + fmt(total) + " + biases = pre-activation " +
        fmt(pre) + (rec.firing_rule ? "; the feature " + rec.firing_rule : "")])
    ]);
  }

  function exampleBlock(rec, ex) {
    var max = Math.max(rec.max_activation || 0, 1e-12);
    var leftOut = ex.left_out || [];
    var tokens = el("div", {"class": "tokens"}, ex.tokens.map(function (t, i) {
      if (leftOut.indexOf(i) >= 0) {  // BOS / special tokens: not counted, not coloured
        return el("span", {"class": "tok left-out", title: showToken(t) + ": left out of the statistics"},
                  [showToken(t)]);
      }
      var v = ex.acts[i] || 0, a = Math.max(0, Math.min(1, v / max)).toFixed(3);
      return el("span", {"class": i === ex.focus ? "tok focus" : "tok", style: "--a:" + a,
                         title: showToken(t) + ": " + fmt(v, 4)}, [showToken(t)]);
    }));
    return el("div", {"class": "example"}, [
      el("div", {"class": "meta"}, [el("b", {}, [fmt(ex.value)]),
                                    el("span", {"class": "muted"}, [" context " + ex.context + ", position " + ex.position])]),
      tokens,
      ex.dfa ? dfaTable(rec, ex) : null
    ]);
  }

  function examplesPanel(rec) {
    var target = panel("sd-examples"), ex = rec.examples || {};
    var top = ex.top || [];
    if (!top.length) note(target, "The feature never fired on the counted tokens.");
    top.forEach(function (e) { target.appendChild(exampleBlock(rec, e)); });
    var first = target.querySelector("details.dfa");
    if (first) first.open = true;
    var q = panel("sd-quantiles"), groups = ex.quantiles || [];
    if (!groups.length) note(q, "No quantile groups.");
    groups.slice().reverse().forEach(function (g) {  // highest interval first, as the top examples above
      var group = el("div", {"class": "quantile"}, [
        el("h3", {}, ["interval " + fmt(g.lo) + " \u2013 " + fmt(g.hi) + " (" + g.examples.length + " examples)"])]);
      g.examples.forEach(function (e) { group.appendChild(exampleBlock(rec, e)); });
      q.appendChild(group);
    });
  }

  function attributionPanel(rec) {
    var target = panel("sd-attribution"), att = rec.attribution;
    if (!att) {
      note(target, "A per-head feature: it reads one head only" + (/^head_\d+$/.test(rec.sae) ? " (" + rec.sae + ")." : "."));
      return;
    }
    var names = Object.keys(att.methods).filter(function (k) { return Array.isArray(att.methods[k]); });
    var n = names.length ? att.methods[names[0]].length : 0, labels = headLabels(rec, n);
    var tops = names.map(function (k) { return att.top_heads ? att.top_heads[k] : undefined; })
      .filter(function (t) { return t !== undefined && t !== null; });
    var agree = tops.every(function (t) { return t === tops[0]; });
    var d = att.disagreement;
    target.appendChild(el("p", {"class": agree ? "agree" : "flag", id: "sd-disagreement"}, [
      agree ? "The methods agree on the top head (" + (tops.length ? "h" + tops[0] : "–") + ")."
            : "The methods disagree on the top head: " + names.filter(function (k) {
                return att.top_heads && att.top_heads[k] !== undefined;
              }).map(function (k) { return k + " \u2192 h" + att.top_heads[k]; }).join(", ") + ".",
      d ? " Total variation between the shares: " + fmt(d.total_variation) + "; driving head h" + d.driving_head + "." : ""
    ]));
    var box = el("div", {"class": "plot"});
    target.appendChild(box);
    if (window.Plotly && names.length) {
      window.Plotly.newPlot(box, names.map(function (k) {
        return {type: "bar", name: k, x: labels, y: att.methods[k], hovertemplate: k + " %{x}: %{y:.3g}<extra></extra>"};
      }), {height: 240, barmode: "group", margin: {l: 45, r: 10, t: 10, b: 30},
           yaxis: {title: {text: "share"}, tickmode: "auto", nticks: 6}, legend: {orientation: "h"}}, PLOT_CONFIG);
    }
    target.appendChild(dataTable([["method", "l"]].concat(labels), names.map(function (k) {
      var top = att.top_heads ? att.top_heads[k] : null;
      return [cell(k, "l")].concat(att.methods[k].map(function (v, h) { return cell(fmt(v), h === top ? "top" : null); }));
    })));
  }

  /** The panel `id`, or null after a note saying why it is empty (a per-head and a concat feature differ). */
  function linkPanel(id, rec, items, perHeadNote, concatNote) {
    var target = panel(id);
    if (items.length) return target;
    note(target, /^head_/.test(rec.sae) ? perHeadNote : concatNote);
    return null;
  }

  function decompositionPanel(rec) {
    var settings = rec.decomposition || [];
    var target = linkPanel("sd-decomposition", rec, settings,
                           "A per-head feature: see \u201cused by\u201d for the concat features built from it.",
                           "No decomposition of this feature.");
    if (!target) return;
    settings.forEach(function (s) {
      var maxC = Math.max.apply(null, [1e-12].concat(s.atoms.map(function (a) { return Math.abs(a.coefficient); })));
      target.appendChild(el("div", {"class": "setting"}, [
        el("h3", {}, [s.label]),
        el("p", {"class": "muted"}, ["cosine " + fmt(s.cosine) + ", relative error " + fmt(s.relative_error) +
                                     ", L0 " + fmt(s.l0)]),
        dataTable(["head", "feature", "coefficient"], s.atoms.map(function (a) {
          return ["h" + a.head, link(a.href, "head_" + a.head + " #" + a.feature),
                  cell([el("span", {"class": "bar", style: "width:" + (4 * Math.abs(a.coefficient) / maxC).toFixed(2) +
                                    "em"}), " " + fmt(a.coefficient)])];
        }))
      ]));
    });
  }

  function usedByPanel(rec) {
    var used = rec.used_by || [];
    var target = linkPanel("sd-used-by", rec, used, "No concat feature's decomposition uses this feature.",
                           "A concat feature: see its decomposition above.");
    if (!target) return;
    target.appendChild(el("p", {"class": "muted"}, [
      "Back-links are the exact inverse of the concat pages' links: a concat feature lists the largest atoms of " +
      "its code per setting (a dense pinv code has thousands), so smaller uses are not listed here."]));
    target.appendChild(dataTable([["setting", "l"], "concat feature", "coefficient"], used.map(function (u) {
      return [cell(u.label, "l"), link(u.href, "concat #" + u.feature), fmt(u.coefficient)];
    })));
  }

  function correlatedPanel(rec) {
    var target = panel("sd-correlated"), corr = rec.correlated || [];
    if (!corr.length) { note(target, "None listed."); return; }
    target.appendChild(dataTable(["feature", "decoder cosine"], corr.map(function (c) {
      return [link(c.href, "#" + c.feature), fmt(c.cosine)];
    })));
  }

  function featurePage() {
    var rec;
    try {
      rec = JSON.parse(panel("sd-feature").textContent);
    } catch (e) {
      note(panel("sd-header"), "This page's feature record is not valid JSON.");
      return;
    }
    var saeLink = panel("sd-sae-link");
    if (saeLink) saeLink.textContent = rec.sae;
    headerPanel(rec);
    densityPanel(rec);
    var ah = rec.activation_histogram || {};
    var estimated = ah.sample_size && ah.sample_size < rec.n_firing;
    if (estimated) {
      panel("sd-activation-histogram").appendChild(el("p", {"class": "muted"}, [
        "Tokens per bin estimated from a uniform sample of " + fmt(ah.sample_size) + " of the " +
        fmt(rec.n_firing) + " non-zero activations."]));
    }
    histogram(panel("sd-activation-histogram"), ah, "activation", false,
              estimated ? "tokens (estimated)" : "tokens");
    histogram(panel("sd-logit-histogram"), rec.logits ? rec.logits.histogram : null, "logit", true);
    logitsPanel(rec);
    attributionPanel(rec);
    decompositionPanel(rec);
    usedByPanel(rec);
    correlatedPanel(rec);
    examplesPanel(rec);
  }

  if (panel("sd-feature")) featurePage();
  else if (panel("sd-index")) indexPage();
})();
