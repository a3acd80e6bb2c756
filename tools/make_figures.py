#!/usr/bin/env python3
"""Draws images/architecture.png (layers + shared block maps). Needs matplotlib
(a documentation tool only: `pip install matplotlib`)."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = os.path.join(os.path.dirname(__file__), "..", "images", "architecture.png")


def box(ax, x, y, w, h, text, color, size=9, weight="normal"):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#333", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, weight=weight)


def arrow(ax, a, b, color="#333", style="-|>", ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=10, color=color, lw=1, ls=ls))


def layers(ax):
    ax.set_title("Layers (each calls only downward)", fontsize=11, weight="bold")
    rows = [
        ("command line (click)  cli/", "#dbe9f6"),
        ("service: ops, runner, daemon + control socket,\nhooks orchestration  service/;  agent  operations/",
         "#e3f1df"),
        ("engine: pool, ROW/COW volumes, snapshots, maps,\nspace, catalog, leases + C direct path  engine/", "#fdf0d5"),
        ("block store: pread/pwrite/fsync/punch  store/", "#f6dede"),
    ]
    for i, (t, c) in enumerate(rows):
        box(ax, 0.05, 0.78 - i * 0.2, 0.6, 0.15, t, c)
        if i:
            arrow(ax, (0.35, 0.78 - (i - 1) * 0.2), (0.35, 0.93 - i * 0.2))
    subs = [("fuse/ (tree, daemon side)\nwrite-behind, C callbacks", "#eee"), ("hooks/ (freeze)", "#eee"),
            ("streams/ (send, receive)", "#eee"),
            ("backup/ (send stream in;\npacks, manifests, copy,\nverify coverage; file://, S3)", "#eee"),
            ("operations/ (policy, scheduler,\nagent, status, metrics, alerts)", "#eee"),
            ("recovery/ (backup mount,\ndrills, instant recovery)", "#eee")]
    for i, (t, c) in enumerate(subs):
        box(ax, 0.72, 0.81 - i * 0.13, 0.25, 0.085, t, c, 6.5)
    ax.text(0.845, 0.925, "subpackages", ha="center", fontsize=8, style="italic")
    box(ax, 0.05, 0.0, 0.9, 0.12, "pool directory:  catalog.db (SQLite, WAL)  |  data (sparse file or --data device)\n"
        "lock (flock)  |  daemon.sock (0600)  |  daemon.log  |  agent/ (lock, state, alerts)  |  inplace", "#f4f4f4", 8)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1)
    ax.axis("off")


def maps(ax):
    ax.set_title("Block maps: radix trees of shared pages (ROW)", fontsize=11, weight="bold")
    box(ax, 0.02, 0.86, 0.2, 0.08, "live root", "#dbe9f6", 8, "bold")
    box(ax, 0.30, 0.86, 0.2, 0.08, "snapshot s1", "#e3f1df", 8, "bold")
    box(ax, 0.58, 0.86, 0.2, 0.08, "snapshot s2", "#e3f1df", 8, "bold")
    box(ax, 0.05, 0.62, 0.14, 0.1, "L1' (copy)", "#dbe9f6", 8)
    box(ax, 0.40, 0.62, 0.14, 0.1, "L1  ref=2", "#fdf0d5", 8)
    arrow(ax, (0.12, 0.86), (0.12, 0.72))
    arrow(ax, (0.40, 0.86), (0.47, 0.72))
    arrow(ax, (0.68, 0.86), (0.50, 0.72))
    box(ax, 0.0, 0.36, 0.15, 0.1, "leaf A'\n(copied)", "#dbe9f6", 8)
    box(ax, 0.25, 0.36, 0.15, 0.1, "leaf A", "#fdf0d5", 8)
    box(ax, 0.50, 0.36, 0.15, 0.1, "leaf B  ref=2", "#fdf0d5", 8)
    arrow(ax, (0.09, 0.62), (0.075, 0.46))
    arrow(ax, (0.15, 0.62), (0.55, 0.46))
    arrow(ax, (0.45, 0.62), (0.33, 0.46))
    arrow(ax, (0.50, 0.62), (0.58, 0.46))
    cx = {}
    for i in range(7):
        x = 0.01 + i * 0.11
        box(ax, x, 0.1, 0.07, 0.08, f"u{i}", "#f6dede", 7)
        cx[i] = x + 0.035
    arrow(ax, (0.05, 0.36), (cx[1], 0.18), "#a33")
    arrow(ax, (0.10, 0.36), (cx[5], 0.18), "#a33")
    arrow(ax, (0.30, 0.36), (cx[1], 0.18), "#a33")
    arrow(ax, (0.35, 0.36), (cx[2], 0.18), "#a33")
    arrow(ax, (0.58, 0.36), (cx[3], 0.18), "#a33")
    ax.text(0.0, 0.02, "leaf entry = (data-store unit, xxh3 of the block); a write after a snapshot copies\n"
            "only the path to its leaf (A -> A', L1 -> L1') and goes to a fresh block (u5).",
            fontsize=7.5, va="bottom")
    ax.text(0.70, 0.62, "snapshot create:\nincrement one\nroot reference\n= O(1)", fontsize=8, va="bottom")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")


def main():
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5.2))
    layers(a)
    maps(b)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print("wrote", os.path.abspath(OUT))


if __name__ == "__main__":
    main()
