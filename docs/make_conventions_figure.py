"""Draw docs/conventions.png: the camera, pixel and UV frames of jaxrender.

Run from the repository root:  python docs/make_conventions_figure.py
Needs matplotlib only (no JAX), so the picture can be regenerated anywhere.
"""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Polygon  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RED, GREEN, BLUE, GREY = "#d62728", "#2ca02c", "#1f77b4", "#7f7f7f"


def camera_panel(ax):
    """Camera frame (OpenCV): x right, y down, z forward; image plane at z = f."""
    W, H, f = 6, 4, 5.0  # a 6 x 4 pixel image, focal length in "pixels"
    cx, cy = W / 2, H / 2

    # Plot coordinates: we draw camera (x, y, z) at matplotlib (x, z, -y) so that
    # camera y (down) points down on the page and z goes into the page.
    def P(x, y, z):
        return np.array([x, z, -y], dtype=float)

    def pix_to_cam(px, py):  # a pixel position on the image plane z = f
        return (px - cx), (py - cy), f

    # image plane and pixel grid
    for j in range(W + 1):
        a, b = P(*pix_to_cam(j, 0)), P(*pix_to_cam(j, H))
        ax.plot(*zip(a, b), color=GREY, lw=0.7)
    for i in range(H + 1):
        a, b = P(*pix_to_cam(0, i)), P(*pix_to_cam(W, i))
        ax.plot(*zip(a, b), color=GREY, lw=0.7)
    corners = [P(*pix_to_cam(px, py)) for px, py in ((0, 0), (W, 0), (W, H), (0, H))]
    ax.add_collection3d(_poly3d(corners))
    # pixel (row 0, col 0) and its centre
    c00 = P(*pix_to_cam(0.5, 0.5))
    ax.scatter(*c00, color="k", s=18, depthshade=False)
    ax.text(*(c00 + np.array([-0.4, 0.0, 0.45])), "centre of pixel (0, 0):\n(x, y) = (0.5, 0.5)", fontsize=7, ha="center")
    pp = P(*pix_to_cam(cx, cy))
    ax.scatter(*pp, color=BLUE, s=14, depthshade=False)
    ax.text(*(pp + np.array([0.15, 0.0, -0.45])), "(cx, cy)", fontsize=7, color=BLUE)
    # optical axis and a projection ray
    ax.plot(*zip(P(0, 0, 0), P(0, 0, f * 1.5)), color=BLUE, lw=0.8, ls="--")
    X = np.array([1.9, 1.2, 7.5])  # a world point in camera coordinates
    ax.plot(*zip(P(0, 0, 0), P(*X)), color="k", lw=0.8)
    ax.scatter(*P(*X), color="k", s=18, depthshade=False)
    ax.text(*(P(*X) + np.array([0.15, 0, 0.1])), "X_cam", fontsize=7)
    hit = X * f / X[2]
    ax.scatter(*P(*hit), color=RED, s=16, depthshade=False)
    # camera axes
    L = 2.2
    for v, col, name in (((L, 0, 0), RED, "x (right)"), ((0, L, 0), GREEN, "y (down)"), ((0, 0, L), BLUE, "z (forward)")):
        end = P(*v)
        ax.quiver(0, 0, 0, *end, color=col, lw=2, arrow_length_ratio=0.15)
        off = np.array([-2.3, 0.0, -0.9]) if name.startswith("z") else np.zeros(3)
        ax.text(*(end * 1.12 + off), name, color=col, fontsize=8)
    ax.text(0, 0, 0.4, "camera\ncentre", fontsize=7, ha="right")
    ax.set_title("(a) camera frame (OpenCV): X_cam = R X_world + t\nx = fx Xc/Zc + cx,  y = fy Yc/Zc + cy", fontsize=9, y=0.98)
    ax.view_init(elev=18, azim=-58)
    ax.set_box_aspect((1.2, 1.6, 1.0))
    lim = 4.2
    ax.set_xlim(-lim, lim); ax.set_ylim(0, 1.6 * lim); ax.set_zlim(-lim * 0.8, lim * 0.8)
    ax.set_axis_off()


def _poly3d(corners):
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    return Poly3DCollection([corners], facecolor=(0.6, 0.75, 0.95, 0.25), edgecolor=BLUE, lw=1.0)


def pixel_panel(ax):
    """Pixel frame: origin at the top-left corner, y down, centres at +0.5; winding."""
    W, H = 6, 4
    for j in range(W + 1):
        ax.plot([j, j], [0, H], color=GREY, lw=0.7)
    for i in range(H + 1):
        ax.plot([0, W], [i, i], color=GREY, lw=0.7)
    for i in range(H):
        ax.text(-0.15, i + 0.5, f"row {i}", ha="right", va="center", fontsize=7)
    for j in range(W):
        ax.text(j + 0.5, -0.12, f"{j}", ha="center", va="bottom", fontsize=7)
    ax.text(W / 2, -0.45, "column j", ha="center", va="bottom", fontsize=7)
    ax.scatter([0.5], [0.5], color="k", s=18, zorder=5)
    ax.annotate("(0.5, 0.5)", (0.5, 0.5), (0.9, 0.95), fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.5))
    ax.scatter([4.5], [2.5], color="k", s=18, zorder=5)
    ax.annotate("pixel (i=2, j=4):\ncentre (4.5, 2.5)", (4.5, 2.5), (3.9, 3.55), fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.5))
    # axes
    ax.add_patch(FancyArrowPatch((0, 0), (1.6, 0), arrowstyle="-|>", mutation_scale=12, color=RED, lw=2))
    ax.add_patch(FancyArrowPatch((0, 0), (0, 1.6), arrowstyle="-|>", mutation_scale=12, color=GREEN, lw=2))
    ax.text(1.65, 0.18, "x", color=RED, fontsize=9)
    ax.text(0.1, 1.7, "y", color=GREEN, fontsize=9)
    ax.scatter([3.0], [2.0], color=BLUE, s=12, zorder=5)
    ax.text(3.08, 1.9, "image centre (W/2, H/2)", color=BLUE, fontsize=6.5, va="bottom")
    # a front-facing triangle: counter-clockwise as displayed
    tri = np.array([[1.3, 3.6], [2.9, 3.6], [2.1, 2.4]])
    ax.add_patch(Polygon(tri, closed=True, facecolor=(1.0, 0.85, 0.6), edgecolor="#b35900", lw=1.0, zorder=3))
    for k in range(3):
        a, b = tri[k], tri[(k + 1) % 3]
        ax.add_patch(FancyArrowPatch(a + 0.15 * (b - a), a + 0.85 * (b - a), arrowstyle="-|>", mutation_scale=9, color="#b35900", zorder=4))
        ax.text(*(tri[k] + (tri[k] - tri.mean(0)) * 0.25), f"v{k}", fontsize=7, ha="center", va="center")
    ax.text(2.1, 4.25, "front face: v0→v1→v2 counter-clockwise as displayed\n(signed area in pixel coords < 0)", ha="center", va="top", fontsize=7, color="#b35900")
    ax.set_xlim(-1.1, W + 0.3)
    ax.set_ylim(H + 0.9, -0.7)  # y down, row 0 at the top
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title("(b) pixel frame: images are (H, W, C), row 0 on top", fontsize=9)


def uv_panel(ax):
    """UV frame: u right, v up, (0, 0) at the bottom-left of the texture image."""
    Wt, Ht = 4, 4
    for j in range(Wt + 1):
        ax.plot([j, j], [0, Ht], color=GREY, lw=0.7)
    for i in range(Ht + 1):
        ax.plot([0, Wt], [i, i], color=GREY, lw=0.7)
    # display with texture row 0 at the top: row r spans y in [r, r + 1]
    for r in range(Ht):
        ax.text(-0.12, r + 0.5, f"row {r}", ha="right", va="center", fontsize=7)
    ax.add_patch(FancyArrowPatch((0, Ht), (1.7, Ht), arrowstyle="-|>", mutation_scale=12, color=RED, lw=2))
    ax.add_patch(FancyArrowPatch((0, Ht), (0, Ht - 1.7), arrowstyle="-|>", mutation_scale=12, color=GREEN, lw=2))
    ax.text(1.75, Ht - 0.12, "u", color=RED, fontsize=9)
    ax.text(0.1, Ht - 1.8, "v", color=GREEN, fontsize=9)
    ax.text(0, Ht + 0.45, "uv = (0, 0)", fontsize=7, ha="center")
    ax.text(Wt, -0.15, "uv = (1, 1)", fontsize=7, ha="center")
    r, c = 0, 2
    ax.scatter([c + 0.5], [r + 0.5], color="k", s=18, zorder=5)
    ax.annotate(
        f"texel (row {r}, col {c}):\nu = (c + 0.5)/Wt = {(c + 0.5) / Wt:.3f}\nv = 1 - (r + 0.5)/Ht = {1 - (r + 0.5) / Ht:.3f}",
        (c + 0.5, r + 0.5), (1.2, 2.55), fontsize=7, arrowprops=dict(arrowstyle="-", lw=0.5),
    )
    ax.set_xlim(-1.0, Wt + 0.6)
    ax.set_ylim(Ht + 0.9, -0.7)
    ax.set_aspect("equal")
    ax.set_axis_off()
    ax.set_title("(c) UV frame (OBJ / OpenGL): u right, v up", fontsize=9)


def main(path=os.path.join(HERE, "conventions.png")):
    fig = plt.figure(figsize=(13.5, 4.6), dpi=130)
    camera_panel(fig.add_subplot(1, 3, 1, projection="3d"))
    pixel_panel(fig.add_subplot(1, 3, 2))
    uv_panel(fig.add_subplot(1, 3, 3))
    fig.subplots_adjust(left=0.0, right=0.99, top=0.86, bottom=0.02, wspace=0.05)
    fig.savefig(path)
    print("wrote", path)


if __name__ == "__main__":
    main()
