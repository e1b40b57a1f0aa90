#!/usr/bin/env python3
"""Collects the benches' target/bench/*.json into one result: <out>.json, <out>.md, <out>.png.

usage: report.py INPUT_DIR OUT_PREFIX [--machine KEY=VALUE ...]

Each input file is one benchmark's report (support::report's format: machine, summaries in
microseconds, ratios; dataplane.json adds throughput and throughput_ratios). Nothing here
measures anything: it only arranges what the benches wrote.
"""
import glob
import json
import os
import sys

# The benches' natural order first; any other result file (e.g. a new bench) after them.
ORDER = ["control_plane", "overlay", "docker", "dataplane", "scale"]


def load(input_dir):
    results = {}
    for path in sorted(glob.glob(os.path.join(input_dir, "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        try:
            with open(path) as f:
                results[name] = json.load(f)
        except (OSError, ValueError) as e:
            print(f"bench/report: skipping {path}: {e}", file=sys.stderr)
    ordered = [n for n in ORDER if n in results] + sorted(n for n in results if n not in ORDER)
    return {n: results[n] for n in ordered}


def fmt_us(us):
    if us is None or us != us:
        return "–"
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.2f} ms"
    return f"{us:.0f} µs"


def fmt_ratio(r):
    return "–" if r is None or r != r else f"{r:.3f}"


def markdown(machine, benches):
    lines = [f"# vxnet benchmarks, {machine.get('date', '')[:10]}", ""]
    lines.append(
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items() if v not in (None, ""))
        + "."
    )
    lines.append("")
    lines.append(
        "Each figure is p50/p99/min/max over the runs of one case; ratios compare two cases "
        "measured in the same run (on a shared machine, read the ratios rather than the "
        "absolute figures)."
    )
    for name, r in benches.items():
        lines += ["", f"## {name}", ""]
        summaries = r.get("summaries") or []
        if summaries:
            lines += ["| case | runs | p50 | p99 | min | max |", "|---|---:|---:|---:|---:|---:|"]
            for s in summaries:
                lines.append(
                    f"| {s.get('case')} | {s.get('runs')} | {fmt_us(s.get('p50_us'))} | "
                    f"{fmt_us(s.get('p99_us'))} | {fmt_us(s.get('min_us'))} | {fmt_us(s.get('max_us'))} |"
                )
        ratios = r.get("ratios") or []
        if ratios:
            lines += ["", "| case | against | p50 ratio | p99 ratio |", "|---|---|---:|---:|"]
            for x in ratios:
                lines.append(
                    f"| {x.get('case')} | {x.get('baseline')} | {fmt_ratio(x.get('p50_ratio'))} | "
                    f"{fmt_ratio(x.get('p99_ratio'))} |"
                )
        figures = r.get("figures") or []
        if figures:
            lines += ["", "| figure | value |", "|---|---:|"]
            for f in figures:
                value = f"{f['value']:.0f}" if float(f["value"]).is_integer() else f"{f['value']:.2f}"
                lines.append(f"| {f['case']} | {value} {f.get('unit', '')} |")
        cases = r.get("cases") or []
        if cases:
            # scale.json: one row per K, the bench's own fields as columns.
            keys = list(cases[0].keys())
            if "rss_idle_kib" in r:
                lines += [f"Daemon RSS idle: {r['rss_idle_kib']} KiB.", ""]
            lines += ["| " + " | ".join(k.replace("_", " ") for k in keys) + " |",
                      "|" + "---:|" * len(keys)]
            for c in cases:
                cells = [f"{c[k]:.2f}" if isinstance(c[k], float) and c[k] < 10 else
                         f"{c[k]:.0f}" if isinstance(c[k], float) else str(c[k]) for k in keys]
                lines.append("| " + " | ".join(cells) + " |")
        tput = r.get("throughput") or []
        if tput:
            lines += [
                "",
                f"TCP throughput (iperf3, {r.get('iperf_seconds')} s per run):",
                "",
                "| case | runs | p50 | p99 | min | max |",
                "|---|---:|---:|---:|---:|---:|",
            ]
            for t in tput:
                u = t.get("unit", "")
                lines.append(
                    f"| {t['case']} | {t['runs']} | {t['p50']:.2f} {u} | {t['p99']:.2f} {u} | "
                    f"{t['min']:.2f} {u} | {t['max']:.2f} {u} |"
                )
        tr = r.get("throughput_ratios") or []
        if tr:
            lines += [
                "",
                "| case | against | p50 ratio | p99 ratio | min ratio | max ratio | paired p50 |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for x in tr:
                lines.append(
                    f"| {x['case']} | {x['baseline']} | {fmt_ratio(x.get('p50_ratio'))} | "
                    f"{fmt_ratio(x.get('p99_ratio'))} | {fmt_ratio(x.get('min_ratio'))} | "
                    f"{fmt_ratio(x.get('max_ratio'))} | {fmt_ratio(x.get('paired_p50_ratio'))} |"
                )
        offloads = r.get("offloads") or {}
        if offloads:
            keys = ["mtu", "tcp-segmentation-offload", "generic-segmentation-offload",
                    "generic-receive-offload", "tx-udp_tnl-segmentation", "tx-checksumming"]
            lines += ["", "Offloads (read, not changed):", "",
                      "| interface | " + " | ".join(keys) + " |",
                      "|---|" + "---|" * len(keys)]
            for iface, st in offloads.items():
                lines.append(f"| {iface} | " + " | ".join(
                    str(st.get(k, "–")).replace(" [fixed]", "") for k in keys) + " |")
            vx = [(i, st) for i, st in offloads.items() if st.get("vxlan")]
            if vx:
                lines += ["", "VXLAN devices (`ip -d link`; `dev` shows the underlay's ifindex as "
                          "named in the sandbox namespace):", ""]
                for iface, st in vx:
                    lines.append(f"- {iface}: `{st['vxlan']}`, bridge port learning "
                                 f"{st.get('bridge-port-learning', '–')}")
    lines.append("")
    return "\n".join(lines)


def chart(benches, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench/report: matplotlib missing, no chart (VXNET_DEPS_CHARTS=1 scripts/deps.sh)",
              file=sys.stderr)
        return False
    lat = [(f"{n}: {s['case']}", s) for n, r in benches.items() for s in (r.get("summaries") or [])
           if s.get("p50_us") == s.get("p50_us") and s.get("p50_us")]
    tput = (benches.get("dataplane") or {}).get("throughput") or []
    rows = max(len(lat), 1)
    fig, axes = plt.subplots(
        2 if tput else 1, 1, figsize=(11, 0.32 * rows + 2.5 + (3.5 if tput else 0)),
        gridspec_kw={"height_ratios": [max(rows, 4), 8] if tput else [1]}, squeeze=False)
    ax = axes[0][0]
    if lat:
        y = list(range(len(lat)))[::-1]
        p50 = [s["p50_us"] / 1e3 for _, s in lat]
        p99 = [s["p99_us"] / 1e3 for _, s in lat]
        mins = [s["min_us"] / 1e3 for _, s in lat]
        ax.hlines(y, mins, p99, color="#9ab", lw=2, label="min … p99")
        ax.plot(p50, y, "o", color="#135", label="p50")
        ax.set_yticks(y)
        ax.set_yticklabels([label for label, _ in lat], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_title("latency: p50, whisker min … p99")
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    if tput:
        ax = axes[1][0]
        groups = []
        for t in tput:
            streams, _, label = t["case"].partition(": ")
            if label not in groups:
                groups.append(label)
        series = sorted({t["case"].partition(": ")[0] for t in tput})
        width = 0.8 / max(len(series), 1)
        for k, sname in enumerate(series):
            xs, hs, lo, hi = [], [], [], []
            for i, g in enumerate(groups):
                t = next((t for t in tput if t["case"] == f"{sname}: {g}"), None)
                if t:
                    xs.append(i + k * width)
                    hs.append(t["p50"])
                    lo.append(t["p50"] - t["min"])
                    hi.append(t["max"] - t["p50"])
            ax.bar(xs, hs, width, yerr=[lo, hi], capsize=3, label=sname)
        ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))])
        ax.set_xticklabels(groups, fontsize=8)
        ax.set_ylabel(tput[0].get("unit", ""))
        ax.set_title("TCP throughput vm2 → vm3 (p50, whiskers min … max)")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    input_dir, prefix = sys.argv[1], sys.argv[2]
    machine = {}
    for arg in sys.argv[3:]:
        if "=" in arg:
            k, v = arg.split("=", 1)
            machine[k] = v
    benches = load(input_dir)
    if not benches:
        print(f"bench/report: no result files in {input_dir}", file=sys.stderr)
        sys.exit(1)
    # The benches' own machine record (cores, kernel) is taken from the first that has one.
    for r in benches.values():
        for k in ("cores", "kernel"):
            if k not in machine and k in (r.get("machine") or {}):
                machine[k] = r["machine"][k]
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(prefix + ".json", "w") as f:
        json.dump({"machine": machine, "benches": benches}, f, indent=2)
    with open(prefix + ".md", "w") as f:
        f.write(markdown(machine, benches))
    drew = chart(benches, prefix + ".png")
    print(f"bench/report: wrote {prefix}.json, {prefix}.md" + (f", {prefix}.png" if drew else ""))


if __name__ == "__main__":
    main()
