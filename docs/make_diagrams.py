"""Draw the architecture diagrams of docs/ARCHITECTURE.md with matplotlib (no other tools).

python docs/make_diagrams.py        # writes docs/images/components.png and docs/images/dataflow.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

IMAGES = Path(__file__).resolve().parent / "images"

# One colour per layer of the system, light fills so black text reads well.
USER, AGENTS, ENGINE, STORAGE, MLX = "#e8eefc", "#e6f4ea", "#fff4e0", "#f3e8fd", "#eceff1"
EDGE = "#37474f"


def box(ax, x, y, w, h, title, lines=(), fill="#ffffff", title_size=11, line_size=8.6):
    """A rounded box with a bold title and a few lines of detail; returns its centre and size."""
    ax.add_patch(
        FancyBboxPatch(
            (x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.12", linewidth=1.3, edgecolor=EDGE, facecolor=fill
        )
    )
    ax.text(x + w / 2, y + h - 0.22, title, ha="center", va="top", fontsize=title_size, fontweight="bold")
    for i, line in enumerate(lines):
        ax.text(x + w / 2, y + h - 0.62 - i * 0.3, line, ha="center", va="top", fontsize=line_size)
    return (x, y, w, h)


def arrow(ax, start, end, label="", color=EDGE, style="-|>", rad=0.0, label_offset=(0, 0.12), size=8.2):
    """An arrow between two points with an optional label at its middle."""
    ax.add_patch(
        FancyArrowPatch(
            start,
            end,
            arrowstyle=style,
            mutation_scale=14,
            linewidth=1.4,
            color=color,
            connectionstyle=f"arc3,rad={rad}",
            shrinkA=2,
            shrinkB=2,
        )
    )
    if label:
        mx, my = (start[0] + end[0]) / 2 + label_offset[0], (start[1] + end[1]) / 2 + label_offset[1]
        ax.text(
            mx,
            my,
            label,
            ha="center",
            va="bottom",
            fontsize=size,
            color=color,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9),
        )


def canvas(w, h, title):
    fig, ax = plt.subplots(figsize=(w, h))
    ax.set_xlim(0, w)
    ax.set_ylim(0, h)
    ax.axis("off")
    ax.text(0.2, h - 0.25, title, fontsize=14, fontweight="bold", va="top")
    return fig, ax


def components() -> Path:
    """Who calls whom: programs, HTTP clients and the CLI on top; the server and the agent manager; the
    engine on SQL + blob storage."""
    fig, ax = canvas(13, 10.6, "kvstore — components")
    box(ax, 0.4, 8.4, 3.3, 1.35, "Your agent program", ["Python: kvstore.agents", "or `kvstore chat` / `demo`"], USER)
    box(ax, 4.0, 8.4, 3.7, 1.35, "HTTP clients", ["openai · anthropic SDKs", "agent frameworks · llm CLI"], USER)
    box(ax, 9.0, 8.4, 3.6, 1.35, "mlx-lm", ["model + tokenizer (mlx_lm.load)", "KVCache, ArraysCache, …"], MLX)
    box(
        ax,
        4.0,
        6.35,
        3.7,
        1.55,
        "Server — kvstore serve",
        ["OpenAI + Anthropic APIs", "batched decode · disk budget", "retention · /metrics · miss reasons"],
        AGENTS,
        title_size=10,
    )
    box(
        ax,
        9.0,
        6.35,
        3.6,
        1.55,
        "`kvstore` command",
        ["agents · show · du · explain", "fsck · gc · rm · fork", "export/import · models"],
        USER,
    )
    box(
        ax,
        0.4,
        3.9,
        7.3,
        1.85,
        "Agent manager — kvstore.agents",
        [
            "AgentManager: create · load · fork · save_all · memory_report",
            "Agent.chat: template → longest reusable prefix (+ state checkpoints) → prefill → generate",
            "LRU residency · sourcing · autosave after each turn · recovery from damaged blobs",
        ],
        AGENTS,
    )
    box(
        ax,
        0.4,
        1.45,
        7.3,
        1.95,
        "Storage engine — kvstore",
        [
            "open · save · load · match · restore · fork · delete · gc · fsck · stats",
            "keys: xxh3-128 hash chain · codec: caches ↔ per-chunk pieces · ops/plan: pure planner",
            "writer: blobs, then one commit_chain transaction · reader: verify, rebuild",
        ],
        ENGINE,
    )
    box(
        ax,
        9.0,
        2.55,
        3.6,
        1.5,
        "Index (SQLAlchemy + Alembic)",
        ["SQLite file: WAL, synchronous=FULL", "or PostgreSQL for a shared store", "models · chunks · snapshots"],
        STORAGE,
        title_size=10,
    )
    box(
        ax,
        9.0,
        0.35,
        3.6,
        1.7,
        "Blobs: a folder or S3",
        [
            "blobs/ab/cdef….safetensors",
            "one chunk, all its layers,",
            "named by xxh3-128 of its bytes",
            "or an S3 bucket + a disk tier",
        ],
        STORAGE,
        title_size=10,
    )
    arrow(ax, (2.05, 8.4), (2.05, 5.75), "chat · fork · save", label_offset=(0.95, 0.3))
    arrow(ax, (5.85, 8.4), (5.85, 7.9), "HTTP", label_offset=(0.4, -0.05))
    arrow(ax, (5.85, 6.35), (5.85, 5.75), "turns", label_offset=(0.45, -0.05))
    arrow(ax, (9.0, 8.9), (7.7, 5.4), "forward\npasses", style="<|-|>", label_offset=(-0.2, 0.95))
    arrow(ax, (9.6, 6.35), (7.7, 3.42), "inspect · fsck · gc\nexport · import", label_offset=(0.95, 0.0))
    arrow(ax, (4.3, 3.9), (4.3, 3.4), "save · match · restore", label_offset=(1.1, -0.2))
    arrow(ax, (7.7, 2.6), (9.0, 3.0), "1 transaction", label_offset=(0.1, -0.45))
    arrow(ax, (7.7, 1.9), (9.0, 1.3), "blobs first", label_offset=(-0.05, -0.5))
    ax.text(
        0.4,
        0.55,
        "Dependencies point down: the engine never imports the agent manager, the server or the CLI.\n"
        "Names are public API (`__all__`); everything else is private.",
        fontsize=8.6,
        color="#455a64",
        va="bottom",
    )
    out = IMAGES / "components.png"
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def dataflow() -> Path:
    """The save path and the restore path, step by step, with where durability and checks happen."""
    fig, ax = canvas(13, 8.6, "kvstore — data flow of a save and a restore")
    ax.text(
        0.4, 7.75, "SAVE  store.save(name, cache, tokens, model=fp)", fontsize=11, fontweight="bold", color="#8a4b00"
    )
    steps = [
        ("1. chunk keys", ["K0 = H(fp ‖ tokens[0:C])", "Ki = H(Ki-1 ‖ chunk i)"]),
        ("2. ask the index", ["which (chunk, layer)", "pieces exist already?"]),
        ("3. write missing blobs", ["temp file → hash → fsync", "→ rename → fsync dir"]),
        ("4. one transaction", ["chunk rows, snapshot,", "token ids, agent head"]),
    ]
    x = 0.4
    for i, (title, lines) in enumerate(steps):
        box(ax, x, 5.95, 2.85, 1.45, title, lines, ENGINE, title_size=10.5)
        if i:
            arrow(ax, (x - 0.35, 6.67), (x, 6.67))
        x += 3.2
    ax.text(
        0.4,
        5.45,
        "Existing pieces are reused (dedup across agents); a new turn writes only new chunks and the "
        "rewritten last partial chunk.\nA crash before step 4 leaves only unreferenced files, which "
        "gc removes after a grace period; a committed snapshot never names a missing blob.",
        fontsize=8.6,
        color="#455a64",
        va="top",
    )
    ax.text(
        0.4,
        4.25,
        "RESTORE  store.restore(tokens, model=fp)  /  store.load(name)",
        fontsize=11,
        fontweight="bold",
        color="#1b5e20",
    )
    steps = [
        ("1. chunk keys", ["same hash chain over", "the request's tokens"]),
        ("2. longest stored run", ["one IN (...) query;", "every layer rebuildable"]),
        ("3. verify", ["token ids equal a stored", "snapshot's; blobs re-hashed"]),
        ("4. build mlx-lm caches", ["own arrays, correct offset;", "caller prefills the rest"]),
    ]
    x = 0.4
    for i, (title, lines) in enumerate(steps):
        box(ax, x, 2.45, 2.85, 1.45, title, lines, AGENTS, title_size=10.5)
        if i:
            arrow(ax, (x - 0.35, 3.17), (x, 3.17))
        x += 3.2
    ax.text(
        0.4,
        1.95,
        "Wrong model fingerprint → ModelMismatchError, nothing loaded.  Damaged or missing blob → an error "
        "naming the blob and the agent\n(the agent manager recomputes from the token history and repairs "
        "the store).  Sliding-window layers need only the chunks of their window.",
        fontsize=8.6,
        color="#455a64",
        va="top",
    )
    box(
        ax,
        0.4,
        0.2,
        5.9,
        0.95,
        "Index",
        ["chunks · chunk_layers · snapshots · snapshot_chunks · agents"],
        STORAGE,
        title_size=10,
    )
    box(
        ax,
        6.7,
        0.2,
        5.9,
        0.95,
        "Blob folder",
        ["blobs/ab/cdef….safetensors  (immutable, content-addressed)"],
        STORAGE,
        title_size=10,
    )
    out = IMAGES / "dataflow.png"
    fig.savefig(out, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return out


def main() -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    for path in (components(), dataflow()):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
